"""Proof of learning: the held-out proxy against chance, by hand, and recorded by a real pre-training run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_clip_pretrain, tiny_data
from scipy.stats import binom

from medvlp_bench import proxy


def test_retrieval_hits_match_hand_counts() -> None:
    # 4 pairs; image i is closest to text i except image 3, whose true text ranks 2nd (text 0 is closer)
    txt = torch.eye(4)
    img = torch.eye(4).clone()
    img[3] = F.normalize(torch.tensor([0.9, 0.0, 0.0, 0.5]), dim=0)
    r = proxy.retrieval_hits(img, txt, ks=(1, 2))
    assert r["i2t_r1"] == 0.75 and r["i2t_r2"] == 1.0
    # text 0's true image (0, score 1.0) still beats image 3 (0.87): every t2i query ranks its image first
    assert r["t2i_r1"] == 1.0
    assert r["hits"] == 8 and r["n"] == 4  # R@2 hits, both ways


def test_retrieval_verdict_is_a_one_sided_binomial_test_against_k_over_n() -> None:
    n, k = 100, 10
    p_chance, ok = proxy.retrieval_verdict(hits=20, n=n, k=k)  # exactly the expected 2n * k/n hits
    assert not ok and p_chance == pytest.approx(binom.sf(19, 2 * n, k / n))
    p_good, ok = proxy.retrieval_verdict(hits=40, n=n, k=k)
    assert ok and p_good < 1e-4
    assert proxy.retrieval_verdict(hits=20, n=10, k=10) == (1.0, None)  # k >= n: nothing to test


def test_gain_verdict_needs_a_real_drop() -> None:
    assert proxy.gain_verdict(0.90, 1.0)
    assert not proxy.gain_verdict(0.97, 1.0)  # under MIN_GAIN
    assert not proxy.gain_verdict(float("nan"), 1.0)


class _LossOnly(torch.nn.Module):
    """A method without a text tower or own proxy: its loss is the mean of its input times a weight."""

    has_text_tower = False

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    @property
    def device(self) -> torch.device:
        return self.w.device

    def proxy_score(self, loader: Any) -> None:
        return None

    def pretrain_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self.w * batch["image"].mean()}


def test_val_loss_fallback_compares_with_the_start_of_the_run() -> None:
    m = _LossOnly()
    loader = [{"image": torch.full((2, 1), 2.0)}, {"image": torch.full((4, 1), 5.0)}]
    first = proxy.score(m, loader)
    assert first.kind == "val_loss" and first.values["val_loss"] == pytest.approx((2 * 2 + 4 * 5) / 6)
    assert first.learned is None  # no reference yet
    with torch.no_grad():
        m.w.fill_(0.5)
    later = proxy.score(m, loader, {"val_loss": first.values["val_loss"]})
    assert later.values["val_loss"] == pytest.approx(2.0) and later.learned is True
    assert m.training  # mode restored


def test_pretraining_records_the_proxy_and_its_curve(workdir: Path) -> None:
    from medvlp_bench.config import compose
    from medvlp_bench.run import pretrain

    epochs = 2
    cfg = compose("pretrain", tiny_clip_pretrain(epochs))
    folder = pretrain(cfg)
    info = json.loads((folder / "config.json").read_text())["proxy"]
    assert info["kind"] == "retrieval"
    n = info["n"]["all"]
    assert n == 12  # the validation split of tiny_data
    assert info["reference"] == {"chance_r1": 1 / n, "chance_r10": 10 / n}
    assert [c["epoch"] for c in info["curve"]] == [-1, *range(epochs)]
    assert all(0.0 <= v <= 1.0 for v in info["values"].values())
    assert isinstance(info["learned"], bool) and 0.0 <= info["p_value"]["all"] <= 1.0
    assert math.isclose(info["values"]["i2t_r1"], info["curve"][-1]["i2t_r1"])


def test_rows_carry_learned_and_the_text_tower(workdir: Path) -> None:
    from helpers import TINY

    from medvlp_bench.cell import resolve
    from medvlp_bench.run import evaluate

    common = ["task=phantom_cxr_cls", "task.data.size=32", "task.label_fraction=0.5", *TINY, *tiny_data()]
    clip_rows = evaluate(resolve(["method=clip", *common]))
    (ckpt_cfg,) = (workdir / "cache" / "checkpoints").glob("clip__*/config.json")
    learned = json.loads(ckpt_cfg.read_text())["proxy"]["learned"]
    assert isinstance(learned, bool)
    assert {r.learned for r in clip_rows} == {learned}
    assert {r.text_encoder for r in clip_rows} == {"bert_tiny"}
    (cell,) = (workdir / "results" / "runs").glob("*clip*.json")
    stored = json.loads(cell.read_text())["pretraining"]
    assert stored["proxy"]["kind"] == "retrieval" and "curve" not in stored["proxy"] and stored["encoder_shift"] > 0
    # the pre-training's own wall time travels with every cell that reuses it (the suite's cost, once per checkpoint)
    ckpt_info = json.loads(ckpt_cfg.read_text())
    assert 0 < ckpt_info["wall_time_s"] < clip_rows[0].wall_time_s  # the first cell trained it, and then evaluated
    assert stored["wall_time_s"] == ckpt_info["wall_time_s"] and stored["device"].startswith("cpu (")

    scratch_rows = evaluate(resolve(["method=scratch", *common]))
    assert {r.learned for r in scratch_rows} == {None} and {r.text_encoder for r in scratch_rows} == {None}


def test_leaderboard_marks_lines_whose_pretraining_did_not_learn() -> None:
    import pandas as pd

    from medvlp_bench.results import build_leaderboard, leaderboard_markdown

    base = dict(
        impl_source="baseline", task="t", task_version=1, kind="classification", spatial_dims=2, protocol="linear",
        label_fraction=0.01, metric="auroc", higher_is_better=True, primary=True, date="2026-01-01",
        method_version=1, text_encoder="bert_tiny",
    )  # fmt: skip
    rows = pd.DataFrame(
        [
            {**base, "method": "a", "seed": 0, "value": 0.6, "learned": True},
            {**base, "method": "a", "seed": 1, "value": 0.7, "learned": False},
            {**base, "method": "b", "seed": 0, "value": 0.8, "learned": True},
            {**base, "method": "c", "seed": 0, "value": 0.5, "learned": None, "text_encoder": None},
        ]
    )
    lb = build_leaderboard(rows).set_index("method")
    assert lb.loc["a", "learned"] is False or lb.loc["a", "learned"] == False  # noqa: E712 (numpy bool)
    assert lb.loc["b", "learned"] == True and lb.loc["c", "learned"] is None  # noqa: E712
    md = leaderboard_markdown(build_leaderboard(rows))
    assert "| a (not learned) |" in md and "| b |" in md and "| c |" in md


def test_report_table_shows_learned(tmp_path: Path) -> None:
    import pandas as pd

    from medvlp_bench.report import _leaderboard_table

    g = pd.DataFrame(
        [
            dict(method="a", method_version=2, learned=False, protocol="linear", label_fraction=0.01, mean=0.6,
                 std=0.1, ci95_low=0.4, ci95_high=0.8, n_seeds=3, impl_source="paper", higher_is_better=True),
            dict(method="scratch", method_version=1, learned=None, protocol="linear", label_fraction=0.01, mean=0.5,
                 std=0.1, ci95_low=0.4, ci95_high=0.6, n_seeds=3, impl_source="baseline", higher_is_better=True),
        ]
    )  # fmt: skip
    html = _leaderboard_table("t", g)
    assert "a v2 (not learned)" in html and ">NO<" in html and ">—<" in html


class _NoData:
    """A datamodule whose validation split must not be read."""

    def val_dataloader(self) -> None:
        raise AssertionError("scored again")


def test_a_resumed_run_keeps_its_start_and_curve() -> None:
    first = proxy.ProxyCallback(_NoData())
    first.start, first.curve = {"val_loss": 2.0}, [{"epoch": -1, "val_loss": 2.0}, {"epoch": 0, "val_loss": 1.5}]
    first.last = {"kind": "val_loss", "values": {"val_loss": 1.5}, "reference": {}, "learned": True}
    resumed = proxy.ProxyCallback(_NoData())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # plain data: weights_only loads it
    resumed.on_train_start(None, None)  # type: ignore[arg-type]  # restored: the start is not re-scored
    assert resumed.start == {"val_loss": 2.0} and resumed.summary() == first.summary()


def test_the_loss_proxy_is_skipped_on_several_ranks() -> None:
    m = _LossOnly()
    loader = [{"image": torch.ones(2, 1)}]
    out = proxy.score(m, loader, allow_loss=False)  # pretrain_step may gather: rank 0 alone would hang
    assert out.learned is None and out.values == {} and "one process" in out.detail["skipped"]


def test_rows_keep_the_version_a_checkpoint_was_trained_at() -> None:
    from medvlp_bench.run import checkpoint_version

    class _V2(torch.nn.Module):
        version = 2

    m = _V2()
    assert checkpoint_version(m) == 2  # seeded init or an imported release: the class's version
    m.provenance = {"pretrain_key": "abc"}  # our checkpoint from before versions existed
    assert checkpoint_version(m) == 1
    m.provenance = {"pretrain_key": "abc", "method_version": 2}
    assert checkpoint_version(m) == 2
