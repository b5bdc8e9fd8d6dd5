"""``unimedi``: UniMedI (arXiv 2311.14851), one encoder for 2D X-rays and 3D CT with reports as the common space.

No official code exists (``impl_source: paper``); what the paper leaves open is a constructor argument with
a documented default (docs/methods/unimedi.md). Per training step the batch is either 2D or 3D (the
corpus alternates, see ``datasets/mixed.py``) and the loss is

    L = w_clip * CLIP(student(x), report)                      image-report contrast, negatives from all ranks
      + w_distill * SD(x)                                       masked-image self-distillation, EMA teacher
      + w_slice * CLIP(student(slice), report)      [3D only]   text-selected slices as 2D images

SD: the student sees x with ``mask_ratio`` of its patch tokens replaced by [MASK]; a predictor maps its
final tokens onto the teacher's final tokens of the full x, loss = mean over masked tokens of 1 - cos.
The report guides what is looked at, in both kinds of image, through one scoring rule (``text_scores``:
cosine of the teacher-projected feature with the report embedding):
- 3D, slice selection: the EMA teacher embeds every ``slice_stride``-th axial slice through the 2D path,
  scores it, and keeps the top ``slice_ratio``; ``slices_per_volume`` of those are drawn per step and
  contrasted with the report (pseudo 2D-3D pairs).
- 2D, token selection (``mask_2d: text``, attentive masking as in A-CLIP): the teacher's patch tokens of
  the full X-ray are scored, and the ``mask_text_fraction`` share of the student's visible tokens are the
  most text-related ones (the rest of the visible tokens are random). ``mask_2d: random`` is uniform
  random masking (the behaviour before version 2). 3D volumes are always masked at random.
The teacher (image encoder + image projection) never receives gradients and follows p_t <- m p_t + (1-m) p_s
after every optimiser step; parameters without gradients are neither optimised nor synchronised by DDP.
"""

from __future__ import annotations

import copy
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
#: how the student's 2D tokens are masked: keep the report-related ones visible, or uniformly at random
MASK_2D_MODES = ("text", "random")


class UniMedI(CLIP):
    """UniMedI on a shared 2D/3D ViT (:class:`UniMedIViT`); inherits CLIP's heads, temperature and embed API.

    Args:
        slice_ratio: fraction of the scored slices kept as text-related (top-k), paper-suggested 0.25.
        slice_stride: score every n-th axial slice (cost control; 1 scores all).
        slices_per_volume: selected slices drawn per volume and step, each a separate B x B contrast.
        mask_ratio: fraction of the student's patch tokens replaced by [MASK] (2D and 3D; sets the keep ratio).
        mask_2d: ``"text"``: 2D student masks keep the most report-related tokens visible (the teacher's patch
            tokens scored by ``text_scores``, no gradient); ``"random"``: uniform random, as before version 2.
        mask_text_fraction: share of the visible 2D tokens that are the top-scored ones in ``text`` mode; the
            others are drawn at random from the rest. Paper silent; 1.0 (pure top-k, as A-CLIP's released
            code) by default. 0 is random masking through the same code path.
        ema_momentum: m in p_t <- m p_t + (1 - m) p_s.
        clip_weight, slice_weight, distill_weight: loss weights (1:1:1 by default).
        predictor_hidden: hidden width of the student's 2-layer token predictor (None: the encoder width).
        score_chunk: slices per teacher forward while scoring (bounds memory on large volumes).
        proj_batchnorm: put a BatchNorm1d in front of both projection heads (MoCo v3 style). A small ViT and a
            random text tower from scratch start with near-identical embeddings (mean cosine ~0.99) and,
            without it, collapse to one point with the loss stuck at ln(B) (measured, docs/methods/unimedi.md).
    """

    impl_source: ClassVar[str] = "paper"
    #: 2: text-guided 2D token masking (``mask_2d: text``) is the default; 1 masked 2D tokens at random
    version: ClassVar[int] = 2

    def __init__(
        self,
        image_encoder: UniMedIViT,
        text_encoder: TextEncoder,
        *,
        slice_ratio: float = 0.25,
        slice_stride: int = 2,
        slices_per_volume: int = 1,
        mask_ratio: float = 0.5,
        mask_2d: str = "text",
        mask_text_fraction: float = 1.0,
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
        if mask_2d not in MASK_2D_MODES:
            raise ValueError(f"unimedi: mask_2d={mask_2d!r} is not one of {', '.join(MASK_2D_MODES)}")
        checks = {
            "slice_ratio": 0 < slice_ratio <= 1,
            "mask_ratio": 0 <= mask_ratio < 1,
            "mask_text_fraction": 0 <= mask_text_fraction <= 1,
            "ema_momentum": 0 <= ema_momentum <= 1,
            "slice_stride": slice_stride >= 1,
            "slices_per_volume": slices_per_volume >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"unimedi: invalid {', '.join(bad)} (ratios in (0, 1]/[0, 1)/[0, 1], counts >= 1)")
        super().__init__(image_encoder, text_encoder, **kw)
        self.slice_ratio, self.slice_stride, self.slices_per_volume = slice_ratio, slice_stride, slices_per_volume
        self.mask_ratio, self.ema_momentum, self.score_chunk = mask_ratio, ema_momentum, score_chunk
        self.mask_2d, self.mask_text_fraction = mask_2d, mask_text_fraction
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

    # ---- text guidance: slice selection (3D) and token selection (2D) ------------------------------
    @torch.no_grad()
    def text_scores(self, feats: Tensor, text_emb: Tensor) -> Tensor:
        """[B, S] cos(P_t(feats[b, s]), t_b): how report-related each of S teacher features is.

        The one scoring rule for both jobs: ``feats`` are the teacher's pooled slice features (3D slice
        selection) or its final patch tokens (2D token selection). With the default linear projection (and
        the BatchNorm in eval mode) P_t is affine, so P_t(pooled) is the mean of the tokens' P_t: a token's
        score is its share of the image-report similarity. No gradient reaches the text or the teacher.
        """
        b, s, c = feats.shape
        emb = F.normalize(self.teacher["proj"](feats.reshape(b * s, c)).float(), dim=-1).view(b, s, -1)
        return torch.einsum("bse,be->bs", emb, F.normalize(text_emb.float(), dim=-1))

    @torch.no_grad()
    def slice_scores(self, volume: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor]:
        """Candidate axial indices [S] and their cosine with the report embedding [B, S] (teacher, 2D path)."""
        b, c, d, h, w = volume.shape
        z = torch.arange(0, d, self.slice_stride, device=volume.device)
        slices = volume.index_select(AXIAL_AXIS, z).transpose(1, 2).reshape(b * len(z), c, h, w)
        pooled = torch.cat([self.teacher["encoder"](s).pooled for s in slices.split(self.score_chunk)])
        return z, self.text_scores(pooled.view(b, len(z), -1), text_emb)

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
    def token_mask(self, n: int, tokens: int, device: torch.device, scores: Tensor | None = None) -> Tensor:
        """[n, tokens] bool (True = hidden), exactly k = round(mask_ratio x tokens) True per row.

        Without ``scores`` the hidden tokens are uniform at random. With ``scores`` [n, tokens] (text
        relevance), the round(mask_text_fraction x (tokens - k)) top-scored tokens are always visible and the
        k hidden ones are drawn at random from the others. Both draw the same uniform noise, so random mode
        reproduces the pre-version-2 masks for a given seed.
        """
        k = round(self.mask_ratio * tokens)
        noise = torch.rand(n, tokens, device=device)
        if scores is not None:
            if scores.shape != (n, tokens):
                raise ValueError(f"token scores must be [n, tokens] = {(n, tokens)}, got {tuple(scores.shape)}")
            top = scores.topk(round(self.mask_text_fraction * (tokens - k)), dim=1).indices
            noise = noise.scatter(1, top, 2.0)  # above every uniform draw: sorted last, never hidden
        hide = noise.argsort(1)[:, :k]
        return torch.zeros(n, tokens, dtype=torch.bool, device=device).scatter_(1, hide, True)

    def student_mask(self, teacher_tokens: Tensor, text_emb: Tensor, dims: int) -> Tensor:
        """The student's token mask for a batch: text-guided on 2D in ``mask_2d: text`` mode, else random."""
        n, tokens = teacher_tokens.shape[:2]
        scores = self.text_scores(teacher_tokens, text_emb) if dims == 2 and self.mask_2d == "text" else None
        return self.token_mask(n, tokens, teacher_tokens.device, scores)

    def distill_loss(self, student_tokens: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked tokens of 1 - cos(predictor(student token), teacher token of the full image)."""
        cos = F.cosine_similarity(self.predictor(student_tokens).float(), target.float(), dim=-1)
        return (1.0 - cos)[mask].mean()

    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        image = batch["image"]
        dims = image.ndim - 2
        n = image.shape[0]
        txt = self.embed_text(batch["text"])
        scale = self.contrast_scale()
        out: dict[str, Tensor] = {}
        use_sd = self.weights["distill"] > 0 and self.mask_ratio > 0
        if use_sd:  # full and masked views in one forward: [x; x_masked]
            with torch.no_grad():  # the teacher's tokens are the distillation target and the 2D mask's scores
                target = self.teacher["encoder"](image).tokens
            mask = self.student_mask(target, txt, dims)
            none = torch.zeros_like(mask)
            feats = self.image_encoder(torch.cat([image, image]), mask=torch.cat([none, mask]))
            pooled = feats.pooled[:n]
            out[f"distill{dims}d"] = self.distill_loss(feats.tokens[n:], target, mask)
        else:
            pooled = self.image_encoder(image).pooled
        img = self.project_image(pooled)
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
