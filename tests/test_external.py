"""``method=external``: a tiny model of each format, built and saved in that format's exact layout here (random
weights), loaded by ``method=external`` and run on phantom tasks end to end; wrong paths, missing files and
mismatched architectures give one-line errors; 2D models are refused on volumes and vice versa."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medvlp_bench.bench import bench, compose_bench
from medvlp_bench.cell import resolve
from medvlp_bench.cli import main
from medvlp_bench.config import ConfigError, compose
from medvlp_bench.methods.external import External
from medvlp_bench.methods.external_formats import FORMATS
from medvlp_bench.run import evaluate

#: tiny phantom cells: every run below takes seconds
RUN = [
    "trainer.progress=none",
    "logger=none",
    "task.data.size=32",
    "task.data.n_train=24",
    "task.data.n_val=8",
    "task.data.n_test=8",
    "task.data.batch_size=8",
]
CLS = ["task.max_epochs=2", "task.patience=1", "task.batch_size=16", "task.label_fraction=0.5"]
SEG = ["task.max_epochs=1", "task.patience=1", "task.batch_size=4", "task.label_fraction=0.5"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache(phantom_cache: Path) -> list[str]:
    return [f"task.data.cache_dir={phantom_cache}"]


# ---- tiny models in their formats' layouts -----------------------------------------------------------------
def open_clip_folder(root: Path, width: int = 32) -> Path:
    """open_clip's hub layout: open_clip_config.json (model_cfg + preprocess_cfg) + open_clip_pytorch_model.bin."""
    import open_clip

    root.mkdir(parents=True)
    cfg = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 48, "layers": 2, "width": width, "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
    }
    (root / "open_clip_config.json").write_text(json.dumps(cfg))
    model = open_clip.create_model(f"local-dir:{root}", load_weights=False)
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    return root


def hf_clip_folder(root: Path) -> Path:
    """``CLIPModel.save_pretrained`` + tokenizer + ``CLIPImageProcessor`` (a BERT WordPiece vocabulary)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    from medvlp_bench.text import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    ids = dict(eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id)
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, **ids)
    text |= dict(num_attention_heads=2, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision |= dict(image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root)
    tok.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def hf_vit_folder(root: Path) -> Path:
    """A ViT fine-tuned for classification (keys under ``vit.``, a ``classifier`` head) + its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32)
    cfg.patch_size, cfg.num_labels = 8, 3
    ViTForImageClassification(cfg).save_pretrained(root)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(root)
    return root


def resnet18_file(path: Path, prefix: str = "module.") -> tuple[Path, torch.nn.Module]:
    """A torchvision resnet18 state dict as DataParallel training saves it: ``{"state_dict": {"module.*": ...}}``."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    return path, model


def swin_unetr_file(path: Path) -> tuple[Path, torch.nn.Module]:
    """A whole MONAI SwinUNETR (feature_size 12; its ``swinViT`` encoder and UNETR decoder) state dict."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    torch.save(net.state_dict(), path)
    return path, net.eval()


def rows_by_kind(rows: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r.kind, []).append(r)
    return out


# ---- each format end to end ---------------------------------------------------------------------------------
def test_open_clip_classification_retrieval_and_zeroshot(tmp_path: Path, workdir: Path, phantom_cache: Path) -> None:
    folder = open_clip_folder(tmp_path / "tinyclip")
    ext = ["method=external", "external.format=open_clip", f"external.path={folder}"]
    rows = []
    for task, extra in (("phantom_cxr_cls", CLS), ("phantom_cxr_retrieval", []), ("phantom_cxr_zeroshot", [])):
        rows += evaluate(resolve([*ext, f"task={task}", *RUN, *extra, *cache(phantom_cache)]))
    kinds = rows_by_kind(rows)
    assert set(kinds) == {"classification", "retrieval", "zeroshot"}
    want = sha256(folder / "open_clip_pytorch_model.bin")
    assert {(r.method, r.impl_source, r.ckpt_sha256) for r in rows} == {("external-tinyclip", "external", want)}
    assert {r.metric for r in kinds["retrieval"]} >= {"i2t_r1", "t2i_r10", "r_mean"}
    cells = sorted(p.name for p in (workdir / "results" / "runs").glob("*.json"))
    assert "phantom_cxr_retrieval__external-tinyclip__zeroshot__f1__s0.json" in cells


def test_open_clip_input_is_adapted_as_the_model_expects(tmp_path: Path) -> None:
    """A 1-channel 32x32 image -> repeated to RGB, resized to the model's 48x48, normalised with its mean/std."""
    import open_clip

    folder = open_clip_folder(tmp_path / "m")
    method = External("open_clip", str(folder))
    method.adapt_to_input(1)
    reference = open_clip.create_model(f"local-dir:{folder}").eval()
    x = torch.rand(2, 1, 32, 32)
    rgb = F.interpolate(x.expand(-1, 3, -1, -1), size=(48, 48), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = reference.encode_image((rgb - mean) / std)
        torch.testing.assert_close(method.eval().encode_image(x), want)
        tokens = method.text_encoder.tokenizer(["no effusion"])
        torch.testing.assert_close(method.text_encoder(tokens), reference.encode_text(tokens["input_ids"]))
    feats = method.image_features(x)
    assert [m.shape[-1] for m in feats.maps] == [2, 2]  # ViT maps on the task image's grid at stride 16


def test_hf_clip_zeroshot_and_vit_segmentation(tmp_path: Path, workdir: Path, phantom_cache: Path) -> None:
    from transformers import CLIPModel

    clip = hf_clip_folder(tmp_path / "hfclip")
    method = External("hf", str(clip)).eval()
    method.adapt_to_input(1)
    x = torch.rand(2, 1, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIPImageProcessor's defaults
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    reference = CLIPModel.from_pretrained(str(clip)).eval()
    with torch.no_grad():
        out = reference.get_image_features(pixel_values=(x.expand(-1, 3, -1, -1) - mean) / std)
        torch.testing.assert_close(method.encode_image(x), getattr(out, "pooler_output", out))
    hf = ["method=external", "external.format=hf"]
    rows = evaluate(resolve([*hf, f"external.path={clip}", "task=phantom_cxr_zeroshot", *RUN, *cache(phantom_cache)]))
    assert rows and {r.kind for r in rows} == {"zeroshot"}
    assert rows[0].ckpt_sha256 == sha256(clip / "model.safetensors")

    vit = hf_vit_folder(tmp_path / "vit")
    rows = evaluate(resolve([*hf, f"external.path={vit}", "task=phantom_cxr_seg", *RUN, *SEG, *cache(phantom_cache)]))
    assert {r.kind for r in rows} == {"segmentation"} and {r.method for r in rows} == {"external-vit"}
    retrieval = [*hf, f"external.path={vit}", "task=phantom_cxr_retrieval", *RUN, *cache(phantom_cache)]
    assert evaluate(resolve(retrieval)) == []  # image only: no text tower, no row


def test_torchvision_resnet_features_and_rows(tmp_path: Path, workdir: Path, phantom_cache: Path) -> None:
    path, model = resnet18_file(tmp_path / "resnet18_rad.pth")
    method = External("torchvision", str(path), arch="resnet18", input_size=64).eval()
    assert method.load_report["unused"] == ["fc.weight", "fc.bias"]  # the head, reported, not loaded
    method.adapt_to_input(1)
    x = torch.rand(2, 1, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, torchvision's default
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = F.interpolate(x.expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear", align_corners=False)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(method.encode_image(x), model((rgb - mean) / std))
        backbone, _ = resnet18_file(tmp_path / "b.pth", prefix="backbone.")
        again = External("torchvision", str(backbone), arch="resnet18", input_size=64).eval()
        assert again.load_report["prefixes_stripped"] == ["backbone."]  # ("module." goes when the file is read)
        torch.testing.assert_close(again.encode_image(x), method.encode_image(x))
        scratch = External("torchvision", None, arch="resnet18", init="random", input_size=64).eval()
        assert scratch.weights_sha256 is None and not torch.allclose(scratch.encode_image(x), method.encode_image(x))

    ext = ["method=external", "external.format=torchvision", f"external.path={path}", "external.arch=resnet18"]
    rows = evaluate(
        resolve([*ext, "external.input_size=64", "task=phantom_cxr_cls", *RUN, *CLS, *cache(phantom_cache)])
    )
    want = ("external-resnet18_rad", "external", sha256(path))
    assert {(r.method, r.impl_source, r.ckpt_sha256) for r in rows} == {want}


def test_monai_swin_unetr_loads_and_probes_volumes(tmp_path: Path, workdir: Path, phantom_cache: Path) -> None:
    path, net = swin_unetr_file(tmp_path / "swin_unetr.pt")
    method = External("monai", str(path), arch="swin_unetr").eval()
    report = method.load_report
    assert report["prefixes_stripped"] == ["swinViT."] and report["arch_kwargs"]["feature_size"] == 12
    assert report["arch_kwargs"]["num_heads"] == [1, 2, 2, 4] and report["unused"]  # UNETR decoder: not used
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.encode_image(x), net.swinViT(x, True)[-1].flatten(2).mean(-1))
    assert method.image_encoder.feature_strides == [2, 4, 8, 16, 32]
    assert method.input_gap(2, 1) == "it is a 3D model (monai) and the task's data are 2D images; a 2D model is needed"
    ext = ["method=external", "external.format=monai", f"external.path={path}", "external.arch=swin_unetr"]
    rows = evaluate(resolve([*ext, "task=phantom_ct_cls", *RUN, *CLS, "task.data.n_train=12", *cache(phantom_cache)]))
    assert {r.kind for r in rows} == {"classification"} and rows[0].spatial_dims == 3
    assert rows[0].ckpt_sha256 == sha256(path)


@pytest.mark.slow
def test_monai_swin_unetr_segments_volumes(tmp_path: Path, workdir: Path, phantom_cache: Path) -> None:
    path, _ = swin_unetr_file(tmp_path / "swin_unetr.pt")
    ext = ["method=external", "external.format=monai", f"external.path={path}", "external.arch=swin_unetr"]
    rows = evaluate(resolve([*ext, "task=phantom_ct_seg", *RUN, *SEG, *cache(phantom_cache)]))
    assert {r.kind for r in rows} == {"segmentation"} and rows[0].spatial_dims == 3


def test_monai_resnet_and_segresnet_read_their_shape_off_the_weights(tmp_path: Path) -> None:
    from monai.networks.nets import SegResNet, resnet10
    from safetensors.torch import save_file

    r10 = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", conv1_t_stride=2)
    torch.save({"state_dict": {"module." + k: v for k, v in r10.state_dict().items()}}, tmp_path / "r10.pth")
    method = External("monai", str(tmp_path / "r10.pth"), arch="resnet10").eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.encode_image(x), r10.eval()(x))  # feed_forward=False: pooled features
    seg = SegResNet(spatial_dims=3, init_filters=8, in_channels=2, out_channels=3, blocks_down=(1, 2, 2))
    save_file(seg.state_dict(), tmp_path / "segresnet.safetensors")
    method = External("monai", str(tmp_path / "segresnet.safetensors"), arch="segresnet")
    assert method.load_report["arch_kwargs"]["blocks_down"] == [1, 2, 2]
    assert method.image_encoder.feature_strides == [2, 4] and method.image_encoder.native_channels == 2


# ---- refusals -------------------------------------------------------------------------------------------------
def test_2d_model_refused_on_volumes(
    tmp_path: Path, workdir: Path, phantom_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = resnet18_file(tmp_path / "r18.pth")
    tv = ["method=external", "external.format=torchvision", f"external.path={path}", "external.arch=resnet18"]
    with caplog.at_level(logging.WARNING, logger="medvlp_bench"):
        assert evaluate(resolve([*tv, "task=phantom_ct_cls", *RUN, *cache(phantom_cache)])) == []
    assert "it is a 2D model (torchvision) and the task's data are 3D volumes" in caplog.text
    assert "only 1-channel images are adapted" in External("torchvision", str(path), arch="resnet18").input_gap(2, 4)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_wrong_path_missing_file_and_mismatched_architecture_are_one_line_errors(
    tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["run", "method=external", "external.format=open_clip", f"external.path={tmp_path / 'nope'}",
                 "task=phantom_cxr_cls", "logger=none"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"external.path={tmp_path / 'nope'}: no such folder" in err

    assert main(["run", "method=external", "task=phantom_cxr_cls", "logger=none"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"medbench run: error: external.format is not set; choose one of {', '.join(FORMATS)} and set external.path"
    )
    folder = open_clip_folder(tmp_path / "noweights")
    (folder / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError) as e:
        External("open_clip", str(folder))
    assert "no weights file (looked for open_clip_model.safetensors" in one_line(e)

    path, _ = resnet18_file(tmp_path / "r18.pth")
    with pytest.raises(ConfigError) as e:
        External("torchvision", str(path), arch="resnet34")
    assert "96 of the 216 tensors of torchvision resnet34 are not in the file (layer3.* (48)," in one_line(e)
    with pytest.raises(ConfigError) as e:
        External("torchvision", str(path), arch="resnet50")
    assert "architecture mismatch with torchvision resnet50" in one_line(e)
    wide = open_clip_folder(tmp_path / "wide", width=64)
    (folder / "open_clip_pytorch_model.bin").write_bytes((wide / "open_clip_pytorch_model.bin").read_bytes())
    with pytest.raises(ConfigError) as e:
        External("open_clip", str(folder))
    assert "architecture mismatch with the open_clip model" in one_line(e)
    with pytest.raises(ConfigError) as e:
        External("monai", str(path), arch="swin_unetr")
    assert "architecture mismatch: none of its 122 tensors is named like a tensor of MONAI swin_unetr" in one_line(e)
    with pytest.raises(ConfigError) as e:
        External("onnx", str(path))
    assert one_line(e) == f"external.format='onnx' is not a known format; choose one of {', '.join(FORMATS)}"


def test_a_file_that_needs_unpickling_is_refused(tmp_path: Path) -> None:
    _, model = resnet18_file(tmp_path / "r18.pth")
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(ConfigError) as e:
        External("torchvision", str(tmp_path / "pickled.pth"), arch="resnet18")
    assert "refused by torch.load(weights_only=True)" in one_line(e)


# ---- config: the typed form, names, a user's yaml in a suite --------------------------------------------------
def test_external_keys_alias_method_model_and_name_the_rows() -> None:
    typed = ["method=external", "task=phantom_cxr_cls", "external.format=hf", "external.path=/m/biomedclip/"]
    cfg = compose("run", typed)
    assert (cfg.method.model.format, cfg.names.method) == ("hf", "external-biomedclip")
    cfg = compose("run", ["method=external", "task=phantom_cxr_cls", "external.path=/m/r.pth", "external.name=radnet"])
    assert cfg.names.method == "radnet"
    twin = ["external.path=null", "external.arch=resnet50", "external.init=random"]  # its untrained twin: not its rows
    assert compose("run", ["method=external", "task=phantom_cxr_cls", *twin]).names.method == "external-resnet50-random"


def test_user_yaml_names_a_model_and_runs_in_a_suite(tmp_path: Path, workdir: Path, monkeypatch) -> None:
    path, _ = resnet18_file(tmp_path / "r18.pth")
    user = tmp_path / "my_configs"
    (user / "method").mkdir(parents=True)
    (user / "suite").mkdir()
    (user / "method" / "my_resnet.yaml").write_text(
        f"defaults: [external, _self_]\nmodel: {{format: torchvision, path: {path}, arch: resnet18, input_size: 32}}\n"
    )
    suite = {"methods": ["my_resnet"], "tasks": ["phantom_cxr_cls", "phantom_ct_cls"], "seeds": [0],
             "label_fractions": [0.5], "overrides": [*RUN, "task.max_epochs=2", "task.patience=1"]}  # fmt: skip
    (user / "suite" / "mine.yaml").write_text(json.dumps(suite))
    monkeypatch.setenv("MEDBENCH_CONFIG_PATH", str(user))
    report = bench(*compose_bench(["suite=mine"]))
    assert report.done == ["phantom_cxr_cls__my_resnet__linear__f0.5__s0"] and not report.failed
    assert report.inapplicable == ["phantom_ct_cls__my_resnet__linear__f0.5__s0"]  # a 2D model, 3D data


def test_list_shows_the_formats_and_the_tasks_on_your_own_data(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for fmt in FORMATS:
        assert f"  {fmt}: " in out
    line = next(x for x in out.splitlines() if x.startswith("tasks on your own data"))
    own = ("imagefolder_cls", "image_text_cls", "image_text_retrieval", "image_text_zeroshot", "nifti_folder_seg")
    assert set(own) <= set(line.split(": ", 1)[1].split(", "))
