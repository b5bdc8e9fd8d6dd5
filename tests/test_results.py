"""Result rows and the leaderboard: mean/std/CI, sort by higher_is_better, version separation, atomicity."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from medvlp_bench.results import (
    LEADERBOARD_COLUMNS,
    ResultRow,
    build_leaderboard,
    cell_name,
    confidence_interval,
    load_rows,
    stored_versions,
    write_cell,
    write_leaderboard,
)

BASE = ResultRow(
    method="clip",
    impl_source="baseline",
    task="t",
    task_version=1,
    kind="classification",
    spatial_dims=2,
    protocol="linear",
    label_fraction=0.01,
    seed=0,
    metric="auroc",
    value=0.0,
    higher_is_better=True,
    primary=True,
    ckpt_sha256="abc",
    code_version="x",
    mlflow_run_id=None,
    date="2026-01-01T00:00:00",
    wall_time_s=1.0,
    device="cpu",
    n_test=10,
)


def _write(runs: Path, **kw: object) -> None:
    row = replace(BASE, **kw)
    write_cell(
        runs,
        cell_name(row.method, row.task, row.protocol, row.label_fraction, row.seed)
        + f"t{row.task_version}m{row.method_version}"
        + row.metric,
        [row],
    )


def test_leaderboard_statistics_and_order(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s, v in enumerate([0.80, 0.82, 0.84]):
        _write(runs, method="clip", seed=s, value=v)
    for s, v in enumerate([0.60, 0.50, 0.55]):
        _write(runs, method="scratch", seed=s, value=v)
    lb = build_leaderboard(load_rows(runs))
    assert list(lb.columns) == LEADERBOARD_COLUMNS
    assert list(lb["method"]) == ["clip", "scratch"]  # higher is better -> clip first
    clip = lb.iloc[0]
    assert math.isclose(clip["mean"], 0.82) and math.isclose(clip["std"], 0.02) and clip["n_seeds"] == 3
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, df=2) * s / sqrt(n)
    assert math.isclose(clip["ci95_low"], 0.82 - half, rel_tol=1e-9)
    assert math.isclose(clip["ci95_high"], 0.82 + half, rel_tol=1e-9)
    assert clip["seeds"] == "0 1 2"


def test_lower_is_better_sorts_ascending(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write(runs, method="a", metric="hd95", value=5.0, higher_is_better=False)
    _write(runs, method="b", metric="hd95", value=2.0, higher_is_better=False)
    lb = build_leaderboard(load_rows(runs))
    assert list(lb["method"]) == ["b", "a"]


def test_task_versions_are_not_mixed_and_reruns_keep_newest(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write(runs, task_version=1, value=0.5)
    _write(runs, task_version=2, value=0.9)
    lb = build_leaderboard(load_rows(runs))
    assert sorted(lb["task_version"]) == [1, 2] and set(lb["n_seeds"]) == {1}
    rows = pd.concat([load_rows(runs), pd.DataFrame([{**BASE.__dict__, "value": 0.7, "date": "2027-01-01"}])])
    lb2 = build_leaderboard(rows)
    v1 = lb2[lb2.task_version == 1].iloc[0]
    assert v1["mean"] == 0.7 and v1["n_seeds"] == 1 and math.isnan(v1["std"]) and math.isnan(v1["ci95_low"])


def test_method_versions_are_separate_lines_never_pooled(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s, v in enumerate([0.60, 0.62]):
        _write(runs, seed=s, value=v)  # version 1 (method_version defaults to 1)
    _write(runs, seed=0, value=0.90, method_version=2, date="2027-01-01")  # the same cell after a bump
    lb = write_leaderboard(tmp_path)
    assert len(lb) == 2
    v1, v2 = (lb[lb.method_version == v].iloc[0] for v in (1, 2))
    assert math.isclose(v1["mean"], 0.61) and v1["n_seeds"] == 2 and v1["seeds"] == "0 1"
    assert v2["mean"] == 0.90 and v2["n_seeds"] == 1
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| t | linear | 0.01 | clip v2 | auroc | 0.900 |" in md and "| clip | auroc | 0.610 ± 0.014 |" in md


def test_rows_written_before_versions_read_as_version_1(tmp_path: Path) -> None:
    old = {k: v for k, v in asdict(BASE).items() if k != "method_version"} | {"task_version": "1"}
    (tmp_path / "old.json").write_text(json.dumps({"rows": [old]}))
    write_cell(tmp_path, "new", [replace(BASE, seed=1, method_version=1, task_version=1)])
    rows = load_rows(tmp_path)
    assert list(rows["method_version"]) == [1, 1] and list(rows["task_version"]) == [1, 1]
    assert len(build_leaderboard(rows)) == 1  # an old row and a new one of the same versions pool
    assert stored_versions(tmp_path, "old") == {(1, 1)}
    assert stored_versions(tmp_path, "missing") is None


def test_write_cell_is_atomic_and_readable(tmp_path: Path) -> None:
    path = write_cell(tmp_path, "cell", [BASE], {"subset_ids": ["a", "b"]})
    payload = json.loads(path.read_text())
    assert payload["rows"][0]["metric"] == "auroc" and payload["subset_ids"] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["cell.json"]  # no temp file left behind


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_cell(tmp_path, "bad", [BASE], {"x": object()})  # not JSON-serialisable
    assert list(tmp_path.iterdir()) == []


def test_corrupt_row_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_rows(tmp_path)


def test_write_leaderboard_files(tmp_path: Path) -> None:
    _write(tmp_path / "runs", value=0.75)
    lb = write_leaderboard(tmp_path)
    assert len(lb) == 1 and (tmp_path / "leaderboard.csv").is_file()
    assert "| t | linear | 0.01 | clip | auroc | 0.750 |" in (tmp_path / "leaderboard.md").read_text()
    assert list(pd.read_csv(tmp_path / "leaderboard.csv").columns) == LEADERBOARD_COLUMNS


def test_confidence_interval_single_value_is_nan() -> None:
    lo, hi = confidence_interval([0.5])
    assert math.isnan(lo) and math.isnan(hi)
