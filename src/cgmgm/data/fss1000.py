"""FSS-1000 layout: one folder per class, ``<n>.jpg`` with its mask ``<n>.png``.

Each folder is one class; a mask pixel is the object where its gray value is > 127
(HSNet's data/fss.py binarises at >= 128, the same). Classes are numbered 1..N in the order
given (default: sorted folder names). The source defines a single fold holding every class,
so ``fold=0`` tests on all classes; FSS-1000's class splits (HSNet's data/splits/fss/
{trn,val,test}.txt: 520/240/240 classes) are selected with ``classes={split: file}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cgmgm.data.datamodule import register_source
from cgmgm.data.files import (
    DatasetError,
    FileSource,
    check_hint,
    natural_key,
    read_label,
    require_root,
    split_option,
)

__all__ = ["FSS1000", "class_folders"]


def class_folders(root: Path, classes: str | Path | Sequence[str] | None) -> list[str]:
    """Class folder names: all sub-folders (sorted) for None/"all", a list as given, or the
    names in a text file (one per line; path relative to ``root`` or absolute)."""
    if classes is None or classes == "all":
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DatasetError(
                f"fss1000 root {root} has no class folders. Fix: {check_hint('fss1000', root)}"
            )
        return names
    if isinstance(classes, str | Path):
        path = Path(classes)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DatasetError(f"class list {path} does not exist")
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    else:
        names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        raise DatasetError(f"class names are not unique: {names}")
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise DatasetError(
            f"{len(missing)} class folder(s) missing under {root}: {missing[:5]}. "
            f"Fix: {check_hint('fss1000', root)}"
        )
    return names


class FSS1000(FileSource):
    """One-folder-per-class binary-mask source (FSS-1000, DAVIS in FSS-1000 layout).

    Args:
        split: image split name; only selects an entry of a ``classes`` mapping.
        root: directory holding the class folders.
        classes: None / "all" (every folder), a list of folder names, a text file of names,
            or a {split: any of these} mapping (e.g. HSNet's FSS-1000 class splits).
        min_pixels: per-class pixel threshold (default 1: every image with object pixels).
        image_ext, mask_ext: file extensions of images and masks.
        threshold: a mask pixel is the object where gray > threshold.
        stats_cache: optional pixel-count ``.npz`` (see :class:`FileSource`).

    Attributes: ``folds = [[1..N]]`` (fold 0 = every class), ``class_names``.
    """

    fold_scheme = "all"
    dataset_name = "fss1000"

    def __init__(
        self,
        split: str = "test",
        root: str | Path | None = None,
        classes: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
        min_pixels: int = 1,
        image_ext: str = ".jpg",
        mask_ext: str = ".png",
        threshold: int = 127,
        stats_cache: str | Path | None = None,
    ) -> None:
        root = require_root(root, self.dataset_name)
        names = class_folders(root, split_option(classes, split))
        keys, images, masks, owner = [], [], [], []
        for k, name in enumerate(names, start=1):
            files = sorted((root / name).glob(f"*{image_ext}"), key=lambda p: natural_key(p.name))
            if not files:
                raise DatasetError(f"class folder {root / name} has no *{image_ext} images")
            for img in files:
                mask = img.with_suffix(mask_ext)
                if not mask.is_file():
                    raise DatasetError(
                        f"image {img} has no mask {mask}. Fix: add the mask or remove the image "
                        "(every <n>.jpg needs its <n>.png)"
                    )
                keys.append(f"{name}/{img.stem}")
                images.append(img)
                masks.append(mask)
                owner.append(k)
        self.num_classes = len(names)
        self.class_names = ("background", *names)
        self.folds = [list(range(1, len(names) + 1))]
        self.image_class = np.asarray(owner, dtype=np.int64)  # [N] class of each image
        self.threshold = int(threshold)
        self.split, self.root = split, root
        super().__init__(keys, images, masks, min_pixels=min_pixels, stats_cache=stats_cache)

    def _read_mask(self, i: int) -> np.ndarray:
        binary = read_label(self.mask_paths[i], binary_threshold=self.threshold)
        return binary * np.uint8(self.image_class[i])


register_source("fss1000")(FSS1000)
