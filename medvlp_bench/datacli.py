"""``medbench data list | check <data> | splits <data>``: what datasets exist, is mine readable, write its splits.

``check`` and ``splits`` take the name of a data config (``configs/data/<name>.yaml``) and Hydra-style
overrides; bare keys are data keys (``root=/data/rsna`` means ``data.root=/data/rsna``), ``paths.*`` pass
through. Extra keys: ``workers=N`` (parallel reads in ``check``), ``limit=N`` (read only N samples per split),
``out=DIR``, ``fractions=[0.01,0.1]`` and ``seeds=[0,1,2]`` (``splits``).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf

from .config import compose, instantiate, options, search_dirs

_EXTRA = {"workers": "0", "limit": "0", "out": "", "fractions": "[0.01, 0.1]", "seeds": "[0, 1, 2]"}


def _split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Data overrides (bare keys prefixed with ``data.``) and this module's own keys (YAML values)."""
    own = {k: yaml.safe_load(v) for k, v in _EXTRA.items()}
    rest = []
    for ov in overrides:
        prefix = ov[0] if ov[:1] in ("+", "~") else ""
        body = ov[len(prefix) :]
        key, sep, value = body.partition("=")
        if sep and key in _EXTRA:
            own[key] = yaml.safe_load(value) if value else ""
        elif key.startswith(("paths.", "data.")):
            rest.append(ov)
        else:
            rest.append(f"{prefix}data.{body}")
    return rest, own


def _datamodule(name: str, overrides: list[str]) -> Any:
    # the pretrain root config holds exactly data + paths (+ a method, unused here)
    cfg = compose("pretrain", ["method=scratch", f"data={name}", *overrides])
    return instantiate(cfg.data)


def _targets() -> dict[str, list[str]]:
    """Adapter module -> the data config names that use it."""
    out: dict[str, list[str]] = {}
    for name in options("data"):
        for d in search_dirs():
            f = d / "data" / f"{name}.yaml"
            if f.is_file():
                target = str(OmegaConf.load(f).get("_target_", ""))
                out.setdefault(target.rsplit(".", 2)[-2] if target.count(".") >= 2 else target, []).append(name)
                break
    return out


def data_list() -> str:
    """Every real-data adapter: what it is, its expected layout, licence, where to get it, its configs."""
    from .datasets._common import registry

    configs = _targets()
    blocks = []
    for key, info in registry().items():
        blocks.append(
            f"{key}: {info.title}\n  kind: {info.kind}\n  configs: {', '.join(configs.get(key, [])) or '-'}\n"
            f"  licence: {info.licence}\n  obtain: {info.url}\n  layout:\n{_indent(info.layout)}"
        )
    return "\n\n".join(blocks) + "\n"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _counts(dm: Any, df: pd.DataFrame) -> pd.DataFrame:
    """Samples per split, plus per-class counts (positives for multi-label / binary)."""
    rows = []
    for split in ("train", "val", "test"):
        part = df[df["split"] == split]
        row: dict[str, Any] = {"split": split, "samples": len(part)}
        names = list(dm.class_names)
        if names and len(part):
            y = np.stack([np.asarray(v, dtype=np.float64) for v in part["label"]])
            if dm.task_type == "multiclass":
                row.update({n: int((y == i).sum()) for i, n in enumerate(names)})
            else:
                y = y.reshape(len(y), -1)
                row.update({n: int((y[:, i] > 0.5).sum()) for i, n in enumerate(names)})
        rows.append(row)
    return pd.DataFrame(rows).fillna(0)


def data_check(name: str, overrides: list[str]) -> int:
    """Verify layout, count samples per split and class, read every file; non-zero exit on any problem."""
    from .datasets._common import DataError, probe_rows

    data_ov, own = _split_overrides(overrides)
    forced = ["data.on_error=raise"]
    cfg = compose("pretrain", ["method=scratch", f"data={name}", *data_ov])
    if "target" in cfg.data and _has_masks(cfg.data) and not any(o.startswith("data.target=") for o in data_ov):
        forced.append("data.target=mask")  # check the masks too
    try:
        dm = _datamodule(name, [*data_ov, *forced])
        df = dm.manifest
    except DataError as e:
        print(f"medbench data check {name}: FAILED\n{e}", file=sys.stderr)
        return 1
    print(f"{name}: {dm.root}  ({dm.info.title})")
    print(_counts(dm, df).to_string(index=False))
    problems = [f"split {s!r} is empty" for s in ("train", "val", "test") if not (df["split"] == s).any()]
    if own["limit"]:
        df = df.groupby("split", sort=False).head(int(own["limit"]))
    rows = df.to_dict("records")
    print(f"reading {len(rows)} sample(s) with {int(own['workers'])} worker(s) ...", flush=True)
    problems += [msg for _, msg in probe_rows(rows, dm.reader(), int(own["workers"]))]
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        print(f"medbench data check {name}: {len(problems)} problem(s):\n{shown}{more}", file=sys.stderr)
        return 1
    print(f"OK: {len(rows)} sample(s) read, no problems")
    return 0


def _has_masks(data_cfg: Any) -> bool:
    from importlib import import_module

    module, _, cls = str(data_cfg["_target_"]).rpartition(".")
    info = getattr(import_module(module), "INFO", None)
    return bool(info and info.masks)


def data_splits(name: str, overrides: list[str]) -> int:
    """Write ``split.csv`` (id, split), label-fraction id lists per (fraction, seed) and their SHA256SUMS."""
    from .datasets._common import SPLITS_DIR, DataError

    data_ov, own = _split_overrides(overrides)
    try:
        dm = _datamodule(name, data_ov)
        df = dm.manifest
    except DataError as e:
        print(f"medbench data splits {name}: FAILED\n{e}", file=sys.stderr)
        return 1
    out = Path(own["out"]) if own["out"] else SPLITS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    written = [write_text(out / "split.csv", _split_csv(df))]
    for frac in own["fractions"]:
        for seed in own["seeds"]:
            ids = dm.subset_ids(float(frac), int(seed))
            written.append(write_text(out / f"train_f{float(frac):g}_s{int(seed)}.txt", "".join(f"{i}\n" for i in ids)))
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in written)
    write_text(out / "SHA256SUMS", sums)
    counts = df["split"].value_counts().reindex(["train", "val", "test"]).fillna(0).astype(int).to_dict()
    print(f"{name}: wrote {len(written)} file(s) + SHA256SUMS to {out} (splits {counts})")
    return 0


def _split_csv(df: pd.DataFrame) -> str:
    order = {"train": 0, "val": 1, "test": 2}
    part = df[["id", "split"]].assign(o=df["split"].map(order)).sort_values(["o", "id"])
    return part[["id", "split"]].to_csv(index=False)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
