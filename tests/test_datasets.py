"""File-backed sources on fixtures in the exact on-disk formats: PASCAL (palette PNGs with
255 borders), COCO (instance JSON: polygon, RLE, crowd), FSS-1000 folders, user folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from _data_fixtures import (
    H,
    W,
    coco_fixture,
    corrupt_file,
    folder_fixture,
    fss_fixture,
    pascal_fixture,
)
from cgmgm.data import (
    SOURCES,
    DatasetError,
    EpisodeDataset,
    EpisodicDataModule,
    build_source,
    novel_classes,
)
from cgmgm.data.pascal import VOC_CLASSES
from cgmgm.data.transforms import PadResize


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, pascal_fixture(root)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, coco_fixture(root, "val2014")


def test_registered():
    assert {"pascal", "coco", "fss1000", "folder", "synthetic"} <= set(SOURCES)


# ---------------------------------------------------------------------- PASCAL


def test_pascal_loads_palette_masks_and_both_list_formats(pascal):
    root, data = pascal
    train = build_source("pascal", "train", root=root)  # PFENet two-column lines
    val = build_source("pascal", "val", root=root)  # one id per line
    assert len(train) == 80 and len(val) == 40
    assert train.keys == sorted(data["train"]) and val.keys == sorted(data["val"])
    assert build_source("pascal", "test", root=root).keys == val.keys  # test = val images
    img, mask = val.load(0)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert mask.dtype == np.uint8 and np.array_equal(mask, data["val"][val.keys[0]])
    assert 255 in mask  # VOC borders stay ignore
    assert train.num_classes == 20 and train.fold_scheme == "block"
    assert tuple(train.class_names) == VOC_CLASSES


def test_pascal_pixel_rule_and_fold_splits(pascal):
    root, _ = pascal
    val = build_source("pascal", "val", root=root)
    assert val.min_pixels_for((H, W)) == 2048
    i = val.keys.index("2007_000000")  # big class 1 (2304 px), small class 2 (400 px)
    assert val.labels_in(i) == {1, 2} and val.classes_in(i) == {1}
    for fold in range(4):
        ds = EpisodeDataset(val, fold, 1, "test", 50, seed=fold)
        assert ds.classes == list(range(5 * fold + 1, 5 * fold + 6))
        for k in range(50):
            cls, q, sup = ds.sample(k)
            assert cls in ds.classes and q not in sup  # query never its own support
            assert cls in val.classes_in(q) and all(cls in val.classes_in(s) for s in sup)


def test_bam_filter_drops_train_images_with_novel_pixels(pascal):
    root, _ = pascal
    train = build_source("pascal", "train", root=root)
    # images 2008_000005/25: big class 6 (base in fold 0), small class 2 (novel in fold 0)
    holders = {train.keys.index(f"2008_{j:06d}") for j in (5, 25)}
    bam = EpisodeDataset(train, 0, 1, "train", 10, filter_novel=True)
    pfenet = EpisodeDataset(train, 0, 1, "train", 10, filter_novel=False)
    assert set(bam.classes) == set(range(6, 21))
    assert not holders & set(bam.class_images[6].tolist())
    assert holders <= set(pfenet.class_images[6].tolist())
    used = {i for v in bam.class_images.values() for i in v.tolist()}
    assert all(not train.labels_in(i) & set(novel_classes(20, 0)) for i in used)
    # fold 2 (novel 11..15): classes 6 and 2 are both base, so the two images stay
    assert holders <= set(EpisodeDataset(train, 2, 1, "train", 10).class_images[6].tolist())


def test_episode_targets_from_real_files(pascal):
    root, data = pascal
    val = build_source("pascal", "val", root=root)
    ds = EpisodeDataset(val, 0, 1, "test", 8, seed=3, original_size=96)
    for k in range(8):
        ep = ds[k]
        raw = data["val"][val.keys[ep["query_source_idx"]]]
        want = torch.from_numpy((raw == ep["class_id"]).astype(np.int64))
        want[torch.from_numpy(raw == 255)] = 255
        assert torch.equal(ep["query_mask"], want)
        assert torch.equal(ep["query_mask_orig"][:H, :W], want)
        assert (ep["query_mask_orig"][H:] == 255).all() and (
            ep["query_mask_orig"][:, W:] == 255
        ).all()
        assert ep["query_orig_size"].tolist() == [H, W]
        assert ep["support_masks"].shape == (1, H, W)


def test_identical_episodes_across_worker_counts(pascal):
    root, _ = pascal

    def run(workers):
        dm = EpisodicDataModule(
            dataset="pascal",
            dataset_kwargs={"root": str(root)},
            fold=2,
            shot=1,
            eval_batch_size=4,
            test_episodes=10,
            num_workers=workers,
            test_seed=5,
            original_size=80,
            eval_transform=PadResize(48),
        )
        dm.setup("test")
        batches = list(dm.test_dataloader())
        keys = ("index", "class_id", "query_source_idx", "query_img", "query_mask_orig")
        return {k: torch.cat([torch.as_tensor(b[k]) for b in batches]) for k in keys}

    a, b = run(0), run(2)
    assert a["index"].tolist() == list(range(10))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pixel_cache_is_used_and_validated(pascal, tmp_path):
    root, _ = pascal
    val = build_source("pascal", "val", root=root, stats_cache=None)
    cache = val.save_stats(tmp_path / "val_pixels.npz")
    cached = build_source("pascal", "val", root=root, stats_cache=cache)
    assert len(cached._counts) == len(val)  # filled from the cache, no mask read
    for i in range(len(val)):
        assert np.array_equal(cached.class_pixel_counts(i), val.class_pixel_counts(i))
        assert cached.classes_in(i) == val.classes_in(i)
    train_cache = build_source("pascal", "train", root=root, stats_cache=None).save_stats(
        tmp_path / "train_pixels.npz"
    )
    with pytest.warns(UserWarning, match="ignoring pixel-count cache"):
        stale = build_source("pascal", "val", root=root, stats_cache=train_cache)
    assert len(stale._counts) == 0


# ---------------------------------------------------------------------- COCO


def test_coco_masks_from_polygons_rle_and_crowd(coco):
    root, data = coco
    src = build_source("coco", "val", root=root)
    assert src.num_classes == 80 and src.fold_scheme == "interleaved"
    assert len(src) == 6  # image 7 has no annotation
    assert src.cat_to_class[1] == 1 and src.cat_to_class[13] == 12  # sorted category ids
    assert src.class_names[12] == "cat13"
    for i, img_id in enumerate(src.image_ids):
        assert np.array_equal(src.load_mask(i), data["expected"][img_id]), img_id
    img, mask = src.load(0)
    assert img.shape == (H, W, 3) and mask.shape == (H, W)
    # crowd painted as its class on request
    as_class = build_source("coco", "val", root=root, crowd="class")
    m = as_class.load_mask(0)
    assert (m[:, 56:80] == 2).all()
    assert len(build_source("coco", "val", root=root, images="all")) == 7


def test_coco_folds_and_pixel_rule(coco):
    root, _ = coco
    src = build_source("coco", "val", root=root)
    assert novel_classes(80, 0, scheme="interleaved")[:3] == [1, 5, 9]
    # image 1: class 1 keeps 2304 - 400 = 1904 px (< 2048), class 12 only 400 px
    assert src.labels_in(0) == {1, 12} and src.classes_in(0) == set()
    ds = EpisodeDataset(src, 0, 1, "test", 6, classes=[1, 12])
    assert ds.class_images[1].tolist() == [1, 3, 5] and ds.class_images[12].tolist() == [2, 4]
    for k in range(6):
        cls, q, sup = ds.sample(k)
        assert q not in sup
    with pytest.raises(ValueError, match=r"need >= 4 images per class.*class 1: 3 image"):
        EpisodeDataset(src, 0, 3, "test", 6, classes=[1, 12])


def test_coco_missing_annotations(tmp_path):
    (tmp_path / "val2014").mkdir()
    with pytest.raises(DatasetError, match=r"instances_val2014\.json is missing.*prepare check"):
        build_source("coco", "val", root=tmp_path)


# ---------------------------------------------------------------------- FSS-1000 / folder


def test_fss1000_all_classes(tmp_path):
    root = fss_fixture(tmp_path / "fss")
    src = build_source("fss1000", "test", root=root)
    assert src.num_classes == 3 and src.class_names == ("background", "cat", "dog", "eagle")
    assert src.folds == [[1, 2, 3]] and len(src) == 9
    img, mask = src.load(4)  # dog/2.png
    assert img.shape == (32, 40, 3) and set(np.unique(mask)) == {0, 2}
    assert set(np.unique(src.load_mask(3))) == {0, 2}  # the RGB mask binarises too
    ds = EpisodeDataset(src, 0, 2, "test", 12, seed=1)
    assert ds.classes == [1, 2, 3]
    for k in range(12):
        cls, q, sup = ds.sample(k)
        assert src.image_class[q] == cls and q not in sup
    sub = build_source("fss1000", "test", root=root, classes={"test": ["eagle", "cat"]})
    assert sub.class_names == ("background", "eagle", "cat") and len(sub) == 6
    dm = EpisodicDataModule(
        dataset="fss1000", dataset_kwargs={"root": str(root)}, shot=1, classes="all"
    )
    assert dm.classes == [1, 2, 3]


def test_folder_source_label_mapping_and_user_folds(tmp_path):
    root = tmp_path / "cam"
    masks = folder_fixture(root)
    names = ["sky", "road", "car", "tree"] + [f"unused{v}" for v in range(4, 11)] + ["void"]
    src = build_source(
        "folder",
        "test",
        root=root,
        classes=names,
        background=None,
        ignore_index=[11],
        folds=[["sky", "road"], [3, 4]],
    )
    assert src.num_classes == 11 and src.class_names[1:5] == ("sky", "road", "car", "tree")
    assert src.folds == [[1, 2], [3, 4]]
    assert src.keys == ["f005", "f006", "f007", "f000", "f001", "f002"]
    raw = masks["f005"]
    m = src.load_mask(0)
    assert (m[raw == 11] == 255).all() and np.array_equal(m[raw != 11], raw[raw != 11] + 1)
    ds = EpisodeDataset(src, 1, 1, "test", 5)
    assert ds.classes == [3, 4]
    with pytest.raises(ValueError, match=r"class 5: 0 image\(s\)"):  # base = 1, 2, 5..11
        EpisodeDataset(src, 1, 1, "train", 5)
    assert EpisodeDataset(src, 1, 1, "train", 5, classes=[1, 2]).classes == [1, 2]
    # classes from a file in the root, background value 0
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    bg = build_source("folder", "train", root=root, ignore_index=11)
    assert bg.num_classes == 10 and bg.class_names[1] == "road"


def test_folder_unknown_label_values_are_an_error(tmp_path):
    root = tmp_path / "cam"
    folder_fixture(root)
    src = build_source("folder", "train", root=root, classes=["a", "b", "c", "d"])
    with pytest.raises(DatasetError, match=r"f000\.png holds label values \[11\].*ignore_index"):
        src.load_mask(0)


# ---------------------------------------------------------------------- bad input


def test_missing_root_and_list_name_the_path_and_the_fix(pascal, tmp_path):
    with pytest.raises(DatasetError, match=r"nope does not exist.*prepare check --dataset pascal"):
        build_source("pascal", "train", root=tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"needs a dataset root"):
        build_source("fss1000", "test")
    root, _ = pascal
    with pytest.raises(DatasetError, match=r"lists/missing\.txt does not exist.*prepare"):
        build_source("pascal", "train", root=root, list_file="lists/missing.txt")
    empty = tmp_path / "empty"
    (empty / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"SegmentationClassAug is missing.*prepare check"):
        build_source("pascal", "train", root=empty)


def test_list_naming_absent_files_or_duplicates(pascal, tmp_path):
    root, _ = pascal
    bad = tmp_path / "bad.txt"
    bad.write_text("2007_000000\n/cephfs/x/JPEGImages/a.jpg /cephfs/x/new_cls/a.png\n")
    with pytest.raises(DatasetError, match=r"2 file\(s\) named in .*bad\.txt do not exist"):
        build_source("pascal", "val", root=root, list_file=bad)
    bad.write_text("2007_000000\n2007_000001\n2007_000000\n")
    with pytest.raises(DatasetError, match=r"bad\.txt:3: image '2007_000000' is listed twice"):
        build_source("pascal", "val", root=root, list_file=bad)


def test_corrupt_image_and_size_mismatch_name_the_files(tmp_path):
    root = tmp_path / "voc"
    pascal_fixture(root)
    corrupt_file(root / "JPEGImages" / "2007_000003.jpg")
    val = build_source("pascal", "val", root=root)
    with pytest.raises(DatasetError, match=r"cannot decode image .*2007_000003\.jpg"):
        val.load(val.keys.index("2007_000003"))
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(
        root / "SegmentationClassAug" / "2007_000004.png"
    )
    with pytest.raises(
        DatasetError, match=r"2007_000004\.png is 65x80 but image .*2007_000004\.jpg is 64x80"
    ):
        val.load(val.keys.index("2007_000004"))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
        root / "SegmentationClassAug" / "2007_000005.png"
    )
    with pytest.raises(DatasetError, match=r"2007_000005\.png is a 'RGB' image"):
        val.load_mask(val.keys.index("2007_000005"))
    m = np.zeros((H, W), np.uint8)
    m[:4] = 40  # not a VOC class
    Image.fromarray(m).save(root / "SegmentationClassAug" / "2007_000006.png")
    with pytest.raises(DatasetError, match=r"2007_000006\.png holds values \[40\]"):
        val.load_mask(val.keys.index("2007_000006"))


def test_fss_bad_files(tmp_path):
    root = fss_fixture(tmp_path / "fss")
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "cat" / "2.png")
    src = build_source("fss1000", "test", root=root)
    with pytest.raises(DatasetError, match=r"cat/2\.png is 31x40 but image .*cat/2\.jpg is 32x40"):
        src.load(1)
    (root / "dog" / "3.png").unlink()
    with pytest.raises(DatasetError, match=r"dog/3\.jpg has no mask .*dog/3\.png"):
        build_source("fss1000", "test", root=root)


def test_too_few_images_fires_for_a_real_source(pascal):
    root, _ = pascal
    val = build_source("pascal", "val", root=root)
    with pytest.raises(ValueError, match=r"shot=2 need >= 3 images per class.*class 1: 2 image"):
        EpisodeDataset(val, 0, 2, "test", 5)
    with pytest.raises(ValueError, match=r"no train classes"):
        EpisodeDataset(build_source("fss1000", "test", root=fss_root(root)), 0, 1, "train", 5)


def fss_root(base):
    p = base.parent / (base.name + "_fss")
    if not p.exists():
        fss_fixture(p)
    return p
