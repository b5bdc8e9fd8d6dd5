"""``medbench bench``: a grid of methods x tasks x label fractions x seeds, resumable cell by cell.

Each cell is an ordinary ``run``; a cell whose JSON already exists at the current method and task versions is
skipped, so an interrupted bench picks up where it stopped. A cell stored at other versions is stale: it is
re-run, and its file replaced in one rename. Several bench processes can share one results folder: each cell is one file
renamed into place, and a non-blocking per-cell file lock makes a process skip the cells another is running.
Pre-trained checkpoints are cached, so seeds and fractions reuse one pre-training.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout
from omegaconf import DictConfig

from . import results
from .config import compose, tiny_overrides
from .run import evaluate, with_corpus
from .versions import as_version, method_version

log = logging.getLogger("medvlp_bench")


@dataclass
class BenchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    #: cells whose stored rows had other method/task versions, re-run (each is also in done/failed/...)
    stale: list[str] = field(default_factory=list)
    #: cells the method cannot do (a task without text for a vision-only method, 2D data for a 3D method)
    inapplicable: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    leaderboard: pd.DataFrame | None = None
    seconds: float = 0.0


def cells(cfg: DictConfig, passthrough: list[str]) -> list[list[str]]:
    """The override lists of every cell of the suite, in a cache-friendly order (method, task, seed)."""
    s = cfg.suite
    fractions = list(s.get("label_fractions") or [None])
    protocols = list(s.get("protocols") or [None])
    out = []
    kinds = {task: task_kind(compose("run", ["method=scratch", f"task={task}"]).task) for task in s.tasks}
    by_kind = s.get("task_overrides") or {}
    by_task = {task: [str(o) for o in by_kind.get(kind) or []] for task, kind in kinds.items()}
    by_method = s.get("method_overrides") or {}  # e.g. a pre-training lr only one method has
    unknown = sorted(set(by_method) - set(s.methods))
    if unknown:
        raise ValueError(f"suite.method_overrides names {unknown}, not in suite.methods {list(s.methods)}")
    for method in s.methods:
        for task in s.tasks:
            for seed in s.seeds:
                for protocol in protocols:
                    for frac in [None] if kinds[task] in LABEL_FREE else fractions:
                        ov = [f"method={method}", f"task={task}", f"seed={seed}"]
                        ov += [f"task.label_fraction={frac}"] if frac is not None else []
                        ov += [f"task.protocol={protocol}"] if protocol is not None else []
                        ov += tiny_overrides(method) if s.get("tiny") else []
                        ov += list(s.get("overrides") or []) + by_task[task]
                        out.append(ov + [str(o) for o in by_method.get(method) or []] + passthrough)
    return out


def task_kind(task_cfg: DictConfig) -> str:
    """``classification`` | ``segmentation`` | ``retrieval`` | ``zeroshot``: the task class's module."""
    return str(task_cfg.get("_target_", "")).rsplit(".", 2)[-2]


#: task kinds that train nothing on labels: label fractions and protocols do not vary them
LABEL_FREE = ("retrieval", "zeroshot")


def applicable(task_cfg: DictConfig, protocol: str | None) -> bool:
    """Protocol lists apply to classification tasks only; other kinds keep their own protocol."""
    return protocol is None or "classification" in str(task_cfg.get("_target_", ""))


def plan(cfg: DictConfig, passthrough: list[str]) -> list[tuple[str, DictConfig, list[str]]]:
    """Compose every cell up front, so a bad name or key fails before any work; drop duplicates."""
    out: list[tuple[str, DictConfig, list[str]]] = []
    seen: set[str] = set()
    for ov in cells(cfg, passthrough):
        run_cfg = compose("run", ov)
        protocol = next((o.split("=", 1)[1] for o in ov if o.startswith("task.protocol=")), None)
        if not applicable(run_cfg.task, protocol):
            continue
        t = run_cfg.task
        name = results.cell_name(
            run_cfg.names.method, run_cfg.names.task, str(t.protocol), float(t.label_fraction), int(run_cfg.seed)
        )
        if name not in seen:
            seen.add(name)
            out.append((name, run_cfg, ov))
    return out


def bench(cfg: DictConfig, passthrough: list[str]) -> BenchReport:
    report = BenchReport()
    t0 = time.time()
    runs = Path(cfg.paths.results_dir) / "runs"
    grid = plan(cfg, passthrough)
    locks = runs / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    for i, (name, run_cfg, ov) in enumerate(grid, 1):
        want = cell_versions(run_cfg)
        if _is_current(runs, name, want):
            report.skipped.append(name)
            continue
        lock = FileLock(str(locks / f"{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another bench process sharing this results folder is running the cell
            report.busy.append(name)
            continue
        try:
            if _is_current(runs, name, want):  # finished by another process since the first check
                report.skipped.append(name)
                continue
            if (stored := results.stored_versions(runs, name)) is not None:
                report.stale.append(name)
                log.warning(
                    "%s: stored rows are at (method, task) versions %s, the code at %s: re-running the stale cell",
                    name,
                    sorted(stored),
                    want,
                )
            log.info("[%d/%d] %s", i, len(grid), name)
            rows = evaluate(with_corpus(run_cfg, ov))
            (report.done if rows else report.inapplicable).append(name)
            if not rows and stored is not None:
                log.warning("%s no longer applies; its stale rows stay in %s until deleted", name, runs)
        except Exception as e:  # one broken cell must not lose the others
            if cfg.get("fail_fast", False):
                raise
            log.exception("cell %s failed", name)
            report.failed[name] = f"{type(e).__name__}: {e}"
        finally:
            lock.release()
    if report.stale:
        log.warning("%d stale cells (other method/task versions) were re-run", len(report.stale))
    report.leaderboard = results.write_leaderboard(Path(cfg.paths.results_dir))
    report.seconds = time.time() - t0
    return report


def cell_versions(run_cfg: DictConfig) -> tuple[int, int]:
    """(method_version, task_version) the code would write for a cell: part of the cell's identity."""
    task = run_cfg.task
    return method_version(run_cfg.method.model._target_), as_version(task.get("version", 1), run_cfg.names.task)


def _is_current(runs: Path, name: str, want: tuple[int, int]) -> bool:
    """The cell is stored and every row has the wanted versions (a stale or missing cell must run)."""
    return results.stored_versions(runs, name) == {want}


def suite_overrides(root_overrides: list[str]) -> tuple[list[str], list[str]]:
    """Split CLI overrides into those for the bench root (suite, paths, fail_fast) and per-cell ones."""
    own = ("suite=", "fail_fast=", "paths.", "+suite.", "suite.")
    mine = [o for o in root_overrides if o.startswith(own)]
    return mine, [o for o in root_overrides if o not in mine]


def compose_bench(overrides: list[str]) -> tuple[DictConfig, list[str]]:
    mine, rest = suite_overrides(overrides)
    cfg = compose("bench", mine)
    paths = [o for o in mine if o.startswith("paths.")]
    return cfg, paths + rest
