"""GTGM's two pre-training views: a random crop, then perturbations as the released data provider applies them.

The released provider (``pretrain/dataloader/data_provider_pretraining.py``, switches ``if_*_aug_unlabel`` in
``config/pretraining_all.yaml``) crops a sub-volume and, with ``per_mode: 1``, applies ONE perturbation per view,
drawn uniformly from the enabled ones: flip, in-plane 90-degree rotation, intensity, Gaussian noise
(std 0.01 to 0.2) and Gaussian blur (sigma 0 to 2). Here each perturbation is a MONAI transform; ``pick: all``
applies every enabled one with probability ``prob`` instead.

Flips and rotations would contradict a text that names directions ("right lobe"), so they only act on axes
the text generator names no direction along; a perturbation left with no axis drops out of the pool.
MONAI draws from its own NumPy state, so each call reseeds it from torch's generator: the views follow the
harness's per-batch seeding, and a resumed run draws the same views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    CenterSpatialCrop,
    Compose,
    OneOf,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandRotate90,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSpatialCrop,
)
from torch import Tensor

PERTURBATIONS = ("flip", "rotate90", "intensity", "noise", "blur")
PICKS = ("one", "all")


class ViewMaker:
    """Makes one view per sample of a batch (``train=False``: the centre crop only, so val losses compare).

    Args:
        spatial_dims: 2 or 3.
        crop_fraction: side of the random crop as a fraction of the input's side.
        perturbations: enabled subset of ``PERTURBATIONS``.
        pick: ``one`` (released: one perturbation per view, uniformly among the allowed ones) or ``all``.
        prob: probability of each perturbation under ``pick: all`` (flips always use ``flip_prob`` per axis).
        flip_prob: per-axis flip probability inside the flip perturbation.
        intensity_scale, intensity_shift: intensity factor 1 +- s and offset +- s.
        noise_std: Gaussian noise std, drawn per view from U(0, noise_std).
        blur_sigma: (low, high) range of the Gaussian blur sigma along each axis.
        fixed_axes: spatial axes the text names directions along (no flip, no rotation across them).
    """

    def __init__(
        self,
        spatial_dims: int,
        *,
        crop_fraction: float = 0.75,
        perturbations: Sequence[str] = PERTURBATIONS,
        pick: str = "one",
        prob: float = 0.5,
        flip_prob: float = 0.5,
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        noise_std: float = 0.2,
        blur_sigma: Sequence[float] = (0.0, 2.0),
        fixed_axes: Sequence[int] = (),
    ) -> None:
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"method.model.views.crop_fraction must be in (0, 1], got {crop_fraction}")
        if unknown := sorted(set(perturbations) - set(PERTURBATIONS)):
            raise ValueError(f"method.model.views.perturbations: unknown {unknown}; allowed {list(PERTURBATIONS)}")
        if pick not in PICKS:
            raise ValueError(f"method.model.views.pick must be one of {list(PICKS)}, got {pick!r}")
        if len(blur_sigma) != 2 or not 0 <= blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(
                f"method.model.views.blur_sigma must be [low, high] with 0 <= low <= high, got {blur_sigma}"
            )
        self.spatial_dims, self.crop_fraction, self.pick, self.prob = spatial_dims, float(crop_fraction), pick, prob
        free = [a for a in range(spatial_dims) if a not in set(fixed_axes)]
        plane = tuple(range(spatial_dims))[-2:]  # the released code rotates in the (H, W) plane
        sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        makers = {
            "flip": lambda p: Compose([RandFlip(prob=flip_prob, spatial_axis=a) for a in free]) if free else None,
            "rotate90": lambda p: RandRotate90(prob=p, spatial_axes=plane) if set(plane) <= set(free) else None,
            "intensity": lambda p: Compose(
                [
                    RandScaleIntensity(factors=intensity_scale, prob=p),
                    RandShiftIntensity(offsets=intensity_shift, prob=p),
                ]
            ),
            "noise": lambda p: RandGaussianNoise(prob=p, std=noise_std),
            "blur": lambda p: RandGaussianSmooth(sigma, sigma, sigma, prob=p),
        }
        p = 1.0 if pick == "one" else float(prob)
        built = {name: makers[name](p) for name in PERTURBATIONS if name in perturbations}
        #: the perturbations that can act on this data, in ``PERTURBATIONS`` order
        self.active = [name for name, t in built.items() if t is not None]
        chosen = [built[name] for name in self.active]
        self._perturb = (OneOf(chosen) if pick == "one" else Compose(chosen)) if chosen else None

    def crop_size(self, spatial: Sequence[int]) -> list[int]:
        return [max(1, round(s * self.crop_fraction)) for s in spatial]

    def __call__(self, images: Tensor, train: bool = True) -> Tensor:
        crop = self.crop_size(images.shape[2:])
        if "rotate90" in self.active and len(set(crop[-2:])) > 1:
            raise ValueError(
                f"method.model.views: rotate90 needs a square in-plane crop, got {crop[-2:]}; "
                "drop rotate90 from method.model.views.perturbations for non-square inputs"
            )
        if not train:
            return torch.stack([CenterSpatialCrop(crop)(x) for x in images]).as_subclass(Tensor)
        cropper = RandSpatialCrop(crop, random_size=False)
        seed = int(torch.randint(0, 2**31 - 1, ()))
        cropper.set_random_state(seed)
        if self._perturb is not None:
            self._perturb.set_random_state(seed + 1)
        views = []
        for x in images:
            v = cropper(x)
            if self._perturb is not None:
                v = self._perturb(v)
            views.append(torch.as_tensor(v).as_subclass(Tensor).to(images.dtype))
        return torch.stack(views)
