"""Image-report retrieval over the whole test split, both directions, for methods with a joint space.

Nothing is trained. Every test image and every test report is embedded once (one device, in order); the
image-to-text query for image i ranks all N test reports and its ground truth is report i, the one written
for that image (text-to-image likewise): the standard paired protocol (open_clip ``get_clip_metrics``,
MGCA, BenchX). Phantom reports are generated from a small vocabulary, so several images can share
near-identical reports; they still count as misses, which caps R@1 below 1 -- the fraction of test reports
whose exact text occurs more than once is recorded as ``duplicate_report_fraction``.

Ranks are computed directly instead of with torchmetrics' ``RetrievalRecall``: the paired tests need each
query's rank (saved as predictions), the median rank is not a torchmetrics metric, and the flattened
N x N index tensors torchmetrics expects grow quadratically. Ties are broken at random in expectation
(mid-rank, see ``medvlp_bench.metrics.recall_at_k``), so a constant scorer gets the chance value k/N; the
tests check agreement with torchmetrics on tie-free scores.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from medvlp_bench.data import MedDataModule
from medvlp_bench.method import Method
from medvlp_bench.metrics import metric_value
from medvlp_bench.task import EvalContext, Task, TaskResult, extract


def true_match_ranks(sim: Tensor, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Mid-rank of the true match (the diagonal) of each query row, and how many others tie with it.

    rank = 1 + #candidates scored higher + #ties / 2 (1 = best); computed in row blocks to bound memory.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(
            f"similarity must be square [queries, candidates] with matches on the diagonal, got {tuple(sim.shape)}"
        )
    ranks, ties = [], []
    for start in range(0, len(sim), chunk):
        block = sim[start : start + chunk].float()
        rows = torch.arange(len(block), device=block.device)
        true = block[rows, rows + start].unsqueeze(1)
        higher = (block > true).sum(1)
        tied = (block == true).sum(1) - 1
        ranks.append((1 + higher + tied / 2).cpu())
        ties.append(tied.cpu())
    return torch.cat(ranks).double().numpy(), torch.cat(ties).numpy()


def retrieval_metrics(preds: dict[str, np.ndarray], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@k both ways, median ranks and ``r_mean`` (mean of the recalls), from per-query ranks."""
    out = {f"{d}_r{k}": metric_value(preds, f"{d}_r{k}") for d in ("i2t", "t2i") for k in ks}
    out |= {f"{d}_medr": metric_value(preds, f"{d}_medr") for d in ("i2t", "t2i")}
    out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
    return out


def text_tower_reason(method: Method) -> str | None:
    """Why a joint-space task cannot judge ``method`` (no text tower), or None."""
    if not method.has_text_tower:
        return f"{type(method).__name__} has no text tower (no joint image-text space)"
    return None


def joint_embeddings(method: Method, dm: MedDataModule, ctx: EvalContext) -> dict[str, Any]:
    """Image and report embeddings of the test split, in order, on one device (``out`` = [img | txt]).

    The datamodule must be built with the method's tokenizer (``run.evaluate`` does), or batches carry no text.
    """
    if dm.tokenizer is None:
        raise ValueError(
            f"{dm.name}: the datamodule was built without a tokenizer, so its batches carry no report text; "
            f"build it with tokenizer=<the method's text_encoder.tokenizer>"
        )
    method.eval().to(ctx.device)

    def embed(batch: dict[str, Any]) -> Tensor:
        return torch.cat([method.embed_image(batch["image"]), method.embed_text(batch["text"])], dim=1)

    return extract(embed, dm.loader("test"), ctx, keys=("label", "report"))


class Retrieval(Task):
    """Image-to-text and text-to-image R@k and median rank over the whole test split (zero-shot)."""

    kind: ClassVar[str] = "retrieval"
    frozen_protocols: ClassVar[frozenset[str]] = frozenset({"zeroshot"})

    def __init__(self, data: MedDataModule, *, ks: list[int] | tuple[int, ...] = (1, 5, 10), **kw: Any) -> None:
        kw.setdefault("protocol", "zeroshot")
        kw.setdefault("label_fraction", 1.0)
        super().__init__(data, **kw)
        if self.protocol != "zeroshot":
            raise ValueError(f"retrieval trains nothing: protocol must be 'zeroshot', got {self.protocol!r}")
        self.ks = tuple(int(k) for k in ks)

    def skip_reason(self, method: Method) -> str | None:
        return text_tower_reason(method)

    def evaluate(self, method: Method, ctx: EvalContext) -> TaskResult:
        emb = joint_embeddings(method, self.data, ctx)
        img, txt = emb["out"].chunk(2, dim=1)
        sim = img @ txt.T
        rank_i2t, ties_i2t = true_match_ranks(sim)
        rank_t2i, ties_t2i = true_match_ranks(sim.T)
        preds = {
            "id": np.asarray(emb["id"]),
            "rank_i2t": rank_i2t,
            "ties_i2t": ties_i2t,
            "rank_t2i": rank_t2i,
            "ties_t2i": ties_t2i,
        }
        metrics = retrieval_metrics(preds, self.ks)
        missing = set(self.metrics) - set(metrics)
        if missing:
            raise ValueError(
                f"task declares metrics {sorted(missing)} that retrieval does not produce: {sorted(metrics)}"
            )
        counts = Counter(emb["report"])
        extra = {"duplicate_report_fraction": float(np.mean([counts[r] > 1 for r in emb["report"]]))}
        return TaskResult(metrics, n_test=len(preds["id"]), predictions=preds, subset_ids=None, extra=extra)
