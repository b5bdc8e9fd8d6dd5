"""The shared segmentation decoder: one small network for every method, so a Dice gap is the encoder's.

The decoder reads ``ImageFeatures.maps`` (fine -> coarse) with the encoder's ``feature_channels`` and
``feature_strides``, and works for any of them in 2D or 3D:

- **Strided maps** (ResNet, Swin): a U-Net top-down path. The coarsest map is upsampled step by step
  (transposed convolution, as UNETR's ``UnetrUpBlock``), concatenated with the next finer map and refined
  by a residual block.
- **Maps at one resolution** (ViT: every map is at the patch grid): UNETR's reading. The deepest map keeps
  the patch stride; each shallower one is upsampled progressively by ``UnetrPrUpBlock`` to half the
  stride of the next deeper one (patch 16: 16, 8, 4, 2), which turns the maps into a pyramid, and the same
  top-down path follows.

Both end, as UNETR does, with a full-resolution level that reads the image itself (``encoder1`` in UNETR),
kept to one narrow convolution each way because in 3D it would otherwise cost more than a small encoder,
and a 1x1 output convolution. Widths double per level as in a U-Net (16 at stride 2, up to 64).

Odd input sizes give maps whose sizes are not exact multiples; an upsampled map is resized to its skip's
size (a one-voxel correction) instead of failing. Instance norm needs more than one voxel per map, so the
coarsest map may be 1 voxel (it is only projected) but the others may not: with stride-32 encoders the
input must be at least 17 voxels per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrPrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import Tensor, nn

from .encoders import ImageEncoder


def pyramid_strides(strides: Sequence[int], min_stride: int = 2) -> list[int]:
    """Target stride of each map (fine -> coarse): maps sharing a stride are spread UNETR-style.

    Within a run of maps at the same stride, the deepest keeps it and each shallower one gets half the
    stride of the next deeper one, never below ``min_stride`` (the image itself is the stride-1 level).
    """
    out = [int(s) for s in strides]
    for i in range(len(out) - 2, -1, -1):
        if out[i] >= out[i + 1]:
            out[i] = max(out[i + 1] // 2, min(min_stride, out[i]))
    return out


def _ratio(coarse: int, fine: int) -> int:
    r = coarse / fine
    if r < 1 or r != int(r):
        raise ValueError(f"decoder needs integer stride ratios between levels, got {coarse}/{fine}")
    return int(r)


class _UpBlock(nn.Module):
    """Upsample by an integer ``ratio`` (transposed conv; 1x1 conv at ratio 1), match the skip, fuse.

    ``light`` fuses with one conv instead of a residual block: used at full resolution, where a 3D
    residual block would cost more than a small encoder.
    """

    def __init__(self, dims: int, in_ch: int, skip_ch: int, out_ch: int, ratio: int, norm: str, light: bool) -> None:
        super().__init__()
        self.up = get_conv_layer(dims, in_ch, out_ch, kernel_size=ratio, stride=ratio, is_transposed=ratio > 1)
        if light:
            self.fuse = get_conv_layer(dims, out_ch + skip_ch, out_ch, kernel_size=3, norm=norm, conv_only=False)
        else:
            self.fuse = UnetResBlock(dims, out_ch + skip_ch, out_ch, kernel_size=3, stride=1, norm_name=norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        if x.shape[2:] != skip.shape[2:]:  # odd input sizes: encoders round up or down per stage
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.fuse(torch.cat([x, skip], dim=1))


class SegDecoder(nn.Module):
    """UNETR/U-Net-style decoder over an encoder's multi-scale maps; returns logits at input resolution.

    Args:
        spatial_dims, in_channels: of the image (the full-resolution level reads the image itself).
        feature_channels, feature_strides: of the encoder's maps, fine -> coarse.
        out_channels: number of classes, background included.
        channels: decoder width at stride 2, doubled per level up to ``max_channels`` (as in a U-Net).
        stem_channels: width of the full-resolution level (one conv each way: the costly level in 3D).
        norm: MONAI norm name (instance norm, as UNETR; independent of the batch size).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        out_channels: int,
        *,
        channels: int = 16,
        max_channels: int = 64,
        stem_channels: int = 8,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if len(feature_channels) != len(feature_strides) or not feature_channels:
            raise ValueError(
                f"encoder must declare one channel count and stride per map, got {feature_channels}/{feature_strides}"
            )
        self.strides = pyramid_strides(feature_strides)
        widths = [min(channels * max(t // 2, 1), max_channels) for t in self.strides]
        self.adapters = nn.ModuleList(
            self._adapter(spatial_dims, c, int(s), t, w, norm)
            for c, s, t, w in zip(feature_channels, feature_strides, self.strides, widths)
        )
        self.ups = nn.ModuleList(
            _UpBlock(spatial_dims, widths[i + 1], widths[i], widths[i], self._ratio_at(i), norm, light=False)
            for i in range(len(self.strides) - 1)
        )
        self.stem = get_conv_layer(spatial_dims, in_channels, stem_channels, kernel_size=3, norm=norm, conv_only=False)
        self.up_stem = _UpBlock(
            spatial_dims, widths[0], stem_channels, stem_channels, self.strides[0], norm, light=True
        )
        self.head = UnetOutBlock(spatial_dims, stem_channels, out_channels)

    def _ratio_at(self, i: int) -> int:
        return _ratio(self.strides[i + 1], self.strides[i])

    @staticmethod
    def _adapter(dims: int, in_ch: int, stride: int, target: int, out_ch: int, norm: str) -> nn.Module:
        """Bring one map to the decoder width and, for ViT maps, to its pyramid stride."""
        if target == stride:  # a 1x1 projection: no norm, so a 1-voxel coarsest map (32^3 input) is fine
            return get_conv_layer(dims, in_ch, out_ch, kernel_size=1, stride=1)
        steps = _ratio(stride, target)
        if steps & (steps - 1):
            raise ValueError(f"progressive upsampling needs a power-of-two ratio, got {stride}/{target}")
        return UnetrPrUpBlock(
            dims,
            in_ch,
            out_ch,
            num_layer=int(math.log2(steps)) - 1,
            kernel_size=3,
            stride=1,
            upsample_kernel_size=2,
            norm_name=norm,
            conv_block=True,
            res_block=True,
        )

    @classmethod
    def for_encoder(
        cls, encoder: ImageEncoder, out_channels: int, spatial_dims: int | None = None, **kw: int | str
    ) -> SegDecoder:
        """The decoder matching ``encoder``'s maps (the one every method gets). ``spatial_dims``: of the task's
        images, for encoders that take 2D and 3D (UniMedI's); default the encoder's own."""
        return cls(
            spatial_dims or encoder.spatial_dims,
            encoder.in_channels,
            encoder.feature_channels,
            encoder.feature_strides,
            out_channels,
            **kw,
        )

    def forward(self, image: Tensor, maps: Sequence[Tensor]) -> Tensor:
        if len(maps) != len(self.adapters):
            raise ValueError(f"decoder built for {len(self.adapters)} feature maps, got {len(maps)}")
        feats = [a(m) for a, m in zip(self.adapters, maps)]
        x = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            x = self.ups[i](x, feats[i])
        return self.head(self.up_stem(x, self.stem(image)))
