"""Label-fraction subsets, splits and the phantom datamodule's loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp_bench.data import label_fraction_subset, stratify_keys, subset_checksum
from medvlp_bench.datasets.phantoms import PhantomDataModule


def _multilabel(n: int, k: int = 4, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"s{i:04d}" for i in range(n)], (rng.random((n, k)) < 0.3).astype(np.float32)


def test_subset_deterministic_and_order_independent() -> None:
    ids, y = _multilabel(500)
    a = label_fraction_subset("ds", ids, y, 0.1, seed=3)
    perm = np.random.default_rng(1).permutation(len(ids))
    b = label_fraction_subset("ds", [ids[i] for i in perm], y[perm], 0.1, seed=3)
    assert a == b and a == sorted(a)
    assert label_fraction_subset("ds", ids, y, 0.1, seed=4) != a  # the seed matters
    assert label_fraction_subset("other", ids, y, 0.1, seed=3) != a  # so does the dataset name


def test_subset_size_and_stratification_multiclass() -> None:
    ids = [f"x{i}" for i in range(1000)]
    y = np.array([0] * 700 + [1] * 200 + [2] * 100)
    sub = set(label_fraction_subset("ds", ids, y, 0.1, seed=0))
    assert len(sub) == 100
    counts = [sum(1 for i in sub if y[int(i[1:])] == c) for c in range(3)]
    assert counts == [70, 20, 10]


def test_subset_covers_every_class_at_tiny_fractions() -> None:
    ids, y = _multilabel(300, k=5, seed=2)
    sub = label_fraction_subset("ds", ids, y, 0.01, seed=0)
    idx = [ids.index(i) for i in sub]
    assert (y[idx].max(0) == 1).all() and (y[idx].min(0) == 0).all()
    assert len(sub) <= 3 + 2 * 5  # target plus at most one addition per class side


def test_full_fraction_returns_everything_and_bad_fraction_fails() -> None:
    ids, y = _multilabel(20)
    assert label_fraction_subset("ds", ids, y, 1.0, 0) == sorted(ids)
    with pytest.raises(ValueError, match="label fraction"):
        label_fraction_subset("ds", ids, y, 0.0, 0)


def test_stratify_keys_and_checksum() -> None:
    assert stratify_keys(np.array([2, 0])) == ["2", "0"]
    assert stratify_keys(np.array([[1, 0], [0, 1]])) == ["10", "01"]
    assert subset_checksum(["b", "a"]) == subset_checksum(["a", "b"])


@pytest.fixture(scope="module")
def cxr(tmp_path_factory: pytest.TempPathFactory) -> PhantomDataModule:
    cache = tmp_path_factory.mktemp("cache")
    return PhantomDataModule("cxr", size=48, n_train=40, n_val=10, n_test=10, cache_dir=str(cache), batch_size=8)


def test_phantom_splits_are_disjoint_and_sized(cxr: PhantomDataModule) -> None:
    m = cxr.manifest
    sets = {s: set(m.loc[m.split == s, "id"]) for s in ("train", "val", "test")}
    assert {k: len(v) for k, v in sets.items()} == {"train": 40, "val": 10, "test": 10}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["test"] == {f"cxr-{i:06d}" for i in range(10)}  # test = first indices, stable when n_train grows


def test_phantom_loaders(cxr: PhantomDataModule) -> None:
    batch = next(iter(cxr.loader("train", train=True)))
    assert batch["image"].shape == (8, 1, 48, 48) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8, 5) and isinstance(batch["report"][0], str)
    test = cxr.loader("test")
    ids = [i for b in test for i in b["id"]]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 10  # every test sample once, in order


def test_phantom_cache_is_reused(cxr: PhantomDataModule, tmp_path: Path) -> None:
    folder = cxr.folder
    mtime = (folder / "images.npy").stat().st_mtime
    again = PhantomDataModule("cxr", size=48, n_train=40, n_val=10, n_test=10, cache_dir=str(folder.parents[1]))
    assert again.folder == folder and len(again.manifest) == 60
    assert (folder / "images.npy").stat().st_mtime == mtime


def test_phantom_masks_for_segmentation(tmp_path: Path) -> None:
    dm = PhantomDataModule(
        "ct", size=32, n_train=4, n_val=2, n_test=2, cache_dir=str(tmp_path), target="mask", batch_size=2
    )
    b = next(iter(dm.loader("train", train=True)))
    assert b["image"].shape == (2, 1, 32, 32, 32) and b["mask"].shape == (2, 1, 32, 32, 32)
    assert float(b["image"].min()) >= 0.0 and float(b["image"].max()) <= 1.0  # CT window applied
    assert set(torch.unique(b["mask"]).tolist()) <= set(range(len(dm.seg_classes)))


def test_phantom_rejects_inconsistent_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        PhantomDataModule("mri", size=32, n_train=2, n_val=1, n_test=1, cache_dir=str(tmp_path), spatial_dims=2)
    with pytest.raises(ValueError, match="unknown phantom kind"):
        PhantomDataModule("pet", size=32, n_train=2, n_val=1, n_test=1, cache_dir=str(tmp_path))


def test_batch_augment_keeps_shapes_and_mask_labels() -> None:
    from medvlp_bench.augment import BatchAugment

    torch.manual_seed(0)
    img = torch.rand(3, 1, 20, 24, 28)
    mask = torch.randint(0, 3, (3, 1, 20, 24, 28))
    out = BatchAugment(prob=1.0)({"image": img, "mask": mask, "id": ["a", "b", "c"]})
    assert out["image"].shape == img.shape and out["mask"].shape == mask.shape
    assert set(torch.unique(out["mask"]).tolist()) <= {0, 1, 2} and out["id"] == ["a", "b", "c"]
    assert not torch.allclose(out["image"], img)
    same = BatchAugment(rotate=0, scale=0, shift=0, intensity=0, noise=0)({"image": img})
    assert torch.allclose(same["image"], img, atol=1e-5)  # identity parameters change nothing
