"""Losses against hand-computed values; single-process gather is the identity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medvlp_bench import distributed
from medvlp_bench.losses import barlow_twins, clip_loss, info_nce


def _hand_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    """Symmetric cross-entropy written out with explicit sums (no library softmax)."""
    n = img.shape[0]
    logits = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(n)) / n
    t2i = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_clip_loss_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    got = clip_loss(img, txt, torch.tensor(10.0)).item()
    assert math.isclose(got, _hand_clip(img, txt, 10.0), rel_tol=1e-5)


def test_clip_loss_small_for_aligned_pairs_and_symmetric() -> None:
    x = F.normalize(torch.eye(4), dim=-1)
    aligned = clip_loss(x, x, torch.tensor(100.0)).item()
    shuffled = clip_loss(x, x.roll(1, 0), torch.tensor(100.0)).item()
    assert aligned < 1e-6 < shuffled
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    assert math.isclose(clip_loss(a, b, 5.0).item(), clip_loss(b, a, 5.0).item(), rel_tol=1e-6)


def test_info_nce_matches_cross_entropy() -> None:
    q, k = torch.randn(4, 6), torch.randn(4, 6)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    expected = F.cross_entropy(qn @ kn.T / 0.5, torch.arange(4))
    assert torch.allclose(info_nce(q, k, 0.5), expected)


def test_barlow_twins_hand_value() -> None:
    # z1 = z2 with two perfectly correlated columns: C = [[1, 1], [1, 1]] -> on-diag 0, off-diag 2 * 1^2
    z = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [2.0, 4.0], [-2.0, -4.0]])
    got = barlow_twins(z, z, off_diagonal_weight=0.5, eps=0.0)
    assert math.isclose(got.item(), 0.5 * 2.0, rel_tol=1e-5)
    # independent unit columns: C = I -> loss 0
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow_twins(w, w, eps=0.0).item() < 1e-10


def test_gather_is_identity_on_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    y = distributed.gather_with_grad(x)
    assert y is x and distributed.world_size() == 1 and distributed.rank() == 0
