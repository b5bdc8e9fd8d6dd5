"""The mapped folders are importable only as medvlp_bench.*; Hugging Face ``datasets`` stays importable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import repo_root

PROBE = """
import importlib.util, json
import medvlp_bench.methods, medvlp_bench.tasks, medvlp_bench.datasets
out = {
    "ours": medvlp_bench.datasets.__file__,
    "bare": {m: importlib.util.find_spec(m) is not None for m in ("methods", "tasks")},
}
spec = importlib.util.find_spec("datasets")
out["hf_datasets"] = spec.origin if spec else None
if spec:
    import datasets
    out["hf_has_load_dataset"] = hasattr(datasets, "load_dataset")
print(json.dumps(out))
"""


def test_mapped_packages_and_hf_datasets_coexist(tmp_path: Path) -> None:
    """From a neutral folder: no bare methods/tasks, ours under medvlp_bench, HF datasets is the real one."""
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["bare"] == {"methods": False, "tasks": False}
    assert Path(info["ours"]).parent.name == "datasets"
    if info["hf_datasets"] is None:
        pytest.skip("Hugging Face datasets is not installed (pip install -e .[dev] installs it)")
    assert "site-packages" in info["hf_datasets"] and info["hf_has_load_dataset"]


@pytest.mark.slow
def test_wheel_has_no_top_level_methods_tasks_datasets(tmp_path: Path) -> None:
    """A built wheel holds medvlp_bench/{methods,tasks,datasets,configs} and nothing at the top level."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(repo_root()),
        ],
        check=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("medvlp_bench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"methods", "tasks", "datasets", "configs"}
    for sub in (
        "methods/clip.py",
        "tasks/classification.py",
        "datasets/phantoms.py",
        "configs/run.yaml",
        "configs/method/clip.yaml",
    ):
        assert f"medvlp_bench/{sub}" in names, sub
