"""Batched, on-device augmentation for training (2D and 3D).

Per-sample CPU transforms (MONAI ``RandAffined``) cost more than a small model's step on a 2-core machine
and starve a GPU at 96^3; one ``affine_grid``/``grid_sample`` over the whole batch on the training device
does the same job for all samples at once. Geometry is mild on purpose: no flips, which would contradict
the laterality words of the reports. Masks, when present, follow the image with nearest interpolation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchAugment:
    """Random rotation/scale/shift, intensity scale/shift and Gaussian noise, applied per sample in a batch.

    Args:
        rotate: max rotation in radians (per axis for 3D).
        scale: max relative zoom (uniform in [1 - scale, 1 + scale]).
        shift: max translation as a fraction of the half-extent.
        intensity: max relative intensity scale and absolute shift.
        noise: max std of additive Gaussian noise.
        prob: probability that a sample is transformed geometrically.
    """

    def __init__(
        self,
        rotate: float = 0.1,
        scale: float = 0.1,
        shift: float = 0.05,
        intensity: float = 0.1,
        noise: float = 0.02,
        prob: float = 0.8,
    ) -> None:
        self.rotate, self.scale, self.shift = rotate, scale, shift
        self.intensity, self.noise, self.prob = intensity, noise, prob

    def _matrices(self, n: int, dims: int, device: torch.device) -> Tensor:
        def u(*shape: int) -> Tensor:
            return torch.rand(*shape, device=device) * 2 - 1

        zoom = 1 + self.scale * u(n, 1)
        if dims == 2:
            a = self.rotate * u(n)
            c, s = torch.cos(a), torch.sin(a)
            rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        else:
            rot = torch.eye(3, device=device).expand(n, 3, 3)
            for axis in range(3):
                a = self.rotate * u(n)
                c, s = torch.cos(a), torch.sin(a)
                r = torch.eye(3, device=device).repeat(n, 1, 1)
                i, j = [k for k in range(3) if k != axis]
                r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
                rot = rot @ r
        lin = rot / zoom.unsqueeze(-1)
        keep = (torch.rand(n, device=device) >= self.prob).view(n, 1, 1)
        lin = torch.where(keep, torch.eye(dims, device=device).expand(n, dims, dims), lin)
        trans = torch.where(keep.view(n, 1), torch.zeros(n, dims, device=device), self.shift * u(n, dims))
        return torch.cat([lin, trans.unsqueeze(-1)], -1)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Augment ``batch["image"]`` (and ``batch["mask"]``) on their device with the global RNG."""
        img: Tensor = batch["image"]
        n, dims = img.shape[0], img.ndim - 2
        theta = self._matrices(n, dims, img.device).to(img.dtype)
        grid = F.affine_grid(theta, list(img.shape), align_corners=False)
        out = dict(batch)
        out["image"] = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if "mask" in batch and isinstance(batch["mask"], Tensor):
            m = batch["mask"].to(img.dtype)
            out["mask"] = F.grid_sample(m, grid, mode="nearest", padding_mode="zeros", align_corners=False).to(
                batch["mask"].dtype
            )
        shape = (n, 1) + (1,) * dims
        r = lambda: torch.rand(shape, device=img.device, dtype=img.dtype) * 2 - 1  # noqa: E731
        x = out["image"] * (1 + self.intensity * r()) + self.intensity * r()
        if self.noise > 0:
            std = self.noise * torch.rand(shape, device=img.device, dtype=img.dtype)
            x = x + std * torch.randn_like(x)
        out["image"] = x
        return out


def describe(aug: BatchAugment | None) -> str:
    if aug is None:
        return "none"
    return (
        f"rotate<={math.degrees(aug.rotate):.0f}deg scale+-{aug.scale:g} shift+-{aug.shift:g} "
        f"intensity+-{aug.intensity:g} noise<={aug.noise:g} p={aug.prob:g}"
    )
