"""Two towers into one joint space: the image-text half that ``clip``, ``umcl`` and ``gtgm`` (and ``unimedi``
through ``clip``) share, written once so the methods differ only in their objectives.

The image tower is the trunk, optionally a pre-training head (GTGM's released head), and ``image_proj``; the
text tower is the text encoder and ``text_proj``. Both embeddings are L2-normalised, so retrieval, zero-shot
and the contrastive losses compare them by cosine, scaled by the learned ``logit_scale`` = log(1 / T)
(CLIP's, capped at a scale of 100) or by a fixed 1 / T.

Modules are registered in the order the methods registered them before they shared this class (trunk, text
encoder, head, ``image_proj``, ``text_proj``), so under a fixed seed the initial weights, the ``state_dict``
keys and the optimiser's parameter order are unchanged: old checkpoints load and resume as they were.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.method import Method, ProjectionHead
from medvlp_bench.text import TextEncoder

#: the largest logit scale a learned temperature may reach (CLIP's cap: T >= 0.01)
MAX_LOGIT_SCALE = 100.0


class TwoTower(Method):
    """Image and text towers, their projections and the temperature; subclasses add ``pretrain_step``.

    Args:
        temperature: initial (learned) or fixed temperature T; learned as ``logit_scale`` = log(1 / T).
        proj_hidden: hidden width of the projection heads (None: one Linear, see ``projection``).
        image_head: a module between the trunk and ``image_proj`` with an ``out_dim`` (GTGM's released head),
            registered as ``image_head``; a subclass that sets it also overrides ``joint_image_features``.
    """

    #: True: the temperature is learned as the parameter ``logit_scale``; False: fixed, kept as ``temperature``
    learned_temperature: ClassVar[bool] = True
    #: lower clamp of the learned ``logit_scale`` (None: unbounded below); the upper one is log(MAX_LOGIT_SCALE)
    logit_scale_floor: ClassVar[float | None] = None

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        *,
        temperature: float = 0.07,
        proj_hidden: int | None = None,
        image_head: nn.Module | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(image_encoder, text_encoder, **kw)
        image_dim = image_encoder.out_dim
        if image_head is not None:
            self.image_head = image_head
            image_dim = image_head.out_dim
        self.image_proj = self.projection(image_dim, proj_hidden)
        self.text_proj = self.projection(text_encoder.out_dim, proj_hidden)
        if self.learned_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        else:
            self.temperature = float(temperature)

    def projection(self, in_dim: int, hidden: int | None) -> nn.Module:
        """A projection head from ``in_dim`` into the joint space: a Linear, or a GELU MLP with ``hidden``."""
        return ProjectionHead(in_dim, self.embed_dim, hidden)

    def contrast_scale(self) -> Tensor:
        """exp(``logit_scale``) clamped to [exp(``logit_scale_floor``), MAX_LOGIT_SCALE]: the factor on cosines.

        The cap keeps a learned temperature from collapsing the softmax onto one pair (CLIP's 100).
        """
        return self.logit_scale.clamp(self.logit_scale_floor, math.log(MAX_LOGIT_SCALE)).exp()

    def joint_image_features(self, image: Tensor) -> Tensor:
        """[B, D] what ``image_proj`` reads: the trunk's pooled feature (a method with an ``image_head`` overrides)."""
        return self.encode_image(image)

    def project_image(self, features: Tensor) -> Tensor:
        """[B, E] L2-normalised ``image_proj`` of image features (for objectives that build them themselves)."""
        return F.normalize(self.image_proj(features), dim=-1)

    def project_text(self, features: Tensor) -> Tensor:
        """[B, E] L2-normalised ``text_proj`` of pooled text features (reports, or UMCL's learned prompts)."""
        return F.normalize(self.text_proj(features), dim=-1)

    def embed_image(self, image: Tensor) -> Tensor:
        return self.project_image(self.joint_image_features(image))

    def embed_text(self, text: dict[str, Tensor]) -> Tensor:
        return self.project_text(self.text_encoder(**text).pooled)
