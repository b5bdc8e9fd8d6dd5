"""GTGM: Barlow-Twins term by hand, the released head, loss assembly, views, text freezing, CPU size, generated text
(phantom lesions, determinism, cache, HF), fit."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from monai.networks.blocks import UnetrBasicBlock
from monai.transforms import OneOf, RandGaussianNoise, RandGaussianSmooth

from medvlp_bench.config import compose, instantiate, tiny_overrides
from medvlp_bench.datasets.phantoms import PhantomDataModule
from medvlp_bench.encoders import count_parameters
from medvlp_bench.losses import clip_loss
from medvlp_bench.methods.gtgm import GTGM, GTGMHead, cross_correlation_loss
from medvlp_bench.methods.gtgm_textgen import NO_FINDING, TextSource, build_generator, measure
from medvlp_bench.methods.gtgm_views import ViewMaker


def test_barlow_twins_raw_matches_hand_computation() -> None:
    z1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # C = z1^T z2 / 2 = [[0.5, 1.5], [1, 2]]: on = 0.25 + 1, off = 2.25 + 1, (on + 0.0051 off) / 2
    expected = (1.25 + 0.0051 * 3.25) / 2
    assert cross_correlation_loss(z1, z2, 0.0051).item() == pytest.approx(expected, rel=1e-6)
    # standardised columns: z1n = [[-1, -1], [1, 1]], z2n = [[1, -1], [-1, 1]] -> C = [[-1, 1], [-1, 1]]
    assert cross_correlation_loss(z1, z2, 0.0051, standardize=True).item() == pytest.approx(4 + 0.0051 * 2, rel=1e-4)


def _method_and_data(
    cache: Path, tmp: Path, task: str = "phantom_ct_cls", **extra: object
) -> tuple[GTGM, PhantomDataModule]:
    overrides = [
        "method=gtgm",
        f"task={task}",
        "task.data.size=32",
        "task.data.n_train=8",
        "task.data.n_val=4",
        "task.data.n_test=2",
        f"task.data.cache_dir={cache}",
        f"method.model.textgen.cache_dir={tmp / 'text'}",
        "method.model.views.crop_fraction=0.75",
        *tiny_overrides("gtgm"),
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    cfg = compose("run", overrides)
    torch.manual_seed(0)
    return instantiate(cfg.method.model), instantiate(cfg.task.data)


def test_loss_is_two_clip_terms_plus_weighted_barlow_twins(phantom_cache: Path, tmp_path: Path) -> None:
    m, dm = _method_and_data(phantom_cache, tmp_path)
    batch = next(iter(dm.loader("train", train=True, batch_size=4)))
    m.train()
    torch.manual_seed(1)
    out = m.pretrain_step(batch)
    assert torch.isfinite(out["loss"])
    parts = out["clip_view1"] + out["clip_view2"] + 0.01 * out["barlow_twins"]
    assert out["loss"].item() == pytest.approx(parts.item(), rel=1e-5)
    # the released code sums both directions: 2 x open_clip's mean, at the fixed temperature 0.07
    torch.manual_seed(1)
    tok = m.text_encoder.tokenizer(m.texts_for(batch))
    txt = m.embed_text(tok)
    v1 = torch.nn.functional.normalize(m.image_proj(m.head_features(m.view(batch["image"]))), dim=-1)
    assert out["clip_view1"].item() == pytest.approx(2 * clip_loss(v1, txt, 1 / 0.07).item(), rel=1e-4)
    # texts come from the pixels, never from the phantom reports
    assert all(t.startswith("scan") for t in m.texts_for(batch))  # no datamodule here: the generic context
    assert not set(m.texts_for(batch)) & set(batch["report"])


def test_head_is_the_released_encoder10_pool_linear_by_hand() -> None:
    """With encoder10's convolutions zeroed, its residual block is LeakyReLU(x): head(x) = W mean(lrelu(x)) + b."""
    head = GTGMHead(3, 4, out_dim=3, norm="instance")
    assert isinstance(head.encoder10, UnetrBasicBlock)
    with torch.no_grad():
        for conv in (head.encoder10.layer.conv1.conv, head.encoder10.layer.conv2.conv):
            conv.weight.zero_()
        head.linear.weight.copy_(torch.arange(12.0).reshape(3, 4))
        head.linear.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.tensor([-2.0, 0.0, 2.0, 4.0]).reshape(1, 4, 1, 1, 1).expand(1, 4, 2, 1, 1).contiguous()
    x[:, :, 1] *= 3  # per channel: mean over the two voxels of lrelu(x)
    pooled = torch.tensor([(-0.02 - 0.06) / 2, 0.0, (2 + 6) / 2, (4 + 12) / 2])
    expected = torch.arange(12.0).reshape(3, 4) @ pooled + torch.tensor([1.0, 0.0, -1.0])
    assert torch.allclose(head(x)[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="head_norm=batch"):
        head(torch.randn(2, 4, 1, 1, 1))  # instance statistics over one voxel are undefined (32^3 inputs)


def test_projection_and_barlow_twins_act_on_the_released_head_output(phantom_cache: Path, tmp_path: Path) -> None:
    """Before version 2 both read the LayerNorm-ed, pooled Swin stage (192-d here), whose per-sample mean is 0:
    C @ 1 = 0, so Barlow-Twins' identity target was out of reach. Now both read the head's ``head_dim`` output."""
    m, dm = _method_and_data(phantom_cache, tmp_path, **{"method.model.head_dim": 40})
    assert m.image_encoder.out_dim == 192 and m.image_head.linear.in_features == 192
    assert m.image_head.out_dim == 40 and m.image_proj[0].in_features == 40
    batch = next(iter(dm.loader("train", train=True, batch_size=4)))
    seen: list[torch.Tensor] = []
    hook = m.image_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    m.train()
    torch.manual_seed(3)
    out = m.pretrain_step(batch)
    hook.remove()
    assert [t.shape for t in seen] == [(4, 40), (4, 40)]
    assert out["barlow_twins"].item() == pytest.approx(cross_correlation_loss(*seen).item(), rel=1e-5)
    torch.manual_seed(3)
    m.embed_text(m.text_encoder.tokenizer(m.texts_for(batch)))  # same RNG path as the step up to the views
    h1 = m.head_features(m.view(batch["image"]))
    assert torch.allclose(h1, seen[0], atol=1e-5)
    pooled = m.encode_image(batch["image"])  # what probes read: the trunk, not the head
    assert pooled.shape == (4, 192) and torch.allclose(pooled.sum(-1), torch.zeros(4), atol=1e-3)
    assert not torch.allclose(h1.sum(-1), torch.zeros(4), atol=1e-3)


def test_text_tower_freezes_the_first_layers_and_trains_the_embeddings(phantom_cache: Path, tmp_path: Path) -> None:
    m, _ = _method_and_data(phantom_cache, tmp_path)
    bert = m.text_encoder.model
    assert all(not p.requires_grad for p in bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in bert.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in bert.embeddings.parameters())  # released: only encoder.layer[:6]


def test_text_freeze_options_are_separate_and_checked() -> None:
    from medvlp_bench.text import build_text_encoder

    def frozen(**kw: object) -> tuple[bool, list[bool]]:
        bert = build_text_encoder("bert_tiny", hidden=16, layers=2, heads=2, **kw).model
        layers = [not any(p.requires_grad for p in layer.parameters()) for layer in bert.encoder.layer]
        return not any(p.requires_grad for p in bert.embeddings.parameters()), layers

    assert frozen(freeze_layers=1) == (True, [True, False])  # None: the historical coupling other methods use
    assert frozen(freeze_layers=1, freeze_embeddings=False) == (False, [True, False])
    assert frozen(freeze_layers=0, freeze_embeddings=True) == (True, [False, False])
    assert frozen(freeze_layers=2, freeze_embeddings=False) == (False, [True, True])
    with pytest.raises(ValueError, match="freeze_layers=6 but the text encoder has 2 layers"):
        frozen(freeze_layers=6)


def test_views_crop_and_keep_directions_named_by_the_text(phantom_cache: Path, tmp_path: Path) -> None:
    m, dm = _method_and_data(phantom_cache, tmp_path)
    m._source = TextSource(build_generator(m.textgen_cfg, dm), None)  # phantom_ct: all axes have direction words
    assert m.view_maker.active == ["intensity", "noise", "blur"]  # no flip, no rotation
    m.views_cfg["perturbations"] = ["flip", "rotate90"]
    m._views = None
    assert m.view_maker.active == []
    x = torch.arange(2 * 32**3, dtype=torch.float32).reshape(2, 1, 32, 32, 32)
    m.train()
    v = m.view(x)
    assert v.shape == (2, 1, 24, 24, 24)
    # a plain crop: values step by 32*32 per slice, 32 per row, 1 per column
    assert torch.all(v[:, 0, 1:] - v[:, 0, :-1] == 1024) and torch.all(v[:, 0, :, 1:] - v[:, 0, :, :-1] == 32)
    assert torch.all(v[:, 0, :, :, 1:] - v[:, 0, :, :, :-1] == 1)
    m.eval()
    assert torch.equal(m.view(x), x[:, :, 4:28, 4:28, 4:28])


def test_views_differ_follow_the_seed_and_use_the_configured_transforms() -> None:
    x = torch.rand(3, 1, 16, 16, 16)
    vm = ViewMaker(3, perturbations=["noise", "blur"], pick="one")
    assert isinstance(vm._perturb, OneOf)
    assert [type(t) for t in vm._perturb.transforms] == [RandGaussianNoise, RandGaussianSmooth]
    torch.manual_seed(0)
    a, b = vm(x), vm(x)
    torch.manual_seed(0)
    assert torch.equal(vm(x), a) and not torch.equal(a, b)  # seeded by torch, different per call
    assert torch.equal(vm(x, train=False), x[:, :, 2:14, 2:14, 2:14])


def test_rotation_turns_the_in_plane_axes_of_a_crop() -> None:
    """Released: np.rot90 in the (H, W) plane; each view is a crop of x rotated by k * 90 degrees, k in 1..3."""
    x = torch.arange(4 * 16**3, dtype=torch.float32).reshape(4, 1, 16, 16, 16)
    vm = ViewMaker(3, crop_fraction=1.0, perturbations=["rotate90"])
    torch.manual_seed(1)
    views = vm(x)
    ks = [next(k for k in (1, 2, 3) if torch.equal(v, torch.rot90(s, k, (2, 3)))) for v, s in zip(views, x)]
    assert len(ks) == 4 and not torch.equal(views, x)
    with pytest.raises(ValueError, match="square in-plane crop"):
        vm(torch.zeros(1, 1, 16, 16, 8))
    with pytest.raises(ValueError, match=r"unknown \['mixup'\]; allowed \['flip', 'rotate90'"):
        ViewMaker(3, perturbations=["flip", "mixup"])
    with pytest.raises(ValueError, match="pick must be one of"):
        ViewMaker(3, pick="some")


def test_cpu_default_encoder_is_of_resnet_small_size_and_shared_with_scratch_swin() -> None:
    """The default (not tiny) encoder: the paper's 8.3M-parameter SwinUNETR was 9x resnet_small (0.9M)."""
    sizes = {}
    for method in ("gtgm", "scratch_swin", "scratch"):
        cfg = compose("run", [f"method={method}", "task=phantom_ct_cls"])
        sizes[method] = count_parameters(instantiate(cfg.method.model.image_encoder))
    assert sizes["gtgm"] == sizes["scratch_swin"]
    assert 0.4 < sizes["gtgm"] / sizes["scratch"] < 1.5, sizes


@pytest.fixture(scope="module")
def ct64(tmp_path_factory: pytest.TempPathFactory) -> PhantomDataModule:
    cache = tmp_path_factory.mktemp("ct64")
    return PhantomDataModule("ct", size=64, n_train=1, n_val=1, n_test=40, cache_dir=str(cache), target="mask")


def test_describe_mentions_phantom_lesions_and_invents_none(ct64: PhantomDataModule) -> None:
    """Measured on phantom_ct 64^3 (indices 0-39, data seed 0): liver lesions 0.65 mentioned, 1 of 19 lesion-free
    volumes with a false mention; kidney lesions (small, exophytic, partial-volumed) are mostly missed."""
    gen = build_generator({"backend": "describe", "seed": 0}, ct64)
    ds, meta = ct64.dataset("test"), ct64.manifest.set_index("id")["meta"]
    liver, free, located = [], [], []
    for i in range(len(ds)):
        s = ds[i]
        image, truth = s["image"].numpy(), s["mask"].numpy()[0] == 4
        text = gen(image, s["id"])
        mentioned = not any(n in text for n in NO_FINDING)
        kinds = [k for k in meta[s["id"]]["findings"] if k.endswith("lesion")]
        if "liver_lesion" in kinds:
            liver.append(mentioned)
        if not kinds:
            free.append(mentioned)
        if mentioned and kinds:
            assert " cm hypodense " in text and " HU " in text
            top = measure(image, gen.ctx)["findings"][0]
            centre = tuple(int(round((p + 1) * 63 / 2)) for p in top["position"])
            near = truth[tuple(slice(max(c - 2, 0), c + 3) for c in centre)]
            located.append(bool(near.any()))
    assert len(liver) >= 10 and len(free) >= 10
    assert np.mean(liver) >= 0.5, f"liver lesions mentioned in {np.mean(liver):.2f}"
    assert np.mean(free) <= 0.15, f"false mentions in {np.mean(free):.2f} of lesion-free volumes"
    assert np.mean(located) >= 0.8, f"largest finding on a true lesion in {np.mean(located):.2f}"


def test_describe_is_deterministic_per_seed_and_cached(ct64: PhantomDataModule, tmp_path: Path) -> None:
    ds = ct64.dataset("test")
    samples = [ds[i] for i in range(6)]
    cfg = {"backend": "describe", "seed": 3}
    a, b = TextSource(build_generator(cfg, ct64), tmp_path), TextSource(build_generator(cfg, ct64), tmp_path)
    first = [a.text(s["image"].numpy(), s["id"]) for s in samples]
    assert a.generated == 6 and len(list(a.cache.folder.glob("*.txt"))) == 6
    assert [b.text(s["image"].numpy(), s["id"]) for s in samples] == first and b.generated == 0
    other = TextSource(build_generator({**cfg, "seed": 4}, ct64), tmp_path)
    assert other.cache.folder != a.cache.folder
    again = [other.generator(s["image"].numpy(), s["id"]) for s in samples]
    assert again != first  # the phrasing varies with the seed, the measured numbers do not
    assert [sorted(re.findall(r"-?\d+(?:\.\d+)?", t)) for t in again] == [
        sorted(re.findall(r"-?\d+(?:\.\d+)?", t)) for t in first
    ]


def _tiny_blip(path: Path) -> None:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from medvlp_bench.text import minilm_path

    tok = BertTokenizer(str(minilm_path() / "vocab.txt"))
    size = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    ids = {"bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id}
    text = {**size, **ids, "vocab_size": len(tok), "max_position_embeddings": 64, "sep_token_id": tok.sep_token_id}
    vision = {**size, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(path)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(path)


def test_hf_captioner_backend_offline_deterministic_and_cached(ct64: PhantomDataModule, tmp_path: Path) -> None:
    _tiny_blip(tmp_path / "blip")
    cfg = {"backend": "hf", "seed": 0, "hf": {"path": str(tmp_path / "blip"), "slice": "random", "max_length": 8}}
    src = TextSource(build_generator(cfg, ct64), tmp_path / "cache")
    s = ct64.dataset("test")[0]
    text = src.text(s["image"].numpy(), s["id"])
    assert text.startswith("CT abdomen, ") and len(text) > len("CT abdomen, ")
    assert src.text(s["image"].numpy(), s["id"]) == text and src.generated == 1
    assert build_generator(cfg, ct64)(s["image"].numpy(), s["id"]) == text
    with pytest.raises(FileNotFoundError, match="hf.path"):
        build_generator({"backend": "hf", "hf": {"path": str(tmp_path / "missing")}})


@pytest.mark.parametrize(
    ("task", "header"),
    [("phantom_cxr_cls", "radiograph"), ("phantom_ct_cls", "CT")],
)
def test_short_fit_trains_what_it_should_and_prepares_texts_once(
    phantom_cache: Path, tmp_path: Path, task: str, header: str
) -> None:
    """2D and 3D (the tiny Swin's 4^3 windows make a 3D step cheap).

    No "the loss went down" check: on 8 phantoms whose generated texts differ only in a number or two, the
    image-text loss of an 8-step fit moves by noise (measured: 15.9 -> 16.1 or 19.4 -> 17.1 depending on the
    Swin's window size). That pre-training moves the encoder is measured at suite scale (``encoder_shift``,
    docs/methods/gtgm.md). Here: which parameters the optimiser moves, and the text cache.
    """
    extra = {"method.model.lr": 1e-3, "method.model.views.crop_fraction": 0.5}
    m, dm = _method_and_data(phantom_cache, tmp_path, task, **extra)
    dm.batch_size = 4
    bert = m.text_encoder.model
    before = {
        "trunk": [p.detach().clone() for p in m.image_encoder.parameters()],
        "head": [p.detach().clone() for p in m.image_head.parameters()],
        "text layer 1": [p.detach().clone() for p in bert.encoder.layer[1].parameters()],
        "text embeddings": [p.detach().clone() for p in bert.embeddings.parameters()],
        "frozen text layer 0": [p.detach().clone() for p in bert.encoder.layer[0].parameters()],
    }
    L.seed_everything(0, verbose=False)
    kw = dict(max_steps=8, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    L.Trainer(**kw, enable_model_summary=False, num_sanity_val_steps=0).fit(m, datamodule=dm)
    assert m.text_source.generated == 12  # the 8 training and 4 validation volumes, once each
    assert len(m._texts) == 12 and all(t.startswith(header) for t in m._texts.values())
    after = {
        "trunk": list(m.image_encoder.parameters()),
        "head": list(m.image_head.parameters()),
        "text layer 1": list(bert.encoder.layer[1].parameters()),
        "text embeddings": list(bert.embeddings.parameters()),
        "frozen text layer 0": list(bert.encoder.layer[0].parameters()),
    }
    moved = {k: any(not torch.equal(a, b) for a, b in zip(before[k], after[k])) for k in before}
    assert moved == {k: k != "frozen text layer 0" for k in before}
    L.Trainer(**{**kw, "max_steps": 1}, enable_model_summary=False, num_sanity_val_steps=0).fit(m, datamodule=dm)
    assert m.text_source.generated == 0  # the second run reads every text from the cache


def test_proxy_scores_gtgm_on_its_own_generated_text(phantom_cache: Path, tmp_path: Path) -> None:
    """The retrieval proxy pairs each volume with the text GTGM trains on, not with the corpus's report."""
    m, dm = _method_and_data(phantom_cache, tmp_path, "phantom_cxr_cls")
    m.eval()
    dm.tokenizer = m.text_encoder.tokenizer  # as run.pretrain sets it: the batch then carries the report
    batch = next(iter(dm.loader("val")))
    got = m.proxy_texts(batch)
    want = m.text_encoder.tokenizer(m.texts_for(batch))
    assert torch.equal(got["input_ids"].cpu(), want["input_ids"])
    assert not torch.equal(got["input_ids"].cpu(), batch["text"]["input_ids"])  # not the phantom report
