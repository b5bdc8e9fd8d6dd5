"""Shared helpers for the phantom generators: grids, smooth random fields, irregular blobs, report words.

All geometry works in normalised coordinates: every axis spans [-1, 1] whatever the size, so anatomy and
findings scale with the requested size and a sample is the same patient at every resolution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np


@dataclass
class PhantomSample:
    """One generated study: image, label map, labels, report and JSON-serialisable extras."""

    image: np.ndarray  # float32, [C, H, W] or [C, D, H, W]
    mask: np.ndarray  # uint8 label map, [H, W] or [D, H, W]; 0 = background
    labels: np.ndarray  # float32 multi-hot [K] or int64 class index []
    report: str
    meta: dict = field(default_factory=dict)


def sample_rng(index: int, seed: int, size: int, kind: int) -> np.random.Generator:
    """The sample's own generator, after the size check every generator shares.

    One generator per sample (seeded by seed, index and the generator's ``kind`` tag) makes each sample a pure
    function of (index, seed, size). One minimum size for every kind: the geometry is in normalised units, and
    32 is the smallest size the generators are checked at (tests/test_phantoms.py); below it thin structures
    and small findings would fall under a voxel while the reports still describe them.
    """
    if size < 32:
        raise ValueError("size must be >= 32")
    return np.random.default_rng([int(seed), int(index), int(kind)])


def draw_findings(rng: np.random.Generator, findings: Sequence[str], prevalence: float) -> dict[str, bool]:
    """Which findings the sample has, each independently with probability ``prevalence`` (drawn first, in order,
    so the anatomy can depend on them, e.g. cardiomegaly or splenomegaly)."""
    return {f: bool(rng.random() < prevalence) for f in findings}


def multi_hot(present: dict[str, bool], findings: Sequence[str]) -> np.ndarray:
    """Float32 multi-hot label vector in ``findings`` order: the label layout the phantom datamodule stores."""
    return np.array([present[f] for f in findings], np.float32)


@lru_cache(maxsize=64)
def axis(size: int) -> np.ndarray:
    """Normalised coordinates of the voxel centres along one axis, read-only."""
    a = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    a.flags.writeable = False
    return a


@lru_cache(maxsize=32)
def grids(size: int, ndim: int) -> tuple[np.ndarray, ...]:
    """Sparse (broadcastable, like np.ogrid) normalised grids; full arrays appear only on arithmetic."""
    out = []
    for i in range(ndim):
        shape = [1] * ndim
        shape[i] = size
        out.append(axis(size).reshape(shape))
    return tuple(out)


def voxel(size: int) -> float:
    """Spacing of the normalised grid: the smallest feature that is still visible."""
    return 2.0 / (size - 1)


def coords(index: Sequence[int], size: int) -> tuple[float, ...]:
    """Normalised coordinates of a voxel index (e.g. a picked lesion seat) for :func:`blob` centres."""
    return tuple(float(axis(size)[i]) for i in index)


def nearest_voxel(c: Sequence[float] | np.ndarray, size: int) -> tuple[int, ...]:
    """Nearest voxel index of a normalised point (the inverse of :func:`coords`), clipped to the volume."""
    return tuple(int(i) for i in np.clip(np.round((np.asarray(c) + 1) * (size - 1) / 2), 0, size - 1))


@lru_cache(maxsize=64)
def _upsampler(n_out: int, n_cells: int) -> np.ndarray:
    """Row-normalised Gaussian interpolation matrix from n_cells random nodes to n_out samples."""
    nodes = np.linspace(-1.2, 1.2, n_cells)
    width = 2.4 / max(n_cells - 1, 1)
    w = np.exp(-0.5 * ((axis(n_out)[:, None] - nodes[None, :]) / width) ** 2)
    w /= np.sqrt((w**2).sum(1, keepdims=True))  # unit variance for unit-variance nodes
    return w.astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int | Sequence[int]) -> np.ndarray:
    """Smooth zero-mean, ~unit-variance random field: low-res noise upsampled separably (fast in 3D)."""
    cells = [cells] * len(shape) if isinstance(cells, int) else list(cells)
    # einsum (not matmul): multi-threaded BLAS is pathologically slow for these thin products on small boxes
    f = rng.standard_normal(cells).astype(np.float32)
    f = np.einsum("...j,ij->...i", f, _upsampler(shape[-1], cells[-1]))
    for ax in range(len(shape) - 2, -1, -1):  # last axis outwards, always contiguous
        f = f.reshape(int(np.prod(cells[:ax])), cells[ax], -1)
        f = np.einsum("ij,bjk->bik", _upsampler(shape[ax], cells[ax]), f).reshape(*cells[:ax], *shape[ax:])
    return f


@lru_cache(maxsize=1)
def _normal_lut() -> np.ndarray:
    from scipy.special import ndtri

    return ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)


def fast_normal(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Standard normal noise via 16-bit quantile lookup: ~3x faster than standard_normal for image noise."""
    n = int(np.prod(shape))
    return _normal_lut()[np.frombuffer(rng.bytes(2 * n), np.uint16)].reshape(tuple(shape))


def bbox(center: Sequence[float], extent: Sequence[float], size: int) -> tuple[slice, ...]:
    """Index slices of the box center +- extent (normalised units), clipped to the volume."""
    out = []
    for c, e in zip(center, extent):
        lo = int(np.floor((c - e + 1.0) * (size - 1) / 2.0))
        hi = int(np.ceil((c + e + 1.0) * (size - 1) / 2.0)) + 1
        out.append(slice(min(max(lo, 0), size), min(max(hi, 0), size)))
    return tuple(out)


def blob(
    rng: np.random.Generator,
    size: int,
    center: Sequence[float],
    radii: Sequence[float],
    irregularity: float = 0.0,
    angle: float = 0.0,
    n_waves: int = 4,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Normalised distance (< 1 inside) of an irregular ellipse/ellipsoid, computed only in its box.

    A few random plane waves perturb the distance so every lesion or organ gets its own lumpy
    outline; `angle` rotates the last two axes (in-plane tilt). Returns (box slices, distance).
    """
    ndim = len(center)
    reach = max(radii) * (1.0 + 2.0 * irregularity) + voxel(size)
    ext = [
        reach if (angle and i >= ndim - 2) else r * (1.0 + 2.0 * irregularity) + voxel(size)
        for i, r in enumerate(radii)
    ]
    sl = bbox(center, ext, size)
    local = []
    for i in range(ndim):
        shape = [1] * ndim
        shape[i] = -1
        local.append((axis(size)[sl[i]] - np.float32(center[i])).reshape(shape))
    if angle:
        ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        a, b = local[-2], local[-1]
        local[-2], local[-1] = ca * a + sa * b, -sa * a + ca * b
    u = [loc / np.float32(r) for loc, r in zip(local, radii)]
    d = np.sqrt(sum(x * x for x in u))
    if irregularity:
        wave = 0.0
        for _ in range(n_waves):
            k = rng.normal(0.0, 1.0, ndim)
            k *= rng.uniform(1.5, 3.5) / np.linalg.norm(k)
            wave = wave + np.sin(sum(np.float32(kk) * x for kk, x in zip(k, u)) + rng.uniform(0, 2 * np.pi))
        d = d * (1.0 + np.float32(irregularity / np.sqrt(n_waves)) * wave)
    return sl, np.broadcast_to(d, tuple(s.stop - s.start for s in sl)).astype(np.float32)


def pick_voxel(rng: np.random.Generator, candidates: np.ndarray) -> tuple[int, ...] | None:
    """A random True position of a boolean array (None when empty); used to seat lesions in organs."""
    flat = np.flatnonzero(candidates)
    if flat.size == 0:
        return None
    return tuple(int(i) for i in np.unravel_index(flat[rng.integers(flat.size)], candidates.shape))


def slices_with(mask: np.ndarray) -> list[int]:
    """Axial (axis 0) indices where a 3D boolean mask is non-empty."""
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1)).tolist()


def choose(rng: np.random.Generator, options: Sequence[str]) -> str:
    """Uniform phrase choice from the sample's own generator (keeps reports deterministic)."""
    return options[int(rng.integers(len(options)))]


def size_word(value: float, small_max: float, moderate_max: float) -> str:
    """Size word decided by measured thresholds, so the report size agrees with the pixels."""
    return "small" if value < small_max else "moderate" if value < moderate_max else "large"


def side_word(x: float) -> str:
    """Laterality in radiological convention: image left (x < 0) is the patient's right."""
    return "right" if x < 0 else "left"


def sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def format_report(findings: list[str], impression: list[str]) -> str:
    """Two-section report in the usual 'FINDINGS: ... IMPRESSION: ...' layout."""
    return (
        "FINDINGS: "
        + " ".join(sentence(s) for s in findings)
        + " IMPRESSION: "
        + " ".join(sentence(s) for s in impression)
    )


def negations(
    rng: np.random.Generator, table: dict[str, Sequence[str]], present: dict[str, bool], p: float
) -> list[str]:
    """A random negation sentence for each absent finding, each kept with probability ``p``: real reports deny
    only some of what is absent, so a missing negation must not imply a finding."""
    return [choose(rng, table[f]) for f, on in present.items() if not on and rng.random() < p]


def finish_report(rng: np.random.Generator, sentences: list[str], impression: list[str], normal: Sequence[str]) -> str:
    """Shuffle the findings sentences (order carries no label), fall back to a random normal impression when
    nothing is found, and lay the report out with :func:`format_report`."""
    rng.shuffle(sentences)
    return format_report(sentences, impression or [choose(rng, normal)])


def benchmark(fn: Callable[..., PhantomSample], n: int = 20, **kwargs) -> float:
    """Mean seconds per generated sample (after one warm-up call that fills the caches)."""
    fn(0, **kwargs)
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        fn(i, **kwargs)
    return (time.perf_counter() - t0) / n
