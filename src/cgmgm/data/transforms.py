"""Per-image transforms with the :class:`~cgmgm.data.episodes.EpisodeDataset` hook signature
``(image uint8 [H, W, 3], class-index mask uint8 [H, W]) -> (image, mask)``.

Masks are only ever resampled with nearest-neighbour interpolation and padded with 255, so
a transformed mask holds nothing but its original values and 255 (ignore). Transforms that pad
also return ``valid`` [H, W] uint8 (1 on the image's own pixels, 0 on padding), so that padding
can be kept out of the model's fits (the episode's ``query_valid``).

- :class:`BAMTrainTransform`: BAM/PFENet training augmentation (both train.py): RandScale,
  RandRotate (p 0.5, image padded with the ImageNet mean, mask with 255), Gaussian blur
  (5x5, p 0.5), horizontal flip (p 0.5), random crop to ``size`` (padding centred, mean /
  255 first when smaller), built from albumentations.
- :class:`PadResize`: BAM/PFENet test resize (util/transform.py ``Resize``, used as
  ``resized_val: True``): longer side to ``size`` (both sides then floored to a multiple of
  8), pasted top-left on a ``size`` x ``size`` canvas, image padded with 0, mask with 255.
- :class:`SquashResize`: HSNet test/train resize (data/dataset.py): both sides to ``size``.

A deterministic transform names itself with a ``cache_key`` string (the resizes do); the
frozen-feature cache (:mod:`cgmgm.features`) serves only images under such transforms, so the
random augmentation never gets one.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from cgmgm.constants import IGNORE_INDEX

__all__ = [
    "IMAGENET_MEAN_255",
    "BAMTrainTransform",
    "PadResize",
    "SquashResize",
    "bam_train_transform",
]

IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
# BAM configs: config/pascal/pascal_split0_resnet50.yaml (train_h 473, scale 0.9-1.1) and
# config/coco/coco_split0_resnet50.yaml (train_h 641, scale 0.8-1.25); rotate -10..10 in both.
_BAM_PRESETS = {
    "pascal": {"size": 473, "scale": (0.9, 1.1)},
    "coco": {"size": 641, "scale": (0.8, 1.25)},
}


class BAMTrainTransform:
    """BAM's training augmentation (see the module docstring), albumentations-based.

    Args:
        size: square crop size (473 PASCAL, 641 COCO).
        scale: (min, max) of the random rescale factor, always applied.
        rotate: rotation range in degrees, ``(-rotate, rotate)``, applied with ``rotate_p``.
        blur_p: probability of the 5x5 Gaussian blur (sigma 1.1 = OpenCV's sigma for a 5x5
            kernel with sigma 0, as BAM's ``cv2.GaussianBlur(img, (5, 5), 0)``).
        flip_p: probability of the horizontal flip.
        fill: image padding value (BAM: the ImageNet mean in 0..255).
        ignore_index: mask padding value.
        seed: seed of the augmentation stream. Inside a DataLoader worker, or on a DDP rank
            other than 0, the stream is re-seeded from ``(seed, worker seed, rank)`` so workers
            and processes never repeat each other.

        crop_retries: BAM's crop retries: the crop is drawn again, up to this many times,
            until at least ``crop_keep`` of the mask's labelled pixels (values other than 0 and
            255) survive it (BAM: 30 and 0.85). Episodes leave it at 0: their masks are
            class-index maps and the target class is not known yet; the base learner's masks
            hold only its own classes (:mod:`cgmgm.data.base`), so it uses the retries.
        crop_keep: the fraction of labelled pixels a crop must keep (with ``crop_retries``).
    """

    def __init__(
        self,
        size: int = 473,
        scale: tuple[float, float] = (0.9, 1.1),
        rotate: float = 10.0,
        rotate_p: float = 0.5,
        blur_p: float = 0.5,
        flip_p: float = 0.5,
        fill: tuple[float, float, float] = IMAGENET_MEAN_255,
        ignore_index: int = IGNORE_INDEX,
        seed: int = 0,
        crop_retries: int = 0,
        crop_keep: float = 0.85,
    ) -> None:
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        import albumentations as A  # imported here: ~2 s, only training needs it

        self.size, self.seed = int(size), int(seed)
        fill = tuple(float(f) for f in fill)
        self.compose = A.Compose(
            [
                A.RandomScale(
                    scale_limit=(lo - 1.0, hi - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                ),
                A.Rotate(
                    limit=(-float(rotate), float(rotate)),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=fill,
                    fill_mask=ignore_index,
                    p=rotate_p,
                ),
                A.GaussianBlur(blur_limit=(5, 5), sigma_limit=(1.1, 1.1), p=blur_p),
                A.HorizontalFlip(p=flip_p),
                A.PadIfNeeded(
                    min_height=self.size,
                    min_width=self.size,
                    position="center",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=fill,
                    fill_mask=ignore_index,
                ),
            ],
            seed=self.seed,
        )
        self.crop = A.Compose([A.RandomCrop(height=self.size, width=self.size)], seed=self.seed + 1)
        self.crop_retries, self.crop_keep = int(crop_retries), float(crop_keep)
        self.ignore_index = int(ignore_index)
        self._seeded_for: tuple[int | None, int] | None = None

    def _reseed_for_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        key = (None if info is None else int(info.seed), rank)
        if key != self._seeded_for:
            # one stream per (DataLoader worker, process): DDP ranks never repeat each other
            parts = [] if key[0] is None else [key[0] % 2**63]
            parts += [rank] if rank else []
            seed = self.seed
            if parts:
                seed = int(np.random.SeedSequence([self.seed, *parts]).generate_state(1)[0])
            self.compose.set_random_seed(seed)
            self.crop.set_random_seed(seed + 1)
            self._seeded_for = key

    def __call__(
        self, image: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[H, W, 3] uint8, [H, W] uint8 -> [size, size, 3] uint8, [size, size] uint8 and
        valid [size, size] uint8 (0 where rotation or the crop padded)."""
        self._reseed_for_worker()
        ones = np.ones(mask.shape[:2], dtype=np.uint8)  # padded with 255 like the mask
        out = self.compose(
            image=np.ascontiguousarray(image), masks=[np.ascontiguousarray(mask), ones]
        )
        out = self._crop(out["image"], out["masks"])
        mask_out, valid = out["masks"]
        return out["image"], np.asarray(mask_out), (np.asarray(valid) == 1).astype(np.uint8)

    def _labelled(self, mask: np.ndarray) -> int:
        return int(np.count_nonzero((mask != 0) & (mask != self.ignore_index)))

    def _crop(self, image: np.ndarray, masks: list[np.ndarray]) -> dict:
        """The random crop, drawn again (``crop_retries``) while it keeps less than
        ``crop_keep`` of the labelled pixels; the last draw stands."""
        out = self.crop(image=image, masks=masks)
        if self.crop_retries > 0:
            total = self._labelled(masks[0])
            for _ in range(self.crop_retries):
                if self._labelled(out["masks"][0]) >= self.crop_keep * total:
                    break
                out = self.crop(image=image, masks=masks)
        return out


def bam_train_transform(dataset: str = "pascal", seed: int = 0, **overrides) -> BAMTrainTransform:
    """BAM's training augmentation with the dataset's preset (pascal: 473, scale 0.9-1.1;
    coco: 641, scale 0.8-1.25; anything else: the PASCAL preset)."""
    kw = dict(_BAM_PRESETS.get(dataset, _BAM_PRESETS["pascal"]))
    kw.update(overrides)
    return BAMTrainTransform(seed=seed, **kw)


def _bam_new_hw(h: int, w: int, size: int, round_to: int) -> tuple[int, int]:
    """BAM's ``find_new_hw``: longer side -> size, shorter scaled (int()), both floored to a
    multiple of ``round_to`` (so 473 becomes 472)."""
    if h >= w:
        nh, nw = size, int(w * (size / h))
    else:
        nh, nw = int(h * (size / w)), size
    if round_to > 1:
        nh, nw = (nh // round_to) * round_to, (nw // round_to) * round_to
    return max(nh, 1), max(nw, 1)


class PadResize:
    """BAM/PFENet test resize: keep aspect, longer side to ``size``, pad to a square.

    ``(image [H, W, 3], mask [H, W]) -> ([size, size, 3], [size, size], valid [size, size])``;
    the resized content (``content_size(H, W)``) sits in the top-left corner, the image padded
    with ``image_fill`` (BAM: 0 before normalisation), the mask with 255, valid with 0.
    """

    def __init__(
        self,
        size: int = 473,
        round_to: int = 8,
        image_fill: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.size, self.round_to = int(size), int(round_to)
        self.image_fill, self.ignore_index = int(image_fill), int(ignore_index)

    @property
    def cache_key(self) -> str:
        """Names this deterministic transform (keys the frozen-feature cache)."""
        return f"PadResize(size={self.size},round_to={self.round_to},fill={self.image_fill})"

    def content_size(self, h: int, w: int) -> tuple[int, int]:
        """(h', w') of the resized content inside the square."""
        return _bam_new_hw(h, w, self.size, self.round_to)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = mask.shape[:2]
        nh, nw = self.content_size(h, w)
        img = cv2.resize(np.asarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)
        m = cv2.resize(np.asarray(mask), (nw, nh), interpolation=cv2.INTER_NEAREST)
        out_img = np.full((self.size, self.size, 3), self.image_fill, dtype=img.dtype)
        out_img[:nh, :nw] = img
        out_mask = np.full((self.size, self.size), self.ignore_index, dtype=np.uint8)
        out_mask[:nh, :nw] = m
        valid = np.zeros((self.size, self.size), dtype=np.uint8)
        valid[:nh, :nw] = 1
        return out_img, out_mask, valid


class SquashResize:
    """HSNet resize: ``(image [H, W, 3], mask [H, W]) -> ([size, size, 3], [size, size])``,
    aspect not kept (bilinear image, nearest mask)."""

    def __init__(self, size: int = 400) -> None:
        self.size = int(size)

    @property
    def cache_key(self) -> str:
        """Names this deterministic transform (keys the frozen-feature cache)."""
        return f"SquashResize(size={self.size})"

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.size
        img = cv2.resize(np.asarray(image), (s, s), interpolation=cv2.INTER_LINEAR)
        m = cv2.resize(np.asarray(mask), (s, s), interpolation=cv2.INTER_NEAREST)
        return img, m
