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
    cache_reason,
    source_novel_classes,
)
from cgmgm.data.protocols import Protocol, get_protocol
from cgmgm.data.synthetic import SyntheticScenes, SyntheticShapes

__all__ = [
    "SOURCES",
    "EpisodeSampler",
    "EpisodicDataModule",
    "ShardedEvalSampler",
    "build_source",
    "pin_for",
    "register_source",
    "world_of",
]

SOURCES: dict[str, Callable[..., SegmentationSource]] = {}


def register_source(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a source factory ``f(split=..., **kw)`` under ``name``."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        SOURCES[name] = factory
        return factory

    return deco


register_source("synthetic")(SyntheticScenes)
register_source("synthetic_shapes")(SyntheticShapes)


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


def world_of(trainer: Any) -> tuple[int, int]:
    """(num_replicas, rank) of the run of ``trainer`` (or of torch.distributed; else (1, 0))."""
    if trainer is not None and trainer.world_size > 1:
        return trainer.world_size, trainer.global_rank
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def pin_for(trainer: Any, pin_memory: bool | str) -> bool:
    """DataLoader ``pin_memory``: as given, or for "auto" whether ``trainer`` runs on CUDA."""
    if pin_memory != "auto":
        return bool(pin_memory)
    return trainer is not None and trainer.strategy.root_device.type == "cuda"


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
    """Episodic train/val/test loaders on one fold, under one evaluation protocol.

    Args:
        dataset: registered source name (see :func:`build_source`) or a callable
            ``split -> SegmentationSource``.
        dataset_kwargs: extra keyword arguments for the source.
        root: the source's dataset root (shorthand for ``dataset_kwargs["root"]``).
        protocol: "bam", "hsnet", "pfenet" or a :class:`~cgmgm.data.protocols.Protocol`
            (see :mod:`cgmgm.data.protocols`): it supplies every setting below left at None,
            and the transforms given as "protocol". None: no protocol (the plain defaults).
        fold, shot, num_folds: few-shot setting.
        seed: seed of train and val episodes (and of the train order).
        test_seed: seed of test episodes (None: the protocol's first seed, else ``seed``).
        batch_size, eval_batch_size: episodes per batch (eval defaults to batch_size).
        num_workers, pin_memory: DataLoader options; pin_memory "auto": pinned when the
            trainer runs on a CUDA device.
        cache: give episodes ``image_keys`` for the frozen-feature cache and keep their
            transformed images in memory, where exact (:class:`EpisodeDataset` ``cache``);
            :meth:`cache_record` says per split whether it is on and why not.
        image_cache_mb: memory for transformed images, per split and DataLoader worker.
        train_episodes: episodes per epoch (None: one per training image, BAM's epoch).
        val_episodes: episodes per validation.
        test_episodes: episodes per test run (None: the protocol's count for this dataset,
            else 1000).
        train_split, eval_split: image splits of the source for training and val/test.
        filter_novel: BAM's training-image filter (None: the protocol's, else True).
        sampling: "class", "image" or "pair", how episodes pick class and query (see
            :class:`EpisodeDataset`; None: the protocol's for this dataset, else "class").
        resample_train: new training episodes every epoch (see :class:`EpisodeSampler`).
        train_transform, eval_transform: per-image numpy transforms; "protocol" (default)
            for the protocol's (BAM augmentation / test-time resize; none without a
            protocol), None for none (images at their own size, as the embedded benchmark);
            train_transform "test": the protocol's test resize, no augmentation (exact to
            cache, so training runs on cached features).
        classes: val/test classes instead of the fold's novel classes: a list of class ids,
            "all" for every class of the evaluation source (e.g. FSS-1000, CamVid), or "auto":
            every class when ``training_free`` (a model that learned no class), else the
            fold's novel classes.
        train_classes: training classes instead of the fold's base classes (list or "all").
        training_free: the evaluated model learned no class (``model.training_free``).
        allow_seen_classes: let a training run test (and validate) on classes it trains on,
            or an evaluation on ``seen_classes``; otherwise that is refused (compared by
            class name, so class lists of different splits compare correctly).
        seen_classes: names of the classes a checkpoint was trained on (evaluation runs).
        original_size: val/test episodes also carry the query label at original size,
            255-padded to this square (``query_mask_orig``, ``query_orig_size``; see
            :class:`EpisodeDataset`), for scoring at original size; "auto": the longest
            image side of the evaluation source. Required by a protocol that scores at
            original size (BAM/PFENet) once test images are resized; dropped under one that
            does not (HSNet).

    Validation and test both sample the fold's novel classes from ``eval_split`` (BAM).
    """

    def __init__(
        self,
        dataset: str | Callable[[str], SegmentationSource] = "synthetic",
        dataset_kwargs: Mapping[str, Any] | None = None,
        root: str | None = None,
        protocol: str | Protocol | None = None,
        fold: int = 0,
        shot: int = 1,
        seed: int = 0,
        test_seed: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_episodes: int | None = 1000,
        val_episodes: int = 300,
        test_episodes: int | None = None,
        num_folds: int = 4,
        train_split: str = "train",
        eval_split: str = "val",
        filter_novel: bool | None = None,
        sampling: str | None = None,
        resample_train: bool = True,
        pin_memory: bool | str = "auto",
        cache: bool = True,
        image_cache_mb: int = 512,
        train_transform: Transform | str | None = "protocol",
        eval_transform: Transform | str | None = "protocol",
        classes: Sequence[int] | str | None = None,
        train_classes: Sequence[int] | str | None = None,
        original_size: int | str | None = None,
        training_free: bool = False,
        allow_seen_classes: bool = False,
        seen_classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.dataset_kwargs = dict(_plain(dataset_kwargs) or {})
        if root is not None:
            self.dataset_kwargs["root"] = root
        self.protocol = None if protocol is None else get_protocol(protocol)
        name = dataset if isinstance(dataset, str) else "default"
        p = self.protocol
        self.fold, self.shot, self.num_folds = int(fold), int(shot), int(num_folds)
        self.seed = int(seed)
        if test_seed is None:
            test_seed = p.seeds[0] if p is not None else self.seed
        self.test_seed = int(test_seed)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_episodes = None if train_episodes is None else int(train_episodes)
        self.val_episodes = int(val_episodes)
        if test_episodes is None:
            test_episodes = p.episodes(name) if p is not None else 1000
        self.test_episodes = int(test_episodes)
        self.train_split, self.eval_split = train_split, eval_split
        if filter_novel is None:
            filter_novel = p.filter_novel if p is not None else True
        self.filter_novel = bool(filter_novel)
        if sampling is None:
            sampling = p.sampling_for(name) if p is not None else "class"
        self.sampling = str(sampling)
        self.resample_train = bool(resample_train)
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise ValueError(f"pin_memory must be true, false or 'auto', got {pin_memory!r}")
        self.pin_memory = pin_memory
        self.cache, self.image_cache_mb = bool(cache), int(image_cache_mb)
        self.train_transform = self._transform(train_transform, "train", name)
        self.eval_transform = self._transform(eval_transform, "eval", name)
        self.eval_classes = _plain(classes)
        self.train_classes = _plain(train_classes)
        self.training_free = bool(training_free)
        self.allow_seen_classes = bool(allow_seen_classes)
        self.seen_classes = [str(c) for c in _plain(seen_classes) or ()]
        self.original_size: int | None = None
        self._original_spec = original_size
        if p is not None and (not p.score_at_original or self.eval_transform is None):
            # HSNet scores at test size; without a test resize query_mask is the original label
            self._original_spec = None
        elif p is not None and self.eval_transform is not None and original_size is None:
            raise ValueError(
                f"protocol {p.name!r} scores at original size and resizes the test images,"
                " so the data module needs original_size: the longest image side of the "
                "evaluation images (e.g. 500 for PASCAL), or 'auto' to read it from the "
                "images (dataset.original_size=auto)"
            )
        self._sources: dict[str, SegmentationSource] = {}
        self.train_set: EpisodeDataset | None = None
        self.val_set: EpisodeDataset | None = None
        self.test_set: EpisodeDataset | None = None

    def _transform(self, spec: Any, stage: str, name: str) -> Transform | None:
        """A transform argument: "protocol" -> the protocol's for this dataset (training: its
        augmentation); "test" -> the protocol's test resize (training without augmentation,
        as HSNet trains, on cached features); else as is."""
        if not isinstance(spec, str):
            return spec
        choices = ("protocol", "test") if stage == "train" else ("protocol",)
        if spec not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ValueError(
                f"{stage}_transform must be {options}, None or a callable, got {spec!r}"
            )
        if self.protocol is None:
            if spec == "test":
                raise ValueError(
                    "train_transform='test' means the protocol's test resize, and this data "
                    "module has no protocol: set protocol= (bam, hsnet, pfenet), or give "
                    "train_transform as None or a transform"
                )
            return None
        if stage == "train" and spec == "protocol":
            return self.protocol.train_transform(name, seed=self.seed)
        return self.protocol.eval_transform(name)

    def source(self, split: str) -> SegmentationSource:
        """The (cached) source for image split ``split``."""
        if split not in self._sources:
            if callable(self.dataset):
                self._sources[split] = self.dataset(split)
            else:
                self._sources[split] = build_source(self.dataset, split, **self.dataset_kwargs)
        return self._sources[split]

    def _resolve_classes(self, spec: Any, src: SegmentationSource) -> list[int] | None:
        """None -> None (the fold's classes); "all" -> 1..num_classes; "auto" -> "all" for a
        training-free model, else None; else the given ids."""
        if spec == "auto":
            spec = "all" if self.training_free else None
        if spec is None:
            return None
        if isinstance(spec, str):
            if spec != "all":
                raise ValueError(
                    f"classes must be None, 'all', 'auto' or a list of ids, got {spec!r}"
                )
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
            sampling=self.sampling,
            classes=self._resolve_classes(spec, src),
            original_size=None if split == "train" else self._resolve_original_size(),
            cache=self.cache,
            image_cache_bytes=self.image_cache_mb * 2**20,
        )

    def _resolve_original_size(self) -> int | None:
        """``original_size`` as an int ("auto": the longest side of the evaluation images)."""
        spec = self._original_spec
        if spec is None or self.original_size is not None:
            return self.original_size
        if spec == "auto":
            src = self.source(self.eval_split)
            if not hasattr(src, "image_sizes"):
                raise ValueError(
                    f"original_size='auto' reads image headers, which {type(src).__name__} "
                    "has no files for; give original_size as an integer"
                )
            self.original_size = max(max(hw) for hw in src.image_sizes())
        elif isinstance(spec, str):
            raise ValueError(f"original_size must be an integer or 'auto', got {spec!r}")
        else:
            self.original_size = int(spec)
        return self.original_size

    def setup(self, stage: str | None = None) -> None:
        self.check_class_split(training=stage in (None, "fit") or self.train_set is not None)
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

    def set_test_seed(self, seed: int) -> None:
        """Draw test episodes with episode seed ``seed`` from now on: the same images, classes
        and memories of transformed images, other episodes (one test run per protocol seed)."""
        self.test_seed = int(seed)
        if self.test_set is not None:
            self.test_set.seed = self.test_seed

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

    @property
    def train_class_ids(self) -> list[int]:
        """The training classes (ids of the train split's source): the fold's base classes,
        or ``train_classes`` when given."""
        if self.train_set is not None:
            return list(self.train_set.classes)
        src = self.source(self.train_split)
        spec = None if self.train_classes == "auto" else self.train_classes
        explicit = self._resolve_classes(spec, src)
        if explicit is not None:
            return sorted(set(explicit))
        novel = set(source_novel_classes(src, self.fold, self.num_folds))
        return [c for c in range(1, int(src.num_classes) + 1) if c not in novel]

    def class_names_for(self, split: str, ids: Sequence[int]) -> list[str]:
        """Names of class ``ids`` of image split ``split``'s source (the ids as text when the
        source has no ``class_names``)."""
        names = getattr(self.source(split), "class_names", None)
        return [str(names[c]) if names is not None and c < len(names) else str(c) for c in ids]

    def check_class_split(self, training: bool = True) -> list[str]:
        """Names of the test classes the model has seen: training classes (``training``) and
        ``seen_classes``. Raises ValueError when there are any, unless
        ``allow_seen_classes``; returns them (empty when disjoint)."""
        seen = set(self.seen_classes)
        if training:
            seen |= set(self.class_names_for(self.train_split, self.train_class_ids))
        if not seen:
            return []
        test = self.class_names_for(self.eval_split, self.classes)
        both = [n for n in test if n in seen]
        if both and not self.allow_seen_classes:
            what = "trains on" if training else "was trained on (seen_classes)"
            shown = ", ".join(repr(n) for n in both[:8]) + (" ..." if len(both) > 8 else "")
            novel = source_novel_classes(self.source(self.eval_split), self.fold, self.num_folds)
            raise ValueError(
                f"{len(both)} of the {len(test)} test classes are classes this run {what}: "
                f"{shown}. Scores on them measure memorised classes, not few-shot "
                f"segmentation. Fix: test on fold {self.fold}'s novel classes "
                f"{self.class_names_for(self.eval_split, novel)[:8]} and train on the others "
                "(dataset.classes=auto, dataset.train_classes=null), define the folds "
                "(dataset.dataset_kwargs.folds=4 or a list of class lists, then fold=k), or "
                "set dataset.allow_seen_classes=true to test on seen classes anyway"
            )
        return both

    def class_record(self, training: bool | None = None) -> dict[str, Any]:
        """Train and test classes (ids and names) for metrics.json. ``training`` None: True
        once the training set was built. Without training, ``train_class_names`` holds
        ``seen_classes`` (None when empty)."""
        training = self.train_set is not None if training is None else training
        test = self.classes
        if training:
            train_ids = self.train_class_ids
            train_names = self.class_names_for(self.train_split, train_ids)
        else:
            train_ids, train_names = None, list(self.seen_classes) or None
        test_names = self.class_names_for(self.eval_split, test)
        return {
            "train_class_ids": train_ids,
            "train_class_names": train_names,
            "test_class_ids": list(test),
            "test_class_names": test_names,
            "seen_test_classes": [n for n in test_names if n in set(train_names or ())],
            "allow_seen_classes": self.allow_seen_classes,
        }

    def _world(self) -> tuple[int, int]:
        """(num_replicas, rank) of the current run."""
        return world_of(self.trainer)

    def cache_record(self, training: bool = True) -> dict[str, str]:
        """For training (with ``training``) and evaluation episodes: "on", or "off: <why>"
        (the frozen-feature cache and the transformed-image memory, :class:`EpisodeDataset`
        ``cache``)."""
        out = {}
        stages = [("train", self.train_split, self.train_transform)] if training else []
        for name, split, transform in (*stages, ("eval", self.eval_split, self.eval_transform)):
            why = cache_reason(self.source(split), transform, self.cache)
            out[name] = "on" if why is None else f"off: {why}"
        return out

    def _pin(self) -> bool:
        return pin_for(self.trainer, self.pin_memory)

    def _loader(self, ds: EpisodeDataset, batch_size: int, **kw: Any) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self._pin(),
            persistent_workers=self.num_workers > 0,
            **kw,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        sampler = EpisodeSampler(len(self.train_set), self.seed, resample=self.resample_train)
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
