"""`medbench bench suite=smoke`: every method config x every phantom task kind end to end, as a user runs it.

The methods are the registry of method configs (``configs/method/*.yaml``, as in tests/test_methods.py), not a
list kept here, so a new method is smoke-tested without a test edit. The cells a method cannot do are counted,
not faked, and are predicted from what the configs declare rather than from method names: a method without a
text encoder has no retrieval/zero-shot rows; a ``requires:`` block (BrainMVP: multi-modal 3D) or a
pre-training corpus whose channels the method cannot adapt to (UniMedI's 1-channel X-ray + CT on 4-channel MRI)
makes a cell not applicable, with the reason the bench's planner states.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from medvlp_bench.bench import plan
from medvlp_bench.config import compose, options

#: method configs the smoke run leaves out, each with why it cannot run offline at smoke size
NOT_SMOKED = {
    "external": "evaluates a released model read from external.path; none exists offline (tests/test_external.py)",
}
METHODS = [m for m in options("method") if m not in NOT_SMOKED]
#: task kinds that compare images with text: only methods with a text encoder take part
TEXT_KINDS = {"retrieval", "zeroshot"}


def expected_cells(suite_overrides: list[str]) -> set[tuple[str, str]]:
    """(method, task) pairs that must produce rows: the planner's applicable cells minus text tasks for
    methods whose config has no text encoder."""
    out = set()
    for cell in plan(compose("bench", suite_overrides), []):
        if cell.gap is not None:
            continue
        if cell.kind in TEXT_KINDS and "text_encoder" not in cell.cfg.method.model:
            continue
        out.add((cell.method, cell.task))
    return out


def test_smoke_suite_runs_every_method_on_every_task_kind(workdir: Path) -> None:
    overrides = ["suite=smoke", f"suite.methods=[{','.join(METHODS)}]"]
    suite = compose("bench", overrides).suite
    want = expected_cells(overrides)
    assert {m for m, _ in want} == set(METHODS), "a method applies to no smoke task"
    assert {t for _, t in want} == set(suite.tasks), "a smoke task has no method"
    exe = str(Path(sys.executable).with_name("medbench"))
    cmd = [exe, "bench", *overrides, "logger=none"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
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

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"0 cells run, {len(want)} already done" in again.stdout
