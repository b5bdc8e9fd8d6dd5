"""``gtgm``: GTGM (arXiv 2306.04811; official code ydchen0806/GTGM), generated text for 3D volumes.

Volumes come without reports, so text is generated from the pixels (``gtgm_textgen``: the offline ``describe``
backend by default, or a local Hugging Face captioner/LM) once per volume and cached on disk. Per step, two
augmented crops v1, v2 of each volume are encoded by the Swin trunk (pooled features f1, f2) and projected
(Linear -> BN -> ReLU -> Linear -> non-affine BN) next to the projected text t:

    L = CLIP(v1, t) + CLIP(v2, t) + bt_weight * BT(f1, f2)

CLIP is the symmetric InfoNCE at a fixed temperature, summed over both directions (the released code adds
image->text and text->image cross-entropies); negatives are gathered across ranks (the released code uses
per-GPU negatives only). BT is the released code's Barlow-Twins term on the raw pooled features:
C = f1^T f2 / N, BT = (sum_i (1 - C_ii)^2 + w * sum_{i != j} C_ij^2) / 2, w = 0.0051; ``bt_standardize``
switches to the Barlow Twins paper's batch-standardised form (``losses.barlow_twins``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from medvlp_bench import distributed
from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.losses import barlow_twins, clip_loss
from medvlp_bench.method import Method
from medvlp_bench.methods.gtgm_textgen import TextSource, build_generator
from medvlp_bench.text import TextEncoder
from medvlp_bench.types import Batch

log = logging.getLogger(__name__)


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """GTGM's head: Linear -> BN -> ReLU -> Linear -> BN without affine parameters."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
        nn.BatchNorm1d(out_dim, affine=False),
    )


def cross_correlation_loss(z1: Tensor, z2: Tensor, off_diagonal_weight: float = 0.0051, standardize: bool = False):
    """GTGM's Barlow-Twins term over the gathered batch (see the module docstring for the formula)."""
    if standardize:
        return barlow_twins(z1, z2, off_diagonal_weight)
    z1, z2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)
    c = z1.float().T @ z2.float() / z1.shape[0]
    diag = torch.diagonal(c)
    on = (diag - 1).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return (on + off_diagonal_weight * off) / 2


class GTGM(Method):
    """GTGM on a MONAI Swin trunk and a BERT-family text tower.

    Args:
        textgen: text generation settings: ``backend`` (describe | hf), ``seed``, ``cache_dir`` (None: no disk
            cache), ``context`` (overrides of the measurement context) and ``hf`` (HFGenerator arguments).
        proj_hidden: hidden width of both projection heads (2048 in the paper); ``embed_dim`` is the output (512).
        temperature: fixed CLIP temperature (0.07, not learned).
        bt_weight, bt_off_diagonal, bt_standardize: the Barlow-Twins term's weight (0.01), off-diagonal weight
            (0.0051) and form (raw cross-correlation as released, or batch-standardised).
        crop_fraction: side of each random crop as a fraction of the input's side.
        flip_prob: per-axis flip probability, only on axes the generated text names no direction along.
        intensity_scale, intensity_shift: per-view random intensity scale (1 +- s) and shift (+- s).
    """

    impl_source: ClassVar[str] = "official-code"

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        *,
        textgen: Mapping[str, Any] | None = None,
        proj_hidden: int = 2048,
        temperature: float = 0.07,
        bt_weight: float = 0.01,
        bt_off_diagonal: float = 0.0051,
        bt_standardize: bool = False,
        crop_fraction: float = 0.75,
        flip_prob: float = 0.5,
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        **kw: Any,
    ) -> None:
        super().__init__(image_encoder, text_encoder, **kw)
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"method.model.crop_fraction must be in (0, 1], got {crop_fraction}")
        self.image_proj = projection_head(image_encoder.out_dim, proj_hidden, self.embed_dim)
        self.text_proj = projection_head(text_encoder.out_dim, proj_hidden, self.embed_dim)
        self.temperature, self.bt_weight = float(temperature), float(bt_weight)
        self.bt_off_diagonal, self.bt_standardize = float(bt_off_diagonal), bool(bt_standardize)
        self.crop_fraction, self.flip_prob = float(crop_fraction), float(flip_prob)
        self.intensity_scale, self.intensity_shift = float(intensity_scale), float(intensity_shift)
        cfg = OmegaConf.to_container(textgen, resolve=True) if isinstance(textgen, DictConfig) else textgen
        self.textgen_cfg: dict[str, Any] = dict(cfg or {})
        self._source: TextSource | None = None
        self._texts: dict[str, str] = {}

    # ---- joint space ---------------------------------------------------------------------------
    def embed_image(self, image: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.encode_image(image)), dim=-1)

    def embed_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.text_proj(self.text_encoder(**text).pooled), dim=-1)

    # ---- generated text ------------------------------------------------------------------------
    @property
    def text_source(self) -> TextSource:
        """Generator + cache; built for the fitted datamodule in ``on_fit_start``, else with a generic context."""
        if self._source is None:
            self._source = TextSource(build_generator(self.textgen_cfg), self.textgen_cfg.get("cache_dir"))
        return self._source

    def on_fit_start(self) -> None:
        """Generate (or read from the cache) the text of every training and validation volume, un-augmented.

        The datamodule augments batches on the device before ``pretrain_step`` sees them, so texts are made
        here from the raw datasets. Ranks share the generation and then read each other's texts from the cache.
        """
        dm = getattr(self.trainer, "datamodule", None)
        self._source = TextSource(build_generator(self.textgen_cfg, dm), self.textgen_cfg.get("cache_dir"))
        if dm is None or not hasattr(dm, "dataset"):
            return
        datasets = []
        for split in ("train", "val"):
            try:
                datasets.append(dm.dataset(split))
            except ValueError:  # an empty split
                continue
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shared = world > 1 and self._source.cache is not None
        if shared:
            for ds in datasets:
                for i in range(rank, len(ds), world):
                    self._text_of(ds[i])
            self.trainer.strategy.barrier("gtgm_text")
        for ds in datasets:
            for i in range(len(ds)):
                sample = ds[i]
                self._texts[str(sample["id"])] = self._text_of(sample)
        log.info("gtgm: %d texts ready (%d generated now)", len(self._texts), self._source.generated)

    def _text_of(self, sample: Mapping[str, Any]) -> str:
        image = sample["image"]
        image = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else image
        return self.text_source.text(image, str(sample["id"]))

    def texts_for(self, batch: Batch) -> list[str]:
        """The generated text of each volume in the batch; volumes not prepared in ``on_fit_start`` (no
        datamodule, or a direct call) get theirs from the batch image, which is augmented during training."""
        out = []
        for i, vid in enumerate(batch["id"]):
            if vid not in self._texts:
                if self._trainer is not None and self._trainer.training:
                    log.warning("gtgm: no prepared text for %s; generating it from the augmented batch image", vid)
                self._texts[vid] = self._text_of({"image": batch["image"][i], "id": vid})
            out.append(self._texts[vid])
        return out

    # ---- views -----------------------------------------------------------------------------------
    def view(self, image: Tensor) -> Tensor:
        """One view per sample: a random crop, flips along direction-free axes and an intensity change
        (MONAI's RandSpatialCrop / RandFlip / RandScaleIntensity / RandShiftIntensity as batched torch ops);
        in eval mode the centre crop only, so validation losses are comparable."""
        b, spatial = image.shape[0], image.shape[2:]
        crop = [max(1, round(s * self.crop_fraction)) for s in spatial]
        fixed = set(self.text_source.generator.oriented_axes())
        views = []
        for x in image:
            if self.training:
                starts = [int(torch.randint(0, s - c + 1, ())) for s, c in zip(spatial, crop)]
            else:
                starts = [(s - c) // 2 for s, c in zip(spatial, crop)]
            v = x[(slice(None), *(slice(a, a + c) for a, c in zip(starts, crop)))]
            axes = [d + 1 for d in range(len(spatial)) if d not in fixed and bool(torch.rand(()) < self.flip_prob)]
            views.append(v.flip(axes) if axes and self.training else v)
        out = torch.stack(views)
        if not self.training:
            return out
        shape = (b, 1) + (1,) * len(spatial)
        scale = 1 + self.intensity_scale * (2 * torch.rand(shape, device=out.device, dtype=out.dtype) - 1)
        shift = self.intensity_shift * (2 * torch.rand(shape, device=out.device, dtype=out.dtype) - 1)
        return out * scale + shift

    # ---- objective -------------------------------------------------------------------------------
    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        tok = {k: v.to(self.device) for k, v in self.text_encoder.tokenizer(self.texts_for(batch)).items()}
        txt = self.embed_text(tok)
        f1, f2 = self.encode_image(self.view(batch["image"])), self.encode_image(self.view(batch["image"]))
        scale = 1.0 / self.temperature
        # open_clip's ClipLoss averages the two directions; the released code adds them
        clip1 = 2 * clip_loss(F.normalize(self.image_proj(f1), dim=-1), txt, scale)
        clip2 = 2 * clip_loss(F.normalize(self.image_proj(f2), dim=-1), txt, scale)
        bt = cross_correlation_loss(f1, f2, self.bt_off_diagonal, self.bt_standardize)
        loss = clip1 + clip2 + self.bt_weight * bt
        return {"loss": loss, "clip_view1": clip1.detach(), "clip_view2": clip2.detach(), "barlow_twins": bt.detach()}
