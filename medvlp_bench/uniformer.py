"""The UniFormer trunk BrainMVP pre-trains (``models/uniformer_blocks.py`` of shaohao011/BrainMVP, itself after
Sense-X UniFormer's video model), rebuilt with the authors' module names and shapes so the ``encoder.uniformer.*``
weights of ``BrainMVP_uniformer.pt`` load by name. Wrapped as an :class:`~medvlp_bench.encoders.ImageEncoder` by
``encoders.UniFormerEncoder``.

Four stages. Each starts with a patch embedding (``patch_embed{i}``: kernel-2 stride-2 convolution ``proj``,
then ``norm``, a LayerNorm over channels with torch's default eps), so the strides are 2, 4, 8 and 16 (BrainMVP
uses patch 2 in every stage, where video UniFormer's stem is 4). Stages 1-2 hold convolutional ``CBlock``s,
stages 3-4 self-attention ``SABlock``s (``blocks{i}.{j}``); a BatchNorm (``norm``) ends stage 4. The authors'
drop-path and dropout rates are 0 in pre-training, so neither is built. 2D swaps every Conv3d / BatchNorm3d for
its 2D counterpart (not in the authors' code, which is 3D only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _conv(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _batch_norm(dims: int) -> type[nn.BatchNorm2d] | type[nn.BatchNorm3d]:
    return nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d


class PatchEmbed(nn.Module):
    """``proj`` (kernel = stride = ``patch``, with bias) and ``norm`` (LayerNorm over channels, eps 1e-5)."""

    def __init__(self, dims: int, in_channels: int, dim: int, patch: int = 2) -> None:
        super().__init__()
        self.proj = _conv(dims)(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).movedim(1, -1)).movedim(-1, 1).contiguous()


class Mlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2``: Linear layers on tokens (``Mlp``), or 1x1 convolutions on maps (``CMlp``)."""

    def __init__(self, dim: int, hidden: int, conv_dims: int = 0) -> None:
        super().__init__()
        conv = _conv(conv_dims) if conv_dims else None
        self.fc1 = conv(dim, hidden, 1) if conv else nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = conv(hidden, dim, 1) if conv else nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """Convolutional block (stages 1-2): local "attention" is 1x1 conv -> depthwise 5^d conv -> 1x1 conv.

    x += pos_embed(x); x += conv2(attn(conv1(norm1(x)))); x += mlp(norm2(x)), norms are BatchNorms.
    """

    def __init__(self, dims: int, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        conv, bn = _conv(dims), _batch_norm(dims)
        self.pos_embed = conv(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = bn(dim)
        self.conv1 = conv(dim, dim, 1)
        self.conv2 = conv(dim, dim, 1)
        self.attn = conv(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = bn(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), conv_dims=dims)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Global multi-head self-attention over all tokens: ``qkv`` and ``proj`` Linear, scale head_dim^-0.5."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, as the authors
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class SABlock(nn.Module):
    """Self-attention block (stages 3-4): x += pos_embed(x), then pre-norm attention and MLP on the tokens
    (LayerNorms with eps 1e-6, the authors' ``norm_layer``)."""

    def __init__(self, dims: int, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.pos_embed = _conv(dims)(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)
        shape = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(shape)


class UniFormer(nn.Module):
    """``patch_embed1..4``, ``blocks1..4`` (CBlock, CBlock, SABlock, SABlock), ``norm``; returns the four stage
    outputs (strides 2, 4, 8, 16), the last after ``norm``. Heads per attention stage: dim // head_dim.

    Convolutions are initialised as the authors' ``_init_weights`` (Kaiming normal, fan-out, zero bias);
    Linear and norm layers keep torch's defaults, as theirs do.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        depth: Sequence[int] = (3, 4, 8, 3),
        embed_dim: Sequence[int] = (64, 128, 320, 512),
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        depth, embed_dim = [int(d) for d in depth], [int(d) for d in embed_dim]
        if len(depth) != 4 or len(embed_dim) != 4:
            raise ValueError(f"UniFormer has 4 stages: got depth {depth} and embed_dim {embed_dim}")
        heads = [d // head_dim for d in embed_dim]
        if any(h < 1 or d % h for d, h in zip(embed_dim[2:], heads[2:])):
            raise ValueError(
                f"attention stage widths {embed_dim[2:]} must be >= head_dim {head_dim} and split evenly into "
                f"dim // head_dim heads ({heads[2:]})"
            )
        dims, chans = spatial_dims, [in_channels, *embed_dim]
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(dims, chans[i], chans[i + 1]))
        for i in range(4):
            if i < 2:
                blocks = [CBlock(dims, embed_dim[i], mlp_ratio) for _ in range(depth[i])]
            else:
                blocks = [SABlock(dims, embed_dim[i], heads[i], mlp_ratio, qkv_bias) for _ in range(depth[i])]
            setattr(self, f"blocks{i + 1}", nn.ModuleList(blocks))
        self.norm = _batch_norm(dims)(embed_dim[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"blocks{i}"):
                x = block(x)
            maps.append(self.norm(x) if i == 4 else x)
        return maps
