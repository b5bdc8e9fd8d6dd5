"""Result rows: one JSON file per finished evaluation cell, written atomically; the leaderboard built from them.

The JSON files under ``results/runs/`` are the source of truth (small, diffable, no server needed); MLflow is
for browsing. A cell is (method, task, protocol, label_fraction, seed); its file holds one row per metric.
The cell's identity also includes the method and task versions (``medvlp_bench.versions``): they are stored in
the rows, not the file name, so a re-run at new versions replaces the file (atomically) and a stale file is
recognised by ``stored_versions``; the leaderboard never pools rows of different versions.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import ResultsWriteError, atomic_write_bytes, atomic_write_text
from .metrics import clip_interval
from .versions import as_version

__all__ = ["ResultsWriteError", "atomic_write_bytes", "atomic_write_text"]

#: one leaderboard line per group: rows of different method or task versions are never pooled
GROUP_KEYS = ["method", "task", "kind", "spatial_dims", "protocol", "label_fraction", "metric"]
GROUP_KEYS += ["task_version", "method_version"]
LEADERBOARD_COLUMNS = [
    *GROUP_KEYS,
    "impl_source",
    "primary",
    "higher_is_better",
    "mean",
    "std",
    "n_seeds",
    "ci95_low",
    "ci95_high",
    "seeds",
    "learned",
    "text_encoder",
]


@dataclass
class ResultRow:
    method: str
    impl_source: str
    task: str
    task_version: int
    kind: str
    spatial_dims: int
    protocol: str
    label_fraction: float
    seed: int
    metric: str
    value: float
    higher_is_better: bool
    primary: bool
    ckpt_sha256: str | None
    code_version: str
    mlflow_run_id: str | None
    date: str
    wall_time_s: float
    device: str
    n_test: int
    subset_sha256: str | None = None
    #: ``Method.version`` of the evaluated method; rows written before versions existed read as 1
    method_version: int = 1
    #: the pre-training proxy beat its chance level (``medvlp_bench.proxy``); None: no pre-training or no proxy
    learned: bool | None = None
    #: the text tower the method was built with (config name or path); None: no text tower
    text_encoder: str | None = None


def cell_name(method: str, task: str, protocol: str, label_fraction: float, seed: int) -> str:
    return f"{task}__{method}__{protocol}__f{label_fraction:g}__s{seed}"


def ensure_writable(folder: Path) -> None:
    """Fail before any work if results cannot be written there (checked by writing and removing a probe)."""
    atomic_write_bytes(Path(folder) / ".write-probe", b"")
    (Path(folder) / ".write-probe").unlink()


def write_cell(runs_dir: Path, name: str, rows: list[ResultRow], extra: dict[str, Any] | None = None) -> Path:
    """Write a cell's rows (and e.g. the labelled subset ids) as ``<runs_dir>/<name>.json``."""
    payload = {"rows": [asdict(r) for r in rows], **(extra or {})}
    path = Path(runs_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False, allow_nan=True) + "\n")
    return path


def save_predictions(path: Path, **arrays: np.ndarray) -> None:
    """Per-sample predictions (compressed npz), kept so paired tests can be recomputed without re-running."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def cell_exists(runs_dir: Path, name: str) -> bool:
    return (Path(runs_dir) / f"{name}.json").is_file()


def stored_versions(runs_dir: Path, name: str) -> set[tuple[int, int]] | None:
    """The (method_version, task_version) pairs of a stored cell's rows, or None if the cell has no file.

    Rows written before versions existed have no ``method_version`` and a string ``task_version``: both
    read as version 1.
    """
    path = Path(runs_dir) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt result file {path}: {e}") from e
    return {
        (
            as_version(r.get("method_version", 1), f"{path.name}: method"),
            as_version(r.get("task_version", 1), f"{path.name}: task"),
        )
        for r in rows
    }


def load_rows(runs_dir: Path) -> pd.DataFrame:
    """All rows under ``runs_dir`` as a DataFrame (empty, with the row columns, if there are none)."""
    records: list[dict[str, Any]] = []
    for p in sorted(Path(runs_dir).glob("*.json")):
        try:
            payload = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt result file {p}: {e}") from e
        records.extend(payload.get("rows", []))
    cols = [f.name for f in fields(ResultRow)]
    if not records:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame.from_records(records, columns=cols)
    for col in ("method_version", "task_version"):  # old rows: no method_version, task_version "1"
        df[col] = [as_version(1 if pd.isna(v) else v, col.split("_")[0]) for v in df[col]]
    return df


def confidence_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean over seeds; NaN for fewer than 2 values."""
    from scipy import stats

    v = np.asarray(list(values), dtype=float)
    if len(v) < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return (float(v.mean() - half), float(v.mean() + half))


def build_leaderboard(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, n_seeds and a 95 % CI per (method, task, protocol, label fraction, metric, version).

    The CI is Student-t over seeds, clipped to the metric's range (``metrics.metric_range``): with 3 seeds a
    Dice near 0 would otherwise get a lower bound below 0, a value no method can score.

    Sorted by task, protocol, label fraction, then primary metrics first and best method first
    according to ``higher_is_better``. Duplicate seeds (re-runs of a cell) keep the newest row.
    """
    if rows.empty:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    rows = rows.sort_values("date").drop_duplicates([*GROUP_KEYS, "seed"], keep="last")
    out = []
    for key, g in rows.groupby(GROUP_KEYS, sort=False, dropna=False):
        vals = g["value"].astype(float)
        lo, hi = clip_interval(str(g["metric"].iloc[0]), *confidence_interval(vals))
        rec = dict(zip(GROUP_KEYS, key))
        rec.update(
            impl_source=g["impl_source"].iloc[-1],
            primary=bool(g["primary"].iloc[-1]),
            higher_is_better=bool(g["higher_is_better"].iloc[-1]),
            mean=float(vals.mean()),
            std=float(vals.std(ddof=1)) if len(vals) > 1 else math.nan,
            n_seeds=int(g["seed"].nunique()),
            ci95_low=lo,
            ci95_high=hi,
            seeds=" ".join(str(s) for s in sorted(g["seed"].unique())),
            learned=_all_learned(g["learned"]),
            text_encoder="+".join(sorted({str(t) for t in g["text_encoder"] if isinstance(t, str)})) or None,
        )
        out.append(rec)
    lb = pd.DataFrame(out, columns=LEADERBOARD_COLUMNS)
    lb["_rank"] = np.where(lb["higher_is_better"], -lb["mean"], lb["mean"])
    lb["_primary"] = ~lb["primary"].astype(bool)
    lb = lb.sort_values(["task", "protocol", "label_fraction", "_primary", "metric", "_rank", "method"])
    return lb.drop(columns=["_rank", "_primary"]).reset_index(drop=True)


def _all_learned(flags: pd.Series) -> bool | None:
    """False if any seed's pre-training did not beat its proxy's chance level, True if all did, else None."""
    known = [bool(f) for f in flags if isinstance(f, bool | np.bool_)]
    if not known:
        return None
    return all(known)


def learned_text(flag: object) -> str:
    """How tables show ``learned``: ``yes`` (every seed's pre-training beat its proxy's chance level), ``NO``
    (some seed's did not), ``—`` (nothing pre-trained, or not recorded)."""
    if isinstance(flag, bool | np.bool_):
        return "yes" if flag else "NO"
    return "—"


def leaderboard_markdown(lb: pd.DataFrame, primary_only: bool = True) -> str:
    """Compact markdown table: one line per (task, protocol, fraction, method) with mean ± std and CI.

    A method or task at a version other than 1 is shown as ``name vN``, so lines of two versions (separate
    groups in ``build_leaderboard``) can be told apart. A line whose pre-training did not beat its proxy's
    chance level on some seed (``learned`` false) is marked ``(not learned)``.
    """
    if lb.empty:
        return "_no results yet_\n"
    df = lb[lb["primary"]] if primary_only else lb
    lines = [
        "| task | protocol | labels | method | metric | mean ± std | 95% CI | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        std = "" if math.isnan(r.std) else f" ± {r.std:.3f}"
        ci = "" if math.isnan(r.ci95_low) else f"[{r.ci95_low:.3f}, {r.ci95_high:.3f}]"
        lines.append(
            f"| {_named(r.task, r.task_version)} | {r.protocol} | {r.label_fraction:g} | "
            f"{method_label(r.method, r.method_version, r.learned)} | {r.metric} | "
            f"{r.mean:.3f}{std} | {ci} | {r.n_seeds} |"
        )
    return "\n".join(lines) + "\n"


def _named(name: str, version: object) -> str:
    return name if int(version) == 1 else f"{name} v{int(version)}"


def method_label(method: str, version: object, learned: object) -> str:
    """A leaderboard line's method: ``name vN`` past version 1, ``(not learned)`` when a seed's pre-training
    did not beat its proxy's chance level."""
    return _named(method, version) + (" (not learned)" if learned is False else "")


def results_dir(given: str | Path | None = None) -> Path:
    """The results folder every verb uses: ``given`` (``--results``), else ``paths.results_dir`` of the default
    paths config (``MEDBENCH_RESULTS``, else ``$MEDBENCH_HOME/results``, else ``./results``)."""
    if given:
        return Path(given).expanduser().resolve()
    from omegaconf import OmegaConf

    from .config import config_dir

    cfg = OmegaConf.create({"paths": OmegaConf.load(config_dir() / "paths" / "default.yaml")})
    return Path(str(cfg.paths.results_dir))


def write_leaderboard(results_dir: Path) -> pd.DataFrame:
    """Rebuild ``leaderboard.csv`` and ``leaderboard.md`` from ``results_dir/runs`` (atomically)."""
    results_dir = Path(results_dir)
    lb = build_leaderboard(load_rows(results_dir / "runs"))
    atomic_write_text(results_dir / "leaderboard.csv", lb.to_csv(index=False))
    atomic_write_text(results_dir / "leaderboard.md", leaderboard_markdown(lb))
    return lb
