"""Build PASCAL-5i / COCO-20i masks and lists from the official archives; check dataset roots.

    python -m cgmgm.data.prepare pascal --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz \\
        --sbd-list train_noval.txt --out data/VOC2012
    python -m cgmgm.data.prepare coco --root data/COCO2014 [--write-masks]
    python -m cgmgm.data.prepare check --dataset pascal --root data/VOC2012

``pascal`` writes, deterministically (sorted ids, no randomness):

- ``SegmentationClassAug/<id>.png``: palette PNGs (VOC palette) holding class indices; the
  VOC2012 ``SegmentationClass`` mask is used when it exists (its 255 object borders kept),
  else SBD's ``dataset/cls/<id>.mat`` (``GTcls.Segmentation``);
- ``lists/train.txt``: VOC2012 ``train`` (1464) merged with SBD's ``train_noval.txt``
  (5623; PFENet README), duplicates removed: PFENet's 5953 images; ``lists/val.txt``: VOC2012
  ``val`` (1449). Lines read ``JPEGImages/<id>.jpg SegmentationClassAug/<id>.png``.
  Without ``--sbd-list`` the SBD part is SBD ``train.txt`` minus VOC2012 val, which does not
  give 5953, and a warning says so;
- ``lists/fold<i>/{train,val}.txt`` and ``..._classes.json``: per-fold lists under the
  2*32*32-pixel rule; train = images with a base class of >= 2048 pixels and no novel-class
  pixel (BAM's ``filter_intersection``), val = images with a novel class of >= 2048 pixels;
- ``lists/{train,val}_pixels.npz``: per-image class pixel counts, read by the sources.

The counts compared with the published ones are the numbers of images in ``lists/train.txt``
and ``lists/val.txt`` (PFENet README: 5953 / 1449) and, for COCO, the numbers of images
with at least one instance annotation (PFENet README: 82081 train / 40137 val).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cgmgm.constants import IGNORE_INDEX, MIN_PIXELS
from cgmgm.data.episodes import novel_classes

__all__ = ["build_fold_lists", "check_dataset", "main", "prepare_coco", "prepare_pascal"]

URLS = {
    "voc": "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "sbd": "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz",
    "sbd_list": "http://home.bharathh.info/pubs/codes/SBD/train_noval.txt",
    "coco_train": "http://images.cocodataset.org/zips/train2014.zip",
    "coco_val": "http://images.cocodataset.org/zips/val2014.zip",
    "coco_ann": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
    "fss1000": "https://github.com/HKUSTCV/FSS-1000 (download link in its README)",
    "fss_splits": "https://github.com/juhongm999/hsnet/tree/main/data/splits/fss",
}
# PFENet README ("We have uploaded the lists we use in our paper").
PUBLISHED = {
    ("pascal", "train"): 5953,
    ("pascal", "val"): 1449,
    ("coco", "train"): 82081,
    ("coco", "val"): 40137,
}


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _compare(dataset: str, split: str, n: int, what: str) -> bool:
    """Print the count check; True when it matches the published count."""
    ref = PUBLISHED[(dataset, split)]
    if n == ref:
        _say(f"  ok       {what}: {n} (published: {ref})")
        return True
    _say(f"  WARNING  {what}: {n}, but the published count is {ref} (PFENet README).")
    return False


# ---------------------------------------------------------------------- archives


def _find_dir(base: Path, candidates: Sequence[str], marker: Callable[[Path], bool]) -> Path | None:
    for c in candidates:
        p = base / c if c else base
        if p.is_dir() and marker(p):
            return p
    return None


def _extract(archive: Path, rules: dict[str, str], dest: Path) -> int:
    """Extract the regular files of ``archive`` whose path contains a key of ``rules``.

    A key ending in "/" is a directory: what follows it lands under ``dest/rules[key]``; any
    other key is one file, written as ``dest/rules[key]``. Links and ".." are never
    extracted. Returns the number of files written.
    """
    n = 0
    with tarfile.open(archive) as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = m.name.replace("\\", "/")
            for src, dst in rules.items():
                k = name.find(src)
                if k < 0 or (k > 0 and name[k - 1] != "/"):
                    continue
                rel = name[k + len(src) :]
                if src.endswith("/"):
                    if not rel or ".." in Path(rel).parts:
                        continue
                    out = dest / dst / rel
                elif rel:
                    continue
                else:
                    out = dest / dst
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as fh, open(out, "wb") as fo:
                    shutil.copyfileobj(fh, fo)
                n += 1
                break
    return n


def _locate_voc(voc: Path, out: Path) -> Path:
    """VOC2012 directory holding JPEGImages, SegmentationClass, ImageSets/Segmentation;
    a .tar is extracted into ``out`` first."""

    def marker(p: Path) -> bool:
        return (p / "JPEGImages").is_dir() and (p / "ImageSets" / "Segmentation").is_dir()

    if voc.is_file():
        _say(f"extracting VOC2012 from {voc} into {out} ...")
        n = _extract(
            voc,
            {
                "VOC2012/JPEGImages/": "JPEGImages",
                "VOC2012/SegmentationClass/": "SegmentationClass",
                "VOC2012/ImageSets/Segmentation/": "ImageSets/Segmentation",
            },
            out,
        )
        _say(f"  {n} files extracted")
        voc = out
    found = _find_dir(voc, ("", "VOC2012", "VOCdevkit/VOC2012"), marker)
    if found is None:
        raise SystemExit(
            f"error: no VOC2012 JPEGImages/ + ImageSets/Segmentation/ under {voc}. Download "
            f"{URLS['voc']} and pass the .tar or its extracted VOCdevkit/VOC2012 directory"
        )
    return found


def _locate_sbd(sbd: Path, out: Path) -> Path:
    """SBD ``dataset`` directory holding cls/*.mat, train.txt, val.txt (.tgz extracted)."""

    def marker(p: Path) -> bool:
        return (p / "cls").is_dir() and (p / "train.txt").is_file()

    if sbd.is_file():
        dest = out / "SBD"
        _say(f"extracting SBD from {sbd} into {dest} ...")
        n = _extract(
            sbd,
            {"dataset/cls/": "cls", "dataset/train.txt": "train.txt", "dataset/val.txt": "val.txt"},
            dest,
        )
        _say(f"  {n} files extracted")
        sbd = dest
    found = _find_dir(sbd, ("", "dataset", "benchmark_RELEASE/dataset"), marker)
    if found is None:
        raise SystemExit(
            f"error: no SBD dataset/cls/ + dataset/train.txt under {sbd}. Download {URLS['sbd']} "
            "and pass the .tgz or its extracted benchmark_RELEASE directory"
        )
    return found


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"error: id list {path} does not exist")
    ids = []
    for ln in path.read_text().splitlines():
        tok = ln.split("#", 1)[0].strip()
        if tok:
            ids.append(Path(tok.split()[0]).stem)
    return ids


def _sbd_mask(path: Path) -> np.ndarray:
    """SBD ``GTcls.Segmentation`` of a cls/<id>.mat file -> uint8 [H, W]."""
    from scipy.io import loadmat

    try:
        gt = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation, dtype=np.uint8)
    except (OSError, KeyError, AttributeError, ValueError) as e:
        raise SystemExit(
            f"error: cannot read SBD mask {path} ({e}); re-extract benchmark.tgz"
        ) from e


def _voc_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise SystemExit(f"error: {path} is a {im.mode!r} PNG, expected a VOC palette mask")
        return np.asarray(im, dtype=np.uint8)


def _save_palette_png(mask: np.ndarray, path: Path) -> None:
    from cgmgm.data.pascal import voc_palette

    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path, optimize=False)


def _pixel_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(mask.ravel(), minlength=256)[: num_classes + 1].astype(np.int64)


def _write_cache(path: Path, keys: list[str], counts: np.ndarray, shapes: np.ndarray, c: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        keys=np.asarray(keys),
        counts=counts.astype(np.int64),
        shapes=shapes.astype(np.int64),
        num_classes=np.int64(c),
    )


def build_fold_lists(
    keys: Sequence[str],
    counts: np.ndarray,
    num_classes: int,
    scheme: str,
    split: str,
    min_pixels: int = MIN_PIXELS,
    num_folds: int = 4,
) -> list[dict[str, object]]:
    """Per-fold image lists under the pixel rule.

    keys [N]; counts [N, C+1] class pixel counts. Train folds: images with a base class of
    >= ``min_pixels`` pixels and no novel-class pixel at all (BAM); val folds: images with a
    novel class of >= ``min_pixels``. Returns one dict per fold: ``novel``, ``images`` (keys
    in input order), ``classes`` ({class: [keys]}).
    """
    out = []
    big = counts[:, 1:] >= min_pixels  # [N, C]
    anyp = counts[:, 1:] > 0  # [N, C]
    for fold in range(num_folds):
        novel = novel_classes(num_classes, fold, num_folds, scheme)
        nidx = np.asarray(novel) - 1
        if split == "train":
            wanted = [c for c in range(1, num_classes + 1) if c not in set(novel)]
            keep = ~anyp[:, nidx].any(1)
        else:
            wanted = novel
            keep = np.ones(len(keys), dtype=bool)
        widx = np.asarray(wanted) - 1
        classes = {int(c): [keys[i] for i in np.flatnonzero(keep & big[:, c - 1])] for c in wanted}
        sel = keep & big[:, widx].any(1)
        out.append(
            {"novel": novel, "images": [keys[i] for i in np.flatnonzero(sel)], "classes": classes}
        )
    return out


def _write_fold_lists(
    lists: Path, split: str, folds: list[dict[str, object]], line: Callable[[str], str]
) -> None:
    for i, f in enumerate(folds):
        d = lists / f"fold{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.txt").write_text("".join(line(k) + "\n" for k in f["images"]))
        (d / f"{split}_classes.json").write_text(
            json.dumps({str(c): v for c, v in f["classes"].items()}, indent=0) + "\n"
        )
        per_class = " ".join(f"{c}:{len(v)}" for c, v in f["classes"].items())
        _say(f"  fold {i} {split}: {len(f['images'])} images; images per class {per_class}")


# ---------------------------------------------------------------------- pascal


def prepare_pascal(
    voc: Path,
    sbd: Path,
    out: Path | None = None,
    sbd_list: Path | None = None,
    copy_images: bool = False,
) -> dict[str, int]:
    """Build SegmentationClassAug masks and the PFENet / per-fold lists (see module doc).
    Returns {"train": n, "val": n, "mismatches": k}."""
    voc, sbd = Path(voc), Path(sbd)
    out = Path(out) if out is not None else (voc if voc.is_dir() else voc.parent / "VOC2012")
    out.mkdir(parents=True, exist_ok=True)
    voc_dir = _locate_voc(voc, out)
    sbd_dir = _locate_sbd(sbd, out)
    _say(f"VOC2012: {voc_dir}\nSBD:     {sbd_dir}\noutput:  {out}")

    seg_sets = voc_dir / "ImageSets" / "Segmentation"
    voc_train, voc_val = _read_ids(seg_sets / "train.txt"), _read_ids(seg_sets / "val.txt")
    val_set = set(voc_val)
    if sbd_list is not None:
        sbd_ids = _read_ids(Path(sbd_list))
        source = f"SBD list {sbd_list}"
    else:
        sbd_ids = [i for i in _read_ids(sbd_dir / "train.txt") if i not in val_set]
        source = "SBD train.txt minus VOC2012 val (no --sbd-list given)"
    train = sorted(set(voc_train) | set(sbd_ids))
    val = sorted(set(voc_val))
    leak = sorted(set(train) & val_set)
    _say(
        f"train = VOC2012 train ({len(voc_train)}) + {source} ({len(sbd_ids)}), "
        f"duplicates removed: {len(train)}; val = VOC2012 val: {len(val)}"
    )
    if leak:
        _say(f"  WARNING  {len(leak)} train image(s) are also val images, e.g. {leak[:3]}")

    img_dir = out / "JPEGImages"
    if img_dir.resolve() != (voc_dir / "JPEGImages").resolve():
        if img_dir.exists() or img_dir.is_symlink():
            pass  # keep what is there; every needed image is checked below
        elif copy_images:
            shutil.copytree(voc_dir / "JPEGImages", img_dir)
        else:
            img_dir.symlink_to((voc_dir / "JPEGImages").resolve(), target_is_directory=True)
    mask_dir = out / "SegmentationClassAug"
    mask_dir.mkdir(parents=True, exist_ok=True)

    all_ids = sorted(set(train) | set(val))
    counts = np.zeros((len(all_ids), 21), dtype=np.int64)
    shapes = np.zeros((len(all_ids), 2), dtype=np.int64)
    n_voc = n_sbd = 0
    problems: list[str] = []
    for k, i in enumerate(all_ids):
        img = img_dir / f"{i}.jpg"
        if not img.is_file():
            problems.append(f"image {img} is missing")
            continue
        voc_png = voc_dir / "SegmentationClass" / f"{i}.png"
        mat = sbd_dir / "cls" / f"{i}.mat"
        if voc_png.is_file():
            mask, n_voc = _voc_mask(voc_png), n_voc + 1
        elif mat.is_file():
            mask, n_sbd = _sbd_mask(mat), n_sbd + 1
        else:
            problems.append(f"no mask for {i}: neither {voc_png} nor {mat} exists")
            continue
        with Image.open(img) as im:
            w, h = im.size
        if mask.shape != (h, w):
            problems.append(f"mask of {i} is {mask.shape}, image {img} is {(h, w)}")
            continue
        bad = sorted(set(np.unique(mask).tolist()) - set(range(21)) - {IGNORE_INDEX})
        if bad:
            problems.append(f"mask of {i} holds values {bad} outside 0..20 and 255")
            continue
        _save_palette_png(mask, mask_dir / f"{i}.png")
        counts[k], shapes[k] = _pixel_counts(mask, 20), mask.shape
        if (k + 1) % 1000 == 0:
            _say(f"  {k + 1}/{len(all_ids)} masks")
    if problems:
        raise SystemExit(
            f"error: {len(problems)} problem(s), no lists written:\n  "
            + "\n  ".join(problems[:10])
            + ("\n  ..." if len(problems) > 10 else "")
        )
    _say(f"masks: {len(all_ids)} written ({n_voc} from VOC SegmentationClass, {n_sbd} from SBD)")

    lists = out / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    index = {i: k for k, i in enumerate(all_ids)}

    def line(i: str) -> str:
        return f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png"

    mismatches = 0
    _say("counts:")
    for split, ids in (("train", train), ("val", val)):
        (lists / f"{split}.txt").write_text("".join(line(i) + "\n" for i in ids))
        rows = [index[i] for i in ids]
        _write_cache(lists / f"{split}_pixels.npz", ids, counts[rows], shapes[rows], 20)
        mismatches += not _compare("pascal", split, len(ids), f"lists/{split}.txt")
    if mismatches and sbd_list is None:
        _say(
            "  The PFENet train list is VOC2012 train merged with SBD's train_noval.txt; get it "
            f"from {URLS['sbd_list']} and rerun with --sbd-list train_noval.txt"
        )
    for split, ids in (("train", train), ("val", val)):
        rows = [index[i] for i in ids]
        folds = build_fold_lists(ids, counts[rows], 20, "block", split)
        _write_fold_lists(lists, split, folds, line)
    _say(f"done: {out} (use dataset.root={out})")
    return {"train": len(train), "val": len(val), "mismatches": mismatches}


# ---------------------------------------------------------------------- coco


def prepare_coco(root: Path, write_masks: bool = False) -> dict[str, int]:
    """Lists, pixel-count caches, per-fold lists (and optionally PNG masks) for COCO 2014.
    Returns {"train": n, "val": n, "mismatches": k}."""
    from cgmgm.data.coco import COCO2014

    root = Path(root)
    lists = root / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    result = {"mismatches": 0}
    for split, coco_set in (("train", "train2014"), ("val", "val2014")):
        _say(f"{coco_set}: reading annotations ...")
        src = COCO2014(split, root=root, stats_cache=None)
        n_all = len(src.coco.imgs)
        _say(f"  {n_all} images, {len(src)} with >= 1 instance annotation")
        result["mismatches"] += not _compare("coco", split, len(src), f"annotated {coco_set}")
        result[split] = len(src)
        (lists / f"{coco_set}.txt").write_text("".join(p.name + "\n" for p in src.image_paths))
        n = len(src)
        counts = np.zeros((n, src.num_classes + 1), dtype=np.int64)
        shapes = np.zeros((n, 2), dtype=np.int64)
        mask_dir = root / "masks" / coco_set
        if write_masks:
            mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = src.load_mask(i)
            counts[i], shapes[i] = _pixel_counts(mask, src.num_classes), mask.shape
            if write_masks:
                Image.fromarray(mask, mode="L").save(mask_dir / f"{src.keys[i]}.png")
            if (i + 1) % 5000 == 0:
                _say(f"  {i + 1}/{n} masks")
        _write_cache(lists / f"{coco_set}_pixels.npz", src.keys, counts, shapes, src.num_classes)
        folds = build_fold_lists(src.keys, counts, src.num_classes, "interleaved", split)
        _write_fold_lists(lists, split, folds, lambda k, s=coco_set: f"{s}/{k}.jpg")
    _say(f"done: {root} (use dataset.root={root})")
    return result


# ---------------------------------------------------------------------- check


class _Report:
    """Prints ok / WARNING / MISSING lines; each distinct fix is printed once at the end."""

    def __init__(self) -> None:
        self.problems = 0
        self.fixes: list[str] = []

    def ok(self, msg: str) -> None:
        _say(f"  ok       {msg}")

    def warn(self, msg: str) -> None:
        _say(f"  WARNING  {msg}")

    def missing(self, msg: str, fix: str) -> None:
        self.problems += 1
        if fix not in self.fixes:
            self.fixes.append(fix)
        _say(f"  MISSING  {msg}  [fix {self.fixes.index(fix) + 1}]")

    def bad(self, msg: str) -> None:
        """A file that is present but unusable; ``msg`` names it and says how to fix it."""
        self.problems += 1
        _say(f"  BAD      {msg}")

    def summary(self) -> None:
        if self.problems == 0:
            _say("all present")
            return
        if not self.fixes:
            _say(f"{self.problems} problem(s) found; each BAD line says how to fix it.")
            return
        _say(f"{self.problems} problem(s) found. How to fix:")
        for k, fix in enumerate(self.fixes, start=1):
            _say(f"  [{k}] {fix}")


def _count(d: Path, pattern: str) -> int:
    return sum(1 for _ in d.glob(pattern))


def _check_pairs(rep: _Report, pairs: list[tuple[Path, Path]], what: str, fix: str) -> None:
    """Every pair present, readable (images not truncated) and of one size (EXIF noted)."""
    from cgmgm.data.files import DatasetError, read_header, size_mismatch

    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        rep.missing(f"{len(missing)} file(s) named by {what}, e.g. {missing[0]}", fix)
        return
    bad = []
    for img, mask in pairs:
        try:
            h, w, orientation = read_header(img)
            with Image.open(mask) as b:
                mw, mh = b.size
        except (DatasetError, OSError) as e:
            bad.append(f"{img} / {mask}: {e}")
            continue
        if (mh, mw) != (h, w):
            bad.append(size_mismatch(str(mask), (mh, mw), img, (h, w), orientation))
    if bad:
        rep.missing(f"{len(bad)} unreadable or size-mismatched pair(s), e.g. {bad[0]}", fix)
    else:
        rep.ok(f"{what}: {len(pairs)} image/mask pairs present, sizes match")


def _check_source_files(rep: _Report, src) -> None:
    """The start-up checks of a file source (every mask and image header), as lines."""
    report = src.scan()
    for msg in report.problems:
        rep.bad(msg)
    for msg in report.notice_messages():
        rep.warn(msg)
    if not report.problems:
        rep.ok(
            f"{len(src)} masks read, image headers checked: values as expected, sizes match, "
            "no truncated image"
        )


def _check_pascal(root: Path, rep: _Report) -> None:
    from cgmgm.data.files import DatasetError, read_list

    prep = (
        f"download {URLS['voc']}, {URLS['sbd']} and {URLS['sbd_list']}, then run "
        f"`python -m cgmgm.data.prepare pascal --voc VOCtrainval_11-May-2012.tar --sbd "
        f"benchmark.tgz --sbd-list train_noval.txt --out {root}`"
    )
    for d, pat in (("JPEGImages", "*.jpg"), ("SegmentationClassAug", "*.png")):
        if (root / d).is_dir():
            rep.ok(f"{root / d}/ ({_count(root / d, pat)} files)")
        else:
            rep.missing(f"{root / d}/", prep)
    for split in ("train", "val"):
        lst = root / "lists" / f"{split}.txt"
        if not lst.is_file():
            rep.missing(f"split list {lst}", prep)
            continue
        try:
            entries = read_list(lst, root, "JPEGImages", "SegmentationClassAug", "pascal")
        except DatasetError as e:
            rep.missing(str(e).splitlines()[0], prep)
            continue
        n = len(entries)
        ref = PUBLISHED[("pascal", split)]
        (rep.ok if n == ref else rep.warn)(f"{lst}: {n} images (PFENet: {ref})")
        _check_pairs(rep, [(e[1], e[2]) for e in entries], str(lst), prep)


def _check_coco(root: Path, rep: _Report) -> None:
    expected = {"train2014": 82783, "val2014": 40504}
    for s, url in (("train2014", URLS["coco_train"]), ("val2014", URLS["coco_val"])):
        d = root / s
        if d.is_dir():
            n = _count(d, "*.jpg")
            (rep.ok if n == expected[s] else rep.warn)(
                f"{d}/ ({n} images; the official zip has {expected[s]})"
            )
        else:
            rep.missing(f"{d}/", f"download {url} and unzip it into {root}")
        ann = root / "annotations" / f"instances_{s}.json"
        if ann.is_file() and ann.stat().st_size > 0:
            rep.ok(f"{ann}")
        else:
            rep.missing(f"{ann}", f"download {URLS['coco_ann']} and unzip it into {root}")
        cache = root / "lists" / f"{s}_pixels.npz"
        if cache.is_file():
            rep.ok(f"{cache} (pixel-count cache)")
        else:
            rep.warn(
                f"{cache} absent: every run renders all masks to count pixels (slow); "
                f"`python -m cgmgm.data.prepare coco --root {root}` writes it once"
            )


def _check_fss(root: Path, rep: _Report) -> None:
    """What the fss1000 source reads and checks at start-up: every class folder's image/mask
    pairs (suffixes in any case; orphans named), then every mask and image header."""
    from cgmgm.data.files import DatasetError
    from cgmgm.data.fss1000 import FSS1000

    fix = f"get FSS-1000 from {URLS['fss1000']}; class splits: {URLS['fss_splits']}"
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        rep.missing(f"class folders under {root}", fix)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            src = FSS1000("test", root=root, strict=False)
        except DatasetError as e:
            rep.missing(str(e), fix)
            return
    rep.ok(f"{len(folders)} class folders, {len(src)} image/mask pairs")
    for w in caught:
        rep.warn(str(w.message))
    pair_fix = (
        "every image (<n>.jpg or .jpeg, any case) needs its <n>.png mask and every mask its "
        "image: add the missing file or remove the unpaired one"
    )
    for msg in src.layout_problems:
        rep.missing(msg, pair_fix)
    _check_source_files(rep, src)


def _check_folder(root: Path, rep: _Report) -> None:
    from cgmgm.data.files import IMAGE_EXTENSIONS, DatasetError, read_list

    fix = (
        "lay the data out as images/<name>.jpg + masks/<name>.png (or labels/) with "
        "<split>.txt lists (one name per line) and class names in classes.txt or `classes=`"
    )
    if (root / "images").is_dir():
        rep.ok(f"{root / 'images'}/")
    else:
        rep.missing(f"{root / 'images'}/", fix)
    mask_dir = next((d for d in ("masks", "labels") if (root / d).is_dir()), None)
    if mask_dir:
        rep.ok(f"{root / mask_dir}/")
    else:
        rep.missing(f"{root / 'masks'}/ (or labels/)", fix)
    names = [n for n in ("classes.txt", "classes.yaml", "classes.yml") if (root / n).is_file()]
    if names:
        rep.ok(f"class names {root / names[0]}")
    else:
        rep.warn("no classes.txt/.yaml: pass the names as `classes=` (dataset.classes)")
    lists = [root / f"{s}.txt" for s in ("train", "val", "test") if (root / f"{s}.txt").is_file()]
    if not lists:
        rep.missing(f"split lists ({root}/train.txt, val.txt or test.txt)", fix)
    if mask_dir and (root / "images").is_dir():
        from cgmgm.data.folder import pair_dirs

        _, unpaired, other = pair_dirs(root / "images", root / mask_dir)
        for msg in unpaired:  # an error for list_file=all; unused files with split lists
            rep.warn(f"{msg} (not usable)")
        if other:
            rep.warn(f"{len(other)} file(s) neither image nor .png mask, e.g. {other[0]}")
    for lst in lists:
        if mask_dir is None:
            break
        try:
            entries = read_list(
                lst, root, "images", mask_dir, "folder", image_exts=IMAGE_EXTENSIONS
            )
        except DatasetError as e:
            rep.missing(str(e).splitlines()[0], fix)
            continue
        _check_pairs(rep, [(e[1], e[2]) for e in entries], str(lst), fix)


def check_dataset(dataset: str, root: Path) -> int:
    """Print what ``root`` holds and lacks for ``dataset``; returns the number of problems."""
    root = Path(root)
    _say(f"checking {dataset} at {root}")
    rep = _Report()
    if not root.is_dir():
        how = {
            "pascal": f"download {URLS['voc']} and {URLS['sbd']}, then `python -m "
            f"cgmgm.data.prepare pascal --voc ... --sbd ... --out {root}`",
            "coco": f"download {URLS['coco_train']}, {URLS['coco_val']} and "
            f"{URLS['coco_ann']} and unzip them into {root}",
            "fss1000": f"get FSS-1000 from {URLS['fss1000']}",
            "folder": "create it with images/, masks/ and split lists",
        }[dataset]
        rep.missing(f"dataset root {root} (does not exist)", how)
    else:
        {
            "pascal": _check_pascal,
            "coco": _check_coco,
            "fss1000": _check_fss,
            "folder": _check_folder,
        }[dataset](root, rep)
    rep.summary()
    return rep.problems


# ---------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cgmgm.data.prepare",
        description="Build PASCAL-5i / COCO-20i masks and lists; check dataset roots.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pascal", help="SegmentationClassAug masks + PFENet/per-fold lists")
    p.add_argument("--voc", type=Path, required=True, help="VOCtrainval_11-May-2012.tar or dir")
    p.add_argument("--sbd", type=Path, required=True, help="benchmark.tgz or benchmark_RELEASE")
    p.add_argument("--sbd-list", type=Path, help="SBD train_noval.txt (PFENet's 5953 list)")
    p.add_argument("--out", type=Path, help="output root (default: the VOC2012 directory)")
    p.add_argument("--copy-images", action="store_true", help="copy JPEGImages, not symlink")
    c = sub.add_parser("coco", help="lists, pixel-count caches (+ PNG masks) for COCO 2014")
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--write-masks", action="store_true", help="also write masks/<set>/*.png")
    k = sub.add_parser("check", help="say what a dataset root lacks and how to get it")
    k.add_argument("--dataset", required=True, choices=["pascal", "coco", "fss1000", "folder"])
    k.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "pascal":
        prepare_pascal(args.voc, args.sbd, args.out, args.sbd_list, args.copy_images)
        return 0
    if args.command == "coco":
        prepare_coco(args.root, args.write_masks)
        return 0
    return 1 if check_dataset(args.dataset, args.root) else 0


if __name__ == "__main__":
    sys.exit(main())
