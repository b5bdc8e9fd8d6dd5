"""UniFormer (BrainMVP's released encoder): the authors' layout, maps at the declared strides, their axis order,
and a BrainMVP pre-training step on it."""

from __future__ import annotations

import pytest
import torch

from medvlp_bench.decoders import SegDecoder
from medvlp_bench.encoders import build_image_encoder, count_parameters
from medvlp_bench.methods.brainmvp import BrainMVP

#: key -> shape in BrainMVP's uniformer_small (models/uniformer_blocks.py of shaohao011/BrainMVP, in_chans=1)
SMALL_KEYS = {
    "patch_embed1.proj.weight": (64, 1, 2, 2, 2),
    "patch_embed1.norm.weight": (64,),
    "patch_embed4.proj.weight": (512, 320, 2, 2, 2),
    "blocks1.0.pos_embed.weight": (64, 1, 3, 3, 3),
    "blocks1.0.norm1.running_var": (64,),
    "blocks1.2.conv1.weight": (64, 64, 1, 1, 1),
    "blocks1.2.attn.weight": (64, 1, 5, 5, 5),
    "blocks2.3.mlp.fc2.weight": (128, 512, 1, 1, 1),
    "blocks3.7.attn.qkv.weight": (960, 320),
    "blocks3.7.attn.qkv.bias": (960,),
    "blocks3.7.attn.proj.weight": (320, 320),
    "blocks4.2.norm2.weight": (512,),
    "blocks4.2.mlp.fc1.weight": (2048, 512),
    "norm.running_mean": (512,),
}


def test_uniformer_small_has_the_authors_keys_shapes_and_size() -> None:
    enc = build_image_encoder("uniformer_small", spatial_dims=3, in_channels=1)
    state = enc.net.state_dict()
    assert len(state) == 329 and count_parameters(enc) == 22_038_464
    for key, shape in SMALL_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert [enc.net.get_submodule(f"blocks{i}.0.attn").num_heads for i in (3, 4)] == [5, 8]
    assert "blocks5.0.norm1.weight" not in state and "blocks1.3.conv1.weight" not in state  # depth 3, 4, 8, 3


@pytest.mark.parametrize(("dims", "size"), [(3, (32, 48, 16)), (3, (33, 35, 17)), (2, (32, 48))])
def test_maps_follow_the_strides_and_feed_the_shared_decoder(dims: int, size: tuple[int, ...]) -> None:
    enc = build_image_encoder("uniformer_tiny", spatial_dims=dims, in_channels=2).eval()
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        f = enc(x)
        logits = SegDecoder.for_encoder(enc, out_channels=3)(x, f.maps)
    assert enc.feature_strides == [2, 4, 8, 16] and enc.feature_channels == [16, 32, 48, 64]
    for m, c, s in zip(f.maps, enc.feature_channels, enc.feature_strides):
        assert tuple(m.shape) == (2, c, *(n // s for n in size))
    assert f.pooled.shape == (2, 64) and f.tokens.shape == (2, f.maps[-1][0, 0].numel(), 64)
    assert torch.isfinite(f.pooled).all() and all(torch.isfinite(m).all() for m in f.maps)
    assert logits.shape == (2, 3, *size) and torch.isfinite(logits).all()


def test_3d_trunk_runs_depth_first_and_maps_come_back_in_the_input_order() -> None:
    torch.manual_seed(0)
    ours = build_image_encoder("uniformer_tiny", spatial_dims=3).eval()
    plain = build_image_encoder("uniformer_tiny", spatial_dims=3, depth_last=False).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 48, 32, 16)  # (H, W, D): the authors' x.permute(0, 1, 4, 2, 3) gives (D, H, W)
    with torch.no_grad():
        got, theirs = ours(x).maps, plain(x.permute(0, 1, 4, 2, 3)).maps
    for a, b in zip(got, theirs):
        assert torch.allclose(a, b.permute(0, 1, 3, 4, 2), atol=1e-5)  # their decoder's permute(0, 1, 3, 4, 2)


def test_attention_is_softmax_qk_over_sqrt_head_dim() -> None:
    enc = build_image_encoder("uniformer_tiny", spatial_dims=3)
    attn = enc.net.blocks3[0].attn  # 48 wide, head_dim 16: 3 heads
    t = torch.randn(2, 10, 48)
    q, k, v = attn.qkv(t).view(2, 10, 3, 3, 16).unbind(2)
    w = torch.einsum("bnhd,bmhd->bhnm", q, k).div(16**0.5).softmax(-1)
    want = attn.proj(torch.einsum("bhnm,bmhd->bnhd", w, v).reshape(2, 10, 48))
    assert attn.num_heads == 3 and torch.allclose(attn(t), want, atol=1e-5)


def test_too_small_inputs_and_head_widths_fail_clearly() -> None:
    with pytest.raises(ValueError, match="16 voxels"):
        build_image_encoder("uniformer_tiny", spatial_dims=3)(torch.randn(1, 1, 32, 32, 8))
    with pytest.raises(ValueError, match="head_dim"):
        build_image_encoder("uniformer_tiny", spatial_dims=3, embed_dim=(16, 32, 50, 64))  # 3 heads of 50


def test_brainmvp_pretrains_and_adapts_its_stem_on_uniformer() -> None:
    torch.manual_seed(0)
    enc = build_image_encoder("uniformer_tiny", spatial_dims=3, in_channels=1)
    m = BrainMVP(enc, template_size=32, crop_size=32, block_size=8, template_norm="zscore")
    m.fixed_progress = 0.9  # cross-modal view 2 and the contrastive term on
    out = m.pretrain_step({"image": torch.randn(2, 4, 32, 32, 32)})
    assert torch.isfinite(out["loss"]) and out["contrast"] > 0
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.image_encoder.parameters())
    assert m.templates_no_decay.grad is not None

    m.channel_adapt = "inflate"
    stem = m.image_encoder.net.patch_embed1.proj.weight.detach().clone()
    m.adapt_to_input(4)  # the downstream 4-modality input: the patch embedding is what changes
    assert torch.allclose(m.image_encoder.net.patch_embed1.proj.weight, stem.repeat(1, 4, 1, 1, 1) / 4)
    feats = m.eval().image_features(torch.randn(1, 4, 32, 32, 32))
    assert feats.pooled.shape == (1, 64) and torch.isfinite(feats.pooled).all()
