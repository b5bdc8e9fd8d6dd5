"""Helpers shared by the tests (importable because pytest's pythonpath includes tests/)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

#: overrides that make any phantom run take seconds: tiny data, tiny encoders, one epoch, no logger
TINY = [
    "trainer.progress=none",
    "logger=none",
    "method.model.image_encoder.name=resnet_tiny",
    "method.pretrain.max_epochs=1",
    "method.pretrain.batch_size=8",
    "task.max_epochs=3",
    "task.patience=2",
    "task.batch_size=16",
]


def tiny_data(prefix: str = "task.data") -> list[str]:
    return [f"{prefix}.n_train=32", f"{prefix}.n_val=12", f"{prefix}.n_test=12", f"{prefix}.batch_size=8"]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """A repository script (``scripts/...``, ``benchmarks/...``: not part of the package) imported as a module."""
    path = repo_root() / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shared_data() -> Path:
    return Path(os.environ.get("MEDBENCH_SHARED_DATA", repo_root().parent / "shared" / "data"))


def tiny_clip_pretrain(epochs: int) -> list[str]:
    """Overrides of a seconds-long ``clip`` pre-training on tiny phantom X-rays (no logger, no progress bar)."""
    return [
        "method=clip",
        "data=phantom_cxr",
        "data.size=32",
        *tiny_data("data"),
        "logger=none",
        "trainer.progress=none",
        "method.model.image_encoder.name=resnet_tiny",
        f"method.pretrain.max_epochs={epochs}",
        "method.pretrain.batch_size=8",
    ]
