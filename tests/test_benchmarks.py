"""The throughput benchmark runs and writes sane numbers (it measures; it asserts no speed target)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from helpers import repo_root


def test_throughput_script_writes_json_and_markdown(tmp_path: Path, workdir) -> None:
    spec = importlib.util.spec_from_file_location("throughput", repo_root() / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--tiny", "--methods", "clip,brainmvp", "--kinds", "cxr", "--steps", "2", "--warmup", "1"]
    assert mod.main([*args, "--n-train", "32", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "throughput-cpu.json").read_text())
    (row,) = data["rows"]  # brainmvp does not apply to 2D X-rays: skipped, not measured
    assert row["method"] == "clip" and row["harness_sps"] > 0 and row["plain_sps"] > 0
    assert row["gflop_per_sample"] > 0 and 0 < row["mfu"] < 1 and row["peak_mb"] > 0
    assert data["meta"]["peak_flops"] > 0
    assert "| clip | phantom_cxr |" in (tmp_path / "throughput-cpu.md").read_text()
