"""BrainMVP's data-side helpers: per-sample crops, block masks, modality pairing, templates, stem adaptation.

Plain functions on tensors so each piece is testable without a trainer. Shapes: images ``[B, C, *S]`` with
``len(S)`` = 2 or 3 (the method itself is meant for 3D multi-parametric MRI; the helpers do not care).
Randomness comes from the global torch generator (seeded by the run), as every other method's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEMPLATE_NORMS = ("minmax", "zscore", "none")
CHANNEL_ADAPT = ("drop", "inflate", "none")


def n_masked(n_blocks: int, ratio: float) -> int:
    """Blocks masked out of ``n_blocks``: the authors keep floor(n (1 - ratio)) and mask the rest.

    The 1e-9 guards against 64 * (1 - 0.875) evaluating to 7.999...; without it floor would mask one block
    more than the configured fraction.
    """
    return n_blocks - math.floor(n_blocks * (1.0 - ratio) + 1e-9)


def block_mask(batch: int, size: Sequence[int], block: int, ratio: float, device: torch.device) -> Tensor:
    """[B, *size] bool, True where masked: per sample, an independent random set of ``n_masked`` blocks."""
    grid = [s // block for s in size]
    n = math.prod(grid)
    order = torch.rand(batch, n, device=device).argsort(dim=1)
    masked = torch.zeros(batch, n, dtype=torch.bool, device=device)
    masked.scatter_(1, order[:, : n_masked(n, ratio)], True)
    mask = masked.view(batch, *grid)
    for axis in range(1, len(grid) + 1):
        mask = mask.repeat_interleave(block, dim=axis)
    return mask


def random_offsets(batch: int, image_size: Sequence[int], crop: Sequence[int], device: torch.device) -> Tensor:
    """[B, dims] corner of a uniformly placed crop per sample (``RandSpatialCropSamples`` with one sample)."""
    cols = [torch.randint(0, s - c + 1, (batch,), device=device) for s, c in zip(image_size, crop)]
    return torch.stack(cols, dim=1)


def crop_at(x: Tensor, offsets: Tensor, crop: Sequence[int]) -> Tensor:
    """Per-sample crops of ``x`` [B, C, *S] at ``offsets`` [B, dims] -> [B, C, *crop]."""
    out = []
    for i, off in enumerate(offsets.tolist()):
        out.append(x[(i, slice(None), *(slice(o, o + c) for o, c in zip(off, crop)))])
    return torch.stack(out)


def other_modality(modality: Tensor, n_modalities: int) -> Tensor:
    """A modality index != ``modality`` per sample, uniform over the others (the authors' ``sample_without_i``)."""
    shift = torch.randint(1, n_modalities, modality.shape, device=modality.device)
    return (modality + shift) % n_modalities


def pick(x: Tensor, channel: Tensor) -> Tensor:
    """[B, 1, *S]: channel ``channel[i]`` of sample ``i``."""
    return x[torch.arange(x.shape[0], device=x.device), channel].unsqueeze(1)


def normalise_templates(templates: Tensor, mode: str, eps: float = 1e-6) -> Tensor:
    """Bring each template volume [M, *T] to the data's intensity scale before it fills masked blocks.

    ``minmax`` is the authors' (their inputs are percentile-scaled to [0, 1]); ``zscore`` matches data that
    is z-normalised per channel, as the benchmark's MRI datamodules are. sqrt(var + eps) rather than std + eps
    keeps the gradient finite at the authors' zero initialisation.
    """
    flat = templates.flatten(1)
    shape = (-1,) + (1,) * (templates.ndim - 1)
    if mode == "minmax":
        lo, hi = flat.amin(1).view(shape), flat.amax(1).view(shape)
        return (templates - lo) / (hi - lo + 1e-9)
    if mode == "zscore":
        mean, var = flat.mean(1).view(shape), flat.var(1, unbiased=False).view(shape)
        return (templates - mean) / torch.sqrt(var + eps)
    if mode == "none":
        return templates
    raise ValueError(f"method.model.template_norm must be one of {TEMPLATE_NORMS}, got {mode!r}")


def template_crops(templates: Tensor, modality: Tensor, offsets: Tensor, crop: Sequence[int]) -> Tensor:
    """[B, 1, *crop]: the template of each sample's modality, cropped at the sample's (template-frame) offset."""
    out = []
    for m, off in zip(modality.tolist(), offsets.tolist()):
        out.append(templates[(m, *(slice(o, o + c) for o, c in zip(off, crop)))])
    return torch.stack(out).unsqueeze(1)


def fit_to(volume: Tensor, size: Sequence[int]) -> Tensor:
    """Centre-crop (if larger) then resize ``volume`` [M, *T] to ``size``: templates for other image sizes."""
    starts = [max((t - s) // 2, 0) for t, s in zip(volume.shape[1:], size)]
    volume = volume[(slice(None), *(slice(a, a + min(t, s)) for a, t, s in zip(starts, volume.shape[1:], size)))]
    if tuple(volume.shape[1:]) != tuple(size):
        mode = "trilinear" if volume.ndim == 4 else "bilinear"
        volume = F.interpolate(volume[None], size=tuple(size), mode=mode, align_corners=False)[0]
    return volume


def first_conv(module: nn.Module, in_channels: int) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, conv) of the first convolution reading ``in_channels``: the stem / patch embedding
    of every shared encoder (ResNet ``conv1``, Swin ``patch_embed.proj``, ViT ``patch_embeddings``)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d | nn.Conv3d) and sub.in_channels == in_channels:
            parent, _, attr = name.rpartition(".")
            return module.get_submodule(parent), attr, sub
    raise ValueError(f"{type(module).__name__} has no convolution reading {in_channels} channel(s) to adapt")


def adapted_conv(conv: nn.Module, in_channels: int, mode: str) -> nn.Module:
    """A copy of ``conv`` reading ``in_channels``.

    ``drop``: freshly initialised (the authors drop the pre-trained patch embedding when fine-tuning on other
    channel counts; only for fine-tuning, a frozen random stem would feed the probe noise).
    ``inflate``: every input channel gets sum_i W[:, i] / C_new, so an input that is the same in every channel
    gives the same response as the pre-trained stem on that one channel (I3D-style inflation across channels).
    """
    if mode not in CHANNEL_ADAPT[:2]:
        raise ValueError(f"method.model.channel_adapt must be one of {CHANNEL_ADAPT}, got {mode!r}")
    if conv.groups != 1:
        raise ValueError(f"cannot adapt a grouped stem convolution (groups={conv.groups})")
    cls, shape = type(conv), (in_channels, conv.out_channels)
    kw = {
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
        "device": conv.weight.device,
        "dtype": conv.weight.dtype,
    }
    # inflate draws nothing from the global RNG (skip_init), so the seeded probe that follows is unaffected
    new = nn.utils.skip_init(cls, *shape, **kw) if mode == "inflate" else cls(*shape, **kw)
    if mode == "inflate":
        with torch.no_grad():
            new.weight.copy_((conv.weight.sum(1, keepdim=True) / in_channels).expand_as(new.weight))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    return new
