"""``medbench data list | check | splits`` logic, and ``medbench run`` on the real shared samples (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_writer as fw
import pandas as pd
import pytest
from helpers import TINY, shared_data

from medvlp_bench.datacli import _split_overrides, data_check, data_list, data_splits
from medvlp_bench.datasets._common import registry

SHARED = shared_data()


def test_split_overrides_prefix_bare_keys() -> None:
    rest, own = _split_overrides(
        ["root=/d", "paths.cache_dir=/c", "data.size=8", "+exclude=[a]", "workers=2", "seeds=[0]"]
    )
    assert rest == ["data.root=/d", "paths.cache_dir=/c", "data.size=8", "+data.exclude=[a]"]
    assert own["workers"] == 2 and own["seeds"] == [0] and own["fractions"] == [0.01, 0.1]


def test_data_list_names_layout_licence_and_source() -> None:
    text = data_list()
    for key, info in registry().items():
        assert f"{key}: {info.title}" in text and info.licence in text and info.url in text
    assert "configs: msd, msd_hippocampus" in text
    assert "stage_2_train_labels.csv        patientId,x,y,width,height,Target" in text


def test_data_check_counts_and_passes(tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    fw.msd(tmp_path / "msd", n=6)
    assert data_check("msd", [f"root={tmp_path / 'msd'}", "size=16"]) == 0
    out = capsys.readouterr().out
    assert "train        4" in out and "OK: 6 sample(s) read, no problems" in out


def test_data_check_names_corrupt_files(tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    truth = fw.rsna(tmp_path / "rsna", n=5)
    bad = tmp_path / "rsna" / "stage_2_train_images" / f"{sorted(truth)[1]}.dcm"
    bad.write_bytes(b"not a dicom at all")
    assert data_check("rsna", [f"root={tmp_path / 'rsna'}", "size=16"]) == 1
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and f"{bad}: cannot read DICOM" in err


def test_data_check_missing_root_says_where_and_how(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert data_check("chexpert", []) == 1
    err = capsys.readouterr().err
    assert str(workdir / "data" / "CheXpert-v1.0-small") in err
    assert "https://stanfordmlgroup.github.io/competitions/chexpert/" in err and "Research Use Agreement" in err


def test_data_splits_writes_deterministic_files(tmp_path: Path, workdir: Path) -> None:
    fw.covidx(tmp_path / "covidx", "9A")
    args = [f"root={tmp_path / 'covidx'}", f"out={tmp_path / 'a'}", "seeds=[0, 1]"]
    assert data_splits("covidx", args) == 0
    assert data_splits("covidx", [*args[:1], f"out={tmp_path / 'b'}", "seeds=[0, 1]"]) == 0
    a, b = (tmp_path / "a" / "SHA256SUMS").read_text(), (tmp_path / "b" / "SHA256SUMS").read_text()
    assert a == b and len(a.splitlines()) == 5  # split.csv + 2 fractions x 2 seeds
    split = pd.read_csv(tmp_path / "a" / "split.csv")
    assert split["split"].value_counts().to_dict() == {"train": 7, "test": 4, "val": 2}
    assert set((tmp_path / "a" / "train_f0.1_s0.txt").read_text().split()) <= set(
        split.loc[split["split"] == "train", "id"]
    )


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "medmnist").is_dir(), reason=f"shared AdrenalMNIST3D not at {SHARED / 'medmnist'}")
def test_cli_run_adrenalmnist3d(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    from medvlp_bench.cli import main

    args = ["run", "method=scratch", "task=adrenalmnist3d_cls", f"paths.data_dir={SHARED}", "task.label_fraction=1.0"]
    assert main([*args, *TINY]) == 0
    rows = dict(line.split("\t")[-2:] for line in capsys.readouterr().out.strip().splitlines())
    assert set(rows) >= {"auroc", "acc", "f1"} and 0 <= float(rows["auroc"]) <= 1
    cell = json.loads(next((workdir / "results" / "runs").glob("adrenalmnist3d_cls__scratch__*.json")).read_text())
    assert cell["rows"][0]["n_test"] == 298 and cell["subset_size"] == 1188  # official test and training splits


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "msd-hippocampus-cropped").is_dir(), reason="shared MSD hippocampus sample absent")
def test_cli_run_msd_hippocampus_seg(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    from medvlp_bench.cli import main

    args = ["run", "method=scratch", "task=msd_hippocampus_seg", f"paths.data_dir={SHARED}", "task.label_fraction=0.1"]
    tiny = ["trainer.progress=none", "logger=none", "method.model.image_encoder.name=resnet_tiny", "task.max_epochs=1"]
    assert main([*args, *tiny]) == 0
    rows = dict(line.split("\t")[-2:] for line in capsys.readouterr().out.strip().splitlines())
    assert {"dice", "dice/anterior", "dice/posterior"} <= set(rows) and 0 <= float(rows["dice"]) <= 1
