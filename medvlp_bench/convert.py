"""``medbench convert``: import the authors' released weights (BrainMVP, GTGM) into a benchmark checkpoint.

Released files are PyTorch pickles. They are read with ``torch.load(weights_only=True)`` (tensors and plain
containers only: a file holding any other object is refused, never unpickled) or as safetensors, unwrapped
(``state_dict`` / ``model`` / ... keys, ``module.`` prefixes), renamed by a per-method table of regex rules
(``MAPPINGS``: data, so a new layout is one line), shape-checked, and written as ``model.safetensors`` +
``config.json`` through the project's checkpoint writer, so ``medbench run method=<m> ckpt=<folder>`` evaluates
them like any pre-trained checkpoint. What is known and unknown about the released files: docs/convert.md.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

ChannelPolicy = Literal["adapt", "skip", "error"]
#: wrapper keys tried in this order until a dict holding tensors is found (EMA teacher before student: the
#: teacher is what self-distillation methods evaluate)
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "teacher", "student")
#: key prefixes added by DistributedDataParallel / DataParallel and torch.compile
PREFIXES = ("module.", "_orig_mod.")


class ConvertError(ValueError):
    """A source file or conversion problem the user can act on; the message names the file or key."""


#: (source tensor, target tensor, target module) -> (tensor to load or None, note)
Hook = Callable[[Tensor, Tensor, nn.Module], tuple[Tensor | None, str]]


@dataclass(frozen=True)
class KeyMap:
    """How one method's released layout maps onto our module. Regexes are full matches; first rule wins."""

    rules: tuple[tuple[str, str], ...]  # (source key regex, target key template with \1 groups)
    ignore: tuple[tuple[str, str], ...] = ()  # (source key regex, why): authors' parts with no counterpart here
    keep_init: tuple[tuple[str, str], ...] = ()  # (target key regex, why): ours, not needed downstream
    hooks: Mapping[str, Hook] = field(default_factory=dict)  # target key -> special conversion
    data: str = "phantom_ct"  # corpus that sets input dims/size when the command names no data=
    signatures: tuple[tuple[str, str], ...] = ()  # (source key regex, architecture) for messages
    #: (source key regex, image-encoder preset): the preset a layout loads into, used when no override names one
    encoders: tuple[tuple[str, str], ...] = ()


# ---- BrainMVP -----------------------------------------------------------------------------------------
#: template row order by template count: 8 in do_pretrain.sh / Downstream/train_script.py, 4 in main.py's default
BRAINMVP_TEMPLATE_ORDER = {8: ("flair", "t1", "t1c", "t2", "mra", "pd", "dwi", "adc"), 4: ("flair", "t1", "t1c", "t2")}
#: our / BraTS-2023 modality names -> the authors' names
MODALITY_ALIASES = {"t1ce": "t1c", "t1gd": "t1c", "t1n": "t1", "t1w": "t1", "t2w": "t2", "t2f": "flair"}


def _brainmvp_templates(src: Tensor, like: Tensor, module: nn.Module) -> tuple[Tensor | None, str]:
    """Pick the authors' ``rep_template`` rows by modality name, in our ``modalities`` order; no resampling."""
    names = BRAINMVP_TEMPLATE_ORDER.get(src.shape[0])
    want = [MODALITY_ALIASES.get(m.lower(), m.lower()) for m in getattr(module, "modalities", [])]
    if names is None:
        return None, f"{src.shape[0]} source templates: their modality order is unknown"
    if absent := [w for w in want if w not in names]:
        return None, f"no source template for {absent} (source rows: {list(names)})"
    picked = src[[names.index(w) for w in want]]
    if picked.shape[1:] != like.shape[1:]:
        return None, (
            f"template canvas {list(picked.shape[1:])} != ours {list(like.shape[1:])}; "
            f"pass method.model.template_size={list(picked.shape[1:])} to keep them"
        )
    return picked, f"templates {want} = source rows {[names.index(w) for w in want]} of {list(names)}"


BRAINMVP = KeyMap(
    rules=(
        (r"rep_template", "templates_no_decay"),
        (r"encoder\.uniformer\.(.+)", r"image_encoder.net.\1"),  # BrainMVP_uniformer.pt (RecModel.encoder)
        (r"((?:conv[1-4][a-d]|ds[1-3])\..+)", r"image_encoder.net.\1"),  # BrainMVP_unet.pt (encoder half)
    ),
    ignore=(
        (r"decoder\..+", "UniSegDecoder: the authors' pre-training reconstruction head (ours is rec_decoder)"),
        (r"(?:up[2-4]conv[ab]|up1conv)\..+", "U-Net decoder: pre-training reconstruction only"),
    ),
    keep_init=((r"rec_decoder\..+", "pre-training-only reconstruction decoder, unused downstream"),),
    hooks={"templates_no_decay": _brainmvp_templates},
    data="phantom_mri",
    signatures=((r"encoder\.uniformer\..+", "UniFormer-small (BrainMVP_uniformer.pt)"), (r"conv1a\..+", "3D U-Net")),
    encoders=((r"encoder\.uniformer\..+", "uniformer_small"), (r"conv1a\..+", "brainmvp_unet")),
)

# ---- GTGM -----------------------------------------------------------------------------------------------
GTGM = KeyMap(
    rules=(
        (r"(?:encoder\.)?swinViT\.(.+)", r"image_encoder.net.\1"),  # ResNet_CXRBert.encoder = SwinUNETR
        # SwinUNETR(for_pretrain=True)'s pre-training head: encoder10 on the deepest stage, head() = pool + linear
        (r"(?:encoder\.)?(encoder10|linear)\.(.+)", r"image_head.\1.\2"),
        (r"((?:patch_embed|layers[1-4]c?)\..+)", r"image_encoder.net.\1"),  # bare Swin trunk (MONAI SSL layout)
        (r"(?:encoder\.|backbone\.)?((?:conv1|bn1|layer[1-4])\..+)", r"image_encoder.net.\1"),  # 3D ResNet
        (r"proj_v\.(.+)", r"image_proj.\1"),
        (r"proj_t\.(.+)", r"text_proj.\1"),
        (r"lm_model\.(.+)", r"text_encoder.model.\1"),  # BioBERT (AutoModel)
    ),
    ignore=(
        (r"(?:encoder\.)?(?:encoder[1-4]|decoder\d+|out)\..+", "SwinUNETR's UNETR path (all share SegDecoder)"),
        (r"(?:encoder\.|backbone\.)?fc\..+", "ResNet classifier"),
        (r"lm_model\.embeddings\.position_ids", "constant buffer (not saved by current transformers)"),
    ),
    keep_init=(
        (
            r"image_head\.encoder10\.layer\.norm\d\..+",
            "the CPU default head_norm=batch; the release's instance norm has no parameters "
            "(pass method.model.head_norm=instance for a released file)",
        ),
    ),
    data="phantom_ct",
    signatures=((r"(?:encoder\.)?swinViT\..+", "SwinUNETR"), (r"(?:encoder\.|backbone\.)?layer1\..+", "3D ResNet")),
    # the released trunk is the paper-size SwinUNETR (feature_size 48); gtgm.yaml's default is the CPU swin_small
    encoders=((r"(?:encoder\.)?swinViT\..+", "swin_unetr"),),
)

MAPPINGS: dict[str, KeyMap] = {"brainmvp": BRAINMVP, "gtgm": GTGM}


@dataclass
class ConversionReport:
    """What happened to every source and target key (also saved in the checkpoint's provenance)."""

    method: str
    loaded: dict[str, str] = field(default_factory=dict)  # source key -> target key
    missing: list[str] = field(default_factory=list)  # target keys nothing was loaded into
    unexpected: list[str] = field(default_factory=list)  # source keys no rule maps onto a target key
    mismatched: list[dict[str, Any]] = field(default_factory=list)  # mapped but not loadable (shape, hook)
    channel_adaptations: list[dict[str, Any]] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why it is dropped on purpose
    kept_init: dict[str, str] = field(default_factory=dict)  # target key -> why its init is fine
    notes: dict[str, str] = field(default_factory=dict)  # target key -> what a hook did

    def problems(self) -> list[str]:
        """Everything ``--strict`` refuses: missing, unexpected and unloadable keys."""
        return self.missing + self.unexpected + [m["source"] for m in self.mismatched]

    def table(self) -> str:
        """Per-key lines for everything but the plain renames (those are counted)."""
        rows = [("loaded", f"{len(self.loaded)} keys", "")]
        rows += [("adapted", a["target"], a["how"]) for a in self.channel_adaptations]
        rows += [("note", k, v) for k, v in self.notes.items()]
        rows += [("mismatched", m["source"], f"-> {m['target']}: {m['reason']}") for m in self.mismatched]
        rows += [("missing", k, "target key left at init") for k in self.missing]
        rows += [("unexpected", k, "no rule maps it") for k in self.unexpected]
        rows += [("ignored", k, v) for k, v in self.ignored.items()]
        rows += [("kept_init", k, v) for k, v in self.kept_init.items()]
        w = max(len(r[1]) for r in rows)
        return "\n".join(f"{s:<10}  {k:<{w}}  {n}".rstrip() for s, k, n in rows)


def _unwrap(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensor dict inside ``obj`` (wrappers and prefixes removed) and how it was found."""
    path: list[str] = []
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        path.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        seen = f"keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise ConvertError(f"not a state dict (found {seen}); expected name -> tensor, possibly under {WRAPPER_KEYS}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    stripped: dict[str, int] = {}
    for prefix in PREFIXES:
        n = sum(k.startswith(prefix) for k in tensors)
        if n:
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            stripped[prefix] = n
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    return tensors, {"wrapper": path, "prefixes_stripped": stripped, "non_tensor_entries": skipped}


def load_source(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a released ``.pt``/``.pth`` (tensor-only unpickling) or ``.safetensors`` file and unwrap it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise ConvertError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler" in ln or "Unsupported" in ln]
            first = (lines[0].split(" was not")[0] if lines else type(e).__name__).replace("WeightsUnpickler ", "")
            raise ConvertError(
                f"{path}: refused by torch.load(weights_only=True): the file holds objects other than tensors and "
                f"plain containers, which are never unpickled here ({first}). Re-save just the state dict "
                "(torch.save(model.state_dict(), ...)) in an environment you trust."
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
            raise ConvertError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    try:
        tensors, how = _unwrap(obj)
    except ConvertError as e:
        raise ConvertError(f"{path}: {e}") from None
    return tensors, {"format": "safetensors" if path.suffix == ".safetensors" else "torch", **how}


def adapt_stem(weight: Tensor, in_channels: int) -> tuple[Tensor, str]:
    """A stem weight [O, C, *k] for ``in_channels`` inputs.

    Fewer: every target channel gets the mean over the source channels (one modality in, no modality is
    favoured, and the response keeps the per-channel scale). More: channels repeated cyclically and scaled by
    C_src / C_new, so an input equal in every channel gives the pre-trained response (as ``inflate`` does).
    """
    c = weight.shape[1]
    if in_channels < c:
        out = weight.mean(1, keepdim=True).expand(-1, in_channels, *weight.shape[2:]).clone()
        return out, f"{c} -> {in_channels} input channels: mean over the source channels"
    reps = -(-in_channels // c)
    out = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_channels] * (c / in_channels)
    return out, f"{c} -> {in_channels} input channels: repeated cyclically, scaled by {c}/{in_channels}"


def stem_key(module: nn.Module) -> str | None:
    """State-dict key of the first convolution's weight (the stem / patch embedding) of the image encoder."""
    root = getattr(module, "image_encoder", None)
    prefix = "image_encoder." if root is not None else ""
    for name, sub in (root if root is not None else module).named_modules():
        if isinstance(sub, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return f"{prefix}{name}.weight"
    return None


def _target_of(key: str, keymap: KeyMap) -> tuple[str | None, str | None]:
    """(target key, None) for a renamed key, (None, reason) for an ignored one, (None, None) for no rule."""
    for pattern, why in keymap.ignore:
        if re.fullmatch(pattern, key):
            return None, why
    for pattern, template in keymap.rules:
        if m := re.fullmatch(pattern, key):
            return m.expand(template), None
    return None, None


def convert_state_dict(
    method: str, source: Mapping[str, Tensor], target_module: nn.Module, in_channels_policy: ChannelPolicy = "adapt"
) -> ConversionReport:
    """Rename, check and load ``source`` (already unwrapped) into ``target_module`` in place; report every key.

    ``in_channels_policy`` applies to the stem only: ``adapt`` (see :func:`adapt_stem`), ``skip`` (leave it at
    init, reported as mismatched) or ``error``. Any other shape difference is reported, never forced.
    """
    if method not in MAPPINGS:
        raise ConvertError(f"unknown method {method!r}; supported: {', '.join(sorted(MAPPINGS))}")
    keymap, report = MAPPINGS[method], ConversionReport(method=method)
    target, stem, out = target_module.state_dict(), stem_key(target_module), {}
    for key, value in source.items():
        tkey, why = _target_of(key, keymap)
        if why is not None:
            report.ignored[key] = why
            continue
        if tkey is None or tkey not in target:
            report.unexpected.append(key)
            continue
        like, reason, src = target[tkey], None, value
        if tkey in out:
            reason = f"a second source key maps to {tkey}"
        elif tkey in keymap.hooks:
            value, note = keymap.hooks[tkey](value, like, target_module)
            reason = note if value is None else None
            if value is not None:
                report.notes[tkey] = note
        if reason is None and value.shape != like.shape:
            stem_like = tkey == stem and value.ndim == like.ndim and value.ndim > 2
            if stem_like and value.shape[0] == like.shape[0] and value.shape[2:] == like.shape[2:]:
                if in_channels_policy == "error":
                    raise ConvertError(f"{key}: stem has {value.shape[1]} input channels, the model {like.shape[1]}")
                if in_channels_policy == "adapt":
                    value, how = adapt_stem(value, like.shape[1])
                    report.channel_adaptations.append({"source": key, "target": tkey, "how": how})
                else:
                    reason = f"stem channels {value.shape[1]} != {like.shape[1]} (policy skip)"
            else:
                reason = "shape differs"
        if reason is not None:
            shapes = {"source_shape": list(src.shape), "target_shape": list(like.shape)}
            report.mismatched.append({"source": key, "target": tkey, **shapes, "reason": reason})
            continue
        out[tkey] = value.to(like.dtype)
        report.loaded[key] = tkey
    unloadable = {m["target"] for m in report.mismatched}
    for tkey in target:
        if tkey not in out and tkey not in unloadable:  # mismatched targets are reported once, with the reason
            why = next((w for p, w in keymap.keep_init if re.fullmatch(p, tkey)), None)
            if why is None:
                report.missing.append(tkey)
            else:
                report.kept_init[tkey] = why
    target_module.load_state_dict(out, strict=False)
    return report


def build_target(method: str, overrides: Sequence[str], in_channels: int | None) -> tuple[nn.Module, dict, list[str]]:
    """Our method module, composed and instantiated as ``medbench pretrain`` does (seeded init for what is
    not loaded); returns (module, resolved model config for config.json, the overrides used)."""
    from .config import compose, to_container
    from .run import build_method

    ovs = list(overrides)
    if not any(o.lstrip("+~").startswith("data=") for o in ovs):
        ovs.insert(0, f"data={MAPPINGS[method].data}")
    if in_channels is not None:
        ovs.append(f"method.model.image_encoder.in_channels={in_channels}")
    cfg = compose("pretrain", [f"method={method}", *ovs])
    torch.manual_seed(0)
    return build_method(cfg), to_container(cfg.method.model), ovs


ENCODER_NAME = "method.model.image_encoder.name="


def encoder_override(method: str, keys: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``[method.model.image_encoder.name=<preset>]`` for the encoder the source's layout loads into (the
    released size, e.g. ``uniformer_small`` for ``BrainMVP_uniformer.pt``); empty if the overrides name an
    encoder already (a smaller test size, say) or no signature matches."""
    if any(o.lstrip("+~").startswith(ENCODER_NAME) for o in overrides):
        return []
    for pattern, preset in MAPPINGS[method].encoders:
        if any(re.fullmatch(pattern, k) for k in keys):
            return [ENCODER_NAME + preset]
    return []


def _architecture(keys: Sequence[str], keymap: KeyMap) -> str:
    hits = [name for pattern, name in keymap.signatures if any(re.fullmatch(pattern, k) for k in keys)]
    return ", ".join(hits) or "unknown layout"


def main_convert(argv: Sequence[str]) -> int:
    """``medbench convert <method> <source> <out_folder> [overrides] [--in-channels N] [--strict]``."""
    from .checkpoint import file_sha256, save_checkpoint
    from .config import ConfigError

    ap = argparse.ArgumentParser(prog="medbench convert", description="import the authors' released weights")
    ap.add_argument("method", help=f"one of {', '.join(sorted(MAPPINGS))}")
    ap.add_argument("source", type=Path, help=".pt / .pth (read with weights_only=True) or .safetensors")
    ap.add_argument("out", type=Path, help="checkpoint folder to write (model.safetensors + config.json)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. method.model.image_encoder.name=swin_unetr")
    ap.add_argument("--in-channels", type=int, default=None, help="input channels of our model's stem")
    ap.add_argument("--channel-policy", choices=("adapt", "skip", "error"), default="adapt")
    ap.add_argument("--strict", action="store_true", help="fail (exit 2) on any missing/unexpected/unloadable key")
    args = ap.parse_intermixed_args(list(argv))

    def fail(msg: str) -> int:
        print(f"medbench convert: error: {msg}", file=sys.stderr)
        return 2

    try:
        if args.method not in MAPPINGS:
            raise ConvertError(f"unknown method {args.method!r}; supported: {', '.join(sorted(MAPPINGS))}")
        source, how = load_source(args.source)
        chosen = encoder_override(args.method, list(source), args.overrides)
        module, model_cfg, ovs = build_target(args.method, [*chosen, *args.overrides], args.in_channels)
        report = convert_state_dict(args.method, source, module, args.channel_policy)
    except (ConvertError, FileNotFoundError, ConfigError) as e:
        return fail(str(e))
    print(f"{args.method}: {args.source} ({_architecture(list(source), MAPPINGS[args.method])})")
    if chosen:
        print(f"image encoder: {chosen[0].removeprefix(ENCODER_NAME)} (from the source's keys; set {ENCODER_NAME}...)")
    print(report.table())
    if not any(t.startswith("image_encoder.") for t in report.loaded.values()):
        return fail(
            f"no image-encoder weight of {args.source} matched our {args.method} encoder "
            f"(source looks like: {_architecture(list(source), MAPPINGS[args.method])}); see docs/convert.md"
        )
    if args.strict and (bad := report.problems()):
        return fail(f"--strict: {len(bad)} missing/unexpected/unloadable key(s), e.g. {bad[:3]}; nothing written")
    from .run import code_version

    info = {
        "method": args.method,
        "code_version": code_version(),
        "converted_from": {
            "path": str(args.source.resolve()),
            "sha256": file_sha256(args.source),
            "overrides": ovs,
            "channel_policy": args.channel_policy,
            **how,
            "report": asdict(report),
        },
    }
    sha = save_checkpoint(module, model_cfg, args.out, info)
    print(
        f"wrote {args.out} (weights sha256 {sha[:12]}); evaluate: medbench run method={args.method} task=<t> "
        f"ckpt={args.out}"
    )
    return 0
