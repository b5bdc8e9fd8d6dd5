"""Proof of learning: a held-out proxy score for every pre-training run, beside its chance level.

``encoder_shift`` says the weights moved; it does not say they moved somewhere useful. So every
pre-training run also scores its own objective's natural held-out task on the corpus's validation split:

- a method with a joint image-text space: image-to-text and text-to-image R@1 / R@10 over the validation
  pairs (the true report of each image among all validation reports), with chance k/N beside them;
- any other method: its ``Method.proxy_score`` (BrainMVP: reconstruction error of held-out volumes beside
  the error of predicting the per-voxel mean), or else its own loss on the validation split, beside the
  same loss at the start of the run.

``learned`` is true when the score beats its reference by a margin that chance does not explain: for
retrieval a one-sided binomial test of the R@10 hits of both directions against k/N (p < ``ALPHA``); for a
loss or an error, a relative improvement of at least ``MIN_GAIN``. The score is computed at the start of
the run and after every epoch (a curve in the logger, ``proxy/<key>``), and its last value goes into the
checkpoint's ``config.json`` and into every row made from it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from scipy.stats import binomtest
from torch import Tensor

log = logging.getLogger("medvlp_bench")

#: significance level of the retrieval test against chance
ALPHA = 0.01
#: relative improvement of a loss / error over its reference that counts as learning
MIN_GAIN = 0.05
#: the retrieval proxy's k
KS = (1, 10)


@dataclass
class ProxyScore:
    """Held-out scores, their chance / reference values, and the verdict."""

    kind: str  # retrieval | reconstruction | val_loss
    values: dict[str, float]
    reference: dict[str, float]
    learned: bool | None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "values": self.values,
            "reference": self.reference,
            "learned": self.learned,
            **self.detail,
        }


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    if isinstance(out.get("text"), dict):
        out["text"] = {k: v.to(device) for k, v in out["text"].items()}
    return out


def retrieval_hits(img: Tensor, txt: Tensor, ks: tuple[int, ...] = KS) -> dict[str, Any]:
    """R@k both ways for paired, L2-normalised embeddings (pair i = row i), ties broken at random in
    expectation (``metrics.recall_at_k``, the same rule as the retrieval rows).

    Returns ``i2t_r{k}``, ``t2i_r{k}`` (fractions), ``hits`` (expected R@max(k) hits, both ways, rounded)
    and ``n``.
    """
    from medvlp_bench.metrics import recall_at_k
    from medvlp_bench.tasks.retrieval import true_match_ranks

    sim = img.float() @ txt.float().T
    ranks = {"i2t": true_match_ranks(sim), "t2i": true_match_ranks(sim.T)}
    out: dict[str, Any] = {f"{d}_r{k}": float(np.mean(recall_at_k(r, t, k))) for d, (r, t) in ranks.items() for k in ks}
    out["hits"] = round(sum(float(np.sum(recall_at_k(r, t, max(ks)))) for r, t in ranks.values()))
    out["n"] = len(img)
    return out


def retrieval_verdict(hits: int, n: int, k: int = max(KS)) -> tuple[float, bool | None]:
    """One-sided binomial p-value of ``hits`` R@k successes in 2n queries against chance k/n, and p < ALPHA.

    With n <= k every query hits by chance: nothing can be tested, so the verdict is None, not False."""
    chance = min(k, n) / n
    if chance >= 1.0:
        return 1.0, None
    p = float(binomtest(hits, 2 * n, chance, alternative="greater").pvalue)
    return p, p < ALPHA


@torch.no_grad()
def retrieval_proxy(method: Any, loader: Any) -> ProxyScore | None:
    """Retrieval over the validation pairs of each source (a mixed corpus scores each part on its own); None
    for a corpus without reports (GTGM on volumes writes its own text), which then gets the loss proxy."""
    device = method.device
    img: dict[str, list[Tensor]] = defaultdict(list)
    txt: dict[str, list[Tensor]] = defaultdict(list)
    for batch in loader:
        batch = _to_device(batch, device)
        text = method.proxy_texts(batch)
        if text is None:  # no image-text pairs in this corpus: the caller falls back to the loss proxy
            return None
        src = str(batch.get("source", ""))
        img[src].append(method.embed_image(batch["image"]).float().cpu())
        txt[src].append(method.embed_text(text).float().cpu())
    values: dict[str, float] = {}
    reference: dict[str, float] = {}
    detail: dict[str, Any] = {"p_value": {}, "n": {}}
    verdicts = []
    for src in img:
        prefix = f"{src}/" if src else ""
        r = retrieval_hits(torch.cat(img[src]), torch.cat(txt[src]))
        n = r.pop("n")
        hits = r.pop("hits")
        values |= {prefix + k: v for k, v in r.items()}
        reference |= {f"{prefix}chance_r{k}": min(k, n) / n for k in KS}
        p, ok = retrieval_verdict(hits, n)
        detail["p_value"][src or "all"], detail["n"][src or "all"] = p, n
        verdicts.append(ok)
    learned = None if not verdicts or any(v is None for v in verdicts) else all(verdicts)
    return ProxyScore("retrieval", values, reference, learned, detail)


@torch.no_grad()
def val_loss(method: Any, loader: Any) -> float:
    """Mean of the method's own pre-training loss over the validation split (batch-size weighted)."""
    total, count = 0.0, 0
    for batch in loader:
        batch = _to_device(batch, method.device)
        n = len(batch["image"])
        total += float(method.pretrain_step(batch)["loss"]) * n
        count += n
    return total / max(count, 1)


def gain_verdict(value: float, reference: float) -> bool:
    """A loss or error counts as learned when it is at least ``MIN_GAIN`` below its reference."""
    return bool(np.isfinite(value) and value < (1.0 - MIN_GAIN) * reference)


def score(method: Any, loader: Any, start: dict[str, float] | None = None, allow_loss: bool = True) -> ProxyScore:
    """The proxy of ``method`` on ``loader`` (its validation split), in eval mode; the mode is restored.

    ``start`` is the val loss at the start of the run, the reference of the generic loss proxy.
    ``allow_loss=False`` (several ranks) skips that fallback: a method's loss may gather across ranks, and
    the proxy runs on rank 0 only, so it would wait for ranks that are training.
    """
    was_training = method.training
    method.eval()
    try:
        if method.has_text_tower and (paired := retrieval_proxy(method, loader)) is not None:
            return paired
        own = method.proxy_score(loader)
        if own is not None:
            return own
        if not allow_loss:
            return ProxyScore("val_loss", {}, {}, None, {"skipped": "the loss proxy runs on one process only"})
        loss = val_loss(method, loader)
        ref = (start or {}).get("val_loss", float("nan"))
        learned = gain_verdict(loss, ref) if np.isfinite(ref) else None
        return ProxyScore("val_loss", {"val_loss": loss}, {"val_loss_at_start": ref}, learned)
    finally:
        method.train(was_training)


class ProxyCallback(L.Callback):
    """Scores the proxy when training starts and after every training epoch (rank 0), logging a curve.

    The first score is taken in ``on_train_start``, after the method's own ``on_fit_start`` (GTGM writes
    its texts there). ``curve`` (one dict per scoring, epoch -1 = start), the starting reference and the last
    score are saved in Lightning's resume checkpoint, so a resumed run keeps its true start and its curve.
    A corpus without a validation split gets no proxy (``summary()`` is None) and a warning.
    """

    def __init__(self, datamodule: Any) -> None:
        self.datamodule = datamodule
        self.last: dict[str, Any] | None = None
        self.start: dict[str, float] = {}
        self.curve: list[dict[str, float]] = []
        self._disabled = False

    def _score(self, trainer: L.Trainer, method: Any, epoch: int) -> None:
        if self._disabled or trainer.global_rank != 0:
            return
        try:
            loader = self.datamodule.val_dataloader()
        except ValueError as e:  # no validation split in this corpus
            log.warning("no pre-training proxy score: %s", e)
            self._disabled = True
            return
        result = score(method, loader, self.start, allow_loss=trainer.world_size == 1)
        if epoch < 0 and result.kind == "val_loss" and "val_loss" in result.values:
            self.start = {"val_loss": result.values["val_loss"]}
        self.last = result.as_dict()
        self.curve.append({"epoch": epoch, **result.values})
        if trainer.logger is not None and result.values:
            trainer.logger.log_metrics({f"proxy/{k}": v for k, v in result.values.items()}, step=epoch + 1)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.curve:  # a resumed run restored its start and curve from the checkpoint
            self._score(trainer, pl_module, -1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._score(trainer, pl_module, trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"start": dict(self.start), "curve": list(self.curve), "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start = dict(state_dict.get("start") or {})
        self.curve = list(state_dict.get("curve") or [])
        self.last = state_dict.get("last")

    def summary(self) -> dict[str, Any] | None:
        """What goes into the checkpoint's ``config.json`` (``proxy``): the last score and the curve."""
        if self.last is None:
            return None
        return {**self.last, "curve": self.curve}


def report(summary: dict[str, Any] | None, name: str) -> None:
    """Log the final proxy; warn when it does not beat its chance level or reference."""
    if summary is None:
        return
    vals = ", ".join(f"{k} {v:.3f}" for k, v in summary["values"].items())
    refs = ", ".join(f"{k} {v:.3f}" for k, v in summary["reference"].items())
    if summary["learned"] is False:
        log.warning(
            "pre-training proxy of %s is not better than its reference (%s; reference %s): rows built on this "
            "checkpoint carry learned=false",
            name,
            vals,
            refs,
        )
    else:
        log.info("pre-training proxy of %s: %s (reference %s)", name, vals, refs)
