"""``clip``: ConVIRT/CLIP image-report contrast, the generic image-text reference.

Symmetric InfoNCE between projected, L2-normalised image and report embeddings; learnable temperature
initialised to 0.07 and clamped so the logit scale stays <= 100; negatives gathered across all ranks
with gradients (open_clip's ``ClipLoss``). Works with 2D and 3D encoders alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from medvlp_bench.config import ConfigError
from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.losses import clip_loss
from medvlp_bench.methods.two_tower import TwoTower
from medvlp_bench.text import TextEncoder
from medvlp_bench.types import Batch


class CLIP(TwoTower):
    """Image-report InfoNCE on ``TwoTower``'s towers (projections, learned temperature, embeddings).

    Args:
        local_loss: each rank scores its own rows against the gathered batch (open_clip's ``local_loss``).
        temperature, proj_hidden: ``TwoTower``'s.
    """

    impl_source: ClassVar[str] = "baseline"
    #: 2: the text tower follows the corpus (bert_tiny on phantoms, MiniLM on real reports, configs/method/clip.yaml)
    #: and a corpus without reports is refused before any step
    version: ClassVar[int] = 2

    def __init__(
        self, image_encoder: ImageEncoder, text_encoder: TextEncoder, *, local_loss: bool = True, **kw: Any
    ) -> None:
        super().__init__(image_encoder, text_encoder, **kw)
        self.local_loss = local_loss

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
        scale = self.contrast_scale()
        loss = clip_loss(img, txt, scale, local_loss=self.local_loss)
        return {"loss": loss, "logit_scale": scale.detach()}
