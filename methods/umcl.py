"""``umcl``: image-text-label contrast with continuous prompts (re-implementation from the abstract).

One stream, three kinds of pairs: each training sample is assigned, by a hash of its id, to *image-report*
(text = report, no labels), *image-label* (report withheld, text = its labels through learned prompts) or
*report-label* (text = report, labels known). Labels come from the rule labeller run on the report
(``medvlp_bench.report_labeler``), never from the dataset's ground truth, unless ``label_source: provided``.
The labeller's vocabulary and the class names come from the pre-training corpus (``vocabulary: auto``: the
corpus module's ``REPORT_VOCABULARY``), and ``corpus_stats`` stops a run whose reports yield no label at all.
Class prompts are CoOp-style: K learned context vectors after [CLS], then the class-name tokens. The loss is
MedCLIP's semantic matching where both sides carry labels (soft targets from label similarity, soft
cross-entropy both ways) and InfoNCE rows where they do not; negatives are gathered across ranks.
Equations and every deviation: docs/methods/umcl.md.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvlp_bench import distributed
from medvlp_bench.config import ConfigError
from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.methods.two_tower import TwoTower
from medvlp_bench.report_labeler import DERIVED, ReportLabeler, corpus_vocabulary, to_binary
from medvlp_bench.text import TextEncoder
from medvlp_bench.types import Batch

log = logging.getLogger(__name__)

KINDS = ("image_report", "image_label", "report_label")
TARGETS = ("cosine", "exact", "medclip")
#: below this fraction of training reports with a positive label, ``corpus_stats`` warns
MIN_LABELLED_FRACTION = 0.05
#: ``corpus_stats`` labels at most this many training reports (evenly spaced), so a 370k-report corpus costs
#: seconds, not minutes, on every rank
STATS_MAX_REPORTS = 20_000


def label_similarity(a: Tensor, b: Tensor, mode: str = "cosine") -> Tensor:
    """[Na, Nb] similarity of label vectors, each extended by a "no finding" column 1 - max(labels).

    ``cosine`` and ``exact`` are 0 between label sets with no positive in common, so targets are one-hot
    when all labels are distinct; ``medclip`` is the raw dot product that MedCLIP feeds to a softmax.
    """
    a = torch.cat([a, (1 - a.amax(1, keepdim=True)).clamp(0, 1)], 1).float()
    b = torch.cat([b, (1 - b.amax(1, keepdim=True)).clamp(0, 1)], 1).float()
    if mode == "cosine":
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    if mode == "exact":
        return (torch.cdist(a, b) < 1e-6).float()
    if mode == "medclip":
        return a @ b.T
    raise ValueError(f"soft target mode must be one of {TARGETS}, got {mode!r}")


def soft_targets(
    labels: Tensor, all_labels: Tensor, labelled: Tensor, all_labelled: Tensor, offset: int, mode: str
) -> Tensor:
    """[B, N] targets of local rows against all gathered columns.

    Labelled row: label similarity over labelled columns, normalised to sum 1 (softmax for ``medclip``);
    unlabelled columns get 0. Unlabelled row: one-hot at its own global index (InfoNCE).
    """
    b, n = labels.shape[0], all_labels.shape[0]
    sim = label_similarity(labels, all_labels, mode)
    both = labelled[:, None] & all_labelled[None, :]
    if mode == "medclip":
        soft = torch.softmax(sim.masked_fill(~both, float("-inf")), 1).nan_to_num(0.0)
    else:
        sim = sim * both
        soft = sim / sim.sum(1, keepdim=True).clamp_min(1e-12)
    hard = F.one_hot(torch.arange(b, device=labels.device) + offset, n).float()
    return torch.where(labelled[:, None], soft, hard)


def soft_contrastive_loss(
    img: Tensor, txt: Tensor, labels: Tensor, labelled: Tensor, logit_scale: Tensor | float, mode: str = "cosine"
) -> Tensor:
    """Image-text-label contrast: soft cross-entropy image->text and text->image, negatives from all ranks.

    Each rank scores its own rows against the gathered batch (open_clip's local loss); the mean over ranks
    equals the loss on the concatenated batch. ``labels`` [B, C] in [0, 1]; ``labelled`` [B] bool.
    """
    img_all, txt_all = distributed.gather_with_grad(img), distributed.gather_with_grad(txt)
    all_labels = distributed.gather_no_grad(labels.float())
    all_labelled = distributed.gather_no_grad(labelled.float()) > 0.5
    target = soft_targets(labels.float(), all_labels, labelled, all_labelled, img.shape[0] * distributed.rank(), mode)
    i2t = -(target * F.log_softmax(logit_scale * img @ txt_all.T, 1)).sum(1).mean()
    t2i = -(target * F.log_softmax(logit_scale * txt @ img_all.T, 1)).sum(1).mean()
    return (i2t + t2i) / 2


class PromptLearner(nn.Module):
    """CoOp continuous prompt: ``[CLS] ctx_1 .. ctx_K <phrase tokens> [SEP]`` through the text tower."""

    def __init__(self, n_ctx: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx (learned context length) must be >= 1, got {n_ctx}")
        self.ctx_no_decay = nn.Parameter(torch.randn(n_ctx, dim) * init_std)  # CoOp: no weight decay on ctx

    def forward(self, text_encoder: TextEncoder, phrases: Sequence[str]) -> Tensor:
        tok = text_encoder.tokenizer(list(phrases))
        dev = self.ctx_no_decay.device
        ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        words = text_encoder.embed_tokens(ids)
        n, k = words.shape[0], self.ctx_no_decay.shape[0]
        ctx = self.ctx_no_decay.to(words.dtype).unsqueeze(0).expand(n, -1, -1)
        embeds = torch.cat([words[:, :1], ctx, words[:, 1:]], 1)
        mask = torch.cat([mask[:, :1], mask.new_ones(n, k), mask[:, 1:]], 1)
        return text_encoder(inputs_embeds=embeds, attention_mask=mask).pooled


class UMCL(TwoTower):
    """Image-text-label contrast (see the module docstring) on ``TwoTower``'s towers, plus learned prompts.

    Args (the label side; the rest is in ``configs/method/umcl.yaml``; ``temperature`` and ``proj_hidden`` are
    ``TwoTower``'s, the learned logit scale floored at 0, i.e. T <= 1):
        vocabulary: ``auto`` (the labeller vocabulary ``corpus`` declares), a preset name
            (``report_labeler.VOCABULARIES``) or a list of finding names.
        class_names: ``auto`` (every class of the vocabulary, with its prompt text), a list of its classes, or
            class -> [prompt text, extra labeller synonyms...].
        corpus: name of the pre-training corpus (``data.name``), read only by ``vocabulary: auto``.
        corpus_findings: the corpus's label column names (``image_text_csv``), the vocabulary ``auto`` uses for
            a corpus that declares none.
    """

    impl_source: ClassVar[str] = "reimplementation"
    version: ClassVar[int] = 2  # 2: vocabulary and class names from the corpus; corpus_stats check
    logit_scale_floor: ClassVar[float | None] = 0.0

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        *,
        class_names: Mapping[str, Sequence[str] | str] | Sequence[str] | str = "auto",
        vocabulary: str | Sequence[str] = "auto",
        corpus: str | None = None,
        corpus_findings: Sequence[str] | None = None,
        label_source: str = "labeller",
        uncertain: str = "ones",
        mix: Mapping[str, float] | None = None,
        n_ctx: int = 8,
        label_text: str = "composed",
        soft_targets: str = "cosine",
        zeroshot_prompts: str = "learned",
        **kw: Any,
    ) -> None:
        super().__init__(image_encoder, text_encoder, **kw)
        if isinstance(vocabulary, str) and vocabulary == "auto":
            vocabulary = corpus_vocabulary(corpus, corpus_findings)
        self.corpus, self.vocabulary = corpus, vocabulary if isinstance(vocabulary, str) else list(vocabulary)
        syn = self._class_synonyms(class_names, ReportLabeler(vocabulary), vocabulary)
        self.class_names, self.prompt_text = list(syn), [v[0] for v in syn.values()]
        self._check_choice("label_source", label_source, ("labeller", "provided"))
        self._check_choice("label_text", label_text, ("composed", "sentence"))
        self._check_choice("soft_targets", soft_targets, TARGETS)
        self._check_choice("zeroshot_prompts", zeroshot_prompts, ("learned", "hand", "ensemble"))
        self.labeler = ReportLabeler(vocabulary, syn)
        self._columns = [self.labeler.classes.index(c) for c in self.class_names]
        fractions = {k: float(v) for k, v in (mix or dict.fromkeys(KINDS, 1.0)).items()}
        if set(fractions) - set(KINDS) or min(fractions.values()) < 0 or sum(fractions.values()) <= 0:
            raise ValueError(f"umcl: mix must give non-negative fractions for {KINDS}, got {dict(fractions)}")
        total = sum(fractions.values())
        self._bounds = np.cumsum([fractions.get(k, 0.0) / total for k in KINDS])
        self.label_source, self.uncertain, self.label_text = label_source, uncertain, label_text
        self.soft_target_mode, self.zeroshot_prompts = soft_targets, zeroshot_prompts
        to_binary(np.zeros(1), uncertain)  # validates the policy name now, not mid-training
        self.prompt = PromptLearner(n_ctx, text_encoder.out_dim)
        self._label_cache: dict[str, np.ndarray] = {}
        self._kind_cache: dict[str, int] = {}

    @staticmethod
    def _class_synonyms(
        class_names: Mapping[str, Sequence[str] | str] | Sequence[str] | str, base: ReportLabeler, vocabulary: Any
    ) -> dict[str, list[str]]:
        """class -> [prompt text, extra synonyms...]: ``auto`` takes every mentionable class of the vocabulary."""
        if isinstance(class_names, str):
            if class_names != "auto":
                raise ValueError(f"umcl: class_names must be 'auto', a list or a mapping, got {class_names!r}")
            return {o.name: [o.prompt_text] for o in base.observations if o.name not in DERIVED}
        if isinstance(class_names, Mapping):
            names = class_names
        else:
            prompts = {o.name: o.prompt_text for o in base.observations}
            names = {str(c): [prompts.get(str(c), str(c))] for c in class_names}
        syn = {str(k): [v] if isinstance(v, str) else [str(s) for s in v] for k, v in names.items()}
        if not syn or any(not v for v in syn.values()):
            raise ValueError("umcl: class_names must map each class to [prompt text, extra synonyms...]")
        missing = [c for c in syn if c not in base.classes]
        if missing:
            raise KeyError(
                f"umcl: class_names {missing} are not in labeller vocabulary {vocabulary!r} ({base.classes})"
            )
        return syn

    @staticmethod
    def _check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
        if value not in allowed:
            raise ValueError(f"umcl: {key} must be one of {list(allowed)}, got {value!r}")

    # ---- joint space -----------------------------------------------------------------------------
    def embed_prompts(self, phrases: Sequence[str]) -> Tensor:
        """[N, E] learned-context prompts of free phrases (class names, "no <class>", label lists)."""
        return self.project_text(self.prompt(self.text_encoder, phrases))

    def state_embeddings(self) -> Tensor:
        """[2, C, E]: row 0 the positive prompts ``ctx + <class>``, row 1 the negative ``ctx + no <class>``."""
        phrases = self.prompt_text + [f"no {p}" for p in self.prompt_text]
        return self.embed_prompts(phrases).view(2, len(self.prompt_text), -1)

    def label_embeddings(self, labels: Tensor, states: Tensor | None = None) -> Tensor:
        """[B, E] text side of image-label pairs: labels turned into text through the learned prompts.

        ``composed``: normalised mean over classes of ``l_k pos_k + (1 - l_k) neg_k``.
        ``sentence``: one prompt ``ctx + "<positive classes, comma separated>"`` (``no finding`` if none).
        """
        if self.label_text == "sentence":
            phrases = [
                ", ".join(p for p, v in zip(self.prompt_text, row) if v >= 0.5) or "no finding"
                for row in labels.tolist()
            ]
            return self.embed_prompts(phrases)
        states = self.state_embeddings() if states is None else states
        w = labels.to(states.dtype).unsqueeze(-1)
        return F.normalize((w * states[0] + (1 - w) * states[1]).mean(1), dim=-1)

    def class_embeddings(self, class_prompts: list[list[str]]) -> Tensor:
        """[len(class_prompts), E] zero-shot class embeddings from the learned prompts.

        Each prompt list is read with the rule labeller (``match_prompts``): if its prompts that name a single
        class of the method all name the same class with the same polarity, the entry is that class's positive
        (present or uncertain) or negative (negated) learned prompt, so K positive lists, or 2K positive and
        negative lists in any order, both work. Lists naming no class of the method (e.g. "normal chest
        x-ray") or conflicting ones fall back to the averaged hand-written prompts.
        ``zeroshot_prompts``: ``learned`` | ``hand`` | ``ensemble`` (mean of learned and hand-written, renormalised).
        """
        hand = super().class_embeddings(class_prompts)
        if self.zeroshot_prompts == "hand":
            return hand
        states = self.state_embeddings()
        out = []
        for prompts, hand_emb in zip(class_prompts, hand):
            match = self.match_prompts(prompts)
            if match is None:
                out.append(hand_emb)
                continue
            learned = states[1 if match[1] == 0 else 0, match[0]]
            out.append(learned if self.zeroshot_prompts == "learned" else F.normalize(learned + hand_emb, dim=-1))
        return torch.stack(out)

    def match_prompts(self, prompts: Sequence[str]) -> tuple[int, int] | None:
        """(class index, 1 positive | 0 negative) a prompt list stands for, or None.

        Prompts naming exactly one class vote; prompts naming none ("no pleural air") or several ("the lungs
        are clear") abstain. The list matches when at least one prompt votes and all votes agree.
        """
        votes = set()
        for p in prompts:
            y = self.labeler(p)[self._columns]
            idx = np.flatnonzero(~np.isnan(y))
            if len(idx) == 1:
                votes.add((int(idx[0]), 0 if y[idx[0]] == 0 else 1))
        return votes.pop() if len(votes) == 1 else None

    # ---- pre-training ----------------------------------------------------------------------------
    def sample_kinds(self, keys: Sequence[str]) -> Tensor:
        """[B] kind index (see ``KINDS``) per sample, a fixed function of its id and the ``mix`` fractions."""
        out = []
        for key in map(str, keys):
            if key not in self._kind_cache:
                u = int(hashlib.sha256(f"umcl-kind|{key}".encode()).hexdigest()[:13], 16) / 16**13
                self._kind_cache[key] = int(np.searchsorted(self._bounds, u, side="right").clip(0, len(KINDS) - 1))
            out.append(self._kind_cache[key])
        return torch.tensor(out, device=self.device)

    def batch_labels(self, batch: Batch) -> Tensor:
        """[B, C] training labels in [0, 1]: the rule labeller on each report (cached by text), or the
        dataset's own label columns with ``label_source: provided`` (e.g. MIMIC-CXR CheXpert labels)."""
        if self.label_source == "provided":
            raw = batch["label"].detach().float().cpu().numpy()
            if raw.ndim != 2 or raw.shape[1] != len(self.class_names):
                raise ValueError(
                    f"umcl: label_source=provided needs [B, {len(self.class_names)}] labels, got {raw.shape}"
                )
            return torch.from_numpy(to_binary(raw, self.uncertain)).to(self.device)
        if "report" not in batch:
            raise KeyError("umcl: label_source=labeller needs the batch's 'report' strings")
        return torch.from_numpy(np.stack([self.report_labels(t) for t in batch["report"]])).to(self.device)

    def report_labels(self, text: str) -> np.ndarray:
        """[C] training labels of one report (the labeller through ``to_binary``), cached by text."""
        if text not in self._label_cache:
            if len(self._label_cache) > 500_000:
                self._label_cache.clear()
            self._label_cache[text] = to_binary(self.labeler(text)[self._columns], self.uncertain)
        return self._label_cache[text]

    def corpus_stats(self, datamodule: Any) -> dict[str, Any]:
        """Label the corpus's training reports before pre-training; per class, the fraction labelled positive.

        Why: a vocabulary that does not fit the reports labels nothing, every image-label text is then the
        same embedding, and the label term is minimised by making those samples indistinguishable. No positive
        label in any report raises ``ConfigError`` naming the corpus and vocabulary; fewer than
        ``MIN_LABELLED_FRACTION`` labelled reports log a warning. Returns ``labelled_fraction`` (reports with at
        least one positive class, uncertain counted by the ``uncertain`` policy) and ``label_frac.<class>``.
        """
        name = getattr(datamodule, "name", None) or self.corpus or "the corpus"
        where = f"corpus {name!r}, vocabulary {self.vocabulary!r}"
        manifest = getattr(datamodule, "manifest", None)
        if manifest is None or "split" not in manifest:
            raise ConfigError(f"umcl: {where}: the datamodule has no manifest of training samples to label")
        train = manifest[manifest["split"] == "train"]
        if self.label_source == "provided":
            raw = np.stack([np.atleast_1d(np.asarray(v, np.float32)) for v in train["label"]]) if len(train) else None
            if raw is None or raw.shape[1] != len(self.class_names):
                width = None if raw is None else raw.shape[1]
                raise ConfigError(
                    f"umcl: label_source=provided on {where}: {width} label columns, class_names has "
                    f"{len(self.class_names)} ({self.class_names})"
                )
            labels = to_binary(raw, self.uncertain)
        else:
            if "report" not in train:
                raise ConfigError(f"umcl: {where}: the corpus has no reports for the labeller to read")
            reports = train["report"].astype(str).tolist()
            if len(reports) > STATS_MAX_REPORTS:
                keep = np.linspace(0, len(reports) - 1, STATS_MAX_REPORTS).round().astype(int)
                reports = [reports[i] for i in keep]
            labels = np.stack([self.report_labels(t) for t in reports]) if reports else np.zeros((0, 1))
        positive = labels > 0
        labelled = float(positive.any(1).mean()) if len(labels) else 0.0
        stats: dict[str, Any] = {
            "corpus": name,
            "vocabulary": self.vocabulary,
            "label_source": self.label_source,
            "n_train": len(train),
            "n_labelled_checked": len(labels),
            "labelled_fraction": labelled,
            **{f"label_frac.{c}": float(positive[:, j].mean()) for j, c in enumerate(self.class_names) if len(labels)},
        }
        if labelled == 0:
            raise ConfigError(
                f"umcl: no training report of {where} has a positive label for {self.class_names}, so the label "
                "term would collapse; set method.model.vocabulary (and class_names) to match the reports"
            )
        if labelled < MIN_LABELLED_FRACTION:
            log.warning(
                "umcl: only %.1f%% of the training reports of %s have a positive label (%s)",
                100 * labelled,
                where,
                ", ".join(f"{c} {stats[f'label_frac.{c}']:.3f}" for c in self.class_names),
            )
        return stats

    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        img = self.embed_image(batch["image"])
        kinds = self.sample_kinds(batch.get("id") or batch["report"])
        labels = self.batch_labels(batch)
        states = self.state_embeddings()
        is_label = kinds == KINDS.index("image_label")
        txt = img.new_zeros(img.shape)
        if (~is_label).any():
            idx = torch.nonzero(~is_label).squeeze(1)
            txt = txt.index_put((idx,), self.embed_text({k: v[idx] for k, v in batch["text"].items()}))
        if is_label.any():
            idx = torch.nonzero(is_label).squeeze(1)
            txt = txt.index_put((idx,), self.label_embeddings(labels[idx], states))
        scale = self.contrast_scale()
        labelled = kinds != KINDS.index("image_report")
        loss = soft_contrastive_loss(img, txt, labels, labelled, scale, self.soft_target_mode)
        loss = loss + 0.0 * states.sum()  # prompts join the graph every step (DDP needs every parameter used)
        frac = {f"frac_{k}": (kinds == i).float().mean() for i, k in enumerate(KINDS)}
        return {"loss": loss, "logit_scale": scale.detach(), **frac}
