"""Reading one manifest row into fixed-size arrays with MONAI readers and dict transforms, cached on disk.

``FileReader`` is the picklable ``reader()`` of every file-based adapter: it picks MONAI's Pydicom, Nibabel or
PIL reader by suffix (a folder is a DICOM series), builds masks from a mask file, RSNA boxes or SIIM RLE,
applies the spatial preprocessing (orientation, resize / pad-crop) and stores the result in ``<cache_dir>/data/
<dataset>/``, keyed by the preprocessing settings and each source file's path, size and mtime (a changed file or
setting is a new key; MONAI's PersistentDataset keys by the data dict instead, which misses edited files).
Intensity transforms run after the cache, so changing a window does not invalidate it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.transforms import (
    Compose,
    LoadImage,
    NormalizeIntensityd,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
)

from ._errors import DataError

#: MONAI logs "nvImageCodec is not available" each time a LoadImage is built on a machine without the GPU
#: DICOM decoder: once per file read, never actionable. Silenced here, where every file is read, so that
#: ``medbench data check``, runs, DataLoader workers and library use all stay quiet (a level set earlier wins).
MONAI_NOISE = "monai.data.nvimgcodec_pydicom_plugin"
if logging.getLogger(MONAI_NOISE).level == logging.NOTSET:
    logging.getLogger(MONAI_NOISE).setLevel(logging.ERROR)

#: bump when the reading or preprocessing code changes, so stale caches are not reused
CACHE_VERSION = "1"
DICOM_SUFFIXES = (".dcm", ".dicom", "")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def file_kind(path: str) -> str:
    """``dicom`` | ``nifti`` | ``pil`` by suffix; a folder is a DICOM series."""
    low = path.lower()
    if os.path.isdir(path) or low.endswith(".dcm") or low.endswith(".dicom"):
        return "dicom"
    if low.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if low.endswith(IMAGE_SUFFIXES):
        return "pil"
    return "dicom"  # DICOM files often have no suffix (e.g. CT.1.2.840....)


class CXRDicomReader(PydicomReader):
    """MONAI's PydicomReader that also inverts MONOCHROME1 images (white = air) so every CXR has bright bones."""

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        data = super()._get_array_data(img, filename)
        if str(getattr(img, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            data = data.max() - data
        return data


def boxes_to_mask(boxes: list[list[float]], shape: tuple[int, int]) -> np.ndarray:
    """RSNA boxes ``[x, y, width, height]`` (pixels, x = column) -> a binary ``(rows, cols)`` mask."""
    mask = np.zeros(shape, np.uint8)
    for x, y, w, h in boxes:
        r0, c0 = max(int(round(y)), 0), max(int(round(x)), 0)
        mask[r0 : int(round(y + h)), c0 : int(round(x + w))] = 1
    return mask


def rle_to_mask(rles: list[str], shape: tuple[int, int], relative: bool = True) -> np.ndarray:
    """SIIM-ACR RLE strings -> binary ``(rows, cols)`` mask; ``-1`` means empty.

    The pixel order is column-major (the competition's ``mask.reshape(width, height).T``). ``relative``: each
    start counts from the end of the previous run (``train-rle.csv``); else 1-based absolute starts (stage 2).
    """
    rows, cols = shape
    flat = np.zeros(rows * cols, np.uint8)
    for rle in rles:
        nums = [int(v) for v in str(rle).split()]
        if nums in ([], [-1]):
            continue
        if len(nums) % 2:
            raise ValueError(f"RLE has an odd number of values ({len(nums)})")
        pos = 0
        for start, length in zip(nums[0::2], nums[1::2]):
            pos = pos + start if relative else start - 1
            if pos < 0 or pos + length > flat.size:
                raise ValueError(f"RLE run {start} {length} outside a {rows}x{cols} image")
            flat[pos : pos + length] = 1
            if relative:
                pos += length
    return flat.reshape(cols, rows).T


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """[C, ...] -> [channels, ...]: RGB(A) to grey by the mean of RGB, grey to RGB by repetition."""
    c = image.shape[0]
    if c == channels:
        return image
    if channels == 1 and c in (3, 4):
        return image[:3].mean(0, keepdims=True)
    if c == 1:
        return np.repeat(image, channels, 0)
    raise ValueError(f"image has {c} channels, the config asks for in_channels={channels}")


@dataclass(frozen=True)
class Preprocess:
    """Spatial preprocessing settings; part of the cache key."""

    spatial_dims: int
    size: int
    channels: int = 1
    spatial: str = "resize"  # resize | pad_crop | longest_pad
    roi: tuple[int, ...] | None = None
    orientation: str | None = None

    def __post_init__(self) -> None:
        if self.spatial not in ("resize", "pad_crop", "longest_pad"):
            raise ValueError(f"spatial must be resize, pad_crop or longest_pad, got {self.spatial!r}")
        if self.roi is not None and len(self.roi) != self.spatial_dims:
            raise ValueError(f"roi {list(self.roi)} must have {self.spatial_dims} values")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.roi) if self.roi else (self.size,) * self.spatial_dims

    def transforms(self, keys: list[str]) -> Compose:
        interp = "area" if self.spatial_dims == 2 else "trilinear"
        modes = [interp if k == "image" else "nearest" for k in keys]
        out: list[Callable] = []
        if self.orientation and self.spatial_dims == 3:
            out.append(Orientationd(keys=keys, axcodes=self.orientation, labels=None))
        if self.spatial == "resize":
            out.append(Resized(keys=keys, spatial_size=self.shape, mode=modes))
        elif self.spatial == "longest_pad":
            out.append(Resized(keys=keys, spatial_size=max(self.shape), size_mode="longest", mode=modes))
        if self.spatial in ("pad_crop", "longest_pad"):
            out.append(ResizeWithPadOrCropd(keys=keys, spatial_size=self.shape))
        return Compose(out)


def intensity_transforms(spec: dict[str, Any]) -> list[Callable]:
    """``scale`` (per-image min-max to [0, 1]), ``window`` (min/max clipped to [0, 1]), ``zscore`` (per channel,
    ``nonzero`` optional), ``divide`` (by ``value``), ``none``."""
    kind = spec.get("type", "scale")
    if kind == "scale":
        return [ScaleIntensityd(keys="image", minv=0.0, maxv=1.0, channel_wise=True)]
    if kind == "window":
        lo, hi = float(spec["min"]), float(spec["max"])
        return [ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)]
    if kind == "zscore":
        return [NormalizeIntensityd(keys="image", nonzero=bool(spec.get("nonzero", True)), channel_wise=True)]
    if kind == "divide":
        v = float(spec.get("value", 255.0))
        return [ScaleIntensityRanged(keys="image", a_min=0.0, a_max=v, b_min=0.0, b_max=1.0)]
    if kind == "none":
        return []
    raise ValueError(f"intensity type must be scale, window, zscore, divide or none, got {kind!r}")


def _stat(path: str) -> list[Any]:
    st = os.stat(path)
    extra = len(os.listdir(path)) if os.path.isdir(path) else 0
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, extra]


class FileReader:
    """Picklable manifest row -> ``{"image": float32 [C, *S], "label", "report", "mask": int64 [1, *S]}``."""

    def __init__(
        self,
        dataset: str,
        prep: Preprocess,
        with_mask: bool = False,
        cache_dir: str | None = None,
        label_map: dict[int, int] | None = None,
        n_seg_classes: int | None = None,
        rle_relative: bool = True,
    ) -> None:
        self.dataset, self.prep, self.with_mask = dataset, prep, with_mask
        self.cache = Path(cache_dir) / "data" / dataset if cache_dir else None
        self.label_map, self.n_seg_classes, self.rle_relative = label_map, n_seg_classes, rle_relative

    # ---- public ---------------------------------------------------------------------------------
    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        image, mask = self.arrays(row)
        where = _paths(row["path"])[0]
        if not np.isfinite(image).all():
            raise DataError(where, f"image contains {int((~np.isfinite(image)).sum())} NaN/Inf value(s)")
        out: dict[str, Any] = {"image": image.astype(np.float32), "label": row.get("label")}
        if isinstance(row.get("report"), str):
            out["report"] = row["report"]
        if self.with_mask:
            if mask is None:
                raise DataError(where, "no mask for this sample (target=mask)")
            out["mask"] = mask.astype(np.int64)
        return out

    def arrays(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed (image, mask), from the cache when the sources and settings are unchanged."""
        try:
            key = self._key(row) if self.cache else None
        except FileNotFoundError as e:
            raise DataError(e.filename, "file not found") from None
        if key is not None and (hit := self._cache_get(key)) is not None:
            return hit
        image, mask = self._load(row)
        if key is not None:
            self._cache_put(key, image, mask)
        return image, mask

    # ---- loading --------------------------------------------------------------------------------
    def _load(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        paths = _paths(row["path"])
        data: dict[str, Any] = {"image": self._read(paths)}
        data["image"] = _as_meta(to_channels(np.asarray(data["image"]), self.prep.channels), data["image"])
        if self.with_mask:
            spatial = tuple(data["image"].shape[1:])
            try:
                mask = self._mask(row, spatial)
            except ValueError as e:
                raise DataError(row.get("mask_path") or paths[0], f"bad mask: {e}") from None
            if mask is not None:
                data["mask"] = mask
        keys = [k for k in ("image", "mask") if k in data]
        try:
            data = self.prep.transforms(keys)(data)
        except Exception as e:  # noqa: BLE001 - any MONAI failure becomes an error naming the file
            raise DataError(paths[0], f"preprocessing failed: {type(e).__name__}: {e}") from None
        image = np.asarray(data["image"], dtype=np.float32)
        mask = np.asarray(data["mask"]).round().astype(np.int16) if "mask" in data else None
        return image, mask

    def _read(self, paths: list[str], is_mask: bool = False) -> Any:
        kind = file_kind(paths[0])
        readers = {
            "dicom": lambda: CXRDicomReader(swap_ij=self.prep.spatial_dims == 3),
            "nifti": NibabelReader,
            "pil": lambda: PILReader(reverse_indexing=False),
        }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # MONAI warns per file about missing DICOM orientation tags
                img = LoadImage(reader=readers[kind](), image_only=True, ensure_channel_first=True)(
                    paths if len(paths) > 1 else paths[0]
                )
        except Exception as e:  # noqa: BLE001 - corrupt/truncated files raise anything from deep in a reader
            what = "mask" if is_mask else kind.upper() if kind != "pil" else "image"
            raise DataError(paths[0], f"cannot read {what} file ({type(e).__name__}: {e})") from None
        if img.ndim != self.prep.spatial_dims + 1:
            raise DataError(paths[0], f"has shape {tuple(img.shape[1:])}, expected a {self.prep.spatial_dims}D image")
        return img

    def _mask(self, row: dict[str, Any], spatial: tuple[int, ...]) -> Any:
        if isinstance(row.get("mask_path"), str):
            mask = self._read([row["mask_path"]], is_mask=True)
            if tuple(mask.shape[1:]) != spatial:
                raise ValueError(f"mask shape {tuple(mask.shape[1:])} differs from the image's {spatial}")
            if mask.shape[0] != 1:
                raise ValueError(f"mask has {mask.shape[0]} channels, expected one label map")
        elif row.get("boxes") is not None:
            mask = _as_meta(boxes_to_mask(row["boxes"], spatial)[None], None)
        elif row.get("rle") is not None:
            mask = _as_meta(rle_to_mask(row["rle"], spatial, self.rle_relative)[None], None)
        else:
            return None
        arr = np.asarray(mask).round().astype(np.int64)
        if arr.size and arr.min() < 0:
            raise ValueError(f"negative label values {np.unique(arr[arr < 0]).tolist()}")
        if self.label_map and arr.size:
            lut = np.arange(max(int(arr.max()), *map(int, self.label_map)) + 1)
            for k, v in self.label_map.items():
                lut[int(k)] = int(v)
            arr = lut[arr]
        if self.n_seg_classes and arr.size and arr.max() >= self.n_seg_classes:
            raise ValueError(f"label values {np.unique(arr).tolist()} outside 0..{self.n_seg_classes - 1}")
        return _as_meta(arr, mask)

    # ---- cache ----------------------------------------------------------------------------------
    def _key(self, row: dict[str, Any]) -> str:
        sources = [_stat(p) for p in _paths(row["path"])]
        if self.with_mask and isinstance(row.get("mask_path"), str):
            sources.append(_stat(row["mask_path"]))
        blob = {
            "v": CACHE_VERSION,
            "prep": asdict(self.prep),
            "mask": self.with_mask,
            "label_map": self.label_map,
            "rle_relative": self.rle_relative,
            "src": sources,
            "boxes": row.get("boxes") if self.with_mask else None,
            "rle": row.get("rle") if self.with_mask else None,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()

    def _cache_file(self, key: str) -> Path:
        assert self.cache is not None
        return self.cache / key[:2] / f"{key}.npz"

    def _cache_get(self, key: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        path = self._cache_file(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                return z["image"].astype(np.float32), (z["mask"] if "mask" in z.files else None)
        except (OSError, ValueError, KeyError):  # a damaged cache entry is rebuilt, not fatal
            return None

    def _cache_put(self, key: str, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Atomic write (temp file + rename): concurrent workers may write the same key."""
        path = self._cache_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        small = np.abs(image).max(initial=0) < 6e4  # float16 halves the cache; fall back where it would overflow
        arrays = {"image": image.astype(np.float16 if small else np.float32)}
        if mask is not None:
            arrays["mask"] = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int16)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _paths(path: Any) -> list[str]:
    return [str(p) for p in path] if isinstance(path, list | tuple | np.ndarray) else [str(path)]


def _as_meta(array: np.ndarray, like: Any) -> Any:
    """Wrap a numpy array as a MetaTensor carrying ``like``'s affine, so Orientationd treats image and mask alike."""
    from monai.data import MetaTensor

    meta = dict(like.meta) if like is not None and hasattr(like, "meta") else {}
    return MetaTensor(np.ascontiguousarray(array), meta=meta)
