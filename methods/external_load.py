"""What every ``external`` format shares: the :class:`Loaded` shape, file checks, and loading weights by name.

A ``Loaded`` is an image trunk (image -> pooled feature and every candidate feature map), the model's own
preprocessing (input size, mean, std), its native dims and channels, and for image-text models a text tower
(tokens -> joint-space embedding) with its tokenizer. ``methods/external.py`` wraps it into a ``Method``, so the
probes, decoders and rows are the harness's own.

Weights are read by ``convert.load_source``: safetensors, or ``torch.load(weights_only=True)``, which refuses a
file holding pickled objects with a message. They are loaded by :func:`load_into`, which strips wrapper prefixes
(``module.``, ``backbone.``, ...) by matching names against the model, refuses shape mismatches and missing
tensors with a one-line error, and reports unused tensors (a classification head, a decoder).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from medvlp_bench.config import ConfigError
from medvlp_bench.convert import ConvertError, load_source

log = logging.getLogger("medvlp_bench")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: format -> what ``external.path`` must hold (``medbench list`` and the errors show these)
FORMATS = {
    "open_clip": "an open_clip hub folder: open_clip_config.json + open_clip_pytorch_model.bin or .safetensors",
    "hf": "a Hugging Face folder: config.json + model.safetensors or pytorch_model.bin (+ preprocessor_config.json)",
    "torchvision": "a state-dict file (.pth/.pt/.safetensors) of a torchvision CNN named by external.arch",
    "monai": "a state-dict file of a MONAI network named by external.arch (swin_unetr, segresnet, resnet10..152)",
}


@dataclass
class Loaded:
    """A model read from disk, in the one shape ``External`` wraps."""

    trunk: nn.Module  # image -> (pooled [B, D], candidate maps fine -> coarse)
    spatial_dims: int
    in_channels: int
    weight_files: list[Path]
    size: tuple[int, ...] | None = None  # the model's own input size; None: any size
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pad_multiple: int = 1  # inputs are padded to a multiple of this (Swin: 32)
    text: nn.Module | None = None  # tokenizer output -> [B, E] joint-space embedding
    tokenizer: Callable[[list[str]], dict[str, Tensor]] | None = None
    report: dict[str, Any] = field(default_factory=dict)


# ---- files and weights ------------------------------------------------------------------------------------
def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def need_dir(path: str | None, fmt: str, marker: str) -> Path:
    """The model folder, or a one-line error naming the path and what format ``fmt`` expects there."""
    folder = Path(str(path)).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"external.path={path}: no such folder; format {fmt} expects {FORMATS[fmt]}")
    if not folder.is_dir():
        raise ConfigError(f"external.path={path} is a file; format {fmt} expects {FORMATS[fmt]}")
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"{folder}: no {marker}; format {fmt} expects {FORMATS[fmt]}")
    return folder


def need_file(path: str | None, fmt: str) -> Path:
    file = Path(str(path)).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"external.path={path}: no such file; format {fmt} expects {FORMATS[fmt]}")
    if not file.is_file():
        raise ConfigError(f"external.path={path} is a folder; format {fmt} expects {FORMATS[fmt]}")
    return file


def weight_files(folder: Path, names: Sequence[str], fmt: str) -> list[Path]:
    """The first of ``names`` in ``folder``; an ``*.index.json`` names the shards it lists."""
    for name in names:
        if (folder / name).is_file():
            if not name.endswith(".index.json"):
                return [folder / name]
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    raise FileNotFoundError(
        f"{folder}: no weights file (looked for {', '.join(names)}); format {fmt} expects {FORMATS[fmt]}"
    )


def read_tensors(files: Sequence[Path]) -> dict[str, Tensor]:
    """Every tensor of ``files`` (safetensors or tensor-only unpickling), wrapper dicts and ``module.`` removed."""
    out: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors, _ = load_source(f)
        except ConvertError as e:
            raise ConfigError(one_line(e)) from None
        out.update(tensors)
    return out


def align_prefixes(tensors: dict[str, Tensor], model_keys: set[str]) -> tuple[dict[str, Tensor], list[str]]:
    """Strip leading name parts (``module.``, ``backbone.``, ``swinViT.``) while that matches more model keys."""
    stripped: list[str] = []
    while True:
        score = sum(k in model_keys for k in tensors)
        heads = Counter(k.split(".", 1)[0] + "." for k in tensors if "." in k)
        best, best_score = None, score
        for head, _ in heads.most_common(8):
            trial = {k.removeprefix(head): v for k, v in tensors.items()}
            if (s := sum(k in model_keys for k in trial)) > best_score:
                best, best_score = head, s
        if best is None:
            return tensors, stripped
        tensors = {k.removeprefix(best): v for k, v in tensors.items()}
        stripped.append(best)


def groups(keys: Sequence[str]) -> str:
    counts = Counter(k.split(".", 1)[0] for k in keys)
    return ", ".join(f"{g}.* ({n})" for g, n in counts.most_common(6))


def load_into(
    model: nn.Module, tensors: dict[str, Tensor], source: str, arch: str, allow_missing: bool = False
) -> dict[str, Any]:
    """Load ``tensors`` into ``model`` by name; refuse a mismatched architecture; return what happened.

    Refused (one line each): no tensor matches a model name; a matched tensor has another shape; model tensors
    absent from the file (they would stay random) unless ``allow_missing``. Tensors of the file the model has no
    place for (a classification head, a decoder) are reported and logged.
    """
    own = model.state_dict()
    tensors, stripped = align_prefixes(tensors, set(own))
    matched = [k for k in tensors if k in own]
    if not matched:
        raise ConfigError(
            f"{source}: architecture mismatch: none of its {len(tensors)} tensors is named like a tensor of {arch} "
            f"(file: {next(iter(tensors), '-')}, model: {next(iter(own), '-')})"
        )
    for k in matched:  # a scalar saved as [1] vs [] (open_clip's logit_scale) is the same value
        if tensors[k].shape != own[k].shape and tensors[k].numel() == own[k].numel() == 1:
            tensors[k] = tensors[k].reshape(own[k].shape)
    bad = [k for k in matched if tensors[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"{source}: architecture mismatch with {arch}: {len(bad)} tensor(s) differ in shape, e.g. {k} is "
            f"{list(tensors[k].shape)} in the file and {list(own[k].shape)} in the model"
        )
    missing = [k for k in own if k not in tensors]
    unused = [k for k in tensors if k not in own]
    if missing and not allow_missing:
        raise ConfigError(
            f"{source}: {len(missing)} of the {len(own)} tensors of {arch} are not in the file ({groups(missing)}), "
            "so they would stay random: check external.arch / arch_kwargs, or set external.allow_missing=true"
        )
    model.load_state_dict({k: tensors[k] for k in matched}, strict=False)
    if missing:
        log.warning(
            "%s: %d tensors of %s not in the file, left at init: %s", source, len(missing), arch, groups(missing)
        )
    if unused:
        log.info("%s: %d tensors not used by %s: %s", source, len(unused), arch, groups(unused))
    return {"loaded": len(matched), "missing": missing, "unused": unused, "prefixes_stripped": stripped}


def first_conv(module: nn.Module) -> Tensor:
    """The weight of the module's first convolution (native dims and channels come from it)."""
    for m in module.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return m.weight
    raise ConfigError(f"{type(module).__name__}: no convolution found to read the input channels from")


def pair(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int | float):
        return (int(size), int(size))
    if isinstance(size, dict):
        if "height" in size:
            return (int(size["height"]), int(size["width"]))
        edge = size.get("shortest_edge") or size.get("longest_edge")
        return (int(edge), int(edge)) if edge else None
    return (int(size[0]), int(size[-1]))
