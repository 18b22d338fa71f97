"""Users' own data: an image folder, a class-index mask folder, class names, folds.

Layout under ``root``::

    images/<name>.jpg|png         (image_dir)
    masks/<name>.png  or labels/  (mask_dir; single-channel class-index PNGs)
    classes.txt | classes.yaml    (optional here when ``classes`` is passed)
    train.txt, val.txt, test.txt  (one image name per line, or "image mask" paths)

``classes[v]`` names the label *value* v. ``background`` is the value meaning background
(None: every non-ignored value is a class, e.g. CamVid's "sky"), ``ignore_index`` the values
mapped to 255 (255 always is). The remaining values become classes 1..C in increasing value
order. Folds: "all" (one fold, every class) or a list of lists of class ids (1..C after the
mapping) or names. CamVid::

    FolderSource("test", root="camvid", classes=[...12 names...], background=None,
                 ignore_index=[11], mask_dir="labels")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cgmgm.data.datamodule import register_source
from cgmgm.data.episodes import IGNORE_INDEX
from cgmgm.data.files import (
    IMAGE_EXTENSIONS,
    DatasetError,
    FileSource,
    check_hint,
    natural_key,
    read_label,
    read_list,
    require_dir,
    require_root,
    split_option,
)

__all__ = ["FolderSource", "load_class_names"]

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
        folds: "all" or a list of folds, each a list of class ids (1..C) or names.
        list_file: split list (path relative to root, absolute, a {split: path} mapping, or
            "all" for every image in ``image_dir``).
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
        folds: str | Sequence[Sequence[int | str]] = "all",
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
        self.folds = self._parse_folds(folds)

        chosen = split_option(list_file, split)
        if chosen == "all":
            files = sorted(
                (p for p in (root / image_dir).iterdir() if p.suffix in IMAGE_EXTENSIONS),
                key=lambda p: natural_key(p.name),
            )
            lst = root / f"{split}.txt"
            entries = [(p.stem, p, root / mask_dir / f"{p.stem}.png") for p in files]
            missing = [str(e[2]) for e in entries if not e[2].is_file()]
            if missing:
                raise DatasetError(f"{len(missing)} mask(s) missing, e.g. {missing[0]}")
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

    def _parse_folds(self, folds: Any) -> list[list[int]]:
        if isinstance(folds, str):
            if folds != "all":
                raise DatasetError(f"folds must be 'all' or a list of class lists, got {folds!r}")
            return [list(range(1, self.num_classes + 1))]
        out = []
        for f in folds:
            fold = []
            for c in f:
                if isinstance(c, str) and not c.isdigit():
                    if c not in self.class_names[1:]:
                        raise DatasetError(f"fold class {c!r} is not one of {self.class_names[1:]}")
                    c = self.class_names.index(c)
                c = int(c)
                if not 1 <= c <= self.num_classes:
                    raise DatasetError(f"fold class id {c} is outside 1..{self.num_classes}")
                fold.append(c)
            out.append(sorted(set(fold)))
        if not out:
            raise DatasetError("folds is an empty list")
        return out

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


register_source("folder")(FolderSource)
