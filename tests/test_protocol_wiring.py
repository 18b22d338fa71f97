"""The protocol reaches every run: the data module takes its filter, sampling, episode counts,
seeds and transforms; the Hydra apps take `protocol=`, the dataset configs and `dataset.root=`,
and record the protocol in metrics.json. Real dataset configs run end to end on fixtures in
the exact on-disk formats, and on ../shared/data (DAVIS as fss1000, CamVid as folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from _data_fixtures import W, coco_fixture, folder_fixture, fss_fixture, pascal_fixture
from cgmgm.config import config_dir
from cgmgm.data import DatasetError, EpisodicDataModule
from cgmgm.data.transforms import BAMTrainTransform, PadResize, SquashResize
from cgmgm.eval import evaluate

NAMES = ["sky", "a", "b", "c"] + [f"x{k}" for k in range(7)] + ["unlabelled"]  # values 0..11


@pytest.fixture(scope="module")
def pascal(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    pascal_fixture(root)
    return root


def _dm(root: Path, protocol: str | None, **kw) -> EpisodicDataModule:
    return EpisodicDataModule(dataset="pascal", root=str(root), protocol=protocol, **kw)


def test_bam_is_the_papers_protocol(pascal):
    dm = _dm(pascal, "bam", original_size=500)
    assert dm.filter_novel and dm.sampling == "image"  # novel-image filter, image list
    assert (dm.test_episodes, dm.test_seed) == (1000, 510)
    assert isinstance(dm.train_transform, BAMTrainTransform) and dm.train_transform.size == 473
    assert isinstance(dm.eval_transform, PadResize) and dm.eval_transform.size == 473
    dm.setup("test")
    assert dm.test_set.original_size == 500 and dm.test_set.transform is dm.eval_transform


def test_hsnet_and_pfenet_differ_where_their_code_does(pascal):
    hsnet = _dm(pascal, "hsnet", original_size=500)
    assert not hsnet.filter_novel and (hsnet.test_episodes, hsnet.test_seed) == (1000, 0)
    assert isinstance(hsnet.eval_transform, SquashResize) and hsnet.eval_transform.size == 400
    hsnet.setup("test")
    assert hsnet.test_set.original_size is None  # scored at 400 x 400, not at original size
    pfenet = _dm(pascal, "pfenet", original_size=500)
    assert not pfenet.filter_novel and (pfenet.test_episodes, pfenet.test_seed) == (5000, 321)
    coco = EpisodicDataModule(dataset="coco", protocol="pfenet", original_size=640)
    assert coco.test_episodes == 20000 and coco.eval_transform.size == 641
    hs_coco = EpisodicDataModule(dataset="coco", protocol="hsnet")
    assert hs_coco.sampling == "class"  # HSNet's COCO loader draws the class first
    assert hsnet.sampling == "pair"  # HSNet's PASCAL list: one entry per (image, class)


def test_explicit_settings_win_over_the_protocol(pascal):
    dm = _dm(
        pascal,
        "bam",
        original_size=500,
        test_episodes=7,
        test_seed=3,
        filter_novel=False,
        sampling="class",
        eval_transform=None,
    )
    assert (dm.test_episodes, dm.test_seed, dm.filter_novel, dm.sampling) == (7, 3, False, "class")
    assert dm.eval_transform is None and isinstance(dm.train_transform, BAMTrainTransform)
    dm.setup("test")  # no test resize: query_mask is the original label, scored as it is
    assert dm.test_set.original_size is None and "query_mask_orig" not in dm.test_set[0]
    plain = _dm(pascal, None)  # no protocol: the plain defaults, no transforms
    assert (plain.test_episodes, plain.filter_novel, plain.sampling) == (1000, True, "class")
    assert plain.train_transform is None and plain.eval_transform is None


def test_bad_protocol_settings_say_what_to_set(pascal):
    with pytest.raises(ValueError, match=r"original_size.*dataset\.original_size=auto"):
        _dm(pascal, "bam")  # resized test images cannot be scored at original size
    with pytest.raises(ValueError, match="choose one of"):
        _dm(pascal, "oslsm")
    with pytest.raises(ValueError, match="must be 'protocol'"):
        _dm(pascal, "bam", original_size=500, eval_transform="pad")
    dm = _dm(pascal, "bam", original_size=60)  # smaller than the 80-px fixture images
    dm.setup("test")
    with pytest.raises(ValueError, match="raise original_size to at least 80"):
        dm.test_set[0]


def test_train_episodes_none_is_one_per_training_image(pascal):
    # fold 0: base classes 6..20 are the big object of 60 train images; 2 of those also hold
    # a few pixels of novel class 2, which BAM's filter drops and HSNet's loader keeps
    for protocol, expected in (("bam", 58), ("hsnet", 60)):
        dm = _dm(pascal, protocol, original_size=500, train_episodes=None)
        dm.setup("fit")
        assert len(dm.train_set) == expected
        assert len(dm.train_dataloader()) == expected // dm.batch_size


def test_original_size_auto_reads_the_image_headers(tmp_path):
    root = tmp_path / "cam"
    folder_fixture(root)
    big = root / "images" / "f007.jpg"  # f007 is in test.txt: make it 70 x 90
    Image.open(big).resize((90, 70)).save(big)
    Image.open(root / "labels" / "f007.png").resize((90, 70), Image.NEAREST).save(
        root / "labels" / "f007.png"
    )
    kw = {"classes": NAMES, "ignore_index": list(range(4, 12))}
    dm = EpisodicDataModule(
        dataset="folder",
        root=str(root),
        dataset_kwargs=kw,
        protocol="bam",
        eval_split="test",
        classes="all",
        original_size="auto",
        test_episodes=4,
    )
    dm.setup("test")
    assert dm.original_size == 90  # the other images are 64 x 80
    assert dm.test_set[0]["query_mask_orig"].shape == (90, 90)


# ---------------------------------------------------------------------- Hydra, end to end


def _eval_cfg(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            "eval",
            overrides=[
                "model=training_free",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "dataset.num_workers=0",
                "dataset.eval_batch_size=2",
                f"paths.output_dir={out}",
                *overrides,
            ],
        )


def _check_run(out: Path, ev: dict, protocol: str, episodes: int, original: int | None) -> None:
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["protocol"]["name"] == protocol and saved["test_episodes"] == episodes
    assert saved["original_size"] == original
    for key in ("test/mIoU", "test/FB-IoU", "test/GmIoU"):
        assert 0.0 <= ev[key] <= 100.0 and saved[key] == pytest.approx(ev[key])


@pytest.mark.parametrize("dataset", ["pascal", "coco", "fss1000", "folder"])
def test_dataset_configs_evaluate_fixtures(dataset, tmp_path):
    root = tmp_path / "data"
    extra: list[str] = []
    if dataset == "pascal":
        pascal_fixture(root)
    elif dataset == "coco":
        coco_fixture(root, "val2014")
        extra = ["dataset.classes=[1,12]"]  # the fixture's two annotated classes
    elif dataset == "fss1000":
        fss_fixture(root)
    else:
        folder_fixture(root)  # label values 0..3 present, 4..10 named but absent, 11 unlabelled
        extra = [
            f"dataset.dataset_kwargs.classes=[{','.join(NAMES)}]",
            "dataset.dataset_kwargs.background=null",
            f"dataset.dataset_kwargs.ignore_index={list(range(4, 12))}",
        ]
    out = tmp_path / "run"
    ev = evaluate(
        _eval_cfg(
            out,
            f"dataset={dataset}",
            f"dataset.root={root}",
            "dataset.test_episodes=2",
            "eval.seeds=[510]",
            *extra,
        )
    )
    original = {"pascal": 500, "coco": 640, "fss1000": 40, "folder": W}[dataset]
    _check_run(out, ev, "bam", 2, original)
    assert ev["dataset"] == dataset and ev["seeds"] == [510]


def test_protocol_choice_sets_the_seeds_and_is_recorded(tmp_path):
    tiny = [
        "dataset.dataset_kwargs.image_size=32",
        "dataset.dataset_kwargs.num_images={train:40,val:60}",
        "dataset.test_episodes=4",
        "model.gmm.iters=2",
    ]
    out = tmp_path / "hsnet"
    ev = evaluate(_eval_cfg(out, "protocol=hsnet", "fold=0", "shot=1", *tiny))
    assert ev["seeds"] == [0]  # eval.seeds null: HSNet's single run with seed 0
    _check_run(out, ev, "hsnet", 4, None)
    out = tmp_path / "pfenet"
    ev = evaluate(_eval_cfg(out, "protocol=pfenet", "fold=0", "shot=1", *tiny))
    assert ev["seeds"] == [321]
    with pytest.raises(ValueError, match="choose one of"):
        evaluate(_eval_cfg(tmp_path / "bad", "protocol=oslsm", "fold=0", "shot=1", *tiny))


def test_protocol_settings_override_from_the_command_line(tmp_path):
    cfg = _eval_cfg(
        tmp_path,
        "dataset=coco",
        "protocol=bam",
        "fold=0",
        "shot=1",
        "dataset.filter_novel=false",
        "dataset.sampling=class",
        "dataset.dataset_kwargs.mask_dir={train:masks/train2014,val:masks/val2014}",
    )
    dm = instantiate(cfg.dataset)
    assert (dm.protocol.name, dm.filter_novel, dm.sampling) == ("bam", False, "class")
    assert dm.dataset_kwargs["mask_dir"] == {"train": "masks/train2014", "val": "masks/val2014"}
    tiny = ["dataset.dataset_kwargs.image_size=32", "dataset.test_episodes=2", "fold=0", "shot=1"]
    with pytest.raises(ValueError, match="set the top-level protocol= only"):
        evaluate(_eval_cfg(tmp_path, "protocol=hsnet", "dataset.protocol=bam", *tiny))


def test_missing_root_names_the_key(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset\.root="):
        evaluate(_eval_cfg(tmp_path, "dataset=pascal"))
    with pytest.raises(DatasetError, match="does not exist"):
        evaluate(_eval_cfg(tmp_path, "dataset=fss1000", f"dataset.root={tmp_path / 'nope'}"))


@pytest.mark.parametrize(
    ("dataset", "folder", "original", "classes"),
    [("fss1000", "davis2016", 854, 20), ("camvid", "camvid", 480, 11)],
)
def test_real_photos_through_the_eval_app(
    shared_data, tmp_path, dataset, folder, original, classes
):
    """The closing commands of the real-benchmark issue, on 4 episodes of one BAM seed."""
    out = tmp_path / dataset
    ev = evaluate(
        _eval_cfg(
            out,
            f"dataset={dataset}",
            f"dataset.root={shared_data / folder}",
            "shot=1",
            "dataset.test_episodes=4",
            "eval.seeds=[510]",
        )
    )
    _check_run(out, ev, "bam", 4, original)
    per_class = [k for k in ev if k.startswith("test/IoU/class_") and not k.endswith("_std")]
    assert per_class and all(1 <= int(k.rsplit("_", 1)[1]) <= classes for k in per_class)
    assert torch.isfinite(torch.tensor(ev["test/mIoU"]))
