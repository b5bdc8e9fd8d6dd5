"""UniMedI's image encoder: one ViT for 2D and 3D inputs, built from MONAI blocks.

A 2D and a 3D ``PatchEmbeddingBlock`` (each with its own learnable position embedding, sized from the
configured 2D and 3D image sizes) feed the *same* ``TransformerBlock`` stack, so X-rays, CT volumes and CT
slices are tokenised differently but share every transformer weight. The input's ndim picks the path per
call (``[B, C, H, W]`` -> 2D, ``[B, C, D, H, W]`` -> 3D). Inputs whose patch grid differs from the configured
one (e.g. a 64x64 CT slice through the 2D path built for 128x128 X-rays) get their position embedding
interpolated to the grid, the usual ViT resolution trick. An optional token mask replaces masked patch
embeddings by a learnable ``[MASK]`` embedding (before the position embedding is added), which is how the
self-distillation student sees a masked image while its tokens stay aligned with the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn

from medvlp_bench.encoders import ImageEncoder, evenly_spaced_layers
from medvlp_bench.types import ImageFeatures


class UniMedIViT(ImageEncoder):
    """Shared-weight ViT for 2D and 3D images (see the module docstring).

    Args:
        img_size_2d, img_size_3d: sizes the 2D/3D position embeddings are made for; other sizes divisible
            by ``patch_size`` work through interpolation.
        patch_size: isotropic patch edge for both paths, so ``feature_strides`` is one number for 2D and 3D.
        num_maps: how many hidden states (at evenly spaced depths) are returned as ``maps`` for UNETR-style
            decoders.
    """

    #: per call the input decides; 3 is reported for code that reads a single value (documented)
    spatial_dims: int = 3
    supported_spatial_dims: tuple[int, ...] = (2, 3)

    def __init__(
        self,
        in_channels: int = 1,
        img_size_2d: int | Sequence[int] = 128,
        img_size_3d: int | Sequence[int] = 64,
        patch_size: int = 16,
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_layers: int = 6,
        num_heads: int = 3,
        num_maps: int = 4,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"UniMedIViT: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, int(patch_size), hidden_size
        self.img_size = {2: ensure_tuple_rep(img_size_2d, 2), 3: ensure_tuple_rep(img_size_3d, 3)}
        for dims, size in self.img_size.items():
            if any(s % self.patch_size for s in size):
                raise ValueError(f"UniMedIViT: img_size_{dims}d {size} must be divisible by patch_size {patch_size}")
        self.embed = nn.ModuleDict(
            {
                f"{d}d": PatchEmbeddingBlock(
                    in_channels=in_channels,
                    img_size=self.img_size[d],
                    patch_size=self.patch_size,
                    hidden_size=hidden_size,
                    num_heads=num_heads,
                    dropout_rate=dropout_rate,
                    spatial_dims=d,
                )
                for d in (2, 3)
            }
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=qkv_bias, use_flash_attention=True)
            for _ in range(num_layers)
        )
        for blk in self.blocks:  # MONAI builds this norm even without cross-attention; unused, it would break DDP
            blk.norm_cross_attn = nn.Identity()
        self.norm = nn.LayerNorm(hidden_size)
        self.map_layers = evenly_spaced_layers(num_layers, num_maps)
        self.feature_channels = [hidden_size] * num_maps
        self.feature_strides = [self.patch_size] * num_maps
        self.out_dim = hidden_size

    def grid(self, image: Tensor) -> tuple[int, ...]:
        """Patch grid of an input (checked: 2D or 3D, channels, divisible by the patch size)."""
        dims = image.ndim - 2
        if dims not in self.supported_spatial_dims:
            raise ValueError(f"UniMedIViT takes [B, C, H, W] or [B, C, D, H, W], got shape {tuple(image.shape)}")
        if image.shape[1] != self.in_channels:
            raise ValueError(f"UniMedIViT built for {self.in_channels} channel(s), got {image.shape[1]}")
        spatial = tuple(image.shape[2:])
        if any(s % self.patch_size for s in spatial):
            raise ValueError(f"UniMedIViT: input size {spatial} must be divisible by patch_size {self.patch_size}")
        return tuple(s // self.patch_size for s in spatial)

    def position_embedding(self, dims: int, grid: tuple[int, ...]) -> Tensor:
        """[1, N, C] learnable position embedding of the ``dims`` path, interpolated when the grid differs."""
        pos = self.embed[f"{dims}d"].position_embeddings
        base = tuple(s // self.patch_size for s in self.img_size[dims])
        if grid == base:
            return pos
        mode = "bilinear" if dims == 2 else "trilinear"
        pos = pos.transpose(1, 2).reshape(1, self.hidden_size, *base)
        pos = F.interpolate(pos, size=grid, mode=mode, align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def tokenize(self, image: Tensor, mask: Tensor | None = None) -> tuple[Tensor, tuple[int, ...]]:
        """Patch tokens [B, N, C] with position embedding; ``mask`` [B, N] (True = hidden) swaps in [MASK]."""
        grid = self.grid(image)
        dims = image.ndim - 2
        block = self.embed[f"{dims}d"]
        x = block.patch_embeddings(image).flatten(2).transpose(1, 2)
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(f"token mask must be [B, N] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return block.dropout(x + self.position_embedding(dims, grid)), grid

    def forward(self, image: Tensor, mask: Tensor | None = None) -> ImageFeatures:
        x, grid = self.tokenize(image, mask)
        maps = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.map_layers:
                maps.append(x.transpose(1, 2).reshape(x.shape[0], self.hidden_size, *grid))
        x = self.norm(x)
        return ImageFeatures(pooled=x.mean(1), maps=maps, tokens=x)
