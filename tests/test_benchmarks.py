"""The throughput benchmark runs and writes sane numbers (it measures; it asserts no speed target)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from helpers import load_script


def test_throughput_script_writes_json_and_markdown(tmp_path: Path, workdir) -> None:
    mod = load_script("benchmarks/throughput.py")
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

    mod = load_script("benchmarks/throughput.py")
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


def _trainability():
    return load_script("benchmarks/trainability.py")


def test_trainability_base_rate_is_the_loss_of_predicting_label_frequencies() -> None:
    import torch

    mod = _trainability()
    multi = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # prevalence 0.5 and 0.25
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    assert math.isclose(mod.base_rate_loss(multi), (h(0.5) + h(0.25)) / 2, rel_tol=1e-6)
    classes = torch.tensor([0, 0, 2, 2])  # class 1 never seen: two equally frequent classes, ln 2
    assert math.isclose(mod.base_rate_loss(classes), math.log(2), rel_tol=1e-6)
    freq = torch.tensor([0.5, 1e-9, 0.5]).log().expand(4, 3)  # a head that predicts the class frequencies
    assert math.isclose(float(mod._loss(freq, classes)), math.log(2), rel_tol=1e-5)
    # a head that predicts the frequencies exactly scores the base rate: the floor a blind encoder reaches
    logit = torch.logit(multi.mean(0)).expand(4, 2)
    assert math.isclose(float(mod._loss(logit, multi)), mod.base_rate_loss(multi), rel_tol=1e-5)


def test_trainability_fits_every_encoder_on_the_same_labels_and_scores_after_the_last_step(
    tmp_path: Path, workdir
) -> None:
    mod = _trainability()
    args = ["--tiny", "--methods", "scratch,scratch_swin", "--kinds", "cxr", "--n", "8", "--steps", "12"]
    assert mod.main([*args, "--size", "32", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "trainability-cpu.json").read_text())
    resnet, swin = data["rows"]
    assert (resnet["method"], swin["method"]) == ("scratch", "scratch_swin") and resnet["encoder"] != swin["encoder"]
    # the same images and labels for both: the same base rate, a fair comparison
    assert resnet["n"] == swin["n"] == 8 and resnet["base_rate_loss"] == swin["base_rate_loss"] > 0
    assert len(resnet["curve"]) == 12 and resnet["curve"][0] == resnet["loss_first"]
    assert resnet["loss_final"] < resnet["curve"][-1] < resnet["loss_first"]  # 8 images, 12 steps: a ResNet fits
    assert "| scratch | ResNetEncoder | cxr | 32 |" in (tmp_path / "trainability-cpu.md").read_text()


def test_trainability_refuses_bad_input_and_writes_nothing_when_nothing_applies(
    tmp_path: Path, workdir, capsys
) -> None:
    import pytest

    mod = _trainability()
    for bad in (["--kinds", "xray"], ["--methods", "clipp"], ["--n", "1"]):
        with pytest.raises(SystemExit):  # before any work
            mod.main([*bad, "--out", str(tmp_path)])
    # brainmvp cannot take 2D X-rays: no row, so no file (an earlier run's results are not overwritten)
    assert mod.main(["--tiny", "--methods", "brainmvp", "--kinds", "cxr", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "trainability-cpu.json").exists()
    assert "brainmvp on cxr: not applicable: " in capsys.readouterr().err  # with the method's own reason
