"""Shared machinery of the file-backed sources (PASCAL, COCO, FSS-1000, user folders).

- :func:`read_image` / :func:`read_label` / :func:`read_gray`: decode one file, or raise
  :class:`DatasetError` naming it and the fix; :func:`read_header`: an image's size and EXIF
  orientation from its header, with a cheap check that its data is complete;
- :func:`read_list`: per-split list files, either one image id per line or PFENet/BAM lines
  ``JPEGImages/x.jpg SegmentationClassAug/x.png`` (paths relative to the dataset root);
  every listed file must exist, nothing is skipped silently; suffixes match in any case
  (``x.JPG``, ``x.jpeg``);
- :class:`FileSource`: a :class:`~cgmgm.data.episodes.ClassIndexSource` over (image, mask)
  files whose pixel statistics read only the masks, optionally from a cache written by
  ``python -m cgmgm.data.prepare`` (``lists/<split>_pixels.npz``). Without a cache the
  first statistic read checks every file at once (:meth:`FileSource.validate`): each mask
  is decoded (its pixel counts are kept) and each image header read, and whatever does not
  fit is reported together, naming the files, before any episode is drawn;
- :func:`parse_folds`: class folds as "all", PASCAL-style blocks or user lists.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cgmgm.constants import IGNORE_INDEX
from cgmgm.data.episodes import ClassIndexSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "FileSource",
    "ScanReport",
    "block_folds",
    "check_hint",
    "has_suffix",
    "index_dir",
    "natural_key",
    "parse_folds",
    "pick_file",
    "read_gray",
    "read_header",
    "read_image",
    "read_label",
    "read_list",
    "require_dir",
    "require_root",
    "show_files",
    "split_option",
]

# Image suffixes the sources accept, compared in lower case (x.JPG, x.Jpeg and x.png all count).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# What an EXIF orientation tag (0x0112) asks a viewer to do before showing the stored pixels.
_ORIENTATION = {
    2: "mirror",
    3: "rotate 180 degrees",
    4: "flip upside down",
    5: "transpose",
    6: "rotate 90 degrees clockwise",
    7: "transverse",
    8: "rotate 90 degrees anticlockwise",
}
# The bytes that end a complete file of these formats (JPEG EOI marker, PNG IEND chunk).
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_SHOWN = 10  # files named in one message


class DatasetError(ValueError):
    """Missing, unreadable or inconsistent dataset files; the message names them and the fix."""


def check_hint(dataset: str, root: str | Path) -> str:
    """The command that explains what a dataset root lacks and where to get it."""
    return f"run `python -m cgmgm.data.prepare check --dataset {dataset} --root {root}`"


def show_files(items: Sequence[Any], limit: int = _SHOWN) -> str:
    """``a, b, c`` for a short list; the first ``limit`` and "... and N more" otherwise."""
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def show_lines(items: Sequence[Any], limit: int = _SHOWN) -> str:
    """One ``"\n  - item"`` line per item for the first ``limit``, then "... and N more"."""
    lines = "".join(f"\n  - {x}" for x in items[:limit])
    return lines + (f"\n  ... and {len(items) - limit} more" if len(items) > limit else "")


def has_suffix(path: str | Path, suffixes: Iterable[str]) -> bool:
    """True when ``path`` ends in one of ``suffixes``, compared in lower case."""
    return Path(path).suffix.lower() in {s.lower() for s in suffixes}


def index_dir(directory: Path) -> dict[str, list[Path]]:
    """The visible regular files of ``directory`` by stem (``{"a": [a.jpg, a.PNG]}``);
    empty when the directory does not exist."""
    out: dict[str, list[Path]] = {}
    if not directory.is_dir():
        return out
    with os.scandir(directory) as entries:
        for e in entries:
            if not e.name.startswith(".") and e.is_file():
                p = Path(e.path)
                out.setdefault(p.stem, []).append(p)
    return out


def pick_file(
    index: Mapping[str, Sequence[Path]], stem: str, suffixes: Sequence[str], what: str
) -> Path | None:
    """The one file of ``index`` named ``stem`` + a suffix of ``suffixes`` (any case); None if
    there is none; DatasetError when several match (which one is meant is ambiguous)."""
    found = sorted(p for p in index.get(stem, ()) if has_suffix(p, suffixes))
    if len(found) > 1:
        raise DatasetError(
            f"{what} {stem!r} is ambiguous: {show_files([str(p) for p in found])} all match. "
            "Fix: keep one of them (rename or remove the others)"
        )
    return found[0] if found else None


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


def _undecodable(path: Path, e: BaseException) -> DatasetError:
    return DatasetError(
        f"cannot decode image {path} ({e}): the file is corrupt or truncated. Fix: "
        "re-extract it from the official archive (or remove it from the split list)"
    )


def read_image(path: str | Path) -> np.ndarray:
    """RGB image file -> uint8 [H, W, 3] (stored pixels; an EXIF orientation tag is not
    applied); a missing or undecodable file raises DatasetError."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _undecodable(path, e) from e


def _ends_with(path: Path, marker: bytes, tail: int = 256) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - tail))
        return marker in fh.read()


def read_header(path: str | Path) -> tuple[int, int, int]:
    """(H, W, EXIF orientation) of an image, from its header (no decoding).

    A JPEG or PNG whose last bytes lack its end marker (JPEG EOI, PNG IEND) is decoded once
    to tell a truncated file (DatasetError) from one with trailing data (fine). Orientation
    is the EXIF tag of JPEGs (1 = as stored; other formats: 1).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = 1
            if im.format in ("JPEG", "MPO"):
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            marker = _END_MARKERS.get(im.format or "")
            if marker is not None and not _ends_with(path, marker):
                im.load()  # raises on a truncated file
    except FileNotFoundError:
        raise DatasetError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _undecodable(path, e) from e
    return h, w, orientation


def read_gray(path: str | Path) -> np.ndarray:
    """Any mask image -> uint8 [H, W] gray values (RGB and palette images converted)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"label file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"cannot decode label {path} ({e}): the file is corrupt or truncated. Fix: "
            "rebuild it or re-extract it"
        ) from e


def value_set(arr: np.ndarray, limit: int = 8) -> str:
    """``{0, 1}``: the distinct values of a uint8 array (the first ``limit`` and a count)."""
    values = np.flatnonzero(np.bincount(np.asarray(arr, dtype=np.uint8).ravel(), minlength=256))
    shown = ", ".join(str(int(v)) for v in values[:limit])
    more = f", ... ({len(values)} values)" if len(values) > limit else ""
    return "{" + shown + more + "}"


def read_label(path: str | Path, binary_threshold: int | None = None) -> np.ndarray:
    """Label PNG -> uint8 [H, W].

    Class-index masks (``binary_threshold`` None) must be single-channel: palette ("P", the
    VOC format; the indices are returned, not the colours) or grayscale ("L", "I", "I;16"
    with values <= 255). With ``binary_threshold`` t, any mode is converted to grayscale and
    the result is 1 where gray > t, else 0 (FSS-1000 / DAVIS masks).
    """
    path = Path(path)
    if binary_threshold is not None:
        return (read_gray(path) > binary_threshold).astype(np.uint8)
    try:
        with Image.open(path) as im:
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
    """``x.JPG`` -> ``x``: drops an image suffix of any case (other names are kept whole)."""
    return Path(name).stem if has_suffix(name, IMAGE_EXTENSIONS) else name


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
    ``root/image_dir/<id><ext>`` (the one file with a suffix of ``image_exts``, compared in
    any case: ``.jpg`` finds ``x.JPG``; two candidates are an error) and mask
    ``root/mask_dir/<id><mask_ext>`` (any case); or two paths ``image mask`` relative to
    ``root`` (absolute paths are used as they are). Blank lines and ``#`` comments are
    skipped. Duplicate ids, malformed lines or listed files that do not exist raise
    DatasetError.
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
    if (root / image_dir).resolve() == (root / mask_dir).resolve():
        image_exts = [e for e in image_exts if e.lower() != mask_ext.lower()]
    indexes: dict[str, dict[str, list[Path]]] = {}

    def index(d: str) -> dict[str, list[Path]]:
        if d not in indexes:
            indexes[d] = index_dir(root / d)
        return indexes[d]

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
            img = pick_file(index(image_dir), key, image_exts, f"{list_file}:{n}: image")
            mask = pick_file(index(mask_dir), key, (mask_ext,), f"{list_file}:{n}: mask")
            img = img or root / image_dir / f"{key}{image_exts[0]}"
            mask = mask or root / mask_dir / f"{key}{mask_ext}"
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


# Start-up notices: kind -> (what the masks show, what it means). One warning per kind.
_NOTICES = {
    "no_class": (
        "hold no class pixel (only background and 255 = ignore)",
        "their images are never drawn in an episode",
    ),
    "no_background": (
        "have no background pixel (one class covers every labelled pixel)",
        "a query drawn from them has no background to tell apart and scores 0 (is the mask "
        "inverted, or the object the whole image?)",
    ),
    "all_ignore": (
        "are entirely 255 (ignore)",
        "nothing in their images is learnt or scored",
    ),
    "exif": (
        "belong to images with an EXIF orientation tag that the loader does not apply",
        "the stored pixels are used (the mask sizes agree with them); if a mask was drawn on "
        "the rotated view, rotate it to the stored pixels",
    ),
}


@dataclass
class ScanReport:
    """What :meth:`FileSource.scan` found: ``problems`` (each a full message naming its file
    and the fix; any one stops a run) and ``notices`` (kind -> files; warnings, counted)."""

    where: str
    problems: list[str] = field(default_factory=list)
    notices: dict[str, list[str]] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)  # kind -> source-specific advice

    def notice_messages(self) -> list[str]:
        out = []
        for kind, files in self.notices.items():
            what, meaning = _NOTICES[kind]
            hint = f" {self.hints[kind]}" if kind in self.hints else ""
            out.append(
                f"{self.where}: {len(files)} mask(s) {what}; {meaning}.{hint} Files: "
                f"{show_files(files)}"
            )
        return out

    def error_text(self) -> str:
        return (
            f"{self.where}: {len(self.problems)} problem(s) found at start-up (every mask and "
            f"image header is read before the first episode):{show_lines(self.problems)}"
        )


def size_mismatch(
    mask_name: str,
    mask_hw: tuple[int, int],
    image: Path,
    image_hw: tuple[int, int],
    orientation: int = 1,
) -> str:
    """The message of a mask whose size differs from its image's, EXIF rotation included."""
    (mh, mw), (ih, iw) = mask_hw, image_hw
    msg = (
        f"mask {mask_name} is {mh}x{mw} but image {image} is {ih}x{iw} (HxW); a mask must "
        "match its image pixel for pixel."
    )
    if orientation in (5, 6, 7, 8) and (mh, mw) == (iw, ih):
        return msg + (
            f" The image's EXIF orientation tag ({orientation}: "
            f"{_ORIENTATION[orientation]}) shows it as {iw}x{ih}, which the mask matches: the "
            "mask was drawn on the rotated view, but the loader reads the stored pixels (EXIF "
            "is not applied). Fix: store the image upright (e.g. "
            "PIL.ImageOps.exif_transpose(im).save(path)) or rotate the mask back"
        )
    return msg + " Fix: rebuild or re-extract the pair"


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

    Without a cache, the first pixel statistic asked for runs :meth:`validate` over every
    image (what building episodes does anyway): a problem in any file stops the run there,
    naming all of them, instead of when its episode is drawn.
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
        self._image_hw: list[tuple[int, int]] | None = None  # from validate()
        self.scan_notices: dict[str, list[str]] = {}  # what validate() warned about
        self._validated = False
        if stats_cache is not None and Path(stats_cache).is_file():
            self._load_stats(Path(stats_cache))

    def __len__(self) -> int:
        return len(self.keys)

    def _where(self) -> str:
        root = getattr(self, "root", None)
        return f"{self.dataset_name} data" + (f" at {root}" if root is not None else "")

    def image_sizes(self) -> list[tuple[int, int]]:
        """(H, W) of every image, read from the file headers (no decoding). Without a
        pixel-count cache this runs :meth:`validate` (which reads them with the masks)."""
        if self._image_hw is None and not self._counts:
            self.validate()
        if self._image_hw is not None:
            return list(self._image_hw)
        return [read_header(p)[:2] for p in self.image_paths]

    def image_key(self, i: int) -> str:
        """What entry i's pixels depend on: its image file's absolute path, size and
        modification time (keys the frozen-feature cache, :mod:`cgmgm.features`: an edited or
        replaced file is a new key)."""
        path = self.image_paths[self._check_index(i)]
        st = path.stat()
        return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

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
            orientation = read_header(self.image_paths[i])[2]
            raise DatasetError(
                size_mismatch(
                    self._mask_name(i),
                    mask.shape[:2],
                    self.image_paths[i],
                    image.shape[:2],
                    orientation,
                )
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

    # ------------------------------------------------------------------ start-up checks

    def notice_hints(self) -> dict[str, str]:
        """Source-specific advice appended to the start-up warnings, by notice kind."""
        return {
            "no_class": "A 0/255 binary mask reads as background + ignore in a class-index "
            "source: store each pixel's class value instead (1 = the first class)."
        }

    def few_images_fix(self, classes: Sequence[int]) -> str:
        """How to give ``classes`` more usable images (the episodes' "too few" error)."""
        lst = getattr(self, "list_file", None)
        where = f" to the {getattr(self, 'split', '')} list {lst}" if lst is not None else ""
        return f"add images holding these classes{where}"

    def scan(self) -> ScanReport:
        """Read every mask (keeping its pixel counts) and every image header; report what
        does not fit: unreadable or truncated files, masks whose values the source cannot
        read, mask and image sizes that differ (saying when the image's EXIF rotation
        explains it), and, as notices, masks with no class pixel, no background pixel, only
        ignore, or images with an EXIF orientation the loader does not apply."""
        report = ScanReport(self._where(), hints=self.notice_hints())
        sizes: list[tuple[int, int]] = []
        for i in range(len(self)):
            try:
                h, w, orientation = read_header(self.image_paths[i])
            except DatasetError as e:
                report.problems.append(str(e))
                h, w, orientation = -1, -1, 1
            sizes.append((h, w))
            try:
                mask = self.load_mask(i)
            except DatasetError as e:
                report.problems.append(str(e))
                continue
            mh, mw = mask.shape[:2]
            self._shapes[i] = (mh, mw)
            hist = np.bincount(np.asarray(mask).ravel(), minlength=256)
            counts = hist[: self.num_classes + 1]
            self._counts[i] = (counts, self.min_pixels_for(mask.shape))
            if h >= 0 and (mh, mw) != (h, w):
                report.problems.append(
                    size_mismatch(
                        self._mask_name(i), (mh, mw), self.image_paths[i], (h, w), orientation
                    )
                )
                continue
            name = self._mask_name(i)
            labelled = int(counts.sum())
            kind = None
            if labelled == 0:
                kind = "all_ignore" if hist[IGNORE_INDEX] else "no_class"
            elif counts[1:].sum() == 0:
                kind = "no_class"
            elif counts[0] == 0 and int(counts[1:].max()) == labelled:
                kind = "no_background"
            if kind is not None:
                report.notices.setdefault(kind, []).append(name)
            if orientation in (2, 3, 4) or (orientation in (5, 6, 7, 8) and h == w):
                report.notices.setdefault("exif", []).append(
                    f"{self.image_paths[i]} ({orientation}: {_ORIENTATION[orientation]})"
                )
        if not report.problems:
            self._image_hw = sizes
        return report

    def validate(self) -> None:
        """:meth:`scan` once: DatasetError listing every problem, one warning per notice kind.

        Called by the first pixel statistic read without a cache."""
        if self._validated:
            return
        report = self.scan()
        if report.problems:
            self._counts.clear()
            raise DatasetError(report.error_text())
        for msg in report.notice_messages():
            warnings.warn(msg, UserWarning, stacklevel=3)
        self.scan_notices = report.notices
        self._validated = True

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
            self.validate()  # reads every mask once, keeping the counts
            stats = self._counts.get(i)
        if stats is None:  # counts dropped after validation (not expected)
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


def block_folds(num_classes: int, num_folds: int) -> list[list[int]]:
    """PASCAL-style folds: classes 1..C in ``num_folds`` consecutive blocks (sizes differ by
    at most one, the larger first; C < num_folds gives C folds of one class)."""
    k = max(1, min(int(num_folds), int(num_classes)))
    return [[int(c) + 1 for c in block] for block in np.array_split(np.arange(num_classes), k)]


def parse_folds(spec: Any, num_classes: int, class_names: Sequence[str]) -> list[list[int]]:
    """Folds (lists of class ids 1..C) from "all" (one fold holding every class), an int k
    (:func:`block_folds`: k blocks of the class list in id order, deterministic), or a list
    of folds, each a list of class ids or names (``class_names[c]`` names id c)."""
    if isinstance(spec, str) and spec.isdigit():
        spec = int(spec)
    if isinstance(spec, str):
        if spec != "all":
            raise DatasetError(
                f"folds must be 'all', a number of folds or a list of class lists, got {spec!r}"
            )
        return [list(range(1, num_classes + 1))]
    if isinstance(spec, int):
        if spec < 1:
            raise DatasetError(f"folds must be >= 1 when a number, got {spec}")
        return block_folds(num_classes, spec)
    out = []
    for f in spec:
        fold = []
        for c in f:
            if isinstance(c, str) and not c.isdigit():
                if c not in class_names[1:]:
                    raise DatasetError(f"fold class {c!r} is not one of {list(class_names[1:])}")
                c = list(class_names).index(c)
            c = int(c)
            if not 1 <= c <= num_classes:
                raise DatasetError(f"fold class id {c} is outside 1..{num_classes}")
            fold.append(c)
        out.append(sorted(set(fold)))
    if not out:
        raise DatasetError("folds is an empty list")
    return out
