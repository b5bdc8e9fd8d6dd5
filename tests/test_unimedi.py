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
from medvlp_bench.types import ImageFeatures

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


# ---- text-guided 2D token masking ---------------------------------------------------------------
class PlantedTeacher(torch.nn.Module):
    """A teacher encoder with given final tokens (what the scoring and the distillation read)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> ImageFeatures:
        return ImageFeatures(pooled=self.tokens.mean(1), tokens=self.tokens)


def spy_student_masks(method: UniMedI) -> list[torch.Tensor]:
    """Record the masked half of every token mask the student encoder receives."""
    seen: list[torch.Tensor] = []
    forward = method.image_encoder.forward

    def spy(image: torch.Tensor, mask: torch.Tensor | None = None) -> ImageFeatures:
        if mask is not None:
            seen.append(mask[len(mask) // 2 :].clone())
        return forward(image, mask)

    method.image_encoder.forward = spy
    return seen


def planted(method: UniMedI, keep: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher tokens [2, 16, 32] of which patches ``keep[b]`` point along one direction u, and the report
    embeddings [2, 16] = P_t(u): those patches are the report-related ones, the others are noise."""
    torch.manual_seed(2)
    tokens = torch.randn(2, 16, 32)
    u = torch.randn(32) * 3
    for b, idx in enumerate(keep):
        tokens[b, idx] = u + 0.05 * torch.randn(len(idx), 32)
    with torch.no_grad():
        text = method.teacher["proj"](u[None]).expand(2, -1)
    return tokens, text


KEEP = [[1, 6, 11, 12], [0, 3, 9, 15]]


def test_text_mode_keeps_the_report_related_patches_visible_to_the_student() -> None:
    """16 tokens, mask_ratio 0.75: 4 visible, which must be exactly the 4 planted report-related patches."""
    method = tiny_method(mask_ratio=0.75, mask_2d="text").eval()
    tokens, text = planted(method, KEEP)
    scores = method.text_scores(tokens, text)
    assert all(set(scores[b].topk(4).indices.tolist()) == set(KEEP[b]) for b in range(2))
    # through the training step: the teacher's tokens are scored against the batch's own reports
    method.teacher["encoder"] = PlantedTeacher(tokens)
    seen = spy_student_masks(method)
    batch = make_batch(method, (2, 1, 32, 32))
    method.embed_text = lambda _: text  # the reports embed as P_t(u)
    out = method.pretrain_step(batch)
    assert torch.isfinite(out["loss"]) and len(seen) == 1
    assert [sorted((~seen[0][b]).nonzero().flatten().tolist()) for b in range(2)] == KEEP


@pytest.mark.parametrize(("mode", "shape"), [("random", (2, 1, 32, 32)), ("text", (2, 1, 32, 32, 32))])
def test_random_mode_and_3d_keep_the_version_1_masks(mode: str, shape: tuple[int, ...]) -> None:
    """mask_2d=random (and any 3D batch) draws exactly the masks of version 1: rand(n, N).argsort()[:, :k]."""
    method = tiny_method(mask_2d=mode, slice_weight=0.0).eval()  # eval: nothing draws random numbers before
    seen = spy_student_masks(method)
    batch = make_batch(method, shape)
    torch.manual_seed(5)
    method.pretrain_step(batch)
    n, tokens = 2, 16 if len(shape) == 4 else 64
    torch.manual_seed(5)
    hide = torch.rand(n, tokens).argsort(1)[:, : tokens // 2]
    want = torch.zeros(n, tokens, dtype=torch.bool).scatter_(1, hide, True)
    assert torch.equal(seen[0], want)


@pytest.mark.parametrize(("ratio", "hidden"), [(0.25, 4), (0.5, 8), (0.75, 12)])
@pytest.mark.parametrize(("fraction", "top"), [(1.0, 1.0), (0.5, 0.5), (0.0, 0.0)])
def test_text_mask_hides_the_configured_count_and_keeps_the_top_scored(
    ratio: float, hidden: int, fraction: float, top: float
) -> None:
    method = tiny_method(mask_ratio=ratio, mask_text_fraction=fraction)
    torch.manual_seed(0)
    scores = torch.rand(8, 16)
    mask = method.token_mask(8, 16, torch.device("cpu"), scores)
    assert (mask.sum(1) == hidden).all()  # round(ratio x 16) hidden, 16 - that visible, every row
    best = scores.topk(round(top * (16 - hidden)), dim=1).indices
    assert not mask.gather(1, best).any()  # the top-scored share of the visible tokens is never hidden
    with pytest.raises(ValueError, match="token scores"):
        method.token_mask(8, 16, torch.device("cpu"), scores[:, :15])


def test_token_scoring_carries_no_gradient() -> None:
    """The scores read the teacher and a detached report embedding: nothing upstream gets a gradient."""
    method = tiny_method()
    batch = make_batch(method, (2, 1, 32, 32))
    text = method.embed_text(batch["text"])
    assert text.requires_grad
    with torch.no_grad():
        tokens = method.teacher["encoder"](batch["image"]).tokens
    scores = method.text_scores(tokens, text)
    assert scores.shape == (2, 16) and not scores.requires_grad and scores.grad_fn is None
    method.pretrain_step(batch)["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_mask_2d_rejects_unknown_mode_naming_the_choices() -> None:
    text = build_text_encoder("bert_tiny", hidden=32, layers=1, heads=2)
    with pytest.raises(ValueError, match="mask_2d='topk' is not one of text, random"):
        UniMedI(tiny_vit(), text, mask_2d="topk")
    with pytest.raises(ValueError, match="mask_text_fraction"):
        UniMedI(tiny_vit(), text, mask_text_fraction=1.5)


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
    print(f"loss {start:.3f} -> {end:.3f}")  # measured 8.18 -> 5.89 (mask_2d text; 5.85 in version 1)
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
    from medvlp_bench.cell import resolve

    keys = []
    for task in ("phantom_cxr_cls", "phantom_ct_cls"):
        ov = ["method=unimedi", f"task={task}", "logger=none", *TINY_VIT]
        cfg = resolve(ov).cfg
        assert cfg.names.data == "phantom_cxr_ct" and cfg.data.parts.phantom_ct.size == 64
        method = run.build_method(cfg)
        assert isinstance(method, UniMedI) and method.impl_source == "paper"
        assert (method.mask_2d, method.mask_text_fraction, method.version) == ("text", 1.0, 2)
        keys.append(run.pretrain_key(cfg))
    assert keys[0] == keys[1]  # the encoder ignores input.spatial_dims: one checkpoint for 2D and 3D tasks
    pcfg = compose("pretrain", ["method=unimedi", "data=phantom_cxr_ct", *TINY_VIT])
    assert (pcfg.input.spatial_dims, pcfg.input.in_channels) == (3, 1)
    dm = instantiate(pcfg.data)
    assert isinstance(dm, MixedDataModule) and set(dm.parts) == {"phantom_cxr", "phantom_ct"}
