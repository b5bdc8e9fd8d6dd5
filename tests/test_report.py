"""``medbench report``: the HTML page, its embedded figures, paired tests, errors and escaping.

The results folder is written through the project's own writers (``write_cell`` rows, ``save_predictions``
with the arrays ``tasks/classification.py`` saves: ``id``, multi-label ``target`` and ``score``), so the
report is tested against the same files a real ``medbench bench`` leaves behind.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medvlp_bench import stats
from medvlp_bench.report import main_report
from medvlp_bench.results import (
    ResultRow,
    build_leaderboard,
    cell_name,
    leaderboard_markdown,
    load_rows,
    save_predictions,
    write_cell,
)

TASK = "phantom_cxr_cls"
METHODS = {"clip": 0.6, "scratch": 1.6}  # method -> score noise (clip separates the classes better)
FRACTIONS = (0.1, 1.0)
SEEDS = (0, 1, 2)
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _row(method: str, frac: float, seed: int, metric: str, value: float, primary: bool) -> ResultRow:
    return ResultRow(
        method=method, impl_source="baseline", task=TASK, task_version="1", kind="classification", spatial_dims=2,
        protocol="linear", label_fraction=frac, seed=seed, metric=metric, value=value, higher_is_better=True,
        primary=primary, ckpt_sha256=None, code_version="abc123def456", mlflow_run_id=None,
        date=f"2026-01-01T00:00:0{seed}+00:00", wall_time_s=1.0, device="cpu (test)", n_test=48,
    )  # fmt: skip


def write_results(root: Path, methods: dict[str, float], predictions: bool = True, seeds=SEEDS) -> Path:
    """A results folder as ``run.evaluate`` writes it: a JSON cell per seed and an ``.npz`` of predictions."""
    rng = np.random.default_rng(0)
    n, k = 48, 3
    ids = np.array([f"cxr-{i:06d}" for i in range(n)])
    target = (rng.random((n, k)) < 0.4).astype(np.float32)
    for method, noise in methods.items():
        for frac in FRACTIONS:
            for seed in seeds:
                logits = target * 2 - 1 + rng.normal(0, noise / frac**0.25, target.shape)
                preds = {"id": ids, "target": target, "score": (1 / (1 + np.exp(-logits))).astype(np.float32)}
                name = cell_name(method, TASK, "linear", frac, seed)
                auroc = stats.metric_value(preds, "auroc")
                acc = float(((preds["score"] > 0.5) == target.astype(bool)).mean())
                rows = [_row(method, frac, seed, "auroc", auroc, True), _row(method, frac, seed, "acc", acc, False)]
                write_cell(root / "runs", name, rows, {"subset_size": int(frac * 100)})
                if predictions:
                    save_predictions(root / "predictions" / f"{name}.npz", **preds)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_results(tmp_path_factory.mktemp("results"), METHODS)
    assert main_report(["--results", str(root)]) == 0
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_page_is_self_contained_with_figures(report: Path) -> None:
    out = report / "report"
    page = (out / "index.html").read_text()
    for name in [*METHODS, TASK, "abc123def456"]:
        assert name in page
    images = _images(page)
    assert len(images) == 2  # one label-efficiency curve (linear protocol) and one bar chart
    for png in images:
        assert png.startswith(PNG_SIG) and png[12:16] == b"IHDR"
        width, height = struct.unpack(">II", png[16:24])
        assert width > 0 and height > 0
    files = sorted(out.glob("*.png"))
    assert sorted(p.read_bytes() for p in files) == sorted(images)  # the same figures as separate files
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', page))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_report_paired_table_and_leaderboard(report: Path) -> None:
    page = (report / "report" / "index.html").read_text()
    p_values = [float(p) for p in re.findall(r'<td class="p">([^<]+)</td>', page)]
    assert len(p_values) == len(FRACTIONS)  # clip vs scratch at each label fraction
    assert all(0 <= p <= 1 for p in p_values) and min(p_values) < 0.05
    assert "delong" in page and "skipped" not in page
    lb = build_leaderboard(load_rows(report / "runs"))
    assert (report / "report" / "leaderboard.md").read_text() == leaderboard_markdown(lb)


@pytest.mark.parametrize("make_runs", [False, True])
def test_report_without_results_fails_clearly(
    tmp_path: Path, make_runs: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if make_runs:
        (tmp_path / "runs").mkdir()
    out = tmp_path / "out"
    assert main_report(["--results", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "runs") in err and "medbench bench" in err
    assert not out.exists() and not (tmp_path / "report").exists()


def test_report_escapes_names_and_notes_missing_predictions(tmp_path: Path) -> None:
    evil = '<script>alert("x")&'
    root = write_results(tmp_path, {evil: 0.6, "scratch": 1.6}, predictions=False, seeds=(0,))
    assert main_report(["--results", str(root), "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&amp;" in page
    assert page.count('class="note"') >= len(FRACTIONS) and "predictions missing" in page
    assert len(_images(page)) == 2  # one seed: no CI band or error bar, figures still drawn


@pytest.mark.slow
def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_report.sh"
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        ["bash", str(script), "-o", str(report / "report"), "-s", str(shot)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check_report: OK" in proc.stdout and shot.read_bytes().startswith(PNG_SIG)


def test_medbench_report_verb_passes_options_through(tmp_path: Path) -> None:
    """`medbench report --results X --out Y` reaches main_report with its own options (no argparse REMAINDER loss)."""
    from medvlp_bench.cli import main

    root = write_results(tmp_path, {"clip": 1.6, "scratch": 0.6}, predictions=False, seeds=(0,))
    assert main(["report", "--results", str(root), "--out", str(tmp_path / "cli-out")]) == 0
    assert (tmp_path / "cli-out" / "index.html").is_file()


def test_report_names_classes_left_out_of_macro_averages(tmp_path: Path) -> None:
    root = write_results(tmp_path, METHODS, seeds=(0, 1))
    cell = root / "runs" / f"{cell_name('clip', TASK, 'linear', 0.1, 1)}.json"
    payload = json.loads(cell.read_text())
    cell.write_text(json.dumps(payload | {"left_out_classes": {"nodule": "no positive in the evaluated split"}}))
    assert main_report(["--results", str(root), "--n-boot", "50"]) == 0
    page = (root / "report" / "index.html").read_text()
    notes = re.findall(r'<p class="note">([^<]*)</p>', page)
    assert [n for n in notes if "nodule" in n] == [
        f"{cell.stem}: macro averages leave out 1 class(es) (nodule: no positive in the evaluated split)"
    ]
    assert "clipped to the metric's range" in page
