"""PASCAL-5i: VOC2012 ``JPEGImages`` + ``SegmentationClassAug`` masks (SBD-augmented).

Layout under ``root`` (what ``python -m cgmgm.data.prepare pascal`` builds)::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png   class index 0..20, 255 = ignore (VOC object borders)
    lists/train.txt                 PFENet's 5953 training images
    lists/val.txt                   VOC2012 val, 1449 images (the test images of PASCAL-5i)

Lists hold one id per line or PFENet/BAM lines ``JPEGImages/x.jpg SegmentationClassAug/x.png``.
Classes 1..20 in VOC order; fold i novel = 5i+1..5i+5 ("block"); a class counts in an image
with >= 2*32*32 pixels (PFENet/BAM ``make_dataset``, util/dataset.py in both repositories).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cgmgm.constants import MIN_PIXELS
from cgmgm.data.datamodule import register_source
from cgmgm.data.files import (
    FileSource,
    read_label,
    read_list,
    require_dir,
    require_root,
    split_option,
)

__all__ = ["VOC_CLASSES", "PascalVOC", "voc_palette"]

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_palette() -> list[int]:
    """The 256-colour VOC palette (flat [768] RGB list; index 255 is (224, 224, 192))."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _default_list(root: Path, split: str) -> Path:
    name = "train" if split == "train" else "val" if split in ("val", "test") else split
    return root / "lists" / f"{name}.txt"


class PascalVOC(FileSource):
    """PASCAL VOC2012 + SBD class-index source (20 classes, PASCAL-5i folds).

    Args:
        split: "train" (lists/train.txt) or "val"/"test" (lists/val.txt); any other name
            reads lists/<split>.txt.
        root: dataset root (see the module docstring).
        list_file: split list overriding the default; a path (relative to root or absolute)
            or a {split: path} mapping.
        image_dir, mask_dir: sub-directories of images and masks.
        min_pixels: per-class pixel threshold of ``classes_in`` (PASCAL-5i: 2048).
        stats_cache: pixel-count cache; "auto" uses ``lists/<list stem>_pixels.npz`` when
            it exists (written by prepare), None disables it.
    """

    num_classes = 20
    fold_scheme = "block"
    class_names = VOC_CLASSES
    dataset_name = "pascal"

    def __init__(
        self,
        split: str = "train",
        root: str | Path | None = None,
        list_file: str | Path | Mapping[str, str] | None = None,
        image_dir: str = "JPEGImages",
        mask_dir: str = "SegmentationClassAug",
        min_pixels: int = MIN_PIXELS,
        stats_cache: str | Path | None = "auto",
    ) -> None:
        root = require_root(root, self.dataset_name)
        require_dir(root / image_dir, "image", self.dataset_name, root)
        require_dir(root / mask_dir, "mask", self.dataset_name, root)
        chosen = split_option(list_file, split)
        lst = _default_list(root, split) if chosen is None else Path(chosen)
        if not lst.is_absolute() and chosen is not None:
            lst = root / lst
        entries = read_list(lst, root, image_dir, mask_dir, self.dataset_name)
        if stats_cache == "auto":
            stats_cache = lst.with_name(f"{lst.stem}_pixels.npz")
        self.split, self.root, self.list_file = split, root, lst
        super().__init__(
            [e[0] for e in entries],
            [e[1] for e in entries],
            [e[2] for e in entries],
            min_pixels=min_pixels,
            stats_cache=stats_cache,
        )

    def _read_mask(self, i: int) -> np.ndarray:
        return self.check_labels(read_label(self.mask_paths[i]), i)


register_source("pascal")(PascalVOC)
