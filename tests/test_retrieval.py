"""Retrieval and zero-shot classification: rank and probability functions, then tiny CLIP runs on phantoms."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchmetrics.retrieval import RetrievalRecall

from medvlp_bench.config import compose, instantiate
from medvlp_bench.datasets.phantoms import PhantomDataModule
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.methods.clip import CLIP
from medvlp_bench.methods.scratch import Scratch
from medvlp_bench.run import make_trainer
from medvlp_bench.stats import metric_value
from medvlp_bench.task import EvalContext
from medvlp_bench.tasks.classification import classification_metrics
from medvlp_bench.tasks.retrieval import Retrieval, retrieval_metrics, true_match_ranks
from medvlp_bench.tasks.zeroshot import ZeroShot, prompt_lists, zeroshot_probs
from medvlp_bench.text import build_text_encoder

RETRIEVAL_METRICS = ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "r_mean"]


def _preds(sim: torch.Tensor) -> dict[str, np.ndarray]:
    r1, t1 = true_match_ranks(sim)
    r2, t2 = true_match_ranks(sim.T)
    return {"id": np.arange(len(sim)), "rank_i2t": r1, "ties_i2t": t1, "rank_t2i": r2, "ties_t2i": t2}


def test_ranks_hand_example_and_ties() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.2], [0.1, 0.3, 0.0]])
    rank, ties = true_match_ranks(sim)
    # row 0: true .9 is best -> 1; row 1: .8 higher, .2 ties itself once -> 1 + 1 + 0.5; row 2: 0.0 lowest -> 3
    np.testing.assert_allclose(rank, [1.0, 2.5, 3.0])
    np.testing.assert_array_equal(ties, [0, 1, 0])
    assert true_match_ranks(sim, chunk=2)[0].tolist() == rank.tolist()  # blocks give the same ranks


def test_perfect_and_constant_scorers() -> None:
    n = 20
    perfect = retrieval_metrics(_preds(torch.eye(n)))
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == perfect["r_mean"] == 1.0 and perfect["i2t_medr"] == 1.0
    const = retrieval_metrics(_preds(torch.ones(n, n)))
    for k in (1, 5, 10):
        assert const[f"i2t_r{k}"] == pytest.approx(k / n) and const[f"t2i_r{k}"] == pytest.approx(k / n)
    assert const["t2i_medr"] == pytest.approx((n + 1) / 2)


def test_recall_matches_torchmetrics_without_ties() -> None:
    torch.manual_seed(0)
    n = 30
    sim = torch.randn(n, n) + 2 * torch.eye(n)
    ours = retrieval_metrics(_preds(sim))
    indexes = torch.arange(n).repeat_interleave(n)
    target = torch.eye(n, dtype=torch.bool).flatten()
    for k in (1, 5, 10):
        tm = RetrievalRecall(top_k=k)(sim.flatten(), target, indexes=indexes)
        assert ours[f"i2t_r{k}"] == pytest.approx(float(tm))
        tm_t = RetrievalRecall(top_k=k)(sim.T.flatten(), target, indexes=indexes)
        assert ours[f"t2i_r{k}"] == pytest.approx(float(tm_t))


def test_zeroshot_probs_perfect_constant_and_multiclass() -> None:
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]).float()
    pos, neg = torch.eye(2), -torch.eye(2)  # class c's positive prompt points along axis c
    img = F.normalize(y * 2 - 1, dim=-1)  # each image leans towards the prompts of its own findings
    probs = zeroshot_probs(img, torch.cat([pos, neg]), "multilabel")
    assert classification_metrics(probs, y, "multilabel", ["a", "b"])["auroc"] == 1.0
    const = zeroshot_probs(img, torch.ones(4, 2) / 2**0.5, "multilabel")
    assert torch.allclose(const, torch.full_like(const, 0.5))
    assert classification_metrics(const, y, "multilabel", ["a", "b"])["auroc"] == 0.5
    mc = zeroshot_probs(torch.eye(3), torch.eye(3), "multiclass")
    assert torch.allclose(mc.sum(1), torch.ones(3)) and mc.argmax(1).tolist() == [0, 1, 2]


def test_prompt_lists_order_and_errors() -> None:
    prompts = {"b": {"positive": ["B"], "negative": ["no B"]}, "a": {"positive": ["A", "a"], "negative": ["no A"]}}
    assert prompt_lists(prompts, ["a", "b"], "multilabel") == [["A", "a"], ["B"], ["no A"], ["no B"]]
    assert prompt_lists({"x": ["X"], "y": ["Y"]}, ["x", "y"], "multiclass") == [["X"], ["Y"]]
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        prompt_lists({"a": prompts["a"]}, ["a", "b"], "multilabel")
    with pytest.raises(ValueError, match="'positive' and 'negative'"):
        prompt_lists({"a": ["A"]}, ["a"], "multilabel")


# ---- tiny end-to-end runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(build_image_encoder("resnet_tiny", 2, 1), build_text_encoder("bert_tiny"), embed_dim=32)


def _ctx(tmp_path: Path) -> EvalContext:
    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 1, "progress": "none"})
    return EvalContext(make_trainer=functools.partial(make_trainer, cfg, None, True), seed=0, work_dir=tmp_path)


def _cxr(cache: Path, method: CLIP) -> PhantomDataModule:
    """Phantom X-rays built complete: with the tokenizer of the method they feed."""
    return PhantomDataModule(
        "cxr", size=32, n_train=8, n_val=4, n_test=12, cache_dir=str(cache), eval_batch_size=5,
        tokenizer=method.text_encoder.tokenizer,
    )  # fmt: skip


def test_retrieval_on_phantoms(tiny_clip: CLIP, phantom_cache: Path, tmp_path: Path) -> None:
    dm = _cxr(phantom_cache, tiny_clip)
    task = Retrieval(dm, metrics=RETRIEVAL_METRICS, primary="r_mean")
    assert task.skip_reason(tiny_clip) is None
    assert "no text tower" in task.skip_reason(Scratch(build_image_encoder("resnet_tiny", 2, 1)))
    res = task.evaluate(tiny_clip, _ctx(tmp_path))
    assert set(RETRIEVAL_METRICS) <= set(res.metrics) and res.n_test == 12
    assert all(0 <= res.metrics[m] <= 1 for m in RETRIEVAL_METRICS if "medr" not in m)
    assert 1 <= res.metrics["i2t_medr"] <= 12
    ids = [str(r["id"]) for r in dm.rows("test")]
    assert res.predictions["id"].tolist() == ids  # every test sample once, in order, over 3 batches
    assert ((res.predictions["rank_i2t"] >= 1) & (res.predictions["rank_i2t"] <= 12)).all()
    assert res.metrics["i2t_r5"] == metric_value(res.predictions, "i2t_r5")  # compare() recomputes the same
    assert 0 <= res.extra["duplicate_report_fraction"] <= 1


def test_zeroshot_on_phantoms(tiny_clip: CLIP, phantom_cache: Path, tmp_path: Path) -> None:
    cfg = compose("run", ["method=clip", "task=phantom_cxr_zeroshot"])
    dm = _cxr(phantom_cache, tiny_clip)
    task = ZeroShot(dm, class_prompts=cfg.task.class_prompts, metrics=["auroc", "acc", "f1"], primary="auroc")
    res = task.evaluate(tiny_clip, _ctx(tmp_path))
    assert {"auroc", "acc", "f1", "auroc/effusion"} <= set(res.metrics)
    assert all(0 <= v <= 1 or np.isnan(v) for v in res.metrics.values())
    assert res.predictions["score"].shape == (12, 5)
    assert res.predictions["id"].tolist() == [str(r["id"]) for r in dm.rows("test")]


def test_retrieval_3d(phantom_cache: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = CLIP(build_image_encoder("resnet_tiny", 3, 1), build_text_encoder("bert_tiny"), embed_dim=16)
    dm = PhantomDataModule("ct", size=32, n_train=4, n_val=2, n_test=6, cache_dir=str(phantom_cache))
    task = Retrieval(dm, metrics=RETRIEVAL_METRICS, primary="r_mean")
    with pytest.raises(ValueError, match="without a tokenizer"):  # one clear line, not a KeyError on "text"
        task.evaluate(method, _ctx(tmp_path))
    dm = PhantomDataModule("ct", size=32, n_train=4, n_val=2, n_test=6, cache_dir=str(phantom_cache),
                           tokenizer=method.text_encoder.tokenizer)  # fmt: skip
    res = Retrieval(dm, metrics=RETRIEVAL_METRICS, primary="r_mean").evaluate(method, _ctx(tmp_path))
    assert res.n_test == 6 and len(set(res.predictions["id"])) == 6
    assert 0 <= res.metrics["r_mean"] <= 1


@pytest.mark.parametrize("task", ["phantom_cxr_retrieval", "phantom_ct_retrieval", "phantom_cxr_zeroshot"])
def test_configs_instantiate(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBENCH_CACHE", str(tmp_path))
    t = instantiate(compose("run", ["method=clip", f"task={task}"]).task)
    assert t.protocol == "zeroshot" and t.primary in t.metrics and t.label_fraction == 1.0
