"""``clip``: ConVIRT/CLIP image-report contrast, the generic image-text reference.

Symmetric InfoNCE between projected, L2-normalised image and report embeddings; learnable temperature
initialised to 0.07 and clamped so the logit scale stays <= 100; negatives gathered across all ranks
with gradients (open_clip's ``ClipLoss``). Works with 2D and 3D encoders alike.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp_bench.config import ConfigError
from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.losses import clip_loss
from medvlp_bench.method import Method, ProjectionHead
from medvlp_bench.text import TextEncoder
from medvlp_bench.types import Batch


class CLIP(Method):
    impl_source: ClassVar[str] = "baseline"
    #: 2: the text tower follows the corpus (bert_tiny on phantoms, MiniLM on real reports, configs/method/clip.yaml)
    #: and a corpus without reports is refused before any step
    version: ClassVar[int] = 2

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        *,
        temperature: float = 0.07,
        proj_hidden: int | None = None,
        local_loss: bool = True,
        **kw,
    ) -> None:
        super().__init__(image_encoder, text_encoder, **kw)
        self.image_proj = ProjectionHead(image_encoder.out_dim, self.embed_dim, proj_hidden)
        self.text_proj = ProjectionHead(text_encoder.out_dim, self.embed_dim, proj_hidden)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        self.local_loss = local_loss

    def embed_image(self, image: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.encode_image(image)), dim=-1)

    def embed_text(self, text: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.text_proj(self.text_encoder(**text).pooled), dim=-1)

    def corpus_stats(self, datamodule: Any) -> dict[str, Any]:
        """Refuse a corpus without reports (a folder of images) before any step, naming the ways out."""
        manifest = getattr(datamodule, "manifest", None)
        if manifest is not None and "report" not in manifest.columns:
            name = getattr(datamodule, "name", "the corpus")
            raise ConfigError(
                f"clip pre-trains on image-report pairs and the corpus {name!r} has no reports: choose one that "
                "has them with data=<corpus> (e.g. data=image_text_csv data.root=/data/pairs), evaluate given "
                "weights with ckpt=<folder>, or use a method that needs no reports (scratch, gtgm)"
            )
        return {}

    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        img = self.embed_image(batch["image"])
        txt = self.embed_text(batch["text"])
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        loss = clip_loss(img, txt, scale, local_loss=self.local_loss)
        return {"loss": loss, "logit_scale": scale.detach()}
