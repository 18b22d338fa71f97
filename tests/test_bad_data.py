"""Nothing dropped, nothing leaked: file sources read every image whatever its suffix's case,
name orphan files, check mask values, sizes, truncation and EXIF rotation when the masks are
first read (start-up), say why a class lacks images, and keep training classes out of the
test classes unless told otherwise."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from _data_fixtures import (
    corrupt_file,
    folder_fixture,
    fss_fixture,
    write_exif_jpeg,
    write_gray_png,
)
from cgmgm.config import config_dir
from cgmgm.data import DatasetError, EpisodeDataset, EpisodicDataModule, build_source
from cgmgm.data.prepare import main as prepare_main

CAM = ["sky", "road", "car", "tree"] + [f"unused{v}" for v in range(4, 11)] + ["void"]


def _fss(tmp_path: Path, **kw) -> Path:
    return fss_fixture(tmp_path / "fss", **kw)


def _episodes(src, shot: int = 1) -> EpisodeDataset:
    """Start-up: what a run does first (every class of the source, every mask read)."""
    return EpisodeDataset(src, 0, shot, "test", 4, classes=range(1, src.num_classes + 1))


# ---------------------------------------------------------------------- 1: suffixes, orphans


def test_fss_reads_jpg_jpeg_and_png_in_any_case(tmp_path, capsys):
    root = _fss(tmp_path, per_class=4)
    (root / "cat" / "2.jpg").rename(root / "cat" / "2.JPG")
    (root / "cat" / "3.jpg").rename(root / "cat" / "3.jpeg")
    (root / "dog" / "4.png").rename(root / "dog" / "4.PNG")
    src = build_source("fss1000", "test", root=root)
    assert len(src) == 12  # nothing skipped
    assert src.keys[:4] == ["cat/1", "cat/2", "cat/3", "cat/4"]
    assert src.image_paths[1].name == "2.JPG" and src.image_paths[2].name == "3.jpeg"
    assert src.mask_paths[7].name == "4.PNG"
    assert _episodes(src, shot=3).class_images[1].tolist() == [0, 1, 2, 3]
    assert prepare_main(["check", "--dataset", "fss1000", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "3 class folders, 12 image/mask pairs" in text and "all present" in text


def test_fss_orphans_and_ambiguous_names_are_errors_naming_the_file(tmp_path, capsys):
    root = _fss(tmp_path)
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(root / "cat" / "9.png")  # no image
    with pytest.raises(DatasetError, match=r"mask .*cat/9\.png has no image .*cat/9\.jpg"):
        build_source("fss1000", "test", root=root)
    assert prepare_main(["check", "--dataset", "fss1000", "--root", str(root)]) == 1
    assert "cat/9.png has no image" in capsys.readouterr().out
    (root / "cat" / "9.png").unlink()
    (root / "dog" / "1.jpg").rename(root / "dog" / "1.jpeg")
    (root / "dog" / "2.jpg").rename(root / "dog" / "1.JPG")  # now two images of stem "1"
    with pytest.raises(DatasetError, match=r"1\.JPG, .*1\.jpeg.* share the stem '1'"):
        build_source("fss1000", "test", root=root)
    (root / "dog" / "1.JPG").rename(root / "dog" / "2.jpg")
    (root / "eagle" / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match=r"1 file\(s\) or folder\(s\).*eagle/notes\.txt"):
        assert len(build_source("fss1000", "test", root=root)) == 9


def test_folder_source_suffixes_in_any_case_and_orphans(tmp_path):
    root = tmp_path / "cam"
    folder_fixture(root)
    kw = {"classes": CAM, "background": None, "ignore_index": [11]}
    (root / "images" / "f000.jpg").rename(root / "images" / "f000.Jpg")
    (root / "labels" / "f001.png").rename(root / "labels" / "f001.PNG")
    src = build_source("folder", "train", root=root, **kw)  # train.txt: f000..f004
    assert src.image_paths[0].name == "f000.Jpg" and src.mask_paths[1].name == "f001.PNG"
    every = build_source("folder", "train", root=root, list_file="all", **kw)
    assert len(every) == 8 and every.keys[0] == "f000"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labels" / "x9.png")
    with pytest.raises(DatasetError, match=r"mask .*labels/x9\.png has no image"):
        build_source("folder", "train", root=root, list_file="all", **kw)
    (root / "labels" / "x9.png").unlink()
    (root / "labels" / "f002.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*f002\.jpg has no mask .*f002\.png"):
        build_source("folder", "train", root=root, list_file="all", **kw)


# ---------------------------------------------------------------------- 2: mask values


def test_fss_mask_saved_as_0_1_is_named_at_start_up(tmp_path):
    root = _fss(tmp_path)
    m = np.zeros((32, 40), np.uint8)
    m[4:22, 6:26] = 1
    write_gray_png(root / "eagle" / "2.png", m)
    src = build_source("fss1000", "test", root=root)  # lazy: nothing read yet
    with pytest.raises(
        DatasetError,
        match=r"(?s)1 problem\(s\) found at start-up.*eagle/2\.png has values \{0, 1\}: "
        r"expected 0/255 \(FSS-1000.*threshold=0",
    ):
        _episodes(src)


def test_fss_all_masks_0_1_read_with_threshold_0(tmp_path):
    root = _fss(tmp_path)
    for mask in root.glob("*/*.png"):
        g = np.asarray(Image.open(mask).convert("L"))
        write_gray_png(mask, (g > 127).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"9 problem\(s\)") as err:
        _episodes(build_source("fss1000", "test", root=root))
    assert "class 1: 0 image(s)" not in str(err.value)
    src = build_source("fss1000", "test", root=root, threshold=0)
    ds = _episodes(src)
    assert [len(v) for v in ds.class_images.values()] == [3, 3, 3]
    assert (ds[0]["query_mask"] == 1).any()


def test_folder_binary_0_255_masks_are_explained(tmp_path):
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(root / "images" / f"{k}.jpg")
        m = np.zeros((16, 16), np.uint8)
        m[4:12, 4:12] = 255  # a binary mask, but this source reads class indices
        write_gray_png(root / "masks" / f"{k}.png", m)
    (root / "train.txt").write_text("0\n1\n2\n3\n")
    src = build_source("folder", "train", root=root, classes=["background", "cat"])
    with pytest.warns(UserWarning, match=r"4 mask\(s\) hold no class pixel.*0/255 binary"):
        with pytest.raises(ValueError, match=r"class 1: 0 image\(s\) \('cat': no mask holds") as e:
            _episodes(src)
    msg = str(e.value)
    assert "label value(s) 1 ('cat')" in msg and "0/255 binary" in msg
    assert "num_images" not in msg


# ---------------------------------------------------------------------- 3: class splits


def test_training_on_its_test_classes_is_refused(tmp_path):
    root = _fss(tmp_path, classes=("a", "b", "c", "d", "e", "f", "g", "h"))
    kw = {"dataset": "fss1000", "root": str(root), "train_episodes": 4, "val_episodes": 4}
    dm = EpisodicDataModule(**kw, classes="all", train_classes="all")
    with pytest.raises(ValueError, match=r"8 of the 8 test classes are classes this run trains"):
        dm.setup("fit")
    ok = EpisodicDataModule(**kw, classes="all", train_classes="all", allow_seen_classes=True)
    ok.setup("fit")
    assert ok.class_record()["seen_test_classes"] == list("abcdefgh")
    # the source's blocks: fold 1 tests c, d and trains on the six others
    split = EpisodicDataModule(**kw, dataset_kwargs={"folds": 4}, fold=1, classes="auto")
    split.setup("fit")
    rec = split.class_record()
    assert rec["test_class_ids"] == [3, 4] and rec["test_class_names"] == ["c", "d"]
    assert rec["train_class_ids"] == [1, 2, 5, 6, 7, 8]
    assert rec["train_class_names"] == ["a", "b", "e", "f", "g", "h"]
    assert rec["seen_test_classes"] == [] and split.train_set.classes == [1, 2, 5, 6, 7, 8]
    # an evaluation of a checkpoint trained on some classes refuses them too
    seen = EpisodicDataModule(**kw, classes="all", seen_classes=["a", "b"])
    with pytest.raises(ValueError, match=r"2 of the 8 test classes.*was trained on"):
        seen.setup("test")


def test_training_free_evaluation_keeps_every_class(tmp_path):
    from cgmgm.data.files import block_folds

    root = _fss(tmp_path, classes=("a", "b", "c", "d", "e"))
    free = EpisodicDataModule(
        dataset="fss1000",
        root=str(root),
        dataset_kwargs={"folds": 4},
        classes="auto",
        training_free=True,
        test_episodes=4,
    )
    free.setup("test")
    assert free.classes == [1, 2, 3, 4, 5]
    assert free.class_record(training=False)["train_class_ids"] is None
    assert block_folds(5, 4) == [[1, 2], [3], [4], [5]] and block_folds(3, 4) == [[1], [2], [3]]


@pytest.mark.parametrize("dataset", ["fss1000", "folder"])
def test_dataset_configs_split_classes_for_training_only(dataset, tmp_path):
    root = tmp_path / "data"
    extra = []
    if dataset == "fss1000":
        fss_fixture(root, classes=("a", "b", "c", "d", "e", "f", "g", "h"))
    else:
        folder_fixture(root)
        extra = [
            f"dataset.dataset_kwargs.classes=[{','.join(CAM)}]",
            "dataset.dataset_kwargs.background=null",
            "dataset.dataset_kwargs.ignore_index=[11]",
        ]

    def data_module(app: str, *more: str) -> EpisodicDataModule:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(app, [f"dataset={dataset}", f"dataset.root={root}", *extra, *more])
        return instantiate(cfg.dataset)

    free = data_module("eval", "model=training_free", "fold=0", "shot=1")
    assert free.classes == list(range(1, free.source("test").num_classes + 1))
    trained = data_module("train", "fold=1")
    names = set(trained.class_record(training=True)["train_class_names"])
    assert names and not names & set(trained.class_record()["test_class_names"])
    leaky = data_module("train", "dataset.classes=all", "dataset.train_classes=all")
    with pytest.raises(ValueError, match=r"allow_seen_classes=true"):
        leaky.check_class_split()
    assert data_module("train", "dataset.classes=all", "dataset.allow_seen_classes=true")


# ---------------------------------------------------------------------- 6: sizes, truncation


def test_size_mismatch_and_truncated_image_found_at_start_up(tmp_path):
    root = _fss(tmp_path)
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "cat" / "2.png")
    corrupt_file(root / "dog" / "3.jpg")
    src = build_source("fss1000", "test", root=root)
    with pytest.raises(DatasetError) as err:
        _episodes(src)  # before any episode is drawn
    msg = str(err.value)
    assert "2 problem(s) found at start-up" in msg
    assert "cat/2.png is 31x40 but image" in msg and "cat/2.jpg is 32x40" in msg
    assert "cannot decode image" in msg and "dog/3.jpg" in msg and "truncated" in msg


def test_exif_rotation_is_named_when_the_rotated_size_matches(tmp_path):
    root = _fss(tmp_path)
    write_exif_jpeg(root / "cat" / "1.jpg", 1, (40, 32), orientation=6)  # stored 40x32
    with pytest.raises(
        DatasetError,
        match=r"cat/1\.png is 32x40 but image .*cat/1\.jpg is 40x32.*EXIF orientation tag "
        r"\(6: rotate 90 degrees clockwise\) shows it as 32x40, which the mask matches",
    ):
        _episodes(build_source("fss1000", "test", root=root))
    write_exif_jpeg(root / "cat" / "1.jpg", 1, (32, 40), orientation=3)  # sizes agree
    with pytest.warns(UserWarning, match=r"EXIF orientation.*cat/1\.jpg \(3: rotate 180"):
        _episodes(build_source("fss1000", "test", root=root))


# ---------------------------------------------------------------------- 7: too few images


def test_too_few_images_names_the_class_the_reason_and_a_fitting_fix(tmp_path):
    root = _fss(tmp_path)
    for n in (2, 3):
        write_gray_png(root / "dog" / f"{n}.png", np.zeros((32, 40), np.uint8))
    src = build_source("fss1000", "test", root=root)
    with pytest.warns(UserWarning, match=r"2 mask\(s\) hold no class pixel.*dog/2\.png"):
        with pytest.raises(ValueError) as err:
            _episodes(src)
    msg = str(err.value)
    assert "class 2: 1 image(s) ('dog': 3 image(s) in its folder, 2 with no object pixel)" in msg
    assert f"add images (<n>.jpg with its <n>.png mask, object in white) to {root / 'dog'}" in msg
    assert "num_images" not in msg
    cam = tmp_path / "cam"
    folder_fixture(cam)
    folder = build_source("folder", "test", root=cam, classes=CAM, background=None, ignore_index=11)
    with pytest.raises(ValueError, match=r"class 5: 0 image\(s\) \('unused4': no mask holds it\)"):
        EpisodeDataset(folder, 0, 1, "test", 4, classes=[1, 5])


# ---------------------------------------------------------------------- 8: no background


def test_masks_without_background_or_all_ignore_are_warned_about(tmp_path):
    root = _fss(tmp_path)
    write_gray_png(root / "cat" / "1.png", np.full((32, 40), 255, np.uint8))
    with pytest.warns(UserWarning, match=r"1 mask\(s\) have no background pixel.*cat/1\.png"):
        _episodes(build_source("fss1000", "test", root=root))
    cam = tmp_path / "cam"
    folder_fixture(cam)
    write_gray_png(cam / "labels" / "f001.png", np.full((64, 80), 11, np.uint8))  # unlabelled
    src = build_source("folder", "train", root=cam, classes=CAM, background=None, ignore_index=11)
    with pytest.warns(UserWarning, match=r"1 mask\(s\) are entirely 255 \(ignore\).*f001\.png"):
        src.classes_in(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean data: no warning
        _episodes(build_source("fss1000", "test", root=_fss(tmp_path / "clean")))


def test_check_mode_runs_the_start_up_checks(tmp_path, capsys):
    root = _fss(tmp_path)
    write_gray_png(root / "cat" / "3.png", (np.asarray(Image.open(root / "cat" / "3.png")) > 0))
    corrupt_file(root / "eagle" / "2.jpg")
    assert prepare_main(["check", "--dataset", "fss1000", "--root", str(root)]) == 1
    text = capsys.readouterr().out
    assert "BAD      mask" in text and "cat/3.png has values {0, 1}" in text
    assert "eagle/2.jpg" in text and "2 problem(s) found" in text
