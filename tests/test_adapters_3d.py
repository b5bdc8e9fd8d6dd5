"""3D adapters on exact-format fixtures (MSD, BTCV, BraTS, MedMNIST) and on the real shared samples."""

from __future__ import annotations

from pathlib import Path

import fixtures_writer as fw
import numpy as np
import pandas as pd
import pytest
from helpers import shared_data

from medvlp_bench.datasets._common import SPLITS_DIR, DataError
from medvlp_bench.datasets.brats import BraTS
from medvlp_bench.datasets.btcv import BTCV
from medvlp_bench.datasets.medmnist import MedMNIST
from medvlp_bench.datasets.msd import MSD

#: fixtures are 12x10x8: pad_crop to 16^3 keeps every voxel (no resampling), so values can be compared
KW = {"size": 16, "spatial": "pad_crop"}
HIPPO = shared_data() / "msd-hippocampus-cropped"
ADRENAL = shared_data() / "medmnist" / "adrenalmnist3d.npz"


def first(dm, split: str = "train") -> dict:
    return dm.reader()(dm.rows(split)[0])


# ---- MSD --------------------------------------------------------------------------------------------
def test_msd_dataset_json_pairs_classes_and_masks(tmp_path: Path) -> None:
    cases = fw.msd(tmp_path, n=6)
    dm = MSD(str(tmp_path), target="mask", cache_dir=str(tmp_path / "cache"), **KW)
    m = dm.manifest
    assert sorted(m["id"]) == cases  # the ._ resource-fork files are not cases
    assert dm.seg_classes == ["background", "Anterior", "Posterior"]
    assert m["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1}
    s = first(dm)
    assert s["image"].shape == (1, 16, 16, 16) and s["mask"].shape == (1, 16, 16, 16)
    assert np.bincount(s["mask"].ravel()).tolist() == [16**3 - 64, 32, 32]  # label voxels survive padding


def test_msd_without_json_pairs_by_name_and_stacks_nnunet_channels(tmp_path: Path) -> None:
    fw.msd(tmp_path, n=4, with_json=False, channels=2, nnunet=True)
    dm = MSD(
        str(tmp_path), target="mask", in_channels=2, seg_classes=["bg", "a", "p"], intensity={"type": "none"}, **KW
    )
    m = dm.manifest
    assert len(m) == 4 and all(isinstance(p, list) and len(p) == 2 for p in m["path"])
    s = first(dm)
    assert s["image"].shape == (2, 16, 16, 16) and s["image"][1].max() > 1000 > s["image"][0].max()


def test_msd_multimodal_4d_channel_count_checked(tmp_path: Path) -> None:
    fw.msd(tmp_path, n=3, channels=4)
    assert first(MSD(str(tmp_path), in_channels=4, target="mask", **KW))["image"].shape == (4, 16, 16, 16)
    with pytest.raises(DataError, match=r"dataset\.json: lists 4 modalities, the config says in_channels=1"):
        _ = MSD(str(tmp_path), target="mask", **KW).manifest


def test_nan_image_named(tmp_path: Path) -> None:
    fw.msd(tmp_path, n=3)
    bad = fw.volume()
    bad[3, 3, 3] = np.nan
    fw.save_nifti(tmp_path / "imagesTr" / "hippocampus_002.nii.gz", bad)
    dm = MSD(str(tmp_path), target="mask", **KW)
    row = dm.manifest.set_index("id").loc["hippocampus_002"].to_dict() | {"id": "hippocampus_002"}
    with pytest.raises(DataError, match=r"hippocampus_002\.nii\.gz: image contains 1 NaN/Inf value"):
        dm.reader()(row)


def test_corrupt_nifti_skipped_with_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fw.msd(tmp_path, n=4)
    (tmp_path / "labelsTr" / "hippocampus_003.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    dm = MSD(str(tmp_path), target="mask", on_error="skip", **KW)
    assert "hippocampus_003" not in set(dm.manifest["id"]) and len(dm.manifest) == 3
    assert "skipping 1 sample(s)" in caplog.text and "hippocampus_003.nii.gz: cannot read mask file" in caplog.text


# ---- BTCV -------------------------------------------------------------------------------------------
def test_btcv_synapse_layout_transunet_split(tmp_path: Path) -> None:
    cases = fw.btcv(tmp_path)
    dm = BTCV(str(tmp_path), target="mask", intensity={"type": "window", "min": -175, "max": 250}, **KW)
    m = dm.manifest.set_index("id")
    assert sorted(m.index) == cases
    assert set(m.index[m["split"] == "test"]) == {"0001", "0002"}  # TransUNet test cases present here
    assert (m["split"] == "val").sum() == 1 and len(dm.seg_classes) == 14
    s = dm.dataset("test")[0]
    assert float(s["image"].min()) >= 0 and float(s["image"].max()) <= 1  # windowed
    assert set(np.unique(s["mask"].numpy())) == {0, 6, 13}


# ---- BraTS ------------------------------------------------------------------------------------------
def test_brats_2021_remaps_4_to_3_and_finds_misnamed_seg(tmp_path: Path) -> None:
    cases = fw.brats(tmp_path, "2021", n=4)
    dm = BraTS(str(tmp_path), target="mask", **KW)
    m = dm.manifest.set_index("id")
    assert sorted(m.index) == cases and m.loc[cases[-1], "mask_path"].endswith("W39_1998.09.19_Segm.nii")
    s = dm.reader()(m.loc[cases[0]].to_dict() | {"id": cases[0]})
    assert s["image"].shape == (4, 16, 16, 16)
    assert sorted(np.unique(s["mask"]).tolist()) == [0, 1, 2, 3]  # 4 (ET) -> 3


def test_brats_2023_names_and_graded_2018(tmp_path: Path) -> None:
    fw.brats(tmp_path / "gli", "2023", n=3)
    s = first(BraTS(str(tmp_path / "gli"), target="mask", **KW), "train")
    assert sorted(np.unique(s["mask"]).tolist()) == [0, 1, 2, 3]
    fw.brats(tmp_path / "b18", "2018", n=4)
    dm = BraTS(str(tmp_path / "b18"), **KW)
    grades = dm.manifest.set_index("id")["label"]
    assert grades.to_dict() == {
        "BraTS2021_00000": 0.0,
        "BraTS2021_00001": 1.0,
        "BraTS2021_00002": 0.0,
        "BraTS2021_00003": 1.0,
    }
    with pytest.raises(DataError, match="target=label needs HGG/ and LGG/"):
        _ = BraTS(str(tmp_path / "gli"), **KW).manifest


# ---- MedMNIST ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dims,rgb,multilabel,channels,task",
    [
        (3, False, False, 1, "binary"),
        (2, False, False, 1, "binary"),
        (2, True, False, 3, "binary"),
        (2, False, True, 1, "multilabel"),
    ],
)
def test_medmnist_variants(tmp_path: Path, dims: int, rgb: bool, multilabel: bool, channels: int, task: str) -> None:
    fw.medmnist(tmp_path / "toymnist_64.npz", dims=dims, rgb=rgb, multilabel=multilabel)
    dm = MedMNIST(str(tmp_path), flag="toymnist", npz_size=64, size=32, spatial_dims=dims, in_channels=channels)
    assert dm.task_type == task
    assert dm.manifest["split"].value_counts().to_dict() == {"train": 6, "val": 3, "test": 3}
    s = dm.dataset("val")[1]
    assert tuple(s["image"].shape) == (channels, *(32,) * dims) and float(s["image"].min()) >= 0
    assert float(s["image"].max()) <= 1
    with np.load(tmp_path / "toymnist_64.npz") as z:
        raw = z["val_images"][1].astype(np.float32) / 255
    expected = raw[..., 0] if rgb else raw  # channel 0 is red
    crop = s["image"].numpy()[(0, *(slice(2, 30),) * dims)]  # zero-padded 28 -> 32, 2 voxels each side
    np.testing.assert_allclose(crop, expected, atol=1e-6)


def test_medmnist_truncated_npz_named(tmp_path: Path) -> None:
    path = fw.medmnist(tmp_path / "toymnist3d.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"toymnist3d\.npz: .*(truncated or corrupt)"):
        _ = MedMNIST(str(tmp_path), flag="toymnist3d", size=32, spatial_dims=3).manifest


def test_medmnist_missing_file_lists_what_is_there(tmp_path: Path) -> None:
    fw.medmnist(tmp_path / "organmnist3d.npz")
    with pytest.raises(DataError, match=r"adrenalmnist3d\.npz: not found; files here: \['organmnist3d\.npz'\]"):
        _ = MedMNIST(str(tmp_path), flag="adrenalmnist3d", size=32, spatial_dims=3).manifest


# ---- real shared samples ----------------------------------------------------------------------------
@pytest.mark.skipif(
    not ADRENAL.is_file(), reason=f"shared AdrenalMNIST3D sample not at {ADRENAL} (MEDBENCH_SHARED_DATA)"
)
def test_real_adrenalmnist3d(tmp_path: Path) -> None:
    dm = MedMNIST(
        str(ADRENAL.parent),
        name="adrenalmnist3d",
        flag="adrenalmnist3d",
        size=32,
        spatial_dims=3,
        cache_dir=str(tmp_path),
    )
    assert dm.manifest["split"].value_counts().to_dict() == {"train": 1188, "test": 298, "val": 98}
    assert int(dm.labels("train").sum()) == 259  # adrenal masses in the official training split
    for frac in (0.01, 0.1):  # the committed label-fraction lists are what the code draws
        listed = (SPLITS_DIR / "adrenalmnist3d" / f"train_f{frac:g}_s1.txt").read_text().split()
        assert listed == dm.subset_ids(frac, 1)
    s = dm.dataset("test")[0]
    assert tuple(s["image"].shape) == (1, 32, 32, 32) and float(s["image"].max()) <= 1


@pytest.mark.skipif(not HIPPO.is_dir(), reason=f"shared MSD hippocampus sample not at {HIPPO} (MEDBENCH_SHARED_DATA)")
def test_real_msd_hippocampus_and_committed_split(tmp_path: Path) -> None:
    classes = ["background", "anterior", "posterior"]
    kw = {"name": "msd_hippocampus", "size": 64, "spatial": "pad_crop", "seg_classes": classes, "target": "mask"}
    computed = MSD(str(HIPPO), **kw)
    committed = MSD(str(HIPPO), split_file="msd_hippocampus/split.csv", **kw)
    a, b = computed.manifest.set_index("id")["split"], committed.manifest.set_index("id")["split"]
    assert len(a) == 260 and a.equals(b)  # the committed file is what the hash rule gives
    assert a.value_counts().to_dict() == {"train": 182, "val": 39, "test": 39}
    for frac in (0.01, 0.1):
        listed = (SPLITS_DIR / "msd_hippocampus" / f"train_f{frac:g}_s0.txt").read_text().split()
        assert listed == committed.subset_ids(frac, 0)
    s = committed.dataset("val")[0]
    assert tuple(s["image"].shape) == (1, 64, 64, 64) and set(np.unique(s["mask"].numpy())) == {0, 1, 2}


def test_committed_split_files_have_valid_checksums() -> None:
    import hashlib

    for sums in SPLITS_DIR.glob("*/SHA256SUMS"):
        for line in sums.read_text().splitlines():
            digest, name = line.split()
            assert hashlib.sha256((sums.parent / name).read_bytes()).hexdigest() == digest, f"{sums.parent}/{name}"
        split = pd.read_csv(sums.parent / "split.csv")
        assert set(split["split"]) <= {"train", "val", "test"} and split["id"].is_unique
