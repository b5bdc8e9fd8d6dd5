"""Compose Hydra configs (struct mode on) and instantiate them through a ``_target_`` allow-list.

The compose API is used instead of ``@hydra.main``: the CLI verb stays in ``sys.argv``, so processes that
Lightning's DDP launcher re-runs come back with the same verb and overrides, and nothing changes the working
directory. Errors name the bad key or option and list the valid ones, before any work starts.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

GROUPS = ("method", "task", "data", "trainer", "logger", "paths", "suite")
#: ``_target_`` prefixes a config may instantiate; extend with MEDBENCH_ALLOWED_TARGETS=pkg1.,pkg2.
ALLOWED_TARGET_PREFIXES = ("medvlp_bench.",)


if not OmegaConf.has_resolver("abspath"):
    OmegaConf.register_new_resolver("abspath", lambda p: str(Path(str(p)).expanduser().resolve()))


class ConfigError(ValueError):
    """A config problem the user can fix; the message says what and lists valid choices."""


def config_dir() -> Path:
    return Path(str(importlib.resources.files("medvlp_bench.configs")))


def search_dirs() -> list[Path]:
    """The package's configs plus user folders from MEDBENCH_CONFIG_PATH (os.pathsep separated)."""
    extra = [Path(p) for p in os.environ.get("MEDBENCH_CONFIG_PATH", "").split(os.pathsep) if p]
    return [config_dir(), *extra]


def options(group: str) -> list[str]:
    """Names available in a config group (file stems), across all search folders."""
    names: set[str] = set()
    for d in search_dirs():
        names.update(p.stem for p in (d / group).glob("*.yaml"))
    return sorted(names)


def _check_group_choices(overrides: list[str]) -> None:
    for ov in overrides:
        key, sep, value = ov.lstrip("+~").partition("=")
        if sep and key in GROUPS and value not in ("null", "") and "," not in value:
            valid = options(key)
            if value not in valid:
                raise ConfigError(f"unknown {key} {value!r}; valid {key} names: {', '.join(valid)}")


def _searchpath_override() -> list[str]:
    extra = search_dirs()[1:]
    if not extra:
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{p.resolve()}" for p in extra) + "]"]


def external_aliases(overrides: list[str]) -> list[str]:
    """``external.<key>=v`` -> ``method.model.<key>=v`` (``external.name`` -> ``method.name``): the short form of
    ``method=external`` (``methods/external.py``) that ``medbench run`` documents."""
    out = []
    for o in overrides:
        sign = o[: len(o) - len(o.lstrip("+~"))]
        body = o[len(sign) :]
        if body.startswith("external."):
            rest = body.removeprefix("external.")
            body = f"method.{rest}" if rest.split("=")[0] == "name" else f"method.model.{rest}"
        out.append(sign + body)
    return out


def method_label(cfg: DictConfig, choice: str | None) -> str | None:
    """The name rows and checkpoints use: the method option, except for the generic ``external`` entry, which is
    named after its model (``external.name``, else ``external-<model folder or file name>``), so that two models
    evaluated through it never share result cells."""
    if choice != "external" or "method" not in cfg:
        return choice
    name = cfg.method.get("name")
    if not name:
        model = cfg.method.model
        path = OmegaConf.select(model, "path", throw_on_missing=False)
        stem = Path(str(path).rstrip("/")).name if path not in (None, "???") else model.get("arch")
        if not stem:
            return choice
        for suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
            stem = stem.removesuffix(suffix)
        random = model.get("init") == "random"  # the model's untrained twin is another method
        name = f"external-{stem}" + ("-random" if random else "")
    return "_".join(part for part in re.sub(r"[^A-Za-z0-9.-]+", "_", str(name)).split("_") if part) or choice


def compose(root: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/<root>.yaml`` with Hydra-style overrides; add ``names`` (the chosen group options)."""
    overrides = external_aliases(list(overrides or []))
    _check_group_choices(overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="medbench"):
            cfg = hydra_compose(root, overrides=overrides + _searchpath_override(), return_hydra_config=True)
    except HydraException as e:
        raise ConfigError(_explain(root, overrides, e)) from None
    with open_dict(cfg):
        choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if k in GROUPS}
        if "method" in choices:
            choices["method"] = method_label(cfg, choices["method"])
        del cfg["hydra"]
        cfg["names"] = choices
    OmegaConf.set_struct(cfg, True)
    return cfg


def _explain(root: str, overrides: list[str], err: Exception) -> str:
    msg = str(err)
    if "not in struct" in msg or "Could not override" in msg or "Could not append" in msg:
        bad = next((o for o in overrides if f"'{o.lstrip('+~').split('=')[0]}'" in msg), None)
        if bad is not None:
            key = bad.lstrip("+~").split("=")[0]
            parent, _, leaf = key.rpartition(".")
            try:
                rest = [o for o in overrides if o != bad]
                with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                    base = hydra_compose(root, overrides=rest + _searchpath_override())
                node = OmegaConf.select(base, parent) if parent else base
                if isinstance(node, DictConfig):
                    valid = ", ".join(map(str, node.keys()))
                    return f"unknown config key {key!r}; valid keys under {parent or 'the root'}: {valid}"
            except HydraException:
                pass
            return f"unknown config key {key!r} ({msg.splitlines()[0]})"
    if "You must specify" in msg:
        group = msg.split("'")[1] if "'" in msg else "?"
        return f"{msg.splitlines()[0]}; valid {group} names: {', '.join(options(group))}"
    return msg


def check_targets(cfg: Any, path: str = "") -> None:
    """Refuse any ``_target_`` outside the allow-list, so a downloaded config cannot run arbitrary code."""
    extra = tuple(p for p in os.environ.get("MEDBENCH_ALLOWED_TARGETS", "").split(",") if p)
    allowed = ALLOWED_TARGET_PREFIXES + extra
    if isinstance(cfg, DictConfig | dict):
        for k, v in cfg.items():
            if k == "_target_" and not str(v).startswith(allowed):
                raise ConfigError(
                    f"{path or 'config'}._target_ = {v!r} is not allowed; targets must start with {allowed} "
                    "(set MEDBENCH_ALLOWED_TARGETS to extend)"
                )
            check_targets(v, f"{path}.{k}" if path else str(k))
    elif isinstance(cfg, ListConfig | list):
        for i, v in enumerate(cfg):
            check_targets(v, f"{path}[{i}]")


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` behind the allow-list check."""
    check_targets(cfg)
    return hydra_instantiate(cfg, **kwargs)


def to_container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig | ListConfig) else cfg


def tiny_overrides(method: str) -> list[str]:
    """The method's own ``tiny:`` overrides (CPU smoke tests and ``suite=smoke``), prefixed for a run config."""
    cfg = compose("pretrain", [f"method={method}", "data=phantom_cxr"])
    return [str(o) for o in (cfg.method.get("tiny") or [])]


def unmet_requirements(method_cfg: DictConfig, data_cfg: DictConfig) -> str | None:
    """Why ``method_cfg`` cannot pre-train on ``data_cfg`` (its ``requires:`` block), or None if it can.

    ``requires`` may name ``spatial_dims`` (an int or a list) and ``min_channels``: BrainMVP, for instance,
    needs 3D studies with at least two modalities. Runs skip such cells with this reason; ``pretrain`` fails.
    """
    req = method_cfg.get("requires") or {}
    name = data_cfg.get("name", "the corpus")
    dims = req.get("spatial_dims")
    if dims is not None:
        allowed = [int(d) for d in dims] if isinstance(dims, ListConfig | list | tuple) else [int(dims)]
        have = data_cfg.get("spatial_dims")
        if have is not None and int(have) not in allowed:
            want = " or ".join(f"{d}D" for d in allowed)
            return f"it pre-trains on {want} data only and {name} is {int(have)}D"
    min_channels = req.get("min_channels")
    have_ch = data_cfg.get("in_channels")
    if min_channels is not None and have_ch is not None and int(have_ch) < int(min_channels):
        return f"it needs >= {int(min_channels)} channels (modalities) and {name} has {int(have_ch)}"
    return None
