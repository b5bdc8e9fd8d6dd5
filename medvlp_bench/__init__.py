"""medvlp-bench: side-by-side comparison of medical vision(-language) pre-training methods.

The public names are imported lazily so ``medbench list`` and ``--help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Method": "medvlp_bench.method",
    "Task": "medvlp_bench.task",
    "ImageEncoder": "medvlp_bench.encoders",
    "TextEncoder": "medvlp_bench.text",
    "MedDataModule": "medvlp_bench.data",
    "ImageFeatures": "medvlp_bench.types",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(name)
