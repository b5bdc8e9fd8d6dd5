"""End to end through the ``medbench`` command: rows, leaderboard, errors before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import TINY, tiny_data

from medvlp_bench.cli import main
from medvlp_bench.results import LEADERBOARD_COLUMNS


def medbench(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("medbench")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_run_writes_rows_predictions_and_leaderboard(workdir: Path) -> None:
    """`medbench run` pre-trains clip (tiny), evaluates, writes one JSON cell; `leaderboard` aggregates it."""
    args = [
        "run",
        "method=clip",
        "task=phantom_cxr_cls",
        "seed=1",
        "task.data.size=32",
        "task.label_fraction=0.5",
        *TINY,
        *tiny_data(),
    ]
    out = medbench(*args, cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = list((workdir / "results" / "runs").glob("*.json"))
    assert [c.name for c in cells] == ["phantom_cxr_cls__clip__linear__f0.5__s1.json"]
    payload = json.loads(cells[0].read_text())
    rows = {r["metric"]: r for r in payload["rows"]}
    assert {"auroc", "acc", "f1"} <= set(rows) and rows["auroc"]["primary"] is True
    for r in rows.values():
        assert 0.0 <= r["value"] <= 1.0 and r["impl_source"] == "baseline" and r["n_test"] == 12
        assert len(r["ckpt_sha256"]) == 64 and r["seed"] == 1 and r["code_version"]
    assert payload["subset_ids"] and len(payload["subset_ids"]) == payload["subset_size"]
    preds = list((workdir / "results" / "predictions").glob("*.npz"))
    assert len(preds) == 1
    ckpts = list((workdir / "cache" / "checkpoints").glob("clip__phantom_cxr__s1__*/model.safetensors"))
    assert len(ckpts) == 1

    out = medbench("leaderboard", "--format", "csv", cwd=workdir)
    assert out.returncode == 0, out.stderr
    lb = pd.read_csv(workdir / "results" / "leaderboard.csv")
    assert list(lb.columns) == LEADERBOARD_COLUMNS and set(lb["method"]) == {"clip"}


def test_unknown_names_fail_before_work(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "method=nope", "task=phantom_cxr_cls"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "clip" in err and "scratch" in err
    assert main(["run", "method=clip", "task=phantom_cxr_cls", "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    assert not (workdir / "results").exists() and not (workdir / "cache").exists()  # nothing written


def test_list_shows_methods_and_phantom_tasks(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    methods = next(line for line in out.splitlines() if line.startswith("method:"))
    tasks = next(line for line in out.splitlines() if line.startswith("task:"))
    assert "scratch" in methods and "clip" in methods
    for t in ("phantom_cxr_cls", "phantom_ct_cls", "phantom_mri_cls"):
        assert t in tasks


def test_scratch_run_in_process_then_rerun_overwrites(workdir: Path) -> None:
    args = ["run", "method=scratch", "task=phantom_mri_cls", "task.data.size=32", *TINY, *tiny_data()]
    assert main(args) == 0
    cell = workdir / "results" / "runs" / "phantom_mri_cls__scratch__linear__f0.01__s0.json"
    first = json.loads(cell.read_text())
    assert first["rows"][0]["ckpt_sha256"] is None  # scratch: evaluated from its seeded initialisation
    assert main(args) == 0
    second = json.loads(cell.read_text())
    assert [r["value"] for r in first["rows"]] == [r["value"] for r in second["rows"]]  # same seed, same rows


def test_channels_last_and_compile_options_keep_checkpoint_keys(workdir) -> None:
    from medvlp_bench.config import compose
    from medvlp_bench.run import build_method, speed_up

    tiny = [o for o in TINY if o.startswith("method.")]
    cfg = compose("pretrain", ["method=clip", "data=phantom_cxr", "trainer.channels_last=true", *tiny])
    m = build_method(cfg)
    keys = set(m.state_dict())
    speed_up(m, cfg.trainer, 2)
    convs = [p for p in m.image_encoder.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    cfg.trainer.compile = True
    speed_up(m, cfg.trainer, 2)
    assert set(m.state_dict()) == keys  # compiled in place: safetensors keys unchanged


#: datasets that the shipped task configs use, and their main task (classification first, then segmentation)
MAIN_TASKS = {
    "adrenalmnist3d": "adrenalmnist3d_cls",
    "brats": "brats_seg",
    "btcv": "btcv_seg",
    "chexpert": "chexpert_cls",
    "covidx": "covidx_cls",
    "msd_hippocampus": "msd_hippocampus_seg",
    "nih_cxr14": "nih_cxr14_cls",
    "phantom_ct": "phantom_ct_cls",
    "phantom_cxr": "phantom_cxr_cls",
    "phantom_mri": "phantom_mri_cls",
    "rsna": "rsna_cls",
    "siim": "siim_seg",
}


def test_dataset_name_as_task_runs_its_main_task(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    from medvlp_bench.config import compose, task_shortcuts

    assert MAIN_TASKS.items() <= task_shortcuts().items()
    assert not set(task_shortcuts()) & {"mimic_cxr", "msd", "phantom_cxr_ct"}  # no task of their own
    for data, task in MAIN_TASKS.items():
        assert compose("run", ["method=scratch", f"task={data}"]).names.task == task
    assert (
        compose("run", ["method=scratch", "task=rsna"]).task == compose("run", ["method=scratch", "task=rsna_cls"]).task
    )
    assert main(["run", "method=unimedi", "task=rsna"]) == 2  # the rsna_cls cell, stopped by its missing data
    err = capsys.readouterr().err
    assert "unknown task" not in err and "not found; task.data (rsna)" in err
    assert main(["run", "method=clip", "task=mimic_cxr"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'mimic_cxr' (mimic_cxr is a dataset without a task of its own" in err and "rsna_cls" in err
    assert main(["list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("task shortcuts"))
    assert all(f"{data} -> {task}" in line for data, task in MAIN_TASKS.items())


def test_task_shortcuts_come_from_the_configs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's dataset with a segmentation and a classification task gets the classification one."""
    from medvlp_bench.config import task_shortcuts

    user = workdir / "my_configs"
    (user / "data").mkdir(parents=True)
    (user / "data" / "mine.yaml").write_text("defaults:\n  - phantom_cxr\n  - _self_\nname: mine\n")
    for name, target in (("mine_seg", "segmentation.Segmentation"), ("mine_cls", "classification.Classification")):
        (user / "task").mkdir(exist_ok=True)
        (user / "task" / f"{name}.yaml").write_text(
            f"defaults:\n  - /data@data: mine\n  - _self_\n_target_: medvlp_bench.tasks.{target}\n"
        )
    assert "mine" not in task_shortcuts()
    monkeypatch.setenv("MEDBENCH_CONFIG_PATH", str(user))
    assert task_shortcuts()["mine"] == "mine_cls"
