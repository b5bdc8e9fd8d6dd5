"""Pre-training throughput per method and input kind, through the harness and through a plain PyTorch loop.

For each (method, corpus) it measures, over the same batches from the same DataLoader:
- samples/s of ``trainer.fit`` as ``medbench pretrain`` runs it (Lightning, logging, checkpoint plugin off),
- samples/s of a minimal loop (``pretrain_step``, backward, AdamW, LR schedule) on the same model and loss,
  so the harness overhead is a ratio (``overhead = plain / harness - 1``),
- model FLOPs per sample (``torch.utils.flop_counter`` over one forward + backward) and MFU against a peak:
  the device's bf16 dense peak on known GPUs, or on CPU the fp32 matmul rate measured here (so a CPU MFU says
  how far the step is from this machine's own GEMM speed),
- peak memory (CUDA: max allocated; CPU: the process's peak RSS so far) and, on CUDA with NVML, GPU busy %.

    python benchmarks/throughput.py --tiny --size 32 --steps 10            # CPU regression figures
    python benchmarks/throughput.py --size cxr=128,ct=64,mri=64 --batch method   # at suite=methods_small's size
    python benchmarks/throughput.py --device cuda --methods clip --kinds cxr --size 224 --batch 256

Writes ``<out>/throughput-<device>.json`` and ``.md`` atomically. Numbers depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from medvlp_bench.atomic import atomic_write_text
from medvlp_bench.config import compose, instantiate, tiny_overrides, unmet_requirements
from medvlp_bench.run import build_method, tokenizer_of

#: dense bf16 peak FLOP/s of known accelerators (vendor datasheets, no sparsity)
PEAKS = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def cpu_peak(n: int = 1024, reps: int = 5) -> float:
    """fp32 GEMM FLOP/s this process reaches on its CPU threads (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak(device: str) -> tuple[float | None, str]:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, peak in PEAKS.items():
            if key in name:
                return peak, f"{name} bf16 dense datasheet"
        return None, f"{name}: unknown peak"
    return cpu_peak(), f"measured fp32 GEMM, {torch.get_num_threads()} threads"


class _Timer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1 = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            _sync()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        _sync()
        self.t1 = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Busy:
    """Samples NVML GPU utilisation every 50 ms while active (None where NVML is missing)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Busy:
        if torch.cuda.is_available():
            try:
                torch.cuda.utilization()
            except Exception:
                return self
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(torch.cuda.utilization())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def fraction(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def parse_sizes(text: str) -> dict[str, int]:
    """``--size``: one side for every corpus (``32``) or one per kind (``cxr=128,ct=64,mri=64``)."""
    if "=" not in text:
        return {"*": int(text)}
    out = {}
    for part in text.split(","):
        kind, sep, side = part.partition("=")
        if not sep or not side.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--size: expected N or kind=N,...; got {part!r} in {text!r}")
        out[kind.strip()] = int(side)
    return out


def parse_batch(text: str) -> str:
    """``--batch``: a positive integer, or ``method`` (each method's own pre-training batch)."""
    if text != "method" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"--batch: expected a positive integer or 'method', got {text!r}")
    return text


def size_of(args: argparse.Namespace, kind: str) -> int:
    if kind not in args.size and "*" not in args.size:
        raise SystemExit(f"--size names {sorted(args.size)}, not {kind!r} (of --kinds {args.kinds})")
    return args.size.get(kind, args.size.get("*"))


def _setup(method: str, kind: str, args: argparse.Namespace) -> tuple[Any, Any, Any] | None:
    """The method and a datamodule on ``kind`` at its size; ``None`` when the method cannot take that input.
    ``--batch method`` keeps the method's own pre-training batch (``method.pretrain.batch_size``)."""
    ov = [f"method={method}", f"data=phantom_{kind}", f"data.size={size_of(args, kind)}"]
    ov += [f"data.n_train={args.n_train}", "data.n_val=8", "data.n_test=8", "logger=none"]
    ov += tiny_overrides(method) if args.tiny else []
    ov += [] if args.batch == "method" else [f"method.pretrain.batch_size={args.batch}"]  # after tiny: it wins
    cfg = compose("pretrain", ov)
    if unmet_requirements(cfg.method, cfg.data) is not None:
        return None
    L.seed_everything(0, verbose=False)
    m = build_method(cfg)
    dm = instantiate(cfg.data, batch_size=int(cfg.method.pretrain.batch_size), tokenizer=tokenizer_of(m))
    return cfg, m, dm


def _flops_per_sample(m: Any, batch: dict) -> float:
    m.train()
    counter = FlopCounterMode(display=False)
    with counter:
        m.pretrain_step(batch)["loss"].backward()
    m.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch["image"])


def _to(batch: dict, device: str) -> dict:
    def move(v: Any) -> Any:
        return _to(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v

    return {k: move(v) for k, v in batch.items()}


def harness(method: str, kind: str, args: argparse.Namespace) -> float:
    _, m, dm = _setup(method, kind, args)
    batch = int(dm.batch_size)
    timer = _Timer(args.warmup)
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(m, datamodule=dm)
    return args.steps * batch / (timer.t1 - timer.t0)


def plain(method: str, kind: str, args: argparse.Namespace) -> tuple[float, float, float | None]:
    """The same model, loss, optimiser and data without Lightning; returns (samples/s, FLOPs/sample, busy)."""
    _, m, dm = _setup(method, kind, args)
    dev = args.device
    m.to(dev).train()
    opt = torch.optim.AdamW(m.param_groups(), lr=1e-4, fused=dev == "cuda")
    loader = dm.train_dataloader()
    if hasattr(m, "texts_for"):  # GTGM makes its texts in on_fit_start (untimed in the harness): here too
        for batch in loader:
            m.texts_for(batch)
    flops, done, t0 = None, 0, 0.0
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    with _Busy() as busy:
        while done < args.warmup + args.steps:
            for batch in loader:
                batch = _to(batch, dev)
                if dm.batch_augment is not None:
                    batch = dm.batch_augment(batch)
                if flops is None:
                    with amp:
                        flops = _flops_per_sample(m, batch)
                if done == args.warmup:
                    _sync()
                    t0 = time.perf_counter()
                with amp:
                    loss = m.pretrain_step(batch)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if hasattr(m, "ema_update"):  # UniMedI's teacher follows the student once per optimiser step
                    m.ema_update()
                done += 1
                if done == args.warmup + args.steps:
                    break
        _sync()
        elapsed = time.perf_counter() - t0
    return args.steps * int(dm.batch_size) / elapsed, flops, busy.fraction


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown(rows: list[dict], meta: dict) -> str:
    head = "| method | data | size | batch | harness samples/s | plain samples/s | overhead | GFLOP/sample | MFU "
    head += "| peak MB | GPU busy |"
    lines = [f"Device: {meta['device_name']}; peak {meta['peak_flops']:.3g} FLOP/s ({meta['peak_source']}).", "", head]
    lines.append("|" + "---|" * 11)
    for r in rows:
        busy = f"{r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else "n/a"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['data']} | {r['size']} | {r['batch']} | {r['harness_sps']:.1f} "
            f"| {r['plain_sps']:.1f} | {r['overhead']:+.1%} | {r['gflop_per_sample']:.2f} | {mfu} "
            f"| {r['peak_mb']:.0f} | {busy} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="clip,unimedi,gtgm,umcl,brainmvp")
    ap.add_argument("--kinds", default="cxr,ct,mri", help="phantom corpora: cxr (2D), ct (3D), mri (3D, 4 channels)")
    ap.add_argument("--size", type=parse_sizes, default="32", help="N, or per kind: cxr=128,ct=64,mri=64")
    ap.add_argument("--batch", type=parse_batch, default="8", help="N, or `method`: each method's own batch")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="apply each method's tiny: overrides")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks"))
    args = ap.parse_args(argv)
    for kind in args.kinds.split(","):  # every kind has a size before anything is measured
        size_of(args, kind)
    peak, source = device_peak(args.device)
    meta = {
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        ),
        "peak_flops": peak,
        "peak_source": source,
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    rows = []
    for method in args.methods.split(","):
        for kind in args.kinds.split(","):
            setup = _setup(method, kind, args)
            if setup is None:
                print(f"skip {method} on phantom_{kind}: not applicable", file=sys.stderr)
                continue
            batch = int(setup[2].batch_size)
            del setup  # one model at a time: the peak-memory column is the process's peak
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            h = harness(method, kind, args)
            p, flops, busy = plain(method, kind, args)
            rows.append(
                {
                    "method": method,
                    "data": f"phantom_{kind}",
                    "size": size_of(args, kind),
                    "batch": batch,
                    "harness_sps": h,
                    "plain_sps": p,
                    "overhead": p / h - 1,
                    "gflop_per_sample": flops / 1e9,
                    "mfu": flops * h / peak if peak else None,
                    "peak_mb": peak_memory_mb(args.device),
                    "gpu_busy": busy,
                }
            )
            print(markdown(rows[-1:], meta).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"throughput-{args.device}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=2))
    atomic_write_text(stem.with_suffix(".md"), markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
