"""Faults: a killed pre-training resumes to the same weights; concurrent benches share a results folder;
an unwritable or full results folder fails clearly and leaves nothing half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_clip_pretrain

from medvlp_bench import results
from medvlp_bench.checkpoint import AtomicCheckpointIO
from medvlp_bench.run import resumable

EXE = str(Path(sys.executable).with_name("medbench"))
PRETRAIN = ["pretrain", *tiny_clip_pretrain(6), "trainer.deterministic=true"]


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "MEDBENCH_RESULTS": str(root / "results"), "MEDBENCH_CACHE": str(root / "cache")}


def _weights_sha(root: Path) -> str:
    (w,) = (root / "cache" / "checkpoints").glob("*/model.safetensors")
    return hashlib.sha256(w.read_bytes()).hexdigest()


def test_killed_pretraining_resumes_to_identical_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    done = subprocess.run([EXE, *PRETRAIN], env=_env(a), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        [EXE, *PRETRAIN], env=_env(b), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list((b / "cache" / "work" / "pretrain").glob("*/last.ckpt"))
        if found:  # killed right after the first epoch-end checkpoint: mid-run, with epochs left to replay
            last = found[0]
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last is not None, "the run finished or never checkpointed: cannot test a kill"
    assert not list((b / "cache" / "checkpoints").glob("*/model.safetensors"))  # nothing final after a kill
    assert torch.load(last, weights_only=True)["epoch"] < 5

    again = subprocess.run([EXE, *PRETRAIN], env=_env(b), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming pre-training" in again.stderr + again.stdout
    assert _weights_sha(b) == _weights_sha(a)
    # the shift is measured from the seeded init, not from the resume point: both runs report the same value
    shifts = [json.loads(next((r / "cache" / "checkpoints").glob("*/config.json")).read_text()) for r in (a, b)]
    assert shifts[0]["encoder_shift"] == shifts[1]["encoder_shift"] > 0


def test_torn_resume_checkpoint_is_ignored(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"PK\x03\x04 torn")
    assert resumable(last) is None and not last.exists()
    AtomicCheckpointIO().save_checkpoint({"epoch": 3, "w": torch.ones(2)}, last)
    assert resumable(last) == str(last) and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_concurrent_benches_share_a_results_folder(tmp_path: Path) -> None:
    """Two bench processes on one folder: every cell exactly once, rows intact, leaderboard right."""
    args = [
        EXE,
        "bench",
        "suite=smoke",
        "suite.methods=[scratch]",
        "suite.seeds=[0,1]",
        "suite.tasks=[phantom_cxr_cls,phantom_mri_cls]",
        "logger=none",
    ]
    env = _env(tmp_path)
    procs = [
        subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    cells = sorted(p.name for p in (tmp_path / "results" / "runs").glob("*.json"))
    assert len(cells) == 4 and not list((tmp_path / "results" / "runs").glob(".*.tmp"))
    for c in cells:
        json.loads((tmp_path / "results" / "runs" / c).read_text())  # every file complete
    lb = results.write_leaderboard(tmp_path / "results")
    primary = lb[lb["primary"]]
    assert len(primary) == 2 and set(primary["n_seeds"]) == {2}


def test_disk_full_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(results.ResultsWriteError, match="No space left"):
        results.write_cell(tmp_path, "cell", [])
    assert list(tmp_path.iterdir()) == []


def test_unwritable_results_folder_fails_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the results folder should be")
    env = {**_env(tmp_path), "MEDBENCH_RESULTS": str(blocker / "results")}
    out = subprocess.run(
        [EXE, "run", "method=scratch", "task=phantom_cxr_cls", "logger=none"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "cannot write" in out.stderr and str(blocker) in out.stderr
    assert not (tmp_path / "cache" / "phantoms").exists()  # failed before generating any data
