"""Users' own data: an image folder, a class-index mask folder, class names, folds.

Layout under ``root``::

    images/<name>.jpg|jpeg|png    (image_dir; suffixes in any case, e.g. x.JPG)
    masks/<name>.png  or labels/  (mask_dir; single-channel class-index PNGs)
    classes.txt | classes.yaml    (optional here when ``classes`` is passed)
    train.txt, val.txt, test.txt  (one image name per line, or "image mask" paths)

Mask values are label values: ``classes[v]`` names value v, 255 is ignore. A value with no
name is an error naming the file; a mask with no class pixel (e.g. a 0/255 binary mask read
as class indices: background + ignore) is named in a start-up warning. With
``list_file="all"`` every image of ``image_dir`` needs its mask and every mask its image.

``classes[v]`` names the label *value* v. ``background`` is the value meaning background
(None: every non-ignored value is a class, e.g. CamVid's "sky"), ``ignore_index`` the values
mapped to 255 (255 always is). The remaining values become classes 1..C in increasing value
order. Folds: "all" (one fold, every class) or a list of lists of class ids (1..C after the
mapping) or names, or a number k: k PASCAL-style blocks of the classes in id order
(conf/dataset/folder.yaml: 4). CamVid::

    FolderSource("test", root="camvid", classes=[...12 names...], background=None,
                 ignore_index=[11], mask_dir="labels")
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cgmgm.constants import IGNORE_INDEX
from cgmgm.data.datamodule import register_source
from cgmgm.data.files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    FileSource,
    check_hint,
    has_suffix,
    index_dir,
    natural_key,
    parse_folds,
    read_label,
    read_list,
    require_dir,
    require_root,
    show_files,
    show_lines,
    split_option,
)

__all__ = ["FolderSource", "all_pairs", "load_class_names", "pair_dirs"]

_UNKNOWN = 254  # LUT marker for label values that are neither classes, background nor ignore


def load_class_names(spec: Any, root: Path) -> list[str]:
    """Names indexed by label value from a list, a .txt (one per line) or a .yaml file (a
    list, a {value: name} mapping, or {"classes": ...}); None looks for root/classes.*."""
    if spec is None:
        for cand in ("classes.txt", "classes.yaml", "classes.yml"):
            if (root / cand).is_file():
                return load_class_names(cand, root)
        raise DatasetError(
            f"no class names for {root}: pass `classes` (a list, or a .txt/.yaml file) or put "
            f"classes.txt (one name per label value) in the root; {check_hint('folder', root)}"
        )
    if isinstance(spec, str | Path):
        path = Path(spec)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DatasetError(f"class-name file {path} does not exist")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
            if isinstance(data, Mapping) and "classes" in data:
                data = data["classes"]
            return load_class_names(data, root)
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if isinstance(spec, Mapping):
        values = sorted(int(k) for k in spec)
        if values != list(range(len(values))):
            raise DatasetError(f"class-name mapping must cover values 0..N-1, got {values}")
        return [str(spec[k] if k in spec else spec[str(k)]) for k in values]
    return [str(s) for s in spec]


class FolderSource(FileSource):
    """Class-index source over a user's folder (see the module docstring for the layout).

    Args:
        split: selects the list file ``<root>/<split>.txt`` (or an entry of ``list_file``).
        root: dataset root.
        image_dir: image sub-directory.
        mask_dir: mask sub-directory (default: "masks", else "labels").
        classes: names by label value: a list, a .txt/.yaml path, or None (root/classes.*).
        background: label value of the background, or None for none.
        ignore_index: label value(s) mapped to 255 (ignore).
        folds: "all", a number k of PASCAL-style blocks, or a list of folds, each a list of
            class ids (1..C) or names.
        list_file: split list (path relative to root, absolute, a {split: path} mapping, or
            "all" for every image in ``image_dir``, each with its mask).
        min_pixels: per-class threshold (default: 2*32*32 scaled to each mask's area).
        stats_cache: optional pixel-count ``.npz`` (see :class:`FileSource`).
    """

    dataset_name = "folder"
    fold_scheme = "all"

    def __init__(
        self,
        split: str = "train",
        root: str | Path | None = None,
        image_dir: str = "images",
        mask_dir: str | None = None,
        classes: str | Sequence[str] | Mapping[int, str] | None = None,
        background: int | None = 0,
        ignore_index: int | Sequence[int] | None = None,
        folds: str | int | Sequence[Sequence[int | str]] = "all",
        list_file: str | Path | Mapping[str, str] | None = None,
        min_pixels: int | None = None,
        stats_cache: str | Path | None = None,
    ) -> None:
        root = require_root(root, self.dataset_name)
        require_dir(root / image_dir, "image", self.dataset_name, root)
        if mask_dir is None:
            mask_dir = next((d for d in ("masks", "labels") if (root / d).is_dir()), "masks")
        require_dir(root / mask_dir, "mask", self.dataset_name, root)
        names = load_class_names(classes, root)
        ignore = {IGNORE_INDEX}
        if ignore_index is not None:
            ignore |= {int(ignore_index)} if isinstance(ignore_index, int) else set(ignore_index)
        if background is not None and not 0 <= int(background) < len(names):
            raise DatasetError(f"background value {background} has no name in {names}")
        values = [v for v in range(len(names)) if v != background and v not in ignore]
        if not values:
            raise DatasetError(f"no classes left in {names} after background/ignore")
        lut = np.full(256, _UNKNOWN, dtype=np.uint8)
        for k, v in enumerate(values, start=1):
            lut[v] = k
        if background is not None:
            lut[int(background)] = 0
        lut[sorted(ignore)] = IGNORE_INDEX
        self._lut = lut
        self._num_names = len(names)
        self._known = lut != _UNKNOWN
        self.label_values = values  # label value of class k is label_values[k - 1]
        self.num_classes = len(values)
        self.class_names = ("background", *(names[v] for v in values))
        self.folds = parse_folds(folds, self.num_classes, self.class_names)

        chosen = split_option(list_file, split)
        if chosen == "all":
            lst = None
            entries = all_pairs(root / image_dir, root / mask_dir)
        else:
            lst = root / f"{split}.txt" if chosen is None else Path(chosen)
            if chosen is not None and not lst.is_absolute():
                lst = root / lst
            entries = read_list(
                lst, root, image_dir, mask_dir, self.dataset_name, image_exts=IMAGE_EXTENSIONS
            )
        self.split, self.root, self.list_file = split, root, lst
        super().__init__(
            [e[0] for e in entries],
            [e[1] for e in entries],
            [e[2] for e in entries],
            min_pixels=min_pixels,
            stats_cache=stats_cache,
        )

    def _read_mask(self, i: int) -> np.ndarray:
        raw = read_label(self.mask_paths[i])
        if not self._known[raw].all():
            bad = sorted({int(v) for v in np.unique(raw) if not self._known[v]})
            raise DatasetError(
                f"mask {self.mask_paths[i]} holds label values {bad[:10]} that are neither "
                f"named classes (`classes` names values 0..{self._num_names - 1}), the "
                "background nor ignore. Fix: add their names to `classes` or list them in "
                "`ignore_index`"
            )
        return self._lut[raw]

    def few_images_fix(self, classes: Sequence[int]) -> str:
        values = ", ".join(
            f"{self.label_values[c - 1]} ({self.class_names[c]!r})" for c in classes[:5]
        )
        where = self.list_file if self.list_file is not None else self.root / "images"
        fix = f"add images whose masks hold the label value(s) {values} to {where}"
        binary = self.scan_notices.get("no_class", [])
        if binary:
            fix += (
                f" ({len(binary)} mask(s) hold no class value at all, e.g. {binary[0]}: if they "
                "are 0/255 binary masks, store the class's label value instead of 255, which "
                "is ignore)"
            )
        return fix


def pair_dirs(
    image_dir: Path, mask_dir: Path
) -> tuple[list[tuple[str, Path, Path]], list[str], list[Path]]:
    """(stem, image, mask) of every image in ``image_dir`` (suffixes of IMAGE_EXTENSIONS in
    any case) with its ``<stem>.png`` mask (any case) in ``mask_dir``, in natural order; the
    problems (an image without its mask, a mask without its image, two images or masks of
    one stem; each naming the files) and the other files (neither image nor mask)."""
    images, masks = index_dir(image_dir), index_dir(mask_dir)
    same = image_dir.resolve() == mask_dir.resolve()
    img_exts = [e for e in IMAGE_EXTENSIONS if not (same and e == ".png")]
    problems, entries = [], []
    for stem in sorted(images, key=natural_key):
        found = [p for p in images[stem] if has_suffix(p, img_exts)]
        if len(found) > 1:
            problems.append(f"images {show_files([str(p) for p in sorted(found)])} share a name")
            continue
        if not found:
            continue
        mask = [p for p in masks.get(stem, ()) if has_suffix(p, (".png",))]
        if not mask:
            problems.append(f"image {found[0]} has no mask {mask_dir / stem}.png")
        elif len(mask) > 1:
            problems.append(f"masks {show_files([str(p) for p in sorted(mask)])} share a name")
        else:
            entries.append((stem, found[0], mask[0]))
    for stem in sorted(masks, key=natural_key):
        for p in masks[stem]:
            if not has_suffix(p, (".png",)):
                continue
            if not any(has_suffix(q, img_exts) for q in images.get(stem, ())):
                problems.append(f"mask {p} has no image {image_dir / stem}.jpg (or .jpeg/.png)")
    known = (*img_exts, ".png")
    other = [
        p for d in (images, masks) for ps in d.values() for p in ps if not has_suffix(p, known)
    ]
    return entries, problems, sorted(set(other))


def all_pairs(image_dir: Path, mask_dir: Path) -> list[tuple[str, Path, Path]]:
    """:func:`pair_dirs`'s pairs; DatasetError listing its problems, a warning naming the
    other files."""
    entries, problems, other = pair_dirs(image_dir, mask_dir)
    if problems:
        raise DatasetError(
            f"{len(problems)} problem(s) pairing {image_dir} with {mask_dir} (list_file=all: "
            "every image needs its <name>.png mask and every mask its image):"
            + show_lines(problems)
            + "\nFix: add the missing files or remove the unpaired ones"
        )
    if other:
        warnings.warn(
            f"{len(other)} file(s) in {image_dir} or {mask_dir} are neither images "
            f"({'/'.join(IMAGE_EXTENSIONS)}) nor masks (.png) and are not used: "
            f"{show_files([str(p) for p in other])}",
            UserWarning,
            stacklevel=3,
        )
    if not entries:
        raise DatasetError(f"no images in {image_dir} ({'/'.join(IMAGE_EXTENSIONS)}, any case)")
    return entries


register_source("folder")(FolderSource)
