"""Evaluation protocols of the field (BAM, HSNet, PFENet): what differs, in one place.

Each fact below was read in the authors' code (file cited next to it):

========  ===========  ==============================  =======================  ===========
protocol  train filter test episodes x runs, seeds      test resize              scored at
========  ===========  ==============================  =======================  ===========
bam       drop images  1000 x 5 (PASCAL and COCO),     longer side 473 / 641,   original
          with novel   seeds = np.random.seed(123);    pad square (0 / 255)     label size
          pixels       randint(0, 1000, 5)
hsnet     none         1000 x 1, seed 0                squash to 400x400        400x400
pfenet    none         5000 PASCAL / 20000 COCO x 1,   longer side 473 / 641,   original
                       seed 321                        pad square (0 / 255)     label size
========  ===========  ==============================  =======================  ===========

- BAM test.py: ``val_manual_seed = 123; val_num = 5; setup_seed(123);
  seed_array = np.random.randint(0, 1000, val_num)`` -> (510, 365, 382, 322, 988);
  ``test_num = 1000`` for pascal and coco; configs ``resized_val: True``, ``ori_resize:
  True``, ``val_size`` 473 (config/pascal/...) / 641 (config/coco/...). util/dataset.py
  ``make_dataset(..., filter_intersection=True)`` for training drops every image whose label
  holds a class outside the base classes (any pixel count).
- PFENet test.py: ``test_num = 20000`` (use_coco) else ``5000``, seeded with
  ``args.manual_seed`` = 321 (config/pascal/pascal_split0_resnet50.yaml,
  config/coco/coco_split0_resnet101.yaml); same ``resized_val`` / ``ori_resize`` scoring;
  util/dataset.py keeps training images with novel classes (their pixels become background).
- HSNet test.py: ``utils.fix_randseed(0)``, ``FSSDataset.initialize(img_size=400, ...)``;
  data/dataset.py squashes with ``transforms.Resize(size=(img_size, img_size))``;
  data/pascal.py and data/coco.py: ``__len__`` = 1000 for testing, query labels resized to
  400x400 (nearest) unless ``--use_original_imgsize``; training images come from the other
  folds' lists, no novel-image filter.

Scoring at original size (BAM/PFENet ``ori_resize``): the label is pasted top-left into a
255-filled square of side max(H, W), the prediction logits are upsampled bilinearly
(align_corners=True) to that square and compared there; equivalently, upsample to the square,
crop the top-left H x W and compare with the label (:func:`restore_original`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cgmgm.data.episodes import IGNORE_INDEX, Transform
from cgmgm.data.transforms import PadResize, SquashResize, bam_train_transform

__all__ = [
    "BAM_SEEDS",
    "PROTOCOLS",
    "Protocol",
    "bam_seeds",
    "get_protocol",
    "original_size_prediction",
    "restore_original",
]


def bam_seeds(seed: int = 123, runs: int = 5) -> tuple[int, ...]:
    """BAM's test seeds: ``np.random.seed(seed); np.random.randint(0, 1000, runs)``, computed
    on a private legacy RandomState (the global RNG is untouched)."""
    return tuple(int(s) for s in np.random.RandomState(seed).randint(0, 1000, runs))


BAM_SEEDS: tuple[int, ...] = (510, 365, 382, 322, 988)  # == bam_seeds(), checked in tests


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol. Dataset-keyed fields fall back to their "default" entry.

    Attributes:
        name: recorded in metrics.json ("bam", "hsnet", "pfenet").
        filter_novel: drop training images holding any novel-class pixel (BAM).
        seeds: episode seed of each test run (mean over runs is reported).
        test_episodes: episodes per run, by dataset.
        resize: test-time resize, "pad" (longer side to ``test_size``, 255-padded square) or
            "squash" (both sides to ``test_size``).
        test_size: test (and training crop) size, by dataset.
        score_at_original: score the prediction against the original-size label (True) or
            against the resized label (HSNet default).
        train_augment: BAM/PFENet augmentation for training (False: HSNet's plain squash).
        sampling: how test episodes pick class and query, by dataset (see
            :class:`~cgmgm.data.episodes.EpisodeDataset`): "image" (BAM/PFENet walk their
            image list and pick one of the image's classes), "pair" (HSNet PASCAL: one
            entry per (image, class)), "class" (HSNet COCO: class first).
        references: the files the facts come from.
    """

    name: str
    filter_novel: bool
    seeds: tuple[int, ...]
    test_episodes: Mapping[str, int]
    resize: str
    test_size: Mapping[str, int]
    score_at_original: bool
    train_augment: bool
    sampling: Mapping[str, str] = field(default_factory=lambda: {"default": "image"})
    references: tuple[str, ...] = ()

    def _pick(self, table: Mapping[str, Any], dataset: str) -> Any:
        return table[dataset] if dataset in table else table["default"]

    def episodes(self, dataset: str) -> int:
        """Test episodes per run for ``dataset``."""
        return int(self._pick(self.test_episodes, dataset))

    def size(self, dataset: str) -> int:
        """Test size (and training crop) for ``dataset``."""
        return int(self._pick(self.test_size, dataset))

    def sampling_for(self, dataset: str) -> str:
        """How episodes pick class and query on ``dataset``."""
        return str(self._pick(self.sampling, dataset))

    def eval_transform(self, dataset: str) -> Transform:
        """The test-time resize for ``dataset`` (applied to query and supports alike)."""
        size = self.size(dataset)
        return PadResize(size) if self.resize == "pad" else SquashResize(size)

    def train_transform(self, dataset: str, seed: int = 0) -> Transform:
        """BAM/PFENet augmentation (crop to the test size) or HSNet's squash."""
        if self.train_augment:
            return bam_train_transform(dataset, seed=seed, size=self.size(dataset))
        return SquashResize(self.size(dataset))

    def as_dict(self) -> dict[str, Any]:
        """Plain description for metrics.json."""
        return {
            "name": self.name,
            "filter_novel": self.filter_novel,
            "seeds": list(self.seeds),
            "test_episodes": dict(self.test_episodes),
            "sampling": dict(self.sampling),
            "resize": self.resize,
            "test_size": dict(self.test_size),
            "score_at_original": self.score_at_original,
        }

    def score(self, metric: Any, output: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Update ``metric`` (a :class:`~cgmgm.metrics.FSSIoU`) with one batch.

        ``output``: 2-class logits [B, 2, h, w] or a foreground probability [B, (1,) h, w].
        With ``score_at_original`` and a batch carrying ``query_mask_orig`` /
        ``query_orig_size`` (EpisodeDataset ``original_size``), the prediction is scored
        against the original-size label; otherwise the output is upsampled (bilinear,
        align_corners=True) to ``query_mask`` and scored there (HSNet, or images that were
        not resized, where ``query_mask`` is the original label).
        """
        if self.score_at_original and "query_mask_orig" in batch:
            pred, target = original_size_prediction(output, batch, self.resize)
        else:
            target = batch["query_mask"]
            pred = _decide(_upsample(_as_maps(output), tuple(target.shape[-2:])))
        metric.update(pred, target, batch["class_idx"])


_BAM_REFS = (
    "chunbolang/BAM test.py",
    "chunbolang/BAM util/dataset.py",
    "chunbolang/BAM util/transform.py",
    "chunbolang/BAM config/pascal/pascal_split0_resnet50.yaml",
    "chunbolang/BAM config/coco/coco_split0_resnet50.yaml",
)

PROTOCOLS: dict[str, Protocol] = {
    "bam": Protocol(
        name="bam",
        filter_novel=True,
        seeds=BAM_SEEDS,
        test_episodes={"default": 1000},
        resize="pad",
        test_size={"pascal": 473, "coco": 641, "default": 473},
        score_at_original=True,
        train_augment=True,
        references=_BAM_REFS,
    ),
    "hsnet": Protocol(
        name="hsnet",
        filter_novel=False,
        seeds=(0,),
        test_episodes={"default": 1000},
        resize="squash",
        test_size={"default": 400},
        score_at_original=False,
        train_augment=False,
        sampling={"coco": "class", "default": "pair"},
        references=(
            "juhongm999/hsnet test.py",
            "juhongm999/hsnet data/dataset.py",
            "juhongm999/hsnet data/pascal.py",
            "juhongm999/hsnet data/coco.py",
            "juhongm999/hsnet model/hsnet.py",
        ),
    ),
    "pfenet": Protocol(
        name="pfenet",
        filter_novel=False,
        seeds=(321,),
        test_episodes={"pascal": 5000, "coco": 20000, "default": 5000},
        resize="pad",
        test_size={"pascal": 473, "coco": 641, "default": 473},
        score_at_original=True,
        train_augment=True,
        references=(
            "dvlab-research/PFENet test.py",
            "dvlab-research/PFENet util/dataset.py",
            "dvlab-research/PFENet util/transform.py",
            "dvlab-research/PFENet config/pascal/pascal_split0_resnet50.yaml",
            "dvlab-research/PFENet config/coco/coco_split0_resnet101.yaml",
        ),
    ),
}


def get_protocol(name: str | Protocol) -> Protocol:
    """``PROTOCOLS[name]`` with an error listing the choices."""
    if isinstance(name, Protocol):
        return name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


# ---------------------------------------------------------------------- scoring helpers


def _as_maps(output: Tensor) -> Tensor:
    """Logits [B, C, h, w] or probability [B, h, w] / [B, 1, h, w] -> float [B, C', h, w]."""
    if output.dim() == 3:
        output = output[:, None]
    if output.dim() != 4:
        raise ValueError(f"expected [B, C, h, w] logits or a [B, h, w] map, got {output.shape}")
    return output.float()


def _decide(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """[B, C, H, W] -> long [B, H, W]: argmax of logits (C >= 2) or probability > threshold."""
    if maps.shape[1] == 1:
        return (maps[:, 0] > threshold).long()
    return maps.argmax(1)


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def restore_original(
    maps: Tensor, orig_size: Tensor, canvas: int | tuple[int, int], resize: str = "pad"
) -> Tensor:
    """Bring test-size maps back to each query's original label geometry.

    maps [B, C, h, w] (float); orig_size [B, 2] = (H, W) per item; returns [B, C, S, S']
    (``canvas`` = S or (S, S')) with item i's [C, H, W] map in the top-left corner, 0 elsewhere.
    ``resize="pad"`` (BAM/PFENet): upsample to max(H, W) squared (bilinear,
    align_corners=True) and crop the top-left H x W; "squash": upsample to H x W directly.
    """
    sh, sw = (canvas, canvas) if isinstance(canvas, int) else canvas
    b, c = maps.shape[:2]
    out = maps.new_zeros((b, c, sh, sw), dtype=torch.float32)
    for i, (h, w) in enumerate(orig_size.tolist()):
        if h > sh or w > sw:
            raise ValueError(f"original size {h}x{w} exceeds the canvas {sh}x{sw}")
        item = maps[i : i + 1].float()
        if resize == "pad":
            side = max(h, w)
            up = F.interpolate(item, size=(side, side), mode="bilinear", align_corners=True)
            out[i, :, :h, :w] = up[0, :, :h, :w]
        elif resize == "squash":
            up = F.interpolate(item, size=(h, w), mode="bilinear", align_corners=True)
            out[i, :, :h, :w] = up[0]
        else:
            raise ValueError(f"resize must be 'pad' or 'squash', got {resize!r}")
    return out


def original_size_prediction(
    output: Tensor, batch: Mapping[str, Tensor], resize: str = "pad", threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(prediction, target), both long [B, S, S], scored at original label size.

    ``output``: logits [B, C, h, w] (argmax) or foreground probability [B, (1,) h, w]
    (> threshold) at test size; ``batch`` holds ``query_mask_orig`` [B, S, S] (255 outside
    each label) and ``query_orig_size`` [B, 2]. Pixels outside each H x W are 255 in the
    target, so they count nowhere.
    """
    if "query_mask_orig" not in batch:
        raise KeyError(
            "scoring at original size needs query_mask_orig / query_orig_size in the batch: "
            "build the episodes with original_size=S (EpisodeDataset / EpisodicDataModule)"
        )
    target = batch["query_mask_orig"]
    maps = restore_original(
        _as_maps(output), batch["query_orig_size"], tuple(target.shape[-2:]), resize
    )
    pred = _decide(maps, threshold)
    pred = torch.where(target == IGNORE_INDEX, torch.zeros_like(pred), pred)
    return pred.to(target.device), target
