"""Classification: linear probe on frozen features, or fine-tuning of the whole encoder.

Linear (MGCA protocol): the encoder is frozen and run once in eval mode over the labelled training subset,
the validation split and the test split; features are standardised with statistics of the whole training
split (labels unused) and a linear head is trained with AdamW and early stopping on validation loss; the
best-validation head is tested. Fine-tune: the same head on top of the encoder, trained end to end with a
lower learning rate for the encoder and training-time augmentation. Both report AUROC (macro, and per
class for multi-label), accuracy and F1 from ``medvlp_bench.metrics``, as separate protocol rows; classes
with no positive or no negative in the test split are left out of the macro averages and named in the
cell's ``left_out_classes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medvlp_bench import metrics
from medvlp_bench.data import MedDataModule
from medvlp_bench.method import Method
from medvlp_bench.task import EvalContext, TaskResult, extract, reseed, state_checksum
from medvlp_bench.tasks._head import HeadDefaults, HeadModel, HeadTask, finetune_copy


@dataclass
class _Plan:
    """What a protocol hands to the shared fit/test code."""

    model: L.LightningModule
    train: DataLoader
    val: DataLoader
    test: DataLoader
    test_ids: list[str]
    test_target: Tensor


class _FeatureSet(Dataset):
    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"feature": self.features[i], "label": self.labels[i]}


class _Classifier(HeadModel):
    """Linear head, optionally on top of a trainable encoder (fine-tune protocol)."""

    def __init__(self, in_dim: int, n_out: int, task_type: str, **kw: Any) -> None:
        super().__init__(nn.Linear(in_dim, n_out), **kw)
        self.task_type = task_type

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = self.backbone.encode_image(batch["image"]) if self.backbone is not None else batch["feature"]
        return self.head(x)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.task_type == "multiclass":
            return F.cross_entropy(logits, y.long())
        return F.binary_cross_entropy_with_logits(logits, y.float().view_as(logits))

    def training_step(self, batch: dict[str, Tensor], _: int) -> Tensor:
        loss = self.loss(self(batch), batch["label"])
        self.log("train/loss", loss, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], _: int) -> None:
        self.log("val/loss", self.loss(self(batch), batch["label"]), batch_size=len(batch["label"]))

    def predict_step(self, batch: dict[str, Tensor], _: int) -> Tensor:
        logits = self(batch).float()
        return logits.softmax(-1) if self.task_type == "multiclass" else logits.sigmoid()


def classification_metrics(
    probs: Tensor, target: Tensor, task_type: str, class_names: list[str], per_class: bool = True
) -> dict[str, float]:
    """AUROC (macro), accuracy and F1 from ``medvlp_bench.metrics``, the functions ``compare`` and ``report``
    use on the saved predictions; per-class AUROC for multi-label, for the classes that have one.

    Classes with no positive or no negative in the split are left out of the macro averages and have no
    per-class row (``metrics.left_out_classes`` names them).
    """
    y, s = target.detach().cpu().numpy(), probs.detach().cpu().numpy()
    found = metrics.classification_type(y, s)
    if found != task_type and (task_type, found) != ("multilabel", "binary"):  # one label: scored as binary
        raise ValueError(f"predictions of shape {s.shape} for targets {y.shape} are {found}, not {task_type}")
    out = {m: metrics.classification_metric({"target": y, "score": s}, m) for m in metrics.CLASSIFICATION_METRICS}
    if per_class and task_type == "multilabel":
        per = metrics.auroc_per_class(y, s)
        out.update({f"auroc/{n}": float(v) for n, v in zip(class_names, per) if np.isfinite(v)})
    return out


class Classification(HeadTask):
    """Linear-probe or fine-tune classification with label fractions and early stopping."""

    kind: ClassVar[str] = "classification"
    frozen_protocols: ClassVar[frozenset[str]] = frozenset({"linear"})
    head_defaults: ClassVar[HeadDefaults] = HeadDefaults(lr=5e-4, weight_decay=1e-6, batch_size=48)  # MGCA linear

    def __init__(self, data: MedDataModule, *, standardize: bool = True, per_class: bool = True, **kw: Any) -> None:
        super().__init__(data, **kw)
        self.standardize, self.per_class = standardize, per_class

    @property
    def n_outputs(self) -> int:
        return 1 if self.data.task_type == "binary" else len(self.data.class_names)

    def evaluate(self, method: Method, ctx: EvalContext) -> TaskResult:
        dm = self.data
        subset = dm.subset_ids(self.label_fraction, ctx.seed)
        plan = self._linear(method, ctx, subset) if self.protocol == "linear" else self._finetune(method, ctx, subset)
        fit = self.fit_and_predict_best(ctx, plan.model, plan.train, plan.val, plan.test)
        probs = torch.cat(fit.outputs)
        target = plan.test_target
        scores = classification_metrics(probs, target, dm.task_type, dm.class_names, self.per_class)
        preds = {"id": np.asarray(plan.test_ids), "target": target.numpy(), "score": probs.numpy()}
        extra = {
            "epochs_trained": fit.epochs_trained,
            "best_val_loss": fit.best_score,
            "left_out_classes": metrics.left_out_classes(preds["target"], preds["score"], dm.class_names),
        }
        return TaskResult(scores, n_test=len(target), predictions=preds, subset_ids=subset, extra=extra)

    # ---- protocols -------------------------------------------------------------------------------
    def _linear(self, method: Method, ctx: EvalContext, subset: list[str]) -> _Plan:
        dm = self.data
        method.eval().requires_grad_(False)
        before = state_checksum(method)
        method.to(ctx.device)

        def feats(split: str) -> dict[str, Any]:
            return ctx.cached(
                f"{dm.name}/{dm.cache_key()}/{split}/encode_image",
                lambda: extract(lambda b: method.encode_image(b["image"]), dm.loader(split), ctx),
            )

        full_train = feats("train")
        keep = np.isin(np.asarray(full_train["id"]), subset)
        train = {"out": full_train["out"][keep], "label": full_train["label"][keep]}
        val, test = feats("val"), feats("test")
        if state_checksum(method) != before:  # pragma: no cover - a frozen protocol must not mutate
            raise RuntimeError("linear protocol changed the encoder's weights")
        mu, sd = full_train["out"].mean(0), full_train["out"].std(0).clamp_min(1e-6)
        if not self.standardize:
            mu, sd = torch.zeros_like(mu), torch.ones_like(sd)

        def loader(d: dict[str, Any], shuffle: bool) -> DataLoader:
            features = _FeatureSet((d["out"] - mu) / sd, d["label"])
            return DataLoader(features, batch_size=self.batch_size, shuffle=shuffle)

        reseed(ctx)  # head init and shuffling must not depend on whether features came from the cache
        model = _Classifier(
            train["out"].shape[1], self.n_outputs, dm.task_type, lr=self.lr, weight_decay=self.weight_decay
        )
        return _Plan(model, loader(train, True), loader(val, False), loader(test, False), test["id"], test["label"])

    def _finetune(self, method: Method, ctx: EvalContext, subset: list[str]) -> _Plan:
        dm = self.data
        backbone = finetune_copy(method, image_encoder_only=False)
        reseed(ctx)
        model = _Classifier(
            method.image_encoder.out_dim,
            self.n_outputs,
            dm.task_type,
            backbone=backbone,
            lr=self.lr,
            weight_decay=self.weight_decay,
            backbone_lr_scale=self.backbone_lr_scale,
            augment=dm.batch_augment,
        )
        rows = dm.rows("test")
        target = torch.as_tensor(np.stack([np.asarray(r["label"]) for r in rows]))
        train = self.train_loader(subset)
        return _Plan(model, train, dm.loader("val"), dm.loader("test"), [str(r["id"]) for r in rows], target)
