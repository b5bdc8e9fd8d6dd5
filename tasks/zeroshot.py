"""Zero-shot classification from class prompts, for methods with a joint image-text space.

Class embeddings come from ``method.class_embeddings(prompts)``: by default each class's hand-written
prompts (several templates, from the task config) are embedded and averaged (CLIP's prompt ensembling); a
method with learned prompts overrides it. The prompt lists are passed in a fixed order: multi-class, one
list per class in ``data.class_names`` order; multi-label (and binary), the K positive lists then the K
negative lists.

- Multi-label (CheXzero's protocol): for each class, the image's cosine with the positive prompt
  ("pleural effusion") and with the negative prompt ("no pleural effusion") go through a softmax over the
  pair; the positive share is the class probability. AUROC (macro and per class), accuracy and F1 at 0.5.
- Multi-class: softmax over the classes' cosines; accuracy, AUROC (macro one-vs-rest), F1.

Cosines are scaled by ``logit_scale`` (100, CLIP's cap) before the softmax; this changes the probabilities
but not the ranking, so AUROC and the thresholded metrics do not depend on it. Metrics are computed by the
same function as the classification task (``tasks.classification.classification_metrics``, i.e.
``medvlp_bench.metrics``); classes left out of the macro averages are named in ``left_out_classes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from medvlp_bench import metrics
from medvlp_bench.data import MedDataModule
from medvlp_bench.method import Method
from medvlp_bench.task import EvalContext, Task, TaskResult, extract
from medvlp_bench.tasks.classification import classification_metrics
from medvlp_bench.tasks.retrieval import text_tower_reason


def prompt_lists(class_prompts: Mapping[str, Any], class_names: Sequence[str], task_type: str) -> list[list[str]]:
    """Config prompts -> the ordered lists ``class_embeddings`` receives (see the module docstring)."""
    names = [str(n) for n in class_names]
    missing, unknown = set(names) - set(class_prompts), set(class_prompts) - set(names)
    if missing or unknown:
        raise ValueError(
            f"task.class_prompts must have one entry per class {names}; missing {sorted(missing)}, "
            f"unknown {sorted(unknown)}"
        )
    if task_type == "multiclass":
        lists = [list(class_prompts[n]) for n in names]
    else:
        for n in names:
            if not isinstance(class_prompts[n], Mapping) or {"positive", "negative"} - set(class_prompts[n]):
                raise ValueError(f"task.class_prompts.{n} needs 'positive' and 'negative' prompt lists ({task_type})")
        lists = [list(class_prompts[n]["positive"]) for n in names] + [
            list(class_prompts[n]["negative"]) for n in names
        ]
    empty = [i for i, p in enumerate(lists) if not p or not all(isinstance(s, str) and s for s in p)]
    if empty:
        raise ValueError(f"task.class_prompts: every class needs non-empty prompt strings (lists {empty} are not)")
    return lists


def template_prompts(
    templates: Mapping[str, Sequence[str]], class_names: Sequence[str], task_type: str
) -> dict[str, Any]:
    """Class prompts written from templates (``"{}"`` is the class name, ``_`` read as a space), for data whose
    classes are the user's own label columns or folders: positive templates per class (multi-class), or
    positive and negative ones (multi-label, binary)."""
    if not class_names:
        raise ValueError("zero-shot needs classes: the data has none (label columns or class folders)")
    out: dict[str, Any] = {}
    for name in class_names:
        words = str(name).replace("_", " ")
        pos = [t.format(words) for t in templates.get("positive", [])]
        neg = [t.format(words) for t in templates.get("negative", [])]
        out[str(name)] = pos if task_type == "multiclass" else {"positive": pos, "negative": neg}
    return out


def zeroshot_probs(image: Tensor, classes: Tensor, task_type: str, logit_scale: float = 100.0) -> Tensor:
    """[N, K] probabilities from L2-normalised image and class embeddings.

    multi-label/binary: ``classes`` is [2K, E] (positives then negatives), softmax over each pair;
    multi-class: ``classes`` is [K, E], softmax over classes.
    """
    logits = logit_scale * image.float() @ classes.float().T
    if task_type == "multiclass":
        return logits.softmax(-1)
    k = classes.shape[0] // 2
    return torch.stack([logits[:, :k], logits[:, k:]], -1).softmax(-1)[..., 0]


class ZeroShot(Task):
    """Zero-shot classification of the test split from class prompts (no labels used, nothing trained)."""

    kind: ClassVar[str] = "zeroshot"
    frozen_protocols: ClassVar[frozenset[str]] = frozenset({"zeroshot"})

    def __init__(
        self,
        data: MedDataModule,
        *,
        class_prompts: Mapping[str, Any] | None = None,
        prompt_templates: Mapping[str, Sequence[str]] | None = None,
        logit_scale: float = 100.0,
        per_class: bool = True,
        **kw: Any,
    ) -> None:
        kw.setdefault("protocol", "zeroshot")
        kw.setdefault("label_fraction", 1.0)
        super().__init__(data, **kw)
        if self.protocol != "zeroshot":
            raise ValueError(
                f"zero-shot classification trains nothing: protocol must be 'zeroshot', got {self.protocol!r}"
            )
        if class_prompts is None and not prompt_templates:
            raise ValueError("zero-shot needs task.class_prompts or task.prompt_templates")
        self.templates = dict(prompt_templates or {})
        self.prompts = None if class_prompts is None else prompt_lists(class_prompts, data.class_names, data.task_type)
        self.logit_scale, self.per_class = float(logit_scale), per_class

    def skip_reason(self, method: Method) -> str | None:
        return text_tower_reason(method)

    def class_prompt_lists(self) -> list[list[str]]:
        """The configured prompts, else prompts from ``prompt_templates`` and the data's class names, read after
        the data is scanned (a user's class folders are only known then)."""
        if self.prompts is None:
            _ = self.data.manifest
            dm = self.data
            self.prompts = prompt_lists(
                template_prompts(self.templates, dm.class_names, dm.task_type), dm.class_names, dm.task_type
            )
        return self.prompts

    @torch.inference_mode()
    def evaluate(self, method: Method, ctx: EvalContext) -> TaskResult:
        dm = self.data
        method.eval().to(ctx.device)
        classes = method.class_embeddings(self.class_prompt_lists())
        test = extract(lambda b: method.embed_image(b["image"]), dm.loader("test"), ctx)
        probs = zeroshot_probs(test["out"], classes.cpu(), dm.task_type, self.logit_scale)
        target = test["label"]
        if dm.task_type == "binary":
            probs = probs.view(-1)
        scores = classification_metrics(probs, target, dm.task_type, dm.class_names, self.per_class)
        missing = set(self.metrics) - set(scores)
        if missing:
            raise ValueError(
                f"task declares metrics {sorted(missing)} that zero-shot does not produce: {sorted(scores)}"
            )
        preds = {"id": np.asarray(test["id"]), "target": target.numpy(), "score": probs.numpy()}
        left_out = metrics.left_out_classes(preds["target"], preds["score"], dm.class_names)
        return TaskResult(
            scores, n_test=len(target), predictions=preds, subset_ids=None, extra={"left_out_classes": left_out}
        )
