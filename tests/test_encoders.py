"""Encoders in 2D and 3D, odd sizes included: shapes, strides and finiteness."""

from __future__ import annotations

import pytest
import torch

from medvlp_bench.encoders import PRESETS, build_image_encoder

CASES = [
    ("resnet_tiny", 2, 1, (33, 47)),
    ("resnet_tiny", 3, 1, (33, 34, 35)),
    ("resnet_tiny", 3, 4, (32, 32, 32)),
    ("vit_tiny", 2, 1, (32, 48)),
    ("vit_tiny", 3, 2, (16, 32, 24)),
    ("swin_tiny", 2, 1, (64, 64)),
    ("swin_tiny", 3, 1, (32, 32, 32)),
    ("brainmvp_unet_tiny", 2, 1, (32, 48)),
    ("brainmvp_unet_tiny", 3, 4, (16, 32, 24)),
]


@pytest.mark.parametrize(("name", "dims", "channels", "size"), CASES)
def test_encoder_outputs(name: str, dims: int, channels: int, size: tuple[int, ...]) -> None:
    kw = {"img_size": size} if name.startswith("vit") else {}
    enc = build_image_encoder(name, spatial_dims=dims, in_channels=channels, **kw).eval()
    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        f = enc(x)
    assert f.pooled.shape == (2, enc.out_dim)
    assert len(f.maps) == len(enc.feature_channels) == len(enc.feature_strides)
    for m, c in zip(f.maps, enc.feature_channels):
        assert m.shape[:2] == (2, c) and m.ndim == dims + 2
    assert f.tokens is not None and f.tokens.shape[0] == 2 and f.tokens.shape[-1] == enc.out_dim
    assert torch.isfinite(f.pooled).all() and all(torch.isfinite(m).all() for m in f.maps)


def test_resnet_maps_follow_declared_strides() -> None:
    enc = build_image_encoder("resnet_tiny", spatial_dims=2).eval()
    f = enc(torch.randn(1, 1, 64, 96))
    for m, s in zip(f.maps, enc.feature_strides):
        assert tuple(m.shape[2:]) == (64 // s, 96 // s)


def test_brainmvp_unet_maps_follow_strides_and_feed_the_shared_decoder() -> None:
    from medvlp_bench.decoders import SegDecoder

    enc = build_image_encoder("brainmvp_unet_tiny", spatial_dims=3).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    f = enc(x)
    for m, s in zip(f.maps, enc.feature_strides):
        assert tuple(m.shape[2:]) == (32 // s, 32 // s, 16 // s)
    logits = SegDecoder.for_encoder(enc, out_channels=3)(x, f.maps)
    assert logits.shape == (1, 3, 32, 32, 16) and torch.isfinite(logits).all()


def test_vit_rejects_wrong_size_with_clear_message() -> None:
    enc = build_image_encoder("vit_tiny", spatial_dims=2, img_size=32)
    with pytest.raises(ValueError, match="img_size"):
        enc(torch.randn(1, 1, 40, 40))


def test_unknown_encoder_lists_presets() -> None:
    with pytest.raises(KeyError, match="resnet_tiny"):
        build_image_encoder("nope", spatial_dims=2)
    assert "resnet50" in PRESETS and "vit_b16" in PRESETS


def test_gradients_reach_every_parameter() -> None:
    enc = build_image_encoder("resnet_tiny", spatial_dims=3)
    enc(torch.randn(2, 1, 32, 32, 32)).pooled.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
