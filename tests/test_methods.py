"""Every method in configs/method/ (no test edit needed for a new one): 2D, 3D and multi-modal 3D steps,
grads, embeddings; a method skips the data its config's ``requires:`` rules out."""

from __future__ import annotations

import copy

import pytest
import torch

from medvlp_bench.config import compose, instantiate, options, tiny_overrides, unmet_requirements
from medvlp_bench.method import Method

SIZES = {"phantom_cxr_cls": 32, "phantom_ct_cls": 32, "phantom_mri_cls": 32}

#: methods built from the task's input; `external` loads a model file (tests/test_external.py)
BUILT_FROM_INPUT = [m for m in options("method") if m != "external"]


def _setup(method: str, task: str, cache: str) -> tuple[Method, dict]:
    cfg = compose(
        "run",
        [
            f"method={method}",
            f"task={task}",
            f"task.data.size={SIZES[task]}",
            "task.data.n_train=8",
            "task.data.n_val=2",
            "task.data.n_test=2",
            f"task.data.cache_dir={cache}",
            *tiny_overrides(method),
        ],
    )
    if (gap := unmet_requirements(cfg.method, cfg.task.data)) is not None:
        pytest.skip(f"{method} does not apply to {task}: {gap}")
    torch.manual_seed(0)
    m: Method = instantiate(cfg.method.model)
    dm = instantiate(cfg.task.data, tokenizer=m.text_encoder.tokenizer if m.text_encoder is not None else None)
    batch = next(iter(dm.loader("train", train=True, batch_size=4)))
    return m, batch


@pytest.mark.parametrize("task", ["phantom_cxr_cls", "phantom_ct_cls", "phantom_mri_cls"])
@pytest.mark.parametrize("method", BUILT_FROM_INPUT)
def test_method_step_and_embeddings(method: str, task: str, phantom_cache) -> None:
    m, batch = _setup(method, task, str(phantom_cache))
    probe = copy.deepcopy(m)  # as evaluation does: fit the stem to the task's channels (a no-op for most)
    probe.adapt_to_input(batch["image"].shape[1])
    feats = probe.encode_image(batch["image"])
    assert feats.shape[0] == 4 and feats.ndim == 2 and torch.isfinite(feats).all()
    if m.has_text_tower:
        img, txt = m.embed_image(batch["image"]), m.embed_text(batch["text"])
        assert img.shape == txt.shape and img.shape[0] == 4
        assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-4)
    if not m.needs_pretraining:
        with pytest.raises(NotImplementedError):
            m.pretrain_step(batch)
        return
    m.train()
    out = m.pretrain_step(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    enc_grads = [p.grad for p in m.image_encoder.parameters() if p.requires_grad]
    assert enc_grads and all(g is not None and torch.isfinite(g).all() for g in enc_grads)
    assert any(g.abs().sum() > 0 for g in enc_grads)


def _adapts_or_refuses(m: Method, channels: int, spatial: tuple[int, ...], dim: int) -> None:
    """``adapt_to_input(channels)`` refuses with an error that names the channels, or leaves an encoder that
    takes ``channels``-channel images: an adaptation that passes silently and then fails on the data would only
    surface in the middle of an evaluation, after pre-training."""
    try:
        m.adapt_to_input(channels)
    except ValueError as e:
        assert "channel" in str(e) and str(channels) in str(e), f"refusal does not name the {channels} channels: {e}"
        return
    try:
        with torch.no_grad():
            feats = m.encode_image(torch.randn(2, channels, *spatial))
    except Exception as e:  # any failure after an accepted adaptation is the bug
        pytest.fail(
            f"{type(m).__name__}.adapt_to_input({channels}) accepted, but its encoder then fails on a "
            f"{channels}-channel input: {type(e).__name__}: {e}"
        )
    assert feats.shape == (2, dim) and torch.isfinite(feats).all(), (channels, tuple(feats.shape))


@pytest.mark.parametrize("method", BUILT_FROM_INPUT)
def test_method_adapts_or_refuses_other_channel_counts(method: str, phantom_cache) -> None:
    task = "phantom_mri_cls" if method == "brainmvp" else "phantom_cxr_cls"
    m, batch = _setup(method, task, str(phantom_cache))
    m.eval()
    own, spatial = int(batch["image"].shape[1]), tuple(batch["image"].shape[2:])
    m.adapt_to_input(own)  # what evaluation does first: the task's own channel count is always accepted
    with torch.no_grad():
        dim = m.encode_image(batch["image"]).shape[1]
    for channels in (1, 4):
        _adapts_or_refuses(m, channels, spatial, dim)


def test_channel_check_catches_a_silent_adaptation_and_a_mute_refusal(phantom_cache) -> None:
    """The check above is not vacuous: a stem that "adapts" without changing fails it, and so does a refusal
    that does not say it is about channels. `scratch`: the cheapest method to build, its stem takes 1 channel."""
    m, batch = _setup("scratch", "phantom_cxr_cls", str(phantom_cache))
    m.eval()
    spatial = tuple(batch["image"].shape[2:])
    with torch.no_grad():
        dim = m.encode_image(batch["image"]).shape[1]
    m.adapt_to_input = lambda in_channels, frozen=True: None  # claims success, the stem stays 1-channel
    with pytest.raises(pytest.fail.Exception, match="then fails on a 4-channel input"):
        _adapts_or_refuses(m, 4, spatial, dim)

    def mute(in_channels: int, frozen: bool = True) -> None:
        raise ValueError("not supported")

    m.adapt_to_input = mute
    with pytest.raises(AssertionError, match="refusal does not name the 4 channels"):
        _adapts_or_refuses(m, 4, spatial, dim)
