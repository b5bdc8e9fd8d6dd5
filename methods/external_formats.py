"""The ``external`` formats open_clip, hf (Hugging Face) and torchvision, each read into a ``Loaded`` model;
MONAI networks are in ``external_monai``. ``LOADERS`` maps ``external.format`` to its reader."""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from medvlp_bench.config import ConfigError
from medvlp_bench.methods.external_load import (
    FORMATS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Loaded,
    first_conv,
    groups,
    load_into,
    need_dir,
    need_file,
    one_line,
    pair,
    read_tensors,
    weight_files,
)
from medvlp_bench.methods.external_monai import load_monai

log = logging.getLogger("medvlp_bench")
__all__ = ["FORMATS", "LOADERS", "Loaded"]
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: torchvision families whose trunk gives NCHW feature maps (resnet-like, regnet, or a ``features`` sequence)
TV_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet", "densenet", "convnext", "efficientnet", "mobilenet", "vgg")


# ---- open_clip --------------------------------------------------------------------------------------------
class OpenClipVisual(nn.Module):
    """open_clip image tower: pooled = the image embedding, maps = every block's (or stage's) output."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.visual.forward_intermediates(x)
        return out["image_features"], list(out["image_intermediates"])


class OpenClipText(nn.Module):
    """open_clip text tower (the model without its image tower): token ids -> text embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, text: dict[str, Tensor]) -> Tensor:
        return self.model.encode_text(text["input_ids"])


class OpenClipTokenizer:
    """open_clip's tokenizer as the harness calls tokenizers: list of texts -> ids and mask (pad id 0)."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        ids = self.tokenizer(list(texts))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def load_open_clip(path: str | None, *, pretrained: bool, allow_missing: bool, **_: Any) -> Loaded:
    folder = need_dir(path, "open_clip", "open_clip_config.json")
    files = weight_files(folder, OPEN_CLIP_WEIGHTS, "open_clip") if pretrained else []
    import open_clip

    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": the weights are loaded below
    try:  # builds from open_clip_config.json only: no weights, no download (tower weights off)
        model = open_clip.create_model(
            f"local-dir:{folder}", load_weights=False, pretrained_image=False, pretrained_text=False
        )
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except Exception as e:  # open_clip raises many types; the user needs the one line
        where = folder / "open_clip_config.json"
        raise ConfigError(f"{where}: open_clip cannot build this model offline ({one_line(e)})") from None
    finally:
        logging.disable(logging.NOTSET)
    report = load_into(model, read_tensors(files), str(files[0]), "the open_clip model", allow_missing) if files else {}
    prep = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual
    model.visual = nn.Identity()  # the text tower keeps the rest; each tower is its own module
    return Loaded(
        trunk=OpenClipVisual(visual),
        spatial_dims=2,
        in_channels=int(first_conv(visual).shape[1]),
        weight_files=files,
        size=pair(prep.get("size")),
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
        text=OpenClipText(model),
        tokenizer=OpenClipTokenizer(tokenizer),
        report=report,
    )


# ---- Hugging Face -------------------------------------------------------------------------------------------
class HFVision(nn.Module):
    """A transformers vision model (+ the joint-space projection of a dual encoder).

    pooled: the projected pooler output (CLIP, dual encoders); else the parameter-free pooler output (Swin,
    ConvNeXt, ResNet) or the [CLS] token of token models. maps: the stage outputs, or the layer outputs'
    patch tokens on the patch grid (prefix tokens dropped).
    """

    def __init__(self, vision: nn.Module, projection: nn.Module | None, patch: int | None) -> None:
        super().__init__()
        self.vision, self.projection, self.patch = vision, projection, patch

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.vision(pixel_values=x, output_hidden_states=True, return_dict=True)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            last = out.last_hidden_state
            pooled = last[:, 0] if last.ndim == 3 else last.flatten(2).mean(-1)
        pooled = pooled.flatten(1)
        if self.projection is not None:
            pooled = self.projection(pooled)
        return pooled, self._maps(out, x.shape[2:])

    def _maps(self, out: Any, size: Sequence[int]) -> list[Tensor]:
        if getattr(out, "reshaped_hidden_states", None) is not None:
            return list(out.reshaped_hidden_states)
        hidden = list(out.hidden_states or [])
        if hidden and hidden[0].ndim == 4:
            return hidden
        b, n = hidden[-1].shape[:2]
        gh, gw = (size[0] // self.patch, size[1] // self.patch) if self.patch else (math.isqrt(n),) * 2
        return [h[:, h.shape[1] - gh * gw :].transpose(1, 2).reshape(b, -1, gh, gw) for h in hidden[1:]]


class HFText(nn.Module):
    """A dual encoder's text side: projected pooler output of the text model."""

    def __init__(self, text: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.text, self.projection = text, projection

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        out = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], return_dict=True)
        return self.projection(out.pooler_output)


def _hf_preprocessing(folder: Path) -> tuple[tuple[int, int] | None, Any, Any]:
    """Input size, mean and std from ``preprocessor_config.json`` (None when the folder has none)."""
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        return None, None, None
    cfg = json.loads(f.read_text())
    size = pair(cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size"))
    if cfg.get("do_normalize", True) is False:
        return size, None, None
    return size, cfg.get("image_mean"), cfg.get("image_std")


def _hf_report(info: dict[str, Any], source: str, arch: str, dropped: tuple[str, ...], allow_missing: bool) -> dict:
    """transformers' loading info under the same rules as :func:`load_into` (one-line refusals)."""
    if info.get("mismatched_keys"):
        k, got, want = next(iter(info["mismatched_keys"]))
        raise ConfigError(
            f"{source}: architecture mismatch with {arch}: {len(info['mismatched_keys'])} tensor(s) differ in "
            f"shape, e.g. {k} is {list(got)} in the file and {list(want)} in the model"
        )
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(dropped)]
    if missing and not allow_missing:
        raise ConfigError(
            f"{source}: {len(missing)} tensors of {arch} are not in the file ({groups(missing)}), so they would "
            "stay random: check the folder's config.json, or set external.allow_missing=true"
        )
    unused = list(info.get("unexpected_keys", []))
    if unused:
        log.info("%s: %d tensors not used by %s: %s", source, len(unused), arch, groups(unused))
    return {"missing": missing, "unused": unused}


def load_hf(path: str | None, *, pretrained: bool, allow_missing: bool, **_: Any) -> Loaded:
    """A transformers folder through ``from_pretrained`` (its key conversions), after checking that any
    ``.bin`` file holds tensors only; ``from_pretrained`` itself reads with ``weights_only=True``."""
    folder = need_dir(path, "hf", "config.json")
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel, VisionTextDualEncoderModel

    from medvlp_bench.text import Tokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ConfigError(f"{folder / 'config.json'}: transformers cannot read it ({one_line(e)})") from None
    kind = config.model_type
    dual = {"clip": CLIPModel, "vision-text-dual-encoder": VisionTextDualEncoderModel}
    cls = dual.get(kind, AutoModel)
    files = weight_files(folder, HF_WEIGHTS, "hf") if pretrained else []
    for f in files:
        if f.suffix != ".safetensors":
            read_tensors([f])  # refuses pickled objects with a message before transformers opens it
    report: dict[str, Any] = {}
    try:
        if files:
            model, info = cls.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
            )
        else:
            model, info = cls.from_config(config) if cls is AutoModel else cls(config), {}
    except Exception as e:
        raise ConfigError(f"{folder}: transformers cannot build {kind} from it ({one_line(e)})") from None
    if kind not in dual and "pixel_values" not in inspect.signature(model.forward).parameters:
        raise ConfigError(
            f"{folder}: {type(model).__name__} ({kind}) is not a vision model; format hf takes CLIPModel, "
            "VisionTextDualEncoderModel or a vision backbone (ViT, Swin, ConvNeXt, ResNet, ...)"
        )
    dropped: tuple[str, ...] = ()
    if kind not in dual and getattr(model, "pooler", None) is not None and any(True for _ in model.pooler.parameters()):
        model.pooler, dropped = None, ("pooler.",)  # a trained head (ViT's tanh pooler) the probes do not read
    if files:
        report = _hf_report(info, str(files[0]), type(model).__name__, dropped, allow_missing)
    vision_cfg = config.vision_config if kind in dual else config
    patch = getattr(vision_cfg, "patch_size", None)
    if kind in dual:
        trunk = HFVision(model.vision_model, model.visual_projection, patch)
    else:
        trunk = HFVision(model, None, patch)
    size, mean, std = _hf_preprocessing(folder)
    if not (folder / "preprocessor_config.json").is_file():
        log.warning(
            "%s: no preprocessor_config.json, so images go in at the task's size and intensities; save the model's "
            "image processor there, or set external.mean, external.std and external.input_size",
            folder,
        )
    text = tokenizer = None
    if kind in dual:
        try:
            hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise ConfigError(
                f"{folder}: no tokenizer transformers can read ({one_line(e)}); save it with the model"
            ) from None
        max_len = int(getattr(config.text_config, "max_position_embeddings", 128) or 128)
        text, tokenizer = HFText(model.text_model, model.text_projection), Tokenizer(hf_tok, min(max_len, 512))
    return Loaded(
        trunk=trunk,
        spatial_dims=2,
        in_channels=int(getattr(vision_cfg, "num_channels", 3)),
        weight_files=files,
        size=size,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        text=text,
        tokenizer=tokenizer,
        report=report,
    )


# ---- torchvision --------------------------------------------------------------------------------------------
class TorchvisionTrunk(nn.Module):
    """A torchvision CNN without its head: the output of every trunk module; pooled = mean of the last map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def stages(self) -> list[nn.Module]:
        m = self.model
        if hasattr(m, "layer1"):
            return [m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4]
        if hasattr(m, "trunk_output"):
            return [m.stem, *m.trunk_output]
        return list(m.features)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        maps = []
        for stage in self.stages():
            x = stage(x)
            maps.append(x)
        return x.flatten(2).mean(-1), maps


def load_torchvision(path: str | None, *, arch: str | None, pretrained: bool, allow_missing: bool, **_: Any) -> Loaded:
    import torchvision

    archs = sorted(a for a in torchvision.models.list_models(module=torchvision.models) if a.startswith(TV_FAMILIES))
    if arch not in archs:
        raise ConfigError(
            f"external.arch={arch!r} is not a torchvision CNN this format reads; choose one of {', '.join(archs)} "
            "(ViT and Swin checkpoints: external.format=hf)"
        )
    files = [need_file(path, "torchvision")] if pretrained else []
    model = torchvision.models.get_model(arch, weights=None)
    head = "fc" if hasattr(model, "fc") else "classifier"
    setattr(model, head, nn.Identity())  # the head's tensors in a file are reported as unused
    report = load_into(model, read_tensors(files), str(files[0]), f"torchvision {arch}", allow_missing) if files else {}
    return Loaded(
        trunk=TorchvisionTrunk(model),
        spatial_dims=2,
        in_channels=int(first_conv(model).shape[1]),
        weight_files=files,
        size=(224, 224),  # what torchvision's ImageNet weights and most fine-tuned releases take
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        report=report,
    )


LOADERS: dict[str, Callable[..., Loaded]] = {
    "open_clip": load_open_clip,
    "hf": load_hf,
    "torchvision": load_torchvision,
    "monai": load_monai,
}
