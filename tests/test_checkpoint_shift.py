"""How far pre-training moved an encoder: ||theta - theta_0|| / ||theta_0||, against a hand computation."""

from __future__ import annotations

import math

import torch
from torch import nn

from medvlp_bench.checkpoint import relative_shift, snapshot


def test_relative_shift_matches_hand_value() -> None:
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 0.0]]))
        net.bias.copy_(torch.tensor([4.0]))
    ref = snapshot(net)
    assert relative_shift(ref, net) == 0.0
    with torch.no_grad():
        net.weight += torch.tensor([[0.0, 1.0]])  # change of norm 1 on a start of norm 5 (3-4-5)
    assert math.isclose(relative_shift(ref, net), 1 / 5, rel_tol=1e-12)


def test_snapshot_is_a_copy_and_skips_integer_tensors() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ref = snapshot(net)
    assert set(ref) == {k for k, _ in net.named_parameters()}  # no running stats or counters
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2)
    assert math.isclose(relative_shift(ref, net), 1.0, rel_tol=1e-9)  # theta = 2 theta_0
