"""The two towers CLIP, UMCL, GTGM and UniMedI share (``methods/two_tower.py``): one definition of the embeddings
and the temperature, and the module order and random draws that old checkpoints and results depend on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medvlp_bench.encoders import ImageEncoder, build_image_encoder
from medvlp_bench.method import ProjectionHead
from medvlp_bench.methods.clip import CLIP
from medvlp_bench.methods.gtgm import GTGM, GTGMHead, projection_head
from medvlp_bench.methods.two_tower import TwoTower
from medvlp_bench.methods.umcl import UMCL, PromptLearner
from medvlp_bench.methods.unimedi import UniMedI
from medvlp_bench.text import TextEncoder, build_text_encoder

SHARED = ("embed_image", "embed_text", "project_image", "project_text", "contrast_scale")


def _encoders() -> tuple[ImageEncoder, TextEncoder]:
    torch.manual_seed(0)
    return build_image_encoder("resnet_tiny", 2), build_text_encoder("bert_tiny", hidden=32, layers=1)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cls", [CLIP, UMCL, GTGM, UniMedI])
def test_methods_use_the_one_two_tower_definition(cls: type) -> None:
    assert issubclass(cls, TwoTower)
    assert all(getattr(cls, name) is getattr(TwoTower, name) for name in SHARED)


def test_clip_and_umcl_draw_their_heads_as_before_under_a_seed() -> None:
    """Projections right after the encoders, UMCL's prompt after them: the initial weights of old runs."""
    clip = CLIP(*_encoders(), embed_dim=8, proj_hidden=16)
    image, text = _encoders()
    assert _same(clip.image_proj, ProjectionHead(image.out_dim, 8, 16))
    assert _same(clip.text_proj, ProjectionHead(text.out_dim, 8, 16))
    assert [n for n, _ in clip.named_children()] == ["image_encoder", "text_encoder", "image_proj", "text_proj"]
    assert next(iter(clip.state_dict())) == "logit_scale"
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))

    umcl = UMCL(*_encoders(), vocabulary="phantom_cxr", embed_dim=8)
    image, text = _encoders()
    heads = ProjectionHead(image.out_dim, 8), ProjectionHead(text.out_dim, 8)
    assert _same(umcl.image_proj, heads[0]) and _same(umcl.text_proj, heads[1])
    assert _same(umcl.prompt, PromptLearner(8, text.out_dim))
    assert [n for n, _ in umcl.named_children()][2:] == ["image_proj", "text_proj", "prompt"]


def test_gtgm_registers_the_head_before_its_projections_and_keeps_a_fixed_temperature() -> None:
    gtgm = GTGM(*_encoders(), head_dim=16, head_norm="batch", proj_hidden=12, embed_dim=8)
    image, text = _encoders()
    head = GTGMHead(2, image.out_dim, 16, "batch")
    assert _same(gtgm.image_head, head)
    assert _same(gtgm.image_proj, projection_head(16, 12, 8))
    assert _same(gtgm.text_proj, projection_head(text.out_dim, 12, 8))
    assert [n for n, _ in gtgm.named_children()] == [
        "image_encoder",
        "text_encoder",
        "image_head",
        "image_proj",
        "text_proj",
    ]
    assert gtgm.temperature == 0.07 and "logit_scale" not in dict(gtgm.named_parameters())
    gtgm.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(gtgm.embed_image(x), gtgm.project_image(gtgm.head_features(x)))


def test_contrast_scale_caps_at_100_and_umcl_floors_at_1() -> None:
    clip, umcl = CLIP(*_encoders(), embed_dim=8), UMCL(*_encoders(), vocabulary="phantom_cxr", embed_dim=8)
    with torch.no_grad():
        for m in (clip, umcl):
            m.logit_scale.fill_(10.0)
            assert m.contrast_scale().item() == pytest.approx(100.0)
            m.logit_scale.fill_(-1.0)
    assert clip.contrast_scale().item() == pytest.approx(math.exp(-1.0))
    assert umcl.contrast_scale().item() == 1.0
