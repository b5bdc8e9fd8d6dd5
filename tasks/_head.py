"""Head training, written once for every task kind that trains a head (classification, segmentation).

Both kinds fit a head (a linear layer; the shared segmentation decoder) on a method's encoder, frozen or
fine-tuned, and the comparison between methods and between kinds only means something if they do it the
same way: AdamW with the encoder's trainable weights at ``backbone_lr_scale`` times the head's learning rate,
the encoder fine-tuned as a copy (the evaluated weights stay as they are for the next cell and for the
frozen-feature cache), early stopping and checkpoint selection on one validation quantity, and the test split
scored by the best checkpoint. Kept in two files, a fix to one copy would not reach the other; here it is
written once, and each kind's module keeps only what is its own: the head, the loss, the metrics.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from medvlp_bench.augment import BatchAugment
from medvlp_bench.data import MedDataModule
from medvlp_bench.method import Method
from medvlp_bench.task import EvalContext, Task


def finetune_copy(method: Method, *, image_encoder_only: bool) -> Method:
    """A deep copy of ``method`` to fine-tune, so the weights under evaluation stay untouched.

    The copy is put in train mode: Lightning keeps a module's mode at fit start (the segmentation model sets it
    again at every epoch start, so there it changes nothing).

    ``image_encoder_only`` (segmentation): only ``image_encoder`` trains. Otherwise (classification) every
    module but the text tower does, so parameters that ``encode_image`` uses outside the encoder (BrainMVP's
    ``mix_in`` templates) train with it. The two rules differ only for such methods; the committed rows were
    measured with them, so making them one is a change of the tasks' versions, not of this code's shape.
    """
    backbone = copy.deepcopy(method).train()
    if image_encoder_only:
        backbone.requires_grad_(False)
        backbone.image_encoder.requires_grad_(True)  # the text tower (if any) plays no part
    else:
        backbone.requires_grad_(True)
        if backbone.text_encoder is not None:
            backbone.text_encoder.requires_grad_(False)
    return backbone


class HeadModel(L.LightningModule):
    """A trainable ``head`` on precomputed features (``backbone`` None) or on the method's encoder.

    Owns what every head shares: the optimiser (the head at ``lr``; the backbone's trainable parameters, if
    any, at ``lr * backbone_lr_scale``; AdamW) and the training-batch augmentation (``augment``, after the
    batch is on its device). Subclasses add the forward pass, loss and steps.
    """

    def __init__(
        self,
        head: nn.Module,
        backbone: Method | None = None,
        *,
        lr: float,
        weight_decay: float,
        backbone_lr_scale: float = 0.1,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__()
        self.head, self.backbone, self.augment = head, backbone, augment
        self.lr, self.weight_decay, self.backbone_lr_scale = lr, weight_decay, backbone_lr_scale

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment is not None and self.trainer.training:
            return self.augment(batch)
        return batch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [{"params": list(self.head.parameters()), "lr": self.lr}]
        trainable = [p for p in self.backbone.parameters() if p.requires_grad] if self.backbone is not None else []
        if trainable:  # a frozen encoder has none
            groups.append({"params": trainable, "lr": self.lr * self.backbone_lr_scale})
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class HeadFit:
    """What :meth:`HeadTask.fit_and_predict_best` returns."""

    #: ``predict_step`` outputs of the best checkpoint, one per test batch
    outputs: list[Any]
    epochs_trained: int
    #: the monitored quantity at the best checkpoint (nan when none was saved)
    best_score: float


@dataclass(frozen=True)
class HeadDefaults:
    """A kind's defaults for the hyper-parameters every head task has (task configs normally set them)."""

    lr: float
    weight_decay: float
    batch_size: int


class HeadTask(Task):
    """A task kind that trains a head: its shared hyper-parameters, protocols and training routine.

    Protocols: the kind's one frozen protocol (``frozen_protocols``) or ``finetune``. ``lr``, ``weight_decay``
    and ``batch_size`` left None take the kind's ``head_defaults``.
    """

    head_defaults: ClassVar[HeadDefaults]

    def __init__(
        self,
        data: MedDataModule,
        *,
        lr: float | None = None,
        weight_decay: float | None = None,
        batch_size: int | None = None,
        max_epochs: int = 50,
        patience: int = 10,
        backbone_lr_scale: float = 0.1,
        **kw: Any,
    ) -> None:
        super().__init__(data, **kw)
        protocols = (*sorted(self.frozen_protocols), "finetune")
        if self.protocol not in protocols:
            allowed = " or ".join(repr(p) for p in protocols)
            raise ValueError(f"{self.kind} protocol must be {allowed}, got {self.protocol!r}")
        d = self.head_defaults
        self.lr = d.lr if lr is None else lr
        self.weight_decay = d.weight_decay if weight_decay is None else weight_decay
        self.batch_size = d.batch_size if batch_size is None else batch_size
        self.max_epochs, self.patience, self.backbone_lr_scale = max_epochs, patience, backbone_lr_scale

    def train_loader(self, subset: list[str]) -> DataLoader:
        """The labelled subset of the training split, shuffled and augmented, in batches no larger than it."""
        return self.data.loader("train", ids=subset, train=True, batch_size=min(self.batch_size, len(subset)))

    def fit_and_predict_best(
        self,
        ctx: EvalContext,
        model: L.LightningModule,
        train: DataLoader,
        val: DataLoader,
        test: DataLoader,
        *,
        monitor: str = "val/loss",
        mode: str = "min",
        save_weights_only: bool = False,
        **trainer_kw: Any,
    ) -> HeadFit:
        """Train ``model`` with early stopping on ``monitor`` (``patience`` validation checks, at most
        ``max_epochs``), keep the best checkpoint, and run ``predict_step`` over ``test`` with its weights.

        ``trainer_kw`` go to ``ctx.make_trainer`` (e.g. ``check_val_every_n_epoch``).
        """
        ckpt = ModelCheckpoint(
            dirpath=ctx.work_dir / f"{self.kind}-{uuid.uuid4().hex[:8]}",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_weights_only=save_weights_only,
        )
        stop = EarlyStopping(monitor=monitor, mode=mode, patience=self.patience)
        trainer = ctx.make_trainer(
            max_epochs=self.max_epochs, callbacks=[ckpt, stop], enable_checkpointing=True, **trainer_kw
        )
        trainer.fit(model, train, val)
        outputs = trainer.predict(model, test, ckpt_path=ckpt.best_model_path or None, weights_only=True)
        best = ckpt.best_model_score
        return HeadFit(outputs, trainer.current_epoch, float(best) if best is not None else float(np.nan))
