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

The "scored at" column is applied by :func:`cgmgm.metrics.score`, whose module describes the
geometry of BAM's ``ori_resize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cgmgm.data.episodes import Transform
from cgmgm.data.transforms import PadResize, SquashResize, bam_train_transform

__all__ = [
    "BAM_SEEDS",
    "PROTOCOLS",
    "Protocol",
    "bam_seeds",
    "get_protocol",
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
            against the resized label (HSNet default); see :func:`cgmgm.metrics.score`.
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
