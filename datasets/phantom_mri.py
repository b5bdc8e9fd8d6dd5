"""3D brain MRI phantoms: four co-registered modalities (T1, T1ce, T2, FLAIR) with a BraTS-style tumour.

A tissue label volume is built once (scalp, skull, CSF, grey/white matter, ventricles, tumour parts) and
every modality is a lookup of per-tissue intensities, so the contrasts stay consistent across channels;
a smooth bias field, gain and Rician-like noise per modality then make every case look different.
Axes: image [4, D, H, W], D axial slices inferior (0) to superior, H anterior (0) to posterior, W image left
(patient right, radiological convention) to image right. Tumour labels: 1 necrotic / non-enhancing core,
2 oedema, 3 enhancing rim (BraTS 1, 2, 4).
"""

from __future__ import annotations

import numpy as np

from ._phantom_common import (
    PhantomSample,
    blob,
    choose,
    fast_normal,
    format_report,
    grids,
    nearest_voxel,
    sample_rng,
    side_word,
    slices_with,
    smooth_field,
    voxel,
)

__all__ = ["REPORT_VOCABULARY", "CLASSES", "MODALITIES", "SEG_CLASSES", "SYNONYMS", "PhantomSample", "generate"]

#: labeller vocabulary of these reports (medvlp_bench.report_labeler): what report-label methods read
REPORT_VOCABULARY = "phantom_mri"
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
CLASSES: tuple[str, ...] = ("healthy", "low_grade_glioma", "high_grade_glioma")
SEG_CLASSES: tuple[str, ...] = ("background", "necrotic_core", "edema", "enhancing")
SYNONYMS: dict[str, tuple[str, ...]] = {
    "tumor": ("mass", "glioma", "neoplasm", "lesion"),
    "low_grade_glioma": ("low-grade glioma", "low-grade glial neoplasm"),
    "high_grade_glioma": ("high-grade glioma", "high-grade glial neoplasm"),
    "enhancing": ("enhancing", "enhancement"),
    "edema": ("T2/FLAIR hyperintensity", "edema"),
}
FOV_MM = 240.0  # isotropic field of view
_KIND = 0xB4
_LOBES = {  # centre (z, y, |x|) of each lobe in normalised head coordinates
    "frontal": (0.3, -0.42, 0.25),
    "parietal": (0.5, 0.15, 0.27),
    "temporal": (-0.05, -0.1, 0.42),
    "occipital": (0.2, 0.5, 0.22),
}
# tissue ids: 0 bg, 1 scalp, 2 skull, 3 csf, 4 gm, 5 wm, 6 necrosis, 7 non-enhancing core, 8 oedema,
# 9 enhancing, 10 vessel (sinus / choroid plexus: enhance normally, so bright T1ce is not a shortcut)
_LUT = np.array(
    [
        # t1    t1ce  t2    flair
        [0.00, 0.00, 0.00, 0.00],
        [0.85, 0.85, 0.55, 0.60],
        [0.08, 0.08, 0.06, 0.05],
        [0.20, 0.20, 1.00, 0.10],
        [0.60, 0.62, 0.55, 0.55],
        [0.80, 0.80, 0.40, 0.45],
        [0.28, 0.30, 0.90, 0.50],
        [0.45, 0.45, 0.85, 0.78],
        [0.62, 0.62, 0.78, 0.88],
        [0.58, 1.00, 0.65, 0.70],
        [0.35, 0.95, 0.30, 0.25],
    ],
    np.float32,
)


def _head(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Normal head anatomy as a tissue label volume (uint8), plus geometry for tumour placement."""
    z, y, x = grids(size, 3)
    sc = rng.uniform(0.9, 1.04)
    c = (rng.uniform(-0.22, -0.12), rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.03))
    rad = (0.95 * sc, 0.84 * sc, 0.68 * sc * rng.uniform(0.95, 1.05))
    rho = np.sqrt(((z - c[0]) / rad[0]) ** 2 + ((y - c[1]) / rad[1]) ** 2 + ((x - c[2]) / rad[2]) ** 2)
    rho = rho * (1 + 0.02 * smooth_field(rng, (size,) * 3, 4))
    gyri = smooth_field(rng, (size,) * 3, max(14, size // 3))
    t_skull = rng.uniform(0.05, 0.08)
    tis = np.zeros((size,) * 3, np.uint8)
    tis[rho < 1.0] = 1
    tis[rho < 0.92] = 2
    tis[rho < 0.92 - t_skull] = 3
    brain = rho < 0.89 - t_skull
    tis[brain] = 4
    tis[brain & (rho < 0.79 - t_skull + 0.05 * gyri)] = 5
    sulci = brain & (np.abs(gyri + 0.7) < 0.3) & (rho > 0.7 - t_skull)
    tis[sulci] = 3
    half = voxel(size) * 0.6
    fiss = brain & (np.abs(x - c[2]) < half) & (z > c[0] - 0.25) & (rho > 0.35)
    tis[fiss] = 3
    for sx in (-1, 1):  # deep grey nuclei (thalami / basal ganglia)
        nuc = ((z - c[0] - 0.12) / 0.13) ** 2 + ((y - c[1] - 0.02) / 0.16) ** 2
        tis[nuc + ((x - c[2] - sx * 0.11) / 0.07) ** 2 < 1] = 4
    vs = rng.uniform(0.7, 1.4)  # ventricle size (age-like variation)
    for sx in (-1, 1):
        yy = y - c[1] + 0.02
        xc = c[2] + sx * (0.07 + 0.12 * (yy / 0.35) ** 2)
        vent = (((z - c[0] - 0.2) / (0.16 * vs)) ** 2 + (yy / 0.36) ** 2 + ((x - xc) / (0.05 * vs)) ** 2) < 1
        tis[vent] = 3
        tis[vent & (((yy - 0.2) / 0.06) ** 2 + ((z - c[0] - 0.18) / 0.05) ** 2 < 1)] = 10  # choroid plexus
    tis[(np.abs(x - c[2]) < half) & (np.abs(z - c[0] - 0.08) < 0.1 * vs) & (np.abs(y - c[1]) < 0.1)] = 3
    sinus = (np.abs(x - c[2]) < 1.2 * half) & (rho > 0.86 - t_skull) & (rho < 0.92 - t_skull) & (y > c[1])
    tis[sinus & (z > c[0])] = 10
    return tis, {"center": c, "radii": rad, "brain": brain}


def _extent(mask: np.ndarray) -> list[int]:
    """Voxels spanned by a non-empty 3D mask along each axis (z, y, x): the bounding box a report measures."""
    return [int(np.ptp(np.flatnonzero(mask.any(axis=tuple({0, 1, 2} - {a}))))) + 1 for a in range(3)]


def generate(index: int, seed: int = 0, size: int = 64) -> PhantomSample:
    """Brain MRI [4, size, size, size] in ~[0, 1]; labels = class index (healthy, LGG, HGG)."""
    rng = sample_rng(index, seed, size, _KIND)
    cls = int(rng.integers(3))
    tis, geo = _head(rng, size)
    lut = _LUT * rng.uniform(0.94, 1.06, _LUT.shape).astype(np.float32)
    mask = np.zeros(tis.shape, np.uint8)
    mm = FOV_MM / size
    meta: dict = {
        "class": CLASSES[cls],
        "spacing_mm": [mm] * 3,
        "z_order": "inferior_to_superior",
        "finding_slices": {},
    }
    if cls:
        hgg = cls == 2
        lobe = choose(rng, tuple(_LOBES))
        sx = -1 if rng.random() < 0.5 else 1
        lz, ly, lx = _LOBES[lobe]
        cz, cy, cx0 = geo["center"]
        r0 = geo["radii"]
        c = np.array([cz + lz * r0[0] / 0.95, cy + ly * r0[1] / 0.84, cx0 + sx * lx * r0[2] / 0.68])
        c += rng.uniform(-0.06, 0.06, 3)
        centre = nearest_voxel(c, size)
        while not geo["brain"][centre]:  # pull a peripheral centre inwards until it sits in the brain
            c += 0.1 * (np.array([cz, cy, cx0]) - c)
            centre = nearest_voxel(c, size)
        core_r = rng.uniform(0.09, 0.2) * rng.uniform(0.8, 1.2, 3)
        core_r = np.maximum(core_r, 2.5 * voxel(size))
        ed_f = rng.uniform(1.35, 2.0) if hgg else rng.uniform(1.2, 1.6)
        ed_r = np.maximum(core_r * ed_f, core_r + 2 * voxel(size))
        sl, d = blob(rng, size, tuple(c), tuple(ed_r), 0.25)
        mask[sl][(d < 1) & geo["brain"][sl]] = 2
        sl2, d2 = blob(rng, size, tuple(c + rng.uniform(-0.3, 0.3, 3) * core_r * 0.3), tuple(core_r), 0.15)
        core = (d2 < 1) & geo["brain"][sl2]
        mask[sl2][core] = 1
        if hgg:
            rim = rng.uniform(0.3, 0.5) * (1 + 0.3 * smooth_field(rng, d2.shape, 4))
            rim = np.maximum(rim, 1.2 * voxel(size) / core_r.min())
            mask[sl2][core & (d2 > 1 - rim)] = 3
        mask[centre] = 1
        tumour = mask > 0
        tis[mask == 2] = 8
        tis[mask == 1] = 6 if hgg else 7
        tis[mask == 3] = 9
        lut[8] *= rng.uniform(0.9, 1.05)
        lut[9, 1] = rng.uniform(0.9, 1.05)
        solid = (mask == 1) | (mask == 3)
        ext = _extent(solid)
        dims = sorted([round(float(ext[2] * mm) / 10, 1), round(float(ext[1] * mm) / 10, 1)], reverse=True)
        ed_ext = max(_extent(tumour))
        meta.update(
            location={"hemisphere": side_word(c[2] - cx0), "lobe": lobe},
            size_cm=dims + [round(float(ext[0] * mm) / 10, 1)],
            edema_extent_cm=round(float(ed_ext * mm) / 10, 1),
        )
        meta["finding_slices"]["tumor"] = slices_with(tumour)
        for k, name in enumerate(SEG_CLASSES[1:], 1):
            if (mask == k).any():
                meta["finding_slices"][name] = slices_with(mask == k)
    img = lut.T[:, tis]  # [4, D, H, W]
    img *= rng.uniform(0.88, 1.06, (4, 1, 1, 1)).astype(np.float32)
    for m in range(4):
        img[m] *= np.exp(0.08 * smooth_field(rng, tis.shape, 3))
    sig = rng.uniform(0.015, 0.04, (4, 1, 1, 1)).astype(np.float32)
    img = np.abs(img + sig * fast_normal(rng, img.shape))
    return PhantomSample(img, mask, np.array(cls, np.int64), _report(rng, cls, meta), meta)


def _report(rng: np.random.Generator, cls: int, meta: dict) -> str:
    """Short brain MRI report: location, size, enhancement pattern and T2/FLAIR signal of the tumour."""
    if cls == 0:
        find = ["No intracranial mass.", "Normal appearance of the brain parenchyma."]
        find += [
            s
            for s in ("The ventricles are normal in size.", "No abnormal enhancement.", "No abnormal T2/FLAIR signal.")
            if rng.random() < 0.5
        ]
        return format_report(find, [choose(rng, ("Normal MRI of the brain.", "No intracranial mass."))])
    loc = f"{meta['location']['hemisphere']} {meta['location']['lobe']}"
    a, b, c = meta["size_cm"]
    size = f"{a} x {b} x {c} cm"
    if cls == 2:
        find = [
            choose(
                rng,
                (
                    f"there is a {size} heterogeneously enhancing intra-axial mass in the {loc} "
                    "lobe with central necrosis",
                    f"{size} rim-enhancing mass in the {loc} lobe with a necrotic centre",
                    f"a ring-enhancing necrotic mass is present in the {loc} lobe, measuring {size}",
                ),
            ),
            choose(
                rng,
                (
                    "surrounding T2/FLAIR hyperintensity in keeping with vasogenic edema",
                    f"surrounding T2/FLAIR hyperintense edema extends over {meta['edema_extent_cm']} cm",
                ),
            ),
        ]
        imp = [
            choose(
                rng,
                (
                    f"{loc} high-grade glioma",
                    f"enhancing necrotic {loc} mass, high-grade glioma",
                    f"high-grade glial neoplasm in the {loc} lobe",
                ),
            )
        ]
    else:
        find = [
            choose(
                rng,
                (
                    f"there is a {size} non-enhancing T2/FLAIR hyperintense mass in the {loc} lobe",
                    f"{size} infiltrative non-enhancing lesion in the {loc} lobe",
                    f"a non-enhancing mass measuring {size} is present in the {loc} lobe",
                ),
            ),
            choose(
                rng,
                (
                    "no enhancement on post-contrast T1.",
                    "mild surrounding T2/FLAIR hyperintensity.",
                    "it is hypointense on T1 without enhancement.",
                ),
            ),
        ]
        imp = [
            choose(
                rng,
                (
                    f"{loc} low-grade glioma",
                    f"non-enhancing {loc} mass, low-grade glioma",
                    f"low-grade glial neoplasm in the {loc} lobe",
                ),
            )
        ]
    return format_report(find, imp)
