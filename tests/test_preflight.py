"""Pre-flight: a cell with missing data or a bad value fails in seconds, in one line, before any work."""

from __future__ import annotations

import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_data
from omegaconf import open_dict

from medvlp_bench.cli import main
from medvlp_bench.config import compose, instantiate
from medvlp_bench.datasets._errors import DataError

#: a user corpus (MEDBENCH_CONFIG_PATH) of generated X-rays plus RSNA: the phantom part comes first
MIXED = """defaults:
  - phantom_cxr@parts.phantom_cxr
  - rsna@parts.rsna
  - _self_
_target_: medvlp_bench.datasets.mixed.MixedDataModule
name: cxr_plus_rsna
spatial_dims: 2
in_channels: 1
size: 32
"""


@pytest.fixture(scope="module")
def imported() -> None:
    """What the first ``run`` of a process imports (torch, Lightning, transformers, the method modules) takes
    tens of seconds on a busy machine; the pre-flight itself is what the tests time."""
    import importlib

    for module in ("lightning", "transformers.utils.logging", "medvlp_bench.run", "medvlp_bench.datasets.rsna"):
        importlib.import_module(module)
    for method in ("unimedi", "clip"):
        importlib.import_module(f"medvlp_bench.methods.{method}")


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_task_data_fails_in_seconds_saying_where_and_how(
    imported: None, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    """UniMedI pre-trains on phantoms, so without pre-flight it generated them and trained before touching RSNA."""
    t0 = time.perf_counter()
    assert main(["run", "method=unimedi", "task=rsna_cls", "logger=none", "trainer.progress=none"]) == 2
    seconds = time.perf_counter() - t0
    line = one_line(capsys.readouterr().err)
    assert seconds < 15, f"pre-flight took {seconds:.1f} s"
    assert line.startswith(f"medbench run: error: {workdir / 'data' / 'rsna'}: not found; task.data (rsna)")
    for part in (
        "stage_2_train_labels.csv",
        "https://www.kaggle.com/competitions/rsna-pneumonia-detection-challenge/data",
        "point task.data.root",
        "`medbench data check rsna root=<folder>`",
    ):
        assert part in line
    assert not (workdir / "cache").exists()  # no phantom generated, no checkpoint written


def test_missing_corpus_part_fails_before_the_phantom_part_is_generated(
    imported: None, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    user = workdir / "my_configs"
    (user / "data").mkdir(parents=True)
    (user / "data" / "cxr_plus_rsna.yaml").write_text(MIXED)
    monkeypatch.setenv("MEDBENCH_CONFIG_PATH", str(user))
    sizes = [f"data.parts.phantom_cxr.{o}" for o in ("size=32", *[t.split(".", 2)[2] for t in tiny_data()])]
    cell = ["run", "method=clip", "task=phantom_cxr_cls", "data=cxr_plus_rsna", *sizes, *TINY, *tiny_data()]
    t0 = time.perf_counter()
    assert main(cell) == 2
    assert time.perf_counter() - t0 < 15
    assert not (workdir / "cache").exists()  # the phantom part was not generated first
    line = one_line(capsys.readouterr().err)
    assert (
        f"{workdir / 'data' / 'rsna'}: not found; data.parts.rsna (rsna)" in line
        and "point data.parts.rsna.root" in line
    )
    assert main(["pretrain", "method=clip", "data=cxr_plus_rsna", *sizes, *TINY[:2]]) == 2
    assert "data.parts.rsna (rsna)" in one_line(capsys.readouterr().err)
    assert not (workdir / "cache").exists()


def test_corpus_is_not_needed_with_a_cached_checkpoint_or_ckpt(workdir: Path) -> None:
    from medvlp_bench.cell import resolve
    from medvlp_bench.checkpoint import checkpoint_dir
    from medvlp_bench.preflight import check_cell

    ov = ["method=clip", "task=phantom_cxr_cls", "data=mimic_cxr"]
    cfg = resolve(ov).cfg
    with pytest.raises(DataError, match=r"mimic-cxr-jpg/2.0.0: not found; data \(mimic_cxr\)"):
        check_cell(cfg)
    cached = checkpoint_dir(cfg)  # the key of (method, corpus, seed): the corpus is not read again
    cached.mkdir(parents=True)
    (cached / "model.safetensors").write_bytes(b"")
    (cached / "config.json").write_text("{}")
    check_cell(cfg)
    with open_dict(cfg):
        cfg.seed = 1  # another key: would pre-train, so the corpus must be there
    with pytest.raises(DataError, match="mimic_cxr"):
        check_cell(cfg)
    with open_dict(cfg):
        cfg.ckpt = str(cached)  # given weights: no pre-training either
    check_cell(cfg)


BAD_VALUES = [
    (["seed=abc"], "seed must be a whole number from 0 to 4294967295, got 'abc'"),
    (["seed=-3"], "seed must be a whole number from 0 to 4294967295, got -3"),
    (["task.label_fraction=2"], "task.label_fraction must be a number in (0, 1], e.g. 0.01, 0.1 or 1.0; got 2"),
    (["task.label_fraction=0"], "task.label_fraction must be a number in (0, 1]"),
    (["task.label_fraction=ten"], "got 'ten'"),
    (["task.protocol=foo"], "task.protocol 'foo' is not a classification protocol; valid: linear, finetune"),
    (["task=phantom_ct_seg", "task.protocol=linear"], "not a segmentation protocol; valid: finetune, frozen"),
    (["task=phantom_cxr_retrieval", "task.protocol=linear"], "not a retrieval protocol; valid: zeroshot"),
    (["trainer.precision=17"], "trainer.precision must be one of 32-true, 16-mixed, bf16-mixed"),
    (["trainer.progress=fancy"], "trainer.progress must be one of rich, tqdm, none; got 'fancy'"),
    (["logger.kind=wandb"], "logger.kind must be one of mlflow, csv, none; got 'wandb'"),
    (["pretrain=sometimes"], "pretrain must be one of auto, never; got 'sometimes'"),
    (["task.batch_size=0"], "task.batch_size must be a whole number >= 1, got 0"),
    (["method.pretrain.max_epochs=-1"], "method.pretrain.max_epochs must be a whole number >= 0, got -1"),
    (["ckpt=/no/such/folder"], "ckpt=/no/such/folder is not a checkpoint folder"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_are_one_line_errors_before_work(
    overrides: list[str], message: str, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    other_task = any(o.startswith("task=") for o in overrides)
    keys = {o.split("=")[0] for o in overrides}
    tiny = [o for o in TINY if o.split("=")[0] not in keys and not (other_task and o.startswith("task."))]
    task = [] if other_task else ["task=phantom_cxr_cls"]
    assert main(["run", "method=clip", *task, *overrides, *tiny, *tiny_data()]) == 2  # tiny, were it to run
    line = one_line(capsys.readouterr().err)
    assert line.startswith("medbench run: error: ") and message in line
    assert not (workdir / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_gpu_trainer_without_a_gpu_fails_before_work(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "method=clip", "task=phantom_cxr_cls", "trainer=gpu", "logger=none"]) == 2
    assert "torch sees no CUDA GPU here; use trainer=cpu" in one_line(capsys.readouterr().err)
    assert not (workdir / "cache").exists()


def test_cli_error_is_one_line_without_traceback(workdir: Path) -> None:
    exe = Path(sys.executable).with_name("medbench")
    out = subprocess.run(
        [str(exe), "run", "method=unimedi", "task=rsna", "seed=1"], cwd=workdir, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "not found; task.data (rsna)" in one_line(out.stderr)
    assert not (workdir / "cache").exists()


def test_protocol_table_matches_the_task_classes(workdir: Path) -> None:
    """``PROTOCOLS`` lets a bad protocol fail at compose time; each task class must accept exactly those."""
    from medvlp_bench.config import PROTOCOLS, task_kind

    examples = {"classification": "phantom_cxr_cls", "segmentation": "phantom_cxr_seg"}
    examples |= {"retrieval": "phantom_cxr_retrieval", "zeroshot": "phantom_cxr_zeroshot"}
    assert set(examples) == set(PROTOCOLS)
    for kind, task in examples.items():
        for protocol in PROTOCOLS[kind]:
            cfg = compose("run", ["method=scratch", f"task={task}", f"task.protocol={protocol}"])
            assert task_kind(cfg.task._target_) == kind
            assert instantiate(cfg.task).protocol == protocol
        with open_dict(cfg):
            cfg.task.protocol = "bogus"
        with pytest.raises(Exception, match="bogus"):
            instantiate(cfg.task)


def test_precisions_are_lightnings() -> None:
    from lightning.fabric.connector import _PRECISION_INPUT

    from medvlp_bench.config import PRECISIONS

    lightning = {v for lit in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(lit)}
    assert set(PRECISIONS) == lightning
