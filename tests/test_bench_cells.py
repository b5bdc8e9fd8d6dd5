"""The suite grid: which overrides each cell gets, and which cells re-run (no real cell is run here)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from medvlp_bench import bench as bench_mod
from medvlp_bench import results
from medvlp_bench.bench import cells
from medvlp_bench.cell import Cell
from medvlp_bench.config import compose
from medvlp_bench.methods.scratch import Scratch
from medvlp_bench.results import ResultRow, write_cell


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


def test_method_overrides_naming_no_method_is_an_error() -> None:
    cfg = _suite(method_overrides={"gtmg": ["method.model.lr=1e-3"]})  # a typo
    with pytest.raises(ValueError, match=r"gtmg.*not a method; allowed: .*'gtgm'"):
        cells(cfg, [])


def test_narrowing_suite_methods_leaves_other_methods_overrides_unused() -> None:
    """`suite.methods=[scratch_swin]` on a suite with gtgm's overrides runs scratch_swin's cells, untouched."""
    cfg = _suite(methods=["scratch_swin"])  # hippocampus_cpu keeps method_overrides: {gtgm: [...]}
    grid = cells(cfg, [])
    assert len(grid) == 3 and all("method=scratch_swin" in ov for ov in grid)
    assert not any("method.model.lr=1.0e-3" in ov for ov in grid)


def test_a_cell_stored_at_other_versions_is_rerun_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bumped method makes its stored cells stale: bench re-runs them (not 'already done') and says so."""
    cfg = _suite(methods=["scratch_swin"], seeds=[0, 1], method_overrides={})
    with open_dict(cfg):
        cfg.paths.results_dir = str(tmp_path)
    runs = tmp_path / "runs"
    names = [cell.name for cell in bench_mod.plan(cfg, [])]
    row = ResultRow(
        method="scratch_swin", impl_source="baseline", task="msd_hippocampus_seg", task_version=1,
        kind="segmentation", spatial_dims=3, protocol="finetune", label_fraction=0.1, seed=0, metric="dice",
        value=0.5, higher_is_better=True, primary=True, ckpt_sha256=None, code_version="x", mlflow_run_id=None,
        date="2026-01-01T00:00:00", wall_time_s=1.0, device="cpu", n_test=4,
    )  # fmt: skip
    old = {k: v for k, v in asdict(row).items() if k != "method_version"} | {"task_version": "1"}
    (runs).mkdir()
    (runs / f"{names[0]}.json").write_text(json.dumps({"rows": [old]}))  # written before versions existed
    write_cell(runs, names[1], [replace(row, seed=1, method_version=2)])  # already at the bumped version
    monkeypatch.setattr(Scratch, "version", 2)  # the code now: Scratch bumped to 2
    ran: list[str] = []

    def fake_evaluate(cell: Cell) -> list[ResultRow]:
        ran.append(cell.name)
        rows = [replace(row, seed=cell.seed, method_version=2, value=0.7)]
        write_cell(runs, cell.name, rows)
        return rows

    monkeypatch.setattr(bench_mod, "evaluate", fake_evaluate)
    assert "2 stale" not in bench_mod.dry_run(cfg, [])
    assert "1 done, 1 stale" in bench_mod.dry_run(cfg, []).splitlines()[-1]
    report = bench_mod.bench(cfg, [])
    assert ran == [names[0]] and report.stale == [names[0]] and report.skipped == [names[1]]
    assert sorted(p.name for p in runs.glob("*.json")) == sorted(f"{n}.json" for n in names)  # replaced in place
    assert results.stored_versions(runs, names[0]) == {(2, 1)}
    assert list(report.leaderboard["method_version"]) == [2] and list(report.leaderboard["n_seeds"]) == [2]
    assert bench_mod.bench(cfg, []).skipped == names  # now current: nothing re-runs
