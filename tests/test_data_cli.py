"""``medbench data list | check | splits`` logic, and ``medbench run`` on the real shared samples (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
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


def _duplicate_row(csv: Path, row: int) -> None:
    """Append a copy of data row ``row`` (line ``row + 2``), as metadata with one row per visit or note has."""
    table = pd.read_csv(csv)
    pd.concat([table, table.iloc[[row]]]).to_csv(csv, index=False)


def test_duplicate_csv_rows_name_the_file_value_lines_and_ways_out(
    tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    from medvlp_bench.cli import main

    fw.image_text_csv(tmp_path / "mine", n=6)
    csv = tmp_path / "mine" / "data.csv"
    _duplicate_row(csv, 2)  # img/002.png on lines 4 and 8
    keys = [f"root={tmp_path / 'mine'}", "image_col=filename", "text_col=findings", "size=16"]
    assert main(["data", "check", "image_text_csv", *keys]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    want = f"{csv}: 'img/002.png' is on 2 rows of column 'filename' (lines 4 and 8), but each sample must be one row"
    assert want in err and "id_col=<a column with one value per row" in err and "drop_duplicates" in err

    cell = ["run", "method=clip", "task=phantom_cxr_cls", "data=image_text_csv", *(f"data.{k}" for k in keys), *TINY]
    assert main(cell) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and want in lines[0] and "(data: image_text_csv)" in lines[0]
    assert not (workdir / "cache").exists()  # found before any phantom or checkpoint


def test_duplicate_ids_in_a_fixed_layout_point_at_the_csv(tmp_path: Path, workdir: Path) -> None:
    """NIH's index has no id_col option: the way out is to drop the duplicate row."""
    from medvlp_bench.datasets._common import DataError
    from medvlp_bench.datasets.nih_cxr14 import NIHChestXray14

    fw.nih(tmp_path / "nih", patients=4)
    _duplicate_row(tmp_path / "nih" / "Data_Entry_2017.csv", 5)
    with pytest.raises(DataError) as err:
        NIHChestXray14(str(tmp_path / "nih"), size=16).preflight()
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'nih' / 'Data_Entry_2017.csv'}: '00000003_001.png' is on 2 rows of column")
    assert "'Image Index' (lines 7 and 10)" in msg and "id_col" not in msg and "drop the duplicate rows" in msg


def test_data_check_on_jpegs_is_quiet(tmp_path: Path, workdir: Path) -> None:
    """MONAI logged "nvImageCodec is not available" once per file read on machines without its GPU decoder."""
    for split in ("train", "test"):
        for cls in ("normal", "effusion"):
            for i in range(3):
                fw.save_png(tmp_path / "jpg" / split / cls / f"{i}.jpg", fw.xray(), "JPEG")
    exe = Path(sys.executable).with_name("medbench")
    args = [str(exe), "data", "check", "imagefolder", f"root={tmp_path / 'jpg'}", "size=16"]
    out = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "OK: 12 sample(s) read" in out.stdout and "nvImageCodec" not in out.stdout + out.stderr


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
