"""UniMedI: the shared 2D/3D ViT, text-guided slice selection, the EMA teacher, the loss and the mixed corpus."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medvlp_bench.config import compose, instantiate
from medvlp_bench.datasets.mixed import AlternatingLoader, MixedDataModule, interleave, shard
from medvlp_bench.datasets.phantoms import PhantomDataModule
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.methods.unimedi import UniMedI
from medvlp_bench.methods.unimedi_vit import UniMedIViT
from medvlp_bench.text import build_text_encoder

REPORTS = ["FINDINGS: A 2 cm hypodense liver lesion. IMPRESSION: Liver lesion.", "FINDINGS: Normal. IMPRESSION: None."]


def tiny_vit() -> UniMedIViT:
    return UniMedIViT(
        img_size_2d=32, img_size_3d=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, num_maps=2
    )


def tiny_method(**kw) -> UniMedI:
    torch.manual_seed(0)
    text = build_text_encoder("bert_tiny", hidden=32, layers=1, heads=2)
    return UniMedI(tiny_vit(), text, embed_dim=16, **kw)


def make_batch(method: UniMedI, shape: tuple[int, ...]) -> dict:
    n = shape[0]
    return {"image": torch.rand(*shape), "text": method.text_encoder.tokenizer([REPORTS[i % 2] for i in range(n)])}


def phantom(kind: str, cache: str, n_train: int = 16) -> PhantomDataModule:
    return PhantomDataModule(kind, size=32, n_train=n_train, n_val=4, n_test=4, cache_dir=cache, batch_size=8)


def mixed(cache: str, **kw) -> MixedDataModule:
    return MixedDataModule({"cxr": phantom("cxr", cache), "ct": phantom("ct", cache)}, **kw)


# ---- encoder ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "grid"),
    [
        ((2, 1, 32, 32), (4, 4)),
        ((2, 1, 32, 32, 32), (4, 4, 4)),
        ((2, 1, 16, 24), (2, 3)),
        ((2, 1, 16, 32, 24), (2, 4, 3)),
    ],
)
def test_encoder_takes_2d_and_3d_with_patch_grid_maps(shape: tuple[int, ...], grid: tuple[int, ...]) -> None:
    enc = tiny_vit().eval()
    with torch.no_grad():
        f = enc(torch.rand(*shape))
    assert f.pooled.shape == (2, enc.out_dim) and f.tokens.shape == (2, int(np.prod(grid)), 32)
    assert len(f.maps) == len(enc.feature_channels) == len(enc.feature_strides) == 2
    assert all(m.shape == (2, 32, *grid) for m in f.maps)
    assert enc.feature_strides == [8, 8] and torch.isfinite(f.pooled).all()


def test_2d_and_3d_share_every_transformer_weight() -> None:
    enc = tiny_vit()
    enc(torch.rand(1, 1, 32, 32)).pooled.sum().backward()
    grads_2d = {n for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad(set_to_none=True)
    enc(torch.rand(1, 1, 32, 32, 32)).pooled.sum().backward()
    grads_3d = {n for n, p in enc.named_parameters() if p.grad is not None}
    shared = grads_2d & grads_3d
    assert {n for n, _ in enc.named_parameters() if n.startswith(("blocks.", "norm."))} <= shared
    assert all(n.startswith("embed.2d") for n in grads_2d - shared)
    assert all(n.startswith("embed.3d") for n in grads_3d - shared)


def test_position_embedding_interpolates_only_off_grid() -> None:
    enc = tiny_vit()
    assert enc.position_embedding(2, (4, 4)) is enc.embed["2d"].position_embeddings
    pos = enc.position_embedding(2, (2, 2))
    want = enc.embed["2d"].position_embeddings.detach().view(1, 2, 2, 2, 2, 32).mean((2, 4)).reshape(1, 4, 32)
    assert torch.allclose(pos, want, atol=1e-6)  # bilinear 4 -> 2 halving = mean of 2x2 neighbours


def test_mask_swaps_in_mask_token_and_keeps_other_tokens() -> None:
    enc = tiny_vit()
    x = torch.rand(2, 1, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5]] = mask[1, 0] = True
    plain, _ = enc.tokenize(x)
    masked, _ = enc.tokenize(x, mask)
    pos = enc.position_embedding(2, (4, 4))[0]
    assert torch.allclose(masked[~mask], plain[~mask])
    assert torch.allclose(masked[0, 5], enc.mask_token[0, 0] + pos[5])
    assert torch.allclose(masked[1, 0], enc.mask_token[0, 0] + pos[0])


@pytest.mark.parametrize(
    ("shape", "words"), [((1, 32, 32), "B, C, H, W"), ((1, 2, 32, 32), "channel"), ((1, 1, 30, 32), "divisible")]
)
def test_encoder_rejects_bad_input_with_clear_message(shape: tuple[int, ...], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        tiny_vit()(torch.rand(*shape))


def test_method_needs_its_own_encoder_and_valid_ratios() -> None:
    text = build_text_encoder("bert_tiny", hidden=32, layers=1, heads=2)
    with pytest.raises(TypeError, match="UniMedIViT"):
        UniMedI(build_image_encoder("resnet_tiny", spatial_dims=2), text)
    with pytest.raises(ValueError, match="mask_ratio"):
        UniMedI(tiny_vit(), text, mask_ratio=1.0)


# ---- slice selection ----------------------------------------------------------------------------
def test_select_slices_finds_planted_slices_along_the_axial_axis() -> None:
    """Slices 9..12 of a noise volume hold one pattern; a report embedded like that pattern must select them."""
    method = tiny_method(slice_ratio=4 / 32, slice_stride=1, score_chunk=5).eval()
    torch.manual_seed(1)
    vol = torch.rand(2, 1, 32, 32, 32)
    pattern = torch.rand(1, 32, 32)
    vol[0, :, 9:13] = pattern.unsqueeze(1)  # axis 2 (D) is axial
    with torch.no_grad():
        text = method.teacher["proj"](method.teacher["encoder"](pattern[None]).pooled)
    picked = method.select_slices(vol, text.expand(2, -1))
    assert picked.shape == (2, 4)
    assert sorted(picked[0].tolist()) == [9, 10, 11, 12]
    assert all(s.shape == (2, 1, 32, 32) for s in method.draw_slices(vol, text.expand(2, -1)))


# ---- EMA teacher --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "kw"),
    [((2, 1, 32, 32), {}), ((2, 1, 32, 32, 32), {}), ((2, 1, 32, 32), {"distill_weight": 0.0, "slice_weight": 0.0})],
)
def test_teacher_gets_no_gradients_and_every_student_parameter_does(shape: tuple[int, ...], kw: dict) -> None:
    """Every trainable parameter gets a gradient on every kind of step (DDP without find_unused_parameters)."""
    method = tiny_method(**kw)
    method.pretrain_step(make_batch(method, shape))["loss"].backward()
    teacher = list(method.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    optimised = {id(p) for g in method.param_groups() for p in g["params"]}
    assert not optimised & {id(p) for p in teacher}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_teacher_moves_by_the_momentum_rule_once_per_optimiser_step(accumulate: int) -> None:
    method = tiny_method(ema_momentum=0.9, lr=0.05)
    before = [p.detach().clone() for p, _ in method.ema_pairs()]
    batches = [make_batch(method, (4, 1, 32, 32)) for _ in range(accumulate)]
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(method, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 1
    moved = False
    for (p_t, p_s), p0 in zip(method.ema_pairs(), before):
        assert torch.allclose(p_t, 0.9 * p0 + 0.1 * p_s.detach(), atol=1e-6)
        moved |= not torch.equal(p_t, p0)
    assert moved


# ---- loss ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "parts"),
    [((4, 1, 32, 32), {"clip2d", "distill2d"}), ((4, 1, 32, 32, 32), {"clip3d", "distill3d", "slice_clip"})],
)
def test_loss_is_finite_with_its_parts(shape: tuple[int, ...], parts: set[str]) -> None:
    method = tiny_method(slices_per_volume=2)
    out = method.pretrain_step(make_batch(method, shape))
    assert parts | {"loss", "logit_scale"} == set(out)
    assert all(torch.isfinite(v) for v in out.values())
    want = sum(out[k] for k in parts)  # weights 1:1:1
    assert torch.allclose(out["loss"], want)
    assert 0 < out[next(k for k in parts if k.startswith("distill"))] < 2  # 1 - cos lies in [0, 2]


def test_loss_is_finite_on_the_alternating_mixed_corpus(phantom_cache) -> None:
    method = tiny_method()
    dm = mixed(str(phantom_cache))
    dm.tokenizer = method.text_encoder.tokenizer
    seen = set()
    for batch in dm.train_dataloader():
        out = method.pretrain_step(batch)
        assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
        seen.add((batch["source"], batch["image"].ndim))
    assert seen == {("cxr", 4), ("ct", 5)}


def _corpus_loss(method: UniMedI, batches: list[dict]) -> float:
    """Mean loss in training mode (batch statistics in the projection BatchNorms, as the optimiser saw it;
    their running statistics lag far behind after a few steps), with no gradient."""
    method.train()
    torch.manual_seed(123)  # same masks, dropout and slice draws before and after fitting
    with torch.no_grad():
        return float(np.mean([method.pretrain_step(b)["loss"].item() for b in batches]))


def test_short_fit_lowers_the_loss(phantom_cache) -> None:
    method = tiny_method(lr=3e-3)
    dm = mixed(str(phantom_cache))
    dm.tokenizer = method.text_encoder.tokenizer
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    start = _corpus_loss(method, batches)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(method, datamodule=dm)
    end = _corpus_loss(method, batches)
    print(f"loss {start:.3f} -> {end:.3f}")  # measured 8.18 -> 5.85
    assert end < start - 1.0, (start, end)


# ---- mixed corpus ---------------------------------------------------------------------------------
def test_interleave_spreads_parts_evenly() -> None:
    order = interleave({"a": 2, "b": 6})
    assert order.count("a") == 2 and order.count("b") == 6
    assert order == ["b", "a", "b", "b", "b", "a", "b", "b"]
    assert interleave({"x": 3, "y": 3}) == ["x", "y"] * 3


def test_setters_reach_the_parts(phantom_cache) -> None:
    dm = mixed(str(phantom_cache), batch_scale={"ct": 0.5})
    dm.batch_size = 8
    assert (dm.parts["cxr"].batch_size, dm.parts["ct"].batch_size) == (8, 4)
    tok = build_text_encoder("bert_tiny", hidden=32, layers=1, heads=2).tokenizer
    dm.tokenizer = tok
    assert dm.tokenizer is tok and all(p.tokenizer is tok for p in dm.parts.values())
    loader = dm.train_dataloader()
    assert isinstance(loader, AlternatingLoader) and len(loader) == 16 // 8 + 16 // 4
    assert {"text", "source"} <= set(next(iter(loader)))


def test_shard_gives_ranks_disjoint_equal_shares(phantom_cache) -> None:
    loader = phantom("cxr", str(phantom_cache)).loader("train", train=True, batch_size=4)
    ids = [[i for b in shard(loader, 2, r) for i in b["id"]] for r in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 8 and not set(ids[0]) & set(ids[1])


def test_mixed_rejects_bad_config(phantom_cache) -> None:
    with pytest.raises(ValueError, match="mode"):
        mixed(str(phantom_cache), mode="mixed")
    with pytest.raises(ValueError, match="unknown parts"):
        mixed(str(phantom_cache), batch_scale={"mri": 1.0})
    with pytest.raises(TypeError, match="parts.x"):
        MixedDataModule({"x": object()})


# ---- configs ------------------------------------------------------------------------------------
TINY_VIT = [f"method.model.image_encoder.{k}" for k in ("hidden_size=32", "mlp_dim=64", "num_layers=1", "num_heads=2")]


def test_configs_compose_for_2d_and_3d_tasks_and_share_one_pretraining() -> None:
    from medvlp_bench import run

    keys = []
    for task in ("phantom_cxr_cls", "phantom_ct_cls"):
        ov = ["method=unimedi", f"task={task}", "logger=none", *TINY_VIT]
        cfg = run.with_corpus(compose("run", ov), ov)
        assert cfg.names.data == "phantom_cxr_ct" and cfg.data.parts.phantom_ct.size == 64
        method = run.build_method(cfg)
        assert isinstance(method, UniMedI) and method.impl_source == "paper"
        keys.append(run.pretrain_key(cfg))
    assert keys[0] == keys[1]  # the encoder ignores input.spatial_dims: one checkpoint for 2D and 3D tasks
    pcfg = compose("pretrain", ["method=unimedi", "data=phantom_cxr_ct", *TINY_VIT])
    assert (pcfg.input.spatial_dims, pcfg.input.in_channels) == (3, 1)
    dm = instantiate(pcfg.data)
    assert isinstance(dm, MixedDataModule) and set(dm.parts) == {"phantom_cxr", "phantom_ct"}
