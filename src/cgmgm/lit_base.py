"""LightningModule of BAM's stage 1: the base learner, with the backbone fine-tuned.

- Model: :class:`~cgmgm.models.pspnet.PSPNet` (the backbone's body with gradients and
  BatchNorm in training mode, then :class:`~cgmgm.models.base_learner.BaseLearner`) over the
  fold's base classes + background.
- Loss: cross-entropy on the logits upsampled to the label (the one resize), 255 ignored.
- Optimiser (BAM train_base.py): SGD, momentum 0.9, weight decay 1e-4, poly 0.9 per iteration,
  base lr 2.5e-4; the base learner at ``new_layer_lr_mult`` (10x) and the backbone at
  ``backbone_lr_mult`` (PASCAL 1x; COCO 10x: every group).
- Validation: a confusion matrix over every validation pixel (torchmetrics, summed over
  processes), scored by :func:`cgmgm.metrics.semantic_results`: per-class IoU and the mIoU of
  the base classes without background, ``val/mIoU`` (the best checkpoint's monitor). Each
  checkpoint also holds the scores of the validation it was saved after (``val_results``).

The checkpoint holds the weights (``net.body.*``, ``net.head.*``) and, in its hyper-parameters,
what stage 2 checks before taking them (:func:`cgmgm.base_ckpt.load_base_checkpoint`): the
backbone, the base classes and the run's dataset and fold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from cgmgm.constants import IGNORE_INDEX
from cgmgm.lit import _check_plain, _require, sgd_with_decay
from cgmgm.metrics import semantic_results
from cgmgm.models.backbone import build_backbone
from cgmgm.models.pspnet import PSPNet

# The keys of the stage-1 ``optim`` config (conf/train_base.yaml, the one home of values).
BASE_OPTIM_KEYS = (
    "lr",
    "new_layer_lr_mult",
    "backbone_lr_mult",
    "momentum",
    "weight_decay",
    "schedule",
    "poly_power",
)


class LitBase(L.LightningModule):
    """Train and validate the base learner.

    Args:
        backbone: the ``backbone`` config ({name, weights}): the initial weights.
        base_classes: the fold's base class ids (label j = ``base_classes[j - 1]``).
        optim: the stage-1 ``optim`` config (every key of :data:`BASE_OPTIM_KEYS`).
        class_names: names of the labels (index 0 = background).
        seed: seed of the training randomness (dropout).
        meta: plain-typed run information stored in the checkpoint (dataset, fold, ...).
    """

    def __init__(
        self,
        backbone: dict,
        base_classes: list[int],
        optim: dict,
        class_names: list[str] | None = None,
        seed: int = 0,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("backbone", backbone), ("optim", optim), ("meta", meta)):
            _check_plain(value, name)
        _check_plain(list(base_classes), "base_classes")
        _check_plain(class_names, "class_names")
        self.save_hyperparameters()
        bb = _require(backbone, ("name", "weights"), "backbone", "conf/backbone/<name>.yaml")
        self.base_classes = [int(c) for c in base_classes]
        self.class_names = class_names
        n = len(self.base_classes) + 1
        self.net = PSPNet(build_backbone(bb["name"], bb["weights"]), n)
        self.val_cm = MulticlassConfusionMatrix(n, ignore_index=IGNORE_INDEX)
        # the last validation's scores, saved with every checkpoint (``val_results``): the
        # best checkpoint carries its own scores, so nothing is validated twice
        self.last_results: dict[str, float] | None = None

    @property
    def class_ids(self) -> list[int]:
        """The scored classes (the base classes), for :func:`cgmgm.config.report`'s table."""
        return self.base_classes

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> logits [B, N + 1, H, W]."""
        return self.net(images)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws depend on (seed, epoch, batch, rank) only, as in stage 2.
        seq = np.random.SeedSequence(
            [int(self.hparams.seed), self.current_epoch, batch_idx, self.global_rank]
        )
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])  # [B, N + 1, H, W]
        loss = F.cross_entropy(logits, batch["label"], ignore_index=IGNORE_INDEX)
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        o = _require(self.hparams.optim, BASE_OPTIM_KEYS, "optim", "conf/train_base.yaml")
        groups = [
            {"params": list(self.net.body.parameters()), "lr": o["lr"] * o["backbone_lr_mult"]},
            {"params": list(self.net.head.parameters()), "lr": o["lr"] * o["new_layer_lr_mult"]},
        ]
        return sgd_with_decay(self.trainer, groups, o)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])  # [B, N + 1, H, W]
        self.val_cm.update(logits.argmax(1), batch["label"])

    def on_validation_epoch_end(self) -> None:
        results = semantic_results(self.val_cm.compute(), self.base_classes, "val/")
        self.val_cm.reset()
        if results["val/classes_present"] == 0:
            raise ValueError(
                "the stage-1 validation images hold no pixel of a base class, so there is no "
                "base mIoU to monitor: check the dataset's evaluation split and fold"
            )
        self.log_dict(results)
        self.last_results = {**results, "epoch": float(self.current_epoch)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.last_results is not None:
            checkpoint["val_results"] = dict(self.last_results)
