"""Pre-flight checks: everything a cell or a pre-training run will read, checked in seconds before any work.

``medbench run method=unimedi task=rsna_cls`` with no RSNA data on disk used to generate phantoms and pre-train
for minutes before the task's data was first touched. ``check_cell`` (start of ``run.evaluate``) and
``check_pretrain`` (``run.pretrain``) first resolve the whole config (values, interpolations, ``_target_``
allow-list, the device, ``ckpt=``, the pre-training cache key), then check every real dataset the run will
read: the task's data, and the pre-training corpus with each of its ``parts`` unless the weights come from
``ckpt=`` or a cached checkpoint. A dataset is checked through ``AdapterDataModule.preflight``: the root and
the index (CSV and list files, folder listings), not the images, which ``medbench data check`` reads.
Generated (phantom) data needs no check. Every failure is a one-line ``ConfigError`` or ``DataError`` that
says where the data should be, how to get it and which key points at it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, check_targets, check_values, instantiate, options, unmet_requirements
from .datasets._errors import DataError, DatasetNotFoundError

#: resolved data configs that passed in this process (a bench re-checks the same data for every cell)
_PASSED: set[str] = set()


def check_cell(cfg: DictConfig) -> None:
    """Everything ``run.evaluate`` will need for this cell; raises ConfigError or DataError, does no work."""
    check_config(cfg)
    if cfg.get("ckpt"):
        from .checkpoint import CONFIG, WEIGHTS, is_checkpoint

        if not is_checkpoint(cfg.ckpt):
            raise ConfigError(f"ckpt={cfg.ckpt} is not a checkpoint folder (it needs {WEIGHTS} and {CONFIG})")
    check_data(cfg.task.data, "task.data")
    check_task(cfg)
    if _needs_corpus(cfg):
        check_data(cfg.data, "data")


def check_pretrain(cfg: DictConfig) -> None:
    """Everything ``run.pretrain`` will need: the config, a method that pre-trains and can take the corpus, and
    the corpus (with its parts)."""
    check_config(cfg)
    if (gap := unmet_requirements(cfg.method, cfg.data)) is not None:
        raise ConfigError(f"method {cfg.names.method!r} cannot pre-train on {cfg.names.data!r}: {gap}")
    if not getattr(target_class(cfg.method.model._target_, "method.model"), "needs_pretraining", True):
        raise ConfigError(f"method {cfg.names.method!r} has no pre-training objective")
    check_data(cfg.data, "data")


def check_task(cfg: DictConfig) -> None:
    """Build the task once, as the run will (without a tokenizer), so a task config the class refuses (a bad
    protocol, a zero-shot task without prompts) fails in seconds, not after pre-training."""
    try:
        instantiate(cfg.task)
    except InstantiationException as e:
        raise ConfigError(f"task {cfg.names.task!r}: {_one_line(str(e.__cause__ or e))}") from None


def check_config(cfg: DictConfig) -> None:
    """Values, the ``_target_`` allow-list, every interpolation and the device; a ConfigError otherwise."""
    check_values(cfg)
    check_targets(cfg)
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(str(e))) from None
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator} but torch sees no CUDA GPU here; use trainer=cpu (or ddp_cpu)"
            )


def _needs_corpus(cfg: DictConfig) -> bool:
    """Whether this cell would pre-train: not for ``ckpt=``, a method with nothing to pre-train, a cell the
    method cannot do (skipped), ``pretrain=never`` (refused later with its own message) or a cached checkpoint."""
    if cfg.get("ckpt") or cfg.get("data") is None or cfg.get("pretrain") == "never":
        return False
    if not getattr(target_class(cfg.method.model._target_, "method.model"), "needs_pretraining", True):
        return False
    if unmet_requirements(cfg.method, cfg.data) is not None:
        return False
    from .checkpoint import checkpoint_dir, is_checkpoint

    return not is_checkpoint(checkpoint_dir(cfg))


def check_data(data_cfg: DictConfig, where: str) -> None:
    """Check one data config (``where``: its key, e.g. ``task.data``) and each of its ``parts``."""
    check_targets(data_cfg, where)
    spec: dict[str, Any] = OmegaConf.to_container(data_cfg, resolve=True)  # type: ignore[assignment]
    for part in spec.get("parts") or {}:
        check_data(data_cfg.parts[part], f"{where}.parts.{part}")
    from .datasets._common import AdapterDataModule

    target = spec.get("_target_")
    cls = target_class(target, where) if target else None
    if not (isinstance(cls, type) and issubclass(cls, AdapterDataModule)):
        return  # generated (phantom) data, or a corpus of parts checked above
    key = json.dumps(spec, sort_keys=True, default=str)
    if key in _PASSED:
        return
    name = str(spec.get("name") or target)
    try:
        dm = instantiate(data_cfg)  # adapters only store their settings here: no file is read
    except InstantiationException as e:
        raise ConfigError(f"{where} ({name}): {_one_line(str(e.__cause__ or e))}") from None
    try:
        dm.preflight()
    except DatasetNotFoundError as e:
        raise DataError(e.path, _not_found(dm, where, name)) from None
    except DataError as e:
        raise DataError(e.path, f"{_one_line(e.problem)} ({where}: {name})") from None
    _PASSED.add(key)


def target_class(target: object, where: str) -> Any:
    """What a ``_target_`` names (already allow-listed: a class or a factory), or a ConfigError naming the key."""
    try:
        return get_object(str(target))
    except Exception as e:  # hydra raises ImportError with a multi-line message
        raise ConfigError(f"{where}._target_ = {target!r} cannot be imported: {_one_line(str(e))}") from None


def _not_found(dm: Any, where: str, name: str) -> str:
    info = dm.info
    check = name if name in options("data") else info.key
    return (
        f"not found; {where} ({name}) is {info.title}, laid out under its root {dm.root} as: "
        f"{_one_line(info.layout, ' | ')}. {info.how_to_get()[0].upper()}{info.how_to_get()[1:]}, then point "
        f"{where}.root (or paths.data_dir, env MEDBENCH_DATA) at it and check it with "
        f"`medbench data check {check} root=<folder>`"
    )


def _one_line(text: str, sep: str = "; ") -> str:
    """Lines joined by ``sep``, runs of spaces collapsed: errors reach the terminal as one line."""
    return sep.join(re.sub(r"\s{2,}", " ", line.strip()) for line in text.splitlines() if line.strip())
