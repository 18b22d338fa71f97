"""Lightning data module for episodic few-shot segmentation, and the source registry.

Episodes are pure functions of their index (see :class:`EpisodeDataset`), so the set
of evaluated episodes is independent of ``num_workers`` and of DDP sharding. Under DDP
the val/test loaders use :class:`ShardedEvalSampler`, which splits indices without
padding duplicates, so summed metric states are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from cgmgm.data.episodes import (
    EpisodeDataset,
    SegmentationSource,
    Transform,
    source_novel_classes,
)
from cgmgm.data.synthetic import SyntheticShapes

__all__ = [
    "SOURCES",
    "EpisodeSampler",
    "EpisodicDataModule",
    "ShardedEvalSampler",
    "build_source",
    "register_source",
]

SOURCES: dict[str, Callable[..., SegmentationSource]] = {}


def register_source(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a source factory ``f(split=..., **kw)`` under ``name``."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        SOURCES[name] = factory
        return factory

    return deco


register_source("synthetic")(SyntheticShapes)


def build_source(name: str, split: str = "train", **kwargs: Any) -> SegmentationSource:
    """Build the registered source ``name`` for image split ``split`` ("train" / "val")."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(SOURCES)}")
    return SOURCES[name](split=split, **kwargs)


class EpisodeSampler(Sampler[int]):
    """Training sampler: a permutation of ``num_episodes`` indices per epoch.

    The order comes from ``SeedSequence([seed, epoch])``, not the global RNG. With
    ``resample``, epoch e yields indices in ``[e*n, (e+1)*n)`` so every epoch sees new
    episodes (each index still maps to one fixed episode); otherwise ``[0, n)``.
    Lightning calls :meth:`set_epoch` (also through its DDP wrapper).
    """

    def __init__(
        self, num_episodes: int, seed: int = 0, shuffle: bool = True, resample: bool = True
    ) -> None:
        self.num_episodes, self.seed = int(num_episodes), int(seed)
        self.shuffle, self.resample = bool(shuffle), bool(resample)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[int]:
        n = self.num_episodes
        order = np.arange(n)
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            order = rng.permutation(n)
        offset = self.epoch * n if self.resample else 0
        return iter((order + offset).tolist())


class ShardedEvalSampler(DistributedSampler):
    """In-order shard ``rank::num_replicas`` of ``range(len(dataset))`` with no padding.

    Shards may differ in length by one; their union is exactly the dataset. Subclassing
    ``DistributedSampler`` stops Lightning from replacing it.
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain Python (no-op otherwise)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return x
    if isinstance(x, DictConfig | ListConfig):
        return OmegaConf.to_container(x, resolve=True)
    return x


class EpisodicDataModule(L.LightningDataModule):
    """Episodic train/val/test loaders on one fold.

    Args:
        dataset: registered source name (see :func:`build_source`) or a callable
            ``split -> SegmentationSource``.
        dataset_kwargs: extra keyword arguments for the source.
        fold, shot, num_folds: few-shot setting.
        seed: seed of train and val episodes (and of the train order).
        test_seed: seed of test episodes (default: ``seed``).
        batch_size, eval_batch_size: episodes per batch (eval defaults to batch_size).
        num_workers, pin_memory: DataLoader options.
        train_episodes, val_episodes, test_episodes: episodes per epoch / evaluation.
        train_split, eval_split: image splits of the source for training and val/test.
        filter_novel, class_balanced: see :class:`EpisodeDataset`.
        resample_train: new training episodes every epoch (see :class:`EpisodeSampler`).
        train_transform, eval_transform: per-image numpy transforms.
        classes: val/test classes instead of the fold's novel classes: a list of class ids,
            or "all" for every class of the evaluation source (e.g. FSS-1000, CamVid).
        train_classes: training classes instead of the fold's base classes (list or "all").
        original_size: val/test episodes also carry the query label at original size,
            255-padded to this square (``query_mask_orig``, ``query_orig_size``; see
            :class:`EpisodeDataset`), for scoring at original size (BAM/PFENet protocols).

    Validation and test both sample the fold's novel classes from ``eval_split`` (BAM).
    """

    def __init__(
        self,
        dataset: str | Callable[[str], SegmentationSource] = "synthetic",
        dataset_kwargs: Mapping[str, Any] | None = None,
        fold: int = 0,
        shot: int = 1,
        seed: int = 0,
        test_seed: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_episodes: int = 1000,
        val_episodes: int = 300,
        test_episodes: int = 1000,
        num_folds: int = 4,
        train_split: str = "train",
        eval_split: str = "val",
        filter_novel: bool = True,
        class_balanced: bool = True,
        resample_train: bool = True,
        pin_memory: bool = False,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
        classes: Sequence[int] | str | None = None,
        train_classes: Sequence[int] | str | None = None,
        original_size: int | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.dataset_kwargs = dict(_plain(dataset_kwargs) or {})
        self.fold, self.shot, self.num_folds = int(fold), int(shot), int(num_folds)
        self.seed = int(seed)
        self.test_seed = self.seed if test_seed is None else int(test_seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_episodes = int(train_episodes)
        self.val_episodes = int(val_episodes)
        self.test_episodes = int(test_episodes)
        self.train_split, self.eval_split = train_split, eval_split
        self.filter_novel, self.class_balanced = bool(filter_novel), bool(class_balanced)
        self.resample_train = bool(resample_train)
        self.pin_memory = bool(pin_memory)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.eval_classes = _plain(classes)
        self.train_classes = _plain(train_classes)
        self.original_size = None if original_size is None else int(original_size)
        self._sources: dict[str, SegmentationSource] = {}
        self.train_set: EpisodeDataset | None = None
        self.val_set: EpisodeDataset | None = None
        self.test_set: EpisodeDataset | None = None

    def source(self, split: str) -> SegmentationSource:
        """The (cached) source for image split ``split``."""
        if split not in self._sources:
            if callable(self.dataset):
                self._sources[split] = self.dataset(split)
            else:
                self._sources[split] = build_source(self.dataset, split, **self.dataset_kwargs)
        return self._sources[split]

    def _resolve_classes(self, spec: Any, src: SegmentationSource) -> list[int] | None:
        """None -> None (the fold's classes); "all" -> 1..num_classes; else the given ids."""
        if spec is None:
            return None
        if isinstance(spec, str):
            if spec != "all":
                raise ValueError(f"classes must be None, 'all' or a list of ids, got {spec!r}")
            return list(range(1, int(src.num_classes) + 1))
        return [int(c) for c in spec]

    def _episodes(self, split: str, n: int, seed: int, transform: Any) -> EpisodeDataset:
        image_split = self.train_split if split == "train" else self.eval_split
        src = self.source(image_split)
        spec = self.train_classes if split == "train" else self.eval_classes
        return EpisodeDataset(
            src,
            self.fold,
            self.shot,
            split=split,
            num_episodes=n,
            seed=seed,
            num_folds=self.num_folds,
            transform=transform,
            filter_novel=self.filter_novel,
            class_balanced=self.class_balanced,
            classes=self._resolve_classes(spec, src),
            original_size=None if split == "train" else self.original_size,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._episodes(
                "train", self.train_episodes, self.seed, self.train_transform
            )
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._episodes("test", self.val_episodes, self.seed, self.eval_transform)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._episodes(
                "test", self.test_episodes, self.test_seed, self.eval_transform
            )

    @property
    def classes(self) -> list[int]:
        """The evaluated classes (the order of ``class_idx`` in val/test batches): the fold's
        novel classes, or ``classes`` when given."""
        ds = self.test_set or self.val_set
        if ds is not None:
            return list(ds.classes)
        src = self.source(self.eval_split)
        explicit = self._resolve_classes(self.eval_classes, src)
        if explicit is not None:
            return sorted(set(explicit))
        return source_novel_classes(src, self.fold, self.num_folds)

    def _world(self) -> tuple[int, int]:
        """(num_replicas, rank) of the current run."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _loader(self, ds: EpisodeDataset, batch_size: int, **kw: Any) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        sampler = EpisodeSampler(self.train_episodes, self.seed, resample=self.resample_train)
        return self._loader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def eval_dataloader(self, ds: EpisodeDataset) -> DataLoader:
        """In-order loader over all of ``ds``; sharded without padding under DDP."""
        replicas, rank = self._world()
        sampler = ShardedEvalSampler(ds, replicas, rank) if replicas > 1 else None
        return self._loader(ds, self.eval_batch_size, sampler=sampler, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self.eval_dataloader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        return self.eval_dataloader(self.test_set)
