"""2D frontal (PA) chest radiograph phantoms with findings, masks and matching free-text reports.

The image is built as a radiograph: tissue thicknesses add up to an attenuation map A and the film
shows 1 - exp(-A), so overlapping structures (ribs over lungs, heart behind lung) blend naturally.
Convention: image left (x < 0) is the patient's right, as on a PA film.
Mask priority where findings overlap (highest wins): nodule > pneumothorax > effusion > consolidation;
placement avoids most overlaps so every present finding keeps pixels in the mask.
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
    smooth_field,
)

__all__ = ["REPORT_VOCABULARY", "FINDINGS", "SEG_CLASSES", "SYNONYMS", "PhantomSample", "anatomy_masks", "generate"]

#: labeller vocabulary of these reports (medvlp_bench.report_labeler): what report-label methods read
REPORT_VOCABULARY = "phantom_cxr"
FINDINGS: tuple[str, ...] = ("consolidation", "effusion", "cardiomegaly", "nodule", "pneumothorax")
SEG_CLASSES: tuple[str, ...] = ("background", "consolidation", "effusion", "nodule", "pneumothorax")
SYNONYMS: dict[str, tuple[str, ...]] = {
    "consolidation": ("consolidation", "airspace opacity", "airspace disease", "focal opacity"),
    "effusion": ("pleural effusion", "pleural fluid"),
    "cardiomegaly": (
        "cardiomegaly",
        "heart is enlarged",
        "enlarged cardiac silhouette",
        "cardiac silhouette is enlarged",
    ),
    "nodule": ("nodule", "pulmonary nodule", "nodular opacity"),
    "pneumothorax": ("pneumothorax",),
}
NEGATIONS: dict[str, tuple[str, ...]] = {
    "consolidation": ("No focal consolidation.", "No airspace opacity.", "There is no consolidation."),
    "effusion": ("No pleural effusion.", "There is no pleural effusion.", "No pleural fluid."),
    "cardiomegaly": ("Heart size is normal.", "The cardiac silhouette is normal in size.", "No cardiomegaly."),
    "nodule": ("No pulmonary nodule.", "No nodule is seen.", "There is no nodular opacity."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
}
PREVALENCE = 0.3
FOV_MM = 360.0  # the image covers a 36 cm field
_KIND = 0xC52
_ZONE_WORDS = {
    "upper": ("upper zone", "upper lung zone"),
    "middle": ("mid zone", "middle zone"),
    "lower": ("lower zone", "lung base", "lower lung zone"),
}


def _thick(d: np.ndarray) -> np.ndarray:
    """Chord length through an ellipsoid at normalised distance d (0 outside): soft radiographic edges."""
    return np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))


def _cos_angle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """cos(9 * atan2(dy, dx) + phase) by complex powers: arctan2 is ~50x slower than a multiply here."""
    z = (dx + 1j * dy) / (r + 1e-6)
    z2 = z * z
    z9 = (z2 * z2) ** 2 * z
    return z9.real * np.cos(phase) - z9.imag * np.sin(phase)


def _anatomy(rng: np.random.Generator, size: int, cardiomegaly: bool) -> dict:
    """Patient-specific normal chest: attenuation map, lung geometry and heart, in normalised coords."""
    y0, x0 = grids(size, 2)
    ang, sc = rng.uniform(-0.05, 0.05), rng.uniform(0.92, 1.04)
    sx, sy = rng.uniform(-0.05, 0.05, 2)
    x = ((x0 - sx) * np.cos(ang) + (y0 - sy) * np.sin(ang)) / sc
    y = (-(x0 - sx) * np.sin(ang) + (y0 - sy) * np.cos(ang)) / sc
    x, y = x.astype(np.float32), y.astype(np.float32)
    bw = rng.uniform(0.86, 0.97)
    shoulder = bw * (1 - 0.3 * np.clip((-0.6 - y) / 0.4, 0, 1) ** 2)
    body = np.sqrt(np.sqrt(np.clip(1 - ((x / shoulder) ** 2) ** 2, 0, 1))) * np.clip((y + 1.05) / 0.15, 0, 1)
    neck = _thick(np.abs(x) / 0.3) * (y < -0.8)
    a = 1.25 * np.maximum(body, neck)
    lcx, lw = rng.uniform(0.41, 0.46), rng.uniform(0.33, 0.39)
    apex, base, dome_h = rng.uniform(-0.8, -0.68), rng.uniform(0.45, 0.62), rng.uniform(0.1, 0.18)
    ctr_t = rng.uniform(0.56, 0.68) if cardiomegaly else rng.uniform(0.38, 0.5)
    hrx = ctr_t * (lcx + lw)
    hry = rng.uniform(0.25, 0.3) * (1.0 + 0.8 * (ctr_t - 0.45))
    hx, hy = hrx * rng.uniform(0.15, 0.3), base - dome_h - 0.45 * hry
    heart_d = np.sqrt(((x - hx) / hrx) ** 2 + ((y - hy) / hry) ** 2)
    heart = heart_d < 1
    lungs, dists, thick, geo = [], [], [], []
    for s in (-1, 1):
        cx = s * lcx
        b = base - (0.04 if s < 0 else 0.0)
        cy, ly = (apex + b) / 2, (b - apex) / 2
        v = (y - cy) / ly
        w = lw * (0.62 + 0.38 * np.sqrt(np.clip((v + 1) / 0.9, 0, 1))) * np.where((x - cx) * s > 0, 1.0, 0.75)
        d = np.sqrt(((x - cx) / w) ** 2 + v * v)
        dome = b - dome_h * np.clip(1 - ((x - cx + s * 0.06) / (lw * 1.05)) ** 2, 0, 1)
        inside = (d < 1) & (y < dome) & ~heart
        t = np.sqrt(_thick(d)) * np.clip((dome - y) / 0.05, 0, 1) * (1 - 0.85 * _thick(heart_d))
        a -= 0.95 * t
        lungs.append(inside)
        dists.append(d)
        thick.append(t)
        geo.append((cx, cy, ly, s))
    a += 0.15 * _thick(heart_d)
    a += 0.22 * _thick(np.sqrt(((x - 0.12) / 0.08) ** 2 + ((y + 0.36) / 0.07) ** 2))  # aortic knob
    a -= 0.18 * _thick(np.abs(x + 0.01) / 0.04) * (y < -0.25) * (y > -0.95)  # tracheal air column
    verte = 0.75 + 0.25 * np.cos(y * np.pi * 9.0)
    a += 0.3 * _thick(np.abs(x) / 0.075) * verte * (y > -0.9)
    xl = np.abs(x)
    cage = np.clip((base + 0.12 - y) / 0.1, 0, 1) * np.clip((lcx + lw + 0.1 - xl) / 0.05, 0, 1)
    for amp, slope, curve in ((0.13, -0.12, 1.2), (0.06, -0.45, 0.0)):  # posterior, fainter anterior ribs
        phase = (y + 0.8 - slope * xl - curve * np.clip(xl - 0.45, 0, None) ** 2) / 0.135
        frac = phase - np.floor(phase)
        band = np.sqrt(np.clip(1 - np.abs(frac - 0.5) / 0.18, 0, 1))
        a += amp * band * (phase > 0) * (phase < 10) * (xl > 0.07) * cage
    clav_y = -0.66 - 0.3 * xl + 0.3 * xl * xl
    a += 0.3 * _thick(np.abs(y - clav_y) / 0.03) * (xl > 0.06) * (xl < 0.72)
    # vascular markings: wandering lines radiating from each hilum, fading towards the periphery
    wander = 3.5 * smooth_field(rng, (size, size), 10)
    gate = np.clip(smooth_field(rng, (size, size), 14) + 0.6, 0, 1)
    markings = np.zeros_like(a)
    for cx, cy, _, s in geo:
        hx_, hy_ = cx - s * 0.28, cy + 0.05
        r = np.sqrt((x - hx_) ** 2 + (y - hy_) ** 2)
        lines = np.clip((_cos_angle((x - hx_) * s, y - hy_, r, wander + 5 * r) - 0.85) / 0.15, 0, 1) * gate
        markings += lines * np.exp(-r / 0.45)
        a += 0.2 * np.exp(-(r**2) / 0.006)
    bub = np.sqrt(((x - lcx) / 0.13) ** 2 + ((y - base - 0.07) / 0.06) ** 2)  # gastric bubble
    a -= 0.35 * _thick(bub)
    return dict(
        x=x, y=y, a=a, lungs=lungs, dists=dists, thick=thick, geo=geo, heart=heart, markings=markings, ctr=ctr_t
    )


def _patient(index: int, seed: int, size: int) -> tuple[np.random.Generator, dict[str, bool], dict]:
    """The sample's generator, findings and normal anatomy: the first draws of every sample, in this order, so
    :func:`anatomy_masks` replays exactly the anatomy :func:`generate` draws on."""
    rng = sample_rng(index, seed, size, _KIND)
    present = draw_findings(rng, FINDINGS, PREVALENCE)
    return rng, present, _anatomy(rng, size, present["cardiomegaly"])


def anatomy_masks(index: int, seed: int = 0, size: int = 128) -> dict[str, np.ndarray]:
    """Normal-anatomy masks (lungs, heart) of sample `index`, replayed from its generator (tests, probes)."""
    _, _, an = _patient(index, seed, size)
    return {"lungs": an["lungs"][0] | an["lungs"][1], "heart": an["heart"]}


def _zone(y: float, cy: float, ly: float) -> str:
    v = (y - cy) / ly
    return "upper" if v < -1 / 3 else "middle" if v < 1 / 3 else "lower"


def generate(index: int, seed: int = 0, size: int = 128) -> PhantomSample:
    """Chest radiograph [1, size, size] in ~[0, 1] (dense = bright) with mask, multi-hot labels, report."""
    rng, present, an = _patient(index, seed, size)
    x, y, a, lungs, geo = an["x"], an["y"], an["a"], an["lungs"], an["geo"]
    px_mm = FOV_MM / size
    layers: dict[str, np.ndarray] = {}
    meta: dict = {"pixel_mm": px_mm, "cardiothoracic_ratio": 0.0, "findings": {}}
    lung_any = lungs[0] | lungs[1]
    none = np.zeros_like(lung_any)
    markings_keep = np.ones_like(a)

    if present["effusion"]:
        sides = [0, 1] if rng.random() < 0.2 else [int(rng.integers(2))]
        fl = np.zeros_like(lung_any)
        info = {}
        for i in sides:
            cx, cy, ly, s = geo[i]
            h = rng.uniform(0.08, 0.5)  # fluid height as a fraction of the lung height
            q = np.clip(((x - cx) * s / 0.35 + 0.8) / 1.8, 0, 1)  # 0 medial .. 1 lateral
            level = cy + ly - 2 * ly * h - 0.2 * q * q  # meniscus: fluid climbs the lateral chest wall
            soft = np.clip((y - level) / 0.04, 0, 1) * lungs[i]
            a += 0.8 * soft
            fl |= soft > 0.5
            info[side_word(cx)] = size_word(h, 0.2, 0.35)
        layers["effusion"] = fl
        meta["findings"]["effusion"] = {"sides": info, "area_px": int(fl.sum())}
    if present["pneumothorax"]:
        i = int(rng.integers(2))
        cx, cy, ly, s = geo[i]
        where = "apical" if rng.random() < 0.5 else "lateral"
        sector = ((y - cy) / ly < -0.2) if where == "apical" else (((x - cx) * s > 0) & ((y - cy) / ly < 0.4))
        delta = rng.uniform(0.12, 0.35)
        d = an["dists"][i]
        ptx = lungs[i] & sector & (d > 1 - delta + 0.03)
        if "effusion" in layers:
            ptx &= ~layers["effusion"]
        a -= (0.6 * (1 - an["thick"][i]) + 0.03) * ptx  # more air, less lung tissue
        markings_keep -= ptx
        a += 0.14 * (np.abs(d - (1 - delta)) < 0.025) * sector * lungs[i]  # visible pleural line
        layers["pneumothorax"] = ptx
        frac = float(ptx.sum() / max(lungs[i].sum(), 1))
        meta["findings"]["pneumothorax"] = {
            "side": side_word(cx),
            "location": where,
            "lung_fraction": frac,
            "size": size_word(frac, 0.08, 0.16),
        }
    free = lung_any & ~layers.get("effusion", none) & ~layers.get("pneumothorax", none)
    if present["consolidation"]:
        iy, ix = pick_voxel(rng, free & (np.minimum(*an["dists"]) < 0.8)) or pick_voxel(rng, lung_any)
        cxn, cyn = float(x[iy, ix]), float(y[iy, ix])
        r = rng.uniform(0.08, 0.25)
        sl, d = blob(
            rng,
            size,
            coords((iy, ix), size),
            (r * rng.uniform(0.7, 1.3), r),
            irregularity=0.3,
        )
        dens = np.zeros_like(a)
        dens[sl] = np.clip((1.0 - d) / 0.35, 0, 1) * (0.75 + 0.25 * smooth_field(rng, d.shape, 5) / 2)
        dens *= free
        a += rng.uniform(0.15, 0.4) * dens
        layers["consolidation"] = dens > 0.3
        i = 0 if cxn < 0 else 1
        area = float(layers["consolidation"].sum() * px_mm**2)
        meta["findings"]["consolidation"] = {
            "side": side_word(cxn),
            "zone": _zone(cyn, geo[i][1], geo[i][2]),
            "area_mm2": area,
            "size": size_word(area, 1500, 4000),
        }
    if present["nodule"]:
        cand = free & ~layers.get("consolidation", none) & (np.minimum(*an["dists"]) < 0.75)
        iy, ix = pick_voxel(rng, cand) or pick_voxel(rng, lung_any)
        rad_px = max(rng.uniform(0.02, 0.05) * size, 1.0)
        yy, xx = np.ogrid[:size, :size]
        dn = np.sqrt((yy - iy) ** 2 + (xx - ix) ** 2) / rad_px
        a += rng.uniform(0.12, 0.4) * _thick(dn)
        layers["nodule"] = dn < 1
        cxn, cyn = float(x[iy, ix]), float(y[iy, ix])
        i = 0 if cxn < 0 else 1
        diam = 2 * np.sqrt(layers["nodule"].sum() / np.pi) * px_mm
        meta["findings"]["nodule"] = {
            "side": side_word(cxn),
            "zone": _zone(cyn, geo[i][1], geo[i][2]),
            "diameter_mm": int(round(diam)),
        }
    a += 0.2 * an["markings"] * lung_any * markings_keep
    heart_cols = np.flatnonzero(an["heart"].any(0))
    lung_cols = np.flatnonzero(lung_any.any(0))
    ctr = float(np.ptp(heart_cols) / max(np.ptp(lung_cols), 1)) if heart_cols.size and lung_cols.size else 0.0
    meta["cardiothoracic_ratio"] = round(ctr, 3)
    if present["cardiomegaly"]:
        grade = "mild" if ctr < 0.6 else "moderate" if ctr < 0.65 else "marked"
        meta["findings"]["cardiomegaly"] = {"cardiothoracic_ratio": round(ctr, 3), "size": grade}

    img = 1.0 - np.exp(-rng.uniform(1.0, 1.3) * np.clip(a, 0, None))
    img = 0.03 + rng.uniform(0.85, 1.05) * img ** rng.uniform(0.85, 1.15)
    img = img + rng.uniform(0.008, 0.025) * fast_normal(rng, img.shape)
    mask = np.zeros((size, size), np.uint8)
    for name in ("consolidation", "effusion", "pneumothorax", "nodule"):  # ascending priority
        if name in layers:
            mask[layers[name]] = SEG_CLASSES.index(name)
    labels = multi_hot(present, FINDINGS)
    report = _report(rng, present, meta["findings"])
    return PhantomSample(np.clip(img, 0, 1).astype(np.float32)[None], mask, labels, report, meta)


def _report(rng: np.random.Generator, present: dict, info: dict) -> str:
    """Free-text report: varied templates and synonyms for present findings, random negations for absent."""
    pos, imp = [], []
    for f in FINDINGS:
        if not present[f]:
            continue
        syn, m = choose(rng, SYNONYMS[f][:3] if f != "pneumothorax" else SYNONYMS[f]), info[f]
        if f in ("consolidation", "nodule"):
            loc = f"{m['side']} {choose(rng, _ZONE_WORDS[m['zone']])}"
            if f == "consolidation":
                s = choose(
                    rng,
                    (
                        f"{m['size']} {syn} in the {loc}",
                        f"there is a {m['size']} area of {syn} in the {loc}",
                        f"{syn} in the {loc}, {m['size']} in extent",
                    ),
                )
                imp.append(f"{m['side']} {m['zone']} zone {syn}")
            else:
                mm = m["diameter_mm"]
                s = choose(
                    rng,
                    (
                        f"a {mm} mm {syn} in the {loc}",
                        f"there is a {mm} mm {syn} projecting over the {loc}",
                        f"{syn} in the {loc} measuring {mm} mm",
                    ),
                )
                imp.append(f"{m['diameter_mm']} mm {m['side']} {syn}")
        elif f == "effusion":
            sides = m["sides"]
            if len(sides) == 2:
                s = f"bilateral pleural effusions, {sides['right']} on the right and {sides['left']} on the left"
                imp.append("bilateral pleural effusions")
            else:
                ((side, sz),) = sides.items()
                noun = f"{sz} {side} {syn}" if syn.endswith("effusion") else f"{sz} amount of {side} {syn}"
                s = choose(
                    rng,
                    (
                        f"{noun} with blunting of the costophrenic angle",
                        f"there is a {noun}",
                        f"{noun} with a meniscus at the lung base",
                    ),
                )
                imp.append(f"{sz} {side} pleural effusion")
        elif f == "cardiomegaly":
            s = choose(
                rng,
                (
                    f"{m['size']} cardiomegaly",
                    "the heart is enlarged",
                    "enlarged cardiac silhouette",
                    "the cardiac silhouette is enlarged",
                ),
            )
            imp.append(choose(rng, ("cardiomegaly", "enlarged cardiac silhouette")))
        else:
            s = choose(
                rng,
                (
                    f"{m['size']} {m['side']} {m['location']} pneumothorax with a visible pleural line",
                    f"there is a {m['size']} {m['side']} pneumothorax along the "
                    f"{'apex' if m['location'] == 'apical' else 'lateral chest wall'}",
                ),
            )
            imp.append(f"{m['side']} pneumothorax")
        pos.append(s)
    neg = negations(rng, NEGATIONS, present, 0.5)
    if pos and not present["pneumothorax"] and rng.random() < 0.3:
        pos[-1] += " without pneumothorax"
        neg = [n for n in neg if "pneumothorax" not in n]
    lung_findings = ("consolidation", "effusion", "nodule", "pneumothorax")
    if not any(present[f] for f in lung_findings) and rng.random() < 0.5:
        neg.append("The lungs are clear.")
    normal = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "Normal chest radiograph.")
    return finish_report(rng, pos + neg, imp, normal)
