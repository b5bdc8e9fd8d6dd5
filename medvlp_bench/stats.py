"""Paired comparison of two methods on the same test samples: DeLong's test for AUROC, a paired bootstrap
for everything else. Metric values come from ``medvlp_bench.metrics``, the functions the tasks score their
rows with, so ``compare``'s values are the rows' values.

The leaderboard's t-interval over seeds says how much a method varies with the seed; it cannot say whether
A beats B on this test set. Both methods are scored on the same test samples, so the comparison is paired:

- **DeLong** (fast midrank algorithm of Sun & Xu 2014): each sample's influence on the AUC (its placement
  value) gives the variance of AUC_A - AUC_B, covariance between the two methods included. Written as a
  per-sample influence vector, macro AUROC over classes and the mean over seeds are averages of vectors.
- **Paired bootstrap**: resample test indices with replacement, the same indices for both methods (and
  for every seed), recompute the metric difference; percentile CI, two-sided p-value against the shifted
  null (``|d* - d| >= |d|``, +1 smoothed).

Per-sample predictions are ``results/predictions/<cell>.npz``: classification and zero-shot store
``id, target, score``; segmentation ``id, dice [N, K], class_names``; retrieval ``id, rank_i2t, ties_i2t,
rank_t2i, ties_t2i`` (mid-rank of the true match, and how many other candidates tie with it).
The pooled row averages the per-seed differences; its interval is over test samples only (seed variance is
what the leaderboard interval shows), and it is clipped to the range a difference of the metric can take.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.stats import rankdata

from .metrics import Preds, auroc_per_class, clip_interval, metric_value, one_vs_rest, prediction_kind, recall_at_k

__all__ = ["auroc_per_class", "compare", "delong", "metric_value", "paired_bootstrap", "prediction_kind", "recall_at_k"]


# ---- DeLong ------------------------------------------------------------------------------------------
def delong_components(target: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray]:
    """AUC of one binary problem and each sample's scaled influence ``phi`` (``sum(phi**2)`` = DeLong variance).

    Midranks give the placement values: V10 (positives: fraction of negatives scored lower, ties half) and
    V01 (negatives: fraction of positives scored higher). phi = (V - AUC) / sqrt(m (m - 1)) for positives and
    / sqrt(n (n - 1)) for negatives, so ``sum(phi_a * phi_b)`` is DeLong's covariance S10/m + S01/n.
    """
    y = np.asarray(target).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    m, n = int(y.sum()), int((~y).sum())
    phi = np.full(len(y), np.nan)
    if m == 0 or n == 0:
        return float("nan"), phi
    r_all = rankdata(s)
    auc = (r_all[y].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (r_all[y] - rankdata(s[y])) / n
    v01 = 1.0 - (r_all[~y] - rankdata(s[~y])) / m
    if m > 1 and n > 1:
        phi[y] = (v10 - auc) / np.sqrt(m * (m - 1))
        phi[~y] = (v01 - auc) / np.sqrt(n * (n - 1))
    return float(auc), phi


def macro_components(parts: Sequence[tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
    """Macro AUC over the classes that have both positives and negatives, and its influence vector."""
    keep = [p for p in parts if np.isfinite(p[0])]
    if not keep:
        return float("nan"), np.full(len(parts[0][1]), np.nan)
    return float(np.mean([p[0] for p in keep])), np.mean([p[1] for p in keep], axis=0)


def z_test(diff: float, var: float, level: float = 0.95, null: float = 0.0) -> tuple[float, float, float]:
    """Two-sided normal p-value of ``diff`` against ``null`` and the ``level`` interval of ``diff``."""
    se = float(np.sqrt(max(var, 0.0)))
    half = sps.norm.ppf(0.5 + level / 2) * se
    if se == 0.0:
        return (1.0 if diff == null else 0.0), diff - half, diff + half
    return float(2 * sps.norm.sf(abs(diff - null) / se)), diff - half, diff + half


def delong(
    target: np.ndarray, score_a: np.ndarray, score_b: np.ndarray | None = None, level: float = 0.95
) -> pd.DataFrame:
    """DeLong's test, one row per class (one-vs-rest) plus ``macro`` when there are several.

    With ``score_b`` each row tests AUC_A - AUC_B on the same samples; without it, AUC_A is tested against
    0.5 and ``diff`` is AUC_A with its DeLong interval.
    """
    t, sa = one_vs_rest(target, score_a)
    sb = None if score_b is None else one_vs_rest(target, score_b)[1]
    if sb is not None and sb.shape != sa.shape:
        raise ValueError(f"score_a {sa.shape} and score_b {sb.shape} must have the same shape")
    parts_a = [delong_components(t[:, k], sa[:, k]) for k in range(t.shape[1])]
    parts_b = None if sb is None else [delong_components(t[:, k], sb[:, k]) for k in range(t.shape[1])]
    names: list[object] = list(range(t.shape[1]))
    if t.shape[1] > 1:
        names.append("macro")
        parts_a.append(macro_components(parts_a))
        if parts_b is not None:
            parts_b.append(macro_components(parts_b))
    out = []
    for i, name in enumerate(names):
        (auc_a, phi_a), (auc_b, phi_b) = parts_a[i], (parts_b[i] if parts_b else (float("nan"), 0.0))
        diff = auc_a - auc_b if parts_b else auc_a
        var = float(np.sum((phi_a - phi_b) ** 2))
        p, lo, hi = z_test(diff, var, level, null=0.0 if parts_b else 0.5)
        lo, hi = clip_interval("auroc", lo, hi, difference=parts_b is not None)
        out.append(
            {"class": name, "auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se": np.sqrt(var)}
            | {"ci_low": lo, "ci_high": hi, "p_value": p}
        )
    return pd.DataFrame(out)


# ---- bootstrap ---------------------------------------------------------------------------------------
@dataclass
class BootstrapResult:
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: int  # resamples where the difference was defined (e.g. a class kept its positives)


def paired_bootstrap(
    diff: Callable[[np.ndarray], float], n: int, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> BootstrapResult:
    """Bootstrap ``diff(idx)`` (metric of A minus metric of B on test samples ``idx``) over ``n`` samples.

    The caller's ``diff`` applies the same ``idx`` to both methods (and all seeds): that is what pairs them.
    """
    if n < 2:
        raise ValueError(f"paired bootstrap needs at least 2 test samples, got {n}")
    rng = np.random.default_rng(seed)
    observed = float(diff(np.arange(n)))
    boots = np.array([diff(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=np.float64)
    boots = boots[np.isfinite(boots)]
    if not len(boots) or not np.isfinite(observed):
        return BootstrapResult(observed, float("nan"), float("nan"), float("nan"), len(boots))
    lo, hi = np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])
    p = (1 + np.sum(np.abs(boots - observed) >= abs(observed) - 1e-12)) / (len(boots) + 1)
    return BootstrapResult(observed, float(lo), float(hi), float(min(p, 1.0)), len(boots))


# ---- saved predictions ------------------------------------------------------------------------------
def take(p: Preds, idx: np.ndarray) -> Preds:
    """The per-sample arrays at ``idx`` (per-file arrays such as ``class_names`` kept whole)."""
    n = len(p["id"])
    return {k: (v[idx] if k != "class_names" and v.ndim and len(v) == n else v) for k, v in p.items()}


# ---- comparing two methods from saved predictions ----------------------------------------------------
_DEFAULT_METRIC = {"classification": "auroc", "segmentation": "dice", "retrieval": "r_mean"}


def load_predictions(path: Path) -> Preds:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _seed_files(pred_dir: Path, task: str, method: str, protocol: str, fraction: float) -> dict[int, Path]:
    prefix = f"{task}__{method}__{protocol}__f{fraction:g}__s"
    found = {p.name[len(prefix) : -4]: p for p in pred_dir.glob(f"{prefix}*.npz")}
    return {int(s): p for s, p in found.items() if s.isdigit()}


def _cells(pred_dir: Path, task: str, method: str) -> set[tuple[str, float]]:
    pat = re.compile(rf"{re.escape(task)}__{re.escape(method)}__(.+)__f([0-9.e+-]+)__s\d+\.npz")
    return {(m[1], float(m[2])) for p in pred_dir.glob("*.npz") if (m := pat.fullmatch(p.name))}


def _primary(results_dir: Path, cell_file: Path) -> str | None:
    runs = results_dir / "runs" / f"{cell_file.stem}.json"
    if not runs.is_file():
        return None
    rows = json.loads(runs.read_text()).get("rows", [])
    return next((r["metric"] for r in rows if r.get("primary")), None)


def _aligned(p: Preds, order: np.ndarray, what: str) -> Preds:
    """``p`` reordered to the sample ids ``order``: paired tests need the same test samples on both sides."""
    ids = np.asarray(p["id"]).astype(str)
    if len(ids) != len(order) or set(ids) != set(order):
        raise ValueError(f"{what}: test ids differ from the reference cell ({len(ids)} vs {len(order)} samples)")
    pos = {s: i for i, s in enumerate(ids)}
    return take(p, np.array([pos[s] for s in order]))


def _test(a: list[Preds], b: list[Preds], metric: str, test: str, n_boot: int, seed: int, level: float) -> dict:
    """One comparison row over the given seeds: the mean over seeds of A - B, paired over test samples."""
    value_a = float(np.mean([metric_value(p, metric) for p in a]))
    value_b = float(np.mean([metric_value(p, metric) for p in b]))
    if test == "delong":
        pa = [macro_components(_parts(p)) for p in a]
        pb = [macro_components(_parts(p)) for p in b]
        diff = value_a - value_b  # the DeLong AUCs are these values; the rows' numbers keep the last digit
        phi = np.mean([x[1] - y[1] for x, y in zip(pa, pb)], axis=0)
        p_value, lo, hi = z_test(diff, float(np.sum(phi**2)), level)
    else:

        def delta(idx: np.ndarray) -> float:
            return float(
                np.mean([metric_value(take(x, idx), metric) - metric_value(take(y, idx), metric) for x, y in zip(a, b)])
            )

        res = paired_bootstrap(delta, len(a[0]["id"]), n_boot=n_boot, seed=seed, level=level)
        diff, lo, hi, p_value = res.estimate, res.ci_low, res.ci_high, res.p_value
    lo, hi = clip_interval(metric, lo, hi, difference=True)
    return dict(value_a=value_a, value_b=value_b, diff=diff, ci_low=lo, ci_high=hi, p_value=p_value, test=test)


def _parts(p: Preds) -> list[tuple[float, np.ndarray]]:
    t, s = one_vs_rest(p["target"], p["score"])
    return [delong_components(t[:, k], s[:, k]) for k in range(t.shape[1])]


def compare(
    results_dir: str | Path,
    method_a: str,
    method_b: str,
    task: str,
    protocol: str | None = None,
    label_fraction: float | None = None,
    metric: str | None = None,
    n_boot: int = 2000,
    test: str = "auto",
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Paired comparison of A and B on one task cell: a row per seed both have, and a ``pooled`` row.

    ``protocol``/``label_fraction`` default to the only combination both methods have results for.
    ``metric`` defaults to the task's primary metric. ``test``: ``auto`` (DeLong for ``auroc``, bootstrap
    otherwise), ``delong`` or ``bootstrap``.
    """
    results_dir = Path(results_dir)
    pred_dir = results_dir / "predictions"
    if protocol is None or label_fraction is None:
        both = _cells(pred_dir, task, method_a) & _cells(pred_dir, task, method_b)
        both = {c for c in both if protocol in (None, c[0]) and label_fraction in (None, c[1])}
        if len(both) != 1:
            raise ValueError(
                f"{pred_dir}: give protocol= and label_fraction=; results for both {method_a} and {method_b} "
                f"on {task} exist for {sorted(both) or 'no (protocol, label_fraction)'}"
            )
        protocol, label_fraction = next(iter(both))
    files_a = _seed_files(pred_dir, task, method_a, protocol, label_fraction)
    files_b = _seed_files(pred_dir, task, method_b, protocol, label_fraction)
    seeds = sorted(set(files_a) & set(files_b))
    if not seeds:
        raise FileNotFoundError(
            f"no seed with predictions for both methods in {pred_dir} ({task}, {protocol}, f{label_fraction:g}): "
            f"{method_a} has seeds {sorted(files_a)}, {method_b} has {sorted(files_b)}"
        )
    a = [load_predictions(files_a[s]) for s in seeds]
    b = [load_predictions(files_b[s]) for s in seeds]
    kind = prediction_kind(a[0])
    metric = metric or _primary(results_dir, files_a[seeds[0]]) or _DEFAULT_METRIC[kind]
    if test == "auto":
        test = "delong" if kind == "classification" and metric == "auroc" else "bootstrap"
    if test not in ("delong", "bootstrap"):
        raise ValueError(f"test must be auto, delong or bootstrap, got {test!r}")
    if test == "delong" and (kind != "classification" or metric != "auroc"):
        raise ValueError(f"DeLong tests macro AUROC of score predictions, not {metric!r} of {kind}")
    order = np.asarray(a[0]["id"]).astype(str)
    a = [_aligned(p, order, f"{method_a} seed {s}") for p, s in zip(a, seeds)]
    b = [_aligned(p, order, f"{method_b} seed {s}") for p, s in zip(b, seeds)]
    common = dict(task=task, protocol=protocol, label_fraction=label_fraction, metric=metric)
    common |= dict(method_a=method_a, method_b=method_b, n_test=len(order))
    rows = [
        {**common, "seed": str(s), "n_seeds": 1, **_test([x], [y], metric, test, n_boot, seed, level)}
        for s, x, y in zip(seeds, a, b)
    ]
    rows.append({**common, "seed": "pooled", "n_seeds": len(seeds), **_test(a, b, metric, test, n_boot, seed, level)})
    return pd.DataFrame(rows)


#: what ``compare`` raises for predictions that are missing or cannot be paired
COMPARE_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


def pooled(
    results_dir: str | Path, method_a: str, method_b: str, task: str, protocol: str, label_fraction: float,
    metric: str, n_boot: int = 2000, level: float = 0.95,
) -> dict:  # fmt: skip
    """``compare``'s pooled row (A minus B over the seeds both have) as a dict; raises ``COMPARE_ERRORS``.
    Memoised per process and prediction files, so the report's paired section and the suite comparison
    table do not bootstrap the same pair twice."""
    pred_dir = Path(results_dir) / "predictions"
    stamp = tuple(
        sorted((p.name, p.stat().st_mtime_ns) for m in (method_a, method_b) for p in pred_dir.glob(f"{task}__{m}__*"))
    )
    key = (str(Path(results_dir).resolve()), method_a, method_b, task, protocol, float(label_fraction), metric)
    return dict(_pooled(*key, n_boot, level, stamp))


@functools.lru_cache(maxsize=4096)
def _pooled(
    results_dir: str, a: str, b: str, task: str, protocol: str, frac: float, metric: str, n_boot: int, level: float,
    _stamp: tuple,
) -> dict:  # fmt: skip
    df = compare(results_dir, a, b, task, protocol, frac, metric=metric, n_boot=n_boot, level=level)
    return df[df["seed"] == "pooled"].iloc[0].to_dict()


def main_compare(argv: Sequence[str]) -> int:
    """``medbench compare A B task=<t> [protocol=..] [label_fraction=..] [metric=..] [n_boot=..] [test=..]``."""
    import argparse
    import sys

    from .cli import RESULTS_HELP
    from .results import results_dir as find_results

    ap = argparse.ArgumentParser(prog="medbench compare", description="paired test of method A against B")
    ap.add_argument("method_a")
    ap.add_argument("method_b")
    ap.add_argument("options", nargs="*", help="task=<t> protocol= label_fraction= metric= n_boot= test= seed=")
    ap.add_argument("--results", default=None, help=RESULTS_HELP)
    ap.add_argument("--format", choices=("table", "csv"), default="table")
    args = ap.parse_args(list(argv))
    casts = {
        "task": str,
        "protocol": str,
        "label_fraction": float,
        "metric": str,
        "n_boot": int,
        "test": str,
        "seed": int,
    }
    kw: dict[str, object] = {}
    for opt in args.options:
        key, sep, value = opt.partition("=")
        if not sep or key not in casts:
            print(
                f"medbench compare: error: bad option {opt!r}; use key=value with key in {sorted(casts)}",
                file=sys.stderr,
            )
            return 2
        kw[key] = casts[key](value)
    if "task" not in kw:
        print("medbench compare: error: task=<name> is required", file=sys.stderr)
        return 2
    try:
        df = compare(find_results(args.results), args.method_a, args.method_b, **kw)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"medbench compare: error: {e}", file=sys.stderr)
        return 2
    cols = ["seed", "metric", "value_a", "value_b", "diff", "ci_low", "ci_high", "p_value", "test", "n_test"]
    print(df.to_csv(index=False) if args.format == "csv" else df[cols].to_string(index=False, float_format="%.4f"))
    return 0
