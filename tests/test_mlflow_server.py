"""A real MLflow tracking server (``mlflow server`` on loopback, SQLite backend, proxied artifacts): a tiny
``medbench run`` logs to it and the metrics and files come back through the MLflow client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    port = _free_port()
    exe = str(Path(sys.executable).with_name("mlflow"))
    args = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    args += ["--artifacts-destination", str(tmp_path / "server-artifacts")]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_run_logs_metrics_and_files_to_a_tracking_server(server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server,
        "MEDBENCH_RESULTS": str(tmp_path / "results"),
        "MEDBENCH_CACHE": str(tmp_path / "cache"),
    }
    args = ["run", "method=scratch", "task=phantom_cxr_cls", "task.data.size=32", *tiny_data("task.data")]
    args += ["task.max_epochs=2", "trainer.progress=none"]
    exe = str(Path(sys.executable).with_name("medbench"))
    out = subprocess.run([exe, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("medvlp-bench")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")  # stored by the server
    (run,) = client.search_runs([exp.experiment_id])
    (cell,) = (tmp_path / "results" / "runs").glob("*.json")
    rows = {r["metric"]: r["value"] for r in json.loads(cell.read_text())["rows"]}
    assert run.info.run_name == f"eval/{cell.stem}" and run.info.status == "FINISHED"
    assert run.data.metrics["phantom_cxr_cls.auroc"] == pytest.approx(rows["auroc"])
    assert run.data.tags["method"] == "scratch" and run.data.params
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {cell.name, f"{cell.stem}.npz"} <= names
    assert list((tmp_path / "server-artifacts").rglob(cell.name))  # the server holds the files
    assert not (tmp_path / "results" / "mlflow.db").exists()  # nothing went to the local store
