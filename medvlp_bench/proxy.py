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


def retrieval_verdict(hits: int, n: int, k: int = max(KS)) -> tuple[float, bool]:
    """One-sided binomial p-value of ``hits`` R@k successes in 2n queries against chance k/n, and p < ALPHA."""
    chance = min(k, n) / n
    if chance >= 1.0:
        return 1.0, False
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
        if "text" not in batch:
            return None
        batch = _to_device(batch, device)
        src = str(batch.get("source", ""))
        img[src].append(method.embed_image(batch["image"]).float().cpu())
        txt[src].append(method.embed_text(batch["text"]).float().cpu())
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
    return ProxyScore("retrieval", values, reference, bool(verdicts) and all(verdicts), detail)


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


def score(method: Any, loader: Any, start: dict[str, float] | None = None) -> ProxyScore:
    """The proxy of ``method`` on ``loader`` (its validation split), in eval mode; the mode is restored.

    ``start`` is the val loss at the start of the run, the reference of the generic loss proxy.
    """
    was_training = method.training
    method.eval()
    try:
        if method.has_text_tower and (paired := retrieval_proxy(method, loader)) is not None:
            return paired
        own = method.proxy_score(loader)
        if own is not None:
            return own
        loss = val_loss(method, loader)
        ref = (start or {}).get("val_loss", float("nan"))
        learned = gain_verdict(loss, ref) if np.isfinite(ref) else None
        return ProxyScore("val_loss", {"val_loss": loss}, {"val_loss_at_start": ref}, learned)
    finally:
        method.train(was_training)


class ProxyCallback(L.Callback):
    """Scores the proxy at the start of fitting and after every training epoch (rank 0), logging a curve.

    ``last`` holds the latest :class:`ProxyScore`; ``curve`` one dict per scoring (epoch -1 = start).
    A corpus without a validation split gets no proxy (``last`` stays None) and a warning.
    """

    def __init__(self, datamodule: Any) -> None:
        self.datamodule = datamodule
        self.last: ProxyScore | None = None
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
        result = score(method, loader, self.start)
        if epoch < 0 and result.kind == "val_loss":
            self.start = {"val_loss": result.values["val_loss"]}
        self.last = result
        self.curve.append({"epoch": epoch, **result.values})
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"proxy/{k}": v for k, v in result.values.items()}, step=epoch + 1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._score(trainer, pl_module, -1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._score(trainer, pl_module, trainer.current_epoch)

    def summary(self) -> dict[str, Any] | None:
        """What goes into the checkpoint's ``config.json`` (``proxy``): the last score and the curve."""
        if self.last is None:
            return None
        return {**self.last.as_dict(), "curve": self.curve}


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
