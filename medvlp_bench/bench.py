"""``medbench bench``: a grid of methods x tasks x label fractions x seeds, resumable cell by cell.

Every cell is resolved up front (``cell.resolve``), so a bad name or key fails before any work and
``--dry-run`` can show the whole grid. A cell whose JSON already exists at the current method and task
versions is skipped, so an interrupted bench picks up where it stopped. A cell stored at other versions is
stale: it is re-run, and its file replaced in one rename. Several bench processes can share one results
folder: each cell is one file renamed into place, and a non-blocking per-cell file lock makes a process skip
the cells another is running. Pre-trained checkpoints are cached, so seeds and fractions reuse one
pre-training.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from filelock import FileLock, Timeout
from omegaconf import DictConfig

from . import results
from .cell import STATUSES, Cell, resolve
from .config import compose, configs_stamp, options, quoted, task_kind, tiny_overrides
from .coverage import exclusions, why_excluded
from .run import evaluate

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
    #: cells the suite leaves out on purpose (its ``exclude:`` block), with the reason
    excluded: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    leaderboard: pd.DataFrame | None = None
    seconds: float = 0.0


def cells(cfg: DictConfig, passthrough: list[str]) -> list[list[str]]:
    """The override lists of every cell of the suite, in a cache-friendly order (method, task, seed)."""
    s = cfg.suite
    fractions = list(s.get("label_fractions") or [None])
    protocols = list(s.get("protocols") or [None])
    out = []
    stamp = configs_stamp()
    kinds = {task: _task_kind(task, stamp) for task in s.tasks}
    by_kind = s.get("task_overrides") or {}
    by_task = {task: [str(o) for o in by_kind.get(kind) or []] for task, kind in kinds.items()}
    by_method = s.get("method_overrides") or {}  # e.g. a pre-training lr only one method has
    # a typo is an error; a known method left out of this run ("suite.methods=[scratch_swin]") just goes unused
    unknown = sorted(set(by_method) - set(options("method")))
    if unknown:
        raise ValueError(f"suite.method_overrides names {unknown}, not a method; allowed: {options('method')}")
    for method in s.methods:
        for task in s.tasks:
            for seed in s.seeds:
                # a protocol list applies to classification; the other kinds keep their task's own protocol
                for protocol in protocols if kinds[task] == "classification" else [None]:
                    for frac in [None] if kinds[task] in LABEL_FREE else fractions:
                        ov = [f"method={method}", f"task={task}", f"seed={seed}"]
                        ov += [f"task.label_fraction={frac}"] if frac is not None else []
                        ov += [f"task.protocol={protocol}"] if protocol is not None else []
                        ov += list(_tiny(method, stamp)) if s.get("tiny") else []
                        ov += list(s.get("overrides") or []) + by_task[task]
                        out.append(ov + [str(o) for o in by_method.get(method) or []] + passthrough)
    return out


@functools.cache
def _task_kind(task: str, _stamp: object) -> str:
    """The task class's ``kind`` (composed once per task and config files)."""
    return task_kind(compose("run", ["method=scratch", f"task={task}"]).task._target_)


@functools.cache
def _tiny(method: str, _stamp: object) -> tuple[str, ...]:
    """The method's ``tiny:`` overrides (composed once per method and config files)."""
    return tuple(tiny_overrides(method))


#: task kinds that train nothing on labels: label fractions and protocols do not vary them
LABEL_FREE = ("retrieval", "zeroshot")


def plan(cfg: DictConfig, passthrough: list[str]) -> list[Cell]:
    """Resolve every cell up front, so a bad name or key fails before any work; drop duplicates. Every cell
    writes to the bench's results folder; a cell the suite's ``exclude:`` block covers carries its reason."""
    out: list[Cell] = []
    seen: set[str] = set()
    rules = exclusions(cfg.suite.get("exclude"))
    folder = f"paths.results_dir={quoted(Path(cfg.paths.results_dir).resolve())}"
    for ov in cells(cfg, passthrough):
        cell = resolve([*ov, folder])
        if cell.name not in seen:
            seen.add(cell.name)
            why = why_excluded(cell, rules)
            out.append(dataclasses.replace(cell, excluded=why) if why else cell)
    return out


def dry_run(cfg: DictConfig, passthrough: list[str]) -> str:
    """The grid as ``--dry-run`` prints it: one line a cell (status, weights) and the count of each status."""
    grid = plan(cfg, passthrough)
    lines, counts = [], Counter()
    for cell in grid:
        status = cell.status()
        counts[status] += 1
        why = {"not applicable": cell.gap, "excluded": cell.excluded}.get(status) or cell.weights_plan()
        lines.append(f"{status:<15} {cell.name}  [{why}]")
    where = Path(cfg.paths.results_dir) / "runs"
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    lines.append(f"{len(grid)} cells in {where}: {summary or 'none'}")
    return "\n".join(lines)


def bench(cfg: DictConfig, passthrough: list[str]) -> BenchReport:
    """Run every cell of the suite that is not done at the current versions; one failed cell loses no other."""
    report = BenchReport()
    t0 = time.time()
    runs = Path(cfg.paths.results_dir) / "runs"
    grid = plan(cfg, passthrough)
    locks = runs / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    for i, cell in enumerate(grid, 1):
        name, status = cell.name, cell.status()
        if status == "done":
            report.skipped.append(name)
            continue
        if status == "not applicable":
            log.warning("skipping %s: %s", name, cell.gap)
            if results.stored_versions(runs, name) is not None:
                log.warning("%s no longer applies; its stored rows stay in %s until deleted", name, runs)
            report.inapplicable.append(name)
            continue
        if status == "excluded":
            log.info("not running %s: the suite excludes it (%s)", name, cell.excluded)
            if results.stored_versions(runs, name) is not None:
                log.warning("%s is excluded; its rows at other versions stay in %s until deleted", name, runs)
            report.excluded[name] = str(cell.excluded)
            continue
        lock = FileLock(str(locks / f"{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another bench process sharing this results folder is running the cell
            report.busy.append(name)
            continue
        try:
            status = cell.status()  # again, under the lock: another process may have run it since
            if status == "done":
                report.skipped.append(name)
                continue
            if status == "stale":
                report.stale.append(name)
                log.warning(
                    "%s: stored rows are at (method, task) versions %s, the code at %s: re-running the stale cell",
                    name,
                    sorted(results.stored_versions(runs, name) or ()),
                    cell.versions,
                )
            log.info("[%d/%d] %s", i, len(grid), name)
            rows = evaluate(cell)
            (report.done if rows else report.inapplicable).append(name)
            if not rows and status == "stale":
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
