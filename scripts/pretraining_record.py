"""Write the record of every pre-training a results folder's rows were made from: proxy curve, shift, time.

The cache (``cache/checkpoints``) is not committed, so the proof that a method learned, or the measured reason
it did not, would be lost with it. This joins the rows' ``ckpt_sha256`` to the checkpoints' ``config.json``
and writes, next to the rows, one line per checkpoint (method, corpus, seed, epochs, steps, wall time,
``encoder_shift``, the final proxy against its reference, ``learned``) and the proxy's curve over epochs
(epoch -1 is the score before the first step):

    python scripts/pretraining_record.py --results results/methods_small [--cache cache/checkpoints]

Writes ``<results>/pretraining.json`` (everything, curves included) and ``<results>/pretraining.md``
atomically. A checkpoint no longer in the cache keeps its record from the previous ``pretraining.json``; one in
neither is recorded from the ``pretraining`` block its run files carry (final proxy, shift, wall time, no curve:
the curve lives only in the checkpoint); a row whose checkpoint is in none of them is listed as missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medvlp_bench.atomic import atomic_write_text
from medvlp_bench.checkpoint import is_checkpoint, read_config
from medvlp_bench.results import load_rows

#: how ``checkpoint`` ends for a record made from the rows' ``pretraining`` block (see ``_from_run_files``)
FROM_RUNS = "(from the run files)"


def records(results: Path, cache: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The checkpoints behind ``results/runs`` (by weights sha256), and the sha256s the cache does not hold."""
    rows = load_rows(results / "runs")
    wanted = {str(s) for s in rows.get("ckpt_sha256", []) if isinstance(s, str) and s}
    found: dict[str, dict[str, Any]] = {}
    for folder in sorted(p for p in cache.iterdir() if is_checkpoint(p)) if cache.is_dir() else []:
        info = read_config(folder)
        sha = info.get("weights_sha256")
        if sha in wanted:
            found[sha] = {"checkpoint": folder.name, **{k: v for k, v in info.items() if k != "model"}}
    for source in (_recorded, _from_run_files):  # the earlier record first: it keeps the curve
        if wanted - set(found):
            for rec in source(results):
                sha = rec.get("weights_sha256")
                if sha in wanted and sha not in found:
                    found[sha] = rec
    out = sorted(found.values(), key=lambda r: (str(r.get("method")), str(r.get("data")), str(r.get("seed"))))
    return out, sorted(wanted - set(found))


def _recorded(results: Path) -> list[dict[str, Any]]:
    """The records of the last ``pretraining.json``: the cache is not committed, so a fresh checkout or a
    cleaned cache must not erase what an earlier run proved (the proxy curve of a checkpoint still in the rows)."""
    path = results / "pretraining.json"
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("checkpoints") or [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise SystemExit(f"{path} is not a pretraining record ({err}); move it away to rebuild it") from err


def _from_run_files(results: Path) -> list[dict[str, Any]]:
    """One record per checkpoint from the ``pretraining`` block of the run files made from it: a lane on a machine
    whose cache is gone still leaves its proof of learning (or not) in the committed rows, less the curve. A cell
    evaluated from ``ckpt=`` carries the checkpoint's block too, but its config is the evaluation's: corpus, seed and
    epochs are then unknown (None), not guessed from the task."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((results / "runs").glob("*.json")):
        payload = json.loads(path.read_text())
        rows, info = payload.get("rows") or [], payload.get("pretraining") or {}
        sha = next((r.get("ckpt_sha256") for r in rows if r.get("ckpt_sha256")), None)
        if not sha or not info or sha in out:
            continue
        cfg = payload.get("config") or {}
        pre = (cfg.get("method") or {}).get("pretrain") or {}
        own = not cfg.get("ckpt")  # pre-trained by this grid (ckpt auto), so its config says how
        out[sha] = {
            "checkpoint": f"{'not in the cache' if own else 'ckpt=' + str(cfg['ckpt'])} {FROM_RUNS}",
            "weights_sha256": sha,
            "method": rows[0].get("method"),
            "data": (pre.get("data") or (cfg.get("data") or {}).get("name")) if own else None,
            "seed": cfg.get("seed", rows[0].get("seed")) if own else None,
            "epochs": pre.get("max_epochs") if own else None,
            "steps": None,
            "method_version": rows[0].get("method_version"),
            **info,
        }
    return list(out.values())


def _cell(value: Any) -> str:
    return "—" if value is None else str(value)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())


def markdown(recs: list[dict[str, Any]], missing: list[str]) -> str:
    lines = [
        "| method | corpus | seed | epochs | steps | minutes | encoder shift | proxy (final) | reference | learned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        p = r.get("proxy") or {}
        minutes = f"{r['wall_time_s'] / 60:.1f}" if r.get("wall_time_s") is not None else "not recorded"
        shift = f"{r['encoder_shift']:.3f}" if r.get("encoder_shift") is not None else "—"
        lines.append(
            f"| {r.get('method')} | {_cell(r.get('data'))} | {_cell(r.get('seed'))} | {_cell(r.get('epochs'))} | "
            f"{_cell(r.get('steps'))} | "
            f"{minutes} | {shift} | {_fmt(p.get('values') or {})} | {_fmt(p.get('reference') or {})} | "
            f"{p.get('learned', '—')} |"
        )
    lines += ["", "Proxy curves (epoch -1: before the first step):", ""]
    for r in recs:
        curve = (r.get("proxy") or {}).get("curve") or []
        if curve:
            keys = [k for k in curve[0] if k != "epoch"]
            pts = "; ".join(f"{c['epoch']}: " + "/".join(f"{c[k]:.3f}" for k in keys) for c in curve)
            lines.append(f"- {r.get('method')} on {r.get('data')}, seed {r.get('seed')} ({'/'.join(keys)}): {pts}")
        else:
            why = (
                "the checkpoint left the cache before this record was written; its final proxy is in the rows"
                if str(r.get("checkpoint", "")).endswith(FROM_RUNS)
                else "none recorded in the checkpoint"
            )
            lines.append(
                f"- {r.get('method')} on {_cell(r.get('data'))}, seed {_cell(r.get('seed'))}: no curve ({why})"
            )
    if missing:
        lines += ["", f"Not in the cache ({len(missing)} checkpoints the rows name): " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True, help="a results folder with runs/")
    ap.add_argument("--cache", type=Path, default=Path("cache/checkpoints"), help="the checkpoint cache")
    args = ap.parse_args(argv)
    if not (args.results / "runs").is_dir():
        print(f"no {args.results / 'runs'}: run `medbench bench` with --results {args.results} first", file=sys.stderr)
        return 2
    recs, missing = records(args.results, args.cache)
    payload = {"checkpoints": recs, "missing": missing}
    atomic_write_text(args.results / "pretraining.json", json.dumps(payload, indent=1))
    atomic_write_text(args.results / "pretraining.md", markdown(recs, missing))
    print(f"wrote {args.results / 'pretraining.md'}: {len(recs)} checkpoints, {len(missing)} not in the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
