"""``scratch``: the same encoders, randomly initialised, no pre-training. The floor every method must beat."""

from __future__ import annotations

from typing import ClassVar

from medvlp_bench.method import Method


class Scratch(Method):
    """Random initialisation (seeded); evaluated as is."""

    impl_source: ClassVar[str] = "baseline"
    needs_pretraining: ClassVar[bool] = False
    #: 2: scratch_swin's encoder changed with GTGM's (CPU-sized Swin by default, 4^3 windows at `tiny:`). Versions
    #: are per class, so scratch, scratch_vit and scratch_brainmvp are re-run too (cheap: nothing is pre-trained)
    version: ClassVar[int] = 2
