"""BAM's stage-1 data: whole images labelled with a fold's base classes (the base learner).

Labels (BAM's base-learner data): base class ``c`` -> its position in the fold's sorted base
list + 1; background and every other class (the fold's novel classes included) -> 0; 255 stays
ignore. The training list is the unfiltered one: images holding novel classes are kept, their
novel pixels as background (BAM's stage 1 drops nothing).

:class:`BaseDataModule` takes its sources, fold, base classes, protocol and transforms from the
run's :class:`~cgmgm.data.datamodule.EpisodicDataModule` (the same ``dataset`` config as stage
2), so both stages see the same images and classes:

- training: the protocol's augmentation becomes BAM's stage-1 augmentation (crop 417, scale
  0.5-2.0, rotation, blur, flip, the crop drawn again up to 30 times until 85% of the labelled
  pixels survive); a dataset without augmentation (the embedded benchmark) or with
  ``train_transform: test`` keeps its own.
- validation: the evaluation split with the protocol's test resize at BAM's stage-1 size
  (longer side 417, padded), scored on the base classes.
  When the evaluation split holds the same images as the training split (an FSS-1000-layout
  folder, whose folds split classes, not images), every ``holdout``-th image is kept out of
  training for validation, and :meth:`BaseDataModule.split_record` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cgmgm.constants import IGNORE_INDEX
from cgmgm.data.datamodule import EpisodicDataModule, ShardedEvalSampler, pin_for, world_of
from cgmgm.data.episodes import SegmentationSource, Transform
from cgmgm.data.transforms import BAMTrainTransform, PadResize

__all__ = ["BaseDataModule", "BaseImages", "base_label_table"]


def base_label_table(base: Sequence[int]) -> np.ndarray:
    """Lookup table [256] uint8: class id -> base label (1 + position in ``base``; 0 for any
    other class; 255 -> 255)."""
    table = np.zeros(256, dtype=np.uint8)
    for j, c in enumerate(base):
        if not 1 <= int(c) < IGNORE_INDEX:
            raise ValueError(f"base class ids must be in 1..254, got {c}")
        table[int(c)] = j + 1
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


class BaseImages(Dataset):
    """Images ``indices`` of ``source`` with base labels: ``{"image": [3, H, W] float in [0, 1],
    "label": [H, W] long (0 bg, 1..N base, 255 ignore), "index": source index}``."""

    def __init__(
        self,
        source: SegmentationSource,
        base: Sequence[int],
        indices: Sequence[int],
        transform: Transform | None = None,
    ) -> None:
        self.source, self.base = source, [int(c) for c in base]
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.table = base_label_table(self.base)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        image, mask = self.source.load(i)  # [H, W, 3] uint8, [H, W] uint8 class ids
        label = self.table[mask]  # [H, W] base labels
        if self.transform is not None:
            image, label = self.transform(image, label)[:2]
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return {
            "image": img,  # [3, H, W]
            "label": torch.from_numpy(np.asarray(label).astype(np.int64)),  # [H, W]
            "index": i,
        }


def _same_images(a: Any, b: Any) -> bool:
    """Whether two sources hold the same images (the same object, or equal image keys)."""
    if a is b:
        return True
    if len(a) != len(b) or not (hasattr(a, "image_key") and hasattr(b, "image_key")):
        return False
    return all(a.image_key(i) == b.image_key(i) for i in range(len(a)))


class BaseDataModule(L.LightningDataModule):
    """Stage-1 loaders (see the module docstring) on the fold of ``episodic``.

    Args:
        episodic: the run's episodic data module (sources, fold, base classes, protocol).
        crop, scale: BAM's stage-1 crop size and rescale range (used where the dataset
            trains with the protocol's augmentation).
        crop_retries, crop_keep: BAM's crop retries (see :class:`BAMTrainTransform`).
        batch_size, eval_batch_size: images per batch (BAM: 12 in total, over 4 GPUs).
        holdout: every ``holdout``-th image is the validation set when the evaluation split
            holds the training images.
        val_size: validation images under the protocol's padded test resize get it at this
            size (BAM's stage-1 ``val_size``, 417); other datasets keep their own.
        seed: seed of the augmentation and of the training order.
    """

    def __init__(
        self,
        episodic: EpisodicDataModule,
        crop: int = 417,
        scale: Sequence[float] = (0.5, 2.0),
        crop_retries: int = 30,
        crop_keep: float = 0.85,
        batch_size: int = 12,
        eval_batch_size: int = 4,
        holdout: int = 5,
        val_size: int = 417,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(holdout) < 2:
            raise ValueError(
                f"base.holdout must be >= 2 (every k-th image validates), got {holdout}"
            )
        self.episodic = episodic
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.holdout, self.seed = int(holdout), int(seed)
        self.base_classes = list(episodic.train_class_ids)
        train_src = episodic.source(episodic.train_split)
        eval_src = episodic.source(episodic.eval_split)
        self.shared = _same_images(train_src, eval_src)
        n = len(train_src)
        if self.shared:
            held = [i for i in range(n) if i % self.holdout == self.holdout - 1]
            kept = [i for i in range(n) if i % self.holdout != self.holdout - 1]
        else:
            held, kept = list(range(len(eval_src))), list(range(n))
        augment = episodic.train_transform
        if isinstance(augment, BAMTrainTransform):  # the protocol's: BAM's stage-1 preset
            lo, hi = (float(s) for s in scale)
            augment = BAMTrainTransform(
                size=int(crop),
                scale=(lo, hi),
                seed=self.seed,
                crop_retries=int(crop_retries),
                crop_keep=float(crop_keep),
            )
        self.train_set = BaseImages(train_src, self.base_classes, kept, augment)
        val_resize = episodic.eval_transform
        if isinstance(val_resize, PadResize):  # the protocol's test resize at BAM's base size
            val_resize = PadResize(
                size=int(val_size), round_to=val_resize.round_to, image_fill=val_resize.image_fill
            )
        self.val_set = BaseImages(eval_src, self.base_classes, held, val_resize)

    @property
    def num_classes(self) -> int:
        """The base learner's classes: the fold's base classes + background."""
        return len(self.base_classes) + 1

    @property
    def class_names(self) -> list[str]:
        ep = self.episodic
        return ["background", *ep.class_names_for(ep.train_split, self.base_classes)]

    def split_record(self) -> dict[str, Any]:
        """What stage 1 trained and validated on, for metrics.json and the checkpoint."""
        ep = self.episodic
        return {
            "base_class_ids": self.base_classes,
            "base_class_names": self.class_names[1:],
            "train_images": len(self.train_set),
            "val_images": len(self.val_set),
            "val_split": (
                f"every {self.holdout}th image of {ep.train_split} (held out of training: the "
                "evaluation split holds the same images)"
                if self.shared
                else ep.eval_split
            ),
        }

    def _loader(
        self, ds: BaseImages, batch_size: int, sampler: Any = None, **kw: Any
    ) -> DataLoader:
        workers = self.episodic.num_workers
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_for(self.trainer, self.episodic.pin_memory),
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        # shuffled by a seeded generator (under DDP Lightning shards it with its sampler)
        gen = torch.Generator().manual_seed(self.seed)
        drop = len(self.train_set) >= self.batch_size
        return self._loader(
            self.train_set, self.batch_size, shuffle=True, generator=gen, drop_last=drop
        )

    def val_dataloader(self) -> DataLoader:
        # every validation image exactly once over the processes (no padding): the summed
        # confusion matrix equals one process's
        replicas, rank = world_of(self.trainer)
        sampler = ShardedEvalSampler(self.val_set, replicas, rank) if replicas > 1 else None
        return self._loader(self.val_set, self.eval_batch_size, sampler=sampler, shuffle=False)
