"""Which cells of a suite have results, and why the others do not.

A number missing from a comparison table must never be silent. A suite may leave cells out on purpose, with
the reason written down in its ``exclude:`` block, e.g. the 3D segmentation cells of ``suite=methods_small``,
which its CPU budget cannot hold::

    exclude:
      - tasks: [phantom_ct_seg, phantom_mri_seg]
        why: "3D fine-tuning costs 30-60 min a cell on 2 CPU cores; run them with trainer=gpu"

An entry matches a cell when every list it gives (``methods``, ``tasks``, ``seeds``) holds the cell's value
(a method by its config name, ``external``, or by its row label, ``external-<name>``); a list left out matches
all. An excluded cell is planned like any other and shown with its reason
(``--dry-run``: ``excluded  <cell>  [why]``), ``bench`` does not run it, and ``coverage`` counts it, beside the
cells done, still to run and not applicable, per task and method. ``suite.exclude=[]`` runs them all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from . import results
from .cell import STATUSES, Cell
from .config import ConfigError, options

#: the keys of one ``exclude:`` entry
EXCLUDE_KEYS = ("methods", "tasks", "seeds", "why")


@dataclass(frozen=True)
class Exclusion:
    """One ``exclude:`` entry: the cells it covers (None: every value) and why they are not run."""

    why: str
    methods: frozenset[str] | None = None
    tasks: frozenset[str] | None = None
    seeds: frozenset[int] | None = None

    def matches(self, cell: Cell) -> bool:
        if self.methods is not None and not {cell.method, method_choice(cell)} & self.methods:
            return False
        return (self.tasks is None or cell.task in self.tasks) and (self.seeds is None or cell.seed in self.seeds)


def method_choice(cell: Cell) -> str:
    """The ``method=`` config a cell was composed with (its row label may differ: ``external-<name>``)."""
    return next((o.partition("=")[2] for o in reversed(cell.overrides) if o.startswith("method=")), cell.method)


def exclusions(entries: Any, where: str = "suite.exclude") -> list[Exclusion]:
    """Parse and check a suite's ``exclude:`` block: a list of mappings with a non-empty ``why``; unknown keys,
    method or task names that do not exist, and seeds that are not integers are ``ConfigError``s naming them."""
    if entries is None:
        return []
    if hasattr(entries, "keys") or isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise ConfigError(f"{where} must be a list of {{methods, tasks, seeds, why}} entries, got {entries!r}")
    out = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not hasattr(entry, "keys"):
            raise ConfigError(f"{at} must be a mapping with keys {list(EXCLUDE_KEYS)}, got {entry!r}")
        unknown = sorted(set(entry.keys()) - set(EXCLUDE_KEYS))
        if unknown:
            raise ConfigError(f"{at} has unknown keys {unknown}; allowed: {list(EXCLUDE_KEYS)}")
        why = entry.get("why")
        if not isinstance(why, str) or not why.strip():
            raise ConfigError(f"{at} needs a `why`: the reason its cells are not run, shown wherever they are counted")
        out.append(
            Exclusion(
                why=why.strip(),
                methods=_names(entry.get("methods"), "method", f"{at}.methods"),
                tasks=_names(entry.get("tasks"), "task", f"{at}.tasks"),
                seeds=_seeds(entry.get("seeds"), f"{at}.seeds"),
            )
        )
    return out


def _names(values: Any, group: str, at: str) -> frozenset[str] | None:
    if values is None:
        return None
    names = [values] if isinstance(values, str) else [str(v) for v in values]
    known = set(options(group))
    # an external model's rows carry ``external-<name>`` (``results.method_label``): accepted as a method name too
    unknown = sorted(n for n in set(names) - known if not (group == "method" and n.startswith("external-")))
    if unknown:  # a name the suite does not run is fine ("suite.methods=[x]" narrows a suite); a typo is not
        raise ConfigError(f"{at} names {unknown}, not a {group}; allowed: {options(group)}")
    return frozenset(names)


def _seeds(values: Any, at: str) -> frozenset[int] | None:
    if values is None:
        return None
    values = [values] if isinstance(values, int) else list(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{at} must be a list of integer seeds, got {values!r}")
    return frozenset(values)


def why_excluded(cell: Cell, rules: list[Exclusion]) -> str | None:
    """The reason of the first rule that covers ``cell``, or None."""
    return next((rule.why for rule in rules if rule.matches(cell)), None)


#: the coverage table's count columns, in the order ``Cell.status`` names them
COUNTS = STATUSES


def coverage(grid: list[Cell]) -> pd.DataFrame:
    """One row per (task, method) of the grid: how many cells are in each status, and the reasons of the
    excluded and not-applicable ones."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in grid:
        rec = rows.setdefault((cell.task, cell.method), {"task": cell.task, "method": cell.method, "why": []})
        status = cell.status()
        rec[status] = rec.get(status, 0) + 1
        reason = cell.excluded if status == "excluded" else cell.gap if status == "not applicable" else None
        if status == "excluded" and results.stored_versions(cell.runs_dir, cell.name) is not None:
            reason = f"{reason} (rows at other versions are stored, and the comparison table still reads them)"
        if reason and reason not in rec["why"]:
            rec["why"].append(reason)
    df = pd.DataFrame(list(rows.values()), columns=["task", "method", *COUNTS, "why"])
    df[list(COUNTS)] = df[list(COUNTS)].fillna(0).astype(int)
    df["planned"] = df[list(COUNTS)].sum(axis=1)
    df["why"] = df["why"].map("; ".join)
    return df


def is_complete(df: pd.DataFrame) -> pd.Series:
    """Per (task, method): nothing left to run (every cell done, or one the method cannot do)."""
    return df["done"] + df["not applicable"] == df["planned"]


def open_pairs(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The (task, method) rows that are not complete, and the count columns those rows use: the one selection
    that both the markdown table and the HTML report show."""
    open_ = df[~is_complete(df)]
    return open_, [s for s in COUNTS if open_[s].sum()]


def totals_line(df: pd.DataFrame) -> str:
    """``360 cells: 150 done, 60 to run, 105 excluded, 45 not applicable``."""
    counts = ", ".join(f"{int(df[s].sum())} {s}" for s in COUNTS if df[s].sum())
    return f"{int(df['planned'].sum())} cells: {counts or 'none'}"


def coverage_markdown(df: pd.DataFrame, suite: str) -> str:
    """The coverage table: every (task, method) of the suite with cells still to run, stale or excluded, with the
    reasons of those not run; the complete pairs (every cell done or not applicable) are counted in the header."""
    if df.empty:
        return f"Suite {suite}: no cells.\n"
    open_, cols = open_pairs(df)
    head = (
        f"Suite {suite}, {totals_line(df)}. {len(df) - len(open_)} of {len(df)} (task, method) pairs are complete "
        "(every cell done or not applicable)"
    )
    if open_.empty:
        return head + ".\n"
    lines = [head + "; the others:\n", "| task | method | " + " | ".join(cols) + " | why not run |",
             "|---|---|" + "---|" * len(cols) + "---|"]  # fmt: skip
    for rec in open_.to_dict("records"):
        counts = " | ".join(str(rec[c]) for c in cols)
        lines.append(f"| {rec['task']} | {rec['method']} | {counts} | {rec['why']} |")
    return "\n".join(lines) + "\n"
