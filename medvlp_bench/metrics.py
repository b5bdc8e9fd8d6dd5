"""Every metric value of the benchmark, computed in one place from per-sample predictions.

The tasks score their rows with these functions, ``medbench compare`` and ``medbench report`` recompute the
same values from the saved predictions (``results/predictions/<cell>.npz``) with them, and the leaderboard
takes each metric's range from here to keep its intervals inside it. One function per metric, so a row, a
paired test and a report can never disagree about what a number means.

Rules that hold everywhere:

- **Classes left out of macro averages.** A class with no positive or no negative in the evaluated split has
  no AUROC, and its F1 and accuracy say nothing about the classifier. It is left out of every macro average
  (AUROC, F1, multi-label accuracy) and out of the per-class rows; tasks record which classes were left out
  and why (``left_out_classes`` in the cell JSON). torchmetrics' own macro average would score such a class
  0 (AUROC) and average it in, so only its per-class values are used here.
- **Arithmetic.** AUROC per class is scikit-learn's ``roc_auc_score`` (exact, ties count one half); accuracy
  and F1 per class are torchmetrics' (threshold 0.5 on probabilities, argmax for multi-class); multi-class
  accuracy is micro (top-1), as before.
- **Retrieval** recall is the expected R@k when ties are broken at random (a constant scorer gets k/N).
- **Segmentation** per-class values are means over the samples where the value is defined (NaN and, for
  HD95, infinite values are left out); the overall value is the mean over classes that have one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

Preds = dict[str, np.ndarray]
CLASSIFICATION_METRICS = ("auroc", "acc", "f1")


# ---- classification ---------------------------------------------------------------------------------
def classification_type(target: np.ndarray, score: np.ndarray) -> str:
    """``binary``, ``multiclass`` or ``multilabel``, from the shapes of saved targets and scores.

    binary: scores [N] or [N, 1]; multi-class: integer targets [N] and probabilities [N, K > 1];
    multi-label: targets and scores [N, K].
    """
    target, score = np.asarray(target), np.asarray(score)
    if score.ndim == 1 or (score.ndim == 2 and score.shape[1] == 1):
        return "binary"
    if score.ndim == 2 and target.ndim == 1:
        return "multiclass"
    if score.ndim == 2 and target.shape == score.shape:
        return "multilabel"
    raise ValueError(f"cannot score targets of shape {target.shape} against scores of shape {score.shape}")


def one_vs_rest(target: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] binary targets and [N, K] scores: multi-label as is, multi-class one-hot, binary one column."""
    kind = classification_type(target, score)
    target, score = np.asarray(target), np.asarray(score)
    if kind == "binary":
        return target.reshape(-1, 1) > 0.5, score.reshape(-1, 1)
    if kind == "multiclass":
        return np.eye(score.shape[1], dtype=bool)[target.astype(int)], score
    return target > 0.5, score


def scored_classes(target: np.ndarray, score: np.ndarray) -> np.ndarray:
    """[K] mask of the classes with at least one positive and one negative: the ones macro averages use."""
    t, _ = one_vs_rest(target, score)
    pos = t.sum(0)
    return (pos > 0) & (pos < len(t))


def left_out_classes(target: np.ndarray, score: np.ndarray, class_names: Sequence[str]) -> dict[str, str]:
    """Class name -> why it is left out of the macro averages (``{}`` when every class is scored)."""
    t, _ = one_vs_rest(target, score)
    names = [str(n) for n in class_names]
    if t.shape[1] == 1 and len(names) == 2:  # binary named as (negative, positive)
        names = names[1:]
    if len(names) != t.shape[1]:
        names = [str(k) for k in range(t.shape[1])]
    pos = t.sum(0)
    out = {}
    for k, name in enumerate(names):
        if pos[k] == 0:
            out[name] = "no positive in the evaluated split"
        elif pos[k] == len(t):
            out[name] = "no negative in the evaluated split"
    return out


def _macro(per_class: np.ndarray, keep: np.ndarray) -> float:
    return float(np.mean(per_class[keep])) if keep.any() else math.nan


def auroc_per_class(target: np.ndarray, score: np.ndarray) -> np.ndarray:
    """One AUROC per class (one-vs-rest for multi-class), NaN for a class left out (no positive or negative)."""
    from sklearn.metrics import roc_auc_score

    t, s = one_vs_rest(target, score)
    keep = scored_classes(target, score)
    return np.array([roc_auc_score(t[:, k], s[:, k]) if keep[k] else math.nan for k in range(t.shape[1])])


def auroc(target: np.ndarray, score: np.ndarray) -> float:
    """Macro AUROC over the scored classes (NaN if none is)."""
    return _macro(auroc_per_class(target, score), scored_classes(target, score))


def _thresholded(name: str, target: np.ndarray, score: np.ndarray, average: str) -> np.ndarray:
    """torchmetrics accuracy or F1 (``name``) at threshold 0.5 / argmax, per class or micro."""
    import torch
    import torchmetrics.functional as tmf

    fn = tmf.accuracy if name == "acc" else tmf.f1_score
    kind = classification_type(target, score)
    s = torch.from_numpy(np.ascontiguousarray(score, dtype=np.float32))
    y = torch.from_numpy(np.asarray(target)).long()
    if kind == "binary":
        return fn(s.view(-1), y.view(-1), task="binary").numpy().reshape(1)
    if kind == "multiclass":
        return fn(s, y, task="multiclass", num_classes=s.shape[1], average=average).numpy().reshape(-1)
    return fn(s, y, task="multilabel", num_labels=s.shape[1], average=average).numpy().reshape(-1)


def accuracy(target: np.ndarray, score: np.ndarray) -> float:
    """Binary accuracy; multi-class top-1 (micro) accuracy; multi-label macro accuracy over the scored classes."""
    kind = classification_type(target, score)
    if kind in ("binary", "multiclass"):
        return float(_thresholded("acc", target, score, "micro")[0])
    return _macro(_thresholded("acc", target, score, "none").astype(np.float64), scored_classes(target, score))


def f1(target: np.ndarray, score: np.ndarray) -> float:
    """Binary F1; multi-class and multi-label macro F1 over the scored classes."""
    if classification_type(target, score) == "binary":
        return float(_thresholded("f1", target, score, "micro")[0])
    return _macro(_thresholded("f1", target, score, "none").astype(np.float64), scored_classes(target, score))


def classification_metric(p: Preds, metric: str) -> float:
    fns = {"auroc": auroc, "acc": accuracy, "f1": f1}
    if metric not in fns:
        raise KeyError(f"unknown classification metric {metric!r}; use {', '.join(CLASSIFICATION_METRICS)}")
    return fns[metric](p["target"], p["score"])


# ---- retrieval --------------------------------------------------------------------------------------
def recall_at_k(rank: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """Per-query probability that the true match is in the top ``k`` when ties are broken at random.

    ``rank`` is the mid-rank of the true match (1 + #higher + ties/2): a constant scorer gets k/N, not 1.
    """
    rank, ties = np.asarray(rank, dtype=np.float64), np.asarray(ties, dtype=np.float64)
    higher = rank - 1 - ties / 2
    return np.clip(k - higher, 0, ties + 1) / (ties + 1)


def retrieval_metric(p: Preds, metric: str) -> float:
    """``i2t_r<k>``, ``t2i_r<k>``, ``i2t_medr``, ``t2i_medr`` or ``r_mean`` (mean of R@1/5/10 both ways)."""
    if metric == "r_mean":
        names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
        return float(np.mean([retrieval_metric(p, n) for n in names]))
    m = re.fullmatch(r"(i2t|t2i)_(r(\d+)|medr)", metric)
    if m is None:
        raise KeyError(f"unknown retrieval metric {metric!r}; use i2t_r<k>, t2i_r<k>, i2t_medr, t2i_medr, r_mean")
    d = m.group(1)
    if m.group(2) == "medr":
        return float(np.median(p[f"rank_{d}"]))
    return float(recall_at_k(p[f"rank_{d}"], p[f"ties_{d}"], int(m.group(3))).mean())


# ---- segmentation -----------------------------------------------------------------------------------
def segmentation_per_class(values: np.ndarray) -> np.ndarray:
    """[N, K] per-sample values -> [K] means over the samples where defined (NaN/inf left out); NaN if none."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isinf(v), np.nan, v)
    counts = np.isfinite(v).sum(0)
    return np.where(counts > 0, np.nansum(v, 0) / np.maximum(counts, 1), np.nan)


def segmentation_left_out(p: Preds, key: str = "dice") -> dict[str, str]:
    """Classes (or regions) with no sample where ``key`` is defined: left out of the mean over classes."""
    per = segmentation_per_class(p[key])
    return {str(n): f"no test sample with a defined {key}" for n, v in zip(p["class_names"], per) if not np.isfinite(v)}


def segmentation_metric(p: Preds, metric: str) -> float:
    """``dice`` / ``hd95`` (mean over classes) or ``dice/<class>`` (mean over samples)."""
    base, _, cls = metric.partition("/")
    if base not in p:
        raise KeyError(f"segmentation predictions hold {sorted(p)}, not {base!r}")
    per_class = segmentation_per_class(p[base])
    if cls:
        names = [str(c) for c in p["class_names"]]
        if cls not in names:
            raise KeyError(f"class {cls!r} not among {names}")
        return float(per_class[names.index(cls)])
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else math.nan


# ---- any task ---------------------------------------------------------------------------------------
def prediction_kind(p: Preds) -> str:
    """classification | segmentation | retrieval, from the arrays a prediction file holds."""
    if "rank_i2t" in p:
        return "retrieval"
    if "dice" in p:
        return "segmentation"
    if "target" in p and "score" in p:
        return "classification"
    raise ValueError(f"unrecognised prediction arrays {sorted(p)}")


def metric_value(p: Preds, metric: str) -> float:
    """The value of ``metric`` on per-sample predictions: what a row holds and what compare resamples."""
    fn = {
        "retrieval": retrieval_metric,
        "segmentation": segmentation_metric,
        "classification": classification_metric,
    }[prediction_kind(p)]
    return fn(p, metric)


_UNIT_INTERVAL = re.compile(r"auroc|acc|f1|dice|r_mean|(i2t|t2i)_r\d+")


def metric_range(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take: [0, 1] for AUROC, ACC, F1, Dice and R@k; [1, inf) for median ranks;
    [0, inf) for HD95; unbounded for a metric not known here."""
    base = metric.split("/")[0]
    if _UNIT_INTERVAL.fullmatch(base):
        return 0.0, 1.0
    if re.fullmatch(r"(i2t|t2i)_medr", base):
        return 1.0, math.inf
    if base == "hd95":
        return 0.0, math.inf
    return -math.inf, math.inf


def clip_interval(metric: str, low: float, high: float, difference: bool = False) -> tuple[float, float]:
    """An interval clipped to ``metric``'s range (or, with ``difference``, to the range of A - B).

    A t-interval over 3 seeds of a Dice near 0 reaches below 0; no method can score there, so the bound is
    the range's end. NaN bounds stay NaN.
    """
    lo, hi = metric_range(metric)
    if difference:
        lo, hi = lo - hi, hi - lo

    def clip(x: float) -> float:
        return x if math.isnan(x) else min(max(float(x), lo), hi)

    return clip(float(low)), clip(float(high))
