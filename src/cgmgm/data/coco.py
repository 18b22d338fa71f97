"""COCO-20i: COCO 2014 images with class-index masks built from the instance annotations.

Layout under ``root`` (the official zips, unpacked)::

    train2014/COCO_train2014_<id>.jpg     val2014/COCO_val2014_<id>.jpg
    annotations/instances_train2014.json  annotations/instances_val2014.json

Masks come from the instance JSON through pycocotools (polygons, uncompressed and compressed
RLE alike); no separate mask download exists. The 80 categories map to 1..80 in increasing
category-id order; fold i novel = {4k + i + 1} ("interleaved", BAM/PFENet ``use_split_coco``,
util/dataset.py). A class counts in an image with >= 2*32*32 pixels.

Mask construction (our choice, deterministic): crowd regions (``iscrowd=1``) are painted 255
(ignore) first, as is common, so that unlabelled people in a crowd neither count as
background nor as the class; then the non-crowd instances are painted in decreasing area
(ties: increasing annotation id), so a small object lying on a large one keeps its pixels.
``crowd="class"`` paints crowd regions with their category instead.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cgmgm.constants import IGNORE_INDEX, MIN_PIXELS
from cgmgm.data.datamodule import register_source
from cgmgm.data.files import (
    DatasetError,
    FileSource,
    check_hint,
    read_label,
    require_dir,
    require_root,
    split_option,
)

__all__ = ["COCO2014", "coco_split_name", "load_coco", "render_coco_mask"]


def coco_split_name(split: str) -> str:
    """Source split -> COCO 2014 image set: "train" -> train2014, "val"/"test" -> val2014."""
    if split in ("train", "train2014"):
        return "train2014"
    if split in ("val", "test", "val2014"):
        return "val2014"
    raise ValueError(f"COCO 2014 has splits 'train' and 'val' (or 'test' = val), got {split!r}")


def load_coco(annotation_file: Path):  # -> pycocotools.coco.COCO
    """pycocotools COCO index of ``annotation_file`` (its progress prints are silenced)."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotation_file))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"cannot read COCO annotations {annotation_file} ({type(e).__name__}: {e}). "
            "Fix: re-extract annotations_trainval2014.zip"
        ) from e


def render_coco_mask(
    coco, image_id: int, cat_to_class: Mapping[int, int], crowd: str = "ignore"
) -> np.ndarray:
    """Class-index mask uint8 [H, W] of one image from its instance annotations.

    Crowd regions first (255, or their class with ``crowd="class"``), then non-crowd
    instances in decreasing area (ties: increasing annotation id).
    """
    from pycocotools import mask as mask_utils

    info = coco.imgs[image_id]
    h, w = int(info["height"]), int(info["width"])
    mask = np.zeros((h, w), dtype=np.uint8)
    anns = coco.imgToAnns.get(image_id, [])
    crowds = sorted((a for a in anns if a.get("iscrowd", 0)), key=lambda a: a["id"])
    objects = [a for a in anns if not a.get("iscrowd", 0)]

    def area(a) -> float:
        if "area" in a:
            return float(a["area"])
        return float(mask_utils.area(coco.annToRLE(a)))

    objects.sort(key=lambda a: (-area(a), a["id"]))
    for a in crowds + objects:
        cls = cat_to_class.get(int(a["category_id"]))
        if cls is None:
            raise DatasetError(
                f"annotation {a['id']} of image {image_id} has category {a['category_id']}, "
                "which is not in the JSON's 'categories'"
            )
        m = coco.annToMask(a).astype(bool)  # [H, W]
        if m.shape != (h, w):
            raise DatasetError(
                f"annotation {a['id']} of image {image_id} decodes to {m.shape}, not the "
                f"image's {h}x{w}"
            )
        fill = IGNORE_INDEX if a.get("iscrowd", 0) and crowd == "ignore" else cls
        mask[m] = fill
    return mask


class COCO2014(FileSource):
    """COCO 2014 class-index source (80 classes, COCO-20i interleaved folds).

    Args:
        split: "train" (train2014) or "val"/"test" (val2014).
        root: dataset root (see the module docstring).
        annotation_file: instance JSON overriding ``annotations/instances_<set>.json``
            (a path or a {split: path} mapping; relative to root).
        image_dir: image directory overriding ``<set>`` (train2014 / val2014).
        mask_dir: optional directory of prebuilt PNG masks ``<image stem>.png`` (from
            ``prepare coco --write-masks``: ``masks/<set>``), or a {split: directory}
            mapping; default: rendered from the annotations.
        crowd: "ignore" (crowd regions -> 255) or "class" (crowd regions -> their class).
        images: "annotated" (images with >= 1 instance annotation: 82081 train / 40137 val,
            PFENet's lists) or "all".
        list_file: optional list restricting the images (file names or stems, one a line).
        min_pixels: per-class pixel threshold (2048).
        stats_cache: pixel-count cache; "auto" uses ``lists/<set>_pixels.npz`` when present.
    """

    fold_scheme = "interleaved"
    dataset_name = "coco"

    def __init__(
        self,
        split: str = "train",
        root: str | Path | None = None,
        annotation_file: str | Path | Mapping[str, str] | None = None,
        image_dir: str | None = None,
        mask_dir: str | Path | Mapping[str, str] | None = None,
        crowd: str = "ignore",
        images: str = "annotated",
        list_file: str | Path | Mapping[str, str] | None = None,
        min_pixels: int = MIN_PIXELS,
        stats_cache: str | Path | None = "auto",
    ) -> None:
        if crowd not in ("ignore", "class"):
            raise ValueError(f"crowd must be 'ignore' or 'class', got {crowd!r}")
        if images not in ("annotated", "all"):
            raise ValueError(f"images must be 'annotated' or 'all', got {images!r}")
        root = require_root(root, self.dataset_name)
        coco_set = coco_split_name(split)
        img_dir = require_dir(root / (image_dir or coco_set), "image", self.dataset_name, root)
        ann = split_option(annotation_file, split)
        ann_path = root / "annotations" / f"instances_{coco_set}.json" if ann is None else Path(ann)
        if not ann_path.is_absolute():
            ann_path = root / ann_path
        if not ann_path.is_file():
            raise DatasetError(
                f"COCO annotation file {ann_path} is missing. Fix: unpack "
                f"annotations_trainval2014.zip into {root}; {check_hint('coco', root)}"
            )
        self.coco = load_coco(ann_path)
        cat_ids = sorted(int(c) for c in self.coco.cats)
        self.cat_to_class = {c: k + 1 for k, c in enumerate(cat_ids)}
        self.num_classes = len(cat_ids)
        self.class_names = ("background",) + tuple(self.coco.cats[c]["name"] for c in cat_ids)
        self.crowd = crowd
        ids = sorted(int(i) for i in self.coco.imgs)
        if images == "annotated":
            ids = [i for i in ids if self.coco.imgToAnns.get(i)]
        chosen = split_option(list_file, split)
        if chosen is not None:
            ids = self._restrict(ids, root / chosen if not Path(chosen).is_absolute() else chosen)
        names = [self.coco.imgs[i]["file_name"] for i in ids]
        paths = [img_dir / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) of {ann_path.name} are missing from {img_dir}, e.g. "
                f"{missing[0]}. Fix: unpack {coco_set}.zip completely; "
                f"{check_hint('coco', root)}"
            )
        self.image_ids = ids
        mask_dir = split_option(mask_dir, split)
        self.mask_dir = None if mask_dir is None else Path(mask_dir)
        if self.mask_dir is not None and not self.mask_dir.is_absolute():
            self.mask_dir = root / self.mask_dir
        self.split, self.root, self.annotation_file = split, root, ann_path
        keys = [Path(n).stem for n in names]
        masks = None if self.mask_dir is None else [self.mask_dir / f"{k}.png" for k in keys]
        if stats_cache == "auto":
            stats_cache = root / "lists" / f"{coco_set}_pixels.npz"
        super().__init__(keys, paths, masks, min_pixels=min_pixels, stats_cache=stats_cache)

    def _restrict(self, ids: list[int], list_file: Path) -> list[int]:
        if not Path(list_file).is_file():
            raise DatasetError(f"COCO image list {list_file} does not exist")
        by_stem = {Path(self.coco.imgs[i]["file_name"]).stem: i for i in ids}
        wanted, unknown = [], []
        for raw in Path(list_file).read_text().splitlines():
            tok = raw.split("#", 1)[0].strip()
            if not tok:
                continue
            stem = Path(tok.split()[0]).stem
            (wanted if stem in by_stem else unknown).append(stem)
        if unknown:
            raise DatasetError(
                f"{len(unknown)} image(s) in {list_file} are not annotated images of this "
                f"split, e.g. {unknown[0]!r}"
            )
        return sorted(by_stem[s] for s in dict.fromkeys(wanted))

    def _read_mask(self, i: int) -> np.ndarray:
        if self.mask_paths is not None:
            return self.check_labels(read_label(self.mask_paths[i]), i)
        return render_coco_mask(self.coco, self.image_ids[i], self.cat_to_class, self.crowd)


register_source("coco")(COCO2014)
