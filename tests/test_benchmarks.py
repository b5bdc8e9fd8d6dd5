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


def test_throughput_takes_a_size_per_kind_and_the_methods_own_batch(tmp_path: Path, workdir) -> None:
    import argparse

    import pytest

    from medvlp_bench.config import compose

    spec = importlib.util.spec_from_file_location("throughput", repo_root() / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_sizes("cxr=24, ct=16") == {"cxr": 24, "ct": 16} and mod.parse_sizes("32") == {"*": 32}
    with pytest.raises(argparse.ArgumentTypeError, match="kind=N"):
        mod.parse_sizes("cxr=big")
    with pytest.raises(argparse.ArgumentTypeError, match="--batch: expected a positive integer or 'method'"):
        mod.parse_batch("foo")
    with pytest.raises(SystemExit, match="--size names \\['cxr'\\], not 'ct'"):  # before any measurement
        mod.main(["--methods", "clip", "--kinds", "cxr,ct", "--size", "cxr=40", "--out", str(tmp_path)])
    # what one measurement is set up with (main then times it, as the test above shows): no timing needed here
    sizes = mod.parse_sizes("cxr=40,ct=32")
    args = argparse.Namespace(size=sizes, kinds="cxr,ct", batch="method", n_train=16, tiny=True)
    cfg, _, dm = mod._setup("clip", "cxr", args)
    own = compose("pretrain", ["method=clip", "data=phantom_cxr", *mod.tiny_overrides("clip")]).method.pretrain
    assert cfg.data.size == 40 and dm.batch_size == int(own.batch_size) == int(cfg.method.pretrain.batch_size)
    args.batch = "4"
    assert mod._setup("clip", "ct", args)[2].batch_size == 4 and mod._setup("clip", "ct", args)[0].data.size == 32
