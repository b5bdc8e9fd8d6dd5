"""Generic adapters (imagefolder, image_text_csv, nifti_folder), DICOM series, the preprocessed-array cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import fixtures_writer as fw
import numpy as np
import pytest
from helpers import shared_data

from medvlp_bench.datasets._common import DataError, carve, inside
from medvlp_bench.datasets._reader import FileReader, Preprocess
from medvlp_bench.datasets.image_text_csv import ImageTextCSV
from medvlp_bench.datasets.imagefolder import ImageFolder
from medvlp_bench.datasets.nifti_folder import NiftiFolder

KW = {"size": 32, "spatial": "resize"}
TOTALSEG = shared_data() / "totalsegmentator-examples"


# ---- shared machinery -------------------------------------------------------------------------------
def test_inside_refuses_escapes(tmp_path: Path) -> None:
    assert inside(tmp_path, "a/../b.png") == tmp_path / "b.png"
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd"):
        with pytest.raises(DataError, match="path escapes the dataset root"):
            inside(tmp_path, bad)


def test_carve_is_exact_order_free_and_seeded() -> None:
    ids = [f"case{i:03d}" for i in range(100)]
    a = carve(ids, {"train": 0.7, "val": 0.15, "test": 0.15}, "x|0")
    assert a == carve(ids[::-1], {"train": 0.7, "val": 0.15, "test": 0.15}, "x|0")
    assert sorted(a.values()).count("val") == 15 and sorted(a.values()).count("test") == 15
    assert a != carve(ids, {"train": 0.7, "val": 0.15, "test": 0.15}, "x|1")
    assert set(carve(ids[:3], {"train": 0.7, "val": 0.15, "test": 0.15}, "s").values()) == {"train", "val", "test"}


def test_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fw.save_png(tmp_path / "a.png", fw.xray())
    row = {"path": str(path), "label": 0}
    reader = FileReader("t", Preprocess(spatial_dims=2, size=16), cache_dir=str(tmp_path / "cache"))
    first = reader(row)["image"]
    calls = []
    original = FileReader._load
    monkeypatch.setattr(FileReader, "_load", lambda self, r: calls.append(1) or original(self, r))
    np.testing.assert_allclose(reader(row)["image"], first, atol=1e-3)  # float16 cache
    assert calls == []  # served from the cache
    os.utime(path, ns=(1, 1))  # a changed file (new mtime) is a new key
    reader(row)
    other = FileReader("t", Preprocess(spatial_dims=2, size=8), cache_dir=str(tmp_path / "cache"))
    assert other(row)["image"].shape == (1, 8, 8)  # other settings, other key
    assert len(calls) == 2 and len(list((tmp_path / "cache").rglob("*.npz"))) == 3


# ---- imagefolder ------------------------------------------------------------------------------------
def test_imagefolder_classes_formats_and_carved_val(tmp_path: Path) -> None:
    fw.imagefolder(tmp_path)
    dm = ImageFolder(str(tmp_path), **KW)
    m = dm.manifest
    assert dm.class_names == ["effusion", "normal"]
    assert m["split"].value_counts().to_dict() == {"train": 11, "test": 4, "val": 1}
    assert m.equals(ImageFolder(str(tmp_path), **KW).manifest)  # deterministic carving
    assert {Path(p).suffix for p in m["path"]} == {".dcm", ".png", ".jpg"}
    read = dm.reader()
    for row in m.to_dict("records"):
        assert read(row)["image"].shape == (1, 32, 32)
    with_val = tmp_path / "v"
    fw.imagefolder(with_val, with_val=True)
    assert ImageFolder(str(with_val), **KW).manifest["split"].value_counts()["val"] == 4


def test_imagefolder_truncated_jpeg_and_missing_test(tmp_path: Path) -> None:
    fw.imagefolder(tmp_path)
    jpg = next(tmp_path.rglob("*.jpg"))
    jpg.write_bytes(jpg.read_bytes()[:200])
    dm = ImageFolder(str(tmp_path), **KW)
    row = next(r for r in dm.manifest.to_dict("records") if r["path"] == str(jpg))
    with pytest.raises(DataError, match=rf"{jpg.name}: cannot read image file"):
        dm.reader()(row)
    (tmp_path / "test").rename(tmp_path / "holdout")
    with pytest.raises(DataError, match="needs train/ and test/ folders"):
        _ = ImageFolder(str(tmp_path), **KW).manifest


# ---- image_text_csv ---------------------------------------------------------------------------------
def itc(root: Path, **kw) -> ImageTextCSV:
    cols = {"image_col": "filename", "text_col": "findings", "label_cols": ["cardiomegaly", "edema"]}
    return ImageTextCSV(str(root), **{**cols, "group_col": "patient", **KW, **kw})


def test_image_text_csv_pairs_labels_and_group_split(tmp_path: Path) -> None:
    truth = fw.image_text_csv(tmp_path, n=10)
    dm = itc(tmp_path)
    m = dm.manifest.set_index("id")
    assert m.loc["img/003.png", "report"] == "Report 3: heart size normal."
    assert list(m.loc["img/003.png", "label"]) == [1.0, 1.0]
    groups = m.groupby("split")["group"].apply(set)
    assert not groups["train"] & groups["test"] and len(m) == len(truth)
    sample = dm.dataset("train")[0]
    assert sample["report"].startswith("Report") and sample["image"].shape == (1, 32, 32)


def test_image_text_csv_bad_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    df = fw.image_text_csv(tmp_path, n=6)
    csv = tmp_path / "data.csv"
    df.assign(filename=["../outside.png", *df["filename"][1:]]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"data\.csv: line 2: \.\./outside\.png: path escapes the dataset root"):
        _ = itc(tmp_path).manifest
    df.drop(columns="edema").to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"data\.csv: missing column\(s\) \['edema'\]"):
        _ = itc(tmp_path).manifest
    df.assign(findings=["", *df["findings"][1:]]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"000\.png: empty report"):
        _ = itc(tmp_path).manifest
    with caplog.at_level(logging.WARNING):
        assert len(itc(tmp_path, on_error="skip").manifest) == 5
    assert "skipping 1 sample(s)" in caplog.text


# ---- nifti_folder and DICOM series ------------------------------------------------------------------
def test_nifti_folder_reads_dicom_series_and_nifti(tmp_path: Path) -> None:
    vol = np.stack([np.full((16, 12), 100 * k, np.int16) for k in range(5)])  # slice k has 100*k HU
    fw.write_ct_series(tmp_path / "images" / "series1", vol)
    fw.save_nifti(tmp_path / "images" / "vol2.nii.gz", fw.volume((12, 16, 5)))
    fw.save_nifti(tmp_path / "masks" / "vol2_seg.nii.gz", fw.label_map((12, 16, 5), values=(1,)))
    (tmp_path / "masks" / "orphan_seg.nii.gz").write_bytes(b"")
    kw = {"seg_classes": ["bg", "fg"], "mask_suffix": "_seg", "roi": [12, 16, 5], "spatial": "pad_crop", "size": 0}
    dm = NiftiFolder(str(tmp_path), intensity={"type": "none"}, **kw)
    rows = {r["id"]: r for r in dm.manifest.to_dict("records")}
    assert set(rows) == {"series1", "vol2"}
    ct = dm.reader()(rows["series1"])["image"][0]
    # x = columns, y = rows (the NIfTI/ITK convention, so masks written from the series line up), z = slices
    assert ct.shape == (12, 16, 5)
    np.testing.assert_allclose(ct.mean(axis=(0, 1)), [0, 100, 200, 300, 400])  # rescale intercept applied
    seg = NiftiFolder(str(tmp_path), target="mask", on_error="skip", **kw)
    assert list(seg.manifest["id"]) == ["vol2"]  # the series has no mask: skipped with a count
    assert seg.reader()(seg.manifest.iloc[0].to_dict())["mask"].sum() == 2 * 4 * 3


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason=f"shared TotalSegmentator examples not at {TOTALSEG}")
@pytest.mark.parametrize(
    "image,mask,shape",
    [
        ("example_ct_dicom", "example_seg_dicom.nii.gz", (512, 512, 20)),
        ("example_ct_sm.nii.gz", "example_seg.nii.gz", (122, 101, 30)),
    ],
)
def test_real_totalsegmentator_image_and_mask_align(tmp_path: Path, image: str, mask: str, shape: tuple) -> None:
    """A real DICOM series / NIfTI CT and their multi-organ masks (TotalSegmentator outputs) line up: the liver
    (label 5) holds soft tissue and the lung lobes air. A flipped or transposed read breaks these checks."""
    case = "case"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    target = tmp_path / "images" / (case if image.endswith("dicom") else f"{case}.nii.gz")
    target.symlink_to(TOTALSEG / image)
    (tmp_path / "masks" / f"{case}.nii.gz").symlink_to(TOTALSEG / mask)
    classes = [str(i) for i in range(118)]
    dm = NiftiFolder(str(tmp_path), seg_classes=classes, target="mask", spatial="pad_crop", roi=list(shape), size=0)
    s = dm.reader()(dm.manifest.iloc[0].to_dict())
    ct, seg = s["image"][0], s["mask"][0]
    assert ct.shape == seg.shape == shape and ct.min() >= -1200
    assert 30 < ct[seg == 5].mean() < 150  # liver, contrast CT
    # measured: 1.0 aligned; 0.55-0.99 for any flip or a row/column transposition of the mask
    assert (ct[seg == 5] > -100).mean() > 0.995
    lungs = np.isin(seg, [10, 11, 12, 13, 14])
    assert not lungs.any() or ct[lungs].mean() < -500  # lung lobes hold air (flipped: -241 HU and above)
