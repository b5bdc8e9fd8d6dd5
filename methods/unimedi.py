"""``unimedi``: UniMedI (arXiv 2311.14851), one encoder for 2D X-rays and 3D CT with reports as the common space.

No official code exists (``impl_source: paper``); what the paper leaves open is a constructor argument with
a documented default (docs/methods/unimedi.md). Per training step the batch is either 2D or 3D (the
corpus alternates, see ``datasets/mixed.py``) and the loss is

    L = w_clip * CLIP(student(x), report)                      image-report contrast, negatives from all ranks
      + w_distill * SD(x)                                       masked-image self-distillation, EMA teacher
      + w_slice * CLIP(student(slice), report)      [3D only]   text-selected slices as 2D images

SD: the student sees x with ``mask_ratio`` of its patch tokens replaced by [MASK]; a predictor maps its
final tokens onto the teacher's final tokens of the full x, loss = mean over masked tokens of 1 - cos.
Slice selection: the EMA teacher embeds every ``slice_stride``-th axial slice through the 2D path, scores it
by cosine with the report embedding, and keeps the top ``slice_ratio``; ``slices_per_volume`` of those are
drawn per step and contrasted with the report (pseudo 2D-3D pairs).
The teacher (image encoder + image projection) never receives gradients and follows p_t <- m p_t + (1-m) p_s
after every optimiser step; parameters without gradients are neither optimised nor synchronised by DDP.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp_bench.losses import clip_loss
from medvlp_bench.methods.clip import CLIP
from medvlp_bench.methods.unimedi_vit import UniMedIViT
from medvlp_bench.text import TextEncoder
from medvlp_bench.types import Batch

#: axial axis of a [B, C, D, H, W] volume (phantom_ct stores superior -> inferior along D)
AXIAL_AXIS = 2


class UniMedI(CLIP):
    """UniMedI on a shared 2D/3D ViT (:class:`UniMedIViT`); inherits CLIP's heads, temperature and embed API.

    Args:
        slice_ratio: fraction of the scored slices kept as text-related (top-k), paper-suggested 0.25.
        slice_stride: score every n-th axial slice (cost control; 1 scores all).
        slices_per_volume: selected slices drawn per volume and step, each a separate B x B contrast.
        mask_ratio: fraction of the student's patch tokens replaced by [MASK].
        ema_momentum: m in p_t <- m p_t + (1 - m) p_s.
        clip_weight, slice_weight, distill_weight: loss weights (1:1:1 by default).
        predictor_hidden: hidden width of the student's 2-layer token predictor (None: the encoder width).
        score_chunk: slices per teacher forward while scoring (bounds memory on large volumes).
        proj_batchnorm: put a BatchNorm1d in front of both projection heads (MoCo v3 style). A small ViT and a
            random text tower from scratch start with near-identical embeddings (mean cosine ~0.99) and,
            without it, collapse to one point with the loss stuck at ln(B) (measured, docs/methods/unimedi.md).
    """

    impl_source: ClassVar[str] = "paper"

    def __init__(
        self,
        image_encoder: UniMedIViT,
        text_encoder: TextEncoder,
        *,
        slice_ratio: float = 0.25,
        slice_stride: int = 2,
        slices_per_volume: int = 1,
        mask_ratio: float = 0.5,
        ema_momentum: float = 0.996,
        clip_weight: float = 1.0,
        slice_weight: float = 1.0,
        distill_weight: float = 1.0,
        predictor_hidden: int | None = None,
        score_chunk: int = 1024,
        proj_batchnorm: bool = True,
        **kw: Any,
    ) -> None:
        if not isinstance(image_encoder, UniMedIViT):
            raise TypeError(
                f"unimedi needs its shared 2D/3D ViT (medvlp_bench.methods.unimedi_vit.UniMedIViT) as "
                f"method.model.image_encoder, got {type(image_encoder).__name__}"
            )
        checks = {
            "slice_ratio": 0 < slice_ratio <= 1,
            "mask_ratio": 0 <= mask_ratio < 1,
            "ema_momentum": 0 <= ema_momentum <= 1,
            "slice_stride": slice_stride >= 1,
            "slices_per_volume": slices_per_volume >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"unimedi: invalid {', '.join(bad)} (ratios in (0, 1]/[0, 1), counts >= 1)")
        super().__init__(image_encoder, text_encoder, **kw)
        self.slice_ratio, self.slice_stride, self.slices_per_volume = slice_ratio, slice_stride, slices_per_volume
        self.mask_ratio, self.ema_momentum, self.score_chunk = mask_ratio, ema_momentum, score_chunk
        self.weights = {"clip": clip_weight, "slice": slice_weight, "distill": distill_weight}
        if proj_batchnorm:
            self.image_proj = nn.Sequential(nn.BatchNorm1d(image_encoder.out_dim), self.image_proj)
            self.text_proj = nn.Sequential(nn.BatchNorm1d(text_encoder.out_dim), self.text_proj)
        width = image_encoder.out_dim
        hidden = predictor_hidden or width
        self.predictor = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.teacher = nn.ModuleDict(
            {"encoder": copy.deepcopy(image_encoder), "proj": copy.deepcopy(self.image_proj)}
        ).requires_grad_(False)
        self.teacher.eval()
        self._ema_step = 0

    # ---- EMA teacher ------------------------------------------------------------------------------
    def _student(self) -> nn.Module:
        return nn.ModuleDict({"encoder": self.image_encoder, "proj": self.image_proj})

    def ema_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(teacher, student) parameter pairs, matched by name."""
        student = dict(self._student().named_parameters())
        return [(p, student[name]) for name, p in self.teacher.named_parameters()]

    @torch.no_grad()
    def ema_update(self) -> None:
        """p_t <- m p_t + (1 - m) p_s for every teacher parameter; buffers (BatchNorm statistics) are copied."""
        for p_t, p_s in self.ema_pairs():
            p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - self.ema_momentum)
        student = dict(self._student().named_buffers())
        for name, b_t in self.teacher.named_buffers():
            b_t.copy_(student[name])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once per optimiser step (global_step only advances then), so gradient accumulation is respected
        if self.trainer.global_step != self._ema_step:
            self._ema_step = self.trainer.global_step
            self.ema_update()

    def train(self, mode: bool = True) -> UniMedI:
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed target: no dropout, ever
        return self

    # ---- slice selection --------------------------------------------------------------------------
    @torch.no_grad()
    def slice_scores(self, volume: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor]:
        """Candidate axial indices [S] and their cosine with the report embedding [B, S] (teacher, 2D path)."""
        b, c, d, h, w = volume.shape
        z = torch.arange(0, d, self.slice_stride, device=volume.device)
        slices = volume.index_select(AXIAL_AXIS, z).transpose(1, 2).reshape(b * len(z), c, h, w)
        teacher = self.teacher
        emb = torch.cat([teacher["proj"](teacher["encoder"](s).pooled) for s in slices.split(self.score_chunk)])
        emb = F.normalize(emb.float(), dim=-1).view(b, len(z), -1)
        return z, torch.einsum("bse,be->bs", emb, F.normalize(text_emb.float(), dim=-1))

    def select_slices(self, volume: Tensor, text_emb: Tensor) -> Tensor:
        """[B, k] axial indices of the top-k text-related slices, best first (k = slice_ratio x candidates)."""
        z, scores = self.slice_scores(volume, text_emb)
        k = max(1, round(self.slice_ratio * len(z)))
        return z[scores.topk(k, dim=1).indices]

    def draw_slices(self, volume: Tensor, text_emb: Tensor) -> list[Tensor]:
        """``slices_per_volume`` [B, C, H, W] batches, each slice drawn uniformly from its volume's top-k."""
        top = self.select_slices(volume, text_emb)
        rows = torch.arange(volume.shape[0], device=volume.device)
        picks = torch.randint(top.shape[1], (volume.shape[0], self.slices_per_volume), device=volume.device)
        return [volume[rows, :, top[rows, picks[:, j]]] for j in range(self.slices_per_volume)]

    # ---- objective ----------------------------------------------------------------------------------
    def token_mask(self, n: int, tokens: int, device: torch.device) -> Tensor:
        """[n, tokens] bool, exactly round(mask_ratio x tokens) True per row, uniformly at random."""
        k = round(self.mask_ratio * tokens)
        hide = torch.rand(n, tokens, device=device).argsort(1)[:, :k]
        return torch.zeros(n, tokens, dtype=torch.bool, device=device).scatter_(1, hide, True)

    def distill_loss(self, student_tokens: Tensor, image: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked tokens of 1 - cos(predictor(student token), teacher token of the full image)."""
        with torch.no_grad():
            target = self.teacher["encoder"](image).tokens
        cos = F.cosine_similarity(self.predictor(student_tokens).float(), target.float(), dim=-1)
        return (1.0 - cos)[mask].mean()

    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        image = batch["image"]
        dims = image.ndim - 2
        n = image.shape[0]
        txt = self.embed_text(batch["text"])
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        out: dict[str, Tensor] = {}
        use_sd = self.weights["distill"] > 0 and self.mask_ratio > 0
        if use_sd:  # full and masked views in one forward: [x; x_masked]
            mask = self.token_mask(n, math.prod(self.image_encoder.grid(image)), image.device)
            none = torch.zeros_like(mask)
            feats = self.image_encoder(torch.cat([image, image]), mask=torch.cat([none, mask]))
            pooled = feats.pooled[:n]
            out[f"distill{dims}d"] = self.distill_loss(feats.tokens[n:], image, mask)
        else:
            pooled = self.image_encoder(image).pooled
        img = F.normalize(self.image_proj(pooled), dim=-1)
        out[f"clip{dims}d"] = clip_loss(img, txt, scale, local_loss=self.local_loss)
        loss = self.weights["clip"] * out[f"clip{dims}d"]
        if use_sd:
            loss = loss + self.weights["distill"] * out[f"distill{dims}d"]
        if dims == 3 and self.weights["slice"] > 0:
            losses = [
                clip_loss(self.embed_image(s), txt, scale, local_loss=self.local_loss)
                for s in self.draw_slices(image, txt.detach())
            ]
            out["slice_clip"] = torch.stack(losses).mean()
            loss = loss + self.weights["slice"] * out["slice_clip"]
        loss = loss + self._idle_parameters_term(dims, use_sd)
        return {"loss": loss, **out, "logit_scale": scale.detach()}

    def _idle_parameters_term(self, dims: int, use_sd: bool) -> Tensor:
        """0 x the parameters this step leaves unused (the other patch embedding on a 2D step, ...).

        DDP without ``find_unused_parameters`` needs a gradient for every parameter on every step; a zero one
        is given on one process too, so one and N processes train alike (AdamW then still applies weight
        decay and momentum to them, as for any zero gradient).
        """
        enc = self.image_encoder
        idle: list[Tensor] = []
        if dims == 2 or self.weights["slice"] <= 0:
            idle += enc.embed["3d" if dims == 2 else "2d"].parameters()
        if not use_sd:
            idle += [enc.mask_token, *self.predictor.parameters()]
        return sum((p.sum() * 0.0 for p in idle), torch.zeros((), device=self.logit_scale.device))
