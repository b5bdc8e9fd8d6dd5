"""Experiment tracking: MLflow (local SQLite store by default, any tracking URI by config), CSV, or none.

MLflow 3 refuses the plain ``file:`` store unless told otherwise, so the default is a SQLite database
under ``results/`` with artifacts beside it. The JSON rows remain the source of truth; MLflow is for browsing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def make_logger(cfg: DictConfig, run_name: str, tags: dict[str, Any]) -> Logger | None:
    """Build the configured Lightning logger (``kind``: mlflow | csv | none).

    Tag values are sent as strings: a tracking server's REST store refuses any other type (an int
    ``task_version`` failed there while the local SQLite store took it).
    """
    kind = cfg.get("kind", "none")
    if kind == "none":
        return None
    if kind == "csv":
        return CSVLogger(save_dir=str(cfg.save_dir), name=run_name)
    if kind != "mlflow":
        raise ValueError(f"logger.kind must be mlflow, csv or none, got {kind!r}")
    uri = str(cfg.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # a tracking server stores artifacts where it was told to (--artifacts-destination), proxied over HTTP; a
    # client-side folder would be unreadable to anyone else using that server
    artifacts = None if uri.startswith(("http://", "https://")) else cfg.get("artifact_location")
    if artifacts and "://" not in str(artifacts):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = Path(artifacts).resolve().as_uri()
    return MLFlowLogger(
        experiment_name=str(cfg.experiment),
        run_name=run_name,
        tracking_uri=uri,
        tags={k: str(v) for k, v in tags.items()},
        artifact_location=artifacts,
        log_model=False,
    )


def run_id(logger: Logger | None) -> str | None:
    return logger.run_id if isinstance(logger, MLFlowLogger) else None


def log_final(logger: Logger | None, metrics: dict[str, float], params: dict[str, Any], artifacts: list[Path]) -> None:
    """Record an evaluation cell's final metrics, flattened params and files on the logger's run."""
    if logger is None:
        return
    logger.log_hyperparams(params)
    logger.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()})
    if isinstance(logger, MLFlowLogger):
        for path in artifacts:
            if Path(path).is_file():
                logger.experiment.log_artifact(logger.run_id, str(path))
    logger.finalize("success")
