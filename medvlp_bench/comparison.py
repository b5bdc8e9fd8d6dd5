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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    def from_config(cls, block: Any, where: str) -> ComparisonPlan:
        """From a suite's ``comparison:`` block; unknown keys name the allowed ones."""
        block = dict(block or {})
        allowed = {"reference", "twin", "twins"}
        unknown = sorted(set(block) - allowed)
        if unknown:
            raise ValueError(f"{where}: comparison has unknown keys {unknown}; allowed: {sorted(allowed)}")
        twins = {str(k): str(v) for k, v in dict(block.get("twins") or {}).items()}
        ref = block.get("reference", "clip")
        return cls(reference=None if ref is None else str(ref), twin=str(block.get("twin", "scratch")), twins=twins)


def suite_plan(suite: str) -> tuple[ComparisonPlan, list[str]]:
    """The comparison plan and the method order of ``configs/suite/<suite>.yaml``."""
    from .config import compose

    cfg = compose("bench", [f"suite={suite}"]).suite
    return ComparisonPlan.from_config(cfg.get("comparison"), f"suite {suite}"), [str(m) for m in cfg.methods]


def _paired(res_dir: Path, a: str, b: str, r: Any, n_boot: int, level: float) -> dict[str, Any]:
    """The pooled paired row of ``a`` minus ``b`` on ``r``'s cell, or ``{"error": why}``."""
    try:
        df = stats.compare(res_dir, a, b, r.task, r.protocol, float(r.label_fraction), metric=r.metric,
                           n_boot=n_boot, level=level)  # fmt: skip
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        return {"error": f"{a} vs {b}: {e}"}
    return df[df["seed"] == "pooled"].iloc[0].to_dict()


def table(
    res_dir: str | Path, plan: ComparisonPlan, order: list[str] | None = None, *, level: float = 0.95,
    n_boot: int = 2000,
) -> pd.DataFrame:  # fmt: skip
    """One row per (task, protocol, label fraction, method) of the primary metric, in ``order`` of methods
    (then by name), with the paired differences to the method's twin and to the reference."""
    res_dir = Path(res_dir)
    lb = results.build_leaderboard(results.load_rows(res_dir / "runs"))
    lb = lb[lb["primary"].astype(bool)]
    rank = {m: i for i, m in enumerate(order or [])}
    out = []
    for _, g in lb.groupby(["task", "protocol", "label_fraction"], sort=True):
        present = set(g["method"])
        g = g.assign(_o=[rank.get(m, len(rank)) for m in g["method"]]).sort_values(["_o", "method"])
        for r in g.itertuples():
            rec = {c: getattr(r, c) for c in COLUMNS if hasattr(r, c)}
            notes = []
            comparisons = []
            if r.method not in plan.baselines():
                comparisons.append(("twin", plan.twin_of(r.method)))
            if plan.reference and r.method != plan.reference and r.method not in plan.baselines():
                comparisons.append(("ref", plan.reference))
            for suffix, other in comparisons:
                rec["twin" if suffix == "twin" else "reference"] = other
                if other not in present:
                    notes.append(f"no {other} result here")
                    continue
                d = _paired(res_dir, r.method, other, r, n_boot, level)
                if "error" in d:
                    notes.append(d["error"])
                    continue
                keys = {"diff": "diff", "ci_low": "ci_low", "ci_high": "ci_high", "p": "p_value", "seeds": "n_seeds"}
                rec |= {f"{k}_{suffix}": d[v] for k, v in keys.items()}
            rec["note"] = "; ".join(notes)
            out.append(rec)
    return pd.DataFrame(out, columns=COLUMNS)


def _num(x: object, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _diff(r: Any, suffix: str) -> str:
    diff = getattr(r, f"diff_{suffix}")
    if diff is None or (isinstance(diff, float) and math.isnan(diff)):
        return ""
    p = getattr(r, f"p_{suffix}")
    lo, hi = getattr(r, f"ci_low_{suffix}"), getattr(r, f"ci_high_{suffix}")
    return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}] p={_num(p, '.2g')}"


def _learned(flag: object) -> str:
    if isinstance(flag, bool | np.bool_):
        return "yes" if flag else "**no**"
    return "—"


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
            twin = f"{r.twin}: {_diff(r, 'twin')}" if _diff(r, "twin") else ""
            parts.append(
                f"| {r.protocol} | {r.label_fraction:g} | {results.method_label(r.method, r.method_version, None)} | "
                f"{r.mean:.3f}{std} ({r.n_seeds}) | {twin} | {_diff(r, 'ref')} | {_learned(r.learned)} |"
            )
        notes = [f"- {r.method}, labels {r.label_fraction:g}: {r.note}" for r in g.itertuples() if r.note]
        parts.append("\n" + "\n".join(notes) + "\n" if notes else "")
    head = (
        "Differences are the method minus the baseline on the same test samples, pooled over the seeds both have "
        f"(DeLong for AUROC, paired bootstrap otherwise), with the {level * 100:g}% interval and an uncorrected "
        "p-value. `learned`: the pre-training beat its proxy's chance level on every seed.\n\n"
    )
    return head + "\n".join(parts)
