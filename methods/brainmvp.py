"""``brainmvp``: BrainMVP (arXiv 2410.10604, CVPR 2025), multi-modal MRI pre-training, after the official code
(shaohao011/BrainMVP: ``models/Uniformer.py``, ``utils/ops.py``, ``losses/loss.py``).

Per sample: one modality m of the study (the encoder has one input channel), a random crop, split into blocks
of which ``mask_ratio`` are masked, twice with independent masks:

    view 1 = x_m with masked blocks from the learnable template of modality m (cropped at the same place)
    view 2 = x_m with masked blocks from another modality o != m of the same study (template during warm-up)
    L = w1 MSE(D(E(view 1)), x_m) + w2 MSE(D(E(view 2)), x_m) + wc InfoNCE_sym(E(view 2), E(view 1); tau)

E(.) is the deepest feature map (flattened), D the method-private reconstruction decoder: a chain of 2x
transposed convolutions from the deepest map, no skips and no nonlinearity, as the authors' decoder. The
contrastive term is on from ``contrast_start`` (a fraction of the epochs). Downstream, ``adapt_to_input``
inflates the pre-trained stem for multi-channel data under frozen protocols and, when fine-tuning, drops or
inflates it (``channel_adapt``); ``mix_in`` optionally swaps input channels for templates while fine-tuning.
Equations, defaults and deviations: docs/methods/brainmvp.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn

from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.losses import info_nce
from medvlp_bench.method import Method
from medvlp_bench.methods import brainmvp_masking as bm
from medvlp_bench.proxy import ProxyScore, gain_verdict
from medvlp_bench.types import Batch, ImageFeatures


class ReconstructionDecoder(nn.Module):
    """log2(stride) transposed 2x convolutions (channels halved, >= ``min_channels``) and a 1x1 output conv.

    Linear like the authors' ``UniSegDecoder`` (it only uses each ``UnetrUpBlock``'s ``transp_conv``), so the
    encoder has to carry the content. Output sizes that are not the crop size (odd encoder rounding) are
    resampled to it.
    """

    def __init__(self, spatial_dims: int, in_channels: int, stride: int, min_channels: int = 16) -> None:
        super().__init__()
        steps = math.log2(stride)
        if steps != int(steps):
            raise ValueError(f"reconstruction decoder needs a power-of-two deepest stride, got {stride}")
        layers, ch = [], in_channels
        for _ in range(int(steps)):
            out = max(ch // 2, min_channels)
            layers.append(
                get_conv_layer(spatial_dims, ch, out, kernel_size=2, stride=2, conv_only=True, is_transposed=True)
            )
            ch = out
        self.up = nn.Sequential(*layers)
        self.out = UnetOutBlock(spatial_dims, ch, 1)

    def forward(self, deepest: Tensor, size: Sequence[int]) -> Tensor:
        y = self.out(self.up(deepest))
        if tuple(y.shape[2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode="trilinear" if y.ndim == 5 else "bilinear", align_corners=False)
        return y


class BrainMVP(Method):
    """BrainMVP on a shared one-channel encoder (the authors' UniFormer is not in MONAI; see the docs).

    Args:
        modalities: channel names of the pre-training data, in channel order; one template per entry.
        template_size: side of each template volume (the data's size; the authors use a 240x240x155 canvas).
        crop_size: side of the random crop per sample (authors 96); at least twice the encoder's deepest stride.
        block_size, mask_ratio: mask blocks of ``block_size``^dims; floor(n (1 - ratio)) blocks are kept.
        template_norm: ``minmax`` (authors, [0, 1] data) | ``zscore`` (z-normalised data) | ``none``.
        template_warmup: fraction of the epochs in which view 2 is filled from the template too (authors 300/1500).
        contrast_start: fraction of the epochs after which the contrastive term is on (authors 1000/1500).
        rec_weight_template, rec_weight_cross, contrast_weight: w1, w2, wc (authors 10, 1, 1).
        temperature: InfoNCE temperature (authors 1.0).
        channel_adapt: stem for other channel counts when fine-tuning: ``drop`` (authors) | ``inflate`` | ``none``
            (refuse). Frozen protocols always inflate (``adapt_to_input``).
        mix_in: downstream only, max input channels replaced by templates per fine-tuning sample (0 = off).
    """

    impl_source: ClassVar[str] = "official-code"
    #: 2: frozen protocols inflate the pre-trained stem (was: a random stem under ``drop``); crop >= 2 x stride
    version: ClassVar[int] = 2

    def __init__(
        self,
        image_encoder: ImageEncoder,
        *,
        modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
        template_size: int | Sequence[int] = 64,
        crop_size: int | Sequence[int] = 96,
        block_size: int = 8,
        mask_ratio: float = 0.875,
        template_norm: str = "zscore",
        template_warmup: float = 0.2,
        contrast_start: float = 2 / 3,
        rec_weight_template: float = 10.0,
        rec_weight_cross: float = 1.0,
        contrast_weight: float = 1.0,
        temperature: float = 1.0,
        channel_adapt: str = "drop",
        mix_in: int = 0,
        decoder_min_channels: int = 16,
        **kw,
    ) -> None:
        super().__init__(image_encoder, None, **kw)
        dims = image_encoder.spatial_dims
        self.modalities = list(modalities)
        self.crop = ensure_tuple_rep(crop_size, dims)
        self.template_shape = ensure_tuple_rep(template_size, dims)
        self._check(block_size, mask_ratio, template_norm, channel_adapt)
        self._check_crop_vs_stride(image_encoder.feature_strides[-1])
        self.block_size, self.mask_ratio, self.template_norm = block_size, mask_ratio, template_norm
        self.template_warmup, self.contrast_start = template_warmup, contrast_start
        self.weights = (rec_weight_template, rec_weight_cross, contrast_weight)
        self.temperature, self.channel_adapt, self.mix_in = temperature, channel_adapt, mix_in
        # zero init as the authors ("accelerates template learning"); "no_decay" keeps AdamW's decay off them
        self.templates_no_decay = nn.Parameter(torch.zeros(len(self.modalities), *self.template_shape))
        self.rec_decoder = ReconstructionDecoder(
            dims, image_encoder.feature_channels[-1], image_encoder.feature_strides[-1], decoder_min_channels
        )
        #: training progress in [0, 1] used when no trainer is attached (tests, notebooks)
        self.fixed_progress: float | None = None

    def _check(self, block: int, ratio: float, norm: str, adapt: str) -> None:
        if len(self.modalities) < 2:
            raise ValueError(
                f"method.model.modalities needs >= 2 entries (view 2 mixes modalities), got {self.modalities}"
            )
        if any(c % block for c in self.crop):
            raise ValueError(f"method.model.crop_size {self.crop} must be a multiple of block_size {block}")
        if any(c > t for c, t in zip(self.crop, self.template_shape)):
            raise ValueError(f"method.model.crop_size {self.crop} exceeds template_size {self.template_shape}")
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"method.model.mask_ratio must be in [0, 1), got {ratio}")
        if norm not in bm.TEMPLATE_NORMS:
            raise ValueError(f"method.model.template_norm must be one of {bm.TEMPLATE_NORMS}, got {norm!r}")
        if adapt not in bm.CHANNEL_ADAPT:
            raise ValueError(f"method.model.channel_adapt must be one of {bm.CHANNEL_ADAPT}, got {adapt!r}")

    def _check_crop_vs_stride(self, stride: int) -> None:
        """The deepest map must be at least 2 voxels per axis: at one voxel the linear decoder only sees a
        global code of a randomly placed crop and reconstruction stays at the predict-zero error (measured)."""
        if any(c < 2 * stride for c in self.crop):
            raise ValueError(
                f"method.model.crop_size {self.crop} is below 2 x the encoder's deepest stride {stride}: needs >= "
                f"{2 * stride} per axis (a larger crop, or an encoder with a shallower stride, e.g. uniformer_tiny: 16)"
            )

    # ---- schedule ------------------------------------------------------------------------------
    def progress(self) -> float:
        """Fraction of the pre-training epochs done (epoch granularity, as the authors' epoch thresholds)."""
        if self.fixed_progress is not None or self._trainer is None:
            return float(self.fixed_progress or 0.0)
        return self.trainer.current_epoch / max(int(self.trainer.max_epochs or 1), 1)

    def templates(self) -> Tensor:
        """[M, *T] normalised templates (normalised over the whole volume, then cropped, as the authors)."""
        return bm.normalise_templates(self.templates_no_decay, self.template_norm)

    # ---- pre-training ----------------------------------------------------------------------------
    def make_views(self, image: Tensor, progress: float) -> dict[str, Tensor]:
        """Both masked views of one random modality per sample, plus everything needed to check them."""
        self._check_batch(image)
        b, c, size = image.shape[0], image.shape[1], image.shape[2:]
        dev = image.device
        offsets = bm.random_offsets(b, size, self.crop, dev)
        x = bm.crop_at(image, offsets, self.crop)
        modality = torch.randint(0, c, (b,), device=dev)
        other = bm.other_modality(modality, c)
        target = bm.pick(x, modality)
        # the image sits centred on the template canvas (the authors' centre shift)
        shift = torch.tensor([(t - s) // 2 for t, s in zip(self.template_shape, size)], device=dev)
        template = bm.template_crops(self.templates(), modality, offsets + shift, self.crop)
        cross = progress >= self.template_warmup
        filler = bm.pick(x, other) if cross else template
        mask1 = bm.block_mask(b, self.crop, self.block_size, self.mask_ratio, dev).unsqueeze(1)
        mask2 = bm.block_mask(b, self.crop, self.block_size, self.mask_ratio, dev).unsqueeze(1)
        return {
            "view1": torch.where(mask1, template, target),
            "view2": torch.where(mask2, filler, target),
            "target": target,
            "mask1": mask1,
            "mask2": mask2,
            "modality": modality,
            "other": other,
            "offsets": offsets,
            "crops": x,
            "cross": torch.tensor(float(cross), device=dev),
        }

    def _check_batch(self, image: Tensor) -> None:
        dims, c = self.image_encoder.spatial_dims, image.shape[1]
        if image.ndim != dims + 2 or c < 2:
            raise ValueError(
                f"BrainMVP pre-trains on multi-modal {dims}D images [B, C>=2, *S]; got {tuple(image.shape)}. "
                "Use a multi-modal corpus (data=phantom_mri, brats, ...): configs/method/brainmvp.yaml `requires`"
            )
        if c != len(self.modalities):
            raise ValueError(
                f"batch has {c} channels but method.model.modalities lists {len(self.modalities)}: {self.modalities}"
            )
        if any(s < k for s, k in zip(image.shape[2:], self.crop)):
            raise ValueError(f"method.model.crop_size {self.crop} exceeds the image size {tuple(image.shape[2:])}")
        if any(s > t for s, t in zip(image.shape[2:], self.template_shape)):
            raise ValueError(
                f"image size {tuple(image.shape[2:])} exceeds method.model.template_size {self.template_shape}"
            )

    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        v = self.make_views(batch["image"], self.progress())
        b = v["target"].shape[0]
        feats = self.image_encoder(torch.cat([v["view1"], v["view2"]]))
        deepest = feats.maps[-1]
        rec = self.rec_decoder(deepest, self.crop)
        rec1, rec2 = F.mse_loss(rec[:b], v["target"]), F.mse_loss(rec[b:], v["target"])
        w1, w2, wc = self.weights
        contrast = rec1.new_zeros(())
        if wc > 0 and self.progress() >= self.contrast_start:
            teacher, student = deepest[:b].flatten(1), deepest[b:].flatten(1)
            t = self.temperature  # the authors' Contrast_Loss: mean of both directions
            contrast = 0.5 * (info_nce(student, teacher, t) + info_nce(teacher, student, t))
        loss = w1 * rec1 + w2 * rec2 + wc * contrast
        return {"loss": loss, "rec_template": rec1, "rec_cross": rec2, "contrast": contrast, "cross_modal": v["cross"]}

    @torch.no_grad()
    def proxy_score(self, loader: Iterable[dict[str, Any]]) -> ProxyScore | None:
        """Proof of learning: held-out reconstruction error of view 1 (masked blocks from the template) beside
        the error of the best input-independent prediction, each voxel's mean over the held-out targets: no
        model whose encoder carries nothing about the input can do better, so beating it shows that it does.
        The generic val-loss proxy cannot judge this objective: its terms switch on with the epochs (cross-modal
        view 2, InfoNCE), so the loss rises while the model learns. Crops, modalities and masks are fixed
        (seed 0; the global RNG is left as it was), so the epochs' scores are comparable."""
        err, n, s1, s2 = 0.0, 0, 0.0, 0.0
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            for batch in loader:
                v = self.make_views(batch["image"].to(self.device), progress=0.0)
                target = v["target"].double()
                rec = self.rec_decoder(self.image_encoder(v["view1"]).maps[-1], self.crop).double()
                err += float(((rec - target) ** 2).sum())
                n, s1, s2 = n + len(target), s1 + target.sum(0), s2 + (target**2).sum(0)
        if n == 0:
            return None
        voxels = n * math.prod(self.crop)
        value, mean_err = err / voxels, float((s2 - s1**2 / n).sum()) / voxels
        learned = gain_verdict(value, mean_err)
        return ProxyScore("reconstruction", {"rec_template": value}, {"per_voxel_mean": mean_err}, learned)

    # ---- downstream ------------------------------------------------------------------------------
    def adapt_to_input(self, in_channels: int, *, frozen: bool = True) -> None:
        """Re-make the stem for ``in_channels``.

        ``frozen`` (linear probe, frozen features, frozen segmentation): always ``inflate`` (W / C per channel),
        deterministic, so the frozen encoder is the pre-trained one end to end; the authors drop the stem only
        to fine-tune it. Fine-tuning: ``channel_adapt`` (``drop``: fresh init, ``inflate``). ``none`` refuses.
        """
        enc = self.image_encoder
        if enc.in_channels == in_channels:
            return
        if self.channel_adapt == "none":
            super().adapt_to_input(in_channels, frozen=frozen)
        parent, attr, conv = bm.first_conv(enc, enc.in_channels)
        setattr(parent, attr, bm.adapted_conv(conv, in_channels, "inflate" if frozen else self.channel_adapt))
        enc.in_channels = in_channels

    def image_features(self, image: Tensor) -> ImageFeatures:
        """Backbone features; while fine-tuning with ``mix_in`` > 0, first swap random channels for templates."""
        if self.training and self.mix_in > 0 and image.shape[1] == len(self.modalities):
            image = self.mix_in_templates(image)
        return self.image_encoder(image)

    def mix_in_templates(self, image: Tensor) -> Tensor:
        """The authors' ``RandomChannelCutmix``: per sample, k ~ U{0..min(mix_in, C-1)} distinct channels are
        replaced by their modality's template (fitted to the image size; no gradient to the templates)."""
        c = image.shape[1]
        tmpl = bm.fit_to(self.templates().detach(), image.shape[2:]).to(image.dtype)
        out = image.clone()
        for i in range(image.shape[0]):
            k = int(torch.randint(0, min(self.mix_in, c - 1) + 1, ()))
            for ch in torch.randperm(c)[:k].tolist():
                out[i, ch] = tmpl[ch]
        return out
