"""GTGM's text for volumes without reports: pluggable generators and an on-disk cache.

``describe`` (default, offline) measures the volume and writes radiology-style sentences: modality and region,
body intensity, and each abnormal structure's size, position and intensity. Abnormal structures are the
connected components that stand out from the organ they sit in: the voxels outside a parenchyma intensity band
that are enclosed (in 3D or in a 2D plane) by a large component inside the band, kept when they are big enough
and differ from the surrounding parenchyma by at least ``min_contrast``. ``hf`` captions one axial slice with a
local Hugging Face captioner (BLIP, as the released GTGM code does) or continues a prompt of measured facts with
a local causal LM. Texts are cached per volume (id + content hash), generator name and settings hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

#: bump when the describe measurements or templates change, so cached texts are not reused
DESCRIBE_VERSION = "1"
#: exactly one of these ends every describe text that has no finding (tests use them)
NO_FINDING = (
    "No focal lesion is seen.",
    "No focal abnormality is identified.",
    "No discrete lesion stands out from the surrounding tissue.",
)
GENERIC: dict[str, Any] = {
    "modality": "scan",
    "region": "body",
    "units": "z",  # hu: the datamodule windowed HU to [0, 1] with ``window``; z: robust z-scores in the body
    "window": None,
    "spacing_mm": None,
    "fov_mm": None,
    "channel": 0,  # channel searched for abnormal structures
    "channel_names": None,
    "band": [-1.5, 1.5],  # parenchyma band (HU or z); outside it and enclosed by it = candidate
    "polarity": "both",  # hypo | hyper | both
    "axis_words": None,  # per axis [word for the low end, word for the high end], None: no position words
    "sigma_mm": 4.0,  # denoising before thresholding (voxels when spacing is unknown: 1)
    "min_mm3": 500.0,
    "min_voxels": 4,
    "min_contrast": 0.8,  # HU or z
    "min_enclosure": 0.5,  # fraction of the candidate's rim that is parenchyma
    "min_organ_fraction": 0.02,  # organ component size as a fraction of the body
    "max_findings": 3,
}
#: what is known about the built-in corpora (phantom geometry from the generators' docstrings)
PRESETS: dict[str, dict[str, Any]] = {
    "phantom_ct": {
        "modality": "CT",
        "region": "abdomen",
        "units": "hu",
        "window": [-160.0, 240.0],
        "fov_mm": [240.0, 400.0, 400.0],
        "band": [47.0, 90.0],  # enhanced solid-organ parenchyma (portal venous phase)
        "polarity": "hypo",
        "axis_words": [["upper", "lower"], ["anterior", "posterior"], ["right", "left"]],
        "min_mm3": 600.0,
        "min_contrast": 14.0,
    },
    "phantom_mri": {
        "modality": "MRI",
        "region": "brain",
        "fov_mm": [240.0, 240.0, 240.0],
        "channel": 3,
        "channel_names": ["T1", "T1ce", "T2", "FLAIR"],
        "band": [-2.0, 1.2],
        "polarity": "hyper",
        "axis_words": [["inferior", "superior"], ["anterior", "posterior"], ["right", "left"]],
    },
    "phantom_cxr": {"modality": "radiograph", "region": "chest", "axis_words": [["upper", "lower"], ["right", "left"]]},
    "msd_hippocampus": {"modality": "MRI", "region": "hippocampal region", "spacing_mm": [1.0, 1.0, 1.0]},
}


def context_for(datamodule: Any | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Measurement context of a corpus: the preset of its name (phantoms by kind), then ``overrides``."""
    key = None
    if datamodule is not None:
        kind = getattr(datamodule, "kind", None)
        key = f"phantom_{kind}" if kind and type(datamodule).__name__ == "PhantomDataModule" else datamodule.name
    ctx = {**GENERIC, **PRESETS.get(key or "", {})}
    unknown = set(overrides or {}) - set(GENERIC)
    if unknown:
        raise ValueError(f"method.model.textgen.context: unknown key(s) {sorted(unknown)}; valid: {sorted(GENERIC)}")
    ctx.update({k: v for k, v in (overrides or {}).items() if v != "auto"})
    return ctx


def _spacing(ctx: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray | None:
    if ctx["spacing_mm"] is not None:
        return np.asarray(ctx["spacing_mm"], float)[: len(shape)]
    if ctx["fov_mm"] is not None:
        return np.asarray(ctx["fov_mm"], float)[: len(shape)] / np.asarray(shape)
    return None


def _fill_planes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 3D and in every 2D plane along each axis (lesions touching an organ's tip or edge)."""
    out = ndi.binary_fill_holes(mask)
    if mask.ndim == 3:
        for ax in range(3):
            planes = [ndi.binary_fill_holes(p) for p in np.moveaxis(mask, ax, 0)]
            out |= np.moveaxis(np.stack(planes), 0, ax)
    return out


def working_image(image: np.ndarray, ctx: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The searched channel in HU or robust body z-scores, and the body mask (largest component, filled)."""
    ch = np.asarray(image[ctx["channel"]], np.float32)
    lo, hi = np.percentile(ch, [2, 98])
    body = ch > lo + 0.1 * (hi - lo)
    lab, n = ndi.label(body)
    if n > 1:
        body = lab == 1 + np.argmax(ndi.sum_labels(body, lab, range(1, n + 1)))
    body = ndi.binary_fill_holes(body) if body.any() else np.ones_like(body)
    if ctx["units"] == "hu":
        w0, w1 = ctx["window"]
        return ch * (w1 - w0) + w0, body
    med = np.median(ch[body])
    spread = np.subtract(*np.percentile(ch[body], [75, 25])) / 1.349 or 1.0
    return (ch - med) / spread, body


def measure(image: np.ndarray, ctx: Mapping[str, Any]) -> dict[str, Any]:
    """Facts about a [C, *S] volume: body fraction and intensity, and the abnormal structures (largest first)."""
    x, body = working_image(image, ctx)
    sp = _spacing(ctx, x.shape)
    sigma = ctx["sigma_mm"] / sp if sp is not None else 1.0
    xs = ndi.gaussian_filter(x, sigma)
    lo, hi = ctx["band"]
    par = ndi.binary_opening((xs >= lo) & (xs <= hi) & body)
    lab, n = ndi.label(par)
    sizes = ndi.sum_labels(par, lab, range(1, n + 1))
    organs = np.isin(lab, 1 + np.flatnonzero(sizes >= ctx["min_organ_fraction"] * body.sum()))
    side = {"hypo": xs < lo, "hyper": xs > hi, "both": (xs < lo) | (xs > hi)}[ctx["polarity"]]
    holes, n = ndi.label(_fill_planes(organs) & ~par & side)
    voxel_mm3 = float(np.prod(sp)) if sp is not None else None
    min_vox = max(ctx["min_voxels"], ctx["min_mm3"] / voxel_mm3 if voxel_mm3 else 0)
    found = []
    for i, box in enumerate(ndi.find_objects(holes), 1):
        box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in box)
        comp = holes[box] == i
        if comp.sum() < min_vox:
            continue
        rim = ndi.binary_dilation(comp, iterations=2) & ~comp
        rim_organ = organs[box][rim]
        if rim_organ.mean() < ctx["min_enclosure"]:
            continue
        inside, around = float(xs[box][comp].mean()), float(np.median(xs[box][rim][rim_organ]))
        if abs(inside - around) < ctx["min_contrast"]:
            continue
        centre = np.array([c.mean() for c in np.nonzero(comp)]) + [s.start for s in box]
        per_channel = [_contrast(ch, box, comp, rim) for ch in np.asarray(image, np.float32)]
        found.append(
            {
                "voxels": int(comp.sum()),
                "diameter_mm": float(2 * (3 * comp.sum() * voxel_mm3 / (4 * np.pi)) ** (1 / 3)) if voxel_mm3 else None,
                "extent_vox": int(max(s.stop - s.start for s in ndi.find_objects(comp.astype(int))[0])),
                "position": (2 * centre / (np.asarray(x.shape) - 1) - 1).round(3).tolist(),
                "value": inside,
                "surround": around,
                "contrast": inside - around,
                "channel_contrast": per_channel,
            }
        )
    found.sort(key=lambda f: -f["voxels"])
    return {
        "body_fraction": float(body.mean()),
        "body_median": float(np.median(x[body])),
        "body_iqr": [float(v) for v in np.percentile(x[body], [25, 75])],
        "findings": found,
    }


def _contrast(ch: np.ndarray, box: tuple[slice, ...], comp: np.ndarray, rim: np.ndarray) -> float:
    """Component minus rim in units of the rim's spread (sign: hyper > 0), for one channel."""
    a, r = ch[box][comp], ch[box][rim]
    return float((a.mean() - np.median(r)) / (r.std() + 1e-6))


class DescribeGenerator:
    """Offline generator: radiology-style sentences from :func:`measure`; phrasing seeded by (volume id, seed)."""

    name = "describe"

    def __init__(self, context: Mapping[str, Any], seed: int = 0) -> None:
        self.ctx, self.seed = dict(context), int(seed)

    def settings(self) -> dict[str, Any]:
        return {"version": DESCRIBE_VERSION, "context": self.ctx, "seed": self.seed}

    def oriented_axes(self) -> list[int]:
        """Spatial axes the text names directions along (flipping them would contradict it)."""
        words = self.ctx["axis_words"]
        return list(range(len(words))) if words else []

    def __call__(self, image: np.ndarray, volume_id: str) -> str:
        rng = np.random.default_rng(_seed(volume_id, self.seed))
        facts = measure(image, self.ctx)
        return " ".join([self._header(rng, facts), *self._findings(rng, facts, image.ndim - 1)])

    def _header(self, rng: np.random.Generator, facts: dict[str, Any]) -> str:
        c = self.ctx
        first = _pick(rng, [f"{c['modality']} of the {c['region']}.", f"{c['modality']} study of the {c['region']}."])
        med, (q1, q3) = facts["body_median"], facts["body_iqr"]
        if c["units"] == "hu":
            stat = f"Median attenuation within the body is {med:.0f} HU (interquartile range {q1:.0f} to {q3:.0f} HU)."
        else:
            kind = "homogeneous" if q3 - q1 < 1.6 else "heterogeneous"
            stat = _pick(rng, [f"The signal is {kind}.", f"Intensity across the {c['region']} is {kind}."])
        cover = f"The {c['region']} fills {100 * facts['body_fraction']:.0f}% of the field of view."
        return " ".join([first, *(([cover, stat]) if rng.random() < 0.5 else [stat, cover])])

    def _findings(self, rng: np.random.Generator, facts: dict[str, Any], dims: int) -> list[str]:
        found = facts["findings"]
        if not found:
            return [_pick(rng, list(NO_FINDING))]
        out = []
        if len(found) > 1:
            out.append(_pick(rng, [f"There are {len(found)} focal lesions.", f"{len(found)} focal lesions are seen."]))
        for f in found[: self.ctx["max_findings"]]:
            out.append(self._one(rng, f, dims))
        if len(found) > self.ctx["max_findings"]:
            out.append(f"{len(found) - self.ctx['max_findings']} smaller lesions are not described.")
        return out

    def _one(self, rng: np.random.Generator, f: dict[str, Any], dims: int) -> str:
        c = self.ctx
        size = f"{f['diameter_mm'] / 10:.1f} cm" if f["diameter_mm"] else f"{f['extent_vox']}-voxel"
        hyper = f["contrast"] > 0
        if c["units"] == "hu":
            tone = "hyperdense" if hyper else "hypodense"
            value = f"measuring {f['value']:.0f} HU against {f['surround']:.0f} HU in the surrounding parenchyma"
        else:
            tone = "hyperintense" if hyper else "hypointense"
            value = f"{abs(f['contrast']):.1f} SD {'above' if hyper else 'below'} the surrounding tissue"
            names = c["channel_names"]
            if names:
                ups = [n for n, v in zip(names, f["channel_contrast"]) if v > 1]
                downs = [n for n, v in zip(names, f["channel_contrast"]) if v < -1]
                value += "".join(
                    [f", bright on {', '.join(ups)}" if ups else "", f", dark on {', '.join(downs)}" if downs else ""]
                )
        where = _where(f["position"], c["axis_words"], c["region"])
        noun = _pick(rng, ["lesion", "focal lesion", "focus"])
        return _pick(
            rng,
            [f"A {size} {tone} {noun} {where}, {value}.", f"There is a {size} {tone} {noun} {where}, {value}."],
        )


def _where(position: list[float], axis_words: list[list[str]] | None, region: str) -> str:
    if not axis_words:
        r = float(np.sqrt(np.mean(np.square(position))))
        return f"{'centrally' if r < 0.4 else 'peripherally'} in the {region}"
    parts = [w[0] if p < -0.33 else w[1] for p, w in zip(position, axis_words) if abs(p) >= 0.33]
    return f"in the {' '.join(parts)} {region}" if parts else f"in the central {region}"


def _seed(volume_id: str, seed: int) -> int:
    return int(hashlib.sha256(f"{volume_id}|{seed}".encode()).hexdigest()[:15], 16)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def content_hash(image: np.ndarray) -> str:
    """Identifies a volume's pixels, so ids shared by different corpora (phantom sizes) do not collide."""
    a = np.ascontiguousarray(image, np.float32)
    return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()[:16]


class TextCache:
    """One text file per (generator, settings, volume) under ``root``; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike, generator_name: str, settings: Mapping[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.folder = Path(root) / f"{generator_name}-{digest}"

    def path(self, volume_id: str, chash: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", volume_id)[:80]
        return self.folder / f"{safe}-{chash}.txt"

    def get(self, volume_id: str, chash: str) -> str | None:
        p = self.path(volume_id, chash)
        return p.read_text(encoding="utf-8") if p.is_file() else None

    def put(self, volume_id: str, chash: str, text: str) -> None:
        p = self.path(volume_id, chash)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)


class HFGenerator:
    """A local Hugging Face model: a captioner (BLIP) on one axial slice, or a causal LM given measured facts.

    Args:
        path: local directory saved with ``save_pretrained`` (model and processor/tokenizer); never downloaded.
        context: the measurement context (modality, region and channel; the LM prompt uses :func:`measure`).
        slice: ``random`` (seeded by volume id, as the released code picks a random slice), ``middle`` or
            ``finding`` (through the largest abnormal structure, else the middle).
        max_length: generated tokens at most (the released code: 50).
    """

    name = "hf"

    def __init__(
        self, path: str, context: Mapping[str, Any], *, slice: str = "random", max_length: int = 50, seed: int = 0
    ) -> None:
        if not path or not (Path(path).expanduser() / "config.json").is_file():
            raise FileNotFoundError(
                f"method.model.textgen.hf.path={path!r}: no Hugging Face model there (expected config.json); "
                "save a captioner or LM with save_pretrained() and point the path at it"
            )
        if slice not in ("random", "middle", "finding"):
            raise ValueError(f"method.model.textgen.hf.slice must be random, middle or finding, got {slice!r}")
        self.path, self.ctx = str(Path(path).expanduser().resolve()), dict(context)
        self.slice, self.max_length, self.seed = slice, int(max_length), int(seed)
        self._model: Any = None

    def settings(self) -> dict[str, Any]:
        weights = sorted(p.name + str(p.stat().st_size) for p in Path(self.path).glob("*.safetensors"))
        return {"path": self.path, "weights": weights, "slice": self.slice, "max_length": self.max_length,
                "seed": self.seed, "context": self.ctx}  # fmt: skip

    def oriented_axes(self) -> list[int]:
        return []  # a 2D captioner's words carry no trustworthy laterality

    def _load(self) -> tuple[Any, Any, bool]:
        if self._model is None:
            import transformers as tf

            captioner = "blip" in tf.AutoConfig.from_pretrained(self.path, local_files_only=True).model_type
            model_cls = tf.BlipForConditionalGeneration if captioner else tf.AutoModelForCausalLM
            proc_cls = tf.AutoProcessor if captioner else tf.AutoTokenizer
            model = model_cls.from_pretrained(self.path, local_files_only=True).eval()
            self._model = (model, proc_cls.from_pretrained(self.path, local_files_only=True), captioner)
        return self._model

    def __call__(self, image: np.ndarray, volume_id: str) -> str:
        import torch

        model, proc, captioner = self._load()
        head = f"{self.ctx['modality']} {self.ctx['region']}"
        with torch.no_grad():
            if captioner:
                inputs = proc(images=self._slice_image(image, volume_id), return_tensors="pt")
                ids = model.generate(pixel_values=inputs["pixel_values"], max_length=self.max_length, do_sample=False)
                return f"{head}, {_strip_figure(proc.batch_decode(ids, skip_special_tokens=True)[0])}".strip()
            prompt = DescribeGenerator(self.ctx, self.seed)(image, volume_id)
            enc = proc(prompt, return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=self.max_length, do_sample=False)
            return f"{prompt} {proc.decode(ids[0, enc['input_ids'].shape[1] :], skip_special_tokens=True)}".strip()

    def _slice_image(self, image: np.ndarray, volume_id: str) -> Any:
        from PIL import Image

        ch = np.asarray(image[self.ctx["channel"]], np.float32)
        if ch.ndim == 3:
            z = ch.shape[0] // 2
            if self.slice == "random":
                z = int(np.random.default_rng(_seed(volume_id, self.seed)).integers(ch.shape[0]))
            elif self.slice == "finding" and (found := measure(image, self.ctx)["findings"]):
                z = int(round((found[0]["position"][0] + 1) * (ch.shape[0] - 1) / 2))
            ch = ch[z]
        lo, hi = np.percentile(ch, [0.5, 99.5])
        return Image.fromarray((np.clip((ch - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)).convert("RGB")


def _strip_figure(text: str) -> str:
    """Drop ``figure 1 :``-style prefixes that captioners trained on papers emit (as the released code does)."""
    return re.sub(r"^(figure|fig\.)\s*\d+\s*[:.]?\s*", "", text.strip(), flags=re.IGNORECASE)


def build_generator(cfg: Mapping[str, Any], datamodule: Any | None = None) -> DescribeGenerator | HFGenerator:
    """The generator named by ``cfg['backend']`` with its context resolved for ``datamodule`` (None: generic)."""
    ctx = context_for(datamodule, cfg.get("context"))
    backend, seed = cfg.get("backend", "describe"), int(cfg.get("seed", 0))
    if backend == "describe":
        return DescribeGenerator(ctx, seed)
    if backend == "hf":
        return HFGenerator(context=ctx, seed=seed, **dict(cfg.get("hf") or {}))
    raise ValueError(f"method.model.textgen.backend must be 'describe' or 'hf', got {backend!r}")


class TextSource:
    """Texts for volumes: from the cache when there, else generated once and cached."""

    def __init__(self, generator: DescribeGenerator | HFGenerator, cache_dir: str | os.PathLike | None) -> None:
        self.generator = generator
        self.cache = TextCache(cache_dir, generator.name, generator.settings()) if cache_dir else None
        self.generated = 0  # how many texts this source had to generate (the rest came from the cache)

    def text(self, image: np.ndarray, volume_id: str) -> str:
        chash = content_hash(image)
        if self.cache is not None and (hit := self.cache.get(volume_id, chash)) is not None:
            return hit
        out = self.generator(image, volume_id)
        self.generated += 1
        if self.cache is not None:
            self.cache.put(volume_id, chash, out)
        return out
