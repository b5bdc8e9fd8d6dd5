"""Shared data types: dict batches with fixed keys and the feature containers encoders return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from torch import Tensor


class Batch(TypedDict, total=False):
    """A collated batch. Keys are fixed so every method and task reads the same names."""

    image: Tensor  # [B, C, H, W] or [B, C, D, H, W]
    text: dict[str, Tensor]  # tokenizer output (input_ids, attention_mask)
    report: list[str]  # raw report strings (before tokenisation)
    label: Tensor  # [B] class index or [B, K] multi-hot
    mask: Tensor  # [B, 1, *spatial] integer label map
    id: list[str]


@dataclass
class ImageFeatures:
    """What an image encoder returns.

    pooled feeds probes and projection heads, maps feed segmentation decoders (fine -> coarse),
    tokens feed local image-text alignment (None for encoders without tokens).
    """

    pooled: Tensor
    maps: list[Tensor] = field(default_factory=list)
    tokens: Tensor | None = None


@dataclass
class TextFeatures:
    """What a text encoder returns: a pooled sentence vector, token vectors and their mask."""

    pooled: Tensor
    tokens: Tensor
    mask: Tensor
