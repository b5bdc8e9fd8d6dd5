"""Shared losses as plain functions, testable without a trainer.

The CLIP/InfoNCE loss delegates to open_clip's ``ClipLoss`` (gather with gradients, rank-offset labels);
the rank and world size are read at call time so the same method object works on 1 or N processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from . import distributed

_CLIP_LOSSES: dict[tuple[int, int, bool], ClipLoss] = {}


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float, *, local_loss: bool = True) -> Tensor:
    """Symmetric InfoNCE between L2-normalised image and text embeddings, negatives from all ranks.

    With ``local_loss`` each rank scores its own rows against the gathered batch (open_clip's scalable
    form); the mean over ranks equals the single-process loss on the concatenated batch, and so do the
    DDP-averaged gradients. Every rank must have the same batch size.
    """
    key = (distributed.rank(), distributed.world_size(), local_loss)
    if key not in _CLIP_LOSSES:
        _CLIP_LOSSES[key] = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=key[0], world_size=key[1])
    return _CLIP_LOSSES[key](image, text, logit_scale)


def info_nce(query: Tensor, key: Tensor, temperature: float) -> Tensor:
    """One-directional InfoNCE of ``query[i]`` against all gathered ``key`` rows (positive: same index).

    Used where a method contrasts two views rather than image and text; negatives are gathered across
    ranks with gradients and labels offset by rank.
    """
    q = F.normalize(query, dim=-1)
    k_all = distributed.gather_with_grad(F.normalize(key, dim=-1))
    logits = q @ k_all.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * distributed.rank()
    return F.cross_entropy(logits, labels)


def barlow_twins(z1: Tensor, z2: Tensor, off_diagonal_weight: float = 0.0051, eps: float = 1e-5) -> Tensor:
    """Barlow Twins redundancy reduction on the cross-correlation of batch-standardised embeddings.

    sum_i (1 - C_ii)^2 + w * sum_{i != j} C_ij^2, with C = z1n^T z2n / N over the (gathered) batch.
    """
    z1 = distributed.gather_with_grad(z1)
    z2 = distributed.gather_with_grad(z2)
    n = z1.shape[0]
    z1n = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + eps)
    z2n = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + eps)
    c = z1n.T @ z2n / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + off_diagonal_weight * off
