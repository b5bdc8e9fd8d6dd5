"""The suite grid: which overrides each cell gets (no cell is run here)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from medvlp_bench.bench import cells
from medvlp_bench.config import compose


def _suite(**extra: object) -> object:
    cfg = compose("bench", ["suite=hippocampus_cpu"])
    OmegaConf.set_struct(cfg, False)
    for key, value in extra.items():
        cfg.suite[key] = value
    return cfg


def test_method_overrides_reach_only_their_method() -> None:
    cfg = _suite(method_overrides={"gtgm": ["method.model.lr=1e-3"]})
    grid = cells(cfg, ["trainer.devices=1"])
    assert len(grid) == 2 * 3  # 2 methods x 3 seeds x one label fraction
    for ov in grid:
        has = "method.model.lr=1e-3" in ov
        assert has == ("method=gtgm" in ov)
        assert ov[-1] == "trainer.devices=1"  # the command line still wins over the suite
        assert "task.max_epochs=30" in ov  # task_overrides[segmentation]
        assert ov.index("task.data.size=64") < ov.index("task.max_epochs=30")
    gtgm = next(ov for ov in grid if "method=gtgm" in ov)
    assert gtgm.index("task.max_epochs=30") < gtgm.index("method.model.lr=1e-3")
    compose("run", gtgm)  # every override in a cell is a valid key


def test_method_overrides_for_a_method_not_in_the_suite_is_an_error() -> None:
    cfg = _suite(method_overrides={"umcl": ["method.model.lr=1e-3"]})
    with pytest.raises(ValueError, match=r"umcl.*not in suite.methods"):
        cells(cfg, [])
