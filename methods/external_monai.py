"""The ``external`` format monai: SwinUNETR's Swin encoder, SegResNet's encoder and MONAI's (MedicalNet-style)
ResNets, built with the constructor arguments read off the weights (dims, channels, widths, depths, heads,
window, shortcut type), which ``external.arch_kwargs`` can override. Decoders in a file are reported unused:
every method gets the shared segmentation decoder."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from medvlp_bench.config import ConfigError
from medvlp_bench.methods.external_load import Loaded, load_into, need_file, one_line, read_tensors

MONAI_ARCHS = ("swin_unetr", "segresnet", "resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# ---- MONAI --------------------------------------------------------------------------------------------------
class MonaiSwin(nn.Module):
    """MONAI's Swin transformer (the SwinUNETR encoder): five stages at strides 2..32."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        maps = list(self.net(x, normalize=True))
        return maps[-1].flatten(2).mean(-1), maps


class MonaiSegResNet(nn.Module):
    """SegResNet's encoder half (its decoder is dropped: every method gets the shared decoder)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x, down = self.net.encode(x)
        return x.flatten(2).mean(-1), list(down)


class MonaiResNet(nn.Module):
    """MONAI ResNet (MedicalNet-style 3D ResNets): stem output and the four stages."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        maps = [x]
        if not n.no_max_pool:
            x = n.maxpool(x)
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            maps.append(x)
        return x.flatten(2).mean(-1), maps


def _find(tensors: dict[str, Tensor], suffix: str) -> Tensor | None:
    """The tensor whose name ends with ``suffix`` nearest the top (``conv1.weight``, not ``layer1.0.conv1.weight``)."""
    keys = [k for k in tensors if k == suffix or k.endswith("." + suffix)]
    return tensors[min(keys, key=lambda k: k.count("."))] if keys else None


def _count(tensors: dict[str, Tensor], pattern: str) -> int:
    """Number of distinct indices ``(\\d+)`` in keys matching ``pattern`` (blocks per stage)."""
    rx = re.compile(r"(?:^|\.)" + pattern)
    return len({m.group(1) for k in tensors if (m := rx.search(k))})


def monai_kwargs(arch: str, t: dict[str, Tensor]) -> dict[str, Any]:
    """Constructor arguments read off the weights: dims, channels, widths, depths, heads, window, shortcuts."""
    if not t:
        return {}
    if arch == "swin_unetr":
        w = _find(t, "patch_embed.proj.weight")
        if w is None:
            return {}
        dims = w.ndim - 2
        depths = [_count(t, rf"layers{i}\.0\.blocks\.(\d+)\.") for i in range(1, 5)]
        kw: dict[str, Any] = {"spatial_dims": dims, "in_channels": int(w.shape[1]), "feature_size": int(w.shape[0])}
        tables = [_find(t, f"layers{i}.0.blocks.0.attn.relative_position_bias_table") for i in range(1, 5)]
        if all(d > 0 for d in depths):
            kw["depths"] = depths
        if all(tb is not None for tb in tables):
            kw["num_heads"] = [int(tb.shape[1]) for tb in tables]
            kw["window_size"] = round((tables[0].shape[0] ** (1 / dims) + 1) / 2)
        kw["use_v2"] = any(".layers1c." in f".{k}" for k in t)
        return kw
    if arch == "segresnet":
        w = _find(t, "convInit.conv.weight")
        if w is None:
            return {}
        n = _count(t, r"down_layers\.(\d+)\.")
        blocks = [_count(t, rf"down_layers\.{i}\.([1-9]\d*)\.") for i in range(n)]
        return {
            "spatial_dims": w.ndim - 2,
            "in_channels": int(w.shape[1]),
            "init_filters": int(w.shape[0]),
            "blocks_down": blocks,
        }
    w = _find(t, "conv1.weight")
    if w is None:
        return {}
    keys = list(t)
    return {
        "spatial_dims": w.ndim - 2,
        "n_input_channels": int(w.shape[1]),
        "conv1_t_size": int(w.shape[2]),
        "widen_factor": w.shape[0] / 64,
        "shortcut_type": "B" if any(".downsample." in f".{k}" for k in keys) else "A",
        "bias_downsample": any(k.endswith("downsample.0.bias") for k in keys),
    }


def build_monai(arch: str, kw: dict[str, Any]) -> tuple[nn.Module, int, int, int]:
    """(trunk, spatial_dims, in_channels, pad multiple) for a MONAI ``arch`` and its constructor arguments."""
    dims = int(kw.pop("spatial_dims", 3))
    if arch == "swin_unetr":
        from monai.networks.nets.swin_unetr import SwinTransformer

        ch, fs = int(kw.pop("in_channels", 1)), int(kw.pop("feature_size", 48))
        depths, window = tuple(kw.pop("depths", (2, 2, 2, 2))), int(kw.pop("window_size", 7))
        net = SwinTransformer(
            in_chans=ch,
            embed_dim=fs,
            window_size=(window,) * dims,
            patch_size=(2,) * dims,
            depths=depths,
            num_heads=tuple(kw.pop("num_heads", (3, 6, 12, 24))),
            spatial_dims=dims,
            **kw,
        )
        return MonaiSwin(net), dims, ch, 2 ** (len(depths) + 1)
    if arch == "segresnet":
        from monai.networks.nets import SegResNet

        ch, blocks = int(kw.pop("in_channels", 1)), tuple(kw.pop("blocks_down", (1, 2, 2, 4)))
        net = SegResNet(spatial_dims=dims, in_channels=ch, blocks_down=blocks, blocks_up=(1,) * (len(blocks) - 1), **kw)
        for part in ("up_layers", "up_samples", "conv_final"):  # its decoder: unused, and it would be fine-tuned
            delattr(net, part)
        return MonaiSegResNet(net), dims, ch, 2 ** (len(blocks) - 1)
    from monai.networks.nets import resnet

    ch = int(kw.pop("n_input_channels", 1))
    kw.setdefault("conv1_t_stride", 2)
    net = getattr(resnet, arch)(spatial_dims=dims, n_input_channels=ch, feed_forward=False, **kw)
    return MonaiResNet(net), dims, ch, 1


def load_monai(
    path: str | None, *, arch: str | None, arch_kwargs: dict[str, Any], pretrained: bool, allow_missing: bool, **_: Any
) -> Loaded:
    if arch not in MONAI_ARCHS:
        raise ConfigError(
            f"external.arch={arch!r} is not a MONAI network this format reads; choose one of {', '.join(MONAI_ARCHS)}"
        )
    files = [need_file(path, "monai")] if pretrained else []
    tensors = read_tensors(files)
    kw = {**monai_kwargs(arch, tensors), **arch_kwargs}
    try:
        trunk, dims, ch, pad = build_monai(arch, dict(kw))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"MONAI {arch} with {kw}: {one_line(e)}") from None
    report = load_into(trunk.net, tensors, str(files[0]), f"MONAI {arch}", allow_missing) if files else {}
    return Loaded(
        trunk=trunk,
        spatial_dims=dims,
        in_channels=ch,
        weight_files=files,
        pad_multiple=pad,
        report={**report, "arch_kwargs": {k: v for k, v in kw.items() if k != "spatial_dims"}},
    )
