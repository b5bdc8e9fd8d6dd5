"""Can an encoder, untrained, fit labelled phantoms at a suite's size? A supervised full-batch fitting test.

Why: at ``suite=methods_small`` the transformer encoders (GTGM's Swin, UniMedI's ViT) stayed at chance after
pre-training, and so did ``clip`` when given the Swin (``results/ablations/clip_swin``). This separates "the
method's objective does not learn" from "this encoder, from scratch, is slow to fit anything at this budget":
each method's image encoder, as that method builds it (the ``scratch*`` twins: untrained), and a linear head are
fitted to the same ``n`` labelled training images with AdamW for ``steps`` full-batch steps. The loss curve is set
beside the base-rate loss (predicting the training label frequencies), which an encoder whose pooled features carry
nothing about the image reaches as well. The spread of the pooled features across images at initialisation is
recorded too (mean per-feature std over images, against the std of all values).

    python benchmarks/trainability.py --methods scratch,scratch_swin,scratch_vit --kinds cxr --n 64 --steps 60

CPU only. Writes ``<out>/trainability-cpu.json`` and ``.md`` atomically (``<out>`` defaults to
``results/benchmarks/trainability/lr<lr>``, so runs at two learning rates do not overwrite each other). Times depend
on the machine's load; the losses are seeded (float reductions may still differ in the last digits with the
thread count).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from medvlp_bench.atomic import atomic_write_text
from medvlp_bench.config import compose, instantiate, options, tiny_overrides, unmet_requirements
from medvlp_bench.run import build_method


def base_rate_loss(label: torch.Tensor) -> float:
    """The loss of predicting the label frequencies: mean binary entropy over classes for multi-label (float
    ``[N, K]``) targets, the class-frequency entropy for class indices (integer ``[N]``)."""
    if label.dtype.is_floating_point:
        p = label.float().mean(0).clamp(1e-7, 1 - 1e-7)
        return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())
    freq = torch.bincount(label.long()).float()
    freq = freq[freq > 0] / freq.sum()
    return float(-(freq * freq.log()).sum())


def _loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    if label.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits, label.float())
    return F.cross_entropy(logits, label.long())


def _batch(method: str, kind: str, args: argparse.Namespace) -> tuple[Any, dict] | str:
    """The method's image encoder and ``n`` labelled training images of ``kind``, or why it cannot take them."""
    ov = [f"method={method}", f"data=phantom_{kind}", f"data.n_train={args.n}", "data.n_val=8", "data.n_test=8"]
    ov += ["logger=none"] + (tiny_overrides(method) if args.tiny else [])
    ov += [f"data.size={args.size}"] if args.size else []
    cfg = compose("pretrain", ov)
    if (why := unmet_requirements(cfg.method, cfg.data)) is not None:
        return str(why)
    L.seed_everything(args.seed, verbose=False)
    encoder = build_method(cfg).image_encoder
    dm = instantiate(cfg.data, batch_size=args.n, tokenizer=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return encoder, {"image": batch["image"], "label": batch["label"], "size": int(cfg.data.size)}


def fit(method: str, kind: str, args: argparse.Namespace) -> dict[str, Any] | str:
    """Fit encoder + linear head full-batch: the loss curve, the base rate and the features' spread at init; or
    why the method cannot take this kind of phantom."""
    got = _batch(method, kind, args)
    if isinstance(got, str):
        return got
    encoder, batch = got
    image, label = batch["image"], batch["label"]
    n_out = label.shape[1] if label.dtype.is_floating_point else int(label.max()) + 1
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(encoder.out_dim, n_out)
    with torch.no_grad():
        pooled = encoder(image).pooled
    spread = float(pooled.std(0).mean()), float(pooled.std())
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    curve: list[float] = []
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = _loss(head(encoder(image).pooled), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))  # before this step's update: curve[0] scores the initialisation
    with torch.no_grad():
        final = float(_loss(head(encoder(image).pooled), label))  # after the last update
    return {
        "method": method,
        "encoder": type(encoder).__name__,
        "kind": kind,
        "size": batch["size"],
        "n": int(image.shape[0]),
        "params": sum(p.numel() for p in encoder.parameters()),
        "lr": args.lr,
        "steps": args.steps,
        "base_rate_loss": base_rate_loss(label),
        "loss_first": curve[0],
        "loss_final": final,
        "curve": curve,
        "feature_spread_across_images": spread[0],
        "feature_std_overall": spread[1],
        "seconds": time.perf_counter() - start,
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Supervised full-batch fit of {meta['n']} labelled phantoms, AdamW lr {meta['lr']}, {meta['steps']} steps, "
        f"seed {meta['seed']}, {meta['device']} (`{meta['command']}`).",
        "",
        "| method | encoder | kind | size | params | base-rate loss | loss at init | loss after the last step | "
        "loss every 10 steps | feature spread across images / overall std | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        every = "/".join(f"{v:.3f}" for v in r["curve"][::10])
        lines.append(
            f"| {r['method']} | {r['encoder']} | {r['kind']} | {r['size']} | {r['params']:,} | "
            f"{r['base_rate_loss']:.3f} | {r['loss_first']:.3f} | {r['loss_final']:.3f} | {every} | "
            f"{r['feature_spread_across_images']:.3f} / {r['feature_std_overall']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="scratch,scratch_swin,scratch_vit", help="comma-separated method names")
    ap.add_argument("--kinds", default="cxr", help="phantom kinds: cxr, ct, mri (comma-separated)")
    ap.add_argument("--n", type=int, default=64, help="labelled training images, one full batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=None, help="phantom size (default: the phantom's own)")
    ap.add_argument("--tiny", action="store_true", help="the methods' tiny overrides (smoke tests)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/benchmarks/trainability/lr<lr>")
    args = ap.parse_args(argv)
    if args.n < 2 or args.steps < 1 or not math.isfinite(args.lr) or args.lr <= 0:
        ap.error("--n must be >= 2, --steps >= 1 and --lr a positive number")
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := sorted(set(kinds) - {"cxr", "ct", "mri"}):
        ap.error(f"unknown phantom kind(s) {unknown}; allowed: cxr, ct, mri")
    methods = [m for m in args.methods.split(",") if m]
    known = options("method")
    if not methods or (bad := sorted(set(methods) - set(known))):
        ap.error(f"--methods: unknown or empty {methods if not methods else bad}; allowed: {', '.join(known)}")
    out = args.out or Path("results/benchmarks/trainability") / f"lr{args.lr:g}"
    rows = []
    for method in methods:
        for kind in kinds:
            row = fit(method, kind, args)
            if isinstance(row, str):
                print(f"{method} on {kind}: not applicable: {row}", file=sys.stderr)
                continue
            print(f"{method} on {kind}: loss {row['loss_first']:.3f} -> {row['loss_final']:.3f} "
                  f"(base rate {row['base_rate_loss']:.3f}) in {row['seconds']:.0f} s", flush=True)  # fmt: skip
            rows.append(row)
    meta = {"n": args.n, "lr": args.lr, "steps": args.steps, "seed": args.seed, "device": "cpu",
            "threads": torch.get_num_threads(), "command": "python benchmarks/trainability.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}  # fmt: skip
    if not rows:  # nothing measured: keep whatever an earlier run wrote
        print("no method applies to the kinds asked for: nothing written", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "trainability-cpu.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    atomic_write_text(out / "trainability-cpu.md", markdown(rows, meta))
    print(f"wrote {out / 'trainability-cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
