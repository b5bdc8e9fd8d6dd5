"""The ``Method`` LightningModule: encoders + a pre-training objective, plus the encode/embed API tasks use.

A method subclass implements ``pretrain_step`` (return ``{"loss": ..., **parts}``) and, if it has a text
tower, ``embed_image``/``embed_text`` into a joint space. Optimiser, schedule, logging and gathering live
here once, so every method is trained with the same plumbing.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .encoders import ImageEncoder
from .text import TextEncoder
from .types import Batch, ImageFeatures


class Method(L.LightningModule):
    """Base class of every pre-training method (and of the ``scratch`` baseline)."""

    #: how faithful the implementation is: official-code | paper | reimplementation | baseline
    impl_source: ClassVar[str] = "baseline"
    #: False for methods evaluated from their initialisation (``scratch``)
    needs_pretraining: ClassVar[bool] = True
    #: bumped (2, 3, ...) by hand whenever the method's behaviour changes: it enters the pre-training cache
    #: key and every result row, so old checkpoints and rows are never reused; ``tests/test_versions.py``
    #: fails when the method's sources change without a bump (``medvlp_bench.versions``)
    version: ClassVar[int] = 1
    #: sha256 of the weights file a method read at construction (``external``); the rows' ``ckpt_sha256``
    weights_sha256: str | None = None

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder | None = None,
        *,
        embed_dim: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.embed_dim = embed_dim
        self.optim_cfg = {
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_fraction": warmup_fraction,
            "min_lr_ratio": min_lr_ratio,
            "betas": tuple(betas),
        }

    # ---- implemented by methods --------------------------------------------------------------
    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        """Return ``{"loss": total, **parts}``; every entry is logged as ``train/<key>``."""
        raise NotImplementedError(f"{type(self).__name__} has no pre-training objective")

    def corpus_stats(self, datamodule: Any) -> dict[str, Any]:
        """Check the pre-training corpus and describe it, before the first step (called on every rank).

        A method whose objective depends on something the corpus may lack (labels read from reports, a
        modality) raises ``ConfigError`` here, so a run stops before any training instead of optimising a
        degenerate loss. The returned dict goes into the checkpoint's ``config.json`` (``corpus_stats``) and
        its numeric entries to the logger as ``pretrain.<key>``.
        """
        return {}

    def proxy_texts(self, batch: Batch) -> dict[str, Tensor] | None:
        """The tokenised text paired with each image of a validation batch, for the retrieval proxy: the
        corpus's reports by default. A method that trains on text it writes itself (GTGM) returns that text,
        so it is judged on what it learned from. None: the corpus has no image-text pairs."""
        return batch.get("text")

    def proxy_score(self, loader: Any) -> Any:
        """A held-out proof of learning for a method without a joint image-text space, or None.

        ``loader`` iterates the corpus's validation split. Return a ``medvlp_bench.proxy.ProxyScore`` whose
        reference is what an untrained model would score (e.g. predicting the per-voxel mean). None falls back
        to the method's own loss on the validation split against its value at the start of the run; methods
        with a text tower are scored by retrieval (``medvlp_bench.proxy``).
        """
        return None

    # ---- used by tasks -----------------------------------------------------------------------
    @property
    def has_text_tower(self) -> bool:
        """True when the method embeds text into a joint space (retrieval and zero-shot apply)."""
        return self.text_encoder is not None and type(self).embed_text is not Method.embed_text

    def image_features(self, image: Tensor) -> ImageFeatures:
        """Backbone features (pooled, maps, tokens) for probes and segmentation decoders."""
        return self.image_encoder(image)

    def encode_image(self, image: Tensor) -> Tensor:
        """[B, D] backbone feature used by linear probes and fine-tuning heads."""
        return self.image_features(image).pooled

    def embed_image(self, image: Tensor) -> Tensor:
        """[B, E] L2-normalised image embedding in the joint image-text space."""
        raise NotImplementedError(f"{type(self).__name__} has no joint image-text space")

    def embed_text(self, text: dict[str, Tensor]) -> Tensor:
        """[B, E] L2-normalised text embedding in the joint image-text space."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def class_embeddings(self, class_prompts: list[list[str]]) -> Tensor:
        """[K, E] one embedding per class for zero-shot classification.

        Default: embed each class's hand-written prompts and average them (CLIP's prompt ensembling).
        Methods with learned prompts override this.
        """
        assert self.text_encoder is not None
        out = []
        for prompts in class_prompts:
            tok = {k: v.to(self.device) for k, v in self.text_encoder.tokenizer(prompts).items()}
            out.append(F.normalize(self.embed_text(tok).mean(0), dim=-1))
        return torch.stack(out)

    def input_gap(self, spatial_dims: int, in_channels: int) -> str | None:
        """Why the encoder cannot take the task's images (a 2D model on volumes), or None if it can.

        ``run.evaluate`` skips such a cell as not applicable, with this reason. Methods built from the task's
        ``input`` always fit; a model loaded from a file (``external``) has its own dims and channels.
        """
        return None

    def adapt_to_input(self, in_channels: int, *, frozen: bool = True) -> None:
        """Make the image encoder accept ``in_channels`` (called before evaluation on a task's data).

        ``frozen`` is the task's ``freezes_encoder``: under a frozen protocol nothing downstream trains the
        encoder, so an override must keep it pre-trained (e.g. inflate the stem, never re-initialise it).
        The default is the safe one. The base class only checks; a method pre-trained on one channel that
        supports multi-channel downstream data (e.g. BrainMVP's stem drop/inflate) overrides this.
        """
        have = getattr(self.image_encoder, "in_channels", in_channels)
        if have != in_channels:
            raise ValueError(
                f"{type(self).__name__} encoder takes {have} input channel(s), the task's data has {in_channels}"
            )

    # ---- plumbing ------------------------------------------------------------------------------
    def gather(self, x: Tensor) -> Tensor:
        """All-gather across ranks with gradients (identity on one process)."""
        return distributed.gather_with_grad(x)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self._logged_step("train", batch)
        self.log("loss", out["loss"].detach().float(), prog_bar=True, logger=False, batch_size=len(batch["image"]))
        return out["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._logged_step("val", batch)

    def _logged_step(self, stage: str, batch: Batch) -> dict[str, Tensor]:
        """``pretrain_step`` with every part logged as ``<stage>/<key>``, one way for training and validation,
        so both curves carry the same parts, synchronised and weighted by batch size alike."""
        out = self.pretrain_step(batch)
        self.log_dict(
            {f"{stage}/{k}": v.detach().float() for k, v in out.items()},
            prog_bar=False,
            sync_dist=True,
            batch_size=len(batch["image"]),
        )
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on biases, norms, scalars (temperatures) and templates."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or "no_decay" in name else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.optim_cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(self.param_groups(), lr=cfg["lr"], betas=cfg["betas"], fused=fused)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * cfg["warmup_fraction"])
        floor = cfg["min_lr_ratio"]

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            t = (step - warmup) / max(total - warmup, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ProjectionHead(nn.Sequential):
    """Linear (or 2-layer MLP) projection into the joint space."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        if hidden:
            super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            super().__init__(nn.Linear(in_dim, out_dim))
