"""medbench convert: the authors' layouts (as their stored code shows them) -> our checkpoints, and clear refusals.

The released files themselves cannot be fetched offline, so each "released" checkpoint here is synthesised: our
own tiny module's state dict, perturbed, renamed into the authors' key names and wrapped as their code saves it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from medvlp_bench.checkpoint import CONFIG
from medvlp_bench.config import tiny_overrides
from medvlp_bench.convert import (
    ConvertError,
    adapt_stem,
    build_target,
    convert_state_dict,
    encoder_override,
    load_source,
    main_convert,
)
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.methods.brainmvp import BrainMVP
from medvlp_bench.run import load_method

#: our GTGM prefixes -> the authors' ``ResNet_CXRBert`` attribute names (pretrain/utils/utils_builder.py)
GTGM_NAMES = {
    "image_encoder.net.": "encoder.swinViT.",
    "image_head.": "encoder.",  # swin_unetr.py (for_pretrain=True): encoder10 and the head's linear
    "image_proj.": "proj_v.",
    "text_proj.": "proj_t.",
    "text_encoder.model.": "lm_model.",
}
DROPPED = "encoder.swinViT.layers1.0.blocks.0.norm1.bias"
EXTRA = "encoder.extra_head.weight"


class NotAStateDict:
    """A pickled object that is no tensor container: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.weights = torch.zeros(3)


@pytest.fixture(scope="module")
def gtgm_overrides() -> list[str]:
    return tiny_overrides("gtgm")


@pytest.fixture(scope="module")
def gtgm_module(gtgm_overrides: list[str]) -> nn.Module:
    return build_target("gtgm", gtgm_overrides, None)[0]


def _authors_name(key: str) -> str:
    prefix = next(p for p in GTGM_NAMES if key.startswith(p))
    return GTGM_NAMES[prefix] + key.removeprefix(prefix)


@pytest.fixture(scope="module")
def released_gtgm(gtgm_module: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """The authors' resume format: {'epoch', 'model_state_dict' (DDP: 'module.' keys), 'optimizer_state_dict'}."""
    torch.manual_seed(123)
    state = gtgm_module.state_dict()
    ours = {k: v + torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}
    theirs = {"module." + _authors_name(k): v for k, v in ours.items() if ".encoder10.layer.norm" not in k}
    del theirs["module." + DROPPED]  # (the release's encoder10 uses InstanceNorm: no norm keys, as dropped here)
    theirs["module." + EXTRA] = torch.ones(2, 2)
    path = tmp_path_factory.mktemp("released") / "gtgm_checkpoint.pth"
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 7, "model_state_dict": theirs, "optimizer_state_dict": optimizer}, path)
    return path, ours


def test_gtgm_release_converts_and_loads_through_the_project_loader(
    released_gtgm: tuple[Path, dict[str, Tensor]], gtgm_overrides: list[str], tmp_path: Path, capsys
) -> None:
    src, ours = released_gtgm
    out = tmp_path / "gtgm_converted"
    assert main_convert(["gtgm", str(src), str(out), *gtgm_overrides]) == 0
    printed = capsys.readouterr().out
    dropped_target = "image_encoder.net." + DROPPED.removeprefix("encoder.swinViT.")
    assert f"missing     {dropped_target}" in printed and f"unexpected  {EXTRA}" in printed

    method = load_method(out)  # what `medbench run method=gtgm ckpt=<out>` does
    got = method.state_dict()
    prov = json.loads((out / CONFIG).read_text())["converted_from"]
    report = prov["report"]
    assert report["missing"] == [dropped_target]
    assert report["unexpected"] == [EXTRA]
    assert report["mismatched"] == [] and report["ignored"] == {} and report["channel_adaptations"] == []
    head_norms = [k for k in ours if ".encoder10.layer.norm" in k]
    assert head_norms and sorted(report["kept_init"]) == sorted(head_norms)  # our CPU head_norm=batch statistics
    assert prov["wrapper"] == ["model_state_dict"]
    assert prov["prefixes_stripped"] == {"module.": len(ours) - len(head_norms)}
    assert len(report["loaded"]) == len(ours) - 1 - len(head_norms)
    assert (
        report["loaded"]["encoder.encoder10.layer.conv1.conv.weight"] == "image_head.encoder10.layer.conv1.conv.weight"
    )
    assert report["loaded"]["encoder.linear.weight"] == "image_head.linear.weight"
    for source_key, target_key in report["loaded"].items():
        assert source_key == _authors_name(target_key)
        assert torch.equal(got[target_key], ours[target_key]), target_key


def test_strict_refuses_missing_or_unexpected_keys_and_writes_nothing(
    released_gtgm: tuple[Path, dict[str, Tensor]], gtgm_overrides: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "strict"
    assert main_convert(["gtgm", str(released_gtgm[0]), str(out), "--strict", *gtgm_overrides]) == 2
    assert "--strict" in capsys.readouterr().err
    assert not out.exists()


def test_four_channel_stem_into_a_one_channel_model_is_the_channel_mean(gtgm_module: nn.Module) -> None:
    module = copy.deepcopy(gtgm_module)
    stem = module.image_encoder.net.patch_embed.proj.weight
    w4 = torch.randn(stem.shape[0], 4, *stem.shape[2:])
    report = convert_state_dict("gtgm", {"swinViT.patch_embed.proj.weight": w4}, module)  # encoder-only file layout
    assert report.loaded == {"swinViT.patch_embed.proj.weight": "image_encoder.net.patch_embed.proj.weight"}
    assert [a["target"] for a in report.channel_adaptations] == ["image_encoder.net.patch_embed.proj.weight"]
    assert torch.allclose(module.image_encoder.net.patch_embed.proj.weight, w4.mean(1, keepdim=True))

    skipped = convert_state_dict("gtgm", {"swinViT.patch_embed.proj.weight": w4}, module, "skip")
    assert skipped.loaded == {} and skipped.mismatched[0]["source_shape"] == list(w4.shape)
    assert "image_encoder.net.patch_embed.proj.weight" not in skipped.missing  # reported once, as mismatched
    with pytest.raises(ConvertError, match="input channels"):
        convert_state_dict("gtgm", {"swinViT.patch_embed.proj.weight": w4}, module, "error")


def test_fewer_source_channels_are_repeated_and_rescaled() -> None:
    w = torch.randn(3, 2, 2, 2)
    out, how = adapt_stem(w, 5)
    assert out.shape == (3, 5, 2, 2) and "repeated" in how
    assert torch.allclose(out[:, [0, 2, 4]], w[:, [0, 0, 0]] * 2 / 5)
    assert torch.allclose(out[:, [1, 3]], w[:, [1, 1]] * 2 / 5)
    one = torch.randn(3, 1, 2, 2)
    assert torch.allclose(adapt_stem(one, 4)[0].sum(1, keepdim=True), one)  # same response to equal channels


def _brainmvp() -> BrainMVP:
    torch.manual_seed(0)
    encoder = build_image_encoder("brainmvp_unet_tiny", 3, 1)  # the authors' U-Net encoder layout, 8 wide
    return BrainMVP(encoder, modalities=("t1", "t1ce", "t2", "flair"), template_size=16, crop_size=16)


def test_brainmvp_unet_layout_and_templates_by_modality_name() -> None:
    module = _brainmvp()
    enc = {k.removeprefix("image_encoder.net."): torch.randn_like(v) for k, v in module.state_dict().items()}
    enc = {k: v for k, v in enc.items() if not k.startswith(("rec_decoder", "templates"))}
    rows = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 16, 16, 16)  # row i filled with i
    source = {**enc, "rep_template": rows.clone(), "up1conv.weight": torch.zeros(1, 32, 1, 1, 1)}
    report = convert_state_dict("brainmvp", source, module)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert list(report.ignored) == ["up1conv.weight"]
    assert set(report.kept_init) == {k for k in module.state_dict() if k.startswith("rec_decoder.")}
    for k, v in enc.items():
        assert torch.equal(module.state_dict()["image_encoder.net." + k], v)
    # authors' order flair t1 t1c t2 mra pd dwi adc; ours t1 t1ce t2 flair
    assert module.templates_no_decay[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 0.0]

    other_canvas = convert_state_dict("brainmvp", {"rep_template": torch.zeros(8, 20, 20, 20)}, _brainmvp())
    assert "template_size=[20, 20, 20]" in other_canvas.mismatched[0]["reason"]


def _assert_brainmvp_import(
    out: Path, enc: dict[str, Tensor], templates: Tensor, decoder: dict[str, Tensor]
) -> tuple[BrainMVP, dict]:
    """The converted checkpoint loads with every encoder tensor as released, the templates picked by modality
    name (the authors' order: flair t1 t1c t2 ...), nothing missing or mismatched, the decoder ignored."""
    loaded = load_method(out)
    for k, v in enc.items():
        assert torch.equal(loaded.state_dict()["image_encoder.net." + k], v), k
    order = ("flair", "t1", "t1c", "t2")
    want = [order.index("t1c" if m == "t1ce" else m) for m in loaded.modalities]
    assert torch.equal(loaded.templates_no_decay, templates[want])
    report = json.loads((out / CONFIG).read_text())["converted_from"]["report"]
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    assert sorted(report["ignored"]) == sorted(decoder)
    return loaded, report


def test_brainmvp_unet_release_converts_end_to_end(tmp_path: Path) -> None:
    """A BrainMVP_unet.pt as main.py saves it ({'state_dict': DDP 'module.' keys, ...}) -> a checkpoint that
    ``medbench run ... ckpt=`` loads with the encoder weights exactly as released."""
    overrides = [*tiny_overrides("brainmvp"), "method.model.image_encoder.name=brainmvp_unet_tiny"]
    ours = build_target("brainmvp", overrides, None)[0]
    torch.manual_seed(1)
    enc = {
        k.removeprefix("image_encoder.net."): torch.randn_like(v)
        for k, v in ours.state_dict().items()
        if k.startswith("image_encoder.net.")
    }
    decoder = {"up4conva.weight": torch.zeros(128, 256, 1, 1, 1), "up1conv.bias": torch.zeros(1)}
    templates = torch.randn(8, *ours.templates_no_decay.shape[1:])  # flair t1 t1c t2 mra pd dwi adc
    state = {f"module.{k}": v for k, v in {**enc, **decoder, "rep_template": templates}.items()}
    src = tmp_path / "BrainMVP_unet.pt"
    torch.save({"current_epoch": 1500, "state_dict": state, "optimizer": {}, "val_best": 0.0}, src)
    out = tmp_path / "converted"
    assert main_convert(["brainmvp", str(src), str(out), *overrides]) == 0
    _assert_brainmvp_import(out, enc, templates, decoder)


def _uniformer_release(path: Path, enc: dict[str, Tensor], templates: Tensor) -> dict[str, Tensor]:
    """Write a BrainMVP_uniformer.pt as main.py saves RecModel (DDP); returns the decoder keys it holds."""
    decoder = {  # UniSegDecoder: UnetrUpBlocks decoder2..5, proj1, out_1 (pre-training reconstruction only)
        "decoder.decoder5.transp_conv.conv.weight": torch.zeros(64, 48, 2, 2, 2),
        "decoder.proj1.proj.weight": torch.zeros(64, 1, 3, 3, 3),
        "decoder.out_1.conv.conv.bias": torch.zeros(1),
    }
    named = {**{f"encoder.uniformer.{k}": v for k, v in enc.items()}, **decoder, "rep_template": templates}
    state = {f"module.{k}": v for k, v in named.items()}
    torch.save({"current_epoch": 1500, "state_dict": state, "optimizer": {}, "scheduler": {}, "val_best": 0.0}, path)
    return decoder


def test_brainmvp_uniformer_release_converts_end_to_end(tmp_path: Path, capsys) -> None:
    """A BrainMVP_uniformer.pt in the authors' format -> a checkpoint that ``medbench run ... ckpt=`` loads with
    every encoder tensor (BatchNorm statistics included) exactly as released."""
    overrides = [*tiny_overrides("brainmvp"), "method.model.image_encoder.name=uniformer_tiny"]
    ours = build_target("brainmvp", overrides, None)[0]
    torch.manual_seed(2)
    enc = {
        k.removeprefix("image_encoder.net."): torch.randn_like(v) if v.is_floating_point() else v + 7
        for k, v in ours.state_dict().items()
        if k.startswith("image_encoder.net.")
    }
    enc = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in enc.items()}  # valid BatchNorm stats
    assert {"patch_embed1.proj.weight", "blocks1.0.conv1.weight", "blocks3.0.attn.qkv.weight"} < set(enc)
    templates = torch.randn(8, *ours.templates_no_decay.shape[1:])  # flair t1 t1c t2 mra pd dwi adc
    src = tmp_path / "BrainMVP_uniformer.pt"
    decoder = _uniformer_release(src, enc, templates)
    out = tmp_path / "converted"
    assert main_convert(["brainmvp", str(src), str(out), *overrides]) == 0
    assert "UniFormer-small" in capsys.readouterr().out
    loaded, report = _assert_brainmvp_import(out, enc, templates, decoder)
    assert type(loaded.image_encoder).__name__ == "UniFormerEncoder"
    assert len(report["loaded"]) == len(enc) + 1
    with torch.no_grad():
        assert torch.isfinite(loaded.eval().image_features(torch.randn(1, 1, 32, 32, 32)).pooled).all()


def test_uniformer_release_selects_uniformer_small_unless_an_encoder_is_named(tmp_path: Path, capsys) -> None:
    keys = ["encoder.uniformer.patch_embed1.proj.weight", "rep_template"]
    assert encoder_override("brainmvp", keys, []) == ["method.model.image_encoder.name=uniformer_small"]
    assert encoder_override("brainmvp", ["conv1a.weight"], []) == ["method.model.image_encoder.name=brainmvp_unet"]
    assert encoder_override("brainmvp", keys, ["method.model.image_encoder.name=uniformer_tiny"]) == []
    assert encoder_override("gtgm", keys, []) == []
    released_swin = ["encoder.swinViT.patch_embed.proj.weight", "encoder.linear.weight"]
    assert encoder_override("gtgm", released_swin, []) == ["method.model.image_encoder.name=swin_unetr"]

    src = tmp_path / "BrainMVP_uniformer.pt"  # the released shapes (uniformer_small, 1 channel), stem only
    stem = {"module.encoder.uniformer.patch_embed1.proj.weight": torch.randn(64, 1, 2, 2, 2)}
    torch.save({"state_dict": stem}, src)
    out = tmp_path / "out"
    assert main_convert(["brainmvp", str(src), str(out), "method.model.crop_size=32", "--strict"]) == 2
    printed = capsys.readouterr()
    assert "image encoder: uniformer_small" in printed.out and "loaded      1 keys" in printed.out
    assert "missing     image_encoder.net.blocks4.2.mlp.fc2.weight" in printed.out  # the rest of uniformer_small
    assert "--strict" in printed.err and not out.exists()


def test_uniformer_stem_with_four_modalities_is_adapted() -> None:
    overrides = [*tiny_overrides("brainmvp"), "method.model.image_encoder.name=uniformer_tiny"]
    module = build_target("brainmvp", overrides, None)[0]
    w4 = torch.randn(16, 4, 2, 2, 2)  # a fine-tuned 4-channel patch embedding
    report = convert_state_dict("brainmvp", {"encoder.uniformer.patch_embed1.proj.weight": w4}, module)
    assert [a["target"] for a in report.channel_adaptations] == ["image_encoder.net.patch_embed1.proj.weight"]
    assert torch.allclose(module.image_encoder.net.patch_embed1.proj.weight, w4.mean(1, keepdim=True))


def test_brainmvp_uniformer_release_into_another_encoder_is_refused(tmp_path: Path, capsys) -> None:
    src = tmp_path / "BrainMVP_uniformer.pt"
    state = {"module.encoder.uniformer.patch_embed1.proj.weight": torch.zeros(64, 1, 2, 2, 2)}
    torch.save({"current_epoch": 1500, "state_dict": {**state, "module.rep_template": torch.zeros(8, 4, 4, 4)}}, src)
    # tiny_overrides name resnet_tiny: a random ResNet under the authors' name is refused, not written
    assert main_convert(["brainmvp", str(src), str(tmp_path / "out"), *tiny_overrides("brainmvp")]) == 2
    err = capsys.readouterr().err
    assert "no image-encoder weight" in err and "UniFormer" in err
    assert not (tmp_path / "out").exists()


def test_pickled_objects_are_refused_without_unpickling(tmp_path: Path, capsys) -> None:
    src = tmp_path / "evil.pt"
    torch.save({"state_dict": NotAStateDict()}, src)
    assert main_convert(["gtgm", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "weights_only" in err and "NotAStateDict" in err


def test_clear_errors_for_missing_file_non_state_dict_and_unknown_method(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere" / "BrainMVP_unet.pt"
    assert main_convert(["brainmvp", str(missing), str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err

    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    assert main_convert(["gtgm", str(listed), str(tmp_path / "out")]) == 2
    assert "not a state dict" in capsys.readouterr().err

    assert main_convert(["clipp", str(listed), str(tmp_path / "out")]) == 2
    assert "supported: brainmvp, gtgm" in capsys.readouterr().err


def test_safetensors_sources_are_unwrapped_too(tmp_path: Path) -> None:
    path = tmp_path / "encoder.safetensors"
    save_file({"module.swinViT.patch_embed.proj.bias": torch.ones(3)}, str(path))
    tensors, how = load_source(path)
    assert list(tensors) == ["swinViT.patch_embed.proj.bias"]
    assert how["format"] == "safetensors" and how["prefixes_stripped"] == {"module.": 1}
