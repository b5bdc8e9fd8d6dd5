"""One metric code path: hand-computed values, classes left out of macro averages, metric ranges, and the
agreement of a task's row value with what ``compare``, ``report`` and the leaderboard show, for every task kind."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from medvlp_bench import metrics, stats
from medvlp_bench.config import compose
from medvlp_bench.datasets.phantoms import PhantomDataModule
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.methods.clip import CLIP
from medvlp_bench.methods.scratch import Scratch
from medvlp_bench.report import paired_rows
from medvlp_bench.results import ResultRow, build_leaderboard, cell_name, load_rows, save_predictions
from medvlp_bench.run import make_trainer
from medvlp_bench.task import EvalContext
from medvlp_bench.tasks.classification import Classification, classification_metrics
from medvlp_bench.tasks.retrieval import retrieval_metrics, true_match_ranks
from medvlp_bench.tasks.segmentation import Segmentation
from medvlp_bench.tasks.zeroshot import ZeroShot
from medvlp_bench.text import build_text_encoder

NO_POSITIVE = "no positive in the evaluated split"


# ---- values against hand computations -----------------------------------------------------------------
def test_multilabel_class_without_positive_is_left_out_of_every_macro_average() -> None:
    # class a: positives score .9 .4, negatives .2 .5 -> 3 of 4 pairs ordered -> AUROC 3/4; at 0.5 the
    # predictions are 1 0 0 0 against 1 0 1 0 -> ACC 3/4, F1 2 tp / (2 tp + fp + fn) = 2/3.
    # class b has no positive: no AUROC; torchmetrics' macro would average in 0 (3/8) and F1 0 (1/3).
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], np.float32)
    s = np.array([[0.9, 0.6, 0.5], [0.2, 0.1, 0.5], [0.4, 0.1, 0.5], [0.5, 0.1, 0.5]], np.float32)
    assert metrics.auroc(y, s) == pytest.approx(0.75)
    assert metrics.accuracy(y, s) == pytest.approx(0.75)
    assert metrics.f1(y, s) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(np.isnan(metrics.auroc_per_class(y, s)), [False, True, True])
    left = metrics.left_out_classes(y, s, ["a", "b", "c"])
    assert left == {"b": NO_POSITIVE, "c": "no negative in the evaluated split"}
    rows = classification_metrics(torch.from_numpy(s), torch.from_numpy(y), "multilabel", ["a", "b", "c"])
    assert rows == {"auroc": pytest.approx(0.75), "acc": pytest.approx(0.75), "f1": pytest.approx(2 / 3),
                    "auroc/a": pytest.approx(0.75)}  # fmt: skip


def test_multiclass_absent_class_is_left_out() -> None:
    # class 1 never occurs. One-vs-rest AUROC: class 0 scores .7 .5 vs .2 .1 -> 1; class 2 scores .6 .2 vs
    # .1 .3 -> 3/4; macro 7/8. Argmax 0 0 2 1 -> top-1 ACC 3/4. F1: class 0 = 1, class 2 = 2/3 -> 5/6.
    y = np.array([0, 0, 2, 2])
    s = np.array([[0.7, 0.2, 0.1], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]], np.float32)
    assert metrics.classification_type(y, s) == "multiclass"
    assert metrics.auroc(y, s) == pytest.approx(7 / 8)
    assert metrics.accuracy(y, s) == pytest.approx(3 / 4)
    assert metrics.f1(y, s) == pytest.approx(5 / 6)
    assert metrics.left_out_classes(y, s, ["x", "y", "z"]) == {"y": NO_POSITIVE}


def test_binary_and_degenerate_splits() -> None:
    y = np.array([0, 1, 1, 0])
    s = np.array([0.1, 0.8, 0.3, 0.4], np.float32)  # positives .8 .3 vs .1 .4 -> 3/4
    assert metrics.classification_type(y, s) == "binary" == metrics.classification_type(y, s[:, None])
    assert metrics.auroc(y, s) == pytest.approx(0.75) and metrics.accuracy(y, s) == pytest.approx(0.75)
    assert math.isnan(metrics.auroc(np.zeros(4), s))
    assert metrics.left_out_classes(np.zeros(4), s, ["normal", "pneumonia"]) == {"pneumonia": NO_POSITIVE}
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*shape \(4, 3\)"):
        metrics.classification_type(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(KeyError, match="use auroc, acc, f1"):
        metrics.metric_value({"id": y, "target": y, "score": s}, "map")


def test_segmentation_class_without_a_defined_value_is_left_out() -> None:
    p = {
        "id": np.arange(3),
        "class_names": np.array(["a", "b"]),
        "dice": np.array([[1, np.nan], [0.5, np.nan], [0, np.nan]]),
    }
    assert metrics.metric_value(p, "dice") == pytest.approx(0.5) == metrics.metric_value(p, "dice/a")
    assert math.isnan(metrics.metric_value(p, "dice/b"))
    assert metrics.segmentation_left_out(p) == {"b": "no test sample with a defined dice"}
    hd = {**p, "hd95": np.array([[2.0, np.inf], [4.0, 1.0], [np.nan, 3.0]])}
    assert metrics.metric_value(hd, "hd95/a") == 3.0 and metrics.metric_value(hd, "hd95") == 2.5


# ---- ranges and intervals --------------------------------------------------------------------------------
def test_metric_ranges_and_clipping() -> None:
    for m in ("auroc", "auroc/effusion", "acc", "f1", "dice", "dice/WT", "i2t_r1", "t2i_r10", "r_mean"):
        assert metrics.metric_range(m) == (0.0, 1.0)
    assert metrics.metric_range("i2t_medr") == (1.0, math.inf) and metrics.metric_range("hd95/ET") == (0.0, math.inf)
    assert metrics.metric_range("val_loss") == (-math.inf, math.inf)
    assert metrics.clip_interval("dice", -0.058, 0.563) == (0.0, 0.563)
    assert metrics.clip_interval("auroc", -1.5, 1.2, difference=True) == (-1.0, 1.0)
    assert metrics.clip_interval("t2i_medr", 0.2, 7.0) == (1.0, 7.0)
    lo, hi = metrics.clip_interval("dice", math.nan, math.nan)
    assert math.isnan(lo) and math.isnan(hi)


def _rows(metric: str, values: list[float]) -> pd.DataFrame:
    """Rows as ``load_rows`` returns them (every ``ResultRow`` column; the ones not given are NaN)."""
    return pd.DataFrame.from_records(
        [
            {"method": "m", "task": "t", "kind": "segmentation", "spatial_dims": 3, "protocol": "finetune",
             "label_fraction": 0.1, "metric": metric, "task_version": "1", "seed": s, "value": v,
             "impl_source": "baseline", "primary": True, "higher_is_better": metric != "i2t_medr",
             "date": f"2026-01-0{s + 1}"}
            for s, v in enumerate(values)
        ],
        columns=[f.name for f in fields(ResultRow)],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("metric", "values", "low", "high"),
    [
        # mean .2, sd .1, t(.975, 2) = 4.3027 -> half .2484: [-.048, .448] -> [0, .448]
        ("dice", [0.1, 0.3, 0.2], 0.0, 0.2 + 0.24842),
        # mean .98, sd .02 -> half .0497: [.930, 1.030] -> [.930, 1]
        ("auroc", [0.96, 0.98, 1.0], 0.98 - 0.04968, 1.0),
        # mean 4/3, sd .5774 -> half 1.4342: [-.10, 2.77] -> [1, 2.77]
        ("i2t_medr", [1.0, 1.0, 2.0], 1.0, 4 / 3 + 1.43425),
    ],
)
def test_leaderboard_interval_stays_in_the_metric_range(metric: str, values: list, low: float, high: float) -> None:
    row = build_leaderboard(_rows(metric, values)).iloc[0]
    assert row["ci95_low"] == pytest.approx(low, abs=1e-4) and row["ci95_high"] == pytest.approx(high, abs=1e-4)


# ---- a row's value is what compare and report use, for every task kind ------------------------------------
def _classification_rows(task_type: str, names: list[str]) -> Callable[[dict], dict[str, float]]:
    def rows(p: dict) -> dict[str, float]:
        return classification_metrics(torch.from_numpy(p["score"]), torch.from_numpy(p["target"]), task_type, names)

    return rows


def _multilabel(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    y = (rng.random((n, 3)) < 0.4).astype(np.float32)
    y[:, 1] = 0  # no positive of class b in this test split
    return {"target": y, "score": (y + rng.normal(0, 0.8, y.shape)).clip(0, 1).astype(np.float32)}


def _multiclass(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    y = rng.choice([0, 2, 3], n)  # class 1 is absent from this test split
    logits = np.eye(4)[y] * 2 + rng.normal(0, 1, (n, 4))
    return {"target": y, "score": (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)}


def _retrieval(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    sim = torch.from_numpy(np.round(rng.normal(size=(n, n)) + 1.5 * np.eye(n), 1))  # rounded: ties on purpose
    (ri, ti), (rt, tt) = true_match_ranks(sim), true_match_ranks(sim.T)
    return {"rank_i2t": ri, "ties_i2t": ti, "rank_t2i": rt, "ties_t2i": tt}


def _segmentation(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    dice = rng.random((n, 3)).astype(np.float32)
    dice[rng.random((n, 3)) < 0.2] = np.nan  # cases without a defined Dice
    return {"dice": dice, "class_names": np.array(["WT", "TC", "ET"])}


def _seg_rows(phantom_cache: Path) -> Callable[[dict], dict[str, float]]:
    dm = PhantomDataModule("mri", size=32, n_train=4, n_val=2, n_test=2, cache_dir=str(phantom_cache), target="mask")
    regions = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    return Segmentation(
        dm, metrics=["dice", "dice/WT", "dice/TC", "dice/ET"], primary="dice", regions=regions
    ).summarise


KINDS = {  # task name -> (kind, predictions maker, compare's metrics)
    "ml_cls": ("classification", _multilabel, ["auroc", "acc", "f1"]),
    "mc_cls": ("classification", _multiclass, ["auroc", "acc", "f1"]),
    "cxr_zeroshot": ("zeroshot", _multilabel, ["auroc", "acc", "f1"]),
    "ret": ("retrieval", _retrieval, ["i2t_r1", "t2i_r5", "i2t_medr", "r_mean"]),
    "seg": ("segmentation", _segmentation, ["dice", "dice/WT", "dice/ET"]),
}


def _write_cell(root: Path, task: str, kind: str, method: str, seed: int, values: dict, preds: dict) -> None:
    """A cell as ``run.evaluate`` writes it: JSON rows (one per metric) and the predictions npz."""
    name = cell_name(method, task, "linear", 1.0, seed)
    common = {"method": method, "impl_source": "baseline", "task": task, "task_version": "1", "kind": kind,
              "spatial_dims": 2, "protocol": "linear", "label_fraction": 1.0, "seed": seed,
              "date": "2026-01-01T00:00:00+00:00", "n_test": len(preds["id"])}  # fmt: skip
    rows = [{**common, "metric": m, "value": v, "primary": m == next(iter(values)), "higher_is_better": "medr" not in m}
            for m, v in values.items()]  # fmt: skip
    (root / "runs").mkdir(parents=True, exist_ok=True)
    (root / "runs" / f"{name}.json").write_text(json.dumps({"rows": rows}, allow_nan=True))
    save_predictions(root / "predictions" / f"{name}.npz", **preds)


@pytest.mark.parametrize("task", list(KINDS))
def test_row_value_is_what_compare_report_and_leaderboard_use(task: str, tmp_path: Path, phantom_cache: Path) -> None:
    kind, make, compared = KINDS[task]
    row_fn = {
        "ml_cls": _classification_rows("multilabel", ["a", "b", "c"]),
        "mc_cls": _classification_rows("multiclass", ["w", "x", "y", "z"]),
        "cxr_zeroshot": _classification_rows("multilabel", ["a", "b", "c"]),
        "ret": retrieval_metrics,
        "seg": _seg_rows(phantom_cache) if task == "seg" else None,
    }[task]
    rng, n = np.random.default_rng(len(task)), 40
    row_values: dict[tuple[str, int], dict[str, float]] = {}
    for method in ("a", "b"):
        for seed in (0, 1, 2):
            preds = {"id": np.array([f"s{i:03d}" for i in range(n)]), **make(rng, n)}
            values = row_fn(preds)
            if "score" in preds:  # the classification tasks' rows, including one split with a class left out
                assert metrics.left_out_classes(preds["target"], preds["score"], [])
            row_values[method, seed] = values
            _write_cell(tmp_path, task, kind, method, seed, {m: values[m] for m in compared}, preds)
    lb = build_leaderboard(load_rows(tmp_path / "runs"))
    for metric in compared:
        df = stats.compare(tmp_path, "a", "b", task, "linear", 1.0, metric=metric, n_boot=20)
        for r in df[df["seed"] != "pooled"].itertuples():
            assert r.value_a == row_values["a", int(r.seed)][metric], (metric, r.seed)
            assert r.value_b == row_values["b", int(r.seed)][metric], (metric, r.seed)
        pooled = df[df["seed"] == "pooled"].iloc[0]
        board = lb[lb["metric"] == metric].set_index("method")["mean"]
        assert pooled["value_a"] == pytest.approx(board["a"], rel=1e-12)
        assert pooled["value_b"] == pytest.approx(board["b"], rel=1e-12)
        if metric == "auroc":  # DeLong: the difference is exactly the difference of the row values
            assert pooled["diff"] == pytest.approx(board["a"] - board["b"], rel=1e-12)
    done, skipped = paired_rows(tmp_path, lb[lb["primary"]], "b", 0.95, n_boot=20)
    assert not skipped and len(done) == 1
    primary = compared[0]
    assert done[0]["metric"] == primary
    assert done[0]["value_a"] == pytest.approx(lb[(lb["metric"] == primary) & (lb["method"] == "a")]["mean"].iloc[0])


# ---- the tasks themselves, on a test split without a positive of one class ---------------------------------
def _ctx(tmp_path: Path) -> EvalContext:
    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 1, "progress": "none"})
    return EvalContext(make_trainer=functools.partial(make_trainer, cfg, None, True), seed=0, work_dir=tmp_path)


@pytest.mark.parametrize("kind", ["classification", "zeroshot"])
def test_task_rows_leave_out_a_class_without_positive(kind: str, phantom_cache: Path, tmp_path: Path) -> None:
    # the first 6 test phantoms of this size have no nodule (labels are a pure function of the index)
    dm = PhantomDataModule("cxr", size=32, n_train=8, n_val=4, n_test=6, cache_dir=str(phantom_cache), batch_size=4)
    torch.manual_seed(0)
    declared = {"metrics": ["auroc", "acc", "f1"], "primary": "auroc"}
    if kind == "classification":
        method = Scratch(build_image_encoder("resnet_tiny", 2, 1))
        task = Classification(dm, label_fraction=1.0, max_epochs=2, patience=1, batch_size=4, **declared)
    else:
        method = CLIP(build_image_encoder("resnet_tiny", 2, 1), build_text_encoder("bert_tiny"), embed_dim=16)
        prompts = compose("run", ["method=clip", "task=phantom_cxr_zeroshot"]).task.class_prompts
        task = ZeroShot(dm, class_prompts=prompts, **declared)
    res = task.evaluate(method, _ctx(tmp_path))
    assert res.extra["left_out_classes"] == {"nodule": NO_POSITIVE}
    assert "auroc/nodule" not in res.metrics and "auroc/effusion" in res.metrics
    for m in ("auroc", "acc", "f1"):
        assert res.metrics[m] == metrics.metric_value(res.predictions, m), m  # what compare recomputes
    per = metrics.auroc_per_class(res.predictions["target"], res.predictions["score"])
    assert res.metrics["auroc"] == pytest.approx(float(np.nanmean(per)), abs=1e-12)
