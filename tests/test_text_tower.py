"""The text tower is an explicit, recorded choice: bert_tiny on templated phantom reports, the bundled
pretrained MiniLM on real report corpora, the same rule for every image-text method."""

from __future__ import annotations

import pytest

from medvlp_bench.cell import resolve
from medvlp_bench.config import compose, options, to_container
from medvlp_bench.text import default_text_tower


def _text_methods() -> list[str]:
    out = []
    for m in options("method"):
        cfg = compose("pretrain", [f"method={m}", "data=phantom_cxr"])
        if "text_encoder" in cfg.method.model and m not in ("external", "gtgm"):
            out.append(m)
    return out


@pytest.mark.parametrize("method", _text_methods())
@pytest.mark.parametrize(
    ("corpus", "tower"),
    [
        ("phantom_cxr", "bert_tiny"),
        ("phantom_cxr_ct", "bert_tiny"),
        ("mimic_cxr", "minilm"),
        ("image_text_csv", "minilm"),
    ],
)
def test_every_image_text_method_follows_the_corpus(method: str, corpus: str, tower: str) -> None:
    cfg = compose("pretrain", [f"method={method}", f"data={corpus}"])
    assert to_container(cfg.method.model)["text_encoder"]["name"] == tower


def test_a_task_corpus_and_an_explicit_choice() -> None:
    ov = ["method=clip", "task=image_text_retrieval"]
    assert to_container(resolve(ov).cfg.method.model)["text_encoder"]["name"] == "minilm"
    ov = ["method=clip", "task=phantom_cxr_cls"]
    assert to_container(resolve(ov).cfg.method.model)["text_encoder"]["name"] == "bert_tiny"
    ov = ["method=clip", "task=phantom_cxr_cls", "method.model.text_encoder.name=minilm"]
    assert to_container(resolve(ov).cfg.method.model)["text_encoder"]["name"] == "minilm"


def test_default_text_tower_rule() -> None:
    phantom = {"_target_": "medvlp_bench.datasets.phantoms.PhantomDataModule"}
    real = {"_target_": "medvlp_bench.datasets.mimic_cxr.MIMICCXR"}
    assert default_text_tower(None) == "bert_tiny"
    assert default_text_tower(phantom) == "bert_tiny"
    assert default_text_tower(real) == "minilm"
    assert default_text_tower({"parts": {"a": phantom, "b": phantom}}) == "bert_tiny"
    assert default_text_tower({"parts": {"a": phantom, "b": real}}) == "minilm"


def test_gtgm_keeps_bert_tiny_for_its_generated_text() -> None:
    for corpus in ("phantom_ct", "msd_hippocampus"):
        cfg = compose("pretrain", ["method=gtgm", f"data={corpus}"])
        assert to_container(cfg.method.model)["text_encoder"]["name"] == "bert_tiny"
