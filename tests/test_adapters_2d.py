"""2D chest X-ray adapters on exact-format fixtures: RSNA, CheXpert, COVIDx, SIIM-ACR, NIH ChestX-ray14, MIMIC-CXR."""

from __future__ import annotations

import logging
from pathlib import Path

import fixtures_writer as fw
import numpy as np
import pydicom
import pytest

from medvlp_bench.datasets._common import DataError
from medvlp_bench.datasets._reader import FileReader, Preprocess, rle_to_mask
from medvlp_bench.datasets.chexpert import CheXpert
from medvlp_bench.datasets.covidx import COVIDx
from medvlp_bench.datasets.mimic_cxr import MIMICCXR, report_sections
from medvlp_bench.datasets.nih_cxr14 import FINDINGS, NIHChestXray14
from medvlp_bench.datasets.rsna import RSNAPneumonia
from medvlp_bench.datasets.siim import SIIMPneumothorax

#: native 32x32 fixtures read at 32x32: spatial preprocessing is the identity, so values can be compared exactly
KW = {"size": 32, "spatial": "resize"}


def split_sizes(dm) -> dict[str, int]:
    return dm.manifest["split"].value_counts().to_dict()


# ---- RSNA -------------------------------------------------------------------------------------------
def test_rsna_labels_and_patient_split(tmp_path: Path) -> None:
    truth = fw.rsna(tmp_path, n=8)
    dm = RSNAPneumonia(str(tmp_path), **KW)
    m = dm.manifest.set_index("id")
    assert set(m.index) == set(truth)
    for pid, boxes in truth.items():
        assert m.loc[pid, "label"] == float(bool(boxes)) and m.loc[pid, "boxes"] == boxes
    assert split_sizes(dm) == {"train": 6, "val": 1, "test": 1}  # 70/15/15 with at least one per split
    again = RSNAPneumonia(str(tmp_path), **KW).manifest
    assert again.set_index("id")["split"].equals(m["split"])


def test_rsna_boxes_become_masks_in_image_orientation(tmp_path: Path) -> None:
    truth = fw.rsna(tmp_path, n=4)
    dm = RSNAPneumonia(str(tmp_path), target="mask", cache_dir=str(tmp_path / "cache"), **KW)
    rows = {r["id"]: r for r in dm.manifest.to_dict("records")}
    pid = next(p for p, b in truth.items() if len(b) == 2)  # boxes [4,6,10,8] and [20,18,6,10] (x, y, w, h)
    sample = dm.reader()(rows[pid])
    expected = np.zeros((32, 32), np.int64)
    expected[6:14, 4:14] = 1
    expected[18:28, 20:26] = 1
    assert sample["mask"].shape == (1, 32, 32) and (sample["mask"][0] == expected).all()
    # rows x columns as pydicom decodes them: no transposition between image and box mask
    pixels = pydicom.dcmread(rows[pid]["path"]).pixel_array
    assert sample["image"].shape == (1, 32, 32) and np.abs(sample["image"][0] - pixels).max() < 1e-3
    assert next(iter((tmp_path / "cache").rglob("*.npz")), None) is not None  # preprocessed arrays cached


def test_rsna_csv_missing_column_names_file_and_column(tmp_path: Path) -> None:
    fw.rsna(tmp_path, n=2)
    csv = tmp_path / "stage_2_train_labels.csv"
    csv.write_text(csv.read_text().replace(",Target", ",Label"))
    with pytest.raises(DataError, match=r"stage_2_train_labels\.csv: missing column\(s\) \['Target'\]"):
        _ = RSNAPneumonia(str(tmp_path), **KW).manifest


def test_corrupt_dicom_is_named_at_read_time(tmp_path: Path) -> None:
    truth = fw.rsna(tmp_path, n=3)
    bad = tmp_path / "stage_2_train_images" / f"{next(iter(truth))}.dcm"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated inside the pixel data
    dm = RSNAPneumonia(str(tmp_path), **KW)
    row = dm.manifest.set_index("id").loc[bad.stem].to_dict() | {"id": bad.stem}
    with pytest.raises(DataError, match=rf"{bad.name}: cannot read DICOM"):
        dm.reader()(row)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    path = fw.write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    out = FileReader("t", Preprocess(spatial_dims=2, size=32))({"path": str(path), "label": 0})
    np.testing.assert_allclose(out["image"][0], pixels.max() - pixels)


# ---- CheXpert ---------------------------------------------------------------------------------------
def test_chexpert_5x200_test_policy_and_paths(tmp_path: Path) -> None:
    fw.chexpert(tmp_path, per_class=3)
    dm = CheXpert(str(tmp_path / "CheXpert-v1.0-small"), test_per_class=2, **KW)
    m = dm.manifest
    test = m[m["split"] == "test"]
    y = np.stack(test["label"])
    assert len(test) == 10 and (y.sum(1) == 1).all() and (y.sum(0) == 2).all()  # 2 exclusive positives per class
    assert not set(test["group"]) & set(m.loc[m["split"] == "train", "group"])  # no test patient in training
    assert (m["split"] == "val").sum() == 3 and not m["id"].str.contains("lateral").any()
    assert all(Path(p).is_file() for p in m["path"])
    uncertain = m[m["id"].str.contains(f"patient{16:05d}/")]
    assert list(uncertain["label"].iloc[0]) == [0, 1, 0, 1, 0]  # U-Ones: Edema -1 -> 1 (class order of COMPETITION)
    assert dm.dataset("test")[0]["image"].shape == (1, 32, 32)


@pytest.mark.parametrize("policy,edema", [("zeros", 0.0), ("ignore", None)])
def test_chexpert_uncertainty_policies(tmp_path: Path, policy: str, edema: float | None) -> None:
    fw.chexpert(tmp_path, per_class=2)
    m = CheXpert(str(tmp_path / "CheXpert-v1.0-small"), test_per_class=1, uncertain=policy, **KW).manifest
    uncertain = m[m["id"].str.contains(f"patient{11:05d}/")]
    if edema is None:
        assert uncertain.empty
    else:
        assert uncertain["label"].iloc[0][3] == edema


# ---- COVIDx -----------------------------------------------------------------------------------------
def test_covidx_9a_three_classes_official_test(tmp_path: Path) -> None:
    items = fw.covidx(tmp_path, "9A")
    dm = COVIDx(str(tmp_path), version="9A", **KW)
    m = dm.manifest.set_index("id")
    assert dm.task_type == "multiclass" and dm.class_names == ["normal", "pneumonia", "COVID-19"]
    test = m[m["split"] == "test"]
    assert sorted(test.index) == sorted(f"test/{n}" for n, _ in items["test"])
    assert m.loc["train/train img 0.png", "label"] == 0  # a file name with spaces
    assert m.loc["test/test-002.png", "label"] == 2
    val_patients = set(m.loc[m["split"] == "val", "group"])
    assert val_patients and not val_patients & set(m.loc[m["split"] == "train", "group"])
    assert dm.dataset("val")[0]["image"].shape == (1, 32, 32)


def test_covidx_cxr4_binary_with_val_list(tmp_path: Path) -> None:
    fw.covidx(tmp_path, "cxr4")
    dm = COVIDx(str(tmp_path), version="cxr4", **KW)
    assert dm.task_type == "binary" and split_sizes(dm) == {"train": 9, "val": 4, "test": 4}
    assert set(dm.manifest["label"]) == {0.0, 1.0}


def test_covidx_bad_class_names_file_and_line(tmp_path: Path) -> None:
    fw.covidx(tmp_path, "9A")
    txt = tmp_path / "test_COVIDx9A.txt"
    txt.write_text(txt.read_text().replace("pneumonia", "viral"))
    with pytest.raises(DataError, match=r"test_COVIDx9A\.txt: line 2: class 'viral'"):
        _ = COVIDx(str(tmp_path), version="9A", **KW).manifest


# ---- SIIM -------------------------------------------------------------------------------------------
def test_rle_decoding_by_hand() -> None:
    # 2 rows x 3 columns; column-major flat positions 1 and 2 -> (row 1, col 0) and (row 0, col 1)
    assert rle_to_mask(["1 2"], (2, 3)).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert rle_to_mask(["2 2"], (2, 3), relative=False).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert rle_to_mask(["-1"], (2, 3)).sum() == 0


def test_siim_rle_masks_match_and_labels(tmp_path: Path) -> None:
    truth = fw.siim(tmp_path, n=6)
    dm = SIIMPneumothorax(str(tmp_path), target="mask", cache_dir=str(tmp_path / "cache"), **KW)
    rows = {r["id"]: r for r in dm.manifest.to_dict("records")}
    assert set(rows) == set(truth)
    read = dm.reader()
    for sop, mask in truth.items():
        assert rows[sop]["label"] == float(mask.any())
        assert (read(rows[sop])["mask"][0] == mask).all(), sop


# ---- NIH ChestX-ray14 -------------------------------------------------------------------------------
def test_nih_labels_official_test_and_patient_val(tmp_path: Path) -> None:
    truth = fw.nih(tmp_path, patients=8).set_index("name")
    dm = NIHChestXray14(str(tmp_path), **KW)
    m = dm.manifest.set_index("id")
    assert set(m.index) == set(truth.index)
    for name, row in truth.iterrows():
        expected = [f in row["labels"].split("|") for f in FINDINGS]
        assert list(m.loc[name, "label"]) == expected
        assert (m.loc[name, "split"] == "test") == row["test"]
    splits = m.groupby("split")["group"].apply(set)
    assert not splits["train"] & splits["val"] and splits["val"]
    assert dm.dataset("test")[0]["label"].shape == (14,)


# ---- MIMIC-CXR --------------------------------------------------------------------------------------
def test_report_sections() -> None:
    text = fw.REPORT.format(finding="nodule", impression="No acute process.")
    s = report_sections(text)
    assert s["impression"] == "No acute process."
    assert s["findings"].startswith("There is a nodule in the right lower lobe.") and "EXAMINATION" not in s["findings"]


def test_mimic_frontal_pairs_split_and_empty_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fw.mimic(tmp_path, studies=6)
    with pytest.raises(DataError, match=r"s50414272\.txt: empty report"):
        _ = MIMICCXR(str(tmp_path), **KW).manifest
    with caplog.at_level(logging.WARNING):
        dm = MIMICCXR(str(tmp_path), on_error="skip", **KW)
        m = dm.manifest
    assert "skipping 1 sample(s)" in caplog.text and "s50414272.txt: empty report" in caplog.text
    assert len(m) == 5 and m["id"].str.endswith("-pa").all()  # frontal only
    assert split_sizes(dm) == {"train": 3, "val": 1, "test": 1}  # official split, validate -> val
    first = m.set_index("id").loc["00000000-bde0afdd-112c0b34-7bc16eac-pa"]
    assert (
        first["report"]
        == "There is a opacity 0 in the right lower lobe. No pleural effusion. Heart size is normal. Pneumonia 0."
    )
    labels = dict(zip(dm.class_names, first["label"]))
    assert labels["Atelectasis"] == 1 and labels["Cardiomegaly"] == 1  # Cardiomegaly uncertain -> 1 (U-Ones)
    assert sum(labels.values()) == 2
    sample = dm.dataset("train")[0]
    assert sample["report"].startswith("There is a") and sample["image"].shape == (1, 32, 32)
