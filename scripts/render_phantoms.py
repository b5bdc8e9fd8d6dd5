"""Render a PNG grid of phantom samples (CXR, CT, all four MRI modalities) with mask outlines.

Usage: python scripts/render_phantoms.py OUT.png [--n 4] [--seed 0] [--size2d 128] [--size3d 64]
Meant for eyeballing the generators after a change: titles carry the labels, outlines the label map.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

_COLORS = ("red", "yellow", "cyan", "magenta")


def load(name: str) -> types.ModuleType:
    """The installed module if there is one, else datasets/<name>.py imported by path."""
    try:
        return importlib.import_module(f"medvlp_bench.datasets.{name}")
    except ImportError:
        pkg_name = "_phantom_datasets"
        if pkg_name not in sys.modules:
            pkg = types.ModuleType(pkg_name)
            pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "datasets")]
            sys.modules[pkg_name] = pkg
        return importlib.import_module(f"{pkg_name}.{name}")


def _slice_of(sample) -> int:
    """Middle axial slice, or the middle slice of the findings when there are any."""
    zs = sorted({z for v in sample.meta.get("finding_slices", {}).values() for z in v})
    return zs[len(zs) // 2] if zs else sample.image.shape[1] // 2


def _panel(ax, img, mask, title, vmin, vmax) -> None:
    ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    for k in range(1, int(mask.max()) + 1):
        if (mask == k).any():
            ax.contour(mask == k, levels=[0.5], colors=_COLORS[(k - 1) % 4], linewidths=0.7)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size2d", type=int, default=128)
    p.add_argument("--size3d", type=int, default=64)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cxr, ct, mri = load("phantom_cxr"), load("phantom_ct"), load("phantom_mri")
    cols = max(args.n, 4)
    fig, axes = plt.subplots(2 + args.n, cols, figsize=(2.6 * cols, 2.7 * (2 + args.n)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(args.n):
        s = cxr.generate(i, seed=args.seed, size=args.size2d)
        names = [f for f, v in zip(cxr.FINDINGS, s.labels) if v] or ["normal"]
        _panel(axes[0, i], s.image[0], s.mask, f"CXR {i}: " + ", ".join(names), 0, 1)
        s = ct.generate(i, seed=args.seed, size=args.size3d)
        z = _slice_of(s)
        names = [f for f, v in zip(ct.FINDINGS, s.labels) if v] or ["normal"]
        _panel(axes[1, i], s.image[0, z], s.mask[z], f"CT {i} z={z}: " + ", ".join(names), -160, 240)
        s = mri.generate(i, seed=args.seed, size=args.size3d)
        z = _slice_of(s)
        for c, mod in enumerate(mri.MODALITIES):
            title = f"MRI {i} {mod} z={z}: {mri.CLASSES[int(s.labels)]}"
            _panel(axes[2 + i, c], s.image[c, z], s.mask[z], title, 0, 1)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
