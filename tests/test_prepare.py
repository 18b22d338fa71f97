"""``python -m cgmgm.data.prepare``: masks + lists from fixture VOC/SBD archives (dirs and
tarballs), COCO lists and caches, and the ``check`` mode's messages."""

import json

import numpy as np
import pytest
from PIL import Image

from _data_fixtures import coco_fixture, fss_fixture, make_tar, voc_sbd_fixture
from cgmgm.data import EpisodeDataset, build_source
from cgmgm.data.prepare import build_fold_lists, main, prepare_coco, prepare_pascal


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("downloads")
    return base, voc_sbd_fixture(base)


@pytest.fixture(scope="module")
def prepared(archives, tmp_path_factory):
    base, fx = archives
    out = tmp_path_factory.mktemp("voc_out")
    result = prepare_pascal(fx["voc"], fx["sbd"], out, fx["sbd_list"])
    return out, fx, result


def test_pascal_masks_voc_first_then_sbd(prepared):
    out, fx, result = prepared
    assert result == {"train": len(fx["train"]), "val": len(fx["val"]), "mismatches": 2}
    for i, want in fx["masks"].items():
        with Image.open(out / "SegmentationClassAug" / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
            got = np.asarray(im)
        assert np.array_equal(got, want), i
    # 2007_000000 is in both VOC (class 1, with 255 borders) and SBD (class 20): VOC wins
    got = np.asarray(Image.open(out / "SegmentationClassAug" / "2007_000000.png"))
    assert set(np.unique(got)) == {0, 1, 255}
    assert (out / "JPEGImages").is_symlink()


def test_pascal_lists_and_counts(prepared, capsys):
    out, fx, _ = prepared
    train = (out / "lists" / "train.txt").read_text().splitlines()
    assert train == [f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png" for i in fx["train"]]
    assert len(train) == 30  # VOC train 10 + train_noval 25, 5 duplicates removed
    val = (out / "lists" / "val.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in val] == [f"JPEGImages/{i}.jpg" for i in fx["val"]]
    src = build_source("pascal", "train", root=out)
    assert len(src._counts) == len(src)  # the pixel cache written by prepare is used
    for i in range(len(src)):
        assert np.array_equal(
            src._counts[i][0], np.bincount(src.load_mask(i).ravel(), minlength=256)[:21]
        )


def test_pascal_fold_lists_follow_the_pixel_rule_and_bam_filter(prepared):
    out, fx, _ = prepared
    src = build_source("pascal", "train", root=out)
    for fold in range(4):
        novel = set(range(5 * fold + 1, 5 * fold + 6))
        listed = [
            ln.split()[0][11:-4]
            for ln in (out / "lists" / f"fold{fold}" / "train.txt").read_text().splitlines()
        ]
        want = [
            k
            for i, k in enumerate(src.keys)
            if not (src.labels_in(i) & novel) and (src.classes_in(i) - novel)
        ]
        assert listed == want
        classes = json.loads((out / "lists" / f"fold{fold}" / "train_classes.json").read_text())
        assert set(map(int, classes)) == set(range(1, 21)) - novel
    val = build_source("pascal", "val", root=out)
    listed = (out / "lists" / "fold2" / "val.txt").read_text().splitlines()
    want = [k for i, k in enumerate(val.keys) if val.classes_in(i) & set(range(11, 16))]
    assert [ln.split()[0][11:-4] for ln in listed] == want and len(want) == 5


def test_prepare_is_deterministic_and_reads_tarballs(archives, prepared, tmp_path, capsys):
    base, fx = archives
    out, _, _ = prepared
    voc_tar = make_tar(base / "VOCdevkit", tmp_path / "VOCtrainval_11-May-2012.tar", "VOCdevkit")
    sbd_tgz = make_tar(base / "benchmark_RELEASE", tmp_path / "benchmark.tgz", "benchmark_RELEASE")
    out2 = tmp_path / "out2"
    argv = ["pascal", "--voc", str(voc_tar), "--sbd", str(sbd_tgz)]
    argv += ["--sbd-list", str(fx["sbd_list"]), "--out", str(out2)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "WARNING  lists/train.txt: 30, but the published count is 5953" in text
    assert "WARNING  lists/val.txt: 10, but the published count is 1449" in text
    for rel in [
        "lists/train.txt",
        "lists/val.txt",
        "lists/fold3/train.txt",
        "lists/fold2/val_classes.json",
    ]:
        assert (out2 / rel).read_text() == (out / rel).read_text(), rel
    for i in fx["masks"]:
        a = np.asarray(Image.open(out / "SegmentationClassAug" / f"{i}.png"))
        b = np.asarray(Image.open(out2 / "SegmentationClassAug" / f"{i}.png"))
        assert np.array_equal(a, b)
    # without train_noval.txt the SBD part is SBD train minus VOC val, and the warning says so
    out3 = tmp_path / "out3"
    prepare_pascal(voc_tar, sbd_tgz, out3)
    text = capsys.readouterr().out
    assert "no --sbd-list given" in text and "train_noval.txt" in text and "--sbd-list" in text


def test_prepare_refuses_missing_masks(archives, tmp_path):
    base, fx = archives
    lst = tmp_path / "extra.txt"
    lst.write_text("2008_000099\n")  # listed, but no image and no mask anywhere
    with pytest.raises(
        SystemExit, match=r"(?s)1 problem.*no lists written.*2008_000099\.jpg is missing"
    ):
        prepare_pascal(fx["voc"], fx["sbd"], tmp_path / "o", lst)
    with pytest.raises(SystemExit, match=r"no VOC2012 JPEGImages.*VOCtrainval_11-May-2012\.tar"):
        prepare_pascal(tmp_path, fx["sbd"], tmp_path / "o")


def test_check_mode_messages(prepared, tmp_path, capsys):
    out, _, _ = prepared
    assert main(["check", "--dataset", "pascal", "--root", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ok       " in text and "all present" in text and "(PFENet: 5953)" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check", "--dataset", "pascal", "--root", str(empty)]) == 1
    text = capsys.readouterr().out
    assert f"MISSING  {empty}/JPEGImages/" in text and "split list" in text
    assert "VOCtrainval_11-May-2012.tar" in text and "benchmark.tgz" in text
    assert "python -m cgmgm.data.prepare pascal" in text
    assert main(["check", "--dataset", "coco", "--root", str(tmp_path / "nope")]) == 1
    text = capsys.readouterr().out
    assert "does not exist" in text and "annotations_trainval2014.zip" in text
    assert main(["check", "--dataset", "coco", "--root", str(empty)]) == 1
    text = capsys.readouterr().out
    assert "instances_train2014.json" in text and "train2014.zip" in text
    fss = fss_fixture(tmp_path / "fss")
    (fss / "dog" / "2.png").unlink()
    assert main(["check", "--dataset", "fss1000", "--root", str(fss)]) == 1
    assert "dog/2.png" in capsys.readouterr().out
    # a size mismatch is named with both files
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "masks").mkdir()
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(broken / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(broken / "masks" / "a.png")
    (broken / "train.txt").write_text("a\n")
    assert main(["check", "--dataset", "folder", "--root", str(broken)]) == 1
    text = capsys.readouterr().out
    assert "size-mismatched" in text and "masks/a.png" in text and "images/a.png" in text


def test_prepare_coco_lists_and_cache(tmp_path, capsys):
    root = tmp_path / "coco"
    coco_fixture(root, "train2014")
    coco_fixture(root, "val2014")
    res = prepare_coco(root, write_masks=True)
    text = capsys.readouterr().out
    assert res["train"] == res["val"] == 6 and res["mismatches"] == 2
    assert "annotated train2014: 6, but the published count is 82081" in text
    assert "annotated val2014: 6, but the published count is 40137" in text
    names = (root / "lists" / "val2014.txt").read_text().split()
    assert names == [f"COCO_val2014_{i:012d}.jpg" for i in range(1, 7)]
    src = build_source("coco", "val", root=root)
    assert len(src._counts) == 6  # cache from prepare
    png = build_source("coco", "val", root=root, mask_dir="masks/val2014", stats_cache=None)
    dirs = {"train": "masks/train2014", "val": "masks/val2014"}  # one setting for both splits
    per_split = build_source("coco", "val", root=root, mask_dir=dirs, stats_cache=None)
    for i in range(6):
        assert np.array_equal(png.load_mask(i), src.load_mask(i))
        assert per_split.mask_paths[i] == png.mask_paths[i]
    train = build_source("coco", "train", root=root, mask_dir=dirs, stats_cache=None)
    assert train.mask_paths[0].parent == root / "masks" / "train2014"
    fold0 = json.loads((root / "lists" / "fold0" / "val_classes.json").read_text())
    assert fold0["1"] == [
        "COCO_val2014_000000000002",
        "COCO_val2014_000000000004",
        "COCO_val2014_000000000006",
    ]
    ds = EpisodeDataset(src, 0, 1, "test", 4, classes=[1])
    assert [src.keys[i] for i in ds.class_images[1]] == fold0["1"]


def test_build_fold_lists_rule():
    counts = np.zeros((4, 21), np.int64)
    counts[0, [0, 1, 7]] = [100, 3000, 10]  # class 1 big, class 7 tiny
    counts[1, [0, 7]] = [100, 2048]  # exactly 2048 counts
    counts[2, [0, 7]] = [100, 2047]
    counts[3, [0, 12]] = [100, 5000]
    tr = build_fold_lists(["a", "b", "c", "d"], counts, 20, "block", "train")
    assert tr[0]["images"] == ["b", "d"]  # a holds novel class 1: dropped (BAM)
    assert tr[1]["images"] == ["d"]  # a has class 7 (novel in fold 1) pixels; b's 7 is novel
    va = build_fold_lists(["a", "b", "c", "d"], counts, 20, "block", "val")
    assert va[0]["images"] == ["a"] and va[1]["classes"][7] == ["b"]
