"""Segmentation: the shared decoder on every encoder family, the Dice scorer, and tiny phantom runs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from omegaconf import OmegaConf

from medvlp_bench.config import compose, instantiate
from medvlp_bench.datasets.phantoms import PhantomDataModule
from medvlp_bench.decoders import SegDecoder, pyramid_strides
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.methods.scratch import Scratch
from medvlp_bench.run import make_trainer
from medvlp_bench.task import EvalContext, state_checksum
from medvlp_bench.tasks.segmentation import Segmentation, SegScorer, label_map, member, random_crop


def test_pyramid_strides() -> None:
    assert pyramid_strides([2, 4, 8, 16, 32]) == [2, 4, 8, 16, 32]  # strided maps stay as they are
    assert pyramid_strides([16] * 4) == [2, 4, 8, 16]  # UNETR with patch 16: z3, z6, z9, z12
    assert pyramid_strides([8] * 4) == [2, 2, 4, 8]  # never finer than stride 2 (the image is stride 1)


@pytest.mark.parametrize(
    ("name", "dims", "size", "kw"),
    [
        ("resnet_tiny", 2, 33, {}),  # odd sizes: stages round, the decoder matches its skips
        ("resnet_tiny", 3, 17, {}),
        ("swin_tiny", 2, 17, {}),
        ("swin_tiny", 3, 17, {}),
        ("vit_tiny", 2, 20, {"img_size": 20}),  # not a multiple of the patch
        ("vit_tiny", 3, 16, {"img_size": 16}),
    ],
)
def test_decoder_on_every_encoder(name: str, dims: int, size: int, kw: dict) -> None:
    torch.manual_seed(0)
    enc = build_image_encoder(name, dims, 2, **kw)
    dec = SegDecoder.for_encoder(enc, out_channels=3)
    x = torch.randn(2, 2, *[size] * dims)
    logits = dec(x, enc(x).maps)
    assert logits.shape == (2, 3, *[size] * dims)
    logits.mean().backward()
    first = next(p for p in enc.parameters() if p.requires_grad)  # stem / patch embedding
    assert first.grad is not None and first.grad.abs().sum() > 0  # gradients flow through the whole encoder


def test_scorer_perfect_constant_and_hand_values() -> None:
    names = ["background", "a", "b"]
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    mask[0, 0, :2, :2] = 1  # sample 0: class a (4 px), no class b
    mask[1, 0, 2:, :] = 2  # sample 1: class b (8 px), no class a
    perfect = torch.nn.functional.one_hot(mask[:, 0], 3).permute(0, 3, 1, 2).float()
    scorer = SegScorer(names)
    assert scorer.names == ["a", "b"]
    assert torch.equal(scorer(perfect, mask)["dice"], torch.ones(2, 2))
    background = torch.zeros(2, 3, 4, 4)
    background[:, 0] = 1  # a constant predictor: all background
    # present class -> 0, absent class with empty prediction -> 1 (BraTS convention, ignore_empty=False)
    assert torch.equal(scorer(background, mask)["dice"], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    half = perfect.clone()
    half[1, 2, 2:, 2:], half[1, 0, 2:, 2:] = 0, 1  # half of b found: 2*4 / (4 + 8)
    assert scorer(half, mask)["dice"][1, 1].item() == pytest.approx(8 / 12)
    hd = SegScorer(names, hd95=True)(perfect, mask)["hd95"]  # perfect: 0 where present, undefined where empty
    assert hd[0, 0] == 0 and hd[1, 1] == 0 and not torch.isfinite(hd[0, 1])
    ignore = SegScorer(names, ignore_empty=True)(background, mask)["dice"]
    assert torch.isnan(ignore[0, 1]) and torch.isnan(ignore[1, 0])


@pytest.mark.parametrize("shape", [(3, 5, 9, 7), (2, 4, 6, 5, 3), (1, 1, 4, 4)])
def test_label_map_and_member_equal_argmax_and_isin(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 3, shape, generator=g).float()  # few distinct values: many ties across classes
    assert torch.equal(label_map(logits), logits.argmax(1, keepdim=True))  # ties go to the first class
    logits = torch.randn(shape, generator=g)
    assert torch.equal(label_map(logits), logits.argmax(1, keepdim=True))
    nan = torch.randn(shape, generator=g)
    nan[nan > 1.0] = float("nan")  # a diverged model: argmax ranks NaN first, and so does label_map
    assert torch.equal(label_map(nan), nan.argmax(1, keepdim=True))
    labels = torch.randint(0, 4, (2, 1, 6, 5), generator=g)
    for group in ([0], [3], [1, 3], [1, 2, 3]):
        assert torch.equal(member(labels, group), torch.isin(labels, torch.tensor(group)))


def test_scorer_regions_brats() -> None:
    labels = torch.tensor([0, 1, 2, 3]).view(1, 1, 4, 1)
    scorer = SegScorer(["bg", "ncr", "ed", "et"], regions={"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]})
    chans = scorer.channels(labels)[0, :, :, 0]
    assert chans.tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="outside 0..3"):
        SegScorer(["bg", "ncr", "ed", "et"], regions={"WT": [1, 4]})
    with pytest.raises(ValueError, match=r"regions \['TC'\] list no labels"):
        SegScorer(["bg", "ncr", "ed", "et"], regions={"WT": [1, 2, 3], "TC": []})


def test_summary_matches_monai_aggregate() -> None:
    torch.manual_seed(1)
    pred = torch.randint(0, 2, (6, 3, 8, 8)).float()
    truth = torch.randint(0, 2, (6, 3, 8, 8)).float()
    truth[2, 1] = 0  # an empty class: NaN with ignore_empty, left out of the class mean
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=True)
    per_sample = metric(pred, truth)
    dm = type("D", (), {"target": "mask", "seg_classes": ["bg", "x", "y", "z"], "name": "toy"})()
    task = Segmentation(dm, metrics=["dice"], primary="dice", include_background=True)
    preds = {"id": np.arange(6), "dice": per_sample.numpy(), "class_names": np.array(["x", "y", "z"])}
    out = task.summarise(preds)
    np.testing.assert_allclose([out["dice/x"], out["dice/y"], out["dice/z"]], metric.aggregate().numpy(), rtol=1e-6)
    assert out["dice"] == pytest.approx(metric.aggregate().mean().item())


def test_random_crop_same_place_for_image_and_mask() -> None:
    img = torch.arange(2 * 10 * 10.0).view(2, 1, 10, 10)
    batch = random_crop({"image": img, "mask": img.long()}, [4, 6])
    assert batch["image"].shape == (2, 1, 4, 6) and torch.equal(batch["image"].long(), batch["mask"])
    assert random_crop({"image": img, "mask": img}, [16, 16])["image"] is img


# ---- tiny end-to-end runs ------------------------------------------------------------------------------
def _ctx(tmp_path: Path) -> EvalContext:
    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 1, "progress": "none", "num_sanity_val_steps": 0})
    make = functools.partial(make_trainer, cfg, None, True, default_root_dir=str(tmp_path))
    return EvalContext(make_trainer=make, seed=0, work_dir=tmp_path)


@pytest.mark.parametrize(("kind", "size", "protocol"), [("cxr", 32, "frozen"), ("ct", 32, "finetune")])
def test_segmentation_on_phantoms(kind: str, size: int, protocol: str, phantom_cache: Path, tmp_path: Path) -> None:
    dims = 2 if kind == "cxr" else 3
    dm = PhantomDataModule(kind, size=size, n_train=6, n_val=2, n_test=3, cache_dir=str(phantom_cache), target="mask")
    torch.manual_seed(0)
    method = Scratch(build_image_encoder("resnet_tiny", dims, 1))
    task = Segmentation(
        dm, metrics=["dice"], primary="dice", protocol=protocol, label_fraction=1.0, max_epochs=1, batch_size=2
    )
    before = state_checksum(method)
    res = task.evaluate(method, _ctx(tmp_path))
    assert state_checksum(method) == before  # frozen: untouched; finetune: trains a copy
    names = dm.seg_classes[1:]
    assert set(res.metrics) == {"dice", *(f"dice/{n}" for n in names)}
    assert all(0 <= v <= 1 for v in res.metrics.values())
    assert res.predictions["id"].tolist() == [str(r["id"]) for r in dm.rows("test")]  # each test sample once
    assert res.predictions["dice"].shape == (3, len(names)) and res.n_test == 3


def test_frozen_protocol_keeps_batchnorm_statistics(phantom_cache: Path, tmp_path: Path) -> None:
    dm = PhantomDataModule("cxr", size=32, n_train=6, n_val=2, n_test=2, cache_dir=str(phantom_cache), target="mask")
    method = Scratch(build_image_encoder("resnet_tiny", 2, 1)).train()  # train mode on purpose
    stats = {k: v.clone() for k, v in method.state_dict().items()}
    task = Segmentation(dm, metrics=["dice"], primary="dice", protocol="frozen", label_fraction=1.0, max_epochs=2)
    task.evaluate(method, _ctx(tmp_path))
    assert all(torch.equal(v, stats[k]) for k, v in method.state_dict().items())


@pytest.mark.parametrize("task", ["phantom_cxr_seg", "phantom_ct_seg", "phantom_mri_seg"])
def test_configs_instantiate(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBENCH_CACHE", str(tmp_path))
    t = instantiate(compose("run", ["method=clip", f"task={task}"]).task)
    assert t.protocol == "finetune" and t.data.target == "mask" and t.primary == "dice"
    expected = ["WT", "TC", "ET"] if task == "phantom_mri_seg" else t.data.seg_classes[1:]
    assert t.scorer_names == expected


def test_bad_config_is_named(phantom_cache: Path) -> None:
    dm = PhantomDataModule("cxr", size=32, n_train=6, n_val=2, n_test=2, cache_dir=str(phantom_cache))
    with pytest.raises(ValueError, match="target=mask"):
        Segmentation(dm, metrics=["dice"], primary="dice")
    dm.target = "mask"
    with pytest.raises(ValueError, match="'frozen' or 'finetune'"):
        Segmentation(dm, metrics=["dice"], primary="dice", protocol="linear")
