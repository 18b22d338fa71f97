"""Shared machinery of the file-backed sources (PASCAL, COCO, FSS-1000, user folders).

- :func:`read_image` / :func:`read_label`: decode one file, or raise :class:`DatasetError`
  naming it and the fix;
- :func:`read_list`: per-split list files, either one image id per line or PFENet/BAM lines
  ``JPEGImages/x.jpg SegmentationClassAug/x.png`` (paths relative to the dataset root);
  every listed file must exist, nothing is skipped silently;
- :class:`FileSource`: a :class:`~cgmgm.data.episodes.ClassIndexSource` over (image, mask)
  files whose pixel statistics read only the masks, optionally from a cache written by
  ``python -m cgmgm.data.prepare`` (``lists/<split>_pixels.npz``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cgmgm.data.episodes import IGNORE_INDEX, ClassIndexSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "FileSource",
    "check_hint",
    "natural_key",
    "read_image",
    "read_label",
    "read_list",
    "require_dir",
    "require_root",
    "split_option",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG")


class DatasetError(ValueError):
    """Missing, unreadable or inconsistent dataset files; the message names them and the fix."""


def check_hint(dataset: str, root: str | Path) -> str:
    """The command that explains what a dataset root lacks and where to get it."""
    return f"run `python -m cgmgm.data.prepare check --dataset {dataset} --root {root}`"


def require_root(root: str | Path | None, dataset: str) -> Path:
    """``root`` as a Path; raises :class:`DatasetError` when unset or not a directory."""
    if root is None or str(root) == "":
        raise DatasetError(
            f"the {dataset} source needs a dataset root (dataset.root=/path/to/data); "
            f"{check_hint(dataset, '<DIR>')} to see the expected layout"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"{dataset} root {path} does not exist or is not a directory. Fix: point root at "
            f"the dataset directory; {check_hint(dataset, path)} for what it must contain"
        )
    return path


def require_dir(path: Path, what: str, dataset: str, root: Path) -> Path:
    """``path`` if it is a directory, else :class:`DatasetError` naming it and the fix."""
    if not path.is_dir():
        raise DatasetError(
            f"{what} directory {path} is missing. Fix: {check_hint(dataset, root)} "
            "(it lists what to download and how to build it)"
        )
    return path


def natural_key(name: str) -> list[Any]:
    """Sort key ordering ``2.jpg`` before ``10.jpg``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_image(path: str | Path) -> np.ndarray:
    """RGB image file -> uint8 [H, W, 3]; a missing or undecodable file raises DatasetError."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"cannot decode image {path} ({e}): the file is corrupt or truncated. Fix: "
            "re-extract it from the official archive (or remove it from the split list)"
        ) from e


def read_label(path: str | Path, binary_threshold: int | None = None) -> np.ndarray:
    """Label PNG -> uint8 [H, W].

    Class-index masks (``binary_threshold`` None) must be single-channel: palette ("P", the
    VOC format; the indices are returned, not the colours) or grayscale ("L", "I", "I;16"
    with values <= 255). With ``binary_threshold`` t, any mode is converted to grayscale and
    the result is 1 where gray > t, else 0 (FSS-1000 / DAVIS masks).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if binary_threshold is not None:
                gray = np.asarray(im.convert("L"))
                return (gray > binary_threshold).astype(np.uint8)
            mode = im.mode
            if mode in ("P", "L"):
                return np.array(im, dtype=np.uint8)
            if mode == "1":
                return np.array(im, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(im)
                if arr.size and int(arr.max()) > 255:
                    raise DatasetError(
                        f"label {path} has values up to {int(arr.max())}; class-index masks "
                        "must use 0..254 for classes and 255 for ignore"
                    )
                return arr.astype(np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"label file {path} does not exist") from None
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"cannot decode label {path} ({e}): the file is corrupt or truncated. Fix: "
            "rebuild it (python -m cgmgm.data.prepare) or re-extract it"
        ) from e
    raise DatasetError(
        f"label {path} is a {mode!r} image; a class-index mask must be single-channel "
        "(palette 'P' or grayscale 'L' PNG holding class ids, 255 = ignore). Fix: convert "
        "colour-coded labels to class indices first"
    )


def _resolve(root: Path, token: str) -> Path:
    p = Path(token)
    return p if p.is_absolute() else root / token.lstrip("/")


def _strip_ext(name: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def read_list(
    list_file: Path,
    root: Path,
    image_dir: str,
    mask_dir: str,
    dataset: str,
    image_exts: Sequence[str] = (".jpg",),
    mask_ext: str = ".png",
) -> list[tuple[str, Path, Path]]:
    """Entries ``(key, image path, mask path)`` of a split list, in file order.

    A line is either one id (``2007_000032``, optionally with an image extension): image
    ``root/image_dir/<id><ext>`` (first of ``image_exts`` that exists) and mask
    ``root/mask_dir/<id><mask_ext>``; or two paths ``image mask`` relative to ``root``
    (absolute paths are used as they are). Blank lines and ``#`` comments are skipped.
    Duplicate ids, malformed lines or listed files that do not exist raise DatasetError.
    """
    if not list_file.is_file():
        raise DatasetError(
            f"split list {list_file} does not exist. Fix: "
            + (
                f"build the lists with `python -m cgmgm.data.prepare {dataset} ...` or "
                if dataset in ("pascal", "coco")
                else "write it (one image name per line) or "
            )
            + "pass the list file explicitly (dataset.dataset_kwargs.list_file=...); "
            + check_hint(dataset, root)
        )
    entries: list[tuple[str, Path, Path]] = []
    seen: dict[str, int] = {}
    missing: list[str] = []
    for n, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        if len(tokens) == 1:
            key = _strip_ext(Path(tokens[0]).name)
            img = None
            for ext in image_exts:
                cand = root / image_dir / f"{key}{ext}"
                if cand.is_file():
                    img = cand
                    break
            if img is None:
                img = root / image_dir / f"{key}{image_exts[0]}"
            mask = root / mask_dir / f"{key}{mask_ext}"
        elif len(tokens) == 2:
            img, mask = _resolve(root, tokens[0]), _resolve(root, tokens[1])
            key = _strip_ext(img.name)
        else:
            raise DatasetError(
                f"{list_file}:{n}: expected an image id or 'image_path mask_path', got {raw!r}"
            )
        if key in seen:
            raise DatasetError(
                f"{list_file}:{n}: image {key!r} is listed twice (first on line {seen[key]}); "
                "remove the duplicate so every image counts once"
            )
        seen[key] = n
        for p in (img, mask):
            if not p.is_file():
                missing.append(str(p))
        entries.append((key, img, mask))
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(
            f"{len(missing)} file(s) named in {list_file} do not exist:\n  {shown}{more}\n"
            f"Fix: {check_hint(dataset, root)}; lists with absolute paths from another "
            "machine (e.g. PFENet's val_fixed.txt) must be rewritten relative to the root"
        )
    if not entries:
        raise DatasetError(f"split list {list_file} names no images")
    return entries


class FileSource(ClassIndexSource):
    """Class-index source over image files; subclasses fill the entries and ``_read_mask``.

    Args:
        keys: one id per image (used by the pixel-count cache and in messages).
        image_paths: image file of each entry.
        mask_paths: mask file of each entry (None for masks built from annotations).
        min_pixels, image_size: see :class:`~cgmgm.data.episodes.ClassIndexSource`.
        stats_cache: ``.npz`` of per-image class pixel counts written by
            ``python -m cgmgm.data.prepare`` (or :meth:`save_stats`); loaded only if its ids
            equal ``keys`` and its class count matches (prepare rebuilds it with the masks;
            delete it after editing masks by hand), otherwise a warning says why it is
            ignored and counts are computed from the masks. None: no cache.
    """

    dataset_name = "folder"

    def __init__(
        self,
        keys: Sequence[str],
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path] | None = None,
        min_pixels: int | None = None,
        image_size: tuple[int, int] | None = None,
        stats_cache: str | Path | None = None,
    ) -> None:
        super().__init__(min_pixels=min_pixels, image_size=image_size)
        self.keys = [str(k) for k in keys]
        self.image_paths = [Path(p) for p in image_paths]
        self.mask_paths = None if mask_paths is None else [Path(p) for p in mask_paths]
        if len(self.image_paths) != len(self.keys) or (
            self.mask_paths is not None and len(self.mask_paths) != len(self.keys)
        ):
            raise ValueError("keys, image_paths and mask_paths must have equal lengths")
        if stats_cache is not None and Path(stats_cache).is_file():
            self._load_stats(Path(stats_cache))

    def __len__(self) -> int:
        return len(self.keys)

    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image, read from the file headers (no decoding)."""
        sizes = []
        for path in self.image_paths:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except FileNotFoundError:
                raise DatasetError(f"image file {path} does not exist") from None
            except (OSError, SyntaxError, ValueError) as e:
                raise DatasetError(f"cannot read the header of image {path} ({e})") from e
            sizes.append((h, w))
        return sizes

    def _mask_name(self, i: int) -> str:
        return str(self.mask_paths[i]) if self.mask_paths is not None else f"mask of {self.keys[i]}"

    def _read_mask(self, i: int) -> np.ndarray:
        """Class-index mask uint8 [H, W] of entry i (0 bg, 1..C classes, 255 ignore)."""
        raise NotImplementedError

    def load_mask(self, i: int) -> np.ndarray:
        return self._read_mask(self._check_index(i))

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3] and class-index mask uint8 [H, W] (255 = ignore)."""
        i = self._check_index(i)
        image = read_image(self.image_paths[i])
        mask = self._read_mask(i)
        if image.shape[:2] != mask.shape[:2]:
            raise DatasetError(
                f"mask {self._mask_name(i)} is {mask.shape[0]}x{mask.shape[1]} but image "
                f"{self.image_paths[i]} is {image.shape[0]}x{image.shape[1]} (HxW); a mask "
                "must match its image pixel for pixel. Fix: rebuild or re-extract the pair"
            )
        return image, mask

    def check_labels(self, mask: np.ndarray, i: int, extra: Iterable[int] = ()) -> np.ndarray:
        """``mask`` if its values are in 0..num_classes, 255 or ``extra``; else DatasetError."""
        values = np.unique(mask)
        bad = [int(v) for v in values if v > self.num_classes and v != IGNORE_INDEX]
        bad = [v for v in bad if v not in set(extra)]
        if bad:
            raise DatasetError(
                f"mask {self._mask_name(i)} holds values {bad[:10]} outside the classes "
                f"0..{self.num_classes} and 255 (ignore); is it a colour-coded label, or are "
                "ignore values (e.g. 'unlabelled') not declared?"
            )
        return mask

    # ------------------------------------------------------------------ pixel-count cache

    def compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Class pixel counts of every image -> (counts [N, C+1] int64, shapes [N, 2])."""
        counts = np.zeros((len(self), self.num_classes + 1), dtype=np.int64)
        shapes = np.zeros((len(self), 2), dtype=np.int64)
        for i in range(len(self)):
            counts[i] = self.class_pixel_counts(i)
            mask_shape = self._shapes.get(i)
            if mask_shape is None:
                mask_shape = self.load_mask(i).shape[:2]
            shapes[i] = mask_shape
        return counts, shapes

    @property
    def _shapes(self) -> dict[int, tuple[int, int]]:
        if not hasattr(self, "_shape_cache"):
            self._shape_cache: dict[int, tuple[int, int]] = {}
        return self._shape_cache

    def _stats(self, i: int) -> tuple[np.ndarray, int]:
        i = self._check_index(i)
        stats = self._counts.get(i)
        if stats is None:
            mask = self.load_mask(i)
            self._shapes[i] = tuple(mask.shape[:2])
            counts = np.bincount(np.asarray(mask).ravel(), minlength=256)[: self.num_classes + 1]
            stats = self._counts[i] = (counts, self.min_pixels_for(mask.shape))
        return stats

    def save_stats(self, path: str | Path) -> Path:
        """Write the pixel-count cache (``keys``, ``counts`` [N, C+1], ``shapes`` [N, 2])."""
        counts, shapes = self.compute_stats()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            keys=np.asarray(self.keys),
            counts=counts.astype(np.int64),
            shapes=shapes.astype(np.int64),
            num_classes=np.int64(self.num_classes),
        )
        return path

    def _load_stats(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            keys, counts, shapes = list(z["keys"].tolist()), z["counts"], z["shapes"]
            n_cls = int(z["num_classes"])
        if keys != self.keys or n_cls != self.num_classes or counts.shape[1] != n_cls + 1:
            warnings.warn(
                f"ignoring pixel-count cache {path}: it was built for a different image list "
                f"or class count ({len(keys)} images, {n_cls} classes vs {len(self.keys)}, "
                f"{self.num_classes}); counts are recomputed from the masks. Delete or "
                "rebuild it with python -m cgmgm.data.prepare",
                stacklevel=3,
            )
            return
        for i, (c, s) in enumerate(zip(counts, shapes, strict=True)):
            self._shapes[i] = (int(s[0]), int(s[1]))
            self._counts[i] = (c.astype(np.int64), self.min_pixels_for(tuple(int(x) for x in s)))


def split_option(value: Any, split: str) -> Any:
    """``value[split]`` when ``value`` is a mapping keyed by split, else ``value``."""
    if isinstance(value, Mapping):
        if split in value:
            return value[split]
        if split == "test" and "val" in value:
            return value["val"]
        raise DatasetError(f"no entry for split {split!r} in {dict(value)}")
    return value
