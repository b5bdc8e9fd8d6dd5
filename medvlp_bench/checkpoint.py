"""Method checkpoints as safetensors + JSON config: loading never unpickles anything.

A checkpoint folder holds ``model.safetensors`` (the state dict) and ``config.json`` (the method's resolved
``model`` config, used to rebuild the module through the ``_target_`` allow-list, plus provenance).
Folders are written under a temporary name and renamed, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from safetensors.torch import load_model, save_model
from torch import nn

from .atomic import atomic_open, shared_mode_dir
from .config import to_container
from .versions import method_version

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    model: nn.Module, model_cfg: dict[str, Any], folder: Path, info: dict[str, Any] | None = None
) -> str:
    """Write ``folder/{model.safetensors,config.json}`` atomically; return the weights' sha256."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_model(model, str(tmp / WEIGHTS))
        sha = file_sha256(tmp / WEIGHTS)
        payload = {"model": model_cfg, "weights_sha256": sha, **(info or {})}
        (tmp / CONFIG).write_text(json.dumps(payload, indent=1, default=str) + "\n")
        shared_mode_dir(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sha


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s floating-point parameters (the reference for :func:`relative_shift`)."""
    return {k: p.detach().to("cpu", copy=True) for k, p in module.named_parameters() if p.is_floating_point()}


def relative_shift(reference: dict[str, torch.Tensor], module: nn.Module) -> float:
    """||theta - theta_0|| / ||theta_0|| over the parameters of ``reference`` (all tensors as one vector).

    Why: a pre-training run that barely moves the encoder from its seeded initialisation is ``scratch`` under
    another name, and a benchmark row built on it compares nothing. Recorded in every pre-training checkpoint.
    """
    now = dict(module.named_parameters())
    num = den = 0.0
    for name, ref in reference.items():
        cur = now[name].detach().to("cpu", torch.float64)
        num += float((cur - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / WEIGHTS).is_file() and (Path(folder) / CONFIG).is_file()


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable checkpoint config {path}: {e}") from e


def load_weights(model: nn.Module, folder: Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load ``model.safetensors`` into ``model``; return (missing, unexpected) keys when not strict."""
    path = Path(folder) / WEIGHTS if Path(folder).is_dir() else Path(folder)
    try:
        missing, unexpected = load_model(model, str(path), strict=strict)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot load weights from {path}: {e}") from e
    return list(missing), list(unexpected)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file, fsynced and renamed: a kill mid-write leaves the previous
    checkpoint intact instead of a torn ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_open(Path(path)) as f:
            torch.save(checkpoint, f)


# ---- where a pre-training run is cached ------------------------------------------------------------
def pretrain_key(cfg: DictConfig) -> str:
    """Cache key of a pre-training run: method model + schedule + version, data, seed, precision (not
    workers/paths). A bumped ``Method.version`` gives a new key, so edited code never reuses an old checkpoint;
    version 1 adds nothing, so checkpoints cached before versions existed stay valid."""
    skip = ("num_workers", "pin_memory", "eval_batch_size", "batch_size", "target", "cache_dir", "root")
    data = {k: v for k, v in to_container(cfg.data).items() if k not in skip}
    blob = {
        "method": to_container(cfg.method),
        "data": data,
        "seed": int(cfg.seed),
        "precision": str(cfg.trainer.get("precision", "32-true")),
    }
    if (version := method_version(cfg.method.model._target_)) != 1:
        blob["method_version"] = version
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_dir(cfg: DictConfig) -> Path:
    names = cfg.names
    return Path(cfg.paths.checkpoint_dir) / f"{names.method}__{names.data}__s{cfg.seed}__{pretrain_key(cfg)}"
