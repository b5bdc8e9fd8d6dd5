"""Image encoders for 2D and 3D (one ``spatial_dims`` switch, as in MONAI) and their builder.

Every encoder returns :class:`ImageFeatures`: a pooled vector for probes and projection heads, multi-scale
maps (fine -> coarse) for the shared segmentation decoder, and patch tokens when the architecture has them.
The presets table is data, not branching: a new size is one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.networks.nets import ViT
from monai.networks.nets.resnet import ResNet
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn

from .types import ImageFeatures
from .uniformer import UniFormer


def deepest_features(maps: list[Tensor]) -> ImageFeatures:
    """Features of a trunk whose output is its deepest map: pooled is that map's spatial mean, tokens its
    positions. One definition, so every convolutional and hierarchical encoder pools the same way."""
    last = maps[-1]
    return ImageFeatures(pooled=last.flatten(2).mean(-1), maps=maps, tokens=last.flatten(2).transpose(1, 2))


def evenly_spaced_layers(num_layers: int, num_maps: int) -> list[int]:
    """Indices of the ``num_maps`` transformer blocks, at evenly spaced depths, whose hidden states a ViT returns
    as maps (UNETR's skip connections); shared by ``ViTEncoder`` and UniMedI's ViT."""
    step = max(num_layers // num_maps, 1)
    return [min(step * (i + 1), num_layers) - 1 for i in range(num_maps)]


class ImageEncoder(nn.Module):
    """Base class: subclasses set the attributes below and implement ``forward``."""

    spatial_dims: int
    in_channels: int
    out_dim: int
    feature_channels: list[int]
    #: total downsampling of each map relative to the input (same order as ``maps``)
    feature_strides: list[int]

    def forward(self, image: Tensor) -> ImageFeatures:  # pragma: no cover - interface
        raise NotImplementedError


class ResNetEncoder(ImageEncoder):
    """MONAI ResNet trunk (2D or 3D); maps are the stem and the four stage outputs."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        layers: Sequence[int] = (1, 1, 1, 1),
        widths: Sequence[int] = (16, 32, 64, 128),
        block: str = "basic",
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.net = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=list(widths),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
            norm=norm,
        )
        expansion = 4 if block == "bottleneck" else 1
        self.feature_channels = [widths[0]] + [w * expansion for w in widths]
        self.feature_strides = [2, 4, 8, 16, 32]
        self.out_dim = self.feature_channels[-1]

    def forward(self, image: Tensor) -> ImageFeatures:
        n = self.net
        x = n.act(n.bn1(n.conv1(image)))
        maps = [x]
        x = n.maxpool(x)
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            maps.append(x)
        return deepest_features(maps)


class ViTEncoder(ImageEncoder):
    """MONAI ViT (2D or 3D). Maps are hidden states at evenly spaced depths reshaped to the patch grid,
    as UNETR reads them; pooled is the mean patch token. The input size must equal ``img_size``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        num_maps: int = 4,
    ) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.img_size = ensure_tuple_rep(img_size, spatial_dims)
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.net = ViT(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=self.patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            spatial_dims=spatial_dims,
            classification=False,
        )
        self.map_layers = evenly_spaced_layers(num_layers, num_maps)
        self.feature_channels = [hidden_size] * num_maps
        self.feature_strides = [self.patch_size[0]] * num_maps
        self.out_dim = hidden_size

    def forward(self, image: Tensor) -> ImageFeatures:
        if tuple(image.shape[2:]) != self.img_size:
            raise ValueError(
                f"ViT encoder built for input size {self.img_size}, got {tuple(image.shape[2:])}; "
                "set the encoder's img_size or resize the data"
            )
        x, hidden = self.net(image)
        b = image.shape[0]
        maps = [hidden[i].transpose(1, 2).reshape(b, -1, *self.grid) for i in self.map_layers]
        return ImageFeatures(pooled=x.mean(1), maps=maps, tokens=x)


class SwinEncoder(ImageEncoder):
    """MONAI Swin transformer trunk (the SwinUNETR encoder); maps are its five hidden stages."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.net = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=ensure_tuple_rep(window_size, spatial_dims),
            patch_size=ensure_tuple_rep(2, spatial_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            spatial_dims=spatial_dims,
            use_checkpoint=use_checkpoint,
        )
        self.feature_channels = [feature_size * 2**i for i in range(len(depths) + 1)]
        self.feature_strides = [2 ** (i + 1) for i in range(len(depths) + 1)]
        self.out_dim = self.feature_channels[-1]

    def forward(self, image: Tensor) -> ImageFeatures:
        return deepest_features(list(self.net(image, normalize=True)))


class _GNResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, ReLU, 3x3 conv, twice). Parameter names (gn1, conv1, gn2, conv2)
    follow BrainMVP's released U-Net so its weights load by name."""

    def __init__(self, dims: int, channels: int, groups: int = 8) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.gn1, self.conv1 = nn.GroupNorm(groups, channels), conv(channels, channels, 3, padding=1)
        self.gn2, self.conv2 = nn.GroupNorm(groups, channels), conv(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(nn.functional.relu(self.gn1(x)))
        return x + self.conv2(nn.functional.relu(self.gn2(h)))


class BrainUNetEncoder(ImageEncoder):
    """The encoder half of BrainMVP's GroupNorm U-Net (its ``BrainMVP_unet.pt`` release): a stem conv, then per
    scale residual blocks and a strided conv that doubles the width; four blocks at the deepest scale.

    Layer names (conv1a, conv1b, ds1, conv2a, ...) match the release so ``medbench convert brainmvp`` maps them
    one to one. Maps are the block outputs at strides 2, 4 and 8; pooled is the mean of the deepest.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, init_channels: int = 32) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        c, dims = init_channels, spatial_dims
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        net = nn.Module()
        net.conv1a, net.conv1b = conv(in_channels, c, 3, padding=1), _GNResBlock(dims, c)
        net.ds1 = conv(c, 2 * c, 3, stride=2, padding=1)
        net.conv2a, net.conv2b = _GNResBlock(dims, 2 * c), _GNResBlock(dims, 2 * c)
        net.ds2 = conv(2 * c, 4 * c, 3, stride=2, padding=1)
        net.conv3a, net.conv3b = _GNResBlock(dims, 4 * c), _GNResBlock(dims, 4 * c)
        net.ds3 = conv(4 * c, 8 * c, 3, stride=2, padding=1)
        for name in ("conv4a", "conv4b", "conv4c", "conv4d"):
            setattr(net, name, _GNResBlock(dims, 8 * c))
        self.net = net
        self.feature_channels = [2 * c, 4 * c, 8 * c]
        self.feature_strides = [2, 4, 8]
        self.out_dim = 8 * c

    def forward(self, image: Tensor) -> ImageFeatures:
        n = self.net
        x = n.ds1(n.conv1b(n.conv1a(image)))
        c2 = n.conv2b(n.conv2a(x))
        c3 = n.conv3b(n.conv3a(n.ds2(c2)))
        c4 = n.conv4d(n.conv4c(n.conv4b(n.conv4a(n.ds3(c3)))))
        return deepest_features([c2, c3, c4])


class UniFormerEncoder(ImageEncoder):
    """The UniFormer BrainMVP pre-trains (its ``BrainMVP_uniformer.pt`` release; trunk in ``uniformer.py``).

    ``net`` carries the authors' module names (``patch_embed1.proj``, ``blocks1.0.conv1``, ``blocks3.0.attn.qkv``,
    ``norm``, ...), so ``medbench convert brainmvp`` maps ``encoder.uniformer.*`` one to one. Maps are the four
    stage outputs at strides 2, 4, 8 and 16 (the ones the authors' downstream decoder reads); pooled is the mean
    of the deepest, tokens its voxels. Every axis needs at least 16 voxels.

    ``depth_last`` (3D only): the authors feed (H, W, D) volumes, MONAI's NIfTI order and ours, and permute
    them to (D, H, W) before the trunk (``x.permute(0, 1, 4, 2, 3)``). Their kernels are learnt in that order,
    so the same permutation is applied here, and the maps are permuted back to the input's order, as their
    decoder does. Turning it off runs the trunk on the input's axis order.
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
        depth_last: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.net = UniFormer(spatial_dims, in_channels, depth, embed_dim, head_dim, mlp_ratio, qkv_bias)
        self.depth_last = depth_last and spatial_dims == 3
        self.feature_channels = [int(d) for d in embed_dim]
        self.feature_strides = [2, 4, 8, 16]
        self.out_dim = self.feature_channels[-1]

    def forward(self, image: Tensor) -> ImageFeatures:
        if min(image.shape[2:]) < 16:
            raise ValueError(f"UniFormer needs >= 16 voxels per axis (stride 16), got {tuple(image.shape[2:])}")
        x = image.permute(0, 1, 4, 2, 3) if self.depth_last else image
        maps = self.net(x)
        if self.depth_last:
            maps = [m.permute(0, 1, 3, 4, 2) for m in maps]
        return deepest_features(maps)


#: name -> (class, default kwargs). Sizes follow the usual family names; ``*_tiny`` are for tests and
#: the CPU phantom benchmark.
PRESETS: dict[str, tuple[type[ImageEncoder], dict[str, Any]]] = {
    "resnet_tiny": (ResNetEncoder, {"layers": (1, 1, 1, 1), "widths": (8, 16, 32, 64)}),
    "resnet_small": (ResNetEncoder, {"layers": (1, 1, 1, 1), "widths": (16, 32, 64, 128)}),
    "resnet10": (ResNetEncoder, {"layers": (1, 1, 1, 1), "widths": (64, 128, 256, 512)}),
    "resnet18": (ResNetEncoder, {"layers": (2, 2, 2, 2), "widths": (64, 128, 256, 512)}),
    "resnet50": (ResNetEncoder, {"layers": (3, 4, 6, 3), "widths": (64, 128, 256, 512), "block": "bottleneck"}),
    "vit_tiny": (ViTEncoder, {"patch_size": 8, "hidden_size": 64, "mlp_dim": 128, "num_layers": 4, "num_heads": 4}),
    "vit_s16": (ViTEncoder, {"patch_size": 16, "hidden_size": 384, "mlp_dim": 1536, "num_layers": 12, "num_heads": 6}),
    "vit_b16": (ViTEncoder, {"patch_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12}),
    "swin_tiny": (SwinEncoder, {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)}),
    # CPU default of gtgm / scratch_swin: GTGM's depths at a quarter of SwinUNETR's width, 4^3 windows (they tile
    # the 16/8/4 grids of a 32^3 input; 7^3 windows pad 16^3 to 21^3 and cost 7x the FLOPs). 3D: 0.52M params,
    # 0.11 GFLOP per 32^3 volume (resnet_small: 0.90M, 0.07 GFLOP; swin_unetr: 8.3M, 4.7 GFLOP).
    "swin_small": (
        SwinEncoder,
        {"feature_size": 12, "depths": (2, 4, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 4},
    ),
    "swin_unetr": (SwinEncoder, {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)}),
    "brainmvp_unet_tiny": (BrainUNetEncoder, {"init_channels": 8}),
    "brainmvp_unet": (BrainUNetEncoder, {"init_channels": 32}),  # the BrainMVP_unet.pt release
    "uniformer_tiny": (UniFormerEncoder, {"depth": (1, 1, 1, 1), "embed_dim": (16, 32, 48, 64), "head_dim": 16}),
    # the BrainMVP_uniformer.pt release (the authors' uniformer_small: 3, 4, 8, 3 blocks; 1, 1, 5, 8 heads)
    "uniformer_small": (UniFormerEncoder, {"depth": (3, 4, 8, 3), "embed_dim": (64, 128, 320, 512), "head_dim": 64}),
}


def build_image_encoder(name: str, spatial_dims: int, in_channels: int = 1, **overrides: Any) -> ImageEncoder:
    """Build a preset by name; keyword overrides replace the preset's defaults (e.g. ``img_size``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown image encoder {name!r}; choose one of {sorted(PRESETS)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    cls, defaults = PRESETS[name]
    return cls(spatial_dims=spatial_dims, in_channels=in_channels, **{**defaults, **overrides})


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
