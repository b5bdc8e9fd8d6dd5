"""Paired statistics: DeLong against hand computations, brute force and sklearn; bootstrap; compare()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchmetrics.functional as tmf
from sklearn.metrics import roc_auc_score

from medvlp_bench import stats
from medvlp_bench.results import cell_name, save_predictions


def brute_delong(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Textbook DeLong: the explicit psi matrix over all positive/negative pairs."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    return float(psi.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_delong_hand_example() -> None:
    # pairs (pos, neg): (.9,.6) (.9,.1) (.4,.1) correct, (.4,.6) wrong -> AUC 3/4
    # V10 = [1, .5], V01 = [.5, 1] -> S10 = S01 = .125 -> var = .125/2 + .125/2 = .125
    y = np.array([1, 1, 0, 0])
    a = np.array([0.9, 0.4, 0.6, 0.1])
    auc, phi = stats.delong_components(y, a)
    assert auc == pytest.approx(0.75)
    assert np.sum(phi**2) == pytest.approx(0.125)
    # B separates perfectly: V10_b = V01_b = 1, no covariance with A -> var(A - B) = .125
    b = np.array([0.8, 0.7, 0.3, 0.2])
    row = stats.delong(y, a, b).iloc[0]
    assert row["auc_a"] == pytest.approx(0.75) and row["auc_b"] == pytest.approx(1.0)
    assert row["se"] == pytest.approx(math.sqrt(0.125))
    assert row["p_value"] == pytest.approx(2 * (1 - 0.7602499389), abs=1e-6)  # z = -.25 / .35355 = -.7071


def test_delong_matches_brute_force_and_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(size=60) + y, 1)  # rounded: ties on purpose
    auc, phi = stats.delong_components(y, s)
    ref_auc, ref_var = brute_delong(y, s)
    assert auc == pytest.approx(ref_auc) == pytest.approx(roc_auc_score(y, s))
    assert np.sum(phi**2) == pytest.approx(ref_var)


def test_delong_paired_covariance_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    a, b = rng.normal(size=40) + y, rng.normal(size=40) + 0.5 * y
    pos, neg = y == 1, y == 0
    psi_a = (a[pos][:, None] > a[neg][None, :]).astype(float)
    psi_b = (b[pos][:, None] > b[neg][None, :]).astype(float)
    cov10 = np.cov(psi_a.mean(1), psi_b.mean(1))[0, 1] / pos.sum()
    cov01 = np.cov(psi_a.mean(0), psi_b.mean(0))[0, 1] / neg.sum()
    var = brute_delong(y, a)[1] + brute_delong(y, b)[1] - 2 * (cov10 + cov01)
    assert stats.delong(y, a, b).iloc[0]["se"] ** 2 == pytest.approx(var)


def test_macro_auroc_matches_sklearn_and_torchmetrics() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (50, 3))
    s = rng.random((50, 3)) + 0.3 * y
    table = stats.delong(y, s)
    assert list(table["class"]) == [0, 1, 2, "macro"]
    assert table["auc_a"].iloc[-1] == pytest.approx(roc_auc_score(y, s, average="macro"))
    tm = tmf.auroc(torch.tensor(s), torch.tensor(y), task="multilabel", num_labels=3, average="macro")
    assert table["auc_a"].iloc[-1] == pytest.approx(float(tm), abs=1e-6)
    yc = rng.integers(0, 3, 50)
    sc = rng.dirichlet(np.ones(3), 50)
    ovr = stats.auroc_per_class(yc, sc).mean()
    assert ovr == pytest.approx(roc_auc_score(yc, sc, multi_class="ovr", average="macro"))


def test_delong_perfect_and_identical() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    table = stats.delong(y, y.astype(float))
    assert table.iloc[0]["auc_a"] == 1.0
    same = stats.delong(y, np.arange(6.0), np.arange(6.0)).iloc[0]
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_paired_bootstrap_null_and_clear_difference() -> None:
    rng = np.random.default_rng(3)
    good = rng.random(80) < 0.9
    bad = rng.random(80) < 0.4
    res = stats.paired_bootstrap(lambda i: good[i].mean() - good[i].mean(), 80, n_boot=200)
    assert res.estimate == 0 and res.p_value == 1.0
    res = stats.paired_bootstrap(lambda i: good[i].mean() - bad[i].mean(), 80, n_boot=500, seed=1)
    assert res.estimate == pytest.approx(good.mean() - bad.mean())
    assert res.p_value < 0.01 and 0 < res.ci_low < res.estimate < res.ci_high
    again = stats.paired_bootstrap(lambda i: good[i].mean() - bad[i].mean(), 80, n_boot=500, seed=1)
    assert again == res  # seeded


def test_metric_values_perfect_and_chance() -> None:
    n = 10
    perfect = {"id": np.arange(n), "rank_i2t": np.ones(n), "ties_i2t": np.zeros(n)}
    perfect |= {"rank_t2i": np.ones(n), "ties_t2i": np.zeros(n)}
    assert stats.metric_value(perfect, "i2t_r1") == 1.0 and stats.metric_value(perfect, "r_mean") == 1.0
    const = {"id": np.arange(n), "rank_i2t": np.full(n, (n + 1) / 2), "ties_i2t": np.full(n, n - 1)}
    const |= {"rank_t2i": const["rank_i2t"], "ties_t2i": const["ties_i2t"]}
    assert stats.metric_value(const, "t2i_r5") == pytest.approx(5 / n)
    assert stats.metric_value(const, "i2t_medr") == (n + 1) / 2
    seg = {
        "id": np.arange(3),
        "dice": np.array([[1.0, np.nan], [0.5, 0.0], [0.0, 1.0]]),
        "class_names": np.array(["a", "b"]),
    }
    assert stats.metric_value(seg, "dice/a") == pytest.approx(0.5)
    assert stats.metric_value(seg, "dice/b") == pytest.approx(0.5)
    assert stats.metric_value(seg, "dice") == pytest.approx(0.5)
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    cls = {"id": np.arange(4), "target": y, "score": y.astype(np.float32)}
    assert stats.metric_value(cls, "auroc") == 1.0 and stats.metric_value(cls, "acc") == 1.0
    assert stats.metric_value(cls | {"score": np.full((4, 2), 0.3, np.float32)}, "auroc") == 0.5
    with pytest.raises(KeyError, match="unknown retrieval metric"):
        stats.metric_value(perfect, "map")


def _write_cell(results: Path, method: str, task: str, seed: int, preds: dict, primary: str) -> None:
    name = cell_name(method, task, "linear", 0.1, seed)
    save_predictions(results / "predictions" / f"{name}.npz", **preds)
    rows = [{"metric": primary, "primary": True}, {"metric": "acc", "primary": False}]
    (results / "runs").mkdir(parents=True, exist_ok=True)
    (results / "runs" / f"{name}.json").write_text(json.dumps({"rows": rows}))


def _toy_results(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    n = 60
    y = rng.integers(0, 2, (n, 2)).astype(np.float32)
    ids = np.array([f"s{i:03d}" for i in range(n)])
    for seed in (0, 1, 2):
        good = (y + rng.normal(0, 0.4, y.shape)).astype(np.float32)
        bad = (y + rng.normal(0, 2.0, y.shape)).astype(np.float32)
        perm = rng.permutation(n)  # B stores its samples in another order: compare() must align by id
        _write_cell(tmp_path, "good", "toy", seed, {"id": ids, "target": y, "score": good}, "auroc")
        if seed < 2:  # B has only seeds 0 and 1
            _write_cell(tmp_path, "bad", "toy", seed, {"id": ids[perm], "target": y[perm], "score": bad[perm]}, "auroc")
    return tmp_path


def test_compare_rows_per_seed_and_pooled(tmp_path: Path) -> None:
    results = _toy_results(tmp_path)
    df = stats.compare(results, "good", "bad", "toy")  # protocol and fraction inferred (one combination)
    assert list(df["seed"]) == ["0", "1", "pooled"]
    assert set(df["test"]) == {"delong"} and set(df["metric"]) == {"auroc"}
    assert (df["diff"] > 0).all() and (df["p_value"] < 0.05).all()
    assert df["diff"].iloc[-1] == pytest.approx(df["diff"].iloc[:2].mean())
    assert (df["ci_low"] < df["diff"]).all() and (df["diff"] < df["ci_high"]).all()
    boot = stats.compare(results, "good", "bad", "toy", "linear", 0.1, metric="acc", n_boot=200)
    assert set(boot["test"]) == {"bootstrap"} and boot["n_test"].iloc[0] == 60


def test_compare_errors_are_clear(tmp_path: Path) -> None:
    results = _toy_results(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nobody has \[\]"):
        stats.compare(results, "good", "nobody", "toy", "linear", 0.1)
    with pytest.raises(ValueError, match="DeLong"):
        stats.compare(results, "good", "bad", "toy", metric="acc", test="delong")


def test_main_compare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _toy_results(tmp_path)
    assert stats.main_compare(["good", "bad", "task=toy", "--results", str(results), "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("task,protocol") and "pooled" in out
    assert stats.main_compare(["good", "bad", "tsk=toy", "--results", str(results)]) == 2
    assert "bad option" in capsys.readouterr().err


def test_delong_auc_interval_stays_in_unit_range() -> None:
    # positives .9 .8 .3, negatives .4 .2 .1: V10 = [1, 1, 2/3], V01 = [2/3, 1, 1] -> AUC 8/9,
    # S10 = S01 = 1/27 -> var = 2/81, se = sqrt(2)/9; 8/9 + 1.96 se = 1.197 leaves [0, 1] and is clipped to 1
    y = np.array([1, 1, 1, 0, 0, 0])
    row = stats.delong(y, np.array([0.9, 0.8, 0.3, 0.4, 0.2, 0.1])).iloc[0]
    assert row["auc_a"] == pytest.approx(8 / 9) and row["se"] == pytest.approx(math.sqrt(2) / 9)
    assert row["ci_low"] == pytest.approx(8 / 9 - 1.959964 * math.sqrt(2) / 9) and row["ci_high"] == 1.0
