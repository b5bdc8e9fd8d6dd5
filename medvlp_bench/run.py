"""The only place that turns configs into objects and a Trainer: pretrain, evaluate, bench.

``evaluate`` gets the method's weights (a given ``ckpt``, a cached pre-training checkpoint, or a fresh
pre-training run on the task's corpus), lets the task judge it, and writes one JSON file per cell.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from . import __version__, checkpoint, proxy, results, tracking
from .cell import Cell
from .checkpoint import checkpoint_dir, pretrain_key
from .config import ConfigError, instantiate, to_container
from .method import Method
from .preflight import check_cell, check_pretrain
from .task import EvalContext, Task

log = logging.getLogger("medvlp_bench")

#: trainer keys that are ours, not Lightning's
_OWN_TRAINER_KEYS = ("progress", "compile", "channels_last")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


@functools.cache
def code_version() -> str:
    """Git commit of the package source (with ``-dirty`` for local edits) or the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return sha.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return __version__


def device_name(trainer_cfg: DictConfig) -> str:
    if trainer_cfg.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def make_trainer(
    trainer_cfg: DictConfig, logger: Any = None, single_device: bool = False, **overrides: Any
) -> L.Trainer:
    """A Lightning Trainer from ``trainer`` config; ``single_device`` forces one device (evaluation)."""
    kw = {k: v for k, v in to_container(trainer_cfg).items() if k not in _OWN_TRAINER_KEYS}
    if single_device:
        kw.update(devices=1, strategy="auto", num_nodes=1)
        kw.pop("sync_batchnorm", None)
    progress = trainer_cfg.get("progress", "rich")
    callbacks = list(overrides.pop("callbacks", []))
    if progress == "rich":
        callbacks.append(RichProgressBar(leave=False))
    elif progress == "tqdm":
        callbacks.append(TQDMProgressBar())
    kw.update(overrides)
    kw.setdefault("enable_model_summary", False)
    kw.setdefault("plugins", [checkpoint.AtomicCheckpointIO()])
    return L.Trainer(
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=progress != "none",
        **kw,
    )


# ---- pre-training --------------------------------------------------------------------------------
def build_method(cfg: DictConfig) -> Method:
    try:
        method = instantiate(cfg.method.model)
    except InstantiationException as e:  # a wrong model path or file (external): the user's one-line error
        if isinstance(e.__cause__, ConfigError | FileNotFoundError):
            raise e.__cause__ from None
        raise
    if not isinstance(method, Method):
        raise ConfigError(f"method {cfg.names.method!r} does not build a medvlp_bench Method")
    return method


def pretrain(cfg: DictConfig) -> Path:
    """Pre-train ``cfg.method`` on ``cfg.data``; return the checkpoint folder (cached by ``pretrain_key``).

    Resumable: a killed run restarts from the last epoch-end checkpoint. Shuffling and every batch's RNG
    are seeded from (seed, rank, epoch, batch) (``MedDataModule.rng_seed``), so the resumed run ends with
    the same weights as an uninterrupted one (bitwise with ``trainer.deterministic=true`` on CPU). Rank 0
    holds a file lock, so two processes asking for the same checkpoint train it once.
    """
    out = checkpoint_dir(cfg)
    if checkpoint.is_checkpoint(out):
        log.info("using cached pre-training checkpoint %s", out)
        return out
    check_pretrain(cfg)  # the corpus and its parts are there, in seconds, before any work
    if not is_rank_zero():  # DDP children: rank 0 holds the lock and they join its fit
        return _pretrain(cfg, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if checkpoint.is_checkpoint(out):  # another process finished it while we waited
            return out
        return _pretrain(cfg, out)


def _pretrain(cfg: DictConfig, out: Path) -> Path:
    t0 = time.time()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    method = build_method(cfg)
    init = checkpoint.snapshot(method.image_encoder)  # the seeded init, also on resume (loaded later by fit)
    sched = cfg.method.pretrain
    dm = instantiate(cfg.data, batch_size=int(sched.batch_size), rng_seed=int(cfg.seed), tokenizer=tokenizer_of(method))
    stats = method.corpus_stats(dm)
    logger = tracking.make_logger(
        cfg.logger,
        f"pretrain/{cfg.names.method}/{cfg.names.data}/s{cfg.seed}",
        {"verb": "pretrain", "method": cfg.names.method, "data": cfg.names.data},
    )
    if logger is not None and stats:
        numeric = {f"pretrain.{k}": float(v) for k, v in stats.items() if isinstance(v, int | float)}
        if numeric:
            logger.log_metrics(numeric)
    resume_dir = Path(cfg.paths.work_dir) / "pretrain" / out.name
    # one file, overwritten (atomically) at every epoch end: the resume point after a crash or kill
    ckpt_cb = ModelCheckpoint(
        dirpath=resume_dir,
        filename="last",
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    proxy_cb = proxy.ProxyCallback(dm)
    trainer = make_trainer(
        cfg.trainer,
        logger,
        callbacks=[ckpt_cb, proxy_cb],
        max_epochs=int(sched.max_epochs),
        gradient_clip_val=sched.get("gradient_clip_val"),
        accumulate_grad_batches=int(sched.get("accumulate_grad_batches", 1)),
    )
    speed_up(method, cfg.trainer, int(cfg.input.spatial_dims))
    trainer.fit(method, datamodule=dm, ckpt_path=resumable(resume_dir / "last.ckpt"), weights_only=True)
    if trainer.global_rank == 0:
        info = {
            "method": cfg.names.method,
            "data": cfg.names.data,
            "seed": int(cfg.seed),
            "code_version": code_version(),
            "pretrain_key": pretrain_key(cfg),
            "method_version": type(method).version,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "encoder_shift": checkpoint.relative_shift(init, method.image_encoder),
            "corpus_stats": stats,
            "proxy": proxy_cb.summary(),
            # how long this pre-training took (a resumed run: since the resume), on what. Cells made from the
            # checkpoint carry it; the cell that trained it also counts it in its own wall_time_s
            "wall_time_s": round(time.time() - t0, 2),
            "device": device_name(cfg.trainer),
        }
        _report_shift(info["encoder_shift"], cfg, logger)
        proxy.report(info["proxy"], f"{cfg.names.method} on {cfg.names.data}, seed {cfg.seed}")
        checkpoint.save_checkpoint(method, to_container(cfg.method.model), out, info)
        log.info("saved pre-trained %s to %s", cfg.names.method, out)
    return out


#: below this relative change of the image encoder, pre-training is flagged as (nearly) not having happened
MIN_ENCODER_SHIFT = 0.02


def _report_shift(shift: float, cfg: DictConfig, logger: Any) -> None:
    """Log how far pre-training moved the image encoder; warn when the checkpoint is still nearly its init."""
    if logger is not None:
        logger.log_metrics({"pretrain.encoder_shift": shift})
    msg = "pre-training moved the image encoder by %.1f%% of its norm (%s on %s, seed %s)"
    args = (100 * shift, cfg.names.method, cfg.names.data, cfg.seed)
    if shift < MIN_ENCODER_SHIFT:
        log.warning(
            msg + ": the checkpoint is close to its random initialisation, so rows built on it measure little "
            "beyond scratch; raise method.pretrain.max_epochs or method.model.lr",
            *args,
        )
    else:
        log.info(msg, *args)


def speed_up(method: Method, trainer_cfg: DictConfig, spatial_dims: int) -> None:
    """``trainer.channels_last`` (2D CNN weights in NHWC, which cuDNN's tensor-core kernels prefer) and
    ``trainer.compile`` (``torch.compile`` of the image encoder in place, so checkpoint keys do not change)."""
    if trainer_cfg.get("channels_last") and spatial_dims == 2:
        method.image_encoder.to(memory_format=torch.channels_last)
    if trainer_cfg.get("compile"):
        method.image_encoder.compile()


def resumable(last: Path) -> str | None:
    """The last checkpoint if it can be read (tensors only, no pickled objects), else None (start fresh)."""
    if not last.is_file():
        return None
    try:
        torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file must not block the run forever
        log.warning("ignoring unreadable resume checkpoint %s (%s); starting from scratch", last, e)
        last.unlink(missing_ok=True)
        return None
    log.info("resuming pre-training from %s", last)
    return str(last)


def tokenizer_of(method: Method) -> Any:
    """The tokenizer a datamodule needs to feed ``method`` its reports (None for a vision-only method)."""
    return method.text_encoder.tokenizer if method.text_encoder is not None else None


def load_method(folder: Path) -> Method:
    """Rebuild a method from a checkpoint folder (allow-listed config, safetensors weights)."""
    folder = Path(folder)
    if not checkpoint.is_checkpoint(folder):
        raise FileNotFoundError(f"no checkpoint at {folder} (expected {checkpoint.WEIGHTS} and {checkpoint.CONFIG})")
    info = checkpoint.read_config(folder)
    method = instantiate(OmegaConf.create(info["model"]))
    checkpoint.load_weights(method, folder)
    method.provenance = info  # encoder_shift, proxy, corpus_stats: carried into the rows
    return method


def obtain_method(cfg: DictConfig) -> tuple[Method, str | None]:
    """The weights a run evaluates: ``ckpt=``, else a cached/new pre-training run, else the seeded init."""
    if cfg.ckpt:
        folder = Path(cfg.ckpt)
        return load_method(folder), checkpoint.file_sha256(folder / checkpoint.WEIGHTS)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    method = build_method(cfg)
    if not method.needs_pretraining:
        return method, None
    if cfg.pretrain == "never":
        raise ConfigError(f"method {cfg.names.method!r} needs pre-trained weights: pass ckpt=<folder> or pretrain=auto")
    folder = pretrain(cfg)
    return load_method(folder), checkpoint.file_sha256(folder / checkpoint.WEIGHTS)


# ---- evaluation ----------------------------------------------------------------------------------
def evaluate(cell: Cell) -> list[results.ResultRow]:
    """Run one resolved cell and write its rows; returns the rows (empty if the task does not apply, and on
    every rank but 0, which join the pre-training only)."""
    t0 = time.time()
    cfg, names = cell.cfg, cell.cfg.names
    if is_rank_zero():
        results.ensure_writable(cell.runs_dir)
    if cell.gap is not None:
        log.warning("skipping %s on %s: %s", names.method, names.task, cell.gap)
        return []
    check_cell(cfg)  # task data, corpus (unless cached), ckpt, device: seconds, before any work
    method, ckpt_sha = obtain_method(cfg)
    if not is_rank_zero():
        return []
    # the task's datamodule is built complete: with the tokenizer of the method it will feed. Building it draws no
    # random numbers, so adapt_to_input below sees the RNG state it saw when the task was built first
    task: Task = instantiate(cfg.task, data=instantiate(cfg.task.data, tokenizer=tokenizer_of(method)))
    if (gap := method.input_gap(int(task.data.spatial_dims), int(task.data.in_channels))) is not None:
        log.warning("skipping %s on %s: %s", names.method, names.task, gap)
        return []
    method.adapt_to_input(int(task.data.in_channels), frozen=task.freezes_encoder)
    if (reason := task.skip_reason(method)) is not None:
        log.warning("skipping %s on %s: %s", names.method, names.task, reason)
        return []
    logger = tracking.make_logger(
        cfg.logger,
        f"eval/{cell.name}",
        {
            "verb": "run",
            "method": names.method,
            "task": names.task,
            "task_version": task.version,
            "code_version": code_version(),
        },
    )
    work = Path(cfg.paths.work_dir) / "eval" / cell.name
    ctx = EvalContext(
        make_trainer=functools.partial(make_trainer, cfg.trainer, logger, True, default_root_dir=str(work)),
        seed=int(cfg.seed),
        work_dir=work,
        device=torch.device("cuda" if cfg.trainer.get("accelerator") in ("gpu", "cuda") else "cpu"),
        precision=str(cfg.trainer.get("precision", "32-true")),
        weights_key=ckpt_sha or f"init:{names.method}:s{cfg.seed}:{pretrain_key(cfg)}",
    )
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    res = task.evaluate(method, ctx)
    ckpt_sha = ckpt_sha or method.weights_sha256  # a model read from a file (external): that file's sha256
    rows = make_rows(cfg, task, method, res, ckpt_sha, tracking.run_id(logger), time.time() - t0)
    extra = {
        "subset_size": len(res.subset_ids or []),
        "subset_sha256": rows[0].subset_sha256,
        "config": to_container(cfg),
        "pretraining": pretraining(method),
        **res.extra,
    }
    if res.subset_ids is not None and len(res.subset_ids) <= 5000:
        extra["subset_ids"] = res.subset_ids
    path = results.write_cell(cell.runs_dir, cell.name, rows, extra)
    files = [path]
    if res.predictions:
        results.save_predictions(cell.predictions_path, **res.predictions)
        files.append(cell.predictions_path)
    tracking.log_final(logger, {f"{names.task}/{k}": v for k, v in res.metrics.items()}, _flat_params(cfg), files)
    return rows


def make_rows(
    cfg: DictConfig, task: Task, method: Method, res: Any, ckpt_sha: str | None, run_id: str | None, wall: float
) -> list[results.ResultRow]:
    from .data import subset_checksum

    date = datetime.now(UTC).isoformat(timespec="seconds")
    subset_sha = subset_checksum(res.subset_ids) if res.subset_ids is not None else None
    common = dict(
        method=cfg.names.method,
        impl_source=method.impl_source,
        task=cfg.names.task,
        task_version=task.version,
        method_version=checkpoint_version(method),
        kind=task.kind,
        spatial_dims=int(task.data.spatial_dims),
        protocol=task.protocol,
        label_fraction=task.label_fraction,
        seed=int(cfg.seed),
        ckpt_sha256=ckpt_sha,
        code_version=code_version(),
        mlflow_run_id=run_id,
        date=date,
        wall_time_s=round(wall, 2),
        device=device_name(cfg.trainer),
        n_test=res.n_test,
        subset_sha256=subset_sha,
        learned=pretraining(method).get("learned"),
        text_encoder=text_encoder_name(cfg, method),
    )
    return [
        results.ResultRow(
            metric=k,
            value=float(v),
            primary=(k == task.primary),
            higher_is_better=task.higher_is_better_for(k),
            **common,
        )
        for k, v in res.metrics.items()
    ]


def checkpoint_version(method: Method) -> int:
    """The method version the evaluated weights were trained at: a ``ckpt=`` from an older version keeps its
    own (rows must not pool it with the current version's); the class's version otherwise (seeded init,
    an imported release)."""
    info = getattr(method, "provenance", None) or {}
    now = type(method).version
    # a pre-training checkpoint written before versions existed (it has a pretrain_key) is version 1
    have = int(info.get("method_version", 1 if "pretrain_key" in info else now))
    if have != now:
        log.warning("the checkpoint was pre-trained by version %d of %s (now %d): its rows say %d", have,
                    type(method).__name__, now, have)  # fmt: skip
    return have


def pretraining(method: Method) -> dict[str, Any]:
    """What the evaluated checkpoint says about its pre-training: ``encoder_shift``, the proxy (without its
    curve) and ``learned``; empty for a method evaluated from its initialisation or a checkpoint without them."""
    info = getattr(method, "provenance", None) or {}
    proxy_info = dict(info.get("proxy") or {})
    proxy_info.pop("curve", None)
    keep = ("encoder_shift", "corpus_stats", "wall_time_s", "device")
    out: dict[str, Any] = {k: info[k] for k in keep if info.get(k) is not None}
    if proxy_info:
        out["proxy"] = proxy_info
        out["learned"] = proxy_info.get("learned")
    return out


def text_encoder_name(cfg: DictConfig, method: Method) -> str | None:
    """The text tower a method was built with (its config name or local path), None without one."""
    if method.text_encoder is None:
        return None
    info = getattr(method, "provenance", None) or {}
    model = info.get("model") or to_container(cfg.method.model)
    name = (model.get("text_encoder") or {}).get("name") if isinstance(model, dict) else None
    return str(name) if name is not None else type(method.text_encoder).__name__


def _flat_params(cfg: DictConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(to_container(cfg), "")
    return {k: v for k, v in flat.items() if not k.startswith("paths.")}
