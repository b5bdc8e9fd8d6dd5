"""Compose Hydra configs (struct mode on) and instantiate them through a ``_target_`` allow-list.

The compose API is used instead of ``@hydra.main``: the CLI verb stays in ``sys.argv``, so processes that
Lightning's DDP launcher re-runs come back with the same verb and overrides, and nothing changes the working
directory. Errors name the bad key or option and list the valid ones, before any work starts.
"""

from __future__ import annotations

import functools
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
if not OmegaConf.has_resolver("text_tower"):  # text_encoder.name: ${text_tower:${oc.select:data,null}}

    def _text_tower(corpus: Any) -> str:
        from .text import default_text_tower

        return default_text_tower(corpus)

    OmegaConf.register_new_resolver("text_tower", _text_tower)


class ConfigError(ValueError):
    """A config problem the user can fix; the message says what and lists valid choices."""


def config_dir() -> Path:
    return Path(str(importlib.resources.files("medvlp_bench.configs")))


def search_dirs() -> list[Path]:
    """The package's configs plus user folders from MEDBENCH_CONFIG_PATH (os.pathsep separated)."""
    extra = [Path(p) for p in os.environ.get("MEDBENCH_CONFIG_PATH", "").split(os.pathsep) if p]
    return [config_dir(), *extra]


def configs_stamp() -> tuple[tuple[str, int], ...]:
    """Every config file in the search folders with its modification time: the key of a memo of composed configs,
    so an edited yaml or another MEDBENCH_CONFIG_PATH in the same process is never served a stale one."""
    return tuple((str(f.resolve()), f.stat().st_mtime_ns) for d in search_dirs() for f in sorted(d.rglob("*.yaml")))


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
                hint = ""
                if key == "task" and value in options("data"):
                    hint = f" ({value} is a dataset without a task of its own: use it as a corpus with data={value})"
                raise ConfigError(f"unknown {key} {value!r}{hint}; valid {key} names: {', '.join(valid)}")


#: task kinds (the module of a task's ``_target_``) in the order that picks a dataset's main task
KIND_ORDER = ("classification", "segmentation", "retrieval", "zeroshot")


def task_kind(target: object) -> str:
    """The ``kind`` a task class declares (``Task.kind``: the task says what it is), from its ``_target_``; ""
    for a target that is not allow-listed, cannot be imported or declares no kind."""
    from hydra.utils import get_class

    try:
        check_targets({"_target_": str(target or "")})
        return str(getattr(get_class(str(target)), "kind", ""))
    except Exception:  # a bad target is reported where the task is built, with its key
        return ""


def quoted(value: object) -> str:
    """``value`` as a quoted Hydra override value: a path with commas, brackets, ``=`` or ``${`` stays a string."""
    # Hydra unescapes backslashes only in front of a quote (and the closing one): double just those runs
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, str(value))
    text = text.replace("'", "\\'").replace("${", "\\${")  # a literal quote; no interpolation
    return f"'{text}'"


def _yaml(group: str, name: str) -> DictConfig | None:
    """The first ``<group>/<name>.yaml`` across the search folders, unresolved (cheap: no Hydra compose)."""
    for d in search_dirs():
        f = d / group / f"{name}.yaml"
        if f.is_file():
            cfg = OmegaConf.load(f)
            return cfg if isinstance(cfg, DictConfig) else None
    return None


def _task_data(task_cfg: DictConfig) -> str | None:
    """The data config a task's ``defaults`` list puts at ``data`` (``- /data@data: rsna`` -> ``rsna``)."""
    for item in task_cfg.get("defaults") or []:
        if isinstance(item, DictConfig):
            for key, value in item.items():
                if str(key).removeprefix("override ").strip().lstrip("/") == "data@data":
                    return str(value)
    return None


def task_shortcuts() -> dict[str, str]:
    """Dataset name -> its main task, derived from the task configs, so ``task=rsna`` runs ``rsna_cls``.

    The main task of a dataset is, among the tasks whose ``defaults`` put that dataset at ``data``, the first by
    kind (classification, segmentation, retrieval, zero-shot), then by name. A name that is itself a task is
    never a shortcut; a dataset that no task uses has none. Read once per state of the config files (every
    ``compose`` asks, and a suite plan composes hundreds of cells).
    """
    return dict(_task_shortcuts(configs_stamp()))


@functools.cache
def _task_shortcuts(_stamp: object) -> tuple[tuple[str, str], ...]:
    tasks = set(options("task"))
    found: dict[str, list[tuple[int, str]]] = {}
    for name in sorted(tasks):
        cfg = _yaml("task", name)
        data = _task_data(cfg) if cfg is not None else None
        if data is None or data in tasks:
            continue
        kind = task_kind(cfg.get("_target_"))
        rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        found.setdefault(data, []).append((rank, name))
    return tuple((data, min(ranked)[1]) for data, ranked in sorted(found.items()))


def _expand_shortcuts(overrides: list[str]) -> list[str]:
    """``task=<dataset>`` -> ``task=<its main task>``; everything else unchanged."""
    if not any(o.startswith("task=") for o in overrides):
        return overrides
    short = task_shortcuts()
    return [f"task={short[o[5:]]}" if o.startswith("task=") and o[5:] in short else o for o in overrides]


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
        path = model.get("path")
        stem = Path(str(path).rstrip("/")).name if path is not None else model.get("arch")
        if not stem:
            return choice
        for suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
            stem = stem.removesuffix(suffix)
        random = model.get("init") == "random"  # the model's untrained twin is another method
        name = f"external-{stem}" + ("-random" if random else "")
    return "_".join(part for part in re.sub(r"[^A-Za-z0-9.-]+", "_", str(name)).split("_") if part) or choice


def compose(root: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/<root>.yaml`` with Hydra-style overrides; add ``names`` (the chosen group options)."""
    overrides = external_aliases(_expand_shortcuts(list(overrides or [])))
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
    check_values(cfg)
    return cfg


#: protocols of each task kind; the task classes refuse any other (tests/test_preflight.py checks they agree)
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "classification": ("linear", "finetune"),
    "segmentation": ("finetune", "frozen"),
    "retrieval": ("zeroshot",),
    "zeroshot": ("zeroshot",),
}
#: what Lightning's Trainer takes as ``precision`` (lightning.fabric.connector._PRECISION_INPUT)
PRECISIONS = (
    "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16,
)  # fmt: skip
#: keys that must be one of a fixed set of values (``trainer.progress``: run.make_trainer; ``logger.kind``: tracking)
CHOICES: dict[str, tuple[object, ...]] = {
    "pretrain": ("auto", "never"),
    "trainer.progress": ("rich", "tqdm", "none"),
    "trainer.precision": PRECISIONS,
    "logger.kind": ("mlflow", "csv", "none"),
}
#: keys that must be whole numbers of at least this when present (``scratch`` pre-trains for 0 epochs)
MIN_INTS = {
    "method.pretrain.max_epochs": 0,
    "method.pretrain.batch_size": 1,
    "task.max_epochs": 1,
    "task.batch_size": 1,
    "task.data.size": 1,
    "data.size": 1,
}
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    except Exception as e:  # an interpolation that cannot resolve (a missing env variable, a bad reference)
        raise ConfigError(f"{key}: cannot resolve its value: {str(e).splitlines()[0]}") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_values(cfg: DictConfig) -> None:
    """Refuse values that Hydra accepts but a run cannot use, in one line that names the valid values.

    Called by ``compose``, so ``seed=abc`` or ``task.label_fraction=2`` fail before any work, as misspelt keys do.
    Only keys present in ``cfg`` are checked (``run``, ``pretrain`` and ``bench`` roots hold different ones).
    """
    seed = _value(cfg, "seed")
    if seed is not _ABSENT and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise ConfigError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    for key, valid in CHOICES.items():
        value = _value(cfg, key)
        if value is not _ABSENT and value not in valid:
            raise ConfigError(f"{key} must be one of {', '.join(dict.fromkeys(map(str, valid)))}; got {value!r}")
    for key, least in MIN_INTS.items():
        value = _value(cfg, key)
        if value is not _ABSENT and value is not None and not (_is_int(value) and value >= least):
            raise ConfigError(f"{key} must be a whole number >= {least}, got {value!r}")
    if not isinstance(cfg.get("task"), DictConfig):
        return
    frac = _value(cfg, "task.label_fraction")
    if frac is not _ABSENT and not (isinstance(frac, int | float) and not isinstance(frac, bool) and 0 < frac <= 1):
        raise ConfigError(f"task.label_fraction must be a number in (0, 1], e.g. 0.01, 0.1 or 1.0; got {frac!r}")
    kind = task_kind(cfg.task.get("_target_"))
    protocol = _value(cfg, "task.protocol")
    if kind in PROTOCOLS and protocol is not _ABSENT and protocol not in PROTOCOLS[kind]:
        valid = ", ".join(PROTOCOLS[kind])
        raise ConfigError(f"task.protocol {protocol!r} is not a {kind} protocol; valid: {valid}")


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
