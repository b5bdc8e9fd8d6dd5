"""Behaviour of the phantom generators: determinism, shapes, report/label/mask agreement, visible findings."""

from __future__ import annotations

import importlib
import json
import re
import sys
import types
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

_DATASETS = Path(__file__).resolve().parents[1] / "datasets"
_PKG = "_phantom_datasets_under_test"


def _load(name: str) -> types.ModuleType:
    """Import datasets/<name>.py by file path (no install needed, package __init__ not executed)."""
    if _PKG not in sys.modules:
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [str(_DATASETS)]
        sys.modules[_PKG] = pkg
    return importlib.import_module(f"{_PKG}.{name}")


cxr, ct, mri = _load("phantom_cxr"), _load("phantom_ct"), _load("phantom_mri")

# --- a tiny report checker: sentences, split further at "without" (the tail of which is negated) ---
_NEG = re.compile(r"\b(no|not|without|normal|negative)\b", re.I)


def _clauses(report: str) -> list[tuple[str, bool]]:
    text = report.replace("FINDINGS:", " ").replace("IMPRESSION:", " ").strip()
    out = []
    for sent in re.split(r"(?<=\.)\s+", text):  # "2.5 cm" has no space after its dot
        head, *tails = re.split(r"\bwithout\b", sent, flags=re.I)
        out.append((head, bool(_NEG.search(head))))
        out.extend((t, True) for t in tails)
    return out


def _mentions(report: str, words: tuple[str, ...]) -> tuple[bool, bool]:
    """(mentioned in a non-negated clause, mentioned at all)."""
    hits = [neg for clause, neg in _clauses(report) if any(w.lower() in clause.lower() for w in words)]
    return (not all(hits)) if hits else False, bool(hits)


@cache
def _batch(kind: str, n: int, size: int) -> tuple:
    mod = {"cxr": cxr, "ct": ct, "mri": mri}[kind]
    return tuple(mod.generate(i, seed=3, size=size) for i in range(n))


@pytest.mark.parametrize("mod,size", [(cxr, 64), (ct, 32), (mri, 32)])
def test_deterministic_and_index_dependent(mod, size):
    a, b, c = mod.generate(5, seed=1, size=size), mod.generate(5, seed=1, size=size), mod.generate(6, 1, size)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.labels, b.labels) and a.report == b.report and a.meta == b.meta
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, mod.generate(5, seed=2, size=size).image)


@pytest.mark.parametrize(
    "mod,size,shape,n_labels",
    [
        (cxr, 128, (1, 128, 128), 5),
        (cxr, 97, (1, 97, 97), 5),
        (ct, 64, (1, 64, 64, 64), 4),
        (ct, 37, (1, 37, 37, 37), 4),
        (mri, 64, (4, 64, 64, 64), None),
        (mri, 37, (4, 37, 37, 37), None),
    ],
)
def test_shapes_dtypes_finite(mod, size, shape, n_labels):
    for i in range(3):
        s = mod.generate(i, size=size)
        assert s.image.shape == shape and s.image.dtype == np.float32 and np.isfinite(s.image).all()
        assert s.mask.shape == shape[1:] and s.mask.dtype == np.uint8
        if n_labels is None:
            assert s.labels.shape == () and s.labels.dtype == np.int64
            assert 0 <= int(s.labels) < len(mri.CLASSES)
        else:
            assert s.labels.shape == (n_labels,) and s.labels.dtype == np.float32
        assert s.report.startswith("FINDINGS:") and "IMPRESSION:" in s.report
        assert int(s.mask.max()) < len(mod.SEG_CLASSES)
    if mod is cxr:
        assert s.image.min() >= 0.0 and s.image.max() <= 1.0
    if mod is mri:
        assert s.image.min() >= 0.0 and np.percentile(s.image, 99.9) < 1.5


@pytest.mark.parametrize("mod,kind,size", [(cxr, "cxr", 64), (ct, "ct", 32)])
def test_reports_match_multilabels(mod, kind, size):
    for s in _batch(kind, 200, size)[:60]:
        for j, f in enumerate(mod.FINDINGS):
            positive, _ = _mentions(s.report, mod.SYNONYMS[f])
            assert positive == bool(s.labels[j]), (f, s.labels, s.report)


def test_mri_reports_match_class():
    for s in _batch("mri", 150, 32)[:60]:
        c, r = int(s.labels), s.report
        flat = re.sub("non-enhancing", "NONENH", r, flags=re.I)
        assert _mentions(r, mri.SYNONYMS["tumor"])[0] == (c > 0), r
        assert _mentions(flat, mri.SYNONYMS["enhancing"])[0] == (c == 2), r
        assert _mentions(r, mri.SYNONYMS["low_grade_glioma"])[1] == (c == 1), r
        assert _mentions(r, mri.SYNONYMS["high_grade_glioma"])[1] == (c == 2), r
        assert ("NONENH" in flat) == (c == 1), r
        if c == 0:
            assert "No intracranial mass." in r


@pytest.mark.parametrize("size", [64, 97])
def test_cxr_masks_match_labels(size):
    samples = _batch("cxr", 200, 64) if size == 64 else [cxr.generate(i, size=size) for i in range(25)]
    for s in samples:
        for f in ("consolidation", "effusion", "nodule", "pneumothorax"):
            assert (s.mask == cxr.SEG_CLASSES.index(f)).any() == bool(s.labels[cxr.FINDINGS.index(f)])
        if s.labels[cxr.FINDINGS.index("cardiomegaly")]:
            assert s.meta["cardiothoracic_ratio"] > 0.55
        else:
            assert s.meta["cardiothoracic_ratio"] < 0.52


@pytest.mark.parametrize("size", [32, 37])
def test_ct_masks_and_slices(size):
    samples = _batch("ct", 200, 32) if size == 32 else [ct.generate(i, size=size) for i in range(15)]
    for s in samples:
        assert {1, 2, 3} <= set(np.unique(s.mask).tolist())
        lesion = s.mask == 4
        assert lesion.any() == bool(s.labels[0] or s.labels[1])
        fs = s.meta["finding_slices"]
        for j, f in enumerate(ct.FINDINGS):
            assert (f in fs) == bool(s.labels[j])
        union = sorted(set(fs.get("liver_lesion", [])) | set(fs.get("kidney_lesion", [])))
        assert union == np.flatnonzero(lesion.any(axis=(1, 2))).tolist()
        if "splenomegaly" in fs:
            assert fs["splenomegaly"] == np.flatnonzero((s.mask == 2).any(axis=(1, 2))).tolist()


@pytest.mark.parametrize("size", [32, 37])
def test_mri_masks_and_slices(size):
    samples = _batch("mri", 150, 32) if size == 32 else [mri.generate(i, size=size) for i in range(12)]
    for s in samples:
        c, present = int(s.labels), set(np.unique(s.mask).tolist())
        assert present == {0: {0}, 1: {0, 1, 2}, 2: {0, 1, 2, 3}}[c]
        fs = s.meta["finding_slices"]
        assert bool(fs) == (c > 0)
        if c:
            assert fs["tumor"] == np.flatnonzero((s.mask > 0).any(axis=(1, 2))).tolist()
            for k, name in enumerate(mri.SEG_CLASSES[1:], 1):
                assert fs.get(name, []) == np.flatnonzero((s.mask == k).any(axis=(1, 2))).tolist()


def test_prevalences_and_class_balance():
    for kind, size in (("cxr", 64), ("ct", 32)):
        prev = np.mean([s.labels for s in _batch(kind, 200, size)], axis=0)
        assert ((prev > 0.15) & (prev < 0.45)).all(), (kind, prev)
    frac = np.bincount([int(s.labels) for s in _batch("mri", 150, 32)], minlength=3) / 150
    assert (frac > 0.2).all() and (frac < 0.47).all(), frac


def test_cxr_findings_visible():
    """Nodules, consolidation and effusion are brighter, pneumothorax darker than the lung around them."""
    diffs: dict[str, list[float]] = {f: [] for f in ("consolidation", "effusion", "nodule", "pneumothorax")}
    for i, s in enumerate(_batch("cxr", 200, 64)[:120]):
        lung = cxr.anatomy_masks(i, seed=3, size=64)["lungs"]
        for f in diffs:
            m = s.mask == cxr.SEG_CLASSES.index(f)
            if m.any():
                ring = ndi.binary_dilation(m, iterations=3) & ~ndi.binary_dilation(m) & (s.mask == 0) & lung
                if ring.sum() >= 3:
                    diffs[f].append(float(s.image[0][m].mean() - s.image[0][ring].mean()))
    for f, sign in (("consolidation", 1), ("effusion", 1), ("nodule", 1), ("pneumothorax", -1)):
        d = sign * np.array(diffs[f])
        assert len(d) >= 10 and np.median(d) > 0.03 and (d > 0).mean() >= 0.9, (f, np.round(d, 3))


def test_ct_findings_visible():
    liver_gap, kidney_gap, spleen = [], [], {0: [], 1: []}
    for s in _batch("ct", 30, 64):
        img, les = s.image[0], s.mask == 4
        if s.labels[0] and not s.labels[1]:
            liver_gap.append(img[s.mask == 1].mean() - img[les].mean())
        if s.labels[1] and not s.labels[0]:
            kidney_gap.append(img[s.mask == 3].mean() - img[les].mean())
    for s in _batch("ct", 200, 32):
        spleen[int(s.labels[2])].append(s.meta["spleen_length_cm"])
    assert len(liver_gap) >= 3 and min(liver_gap) > 5 and np.median(liver_gap) > 15, liver_gap
    assert len(kidney_gap) >= 3 and min(kidney_gap) > 10, kidney_gap
    assert min(spleen[1]) > max(spleen[0])


def test_mri_tumour_contrast():
    """Enhancing rim: t1ce/t1 well above the mirrored normal side; LGG core does not enhance; FLAIR oedema."""
    for s in _batch("mri", 24, 64):
        c, img, m = int(s.labels), s.image, s.mask
        if not c:
            continue
        core = m == (3 if c == 2 else 1)
        mirror = np.flip(core, 2) & (m == 0)
        t1ce, t1 = (img[ch][core].mean() / img[ch][mirror].mean() for ch in (1, 0))
        enh = t1ce / t1
        assert (enh > 1.3) if c == 2 else (enh < 1.2), (c, enh)
        oedema = m == 2
        assert img[3][oedema].mean() > img[3][np.flip(oedema, 2) & (m == 0)].mean() + 0.15


def test_meta_is_json_and_laterality_matches_pixels():
    """Meta serialises; the reported side is where the mask is (image left = patient right)."""
    for s in _batch("cxr", 200, 64)[:60] + _batch("ct", 30, 64) + _batch("mri", 24, 64):
        json.dumps(s.meta)
    for s in _batch("cxr", 200, 64)[:60]:
        m = s.mask == cxr.SEG_CLASSES.index("nodule")
        if m.any():
            side = "right" if np.nonzero(m)[1].mean() < 32 else "left"
            assert s.meta["findings"]["nodule"]["side"] == side and f"{side} " in s.report
    for s in _batch("ct", 30, 64):
        info = s.meta["findings"].get("kidney_lesion")
        if info and not s.labels[0]:
            side = "right" if np.nonzero(s.mask == 4)[2].mean() < 32 else "left"
            assert info["side"] == side and f"{side} renal" in s.report
    for s in _batch("mri", 24, 64):
        if int(s.labels):
            side = "right" if np.nonzero(s.mask)[2].mean() < 32 else "left"
            assert s.meta["location"]["hemisphere"] == side
            assert f"{side} {s.meta['location']['lobe']}" in s.report.lower()
