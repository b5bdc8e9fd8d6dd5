"""The table a suite is read by: which method helps, and by how much, against the right baselines.

Per task, protocol and label fraction (primary metric only), each method's mean ± std over seeds, ``learned``
(its pre-training beat the proxy's chance level on every seed), and two paired differences on the same test
samples pooled over the seeds both have (``stats.compare``: DeLong for AUROC, paired bootstrap otherwise):

- to its **own-encoder scratch twin** (the same architecture, untrained): what pre-training added, without the
  architecture mixed in (``gtgm`` against ``scratch_swin``, not against the ResNet ``scratch``);
- to a **reference** method (``clip``): whether the method beats plain image-text contrast.

What to compare with is the suite's ``comparison:`` block (``reference``, ``twin``, ``twins``), so the table of a
suite is the same wherever it is rebuilt. ``medbench report --suite <s>`` writes it as ``comparison.md`` and
``comparison.csv`` next to the HTML report, and adds it to the page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import results, stats

COLUMNS = [
    "task", "task_version", "protocol", "label_fraction", "metric", "higher_is_better", "method", "method_version",
    "mean", "std", "n_seeds", "learned", "twin", "diff_twin", "ci_low_twin", "ci_high_twin", "p_twin", "seeds_twin",
    "reference", "diff_ref", "ci_low_ref", "ci_high_ref", "p_ref", "seeds_ref", "note",
]  # fmt: skip


@dataclass(frozen=True)
class ComparisonPlan:
    """What each method is compared with: ``twins[method]`` (else ``twin``) and ``reference``."""

    reference: str | None = "clip"
    twin: str = "scratch"
    twins: dict[str, str] = field(default_factory=dict)

    def twin_of(self, method: str) -> str:
        return self.twins.get(method, self.twin)

    def baselines(self) -> set[str]:
        """Methods that are someone's twin: the untrained floors, shown without differences of their own."""
        return {self.twin, *self.twins.values()}

    @classmethod
    def from_config(cls, block: Any, where: str, methods: list[str] | None = None) -> ComparisonPlan:
        """From a suite's ``comparison:`` block. Unknown keys, a twin that is not a name, ``twins`` that is not a
        mapping, or (given the suite's ``methods``) a name the suite does not run are refused, naming them."""
        block = dict(block or {})
        allowed = {"reference", "twin", "twins"}
        unknown = sorted(set(block) - allowed)
        if unknown:
            raise ValueError(f"{where}: comparison has unknown keys {unknown}; allowed: {sorted(allowed)}")
        twins = block.get("twins") or {}
        if not isinstance(twins, Mapping):
            raise ValueError(f"{where}: comparison.twins must map a method to its twin, got {twins!r}")
        twin = block.get("twin", "scratch")
        if not isinstance(twin, str) or not twin:
            raise ValueError(f"{where}: comparison.twin must be a method name, got {twin!r}")
        ref = block.get("reference", "clip")
        twins = {str(k): str(v) for k, v in twins.items()}
        plan = cls(reference=None if ref is None else str(ref), twin=twin, twins=twins)
        if methods is not None:
            named = {plan.twin, *plan.twins, *plan.twins.values(), *([plan.reference] if plan.reference else [])}
            stray = sorted(named - set(methods))
            if stray:
                raise ValueError(f"{where}: comparison names {stray}, which the suite does not run ({methods})")
        return plan


@dataclass(frozen=True)
class SuiteScope:
    """The methods (in the suite's order) and tasks a suite's table covers."""

    methods: list[str]
    tasks: list[str]


def suite_plan(suite: str) -> tuple[ComparisonPlan, SuiteScope]:
    """The comparison plan and scope of ``configs/suite/<suite>.yaml``."""
    from .config import compose

    cfg = compose("bench", [f"suite={suite}"]).suite
    methods = [str(m) for m in cfg.methods]
    plan = ComparisonPlan.from_config(cfg.get("comparison"), f"suite {suite}", methods)
    return plan, SuiteScope(methods, [str(t) for t in cfg.tasks])


def table(
    res_dir: str | Path, plan: ComparisonPlan, scope: SuiteScope | None = None, *, level: float = 0.95,
    n_boot: int = 2000, rows: pd.DataFrame | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per (task, protocol, label fraction, method, method version) of the primary metric, with the paired
    differences to the method's twin and to the reference. With a ``scope``, only its methods (in its order)
    and tasks; without, everything in the folder, methods by name. ``rows``: the folder's rows when the caller
    has read them already (``medbench report``), so they are not read twice."""
    res_dir = Path(res_dir)
    lb = results.build_leaderboard(results.load_rows(res_dir / "runs") if rows is None else rows)
    lb = lb[lb["primary"].astype(bool)]
    if scope is not None:
        lb = lb[lb["method"].isin(scope.methods) & lb["task"].isin(scope.tasks)]
    rank = {m: i for i, m in enumerate(scope.methods if scope else [])}
    out = []
    for _, g in lb.groupby(["task", "protocol", "label_fraction"], sort=True):
        present = set(g["method"])
        versions = g.groupby("method")["method_version"].nunique()
        g = g.assign(_o=[rank.get(m, len(rank)) for m in g["method"]]).sort_values(["_o", "method"])
        for r in g.itertuples():
            rec = {c: getattr(r, c) for c in COLUMNS if hasattr(r, c)}
            notes = []
            if versions[r.method] > 1:
                notes.append(f"{r.method} has rows at several versions here; its differences pool their predictions")
            comparisons = []
            if r.method not in plan.baselines():
                comparisons.append(("twin", plan.twin_of(r.method)))
                if plan.reference and r.method != plan.reference:
                    comparisons.append(("ref", plan.reference))
            for suffix, other in comparisons:
                rec["twin" if suffix == "twin" else "reference"] = other
                if other not in present:
                    notes.append(f"no {other} result here")
                    continue
                try:
                    d = stats.pooled(res_dir, r.method, other, r.task, r.protocol, r.label_fraction, r.metric,
                                     n_boot, level)  # fmt: skip
                except stats.COMPARE_ERRORS as e:
                    notes.append(f"{r.method} vs {other}: {e}")
                    continue
                keys = {"diff": "diff", "ci_low": "ci_low", "ci_high": "ci_high", "p": "p_value", "seeds": "n_seeds"}
                rec |= {f"{k}_{suffix}": d[v] for k, v in keys.items()}
            rec["note"] = "; ".join(notes)
            out.append(rec)
    return pd.DataFrame(out, columns=COLUMNS)


def _num(x: object, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def difference_text(r: Any, suffix: str) -> str:
    """``+0.050 [+0.010, +0.090] p=0.01``, with ``(k of n seeds)`` when the pair shares fewer seeds than the
    method has; empty when there is no difference."""
    diff = getattr(r, f"diff_{suffix}")
    if diff is None or (isinstance(diff, float) and math.isnan(diff)):
        return ""
    p = getattr(r, f"p_{suffix}")
    lo, hi = getattr(r, f"ci_low_{suffix}"), getattr(r, f"ci_high_{suffix}")
    text = f"{diff:+.3f} [{_num(lo, '+.3f')}, {_num(hi, '+.3f')}] p={_num(p, '.2g')}"
    shared = getattr(r, f"seeds_{suffix}")
    if shared is not None and not math.isnan(float(shared)) and int(shared) < int(r.n_seeds):
        text += f" ({int(shared)} of {int(r.n_seeds)} seeds)"
    return text


def summary_markdown(df: pd.DataFrame, plan: ComparisonPlan) -> str:
    """The README's form: one table over all tasks, only the methods that pre-train (the twins' scores sit in
    the difference column, ``scratch 0.489; +0.226 [...]``), with a protocol column only when a task has more
    than one. Regenerated with the report, so the README table is copied from a file, not typed."""
    floors = plan.baselines()
    rows = df[~df["method"].isin(floors)]
    if rows.empty:
        return "_no pre-trained method's results yet_\n"
    ref = plan.reference or "reference"
    twin_mean = {
        (r.task, r.protocol, r.label_fraction, r.method): r.mean for r in df[df["method"].isin(floors)].itertuples()
    }
    several = df.groupby("task")["protocol"].nunique().gt(1).any()
    head = "| task (metric) |" + (" protocol |" if several else "") + " labels | method | mean ± std (seeds) | "
    out = [head + f"Δ vs own-encoder scratch | Δ vs {ref} | learned |", "|---" * (7 + several) + "|"]
    for r in rows.itertuples():
        std = "" if math.isnan(r.std) else f" ± {r.std:.3f}"
        labels = "—" if r.protocol == "zeroshot" else f"{r.label_fraction:.0%}"  # retrieval, zero-shot: no labels
        twin = difference_text(r, "twin")
        base = twin_mean.get((r.task, r.protocol, r.label_fraction, r.twin))
        if twin and base is not None:
            twin = f"`{r.twin}` {base:.3f}; {twin}"
        learned = results.learned_text(r.learned)
        out.append(
            f"| {r.task} ({r.metric}) |" + (f" {r.protocol} |" if several else "") + f" {labels} | {r.method} | "
            f"{r.mean:.3f}{std} ({r.n_seeds}) | {twin} | {difference_text(r, 'ref')} | "
            + (f"**{learned}** |" if learned == "NO" else f"{learned} |")
        )
    return "\n".join(out) + "\n"


def markdown(df: pd.DataFrame, plan: ComparisonPlan, level: float = 0.95) -> str:
    """One markdown table per task: labels, method, mean ± std (seeds), the two differences, learned."""
    if df.empty:
        return "_no results yet_\n"
    ref = plan.reference or "reference"
    parts = []
    for (task, metric, higher), g in df.groupby(["task", "metric", "higher_is_better"], sort=True):
        better = "higher" if bool(higher) else "lower"
        parts.append(f"### {task} ({metric}, {better} is better)\n")
        parts.append(f"| protocol | labels | method | mean ± std (seeds) | Δ vs own-encoder scratch | Δ vs {ref} | "
                     "learned |\n|---|---|---|---|---|---|---|")  # fmt: skip
        for r in g.itertuples():
            std = "" if math.isnan(r.std) else f" ± {r.std:.3f}"
            twin = f"{r.twin}: {difference_text(r, 'twin')}" if difference_text(r, "twin") else ""
            parts.append(
                f"| {r.protocol} | {r.label_fraction:g} | {results.method_label(r.method, r.method_version, None)} | "
                f"{r.mean:.3f}{std} ({r.n_seeds}) | {twin} | {difference_text(r, 'ref')} | "
                f"{results.learned_text(r.learned)} |"
            )
        notes = [f"- {r.method}, labels {r.label_fraction:g}: {r.note}" for r in g.itertuples() if r.note]
        parts.append("\n" + "\n".join(notes) + "\n" if notes else "")
    head = (
        "Differences are the method minus the baseline on the same test samples, pooled over the seeds both have "
        f"(DeLong for AUROC, paired bootstrap otherwise), with the {level * 100:g}% interval and an uncorrected "
        "p-value. `learned`: the pre-training beat its proxy's chance level on every seed.\n\n"
    )
    return head + "\n".join(parts)
