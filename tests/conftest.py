"""Shared fixtures: temporary results/cache folders, tiny phantom and encoder sizes, no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point results, cache and data at a temporary folder (also for CLI subprocesses)."""
    monkeypatch.setenv("MEDBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MEDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for generated phantoms shared by the whole session (generation is the slow part)."""
    return tmp_path_factory.mktemp("phantom_cache")
