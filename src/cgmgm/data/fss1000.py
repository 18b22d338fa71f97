"""FSS-1000 layout: one folder per class, ``<n>.jpg`` with its mask ``<n>.png``.

Each folder is one class. Images may end in .jpg, .jpeg (or .bmp, .tif, .tiff, .webp), masks
in .png, in any case (``00005.JPG`` with ``00005.png``); an image without its mask, a mask
without its image, or two images of one stem is an error naming the file, and any other file
in a class folder is named in a warning (hidden files excepted).

Mask values: 0/255 (any mode; RGB and palette masks are read as gray), the object where
gray > 127 (``threshold``; HSNet's data/fss.py binarises at >= 128, the same). A mask whose
non-zero values all lie at or below the threshold (e.g. saved as 0/1) would have no object
pixel: the start-up check names it and says to set ``threshold=0`` for 0/1 masks.

Classes are numbered 1..N in the order given (default: sorted folder names). Folds: "all"
(the default: one fold holding every class, so ``fold=0`` tests on all classes), k
PASCAL-style blocks of the class list (``folds=4``: fold i tests block i and trains on the
others; conf/dataset/fss1000.yaml uses this), or lists of names. FSS-1000's own class splits
(HSNet's data/splits/fss/{trn,val,test}.txt: 520/240/240 classes) are selected with
``classes={split: file}``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cgmgm.constants import IGNORE_INDEX
from cgmgm.data.datamodule import register_source
from cgmgm.data.files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    FileSource,
    check_hint,
    natural_key,
    parse_folds,
    read_gray,
    require_root,
    show_files,
    show_lines,
    split_option,
    value_set,
)

__all__ = ["FSS1000", "FSS_IMAGE_EXTENSIONS", "class_folders", "scan_class_folder"]

FSS_IMAGE_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e != ".png")


def _lower(exts: str | Sequence[str]) -> tuple[str, ...]:
    exts = (exts,) if isinstance(exts, str) else tuple(exts)
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts)


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


def scan_class_folder(
    folder: Path,
    image_exts: Sequence[str] = FSS_IMAGE_EXTENSIONS,
    mask_exts: Sequence[str] = (".png",),
) -> tuple[list[tuple[Path, Path]], list[str], list[Path]]:
    """One class folder -> (image, mask) pairs in natural order, problems (orphan images or
    masks, several images or masks of one stem; each a message naming the file) and the
    other visible entries (neither image nor mask). Suffixes compare in lower case."""
    image_exts, mask_exts = _lower(image_exts), _lower(mask_exts)
    stems: dict[str, tuple[list[Path], list[Path]]] = {}
    other: list[Path] = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue  # .DS_Store and the like
            p = Path(e.path)
            suffix = p.suffix.lower()
            if not e.is_file() or suffix not in image_exts + mask_exts:
                other.append(p)
                continue
            images, masks = stems.setdefault(p.stem, ([], []))
            (masks if suffix in mask_exts else images).append(p)
    pairs, problems = [], []
    want = "/".join(image_exts)
    for stem in sorted(stems, key=natural_key):
        images, masks = (sorted(x) for x in stems[stem])
        if len(images) > 1 or len(masks) > 1:
            both = show_files([str(p) for p in images + masks])
            problems.append(
                f"{both} share the stem {stem!r}: which image goes with which mask is "
                "ambiguous. Fix: keep one image and one mask per name"
            )
        elif not masks:
            problems.append(
                f"image {images[0]} has no mask {folder / stem}{mask_exts[0]}. Fix: add the "
                f"mask or remove the image (every <n>.jpg needs its <n>{mask_exts[0]})"
            )
        elif not images:
            problems.append(
                f"mask {masks[0]} has no image {folder / stem}.jpg (or another of {want}, any "
                "case). Fix: add the image or remove the mask"
            )
        else:
            pairs.append((images[0], masks[0]))
    return pairs, problems, other


class FSS1000(FileSource):
    """One-folder-per-class binary-mask source (FSS-1000, DAVIS in FSS-1000 layout).

    Args:
        split: image split name; only selects an entry of a ``classes`` mapping.
        root: directory holding the class folders.
        classes: None / "all" (every folder), a list of folder names, a text file of names,
            or a {split: any of these} mapping (e.g. HSNet's FSS-1000 class splits).
        min_pixels: per-class pixel threshold (default 1: every image with object pixels).
        image_ext: image suffix(es), any case (None: .jpg .jpeg .bmp .tif .tiff .webp).
        mask_ext: mask suffix(es), any case.
        threshold: a mask pixel is the object where gray > threshold (127 for 0/255 masks;
            0 for masks saved as 0/1).
        folds: "all" (one fold of every class), k (k blocks of the class list) or a list of
            folds (folder names or ids); see the module docstring.
        stats_cache: optional pixel-count ``.npz`` (see :class:`FileSource`).
        strict: raise on orphan or ambiguous files (False: keep the valid pairs and list
            the problems in ``layout_problems``; ``prepare check`` uses this).

    Attributes: ``folds``, ``class_names``, ``image_class`` [N] (class of each image),
    ``layout_problems``, ``ignored_files``.
    """

    fold_scheme = "all"
    dataset_name = "fss1000"

    def __init__(
        self,
        split: str = "test",
        root: str | Path | None = None,
        classes: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
        min_pixels: int = 1,
        image_ext: str | Sequence[str] | None = None,
        mask_ext: str | Sequence[str] = ".png",
        threshold: int = 127,
        folds: str | int | Sequence[Sequence[int | str]] = "all",
        stats_cache: str | Path | None = None,
        strict: bool = True,
    ) -> None:
        root = require_root(root, self.dataset_name)
        names = class_folders(root, split_option(classes, split))
        image_exts = _lower(FSS_IMAGE_EXTENSIONS if image_ext is None else image_ext)
        mask_exts = _lower(mask_ext)
        keys, images, masks, owner = [], [], [], []
        problems: list[str] = []
        other: list[Path] = []
        for k, name in enumerate(names, start=1):
            pairs, bad, rest = scan_class_folder(root / name, image_exts, mask_exts)
            problems += bad
            other += rest
            if not pairs and not bad:
                problems.append(
                    f"class folder {root / name} has no images ({'/'.join(image_exts)} with "
                    f"their {'/'.join(mask_exts)} masks). Fix: add images or leave the class "
                    "out (dataset.dataset_kwargs.classes=[...])"
                )
            for img, mask in pairs:
                keys.append(f"{name}/{img.stem}")
                images.append(img)
                masks.append(mask)
                owner.append(k)
        self.layout_problems = problems
        self.ignored_files = other
        if problems and strict:
            raise DatasetError(
                f"fss1000 data at {root}: {len(problems)} problem(s) in the class folders "
                f"(each image needs its mask of the same name, and each mask its image):"
                f"{show_lines(problems)}"
            )
        if other:
            warnings.warn(
                f"fss1000 data at {root}: {len(other)} file(s) or folder(s) in the class "
                f"folders are neither images ({'/'.join(image_exts)}) nor masks "
                f"({'/'.join(mask_exts)}) and are not used: {show_files([str(p) for p in other])}",
                UserWarning,
                stacklevel=2,
            )
        self.num_classes = len(names)
        if self.num_classes >= IGNORE_INDEX:  # masks are uint8 with 255 = ignore
            raise DatasetError(
                f"{root}: {self.num_classes} class folders, but class-index masks hold at most "
                "254 classes (uint8, 255 = ignore); select a subset with "
                "dataset.dataset_kwargs.classes=<list or split file> (e.g. FSS-1000's test "
                "split of 240 classes)"
            )
        self.class_names = ("background", *names)
        self.folds = parse_folds(folds, self.num_classes, self.class_names)
        self.image_class = np.asarray(owner, dtype=np.int64)  # [N] class of each image
        self.threshold = int(threshold)
        self.split, self.root = split, root
        super().__init__(keys, images, masks, min_pixels=min_pixels, stats_cache=stats_cache)

    def _read_mask(self, i: int) -> np.ndarray:
        gray = read_gray(self.mask_paths[i])  # [H, W]
        top = int(gray.max()) if gray.size else 0
        if 0 < top <= self.threshold:
            raise DatasetError(
                f"mask {self.mask_paths[i]} has values {value_set(gray)}: expected 0/255 "
                f"(FSS-1000: the object is where gray > {self.threshold}), so it has no object "
                "pixel. Fix: save it with the object as 255 (a 0/1 mask times 255), or, if all "
                "your masks are 0/1, set dataset.dataset_kwargs.threshold=0"
            )
        return (gray > self.threshold).astype(np.uint8) * np.uint8(self.image_class[i])

    def notice_hints(self) -> dict[str, str]:
        return {
            "no_class": f"FSS-1000 masks draw the object in white (gray > {self.threshold}); "
            "is the object black in these?",
        }

    def few_images_fix(self, classes: Sequence[int]) -> str:
        folders = show_files([str(self.root / self.class_names[c]) for c in classes], 3)
        return (
            f"add images (<n>.jpg with its <n>.png mask, object in white) to {folders}, or "
            "leave the class out (dataset.dataset_kwargs.classes=[...] lists the folders to use)"
        )


register_source("fss1000")(FSS1000)
