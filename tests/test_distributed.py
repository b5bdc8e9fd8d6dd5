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


#: per method: the task whose data it pre-trains on here, and overrides that remove per-rank randomness
#: (UniMedI's token masks are drawn per process; its image-report contrast is what is compared)
METHOD_CASES = {
    "clip": ("phantom_cxr_cls", []),
    "umcl": ("phantom_cxr_cls", []),
    "gtgm": ("phantom_cxr_cls", ["method.model.textgen.cache_dir=null"]),
    "unimedi": ("phantom_cxr_cls", ["method.model.distill_weight=0"]),
}


@pytest.fixture(scope="module")
def method_results(tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> tuple[dict, dict]:
    from ddp_workers import build_method, method_worker  # noqa: F401 (spawned by name)

    from medvlp_bench.config import compose, instantiate, tiny_overrides

    cases = {}
    for method, (task, extra) in METHOD_CASES.items():
        ov = [f"method={method}", f"task={task}", "task.data.size=32", f"task.data.cache_dir={phantom_cache}"]
        ov += [*tiny_data("task.data"), *tiny_overrides(method), *extra]
        dm = instantiate(compose("run", ov).task.data, tokenizer=build_method(ov).text_encoder.tokenizer)
        batch = next(iter(dm.loader("test", batch_size=8)))
        cases[method] = {"overrides": ov, "batch": {k: v for k, v in batch.items() if k != "mask"}}
    folder = tmp_path_factory.mktemp("ddp_methods")
    torch.save(cases, folder / "spec.pt")
    out = folder / "out.pt"
    mp.start_processes(
        method_worker, args=(2, free_port(), str(folder / "spec.pt"), str(out)), nprocs=2, start_method="spawn"
    )
    return cases, torch.load(out, weights_only=True)


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_method_loss_and_grads_match_single_process_under_two_ranks(method: str, method_results) -> None:
    """Every text-contrastive method's own loss: 2 gloo ranks with gathered negatives (their mean loss, DDP's
    averaged gradients) equal one process on the whole batch. BrainMVP's contrast is the shared ``info_nce``
    (checked above); its crops and masks are random per process, so its full loss is not compared."""
    from ddp_workers import method_step

    cases, results = method_results
    ref_loss, ref_grads = method_step(cases[method]["overrides"], cases[method]["batch"])
    got = results[method]
    assert torch.allclose(got["losses"].mean(), ref_loss, atol=1e-5), (got["losses"], ref_loss)
    assert set(got["grads"]) == set(ref_grads)
    for name, g in ref_grads.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5, rtol=1e-4), name
