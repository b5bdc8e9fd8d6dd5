"""UMCL: soft targets vs CLIP, false negatives not pushed apart, prompt gradients, data stream, zero-shot prompts."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, tiny_data
from omegaconf import OmegaConf

from medvlp_bench import distributed
from medvlp_bench.config import ConfigError, compose, instantiate, tiny_overrides, to_container
from medvlp_bench.datasets import phantom_ct, phantom_cxr, phantom_mri
from medvlp_bench.encoders import build_image_encoder
from medvlp_bench.losses import clip_loss
from medvlp_bench.methods import umcl
from medvlp_bench.methods.umcl import UMCL, label_similarity, soft_contrastive_loss, soft_targets
from medvlp_bench.text import build_text_encoder

CLASSES = {"consolidation": ["consolidation"], "effusion": ["pleural effusion"], "cardiomegaly": ["cardiomegaly"]}


def _model(**kw) -> UMCL:
    torch.manual_seed(0)
    text = build_text_encoder("bert_tiny", hidden=32, layers=2, heads=2, freeze_layers=kw.pop("freeze_layers", 0))
    image = build_image_encoder("resnet_tiny", spatial_dims=2)
    kw.setdefault("vocabulary", "phantom_cxr")
    return UMCL(image, text, class_names=kw.pop("class_names", CLASSES), embed_dim=16, n_ctx=4, **kw)


def _batch(model: UMCL, n: int = 8) -> dict:
    samples = [phantom_cxr.generate(i, seed=1, size=32) for i in range(n)]
    reports = [s.report for s in samples]
    return {
        "image": torch.from_numpy(np.stack([s.image for s in samples])),
        "report": reports,
        "text": model.text_encoder.tokenizer(reports),
        "label": torch.from_numpy(np.stack([s.labels[:3] for s in samples])),
        "id": [f"s{i}" for i in range(n)],
    }


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_soft_targets_by_hand() -> None:
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labelled = torch.tensor([True, True, True, False])
    t = soft_targets(labels, labels, labelled, labelled, 0, "cosine")
    assert torch.allclose(t[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # identical labels share the mass
    assert torch.allclose(t[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))  # unlabelled row: one-hot
    # with the "no finding" column: [1,1,0] . [1,0,0] / (sqrt2 * 1)
    assert math.isclose(label_similarity(labels[3:], labels[:1])[0, 0].item(), 1 / math.sqrt(2), rel_tol=1e-6)
    assert label_similarity(torch.zeros(1, 2), torch.zeros(1, 2))[0, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["cosine", "exact"])
def test_distinct_labels_give_one_hot_targets_and_clip_loss(mode: str) -> None:
    img, txt = _unit(4, 8, 0), _unit(4, 8, 1)
    labels = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]])  # distinct; last is "no finding"
    for labelled in (torch.ones(4, dtype=torch.bool), torch.tensor([True, False, True, False])):
        t = soft_targets(labels, labels, labelled, labelled, 0, mode)
        assert torch.equal(t, torch.eye(4))
        got = soft_contrastive_loss(img, txt, labels, labelled, 10.0, mode)
        assert torch.allclose(got, clip_loss(img, txt, 10.0), atol=1e-6)


def test_identical_labels_are_not_pushed_apart() -> None:
    """txt1 moving towards img0 (same labels as sample 1) lowers the UMCL loss but raises CLIP's."""
    img = torch.eye(4, 8)
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])

    def slope(loss_fn) -> float:
        t = torch.zeros((), requires_grad=True)
        txt = torch.eye(4, 8).clone()
        txt = torch.cat([txt[:1], F.normalize(txt[1:2] + t * img[:1], dim=-1), txt[2:]])
        (g,) = torch.autograd.grad(loss_fn(img, txt), t)
        return g.item()

    labelled = torch.ones(4, dtype=torch.bool)
    assert slope(lambda i, t: soft_contrastive_loss(i, t, labels, labelled, 10.0)) < 0
    assert slope(lambda i, t: clip_loss(i, t, 10.0)) > 0
    assert slope(lambda i, t: soft_contrastive_loss(i, t, labels, ~labelled, 10.0)) > 0  # no labels: InfoNCE


def _fake_gather(wholes: list[torch.Tensor], sl: slice):
    """all_gather as rank ``sl`` would see it: the known full tensor with the local chunk ``x`` spliced in."""

    def gather(x: torch.Tensor) -> torch.Tensor:
        for whole in wholes:
            if whole.shape[1:] == x.shape[1:] and torch.equal(whole[sl], x.detach()):
                return torch.cat([whole[: sl.start], x, whole[sl.stop :]])
        raise AssertionError("gathered a tensor the test does not know")

    return gather


def test_rank_offsets_match_the_single_process_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated ranks: the mean of the local losses equals the loss on the concatenated batch."""
    img, txt = _unit(6, 8, 2), _unit(6, 8, 3)
    labels = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 0], [1, 0], [0, 1]])
    labelled = torch.tensor([True, False, True, True, True, False])
    full = soft_contrastive_loss(img, txt, labels, labelled, 5.0)
    local = []
    for r in (0, 1):
        sl = slice(3 * r, 3 * r + 3)
        gather = _fake_gather([img, txt, labels, labelled.float()], sl)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "gather_no_grad", gather)
        monkeypatch.setattr(distributed, "gather_with_grad", gather)
        local.append(soft_contrastive_loss(img[sl], txt[sl], labels[sl], labelled[sl], 5.0))
    assert torch.allclose(full, torch.stack(local).mean(), atol=1e-6)


def test_prompts_get_gradients_and_frozen_text_layers_do_not() -> None:
    model = _model(freeze_layers=1)
    batch = _batch(model)
    out = model.pretrain_step(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.prompt.ctx_no_decay.grad is not None and model.prompt.ctx_no_decay.grad.abs().sum() > 0
    bert = model.text_encoder.model
    frozen = [*bert.embeddings.parameters(), *bert.encoder.layer[0].parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p.grad is not None for p in bert.encoder.layer[1].parameters())
    assert any(
        p is model.prompt.ctx_no_decay for g in model.param_groups() if g["weight_decay"] == 0 for p in g["params"]
    )


def test_stream_kinds_and_labels_come_from_the_reports() -> None:
    model = _model(mix={"image_report": 0.5, "image_label": 0.25, "report_label": 0.25})
    kinds = model.sample_kinds([f"id{i}" for i in range(4000)])
    assert torch.equal(kinds, model.sample_kinds([f"id{i}" for i in range(4000)]))  # fixed per id
    frac = torch.bincount(kinds, minlength=3).float() / 4000
    assert torch.allclose(frac, torch.tensor([0.5, 0.25, 0.25]), atol=0.03)
    batch = _batch(model)
    assert torch.equal(model.batch_labels(batch), batch["label"].float())  # labeller == phantom truth here
    batch["report"] = ["Large right pleural effusion. No consolidation."] * len(batch["report"])
    assert model.batch_labels(batch)[0].tolist() == [0.0, 1.0, 0.0]  # labels follow the report, not "label"
    provided = _model(label_source="provided")
    assert torch.equal(provided.batch_labels(batch), batch["label"].float())


def test_label_text_modes_and_logit_scale_clamp() -> None:
    batch = _batch(_model())
    for label_text in ("composed", "sentence"):
        model = _model(mix={"image_label": 1.0}, label_text=label_text)
        with torch.no_grad():
            model.logit_scale.fill_(10.0)
            out = model.pretrain_step(batch)
        assert out["frac_image_label"] == 1 and out["logit_scale"].item() == pytest.approx(100.0)
    model = _model()
    states = model.state_embeddings()
    emb = model.label_embeddings(torch.tensor([[1.0, 0.0, 0.0]]), states)
    expected = F.normalize((states[0, 0] + states[1, 1] + states[1, 2]) / 3, dim=-1)
    assert torch.allclose(emb[0], expected, atol=1e-6)


def test_class_embeddings_use_learned_prompts_for_known_classes() -> None:
    model = _model().eval()
    prompts = [
        ["pleural effusion", "There is a pleural effusion."],
        ["No pleural effusion."],
        ["A normal chest x-ray."],
    ]
    with torch.no_grad():
        emb, states = model.class_embeddings(prompts), model.state_embeddings()
        hand = model.embed_text(model.text_encoder.tokenizer(prompts[2])).mean(0)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb[0], states[0, 1], atol=1e-6) and torch.allclose(emb[1], states[1, 1], atol=1e-6)
    assert torch.allclose(emb[2], F.normalize(hand, dim=-1), atol=1e-6)  # no class named: hand-written prompts
    assert model.match_prompts(["pleural effusion", "consolidation"]) is None  # conflicting votes
    assert model.match_prompts(["pleural effusion", "pleural effusion or consolidation"]) == (1, 1)
    # "the lungs are clear" names several classes and "no pleural air" none: both abstain
    assert model.match_prompts(["no focal consolidation", "the lungs are clear", "no pleural air"]) == (0, 0)


def test_bad_configuration_is_reported() -> None:
    with pytest.raises(KeyError, match="spleen"):
        _model(class_names={"spleen": ["splenomegaly"]})
    with pytest.raises(ConfigError, match="needs the pre-training corpus"):
        _model(vocabulary="auto", class_names="auto")
    with pytest.raises(ValueError, match="class_names must be 'auto'"):
        _model(class_names="all")
    with pytest.raises(ValueError, match="mix"):
        _model(mix={"image_report": -1.0})
    with pytest.raises(ValueError, match="soft_targets"):
        _model(soft_targets="hard")


def test_config_builds_with_clip_encoders() -> None:
    cfg = compose("run", ["method=umcl", "task=phantom_cxr_cls"])
    ref = compose("run", ["method=clip", "task=phantom_cxr_cls"])
    for key in ("image_encoder", "embed_dim", "lr", "weight_decay"):
        assert cfg.method.model[key] == ref.method.model[key]
    assert cfg.method.model.text_encoder.name == ref.method.model.text_encoder.name
    model = instantiate(cfg.method.model)
    assert isinstance(model, umcl.UMCL) and model.impl_source == "reimplementation" and model.has_text_tower
    assert model.class_names == list(phantom_cxr.FINDINGS) and model.prompt.ctx_no_decay.shape[0] == 8


def _from_config(task: str, *extra: str) -> tuple[UMCL, dict]:
    """UMCL as ``medbench run method=umcl task=<task>`` builds it (corpus chosen by ``cell.resolve``)."""
    from medvlp_bench.cell import resolve

    ov = ["method=umcl", f"task={task}", *tiny_overrides("umcl"), *extra]
    cfg = resolve(ov).cfg
    return instantiate(cfg.method.model), to_container(cfg.method.model)


@pytest.mark.parametrize(
    ("task", "vocabulary", "classes"),
    [
        ("phantom_cxr_cls", "phantom_cxr", list(phantom_cxr.FINDINGS)),
        ("phantom_ct_cls", "phantom_ct", list(phantom_ct.FINDINGS)),
        (
            "phantom_mri_cls",
            "phantom_mri",
            ["mass", "enhancement", "necrosis", "edema", "low_grade_glioma", "high_grade_glioma"],
        ),
    ],
)
def test_each_phantom_corpus_gets_its_own_vocabulary(task: str, vocabulary: str, classes: list[str]) -> None:
    model, saved = _from_config(task)
    assert (model.corpus, model.vocabulary, model.class_names) == (task.removesuffix("_cls"), vocabulary, classes)
    rebuilt = instantiate(OmegaConf.create(saved))  # the checkpoint's `model` config, without any corpus config
    assert (rebuilt.vocabulary, rebuilt.class_names, rebuilt.prompt_text) == (vocabulary, classes, model.prompt_text)
    if task == "phantom_cxr_cls":  # the CXR prompts are the ones the old hand-written class_names gave
        assert model.prompt_text == [
            "consolidation",
            "pleural effusion",
            "cardiomegaly",
            "pulmonary nodule",
            "pneumothorax",
        ]


@pytest.mark.parametrize("module", [phantom_ct, phantom_mri])
def test_labels_of_ct_and_mri_reports_are_not_all_zero(module) -> None:
    """The collapse: with the CXR vocabulary every CT/MRI report was labelled all-zero."""
    model, _ = _from_config(f"{module.__name__.rsplit('.', 1)[1]}_cls")
    samples = [module.generate(i, seed=2, size=32) for i in range(40)]
    labels = model.batch_labels({"report": [s.report for s in samples]}).numpy()
    assert labels.any(1).mean() > 0.5 and labels.any(0).all()  # most reports labelled, every class occurs
    if module is phantom_ct:
        assert np.array_equal(labels, np.stack([s.labels for s in samples]))


def test_chexpert_vocabulary_needs_no_hand_written_class_names() -> None:
    model, _ = _from_config("phantom_cxr_cls", "method.model.vocabulary=chexpert")
    assert model.vocabulary == "chexpert" and "no_finding" not in model.class_names and len(model.class_names) == 13
    y = model.report_labels("Small left pleural effusion. No pneumothorax.")
    assert y[model.class_names.index("pleural_effusion")] == 1 and y.sum() == 1
    assert model.prompt_text[model.class_names.index("pleural_effusion")] == "pleural effusion"
    own, _ = _from_config("phantom_cxr_cls", "method.model.vocabulary=[effusion,pneumothorax]")
    assert own.class_names == ["effusion", "pneumothorax"]
    assert own.report_labels("Small left pleural effusion. No pneumothorax.").tolist() == [1, 0]


def _corpus(reports: list[str], name: str = "phantom_ct") -> SimpleNamespace:
    """A datamodule stand-in: a manifest with one validation row that must not be counted."""
    split = ["val"] + ["train"] * len(reports)
    return SimpleNamespace(name=name, manifest=pd.DataFrame({"split": split, "report": ["Ascites.", *reports]}))


def test_corpus_stats_fractions_error_and_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _model(vocabulary="phantom_ct", class_names="auto")
    reports = ["FINDINGS: Large volume ascites. Splenomegaly.", "No ascites.", "Possible renal cyst.", "Normal."]
    stats = model.corpus_stats(_corpus(reports))
    assert stats["labelled_fraction"] == 0.5 and stats["n_train"] == 4  # 2 of 4 have a positive (uncertain: ones)
    assert [stats[f"label_frac.{c}"] for c in model.class_names] == [0.0, 0.25, 0.25, 0.25]
    assert stats["corpus"] == "phantom_ct" and stats["vocabulary"] == "phantom_ct"
    cxr = _model()  # the old default: CXR vocabulary on CT reports labels nothing
    with pytest.raises(ConfigError, match=r"corpus 'phantom_ct', vocabulary 'phantom_cxr'"):
        cxr.corpus_stats(_corpus(reports))
    with caplog.at_level(logging.WARNING, logger="medvlp_bench.methods.umcl"):
        model.corpus_stats(_corpus(["Ascites."] + ["Normal."] * 20))  # 1 of 21 = 4.8%
    assert "only 4.8% of the training reports" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medvlp_bench.methods.umcl"):
        model.corpus_stats(_corpus(["Ascites."] + ["Normal."] * 19))  # 1 of 20 = 5%: no warning
    assert "training reports" not in caplog.text
    provided = _model(vocabulary="phantom_ct", class_names="auto", label_source="provided")
    labels = _corpus(reports).manifest.assign(label=[np.ones(2, np.float32)] * 5)
    with pytest.raises(ConfigError, match="2 label columns, class_names has 4"):
        provided.corpus_stats(SimpleNamespace(name="x", manifest=labels))


@pytest.mark.slow
def test_pretraining_on_ct_records_the_label_fractions(workdir) -> None:
    import json

    from medvlp_bench.cell import resolve
    from medvlp_bench.run import pretrain

    ov = ["method=umcl", "task=phantom_ct_cls", "task.data.size=32", *TINY, *tiny_data(), *tiny_overrides("umcl")]
    folder = pretrain(resolve(ov).cfg)
    stats = json.loads((folder / "config.json").read_text())["corpus_stats"]
    assert stats["vocabulary"] == "phantom_ct" and stats["n_train"] == 32 and stats["labelled_fraction"] > 0.5
    assert set(stats) >= {f"label_frac.{c}" for c in phantom_ct.FINDINGS}


@pytest.mark.slow
def test_end_to_end_linear_probe(workdir) -> None:
    from medvlp_bench.cell import resolve
    from medvlp_bench.run import evaluate

    rows = evaluate(resolve(["method=umcl", "task=phantom_cxr_cls", *TINY, *tiny_data()]))
    assert rows and all(r.impl_source == "reimplementation" for r in rows)
