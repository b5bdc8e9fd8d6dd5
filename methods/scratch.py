"""``scratch``: the same encoders, randomly initialised, no pre-training. The floor every method must beat."""

from __future__ import annotations

from typing import ClassVar

from medvlp_bench.method import Method


class Scratch(Method):
    """Random initialisation (seeded); evaluated as is."""

    impl_source: ClassVar[str] = "baseline"
    needs_pretraining: ClassVar[bool] = False
