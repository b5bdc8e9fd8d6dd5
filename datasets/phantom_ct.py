"""3D contrast-enhanced abdominal CT phantoms in Hounsfield units with organ/lesion label maps and reports.

Axes: image [1, D, H, W] with D the axial slice index running superior (0) to inferior, H anterior (0) to
posterior, W image left (patient right) to image right. The field of view is FOV_MM, so the voxel spacing
depends on size and sizes in reports are measured in mm from the label map. Structures that do not change
along z (body wall, spine, aorta) are drawn once in 2D and broadcast, organs are drawn in their own boxes.
The phase is portal-venous/nephrographic (aorta 150-230 HU), so kidneys enhance (medulla 80-130 HU, cortex
140-200 HU) rather than the unenhanced ~30 HU: cysts and solid renal masses then stand out as hypodense.
"""

from __future__ import annotations

import numpy as np

from ._phantom_common import (
    PhantomSample,
    blob,
    choose,
    coords,
    draw_findings,
    fast_normal,
    finish_report,
    grids,
    multi_hot,
    negations,
    pick_voxel,
    sample_rng,
    side_word,
    size_word,
    slices_with,
    smooth_field,
)

__all__ = ["REPORT_VOCABULARY", "FINDINGS", "SEG_CLASSES", "SYNONYMS", "PhantomSample", "generate"]

#: labeller vocabulary of these reports (medvlp_bench.report_labeler): what report-label methods read
REPORT_VOCABULARY = "phantom_ct"
FINDINGS: tuple[str, ...] = ("liver_lesion", "kidney_lesion", "splenomegaly", "ascites")
SEG_CLASSES: tuple[str, ...] = ("background", "liver", "spleen", "kidney", "lesion")
SYNONYMS: dict[str, tuple[str, ...]] = {
    "liver_lesion": ("hepatic lesion", "liver lesion", "hepatic hypodensity"),
    "kidney_lesion": ("renal cyst", "renal lesion", "renal mass", "kidney lesion"),
    "splenomegaly": ("splenomegaly", "spleen is enlarged", "enlarged spleen"),
    "ascites": ("ascites", "free fluid", "peritoneal fluid"),
}
NEGATIONS: dict[str, tuple[str, ...]] = {
    "liver_lesion": ("No focal liver lesion.", "There is no focal hepatic lesion."),
    "kidney_lesion": ("No renal mass.", "The kidneys enhance symmetrically without a renal lesion."),
    "splenomegaly": ("The spleen is normal in size.", "No splenomegaly."),
    "ascites": ("No ascites.", "No free fluid.", "There is no free fluid in the abdomen."),
}
PREVALENCE = 0.3
FOV_MM = (240.0, 400.0, 400.0)  # z (craniocaudal), y, x extent of the volume
_KIND = 0xC7
_NUM = ("one", "two", "three")
_POLES = ("upper pole", "interpolar region", "lower pole")


def _ellipse(x, y, cx, cy, rx, ry) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1


def _paste(full: np.ndarray, sl: tuple[slice, ...], part: np.ndarray) -> np.ndarray:
    full[sl] |= part
    return full


def _mm_to_norm(r_mm: float, size: int) -> tuple[float, float, float]:
    """Isotropic physical radius -> per-axis normalised radii (never below ~1.3 voxels so it is visible)."""
    r = max(r_mm, 1.3 * max(FOV_MM[1:]) / size)
    return tuple(2 * r / f for f in FOV_MM)


def _diameter_cm(lesion: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Diameter of the circle with the lesion's largest axial area, in cm to 1 decimal: how a radiologist
    measures a lesion on its largest slice, and what the report states."""
    area = lesion.reshape(lesion.shape[0], -1).sum(1).max() * spacing[1] * spacing[2]
    return round(float(2 * np.sqrt(area / np.pi)) / 10, 1)


def generate(index: int, seed: int = 0, size: int = 64) -> PhantomSample:
    """Abdominal CT volume [1, size, size, size] in HU with label map, multi-hot labels and report."""
    rng = sample_rng(index, seed, size, _KIND)
    present = draw_findings(rng, FINDINGS, PREVALENCE)
    spacing = tuple(f / size for f in FOV_MM)
    y2, x2 = grids(size, 2)
    z3 = grids(size, 3)[0]
    shape = (size,) * 3
    # --- body wall and retroperitoneal structures (constant along z) ---
    cx, cy = rng.uniform(-0.04, 0.04), rng.uniform(-0.02, 0.08)
    brx, bry, fat = rng.uniform(0.7, 0.88), rng.uniform(0.5, 0.64), rng.uniform(0.05, 0.15)
    rb = np.sqrt(((x2 - cx) / brx) ** 2 + ((y2 - cy) / bry) ** 2)
    rc = rb / (1 - fat - 0.04)  # normalised radius of the peritoneal cavity
    base = np.full((size, size), -1000.0, np.float32)
    base[rb < 1] = -100.0
    base[rb < 1 - fat] = rng.uniform(40, 55)
    base[rc < 1] = -100.0
    vy = cy + bry - 0.33
    hu_aorta = rng.uniform(150, 230)
    retro = _ellipse(x2, y2, cx, vy + 0.05, 0.45, 0.22)
    struct = np.zeros((size, size), np.int8)  # drawn last, over organs: 1 muscle 2 bone 3 canal 4 aorta 5 ivc
    for sx in (-1, 1):
        struct[_ellipse(x2, y2, cx + sx * 0.12, vy + 0.2, 0.09, 0.08)] = 1
    struct[(np.abs(x2 - cx) < 0.025) & (y2 > vy + 0.14) & (y2 < vy + 0.3)] = 2
    struct[(np.abs(y2 - vy - 0.12) < 0.025) & (np.abs(x2 - cx) < 0.17)] = 2
    struct[_ellipse(x2, y2, cx, vy + 0.14, 0.065, 0.065)] = 2
    struct[_ellipse(x2, y2, cx, vy + 0.14, 0.04, 0.04)] = 3
    struct[_ellipse(x2, y2, cx, vy, 0.1, 0.085)] = 2
    struct[_ellipse(x2, y2, cx + 0.03, vy - 0.14, 0.055, 0.055)] = 4
    struct[_ellipse(x2, y2, cx - 0.1, vy - 0.13, 0.055, 0.04)] = 5
    cancellous = _ellipse(x2, y2, cx, vy, 0.08, 0.065)
    free = struct == 0  # where organs and lesions may be labelled
    vol = np.repeat(base[None], size, 0)
    # --- bowel loops with gas, filling the peritoneal cavity ---
    f = smooth_field(rng, shape, (12, 22, 22))
    g = smooth_field(rng, shape, (6, 8, 8))
    thr = rng.uniform(-0.3, 0.3)
    cavity = (rc < 1) & ~retro
    bowel = cavity & (f > thr)
    vol[bowel] = rng.uniform(20, 40)
    vol[bowel & (f > thr + 1.4) & (g > 0.3)] = -950.0
    # --- ascites: dependent crescents along the wall, around the liver and in the flanks ---
    fluid = np.zeros(shape, bool)
    t_fluid = 0.0
    if present["ascites"]:
        t_fluid = rng.uniform(0.06, 0.22)
        z_from = rng.uniform(-1.0, 0.2) if t_fluid < 0.1 else -1.0
        fluid = ((rc > 1 - t_fluid) & (rc < 1) & (y2 < vy - 0.05)) & (z3 > z_from)
        vol[fluid] = rng.uniform(5, 15)
    psoas_r = 0.02 + 0.07 * np.clip((z3 + 0.2) / 1.2, 0, 1)
    for sx in (-1, 1):
        vol[((x2 - cx - sx * 0.13) ** 2 + (y2 - vy + 0.02) ** 2) < psoas_r**2] = 45.0
    # --- organs ---
    s = rng.uniform(0.9, 1.1)
    inside = rc < 1 - t_fluid
    liver, core = np.zeros(shape, bool), np.zeros(shape, bool)
    for c, r, irr in (
        ((rng.uniform(-0.55, -0.4), cy - 0.02, cx - 0.33), (0.5, 0.4, 0.36), 0.08),
        ((rng.uniform(-0.7, -0.55), cy - 0.22, cx + 0.08), (0.28, 0.18, 0.3), 0.1),
    ):
        sl, d = blob(rng, size, c, tuple(v * s for v in r), irr)
        _paste(liver, sl, d < 1)
        _paste(core, sl, d < 0.7)
    liver &= inside & ~retro
    rz = rng.uniform(0.58, 0.75) if present["splenomegaly"] else rng.uniform(0.32, 0.45)
    grow = rng.uniform(1.3, 1.6) if present["splenomegaly"] else 1.0
    spleen = np.zeros(shape, bool)
    sl, d = blob(
        rng,
        size,
        (-1 + rz + rng.uniform(0.05, 0.15), cy + 0.24 - 0.05 * grow, cx + 0.5),
        (rz, 0.22 * grow * s, 0.13 * grow * s),
        0.06,
        angle=-0.6,
    )
    spleen = _paste(spleen, sl, d < 1) & inside & ~liver
    kidneys, near = [np.zeros(shape, bool) for _ in range(2)], [np.zeros(shape, bool) for _ in range(2)]
    sinus = np.zeros(shape, bool)
    hu_cortex, hu_med = rng.uniform(140, 200), rng.uniform(80, 130)
    kz = rng.uniform(0.1, 0.25)
    cortex = np.zeros(shape, bool)
    for k, sx in enumerate((-1, 1)):
        c = (kz + (0.06 if sx < 0 else 0.0), vy - 0.03, cx + sx * rng.uniform(0.27, 0.32))
        sl, d = blob(rng, size, c, (rng.uniform(0.38, 0.46), 0.13 * s, 0.09 * s), 0.04, angle=sx * 0.5)
        _paste(kidneys[k], sl, d < 1)
        _paste(near[k], sl, d < 1.35)
        _paste(cortex, sl, d > 0.75)
        hx = (grids(size, 3)[2][..., sl[2]] - c[2]) * sx < -0.02
        zz = np.abs(grids(size, 3)[0][sl[0]] - c[0]) < 0.15
        _paste(sinus, sl, (d < 0.6) & hx & zz)
    for k in range(2):
        kidneys[k] &= ~sinus
    kidney = kidneys[0] | kidneys[1]
    liver &= ~kidney
    spleen &= ~kidney
    hu_liver, hu_spleen = rng.uniform(55, 65), rng.uniform(42, 50)
    vol[liver] = hu_liver
    vol[spleen] = hu_spleen
    vol[sinus] = -60.0
    vol[kidney] = hu_med
    vol[kidney & cortex] = hu_cortex
    # --- lesions ---
    info, lesions = {}, {}
    if present["liver_lesion"]:
        n = int(rng.choice(3, p=[0.55, 0.3, 0.15])) + 1
        les, items = np.zeros(shape, bool), []
        for _ in range(n):
            c_idx = pick_voxel(rng, core & liver & free) or pick_voxel(rng, liver & free)
            c = coords(c_idx, size)
            sl, d = blob(rng, size, c, _mm_to_norm(rng.uniform(5, 22), size), 0.12)
            one = np.zeros(shape, bool)
            one = _paste(one, sl, d < 1) & liver & free
            one[c_idx] = True
            vol[one] = rng.uniform(0, 30)
            les |= one
            items.append(
                {
                    "lobe": "left hepatic lobe" if c[2] > cx - 0.08 else "right hepatic lobe",
                    "diameter_cm": _diameter_cm(one, spacing),
                }
            )
        items.sort(key=lambda v: -v["diameter_cm"])
        lesions["liver_lesion"] = les
        info["liver_lesion"] = {"count": n, "lesions": items}
    if present["kidney_lesion"]:
        k = int(rng.integers(2))
        c_idx = pick_voxel(rng, kidneys[k] & ~cortex & free) or pick_voxel(rng, kidneys[k] & free)
        c = coords(c_idx, size)
        cyst = bool(rng.random() < 0.6)
        sl, d = blob(rng, size, c, _mm_to_norm(rng.uniform(8, 25), size), 0.03 if cyst else 0.15)
        one = _paste(np.zeros(shape, bool), sl, d < 1) & near[k] & ~liver & ~spleen & free
        one[c_idx] = True
        vol[one] = rng.uniform(0, 15) if cyst else rng.uniform(40, 75)
        zs = slices_with(kidneys[k])
        pole = _POLES[min(int(3 * (c_idx[0] - zs[0]) / max(zs[-1] - zs[0] + 1, 1)), 2)]
        lesions["kidney_lesion"] = one
        info["kidney_lesion"] = {
            "side": side_word(c[2] - cx),
            "pole": pole,
            "cystic": cyst,
            "diameter_cm": _diameter_cm(one, spacing),
        }
    length = round(len(slices_with(spleen)) * spacing[0] / 10, 1)
    if present["splenomegaly"]:
        info["splenomegaly"] = {"length_cm": length}
    # --- structures over everything, label map, partial volume blur and noise ---
    lut = np.array([0, 50, 700, 15, hu_aorta, rng.uniform(100, 140)], np.float32)
    vol = np.where(struct > 0, lut[struct], vol)
    vol[np.broadcast_to(cancellous, shape)] = rng.uniform(200, 300)
    fluid &= ~(liver | spleen | kidney) & free
    if present["ascites"]:
        info["ascites"] = {"amount": size_word(t_fluid, 0.1, 0.16), "perihepatic": bool((fluid & (z3 < -0.3)).any())}
    mask = np.zeros(shape, np.uint8)
    for lab, m in ((1, liver), (2, spleen), (3, kidney)):
        mask[m & free] = lab
    for m in lesions.values():
        mask[m] = 4
    for i in (1, 2):  # in-plane [1, 2, 1] blur: partial-volume edges instead of aliased steps
        v = vol * 0.5
        a, b = [slice(None)] * 3, [slice(None)] * 3
        a[i], b[i] = slice(1, None), slice(None, -1)
        v[tuple(a)] += 0.25 * vol[tuple(b)]
        v[tuple(b)] += 0.25 * vol[tuple(a)]
        v[tuple(a[:i] + [0])] += 0.25 * vol[tuple(a[:i] + [0])]
        v[tuple(a[:i] + [-1])] += 0.25 * vol[tuple(a[:i] + [-1])]
        vol = v
    vol += rng.uniform(10, 20) * fast_normal(rng, shape)
    finding_slices = {k: slices_with(m) for k, m in lesions.items()}
    if present["splenomegaly"]:
        finding_slices["splenomegaly"] = slices_with(spleen)
    if present["ascites"]:
        finding_slices["ascites"] = slices_with(fluid)
    meta = {
        "spacing_mm": [round(v, 3) for v in spacing],
        "z_order": "superior_to_inferior",
        "spleen_length_cm": length,
        "findings": info,
        "finding_slices": finding_slices,
    }
    labels = multi_hot(present, FINDINGS)
    return PhantomSample(vol.astype(np.float32)[None], mask, labels, _report(rng, present, info), meta)


def _report(rng: np.random.Generator, present: dict, info: dict) -> str:
    """Report sentences for present findings (sizes, lobes, poles) and random negations for absent ones."""
    pos, imp = [], []
    if present["liver_lesion"]:
        m = info["liver_lesion"]
        big = m["lesions"][0]
        d, lobe = big["diameter_cm"], big["lobe"]
        if m["count"] == 1:
            pos.append(
                choose(
                    rng,
                    (
                        f"a {d} cm hypodense hepatic lesion in the {lobe}",
                        f"there is a {d} cm low-attenuation liver lesion in the {lobe}",
                        f"{d} cm hepatic hypodensity in the {lobe}",
                    ),
                )
            )
            imp.append(f"{d} cm hypodense liver lesion in the {lobe}")
        else:
            n = _NUM[m["count"] - 1]
            largest = f"the largest measuring {d} cm in the {lobe}"
            pos.append(
                choose(
                    rng,
                    (
                        f"{n} hypodense hepatic lesions, {largest}",
                        f"there are {n} low-attenuation liver lesions, {largest}",
                    ),
                )
            )
            imp.append(f"{n} hypodense liver lesions, largest {d} cm")
    if present["kidney_lesion"]:
        m = info["kidney_lesion"]
        d, side, pole = m["diameter_cm"], m["side"], m["pole"]
        if m["cystic"]:
            pos.append(
                choose(
                    rng,
                    (
                        f"a {d} cm simple renal cyst in the {pole} of the {side} kidney",
                        f"there is a {d} cm fluid-attenuation renal lesion in the {pole} of the {side} kidney",
                        f"{d} cm cystic kidney lesion, {side} {pole}",
                    ),
                )
            )
            imp.append(f"{d} cm {side} renal cyst")
        else:
            pos.append(
                choose(
                    rng,
                    (
                        f"a {d} cm solid renal mass in the {pole} of the {side} kidney",
                        f"there is a {d} cm soft-tissue attenuation renal lesion arising from "
                        f"the {pole} of the {side} kidney",
                    ),
                )
            )
            imp.append(f"{d} cm solid {side} renal mass")
    if present["splenomegaly"]:
        cm = info["splenomegaly"]["length_cm"]
        pos.append(
            choose(
                rng,
                (
                    f"splenomegaly, with the spleen measuring {cm} cm in craniocaudal length",
                    f"the spleen is enlarged, measuring {cm} cm craniocaudally",
                    f"enlarged spleen measuring {cm} cm",
                ),
            )
        )
        imp.append("splenomegaly")
    if present["ascites"]:
        m = info["ascites"]
        where = "in the perihepatic space and paracolic gutters" if m["perihepatic"] else "in the flanks"
        pos.append(
            choose(
                rng,
                (
                    f"{m['amount']} volume ascites {where}",
                    f"there is a {m['amount']} amount of free fluid {where}",
                    f"{m['amount']} amount of peritoneal fluid {where}",
                ),
            )
        )
        imp.append(f"{m['amount']} volume ascites")
    neg = negations(rng, NEGATIONS, present, 0.6)
    if rng.random() < 0.3:
        neg.append("The abdominal aorta is normal in caliber.")
    normal = ("No acute abnormality in the abdomen.", "Unremarkable CT of the abdomen.")
    return finish_report(rng, pos + neg, imp, normal)
