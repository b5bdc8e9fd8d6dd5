"""Two real gloo processes on CPU: gathered losses and gradients equal the single-process ones on the
concatenated batch, for every shared contrastive loss; and a 2-process Lightning fit of ``clip``."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ddp_workers import VARIANTS, loss_of, loss_worker, make_problem
from helpers import TINY, tiny_data

pytestmark = pytest.mark.ddp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "ddp.pt"
    mp.start_processes(loss_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize(("kind", "local"), VARIANTS)
def test_gathered_loss_equals_single_process(kind: str, local: bool, two_rank_results: dict) -> None:
    got = two_rank_results[f"{kind}-{local}"]
    model, x, y = make_problem(8)
    ref = loss_of(kind, model, x, y, local=True)
    ref.backward()
    if kind == "clip" and not local:
        assert torch.allclose(got["losses"], ref.detach().expand(2), atol=1e-6)  # every rank: the full loss
    else:
        assert torch.allclose(got["losses"].mean(), ref.detach(), atol=1e-6)  # mean of rank losses
    for name, p in model.named_parameters():
        assert torch.allclose(got["grads"][name], p.grad, atol=1e-6), name


def test_ddp_cpu_pretrain_of_clip(tmp_path: Path) -> None:
    """`medbench pretrain trainer=ddp_cpu`: Lightning re-launches the command for rank 1 and both train."""
    exe = Path(sys.executable).with_name("medbench")
    env = {"MEDBENCH_RESULTS": str(tmp_path / "r"), "MEDBENCH_CACHE": str(tmp_path / "c"), "PATH": str(exe.parent)}
    tiny = [o for o in TINY if o.startswith(("method.", "logger", "trainer"))]
    args = [
        str(exe),
        "pretrain",
        "method=clip",
        "data=phantom_cxr",
        "trainer=ddp_cpu",
        "data.size=32",
        *tiny,
        *tiny_data("data"),
        "+trainer.max_steps=2",
    ]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpts = list((tmp_path / "c" / "checkpoints").glob("clip__phantom_cxr__s0__*/model.safetensors"))
    assert len(ckpts) == 1
