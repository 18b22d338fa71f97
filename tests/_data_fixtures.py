"""Writers of tiny datasets in the exact on-disk formats (VOC palette PNGs with 255 borders,
SBD GTcls .mat files, COCO instance JSON, FSS-1000 folders, user folders)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from cgmgm.data.pascal import voc_palette

H, W = 64, 80  # fixture image size (5120 px; a 48x48 object has 2304 >= 2048 px)
BIG, SMALL = 48, 20  # object sides: BIG counts under the 2048-px rule, SMALL does not


def write_jpeg(path: Path, seed: int, shape: tuple[int, int] = (H, W)) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    img[..., 0] = seed % 256  # the red channel identifies the image (roughly, after JPEG)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def voc_mask(big: int, small: int | None = None, border: bool = True) -> np.ndarray:
    """[H, W] mask: class ``big`` in a 48x48 block (top-left), ``small`` in a 20x20 block
    (bottom-right), each object's outer 1-px ring set to 255 (VOC boundary band)."""
    m = np.zeros((H, W), dtype=np.uint8)
    m[2 : 2 + BIG, 2 : 2 + BIG] = big
    if border:
        m[1, 1 : 3 + BIG] = m[2 + BIG, 1 : 3 + BIG] = 255
        m[1 : 3 + BIG, 1] = m[1 : 3 + BIG, 2 + BIG] = 255
    if small is not None:
        m[H - 2 - SMALL : H - 2, W - 2 - SMALL : W - 2] = small
        if border:
            m[H - 3 - SMALL, W - 3 - SMALL : W - 1] = 255
    return m


def pascal_root(root: Path, train: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> Path:
    """A prepared PASCAL root: JPEGImages, SegmentationClassAug (palette), lists/*.txt with
    PFENet lines for train and plain ids for val (both formats)."""
    for k, (i, m) in enumerate({**train, **val}.items()):
        write_jpeg(root / "JPEGImages" / f"{i}.jpg", k)
        write_palette_png(root / "SegmentationClassAug" / f"{i}.png", m)
    (root / "lists").mkdir(parents=True, exist_ok=True)
    (root / "lists" / "train.txt").write_text(
        "".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in train)
    )
    (root / "lists" / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


def pascal_fixture(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """80 train + 40 val images; every class is the big object of 4 train / 2 val images;
    train images 2008_000005 and 2008_000025 (big class 6) also hold a small class 2; val
    images 2007_0000{00,03,...} hold a small second class."""
    train, val = {}, {}
    for j in range(80):
        big = j % 20 + 1
        small = 2 if j in (5, 25) else None  # big class 6 with a small fold-0-novel class 2
        train[f"2008_{j:06d}"] = voc_mask(big, small)
    for j in range(40):
        big = j % 20 + 1
        small = (big % 20) + 1 if j % 3 == 0 else None
        val[f"2007_{j:06d}"] = voc_mask(big, small)
    pascal_root(root, train, val)
    return {"train": train, "val": val}


# ---------------------------------------------------------------------- VOC + SBD archives


def write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    cats = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8)
    gt = {
        "Segmentation": seg.astype(np.uint8),
        "Boundaries": np.empty((20, 1), dtype=object),
        "CategoriesPresent": cats.reshape(-1, 1),
    }
    for k in range(20):
        gt["Boundaries"][k, 0] = np.zeros(seg.shape, dtype=bool)
    savemat(str(path), {"GTcls": gt})


def voc_sbd_fixture(base: Path) -> dict[str, object]:
    """VOCdevkit/VOC2012 + benchmark_RELEASE/dataset under ``base``, plus train_noval.txt.

    VOC seg train: v0..v9 (classes 1..10), val: w0..w9 (classes 11..20, plus small ones);
    SBD: s0..s19 (classes 1..20, SBD masks without borders), and v0..v4 also in SBD with a
    *different* mask (VOC must win). train_noval = s0..s19 + v0..v4.
    """
    voc = base / "VOCdevkit" / "VOC2012"
    sbd = base / "benchmark_RELEASE" / "dataset"
    masks: dict[str, np.ndarray] = {}
    voc_train = [f"2007_0000{k:02d}" for k in range(10)]
    voc_val = [f"2007_0001{k:02d}" for k in range(10)]
    sbd_only = [f"2008_0000{k:02d}" for k in range(20)]
    for k, i in enumerate(voc_train):
        masks[i] = voc_mask(k + 1)
    for k, i in enumerate(voc_val):
        masks[i] = voc_mask(k + 11, small=(k % 5) + 1)
    for n, i in enumerate(voc_train + voc_val + sbd_only):
        write_jpeg(voc / "JPEGImages" / f"{i}.jpg", n)
    for i in voc_train + voc_val:
        write_palette_png(voc / "SegmentationClass" / f"{i}.png", masks[i])
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(voc_train) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(voc_val) + "\n")
    sbd_masks = {}
    for k, i in enumerate(sbd_only):
        sbd_masks[i] = voc_mask(k + 1, border=False)
    for k, i in enumerate(voc_train[:5]):
        sbd_masks[i] = voc_mask(20 - k, border=False)  # conflicts with VOC: VOC wins
    for i, m in sbd_masks.items():
        write_sbd_mat(sbd / "cls" / f"{i}.mat", m)
    (sbd / "train.txt").write_text("\n".join(sbd_only[:15] + voc_train[:5]) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_only[15:]) + "\n")
    noval = base / "train_noval.txt"
    noval.write_text("\n".join(sbd_only + voc_train[:5]) + "\n")
    expected = {i: masks[i] for i in voc_train + voc_val}
    expected.update({i: sbd_masks[i] for i in sbd_only})
    return {
        "voc": voc,
        "sbd": base / "benchmark_RELEASE",
        "sbd_list": noval,
        "masks": expected,
        "train": sorted(set(voc_train) | set(sbd_only)),
        "val": sorted(voc_val),
    }


def make_tar(src_dir: Path, archive: Path, arcname: str) -> Path:
    mode = "w:gz" if archive.suffix in (".tgz", ".gz") else "w"
    with tarfile.open(archive, mode) as tar:
        tar.add(src_dir, arcname=arcname)
    return archive


# ---------------------------------------------------------------------- COCO

# 80 category ids with COCO's gaps (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 unused).
COCO_CAT_IDS = [c for c in range(1, 91) if c not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def _rect_poly(y0: int, x0: int, y1: int, x1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def coco_fixture(root: Path, split: str = "val2014") -> dict[str, object]:
    """COCO root with ``split`` images and instance JSON; returns the expected masks.

    Image 1: polygon of cat 1 (class 1) 48x48, compressed-RLE instance of cat 13 (class 12)
    20x20 on top of it, crowd (uncompressed RLE) cat 2 (class 2) in the right band.
    Images 2..6: one 48x48 polygon instance each of classes 1 or 12 (cats 1 / 13).
    Image 7: no annotation (left out with images="annotated").
    """
    from pycocotools import mask as mask_utils

    images, anns, expected = [], [], {}
    aid = 1

    def add(img_id: int, cat: int, seg, area: float, crowd: int = 0) -> None:
        nonlocal aid
        anns.append(
            {
                "id": aid,
                "image_id": img_id,
                "category_id": cat,
                "segmentation": seg,
                "area": area,
                "bbox": [0, 0, 1, 1],
                "iscrowd": crowd,
            }
        )
        aid += 1

    for img_id in range(1, 8):
        name = f"COCO_{split}_{img_id:012d}.jpg"
        images.append({"id": img_id, "file_name": name, "height": H, "width": W})
        write_jpeg(root / split / name, img_id)
    # image 1
    m = np.zeros((H, W), dtype=np.uint8)
    add(1, 1, _rect_poly(0, 0, 48, 48), 48 * 48)
    m[0:48, 0:48] = 1
    small = np.zeros((H, W), dtype=np.uint8, order="F")
    small[10:30, 10:30] = 1
    rle = mask_utils.encode(small)
    rle["counts"] = rle["counts"].decode("ascii")  # compressed RLE as stored in JSON
    add(1, 13, rle, 400)
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[:, 56:80] = 1
    counts, flat, run, prev = [], crowd.flatten(order="F"), 0, 0
    for v in flat:  # uncompressed RLE: column-major run lengths starting with zeros
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    add(1, 2, {"counts": counts, "size": [H, W]}, float(crowd.sum()), crowd=1)
    m[:, 56:80] = 255
    m[10:30, 10:30] = 12
    expected[1] = m
    for img_id in range(2, 7):
        cat = 1 if img_id % 2 == 0 else 13
        add(img_id, cat, _rect_poly(8, 8, 56, 56), 48 * 48)
        e = np.zeros((H, W), dtype=np.uint8)
        e[8:56, 8:56] = COCO_CAT_IDS.index(cat) + 1
        expected[img_id] = e
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in COCO_CAT_IDS]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"expected": expected, "annotation_file": ann_file}


# ---------------------------------------------------------------------- FSS-1000 / folder


def fss_fixture(root: Path, classes=("cat", "dog", "eagle"), per_class: int = 3) -> Path:
    """``root/<class>/<n>.jpg`` + ``<n>.png`` (0/255 'L' masks; one RGB mask), 32x40."""
    for c, name in enumerate(classes):
        for n in range(1, per_class + 1):
            write_jpeg(root / name / f"{n}.jpg", 10 * c + n, shape=(32, 40))
            m = np.zeros((32, 40), dtype=np.uint8)
            m[4 : 20 + n, 6 : 26 + c] = 255
            im = Image.fromarray(m)
            if c == 1 and n == 1:
                im = im.convert("RGB")  # some FSS-1000 masks are RGB
            im.save(root / name / f"{n}.png")
    return root


def folder_fixture(root: Path) -> dict[str, np.ndarray]:
    """CamVid-like folder: images/*.png, labels/*.png with values 0..3 and 11 (unlabelled)."""
    masks = {}
    for k in range(8):
        name = f"f{k:03d}"
        write_jpeg(root / "images" / f"{name}.jpg", k)
        m = np.full((H, W), 0, dtype=np.uint8)  # value 0: "sky", a class here
        m[16:64, :] = 1 + k % 3  # 48 x 80 block of value 1, 2 or 3
        m[0:4, 0:4] = 11  # unlabelled
        (root / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m, mode="L").save(root / "labels" / f"{name}.png")
        masks[name] = m
    names = list(masks)
    (root / "train.txt").write_text("\n".join(names[:5]) + "\n")
    (root / "test.txt").write_text("".join(f"{n}.jpg\n" for n in names[5:] + names[:3]))
    return masks


def corrupt_file(path: Path) -> None:
    """Overwrite ``path`` with a truncated copy of itself."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_gray_png(path: Path, mask: np.ndarray) -> None:
    """A single-channel 'L' PNG of ``mask`` (values as given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def write_exif_jpeg(path: Path, seed: int, shape: tuple[int, int], orientation: int) -> None:
    """A JPEG whose stored pixels are ``shape`` (H, W), tagged with EXIF ``orientation``."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95, exif=exif)
