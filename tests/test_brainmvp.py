"""BrainMVP: block masking, the two views, templates, loss schedule, stem adaptation, mix-in, a short fit."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medvlp_bench import run
from medvlp_bench.cell import Cell, resolve
from medvlp_bench.config import compose, instantiate, tiny_overrides
from medvlp_bench.datasets.phantom_mri import generate
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.methods import brainmvp_masking as bm
from medvlp_bench.methods.brainmvp import BrainMVP

CROP, TEMPLATE = 16, 24


def _method(encoder: str = "brainmvp_unet_tiny", **kw) -> BrainMVP:
    """A small BrainMVP; the U-Net's deepest stride (8) lets the 16^3 crop keep the 2 x stride rule."""
    torch.manual_seed(0)
    enc = build_image_encoder(encoder, spatial_dims=3, in_channels=1)
    args = {"template_size": TEMPLATE, "crop_size": CROP, "block_size": 8, "template_norm": "none", **kw}
    return BrainMVP(enc, **args)


def _coded_image(b: int = 3, size: int = 20) -> torch.Tensor:
    """Every voxel tells its sample, channel and position: 1000 i + 100 c + linear index / 1e4."""
    pos = torch.arange(size**3, dtype=torch.float32).view(size, size, size) / 1e4
    code = 1000 * torch.arange(b)[:, None] + 100 * torch.arange(4)[None, :]
    return code[..., None, None, None].float() + pos


def _crop(vol: torch.Tensor, off: list[int], size: int = CROP) -> torch.Tensor:
    return vol[tuple(slice(o, o + size) for o in off)]


def test_block_mask_covers_the_configured_fraction_exactly() -> None:
    torch.manual_seed(0)
    mask = bm.block_mask(4, (32, 32, 32), 8, 0.875, torch.device("cpu"))
    assert mask.shape == (4, 32, 32, 32)
    assert mask.flatten(1).sum(1).tolist() == [0.875 * 32**3] * 4  # 56 of 64 blocks, every sample
    blocks = mask.view(4, 4, 8, 4, 8, 4, 8).permute(0, 1, 3, 5, 2, 4, 6).flatten(4).float()
    assert torch.equal(blocks.amin(-1), blocks.amax(-1))  # whole blocks only
    assert not torch.equal(mask[0], mask[1])  # independent per sample
    assert bm.n_masked(64, 0.8) == 52  # authors keep floor(64 * 0.2) = 12 blocks
    assert bm.n_masked(1728, 0.875) == 1512  # 96^3 crop, 8^3 blocks


def test_view1_fills_masked_blocks_from_the_modality_template_at_the_crop() -> None:
    m = _method()
    with torch.no_grad():
        m.templates_no_decay.copy_(torch.randn_like(m.templates_no_decay))
    image = _coded_image()
    v = m.make_views(image, progress=0.0)
    shift = (TEMPLATE - 20) // 2  # the 20^3 image sits centred on the 24^3 canvas
    for i in range(3):
        off, mod = v["offsets"][i].tolist(), int(v["modality"][i])
        target = _crop(image[i, mod], off)
        template = _crop(m.templates_no_decay[mod].detach(), [o + shift for o in off])
        assert torch.equal(v["target"][i, 0], target)
        assert torch.equal(v["view1"][i, 0], torch.where(v["mask1"][i, 0], template, target))
        # warm-up: view 2 is template-filled as well, with its own mask
        assert torch.equal(v["view2"][i, 0], torch.where(v["mask2"][i, 0], template, target))
    assert not torch.equal(v["mask1"], v["mask2"])
    assert v["cross"] == 0


def test_view2_takes_its_blocks_from_another_modality_of_the_same_study() -> None:
    m = _method(template_warmup=0.2)
    image = _coded_image()
    v = m.make_views(image, progress=0.5)
    assert v["cross"] == 1
    assert (v["other"] != v["modality"]).all()
    for i in range(3):
        off, mod, oth = v["offsets"][i].tolist(), int(v["modality"][i]), int(v["other"][i])
        masked, view = v["mask2"][i, 0], v["view2"][i, 0]
        assert torch.equal(view[masked], _crop(image[i, oth], off)[masked])
        assert torch.equal(view[~masked], _crop(image[i, mod], off)[~masked])
        codes = torch.unique(torch.div(view, 100, rounding_mode="floor"))  # 10 i + channel of every voxel
        assert sorted(codes.tolist()) == sorted({10 * i + mod, 10 * i + oth})
    torch.manual_seed(1)
    picks = bm.other_modality(torch.zeros(4000, dtype=torch.long), 4)
    assert set(picks.tolist()) == {1, 2, 3} and np.allclose(np.bincount(picks.numpy())[1:] / 4000, 1 / 3, atol=0.03)


def test_templates_get_gradients_loss_is_finite_and_follows_the_schedule() -> None:
    m = _method(template_norm="zscore")
    image = torch.randn(4, 4, 20, 20, 20)
    torch.manual_seed(3)
    m.fixed_progress = 0.1  # before contrast_start: reconstruction only
    out = m.pretrain_step({"image": image})
    assert out["contrast"] == 0
    assert torch.allclose(out["loss"], 10 * out["rec_template"] + out["rec_cross"])
    out["loss"].backward()
    grad = m.templates_no_decay.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).any()
    decay, no_decay = m.param_groups()
    assert any(p is m.templates_no_decay for p in no_decay["params"])
    m.fixed_progress = 0.9
    out = m.pretrain_step({"image": image})
    assert out["contrast"] > 0 and torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], 10 * out["rec_template"] + out["rec_cross"] + out["contrast"])


def test_only_the_drawn_modalities_templates_get_gradient() -> None:
    m = _method(template_norm="zscore")
    torch.manual_seed(5)
    v = m.make_views(torch.randn(2, 4, 16, 16, 16), progress=0.0)
    v["view1"].sum().backward()
    touched = (m.templates_no_decay.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert touched == sorted(set(v["modality"].tolist()))


def test_progress_reads_the_trainer_epoch() -> None:
    m = _method()
    assert m.progress() == 0.0
    m._trainer = SimpleNamespace(current_epoch=3, max_epochs=12)
    assert m.progress() == 0.25
    m._trainer = None


def test_single_channel_or_wrong_channel_batches_fail_clearly() -> None:
    m = _method()
    with pytest.raises(ValueError, match="multi-modal"):
        m.pretrain_step({"image": torch.randn(2, 1, 20, 20, 20)})
    with pytest.raises(ValueError, match="modalities"):
        m.pretrain_step({"image": torch.randn(2, 3, 20, 20, 20)})
    with pytest.raises(ValueError, match="crop_size"):
        m.pretrain_step({"image": torch.randn(2, 4, 12, 12, 12)})
    with pytest.raises(ValueError, match="multiple of block_size"):
        _method(crop_size=12)


def _stem(m: BrainMVP) -> torch.Tensor:
    return bm.first_conv(m.image_encoder, m.image_encoder.in_channels)[2].weight


@pytest.mark.parametrize("mode", ["drop", "inflate"])
def test_fine_tuning_adapts_the_stem_as_configured(mode: str) -> None:
    m = _method(channel_adapt=mode).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        before = m.encode_image(x)
    old = _stem(m).detach().clone()
    m.adapt_to_input(4, frozen=False)
    assert m.image_encoder.in_channels == 4 and _stem(m).shape[1] == 4
    with torch.no_grad():
        after = m.encode_image(x.repeat(1, 4, 1, 1, 1))
    assert after.shape == before.shape
    if mode == "inflate":  # same response to an input that is constant across channels
        assert torch.allclose(_stem(m), old.repeat(1, 4, 1, 1, 1) / 4)
        assert torch.allclose(after, before, atol=1e-5)
    else:
        assert not torch.allclose(after, before, atol=1e-3)
    m.adapt_to_input(4, frozen=False)  # idempotent


def test_frozen_protocols_inflate_the_pretrained_stem_without_drawing_random_numbers() -> None:
    m = _method(channel_adapt="drop")  # the yaml default: drop applies to fine-tuning only
    old = _stem(m).detach().clone()
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    m.adapt_to_input(4, frozen=True)
    assert torch.equal(torch.get_rng_state(), rng)  # no random init anywhere on the frozen path
    assert torch.equal(_stem(m), old.repeat(1, 4, 1, 1, 1) / 4)  # hand-computed W / C per channel


def test_crop_below_twice_the_deepest_stride_is_refused_at_construction() -> None:
    with pytest.raises(
        ValueError,
        match=r"crop_size \(32, 32, 32\) is below 2 x the encoder's deepest stride 32: "
        r"needs >= 64",
    ) as err:
        _method("resnet_tiny", template_size=32, crop_size=32)
    assert "\n" not in str(err.value)
    _method("resnet_tiny", template_size=64, crop_size=64)  # 64 = 2 x 32: the default resnet_small setting
    _method("uniformer_tiny", template_size=32, crop_size=32)  # stride 16: the CPU suites' `tiny:` setting


@pytest.mark.parametrize("suite", ["methods_cpu", "seg_cpu", "smoke"])
def test_cpu_suites_build_brainmvp_within_the_crop_rule(suite: str) -> None:
    """The suites' own sizes with brainmvp's `tiny:` overrides construct (the rule is checked in __init__),
    and give the deepest map >= 2 voxels per axis on the suite's data."""
    s = compose("bench", [f"suite={suite}"]).suite
    sizes = [o for o in s.overrides if o.startswith("task.data.size=")]
    cfg = compose("run", ["method=brainmvp", "task=phantom_mri_cls", *s.overrides, *tiny_overrides("brainmvp")])
    m = instantiate(cfg.method.model)
    size = int(sizes[0].split("=")[1])
    assert m.crop == (size,) * 3  # the whole volume, as the 64^3 default
    with torch.no_grad():
        deepest = m.image_encoder.eval()(torch.randn(1, 1, *m.crop)).maps[-1]
    assert min(deepest.shape[2:]) >= 2


def test_scratch_twin_builds_brainmvps_encoder_at_every_size() -> None:
    """scratch_brainmvp copies brainmvp's encoder name and tiny encoder (its input channels are the task's)."""
    for extra in ([], ["tiny"]):
        cfgs = []
        for m in ("brainmvp", "scratch_brainmvp"):
            over = [f"method={m}", "task=phantom_mri_cls", *(tiny_overrides(m) if extra else [])]
            cfgs.append(compose("run", over).method)
        assert cfgs[0].model.image_encoder.name == cfgs[1].model.image_encoder.name
    assert [o for o in cfgs[0].tiny if ".image_encoder." in o] == list(cfgs[1].tiny)


def _linear_probe_features(cell: Cell, method: BrainMVP, x: torch.Tensor, seed: int, monkeypatch) -> torch.Tensor:
    """What ``run.evaluate`` hands the task: the method after ``adapt_to_input``, its features of ``x``."""

    class Seen(Exception):
        pass

    def capture(task, m, ctx):
        with torch.no_grad():
            raise Seen(m.eval().encode_image(x))

    monkeypatch.setattr(run, "obtain_method", lambda cfg: (method, None))
    monkeypatch.setattr(type(instantiate(cell.cfg.task)), "evaluate", capture)
    torch.manual_seed(seed)
    with pytest.raises(Seen) as seen:
        run.evaluate(cell)
    return seen.value.args[0]


def test_linear_probe_features_come_from_the_pretrained_stem(workdir, monkeypatch) -> None:
    """Issue 17: with channel_adapt=drop the probe used to freeze a fresh random stem, so its features did not
    depend on the pre-trained stem at all (and changed with the torch seed)."""
    over = ["method=brainmvp", "task=phantom_mri_cls", "task.data.size=32", "logger=none"]
    cell = resolve([*over, *tiny_overrides("brainmvp")])
    cfg = cell.cfg
    assert cfg.task.protocol == "linear" and cfg.method.model.channel_adapt == "drop"
    torch.manual_seed(0)
    pretrained = instantiate(cfg.method.model)
    other = copy.deepcopy(pretrained)
    with torch.no_grad():
        _stem(other).mul_(-2.0)  # a different pre-trained stem, everything else equal
    x = torch.randn(2, 4, 32, 32, 32)
    a = _linear_probe_features(cell, copy.deepcopy(pretrained), x, 1, monkeypatch)
    b = _linear_probe_features(cell, other, x, 1, monkeypatch)
    c = _linear_probe_features(cell, copy.deepcopy(pretrained), x, 2, monkeypatch)
    assert not torch.allclose(a, b, atol=1e-4)  # the stem's pre-trained weights reach the probe
    assert torch.equal(a, c)  # and nothing random does
    inflated = copy.deepcopy(pretrained).eval()
    with torch.no_grad():  # hand-inflated reference: W / 4 on every channel = the 1-channel stem on the mean
        assert torch.allclose(a, inflated.encode_image(x.mean(1, keepdim=True)), atol=1e-5)


def test_adapt_finds_swin_patch_embedding_and_none_refuses() -> None:
    enc = build_image_encoder("swin_tiny", spatial_dims=3, in_channels=1)
    parent, attr, conv = bm.first_conv(enc, 1)
    assert conv is enc.net.patch_embed.proj and getattr(parent, attr) is conv
    for frozen in (True, False):
        with pytest.raises(ValueError, match="channel"):
            _method(channel_adapt="none").adapt_to_input(4, frozen=frozen)


def test_template_mix_in_swaps_whole_channels_only_while_training() -> None:
    m = _method(mix_in=3, template_norm="none")
    with torch.no_grad():
        m.templates_no_decay.fill_(-7.0)
    x = torch.randn(64, 4, 24, 24, 24)
    torch.manual_seed(0)
    out = m.mix_in_templates(x)
    swapped = (out == -7.0).flatten(2).all(-1)
    kept = (out == x).flatten(2).all(-1)
    assert (swapped ^ kept).all()  # every channel is either the template or untouched
    assert swapped.sum(1).max() <= 3 and swapped.any() and (~swapped).any(1).all()
    m.adapt_to_input(4)
    m.eval()
    feats = m.image_features(x[:2])
    assert torch.allclose(feats.pooled, m.image_encoder(x[:2]).pooled)


def test_yaml_builds_a_one_channel_encoder_for_four_channel_data(workdir) -> None:
    cfg = compose("run", ["method=brainmvp", "task=phantom_mri_seg", "method.model.image_encoder.name=resnet_tiny"])
    assert cfg.task.data.in_channels == 4 and cfg.method.requires.min_channels == 2
    m = instantiate(cfg.method.model)
    assert isinstance(m, BrainMVP) and m.image_encoder.in_channels == 1 and m.impl_source == "official-code"
    assert tuple(m.templates_no_decay.shape) == (4, 64, 64, 64)


class _Fixed(torch.nn.Module):
    """A stand-in reconstruction decoder that returns a given volume batch, whatever the encoder says."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, deepest: torch.Tensor, size) -> torch.Tensor:
        return self.out


def test_proxy_scores_held_out_reconstruction_against_the_per_voxel_mean() -> None:
    """The generic val-loss proxy compared BrainMVP's end-of-run loss, which has gained the InfoNCE and
    cross-modal terms, with its start, so it read 'not learned' whatever happened; this one compares the held-out
    reconstruction with the best constant volume (hand-computed here)."""
    torch.manual_seed(4)
    vols = torch.randn(3, 1, 16, 16, 16)
    image = vols.repeat(1, 4, 1, 1, 1)  # every modality the same volume: the target is known whatever is drawn
    loader = [{"image": image[:2]}, {"image": image[2:]}]
    m = _method(template_size=16, crop_size=16).eval()  # crop = image: the target is the whole volume
    by_hand = float(np.var(vols.numpy().astype(np.float64), axis=0).mean())
    rng = torch.get_rng_state()
    first = m.proxy_score(loader)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first.kind == "reconstruction" and first.reference["per_voxel_mean"] == pytest.approx(by_hand)
    assert m.proxy_score(loader).values == first.values  # fixed views: epochs are comparable
    assert first.learned is False  # an untrained encoder + decoder
    m.rec_decoder = _Fixed(vols.mean(0, keepdim=True))  # the per-voxel mean itself: the reference, not better
    assert m.proxy_score(loader).values["rec_template"] == pytest.approx(by_hand)
    assert m.proxy_score(loader).learned is False
    m.rec_decoder = _Fixed(vols[:2])  # a perfect reconstruction of the first batch
    score = m.proxy_score([loader[0]])
    assert score.values["rec_template"] == pytest.approx(0.0) and score.learned is True


@pytest.mark.slow  # uniformer_tiny at 32^3: 40 s on one free core, minutes on a loaded 2-core machine
def test_a_short_fit_lowers_the_reconstruction_error() -> None:
    vols = np.stack([generate(i, size=32).image for i in range(4)])
    x = torch.from_numpy(vols)
    x = (x - x.mean((2, 3, 4), keepdim=True)) / x.std((2, 3, 4), keepdim=True)
    # the CPU suites' setting (`tiny:`): uniformer_tiny, whole 32^3 volume as the crop, deepest map 2^3
    m = _method("uniformer_tiny", template_size=32, crop_size=32, template_norm="zscore", contrast_start=0.0)
    m.fixed_progress = 0.5

    def rec_error() -> float:
        torch.manual_seed(123)  # the same crops, modalities and masks each time
        with torch.no_grad():
            out = m.pretrain_step({"image": x})
        return float(out["rec_template"] + out["rec_cross"])

    start = rec_error()
    opt = torch.optim.AdamW(m.param_groups(), lr=3e-3)
    for _ in range(25):  # measured 2.04 -> 1.05
        opt.zero_grad()
        m.pretrain_step({"image": x})["loss"].backward()
        opt.step()
    assert rec_error() < 0.7 * start


def test_bench_marks_2d_and_single_channel_cells_not_applicable(workdir, capsys) -> None:
    from medvlp_bench.cli import main

    args = ["suite=smoke", "suite.methods=[brainmvp]", "suite.tasks=[phantom_cxr_cls,phantom_ct_cls]", "logger=none"]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    assert "0 cells run" in out and "2 not applicable" in out
    assert not (workdir / "cache" / "checkpoints").exists()  # skipped before any pre-training
    assert main(["pretrain", "method=brainmvp", "data=phantom_cxr"]) == 2
    assert "cannot pre-train on 'phantom_cxr': it pre-trains on 3D data only" in capsys.readouterr().err
