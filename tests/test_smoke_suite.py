"""`medbench bench suite=smoke`: every method x every phantom task kind end to end, as a user runs it.

The cells a method cannot do are counted, not faked: no text tower -> no retrieval/zero-shot rows;
BrainMVP only on multi-modal 3D; UniMedI (pre-trained on 1-channel X-ray + CT) not on 4-channel MRI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from medvlp_bench.config import compose

NO_TEXT = {"scratch", "brainmvp"}
TEXT_TASKS = {"phantom_cxr_retrieval", "phantom_ct_retrieval", "phantom_cxr_zeroshot"}
MRI = {"phantom_mri_cls", "phantom_mri_seg"}


def expected_cells(methods: list[str], tasks: list[str]) -> set[tuple[str, str]]:
    out = set()
    for m in methods:
        for t in tasks:
            if m in NO_TEXT and t in TEXT_TASKS:
                continue
            if m == "brainmvp" and t not in MRI:
                continue
            if m == "unimedi" and t in MRI:
                continue
            out.add((m, t))
    return out


def test_smoke_suite_runs_every_method_on_every_task_kind(workdir: Path) -> None:
    suite = compose("bench", ["suite=smoke"]).suite
    exe = str(Path(sys.executable).with_name("medbench"))
    out = subprocess.run([exe, "bench", "suite=smoke", "logger=none"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    want = expected_cells(list(suite.methods), list(suite.tasks))
    n_all = len(suite.methods) * len(suite.tasks)
    assert f"{len(want)} cells run, 0 already done, {n_all - len(want)} not applicable" in out.stdout
    assert "0 failed" in out.stdout

    lb = pd.read_csv(workdir / "results" / "leaderboard.csv")
    primary = lb[lb["primary"]]
    assert set(zip(primary["method"], primary["task"])) == want
    assert primary["mean"].between(0, 1).all() and (primary["n_seeds"] == 1).all()
    kinds = set(primary["kind"])
    assert {"classification", "segmentation", "retrieval", "zeroshot"} <= kinds, kinds
    assert set(primary["spatial_dims"]) == {2, 3}
    runs = list((workdir / "results" / "runs").glob("*.json"))
    assert len(runs) == len(want)

    again = subprocess.run([exe, "bench", "suite=smoke", "logger=none"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"0 cells run, {len(want)} already done" in again.stdout
