"""Classification harness: metrics at the extremes, frozen protocol, every test sample once, feature cache."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch

from medvlp_bench.config import compose
from medvlp_bench.datasets.phantoms import PhantomDataModule
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.run import make_trainer
from medvlp_bench.task import EvalContext, state_checksum
from medvlp_bench.tasks.classification import Classification, classification_metrics


def test_metrics_perfect_and_constant_predictors() -> None:
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    perfect = classification_metrics(y.float(), y, "multilabel", ["a", "b"])
    assert perfect["auroc"] == 1.0 and perfect["acc"] == 1.0 and perfect["f1"] == 1.0
    assert perfect["auroc/a"] == perfect["auroc/b"] == 1.0
    const = classification_metrics(torch.full((4, 2), 0.3), y, "multilabel", ["a", "b"])
    assert const["auroc"] == 0.5
    yc = torch.tensor([0, 1, 2, 1])
    onehot = torch.nn.functional.one_hot(yc, 3).float()
    mc = classification_metrics(onehot, yc, "multiclass", ["x", "y", "z"])
    assert mc["auroc"] == 1.0 and mc["acc"] == 1.0
    assert classification_metrics(torch.full((4, 3), 1 / 3), yc, "multiclass", ["x", "y", "z"])["auroc"] == 0.5


def _ctx(tmp: Path, weights_key: str | None = None) -> EvalContext:
    cfg = compose("run", ["method=scratch", "task=phantom_cxr_cls", "trainer.progress=none"]).trainer
    return EvalContext(
        make_trainer=functools.partial(make_trainer, cfg, None, True, default_root_dir=str(tmp)),
        seed=0,
        work_dir=tmp,
        weights_key=weights_key,
    )


@pytest.fixture
def setup(tmp_path: Path, phantom_cache: Path) -> tuple:
    from medvlp_bench.methods.scratch import Scratch

    dm = PhantomDataModule("cxr", size=32, n_train=40, n_val=12, n_test=12, cache_dir=str(phantom_cache), batch_size=8)
    torch.manual_seed(0)
    method = Scratch(build_image_encoder("resnet_tiny", spatial_dims=2))
    task = Classification(
        dm, metrics=["auroc", "acc", "f1"], primary="auroc", label_fraction=0.25, max_epochs=3, patience=2, batch_size=8
    )
    return method, task, tmp_path


def test_linear_protocol_is_frozen_and_sees_each_test_sample_once(setup: tuple) -> None:
    method, task, tmp = setup
    before = state_checksum(method)
    res = task.evaluate(method, _ctx(tmp))
    assert state_checksum(method) == before  # weights and BatchNorm statistics unchanged
    assert set(res.metrics) == {"auroc", "acc", "f1"} | {f"auroc/{c}" for c in task.data.class_names}
    assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
    test_ids = [r["id"] for r in task.data.rows("test")]
    assert list(res.predictions["id"]) == test_ids and res.n_test == 12
    assert res.predictions["score"].shape == (12, 5) and len(res.subset_ids) >= 10


def test_frozen_features_are_cached_across_label_fractions(setup: tuple) -> None:
    method, task, tmp = setup
    calls = {"n": 0}
    orig = method.encode_image

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return orig(x)

    method.encode_image = counting
    ctx = _ctx(tmp, weights_key="test-weights-key")
    task.evaluate(method, ctx)
    first = calls["n"]
    task.label_fraction = 1.0
    res = task.evaluate(method, ctx)
    assert first > 0 and calls["n"] == first  # second fraction: no new forward passes
    assert len(res.subset_ids) == 40


def test_finetune_trains_a_copy(setup: tuple) -> None:
    method, task, tmp = setup
    task.protocol, task.max_epochs = "finetune", 1
    before = state_checksum(method)
    res = task.evaluate(method, _ctx(tmp))
    assert state_checksum(method) == before and 0.0 <= res.metrics["auroc"] <= 1.0


@pytest.mark.parametrize("setting", [{"intensity": {"type": "none"}}, {"spatial": "pad_crop"}])
def test_feature_cache_keeps_tasks_that_differ_only_in_preprocessing_apart(
    setting: dict, tmp_path: Path, phantom_cache: Path
) -> None:
    """Two tasks on the same files, one process, one set of weights: a preprocessing setting held in a dict
    (intensity) or an object (``Preprocess``: spatial, roi, orientation) must give each its own features."""
    from medvlp_bench.datasets.imagefolder import ImageFolder
    from medvlp_bench.methods.scratch import Scratch
    from tests.fixtures_writer import imagefolder

    imagefolder(tmp_path / "data", with_val=True)
    torch.manual_seed(0)
    method = Scratch(build_image_encoder("resnet_tiny", spatial_dims=2))

    def test_features(weights_key: str | None, **kw: object) -> torch.Tensor:
        dm = ImageFolder(str(tmp_path / "data"), size=16, batch_size=4, **kw)
        task = Classification(dm, metrics=["auroc", "acc", "f1"], primary="auroc", label_fraction=1.0)
        ctx = EvalContext(make_trainer=L.Trainer, seed=0, work_dir=tmp_path, weights_key=weights_key)
        plan = task._linear(method, ctx, dm.subset_ids(1.0, 0))  # extracts (or takes cached) features
        return plan.test.dataset.features

    key = f"cache-test-{setting}"
    first = test_features(key)  # default preprocessing, cached under the weights key
    second = test_features(key, **setting)  # same weights, same files, other preprocessing
    assert not torch.allclose(first, second)
    assert torch.equal(second, test_features(None, **setting))  # what it gets without any cache
    assert torch.equal(first, test_features(key))  # and the first task still gets its own from the cache


def test_feature_cache_separates_precisions(tmp_path: Path) -> None:
    calls: list[str] = []
    for precision in ("32-true", "bf16-mixed", "32-true"):
        ctx = EvalContext(L.Trainer, seed=0, work_dir=tmp_path, precision=precision, weights_key="precision-test")
        ctx.cached("data/split", lambda p=precision: calls.append(p) or {"out": p})
    assert calls == ["32-true", "bf16-mixed"]


def test_cache_key_covers_every_data_setting_but_loader_ones(tmp_path: Path) -> None:
    from medvlp_bench.datasets.imagefolder import ImageFolder
    from tests.fixtures_writer import imagefolder

    imagefolder(tmp_path)

    def key(**kw: object) -> str:
        return ImageFolder(str(tmp_path), **{"size": 16, **kw}).cache_key()

    base = key()
    assert key(batch_size=3, eval_batch_size=5, num_workers=0, pin_memory=True) == base  # how, not what, is loaded
    others = [
        key(intensity={"type": "divide", "value": 255.0}),  # a dict
        key(spatial="pad_crop"),  # inside the Preprocess object, as roi and orientation are
        key(roi=[16, 12]),
        key(exclude=["train/normal/normal_1.png"]),  # a set, and a manifest without that row
        key(augment={"rotate": 0.3}),
        key(size=24),
    ]
    assert len({base, *others}) == len(others) + 1
