"""Segmentation, 2D and 3D: the shared decoder (``medvlp_bench.decoders``) on the method's multi-scale maps.

Protocols: ``finetune`` (default, as GTGM and BrainMVP evaluate: encoder trained with ``backbone_lr_scale``
times the decoder's learning rate) and ``frozen`` (encoder in eval mode and without gradients, only the
decoder trains; its weights are checked unchanged afterwards). Loss: MONAI ``DiceCELoss`` on softmax over
the label map's classes. Early stopping and checkpoint selection on validation Dice (or loss); the best
checkpoint is tested. 3D (or any ``roi_size``) inference goes through ``sliding_window_inference``.

Scoring: ``DiceMetric`` per sample and class, background excluded unless ``include_background``, or per
evaluation region (``regions``: BraTS WT/TC/ET as unions of labels). ``ignore_empty: false`` (default)
follows BraTS: an empty ground truth scores 1 if the prediction is empty too and 0 otherwise, so false
positives on lesion-free images count. Reported Dice per class = mean over samples, ``dice`` = mean over
classes (a class with no defined Dice, e.g. empty everywhere under ``ignore_empty``, is left out and named in
``left_out_classes``). Optional HD95 (``HausdorffDistanceMetric``, voxel units) averages the cases where both
sides are non-empty. Per-sample per-class Dice is returned as predictions for paired tests; every summary
comes from ``medvlp_bench.metrics``, as in ``compare``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from torch import Tensor

from medvlp_bench.data import MedDataModule
from medvlp_bench.decoders import SegDecoder
from medvlp_bench.method import Method
from medvlp_bench.metrics import metric_value, segmentation_left_out
from medvlp_bench.task import EvalContext, TaskResult, state_checksum
from medvlp_bench.tasks._head import HeadDefaults, HeadModel, HeadTask, finetune_copy


def label_map(logits: Tensor) -> Tensor:
    """``logits.argmax(1, keepdim=True)``, the same labels, about 3x faster on CPU.

    ``argmax`` over the channel axis of a [B, K, *S] volume strides through memory: 0.23 s per 64^3 batch on one
    thread, 9% of a 3D phantom segmentation cell (12% with ``isin``, replaced by ``member``). A running maximum
    over the K contiguous slices does not. Ties go to the first class and a NaN wins (the first NaN), as in
    ``argmax``, so a diverged model is scored exactly as before.
    """
    best = logits[:, 0].clone()
    labels = torch.zeros(best.shape, dtype=torch.long, device=logits.device)
    for k in range(1, logits.shape[1]):
        cand = logits[:, k]
        better = (cand > best) | (cand.isnan() & ~best.isnan())  # strict: an equal later class does not win
        best = torch.where(better, cand, best)
        labels.masked_fill_(better, k)
    return labels.unsqueeze(1)


def member(labels: Tensor, group: Sequence[int]) -> Tensor:
    """``torch.isin(labels, group)`` as a chain of equalities: the same mask, 10x faster for the few labels of a
    class or region (``isin`` sorts)."""
    out = labels == group[0]
    for v in group[1:]:
        out |= labels == v
    return out


class SegScorer:
    """Label maps -> evaluated channels (classes or regions) -> per-sample Dice (and HD95) [B, K]."""

    def __init__(
        self,
        class_names: Sequence[str],
        regions: dict[str, Sequence[int]] | None = None,
        include_background: bool = False,
        ignore_empty: bool = False,
        hd95: bool = False,
    ) -> None:
        self.n_classes = len(class_names)
        if regions:
            self.groups = [[int(v) for v in ids] for ids in regions.values()]
            self.names = [str(k) for k in regions]
        else:
            first = 0 if include_background else 1
            self.groups = [[c] for c in range(first, self.n_classes)]
            self.names = [str(n) for n in class_names[first:]]
        empty = [n for n, g in zip(self.names, self.groups) if not g]
        if empty:
            raise ValueError(f"regions {empty} list no labels; each region is a non-empty list of label values")
        bad = [v for g in self.groups for v in g if not 0 <= v < self.n_classes]
        if bad:
            raise ValueError(f"regions use labels {bad} outside 0..{self.n_classes - 1} ({list(class_names)})")
        self.dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=ignore_empty)
        self.hd = HausdorffDistanceMetric(include_background=True, percentile=95) if hd95 else None

    def channels(self, labels: Tensor) -> Tensor:
        """[B, 1, *S] integer labels -> [B, K, *S] binary channels, one per evaluated class or region."""
        return torch.cat([member(labels, g) for g in self.groups], 1).float()

    @torch.no_grad()
    def __call__(self, logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
        pred = self.channels(label_map(logits))
        truth = self.channels(mask.long())
        out = {"dice": self.dice(pred, truth).cpu()}
        self.dice.reset()
        if self.hd is not None:
            with warnings.catch_warnings():  # empty prediction or truth: inf/nan, left out of the mean (docstring)
                warnings.simplefilter("ignore", UserWarning)
                out["hd95"] = self.hd(pred, truth).cpu()
            self.hd.reset()
        return out


def random_crop(batch: dict[str, Any], roi: Sequence[int]) -> dict[str, Any]:
    """One random ``roi`` crop (same place for the whole batch) of image and mask, when the image is larger."""
    shape = batch["image"].shape[2:]
    if all(r >= s for r, s in zip(roi, shape)):
        return batch
    starts = [int(torch.randint(0, max(s - r, 0) + 1, ()).item()) for r, s in zip(roi, shape)]
    idx = (Ellipsis, *(slice(a, a + min(r, s)) for a, r, s in zip(starts, roi, shape)))
    return {**batch, "image": batch["image"][idx], "mask": batch["mask"][idx]}


class _Segmenter(HeadModel):
    """Encoder (the method, trainable or frozen) + shared decoder (the head); sliding-window inference."""

    def __init__(
        self,
        backbone: Method,
        decoder: SegDecoder,
        scorer: SegScorer,
        *,
        frozen: bool,
        roi_size: Sequence[int] | None,
        sw_batch_size: int,
        overlap: float,
        **kw: Any,
    ) -> None:
        super().__init__(decoder, backbone, **kw)
        self.scorer, self.frozen = scorer, frozen
        self.roi_size, self.sw_batch_size, self.overlap = roi_size, sw_batch_size, overlap
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self._val: list[Tensor] = []

    def train(self, mode: bool = True) -> _Segmenter:
        super().train(mode)
        if self.frozen:  # keep norm statistics frozen too
            self.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning does not call train() at fit start (it keeps and restores each submodule's mode)
        self.train()

    def forward(self, image: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.backbone.image_features(image).maps
        return self.head(image, maps)

    def infer(self, image: Tensor) -> Tensor:
        """Logits for whole images: sliding windows in 3D (or with ``roi_size``), one pass in 2D."""
        if self.roi_size is None and image.ndim == 4:
            return self(image)
        roi = list(self.roi_size or image.shape[2:])
        return sliding_window_inference(image, roi, self.sw_batch_size, self, overlap=self.overlap, mode="gaussian")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # augmentation, then the training crop
        if self.trainer.training and self.roi_size is not None:
            batch = random_crop(batch, self.roi_size)
        return batch

    def training_step(self, batch: dict[str, Any], _: int) -> Tensor:
        loss = self.loss_fn(self(batch["image"]), batch["mask"])
        self.log("train/loss", loss, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, Any], _: int) -> None:
        logits = self.infer(batch["image"])
        self.log("val/loss", self.loss_fn(logits, batch["mask"]), batch_size=len(batch["image"]))
        self._val.append(self.scorer(logits, batch["mask"])["dice"])

    def on_validation_epoch_end(self) -> None:
        dice = metric_value({"id": np.zeros(0), "dice": torch.cat(self._val).numpy()}, "dice") if self._val else 0.0
        self.log("val/dice", float(np.nan_to_num(dice)))
        self._val.clear()

    def predict_step(self, batch: dict[str, Any], _: int) -> dict[str, Any]:
        return {"id": list(batch["id"]), **self.scorer(self.infer(batch["image"]), batch["mask"])}


class Segmentation(HeadTask):
    """Shared-decoder segmentation with label fractions, frozen or fine-tuned encoder, early stopping."""

    kind: ClassVar[str] = "segmentation"
    frozen_protocols: ClassVar[frozenset[str]] = frozenset({"frozen"})
    head_defaults: ClassVar[HeadDefaults] = HeadDefaults(lr=1e-3, weight_decay=1e-5, batch_size=4)

    def __init__(
        self,
        data: MedDataModule,
        *,
        monitor: str = "dice",
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        regions: dict[str, Sequence[int]] | None = None,
        include_background: bool = False,
        ignore_empty: bool = False,
        hd95: bool = False,
        decoder: dict[str, Any] | None = None,
        val_every: int = 1,
        **kw: Any,
    ) -> None:
        kw.setdefault("protocol", "finetune")
        super().__init__(data, **kw)
        if monitor not in ("dice", "loss"):
            raise ValueError(f"segmentation monitor must be 'dice' or 'loss', got {monitor!r}")
        if getattr(data, "target", "mask") != "mask" or not getattr(data, "seg_classes", None):
            raise ValueError(f"segmentation needs task.data.target=mask and data with seg_classes ({data.name})")
        self.monitor = monitor
        self.roi_size = [int(r) for r in roi_size] if roi_size is not None else None
        self.sw_batch_size, self.overlap, self.decoder_kw = sw_batch_size, overlap, dict(decoder or {})
        self.val_every = int(val_every)  # validate every n epochs (3D validation dominates CPU time)
        self.class_names = list(data.seg_classes)
        self.scorer_kw = dict(
            regions=dict(regions) if regions else None,
            include_background=include_background,
            ignore_empty=ignore_empty,
            hd95=hd95,
        )
        SegScorer(self.class_names, **self.scorer_kw)  # fail early on bad regions

    def _model(self, method: Method) -> _Segmenter:
        frozen = self.protocol == "frozen"
        backbone = method.requires_grad_(False) if frozen else finetune_copy(method, image_encoder_only=True)
        decoder = SegDecoder.for_encoder(
            backbone.image_encoder, len(self.class_names), spatial_dims=int(self.data.spatial_dims), **self.decoder_kw
        )
        return _Segmenter(
            backbone,
            decoder,
            SegScorer(self.class_names, **self.scorer_kw),
            frozen=frozen,
            lr=self.lr,
            weight_decay=self.weight_decay,
            backbone_lr_scale=self.backbone_lr_scale,
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            overlap=self.overlap,
            augment=self.data.batch_augment,
        )

    def evaluate(self, method: Method, ctx: EvalContext) -> TaskResult:
        dm = self.data
        subset = dm.subset_ids(self.label_fraction, ctx.seed)
        before = state_checksum(method)
        model = self._model(method)
        fit = self.fit_and_predict_best(
            ctx,
            model,
            self.train_loader(subset),
            dm.loader("val", batch_size=self.batch_size),
            dm.loader("test", batch_size=self.batch_size),
            monitor=f"val/{self.monitor}",
            mode="max" if self.monitor == "dice" else "min",
            save_weights_only=True,
            check_val_every_n_epoch=self.val_every,
        )
        outs = fit.outputs
        if self.protocol == "frozen" and state_checksum(method) != before:  # pragma: no cover - must not happen
            raise RuntimeError("frozen segmentation protocol changed the encoder's weights")
        preds = {"id": np.asarray([i for o in outs for i in o["id"]]), "class_names": np.asarray(self.scorer_names)}
        for key in outs[0]:
            if key != "id":
                preds[key] = torch.cat([o[key] for o in outs]).numpy().astype(np.float32)
        metrics = self.summarise(preds)
        extra = {
            "epochs_trained": fit.epochs_trained,
            "best_val": fit.best_score,
            "left_out_classes": segmentation_left_out(preds),
        }
        return TaskResult(metrics, n_test=len(preds["id"]), predictions=preds, subset_ids=subset, extra=extra)

    @property
    def scorer_names(self) -> list[str]:
        return SegScorer(self.class_names, **self.scorer_kw).names

    def summarise(self, preds: dict[str, np.ndarray]) -> dict[str, float]:
        """``dice`` (mean over classes/regions) and ``dice/<name>`` (mean over samples), same for ``hd95``."""
        out: dict[str, float] = {}
        for key in ("dice", "hd95"):
            if key in preds:
                out[key] = metric_value(preds, key)
                out.update({f"{key}/{n}": metric_value(preds, f"{key}/{n}") for n in preds["class_names"]})
        missing = set(self.metrics) - set(out)
        if missing:
            raise ValueError(
                f"task declares metrics {sorted(missing)} that segmentation does not produce: {sorted(out)}"
            )
        return out
