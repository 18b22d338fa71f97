"""Class-index segmentation sources and episodic few-shot sampling.

A *source* is any indexable set of (image, class-index mask) pairs
(:class:`SegmentationSource`). :class:`EpisodeDataset` turns a source into
few-shot episodes; episode ``index`` is a pure function of
``(seed, fold, shot, index)`` so worker counts, DDP sharding and iteration
order never change which episodes are evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from cgmgm.constants import IGNORE_INDEX, MIN_PIXELS, PASCAL_AREA
from cgmgm.features import ByteLRU

__all__ = [
    "IGNORE_INDEX",
    "ClassIndexSource",
    "EpisodeDataset",
    "SegmentationSource",
    "Transform",
    "base_classes",
    "cache_reason",
    "novel_classes",
    "scaled_min_pixels",
    "source_novel_classes",
]

SAMPLING = ("class", "image", "pair")  # episode sampling modes, see EpisodeDataset

# (image [H, W, 3], mask [H, W]) -> (image, mask), or (image, mask, valid) where valid [H, W]
# is nonzero on the pixels that come from the image (0 on padding the transform added).
Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]


@runtime_checkable
class SegmentationSource(Protocol):
    """Indexable class-index segmentation data (synthetic, PASCAL, COCO, FSS-1000...).

    ``load(i)`` returns image uint8 [H, W, 3] and mask uint8 [H, W] with 0 = background,
    1..num_classes = classes, 255 = ignore. ``classes_in(i)``: classes with at least the
    source's minimum pixel count in image i. ``labels_in(i)``: classes with any pixel.
    """

    num_classes: int

    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...

    def classes_in(self, i: int) -> set[int]: ...

    def labels_in(self, i: int) -> set[int]: ...


def scaled_min_pixels(height: int, width: int) -> int:
    """PASCAL's 2*32*32-pixel rule scaled from a 500x375 image to an HxW image (>= 1)."""
    return max(1, round(MIN_PIXELS * height * width / PASCAL_AREA))


class ClassIndexSource:
    """Base for sources: subclasses implement ``__len__`` and ``load``; class sets are
    derived from the masks (pixel counts cached per image).

    ``min_pixels`` is the per-class pixel threshold of :meth:`classes_in`; ``None`` means
    :func:`scaled_min_pixels` of ``image_size`` (or of each mask when ``image_size`` is None).
    """

    num_classes: int = 0
    fold_scheme: str = "block"

    def __init__(
        self, min_pixels: int | None = None, image_size: tuple[int, int] | None = None
    ) -> None:
        self._min_pixels = min_pixels
        self._image_size = image_size
        self._counts: dict[int, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:
        """Class-index mask uint8 [H, W] of image i (the pixel statistics read only this).

        Default: ``load(i)[1]``; file-backed sources override it to skip decoding the image.
        """
        return self.load(i)[1]

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(
                f"image index {i} out of range for {type(self).__name__} of {len(self)}"
            )
        return i

    def min_pixels_for(self, mask_shape: tuple[int, ...]) -> int:
        if self._min_pixels is not None:
            return int(self._min_pixels)
        h, w = self._image_size if self._image_size is not None else mask_shape[:2]
        return scaled_min_pixels(h, w)

    def _stats(self, i: int) -> tuple[np.ndarray, int]:
        """(pixel count per class 0..num_classes [C+1], min_pixels) of image i, cached."""
        i = self._check_index(i)
        stats = self._counts.get(i)
        if stats is None:
            mask = self.load_mask(i)
            counts = np.bincount(np.asarray(mask).ravel(), minlength=256)[: self.num_classes + 1]
            stats = self._counts[i] = (counts, self.min_pixels_for(mask.shape))
        return stats

    def class_pixel_counts(self, i: int) -> np.ndarray:
        """Pixel count per class index 0..num_classes of image i (ignore excluded). -> [C+1]."""
        return self._stats(i)[0]

    def classes_in(self, i: int) -> set[int]:
        counts, thr = self._stats(i)
        return {int(c) for c in np.flatnonzero(counts[1:] >= thr) + 1}

    def labels_in(self, i: int) -> set[int]:
        counts, _ = self._stats(i)
        return {int(c) for c in np.flatnonzero(counts[1:] > 0) + 1}


def novel_classes(
    num_classes: int, fold: int, num_folds: int = 4, scheme: str = "block"
) -> list[int]:
    """Novel (test) classes of ``fold``, 1-based.

    ``block`` (PASCAL-5i): fold i -> i*n+1 .. i*n+n with n = num_classes // num_folds.
    ``interleaved`` (COCO-20i): fold i -> {num_folds*k + i + 1}.
    """
    if num_classes % num_folds:
        raise ValueError(f"num_classes={num_classes} is not divisible by num_folds={num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
    n = num_classes // num_folds
    if scheme == "block":
        return list(range(fold * n + 1, fold * n + n + 1))
    if scheme == "interleaved":
        return [num_folds * k + fold + 1 for k in range(n)]
    raise ValueError(f"fold scheme must be 'block' or 'interleaved', got {scheme!r}")


def source_novel_classes(
    source: Any, fold: int, num_folds: int = 4, scheme: str | None = None
) -> list[int]:
    """Novel classes of ``fold`` for ``source``.

    A source with a ``folds`` attribute (list of class-id lists; e.g. user folds, or one fold
    holding every class) defines its folds itself, unless ``scheme`` is given explicitly;
    otherwise :func:`novel_classes` with ``scheme`` (default: the source's ``fold_scheme``).
    """
    folds = getattr(source, "folds", None)
    if scheme is None and folds is not None:
        if not 0 <= int(fold) < len(folds):
            raise ValueError(
                f"fold must be in 0..{len(folds) - 1} for {type(source).__name__} "
                f"({len(folds)} fold(s) defined by the source), got {fold}"
            )
        return sorted(int(c) for c in folds[int(fold)])
    scheme = scheme or getattr(source, "fold_scheme", "block")
    return novel_classes(int(source.num_classes), int(fold), num_folds, scheme)


def base_classes(
    num_classes: int, fold: int, num_folds: int = 4, scheme: str = "block"
) -> list[int]:
    """All classes 1..num_classes that are not novel in ``fold``."""
    novel = set(novel_classes(num_classes, fold, num_folds, scheme))
    return [c for c in range(1, num_classes + 1) if c not in novel]


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, W, 3] image (uint8, or float in [0, 1]) + [H, W] mask -> [3, H, W] float, [H, W]."""
    image = np.asarray(image)
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    # a copy either way: the array may be held in the transformed-image memory
    img = img.float().div_(255.0) if image.dtype == np.uint8 else img.to(torch.float32, copy=True)
    return img, torch.from_numpy(np.asarray(mask).astype(np.int64))


class EpisodeDataset(Dataset):
    """Few-shot episodes drawn from a :class:`SegmentationSource`.

    Args:
        source: class-index source.
        fold, shot: fold index and number of support images K.
        split: "train" samples the fold's base classes (and, with ``filter_novel``, drops
            images with any novel-class pixel: BAM setting); "test" samples novel classes.
        num_episodes: dataset length; None for one episode per query image (the number of
            images holding a sampled class, as BAM/PFENet epochs walk their image list).
            ``__getitem__`` also accepts any index >= 0 (used by
            :class:`~cgmgm.data.datamodule.EpisodeSampler` to draw fresh episodes per epoch).
        seed: episode ``index`` uses ``np.random.SeedSequence([seed, fold, shot, index])``.
        num_folds, fold_scheme: fold layout (``fold_scheme`` defaults to the source's
            ``fold_scheme`` attribute, else "block"; a source with a ``folds`` attribute
            defines its folds itself, see :func:`source_novel_classes`).
        classes: explicit class list, overriding the fold's base/novel classes (e.g. every
            class of a dataset, ``range(1, source.num_classes + 1)``). With split="train"
            and ``filter_novel``, images holding a fold-novel class that is not in
            ``classes`` are still dropped.
        transform: callable (image [H, W, 3], mask [H, W]) -> (image, mask) or (image, mask,
            valid), numpy, applied to each image before binarisation; ``valid`` marks the
            pixels that come from the image (not padding). It must return equal sizes across
            an episode's images for batching; if random, it draws from its own RNG.
        filter_novel: BAM's training-image filter (ignored for split="test").
        sampling: how an episode picks its class and query (test protocols differ here):
            "class" draws the class uniformly, then the query among its images (HSNet COCO);
            "image" draws the query uniformly among the images holding a sampled class (with
            the source's minimum pixel count), then the class uniformly among the sampled
            classes present in that image with any pixel count (BAM, PFENet: they walk their
            image list and pick one of the image's labels; only the supports need the
            minimum count); "pair" draws an (image, class) pair
            uniformly (HSNet PASCAL, whose test list holds one entry per pair).
        cache: give episodes ``image_keys`` for the frozen-feature cache
            (:mod:`cgmgm.features`) and keep transformed images in memory
            (``image_cache_bytes``), both only where that is exact: a deterministic
            ``transform`` (None, or one naming itself with a ``cache_key``; the BAM augmentation
            has none) and a source naming its images (``image_key(i)``). ``cache_reason``
            says why not otherwise (None when on).
        image_cache_bytes: memory budget of the transformed images kept (least recently used
            out first; per DataLoader worker).
        original_size: if set to S, episodes also hold the query's binarised label *before*
            ``transform`` (for scoring at original size, BAM/PFENet ``ori_resize``):
            ``query_mask_orig`` [S, S] long, the [H, W] label in the top-left corner and 255
            elsewhere, and ``query_orig_size`` long [2] = (H, W). H or W > S is an error.

    Episode dict: ``query_img`` [3, H, W] float in [0, 1]; ``query_mask`` [H, W] long in
    {0, 1, 255}; ``query_valid`` [H, W] float, 1 on the query's own pixels and 0 on padding
    added by the transform (padding enters no fit); ``support_imgs`` [K, 3, H, W];
    ``support_masks`` [K, H, W] long;
    ``class_id`` int (original 1-based class); ``class_idx`` int (position in
    ``self.classes``); ``index`` int; ``query_source_idx`` int; ``support_source_idx``
    long [K]; with ``original_size``, ``query_mask_orig`` [S, S] and ``query_orig_size`` [2];
    with the cache on, ``image_keys``: [query key, support keys...] (:meth:`image_key`; a
    DataLoader batch holds them as K + 1 tuples of B keys).
    """

    def __init__(
        self,
        source: SegmentationSource,
        fold: int,
        shot: int,
        split: str = "train",
        num_episodes: int | None = 1000,
        seed: int = 0,
        *,
        num_folds: int = 4,
        fold_scheme: str | None = None,
        classes: Sequence[int] | None = None,
        transform: Transform | None = None,
        filter_novel: bool = True,
        sampling: str = "class",
        original_size: int | None = None,
        cache: bool = True,
        image_cache_bytes: int = 512 * 2**20,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if shot < 1:
            raise ValueError(f"shot must be >= 1, got {shot}")
        if num_episodes is not None and num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1 or None, got {num_episodes}")
        self.source = source
        self.fold, self.shot, self.split = int(fold), int(shot), split
        self.seed = int(seed)
        self.transform = transform
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        self.sampling = sampling
        self.original_size = None if original_size is None else int(original_size)
        self.cache_reason = cache_reason(source, transform, cache)
        self._transform_key = getattr(transform, "cache_key", "identity")
        self._image_cache = ByteLRU(int(image_cache_bytes) if self.cache_reason is None else 0)
        n_cls = int(source.num_classes)
        self.novel = source_novel_classes(source, self.fold, num_folds, fold_scheme)
        if classes is not None:
            self.classes = sorted({int(c) for c in classes})
            bad = [c for c in self.classes if not 1 <= c <= n_cls]
            if bad:
                raise ValueError(f"classes {bad} are outside 1..{n_cls} of {type(source).__name__}")
        elif split == "train":
            self.classes = [c for c in range(1, n_cls + 1) if c not in set(self.novel)]
        else:
            self.classes = list(self.novel)
        if not self.classes:
            raise ValueError(
                f"no {split} classes to sample in {type(source).__name__} (fold {self.fold}, "
                f"novel {self.novel}); pass `classes=` explicitly (e.g. every class)"
            )

        novel = set(self.novel) - set(self.classes)
        drop_novel = split == "train" and filter_novel
        per_class: dict[int, list[int]] = {c: [] for c in self.classes}
        for i in range(len(source)):
            if drop_novel and novel & source.labels_in(i):
                continue
            for c in source.classes_in(i):
                if c in per_class:
                    per_class[c].append(i)
        short = {c: len(v) for c, v in per_class.items() if len(v) < self.shot + 1}
        if short:
            # why: [masks holding the class at all, of those below min_pixels, of the others
            # dropped by the novel-class filter]; a source with image_class (FSS-1000 layout)
            # also counts the files of the class's folder
            why = {c: [0, 0, 0] for c in short}
            for i in range(len(source)):
                labels = source.labels_in(i)
                if not labels & set(short):
                    continue
                big, dropped = source.classes_in(i), drop_novel and bool(novel & labels)
                for c in labels & set(short):
                    why[c][0] += 1
                    why[c][1] += c not in big
                    why[c][2] += c in big and dropped
            names = getattr(source, "class_names", None)
            owner = getattr(source, "image_class", None)
            parts = []
            for c, n in sorted(short.items()):
                held, small, dropped = why[c]
                reason = f"{names[c]!r}: " if names is not None and c < len(names) else ""
                if owner is not None:
                    files = int(np.sum(np.asarray(owner) == c))
                    reason += f"{files} image(s) in its folder, {files - held} with no object pixel"
                else:
                    reason += f"{held} mask(s) hold it" if held else "no mask holds it"
                if small:
                    reason += f", {small} with fewer pixels than min_pixels"
                if dropped:
                    reason += f", {dropped} dropped for holding a novel class (filter_novel)"
                parts.append(f"class {c}: {n} image(s) ({reason})")
            fixer = getattr(source, "few_images_fix", None)
            if callable(fixer):
                fix = fixer(sorted(short))
            elif hasattr(source, "num_images"):
                fix = "raise the source's num_images (dataset.dataset_kwargs.num_images)"
            else:
                fix = "add images holding these classes"
            if any(why[c][1] for c in short):
                fix += ", lower min_pixels (dataset.dataset_kwargs.min_pixels)"
            raise ValueError(
                f"{split} episodes with shot={self.shot} need >= {self.shot + 1} images per "
                f"class (query + {self.shot} supports), but {', '.join(parts)} in "
                f"{type(source).__name__} (fold {self.fold}). Fix: {fix}; or use a smaller "
                "shot, or leave these classes out (`classes=`; in the apps dataset.classes / "
                "dataset.train_classes)."
            )
        self.class_images = {c: np.asarray(v, dtype=np.int64) for c, v in per_class.items()}
        self._class_pos = {c: k for k, c in enumerate(self.classes)}
        # (image, class) pairs for image-frequency sampling: [P, 2]
        self._pairs = np.asarray(
            [(i, c) for c in self.classes for i in self.class_images[c]], dtype=np.int64
        ).reshape(-1, 2)
        # the images holding a sampled class (with the minimum pixel count): the query list of
        # "image" sampling; image k's query classes are every sampled class it holds with any
        # pixel count (BAM): _query_classes[_starts[k]:_starts[k + 1]]
        self._images = np.unique(self._pairs[:, 0])
        chosen = set(self.classes)
        per_image = [sorted(chosen & source.labels_in(int(i))) for i in self._images]
        self._query_classes = np.asarray([c for cs in per_image for c in cs], dtype=np.int64)
        self._starts = np.cumsum([0] + [len(cs) for cs in per_image])
        # None: one episode per query image, as BAM/PFENet epochs walk their image list
        n = len(self._images) if num_episodes is None else num_episodes
        self.num_episodes = int(n)

    def __len__(self) -> int:
        return self.num_episodes

    def rng(self, index: int) -> np.random.Generator:
        """The episode's private generator."""
        return np.random.default_rng(
            np.random.SeedSequence([self.seed, self.fold, self.shot, int(index)])
        )

    def sample(self, index: int) -> tuple[int, int, list[int]]:
        """(class_id, query source index, support source indices) of episode ``index``."""
        if int(index) < 0:
            raise IndexError(f"episode index must be >= 0, got {index}")
        rng = self.rng(index)
        if self.sampling == "class":
            cls = self.classes[int(rng.integers(len(self.classes)))]
            query = int(self.class_images[cls][rng.integers(len(self.class_images[cls]))])
        elif self.sampling == "image":
            k = int(rng.integers(len(self._images)))
            lo, hi = self._starts[k], self._starts[k + 1]
            query, cls = int(self._images[k]), int(self._query_classes[lo + rng.integers(hi - lo)])
        else:  # "pair"
            query, cls = (int(x) for x in self._pairs[rng.integers(len(self._pairs))])
        images = self.class_images[cls]
        others = images[images != query]
        support = rng.choice(others, size=self.shot, replace=False)
        return cls, query, [int(s) for s in support]

    @property
    def cache(self) -> bool:
        """Whether episodes carry ``image_keys`` (see ``cache`` in the class docstring)."""
        return self.cache_reason is None

    def image_key(self, i: int) -> str:
        """The identity of image i as episodes see it: the transform and the source image."""
        return f"{self._transform_key}|{self.source.image_key(int(i))}"

    def _transformed(self, i: int) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
        """(image, mask, valid or None) after the transform, and the original mask; kept in
        memory when the transform is deterministic."""
        item = self._image_cache.get(i)
        if item is None:
            image, mask = self.source.load(i)
            original = np.asarray(mask)
            valid = None
            if self.transform is not None:
                image, mask, *rest = self.transform(image, mask)
                valid = rest[0] if rest else None
            item = (np.asarray(image), np.asarray(mask), valid, original)
            self._image_cache.put(i, item, sum(np.asarray(a).nbytes for a in item if a is not None))
        return item

    def _load(
        self, i: int, cls: int, keep_original: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray | None]:
        """(image [3, H, W], binary mask [H, W], valid [H, W] float, original label or None)."""
        image, mask, valid, original = self._transformed(i)
        original = original if keep_original else None
        img, m = _to_tensors(image, mask)
        if valid is None:
            v = torch.ones(m.shape, dtype=torch.float32)
        else:
            v = torch.from_numpy(np.asarray(valid) != 0).float()
            if v.shape != m.shape:
                raise ValueError(
                    f"the transform returned a valid map of shape {tuple(v.shape)} for a mask of "
                    f"shape {tuple(m.shape)} (image {i} of {type(self.source).__name__})"
                )
        return img, _binarize(m, cls), v, original

    def _original_label(self, mask: np.ndarray, cls: int, i: int) -> dict[str, torch.Tensor]:
        """``query_mask_orig`` [S, S] (255-padded binarised label) and ``query_orig_size`` [2]."""
        s = int(self.original_size)
        h, w = mask.shape[:2]
        if h > s or w > s:
            raise ValueError(
                f"image {i} of {type(self.source).__name__} has a {h}x{w} label, larger than "
                f"original_size={s}; raise original_size to at least {max(h, w)}"
            )
        canvas = torch.full((s, s), IGNORE_INDEX, dtype=torch.long)
        canvas[:h, :w] = _binarize(torch.from_numpy(mask.astype(np.int64)), cls)
        return {"query_mask_orig": canvas, "query_orig_size": torch.tensor([h, w])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        cls, query, support = self.sample(index)
        keep = self.original_size is not None
        q_img, q_mask, q_valid, q_orig = self._load(query, cls, keep_original=keep)
        s = [self._load(i, cls) for i in support]
        extra = self._original_label(q_orig, cls, query) if keep else {}
        if self.cache:
            extra["image_keys"] = [self.image_key(i) for i in (query, *support)]
        return {
            "query_img": q_img,  # [3, H, W]
            "query_mask": q_mask,  # [H, W]
            "query_valid": q_valid,  # [H, W], 0 on padding
            "support_imgs": torch.stack([x[0] for x in s]),  # [K, 3, H, W]
            "support_masks": torch.stack([x[1] for x in s]),  # [K, H, W]
            "class_id": cls,
            "class_idx": self._class_pos[cls],
            "index": int(index),
            "query_source_idx": query,
            "support_source_idx": torch.as_tensor(support, dtype=torch.long),  # [K]
            **extra,
        }


def cache_reason(source: Any, transform: Any, cache: bool) -> str | None:
    """Why episodes of ``source`` under ``transform`` cannot be cached (None: they can)."""
    if not cache:
        return "turned off"
    if transform is not None and not hasattr(transform, "cache_key"):
        return (
            f"the transform {type(transform).__name__} is random (augmentation on) or names "
            "no cache_key"
        )
    if not callable(getattr(source, "image_key", None)):
        return f"{type(source).__name__} names no image_key for its images"
    return None


def _binarize(m: torch.Tensor, cls: int) -> torch.Tensor:
    """Class-index mask [H, W] -> long {0, 1, 255}: 1 where == cls, 255 where ignore."""
    binary = (m == cls).long()
    binary[m == IGNORE_INDEX] = IGNORE_INDEX
    return binary
