"""One evaluation cell, resolved once: the object ``medbench run`` and ``medbench bench`` execute.

A cell is (method, task, protocol, label fraction, seed). Resolving it composes the run config (once more
with a named pre-training corpus, whose layout is read once per process), checks its values and ``_target_``s,
then works out everything the run will touch before any
work starts: the corpus, where the weights come from (``ckpt=``, the seeded initialisation, a cached or a new
pre-training checkpoint), the method and task versions, the files the rows go to, and whether the method can
run on the task at all (its ``requires:`` block, the corpus's channels). ``--dry-run`` prints this object;
``run.evaluate`` runs it; ``bench`` plans a grid of them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from . import checkpoint, results
from .checkpoint import checkpoint_dir
from .config import PROTOCOLS, compose, configs_stamp, task_kind, unmet_requirements
from .method import Method
from .preflight import check_config, target_class
from .versions import as_version

#: sizes of generated (phantom) data that follow from ``task.data`` to a named corpus, so that a small run
#: (``suite=smoke``, tests) pre-trains on equally small data; nothing else (roots, batch sizes) follows
FOLLOW_KEYS = ("size", "n_train", "n_val", "n_test")

#: what a cell's status can be (``Cell.status``)
STATUSES = ("done", "stale", "to run", "excluded", "not applicable")


@dataclass(frozen=True)
class Cell:
    """Everything about one cell that is known before any work; ``cfg`` is what the run executes."""

    #: the run config; ``data`` is the pre-training corpus (the task's own data when it names none)
    cfg: DictConfig
    overrides: tuple[str, ...]
    #: ``<task>__<method>__<protocol>__f<fraction>__s<seed>``: the stem of the rows and predictions files
    name: str
    method: str
    task: str
    #: ``classification`` | ``segmentation`` | ``retrieval`` | ``zeroshot``: the task class's ``kind``
    kind: str
    corpus: str
    seed: int
    protocol: str
    label_fraction: float
    #: (method version, task version) of the code: what a new row carries (rows from a ``ckpt=`` pre-trained by
    #: an older method version carry that version instead, ``run.checkpoint_version``)
    versions: tuple[int, int]
    #: ``ckpt`` (a given checkpoint), ``init`` (the seeded initialisation) or ``pretrain`` (cached or new)
    weights: str
    #: the ``ckpt=`` folder, or the pre-training cache folder; None for ``init``
    checkpoint: Path | None
    results_dir: Path
    #: why the method cannot run on this task, known from the configs alone; None when it can (the built method
    #: and task may still skip it, e.g. retrieval for an external model built without a text tower)
    gap: str | None = None
    #: why the suite leaves this cell out on purpose (its ``exclude:`` block, ``coverage.py``); None when it runs
    excluded: str | None = None

    @property
    def runs_dir(self) -> Path:
        return self.results_dir / "runs"

    @property
    def rows_path(self) -> Path:
        return self.runs_dir / f"{self.name}.json"

    @property
    def predictions_path(self) -> Path:
        return self.results_dir / "predictions" / f"{self.name}.npz"

    @property
    def checkpoint_cached(self) -> bool:
        return self.checkpoint is not None and checkpoint.is_checkpoint(self.checkpoint)

    def status(self) -> str:
        """``done`` (rows stored at the current versions), ``stale`` (stored at other versions: would re-run),
        ``to run``, ``not applicable`` (``gap``), or ``excluded`` by its suite (not done there)."""
        if self.gap is not None:
            return "not applicable"
        stored = results.stored_versions(self.runs_dir, self.name)
        if stored is not None and stored == {self.versions}:
            return "done"  # an excluded cell that was run anyway still counts
        if self.excluded is not None:
            return "excluded"
        return "to run" if stored is None else "stale"

    def weights_plan(self) -> str:
        """Where the evaluated weights come from, in words."""
        if self.weights == "ckpt":
            return f"the given checkpoint {self.checkpoint}"
        if self.weights == "init":
            return f"the seeded initialisation (seed {self.seed}; {self.method} does not pre-train)"
        sched = self.cfg.method.pretrain
        what = f"{self.method} pre-trained on {self.corpus} (seed {self.seed}, {sched.max_epochs} epochs, "
        what += f"batch {sched.batch_size})"
        if self.checkpoint_cached:
            return f"{what}: cached at {self.checkpoint}"
        if self.cfg.get("pretrain") == "never":
            return f"{what}: not cached at {self.checkpoint}, and pretrain=never refuses to train it"
        return f"{what}: to train now, into {self.checkpoint}"

    def describe(self) -> str:
        """What ``--dry-run`` prints: the resolved cell, one fact a line."""
        mv, tv = self.versions
        status = self.status()
        why = {
            "done": " (bench would skip it; run re-runs it)",
            "not applicable": f": {self.gap}",
            "excluded": f" by the suite: {self.excluded}",
        }
        lines = [
            f"cell         {self.name}",
            f"status       {status}{why.get(status, '')}",
            f"method       {self.method} (version {mv})",
            f"task         {self.task} (version {tv}, {self.kind}, protocol {self.protocol}, "
            f"{100 * self.label_fraction:g}% of the labels, seed {self.seed})",
            f"weights      {self.weights_plan()}",
            f"rows         {self.rows_path}",
            f"predictions  {self.predictions_path}",
            f"overrides    {' '.join(self.overrides)}",
        ]
        if stored := results.stored_versions(self.runs_dir, self.name):
            lines.append(f"stored at    (method, task) versions {sorted(stored)}")
        return "\n".join(lines)


def resolve(overrides: list[str]) -> Cell:
    """Compose the run config of ``overrides`` with its corpus and resolve the cell (no data is read)."""
    overrides = list(overrides)
    cfg = compose("run", overrides)
    if cfg.get("data") is None:
        named = cfg.method.pretrain.get("data") or cfg.task.get("pretrain_data")
        if named:
            cfg = compose("run", [*overrides, f"data={named}", *following_overrides(overrides, str(named))])
        else:
            _own_data_as_corpus(cfg)
    return _cell(cfg, overrides)


def _own_data_as_corpus(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.data = OmegaConf.masked_copy(cfg.task, ["data"]).data
        cfg.data.target = "label"
        cfg.names.data = cfg.task.data.get("name", cfg.names.task)


def _cell(cfg: DictConfig, overrides: list[str]) -> Cell:
    check_config(cfg)  # values, allow-listed targets, interpolations: one-line errors before any import
    task = cfg.task
    method_cls = target_class(cfg.method.model._target_, "method.model")
    kind = task_kind(task._target_)
    protocol = str(task.get("protocol") or PROTOCOLS.get(kind, ("linear",))[0])  # the task classes' defaults
    fraction = float(task.get("label_fraction") or 1.0)
    if cfg.get("ckpt"):
        weights, folder = "ckpt", Path(str(cfg.ckpt))
    elif not getattr(method_cls, "needs_pretraining", True):
        weights, folder = "init", None
    else:
        weights, folder = "pretrain", checkpoint_dir(cfg)
    gap = None
    if not cfg.get("ckpt"):  # a given checkpoint brings its own method config (run.obtain_method)
        gap = text_gap(kind, method_cls)
        gap = gap or unmet_requirements(cfg.method, cfg.data or task.data) or channel_gap(cfg, method_cls)
    names = cfg.names
    return Cell(
        cfg=cfg,
        overrides=tuple(overrides),
        name=results.cell_name(names.method, names.task, protocol, fraction, int(cfg.seed)),
        method=str(names.method),
        task=str(names.task),
        kind=kind,
        corpus=str(names.get("data") or task.data.get("name", names.task)),
        seed=int(cfg.seed),
        protocol=protocol,
        label_fraction=fraction,
        versions=(
            as_version(getattr(method_cls, "version", 1), f"method {names.method}"),
            as_version(task.get("version", 1), str(names.task)),
        ),
        weights=weights,
        checkpoint=folder,
        results_dir=Path(str(cfg.paths.results_dir)),
        gap=gap,
    )


#: task kinds that judge a joint image-text space
JOINT_KINDS = ("retrieval", "zeroshot")


def text_gap(kind: str, method_cls: Any) -> str | None:
    """Why a retrieval or zero-shot task cannot judge the method: its class embeds no text at all (the run would
    build it and skip, ``tasks.retrieval.text_tower_reason``); known from the class, so the plan says so."""
    if kind not in JOINT_KINDS or not (isinstance(method_cls, type) and issubclass(method_cls, Method)):
        return None  # a factory ``_target_``: only the built method can say (the task's ``skip_reason``)
    if method_cls.embed_text is Method.embed_text:
        return f"{method_cls.__name__} has no text tower (no joint image-text space)"
    return None


def channel_gap(cfg: DictConfig, method_cls: Any) -> str | None:
    """Why the corpus's channel count cannot serve the task's (a method that cannot adapt its stem), or None."""
    corpus, task = cfg.data or cfg.task.data, cfg.task.data
    have, need = corpus.get("in_channels"), task.get("in_channels")
    if have is None or need is None or int(have) == int(need):
        return None
    if getattr(method_cls, "adapt_to_input", Method.adapt_to_input) is not Method.adapt_to_input:
        return None  # e.g. BrainMVP re-makes its stem for the task's channels
    return f"it pre-trains on {int(have)}-channel {corpus.get('name', 'data')} and cannot take the task's {int(need)}"


def following_overrides(overrides: list[str], corpus: str) -> list[str]:
    """``task.data.<k>=v`` (k in FOLLOW_KEYS) as overrides of the named corpus or of each of its ``parts``."""
    keys, parts = _corpus_layout(corpus, configs_stamp())
    out = []
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        k = key.removeprefix("task.data.")
        if k == key or k not in FOLLOW_KEYS:
            continue
        if k in keys:
            out.append(f"data.{k}={value}")
        for name, part_keys in parts:
            if k in part_keys:
                out.append(f"data.parts.{name}.{k}={value}")
    return out


@functools.cache
def _corpus_layout(corpus: str, _stamp: object) -> tuple[frozenset[str], tuple[tuple[str, frozenset[str]], ...]]:
    """The keys of a named corpus and of each of its ``parts`` (composed once per corpus and config files)."""
    data = compose("pretrain", ["method=scratch", f"data={corpus}"]).data
    parts = tuple((str(n), frozenset(str(k) for k in p)) for n, p in (data.get("parts") or {}).items())
    return frozenset(str(k) for k in data), parts
