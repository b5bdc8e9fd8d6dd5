"""A suite's declared exclusions (``exclude:``) and its coverage table: no missing number is silent.

No real cell is run: ``bench.evaluate`` is replaced by a writer of one row.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from medvlp_bench import bench as bench_mod
from medvlp_bench import coverage
from medvlp_bench.bench import compose_bench
from medvlp_bench.cell import Cell
from medvlp_bench.config import compose
from medvlp_bench.methods.scratch import Scratch
from medvlp_bench.results import ResultRow, write_cell

ROW = ResultRow(
    method="scratch_swin", impl_source="baseline", task="msd_hippocampus_seg", task_version=1,
    kind="segmentation", spatial_dims=3, protocol="finetune", label_fraction=0.1, seed=0, metric="dice",
    value=0.5, higher_is_better=True, primary=True, ckpt_sha256=None, code_version="x", mlflow_run_id=None,
    date="2026-01-01T00:00:00", wall_time_s=1.0, device="cpu", n_test=4, method_version=Scratch.version,
)  # fmt: skip


def _suite(tmp_path: Path, **extra: object) -> object:
    cfg = compose("bench", ["suite=hippocampus_cpu"])
    OmegaConf.set_struct(cfg, False)
    for key, value in extra.items():
        cfg.suite[key] = value
    with open_dict(cfg):
        cfg.paths.results_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ({"tasks": ["phantom_ct_seg"]}, r"suite.exclude\[0\] needs a `why`"),
        ({"tasks": ["phantom_ct_seg"], "why": " "}, r"needs a `why`"),
        ({"task": ["phantom_ct_seg"], "why": "x"}, r"suite.exclude\[0\] has unknown keys \['task'\]; allowed"),
        ({"methods": ["gtmg"], "why": "x"}, r"exclude\[0\].methods names \[.gtmg.\], not a method; allowed: .*gtgm"),
        ({"tasks": ["phantom_ct_sge"], "why": "x"}, r"tasks names \['phantom_ct_sge'\], not a task"),
        ({"seeds": ["0"], "why": "x"}, r"suite.exclude\[0\].seeds must be a list of integer seeds"),
    ],
)
def test_a_bad_exclude_entry_is_refused_naming_it(block: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        coverage.exclusions([block])


def test_exclude_must_be_a_list() -> None:
    with pytest.raises(ValueError, match="must be a list"):
        coverage.exclusions("phantom_ct_seg")
    with pytest.raises(ValueError, match=r"suite.exclude\[0\] must be a mapping"):
        coverage.exclusions(["phantom_ct_seg"])


def test_excluded_cells_are_shown_with_their_reason_and_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    why = "seed 2 needs a GPU"
    cfg = _suite(tmp_path, methods=["scratch_swin"], seeds=[0, 1, 2], method_overrides={},
                 exclude=[{"seeds": [1, 2], "why": why}])  # fmt: skip
    grid = bench_mod.plan(cfg, [])
    names = [c.name for c in grid]
    assert [c.excluded for c in grid] == [None, why, why]
    runs = tmp_path / "runs"
    write_cell(runs, names[1], [replace(ROW, seed=1)])  # run anyway earlier: it counts as done, not excluded
    dry = bench_mod.dry_run(cfg, []).splitlines()
    assert dry[2].startswith("excluded") and names[2] in dry[2] and f"[{why}]" in dry[2]
    assert dry[-1].endswith("1 done, 1 to run, 1 excluded")
    ran: list[str] = []

    def fake_evaluate(cell: Cell) -> list[ResultRow]:
        ran.append(cell.name)
        rows = [replace(ROW, seed=cell.seed)]
        write_cell(runs, cell.name, rows)
        return rows

    monkeypatch.setattr(bench_mod, "evaluate", fake_evaluate)
    report = bench_mod.bench(cfg, [])
    assert ran == [names[0]] and report.excluded == {names[2]: why} and report.skipped == [names[1]]
    cov = coverage.coverage(bench_mod.plan(cfg, []))
    assert cov.to_dict("records") == [
        {"task": "msd_hippocampus_seg", "method": "scratch_swin", "done": 2, "stale": 0, "to run": 0, "excluded": 1,
         "not applicable": 0, "why": why, "planned": 3}
    ]  # fmt: skip
    md = coverage.coverage_markdown(cov, "hippocampus_cpu")
    assert md.startswith("Suite hippocampus_cpu, 3 cells: 2 done, 1 excluded. 0 of 1 (task, method) pairs are complete")
    assert "| task | method | done | excluded | why not run |" in md
    assert f"| msd_hippocampus_seg | scratch_swin | 2 | 1 | {why} |" in md


def test_methods_small_leaves_out_only_segmentation_and_an_override_brings_it_back() -> None:
    cfg, _ = compose_bench(["suite=methods_small"])
    rules = coverage.exclusions(cfg.suite.exclude)
    assert [r.tasks for r in rules] == [frozenset({"phantom_cxr_seg", "phantom_ct_seg", "phantom_mri_seg"})]
    assert rules[0].methods is None and rules[0].seeds is None and "GPU" in rules[0].why
    cfg, _ = compose_bench(["suite=methods_small", "suite.exclude=[]"])
    assert coverage.exclusions(cfg.suite.exclude) == []


def test_an_excluded_cell_with_rows_at_other_versions_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Excluded wins over stale (bench does not re-run it), but its old rows still reach the comparison table, so
    the coverage reason says they are there."""
    cfg = _suite(tmp_path, methods=["scratch_swin"], seeds=[0], method_overrides={}, exclude=[{"why": "GPU only"}])
    name = bench_mod.plan(cfg, [])[0].name
    write_cell(tmp_path / "runs", name, [replace(ROW, method_version=Scratch.version - 1)])  # an older version
    monkeypatch.setattr(bench_mod, "evaluate", lambda cell: pytest.fail(f"ran the excluded {cell.name}"))
    assert bench_mod.bench(cfg, []).excluded == {name: "GPU only"}
    why = coverage.coverage(bench_mod.plan(cfg, []))["why"].item()
    assert why.startswith("GPU only (rows at other versions are stored")


def test_an_exclusion_names_a_method_by_its_config_or_its_row_label(tmp_path: Path) -> None:
    cfg = _suite(tmp_path, methods=["scratch_swin"], seeds=[0], method_overrides={})
    cell = bench_mod.plan(cfg, [])[0]
    external = replace(cell, method="external-mine", overrides=("method=external", *cell.overrides[1:]))
    for names in (["external"], ["external-mine"]):
        (rule,) = coverage.exclusions([{"methods": names, "why": "x"}])
        assert rule.matches(external) and not rule.matches(cell)


def test_a_mapping_instead_of_a_list_is_refused() -> None:
    with pytest.raises(ValueError, match=r"suite.exclude must be a list of \{methods, tasks, seeds, why\} entries"):
        coverage.exclusions({"tasks": ["phantom_ct_seg"], "why": "x"})


def test_a_bad_exclude_on_the_command_line_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    from medvlp_bench.cli import main

    assert main(["bench", "suite=methods_small", "suite.exclude=[{task:[phantom_ct_seg],why:x}]", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "suite.exclude[0] has unknown keys ['task']" in err and "Traceback" not in err
