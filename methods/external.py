"""``external``: a released model (open_clip, Hugging Face, torchvision, MONAI) judged like every method.

It is a ``Method`` that is never pre-trained: the weights are read at construction (``external_formats``), and
the model then goes through the same probes, decoders, statistics and rows as the built-in methods. Rows say
``impl_source: external``; their ``ckpt_sha256`` is the weights file's sha256.

Input adaptation is explicit and logged once per cell (``adapt_to_input``), and done inside the image encoder
so every protocol sees the same thing:

- channels: a 3-channel (RGB) model on 1-channel images gets the channel repeated; other gaps are refused;
- size: images are resized to the model's own input size (``input_size: auto``; ``task`` keeps the task's);
- intensity: the model's normalisation (mean, std) is applied to the task's [0, 1] images;
- dims: a 2D model on volumes (or a 3D one on images) is refused with the reason (``input_gap``), so the cell
  is skipped as not applicable.

Segmentation reads ``ImageFeatures.maps`` through the shared ``SegDecoder``: the model's stage outputs (CNNs,
Swin) or evenly spaced layer outputs on the patch grid (ViTs), resampled to the task image's grid at the
declared strides (powers of two), so a resized input still gives maps the decoder can stack.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp_bench.checkpoint import file_sha256
from medvlp_bench.config import ConfigError
from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.method import Method
from medvlp_bench.methods.external_formats import FORMATS, LOADERS, Loaded
from medvlp_bench.types import ImageFeatures

log = logging.getLogger("medvlp_bench")
INITS = ("pretrained", "random")


def weights_sha256(files: list[Path]) -> str | None:
    """sha256 of the weights file (what ``sha256sum`` prints); for sharded weights, of the shards' lines."""
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{file_sha256(f)}  {f.name}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


class ExternalImageEncoder(ImageEncoder):
    """The loaded image trunk behind the harness's encoder interface, with the input adaptation built in.

    ``in_channels`` is what the encoder accepts (the task's channels after ``adapt_to_input``);
    ``native_channels`` what the model takes. Channels, strides and width are measured by one probe forward.
    """

    def __init__(
        self,
        loaded: Loaded,
        *,
        input_size: Any = "auto",
        mean: Any = None,
        std: Any = None,
        num_maps: int = 4,
    ) -> None:
        super().__init__()
        self.trunk = loaded.trunk
        self.spatial_dims = loaded.spatial_dims
        self.in_channels = self.native_channels = loaded.in_channels
        self.pad_multiple = loaded.pad_multiple
        self.size = self._size(input_size, loaded.size)
        #: where the size and the normalisation come from, for the log line
        self.origin = {
            "size": "the model's input size" if input_size == "auto" else "external.input_size",
            "norm": "the model's" if mean is None else "external.mean/std",
        }
        mean = loaded.mean if mean is None else mean
        std = loaded.std if std is None else std
        if (mean is None) != (std is None):
            raise ConfigError(f"external.mean and external.std come together, got mean={mean} std={std}")
        for name, v in (("mean", mean), ("std", std)):
            if v is not None and len(v) not in (1, self.native_channels):
                raise ConfigError(f"external.{name}={list(v)}: needs 1 or {self.native_channels} values")
        shape = (1, -1) + (1,) * self.spatial_dims
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).float().view(shape), False)
        self.register_buffer("std", None if std is None else torch.tensor(std).float().view(shape), False)
        self._probe(int(num_maps))

    def _size(self, input_size: Any, own: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if input_size in (None, "task"):
            return None
        if input_size == "auto":
            return own
        if isinstance(input_size, int):
            return (input_size,) * self.spatial_dims
        try:
            size = tuple(int(s) for s in input_size)
        except (TypeError, ValueError):
            raise ConfigError(f"external.input_size={input_size!r}: use auto, task, an int or a list of ints") from None
        if len(size) != self.spatial_dims:
            raise ConfigError(f"external.input_size={list(size)}: the model is {self.spatial_dims}D")
        return size

    @torch.no_grad()
    def _probe(self, num_maps: int) -> None:
        """One forward on zeros: the pooled width, and which maps the decoder gets at which strides.

        Strides below 2 are dropped (the decoder reads the image itself at full resolution). Maps that all share
        one stride (a ViT's layers) are thinned to ``num_maps`` evenly spaced ones; otherwise the last map of
        each stride is kept (a stage's output, not its inner steps).
        """
        side = 64 if self.spatial_dims == 2 else max(32, self.pad_multiple)
        size = self.size or (side,) * self.spatial_dims
        was_training = self.trunk.training
        self.trunk.eval()
        pooled, maps = self.trunk(torch.zeros(1, self.native_channels, *size))
        self.trunk.train(was_training)
        strides = [2 ** round(math.log2(size[-1] / m.shape[-1])) for m in maps]
        idx = [i for i, s in enumerate(strides) if s >= 2]
        if not idx:
            raise ConfigError("the model gives no feature map coarser than its input, so it cannot feed the decoder")
        if len({strides[i] for i in idx}) == 1:
            step = max(len(idx) // num_maps, 1)
            idx = [idx[min(step * (k + 1), len(idx)) - 1] for k in range(min(num_maps, len(idx)))]
        else:
            idx = [i for i in idx if i + 1 >= len(strides) or strides[i + 1] != strides[i]]
        self.keep = idx
        self.feature_strides = [strides[i] for i in idx]
        self.feature_channels = [int(maps[i].shape[1]) for i in idx]
        self.out_dim = int(pooled.shape[-1])

    def describe(self, in_channels: int) -> str:
        """The adaptation applied to ``in_channels``-channel task images, in words (logged by ``adapt_to_input``)."""
        steps = []
        if in_channels != self.native_channels:
            steps.append(f"{self.native_channels}-channel model on {in_channels}-channel images: channel repeated")
        if self.size is not None:
            steps.append(f"images resized to {'x'.join(map(str, self.size))} ({self.origin['size']})")
        if self.mean is not None:
            m = [round(v, 4) for v in self.mean.flatten().tolist()]
            s = [round(v, 4) for v in self.std.flatten().tolist()]
            steps.append(f"normalised with {self.origin['norm']} mean {m} and std {s}")
        if self.pad_multiple > 1:
            steps.append(f"padded to a multiple of {self.pad_multiple}")
        return "; ".join(steps) or "images passed as they are"

    def forward(self, image: Tensor) -> ImageFeatures:
        grid = tuple(image.shape[2:])
        x = image
        if x.shape[1] != self.native_channels:
            if x.shape[1] != 1:
                raise ValueError(f"model takes {self.native_channels} channel(s), got {x.shape[1]}")
            x = x.expand(-1, self.native_channels, *grid)
        resized = self.size is not None and grid != self.size
        if resized:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            x = F.interpolate(x, size=self.size, mode=mode, align_corners=False)
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        pad = [(-s) % self.pad_multiple for s in x.shape[2:]]
        if any(pad):
            x = F.pad(x, [p for s in reversed(pad) for p in (0, s)])
        pooled, maps = self.trunk(x)
        maps = [self._fit(maps[i], grid, s, resized) for i, s in zip(self.keep, self.feature_strides)]
        return ImageFeatures(pooled=pooled, maps=maps)

    def _fit(self, m: Tensor, grid: tuple[int, ...], stride: int, resized: bool) -> Tensor:
        """The map on the task image's grid at ``stride``: cropped after padding, resampled after resizing."""
        target = tuple(math.ceil(g / stride) for g in grid)
        if tuple(m.shape[2:]) == target:
            return m
        if not resized and all(a >= b for a, b in zip(m.shape[2:], target)):
            return m[(Ellipsis, *(slice(0, t) for t in target))]
        return F.interpolate(m, size=target, mode="bilinear" if m.ndim == 4 else "trilinear", align_corners=False)


class ExternalTextEncoder(nn.Module):
    """A loaded text tower: tokenizer output -> joint-space embedding; ``tokenizer`` is what the data collates with."""

    def __init__(self, tower: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.tower, self.tokenizer = tower, tokenizer

    def forward(self, text: dict[str, Tensor]) -> Tensor:
        return self.tower(text)


class External(Method):
    """A model in a standard format, loaded at construction and evaluated as is (never pre-trained here).

    Args:
        format: ``open_clip`` | ``hf`` | ``torchvision`` | ``monai``.
        path: the model folder (open_clip, hf) or the state-dict file (torchvision, monai).
        arch: torchvision architecture name, or MONAI network (``swin_unetr``, ``segresnet``, ``resnet10``..).
        arch_kwargs: MONAI constructor arguments the weights do not tell (dims, channels, widths, depths,
            heads and window are read off the weights).
        init: ``pretrained``, or ``random``: the same architecture untrained (the model's scratch twin).
        input_size: ``auto`` (the model's own), ``task`` (no resize), or an int / list.
        mean, std: override the model's normalisation.
        allow_missing: evaluate even when model tensors are absent from the file (left at init, logged).
        num_maps: ViT-like models: how many evenly spaced layer outputs feed the segmentation decoder.
    """

    impl_source: ClassVar[str] = "external"
    needs_pretraining: ClassVar[bool] = False

    def __init__(
        self,
        format: str | None,  # noqa: A002 - the user-facing key is external.format
        path: str | None,
        *,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        init: str = "pretrained",
        input_size: Any = "auto",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        allow_missing: bool = False,
        num_maps: int = 4,
    ) -> None:
        if format is None:
            raise ConfigError(f"external.format is not set; choose one of {', '.join(FORMATS)} and set external.path")
        if format not in LOADERS:
            raise ConfigError(f"external.format={format!r} is not a known format; choose one of {', '.join(FORMATS)}")
        if init not in INITS:
            raise ConfigError(f"external.init={init!r}; choose one of {', '.join(INITS)}")
        if init == "pretrained" and not path:
            raise ConfigError(f"external.path is not set; format {format} expects {FORMATS[format]}")
        loaded = LOADERS[format](
            path,
            arch=arch,
            arch_kwargs=dict(arch_kwargs or {}),
            pretrained=init == "pretrained",
            allow_missing=bool(allow_missing),
        )
        encoder = ExternalImageEncoder(loaded, input_size=input_size, mean=mean, std=std, num_maps=num_maps)
        text = ExternalTextEncoder(loaded.text, loaded.tokenizer) if loaded.text is not None else None
        super().__init__(encoder, text, embed_dim=encoder.out_dim)
        self.format, self.path, self.init = format, str(path), init
        self.weights_sha256 = weights_sha256(loaded.weight_files)
        self.load_report = loaded.report
        what = (
            f"{len(loaded.weight_files)} weights file(s), sha256 {self.weights_sha256}"
            if loaded.weight_files
            else "random init"
        )
        log.info(
            "external %s model from %s: %s; %s", format, path, what, "image + text towers" if text else "image only"
        )

    def input_gap(self, spatial_dims: int, in_channels: int) -> str | None:
        enc = self.image_encoder
        if spatial_dims != enc.spatial_dims:
            kind = {2: "images", 3: "volumes"}
            return (
                f"it is a {enc.spatial_dims}D model ({self.format}) and the task's data are {spatial_dims}D "
                f"{kind.get(spatial_dims, 'arrays')}; a {spatial_dims}D model is needed"
            )
        if in_channels not in (enc.native_channels, 1):
            return (
                f"the model takes {enc.native_channels} channel(s) and the task's images have {in_channels}; "
                "only 1-channel images are adapted (the channel repeated)"
            )
        return None

    def adapt_to_input(self, in_channels: int, *, frozen: bool = True) -> None:
        """Accept ``in_channels``-channel images (1 -> the model's channels by repetition); log the adaptation."""
        enc = self.image_encoder
        if (gap := self.input_gap(enc.spatial_dims, in_channels)) is not None:
            raise ValueError(gap)
        enc.in_channels = in_channels
        log.info("external %s input: %s", self.format, enc.describe(in_channels))

    def embed_image(self, image: Tensor) -> Tensor:
        return F.normalize(self.encode_image(image), dim=-1)

    def embed_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.text_encoder(text), dim=-1)
