"""Real photos: CamVid as a user ``folder`` and DAVIS-2016 (FSS-1000 layout) as ``fss1000``,
evaluated on all their classes under the BAM protocol (skipped without ../shared/data)."""

import torch

from cgmgm.data import EpisodicDataModule, build_source, get_protocol

CAMVID_NAMES = [
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
    "unlabelled",
]


def test_camvid_as_folder(shared_data):
    root = shared_data / "camvid"
    kw = {"root": str(root), "classes": CAMVID_NAMES, "background": None, "ignore_index": [11]}
    src = build_source("folder", "test", **kw)
    assert len(src) == 233 and src.num_classes == 11 and src.class_names[1] == "sky"
    img, mask = src.load(0)
    assert img.shape == (360, 480, 3) and mask.shape == (360, 480)
    assert set(mask.ravel().tolist()) <= set(range(1, 12)) | {255}  # no background value
    bam = get_protocol("bam")
    dm = EpisodicDataModule(
        dataset="folder",
        dataset_kwargs=kw,
        shot=1,
        eval_split="test",
        classes="all",
        eval_batch_size=2,
        test_episodes=4,
        eval_transform=bam.eval_transform("folder"),
        original_size=480,
        sampling=bam.sampling_for("folder"),
    )
    dm.setup("test")
    assert dm.classes == list(range(1, 12))
    batch = next(iter(dm.test_dataloader()))
    assert batch["query_img"].shape == (2, 3, 473, 473)
    assert batch["support_masks"].shape == (2, 1, 473, 473)
    assert batch["query_mask_orig"].shape == (2, 480, 480)
    assert batch["query_orig_size"].tolist() == [[360, 480], [360, 480]]
    for m in (batch["query_mask"], batch["support_masks"]):
        assert (m == 1).any() and set(torch.unique(m).tolist()) <= {0, 1, 255}


def test_davis_as_fss1000(shared_data):
    root = shared_data / "davis2016"
    src = build_source("fss1000", "test", root=str(root))
    assert len(src) == 277 and src.num_classes == 20 and src.class_names[1] == "blackswan"
    img, mask = src.load(0)
    assert img.shape == (480, 854, 3) and set(mask.ravel().tolist()) == {0, 1}
    hsnet = get_protocol("hsnet")
    dm = EpisodicDataModule(
        dataset="fss1000",
        dataset_kwargs={"root": str(root)},
        shot=2,
        eval_split="test",
        eval_batch_size=3,
        test_episodes=3,
        test_seed=hsnet.seeds[0],
        eval_transform=hsnet.eval_transform("fss1000"),
    )
    dm.setup("test")
    assert dm.classes == list(range(1, 21))  # the source's single fold holds every class
    batch = next(iter(dm.test_dataloader()))
    assert batch["query_img"].shape == (3, 3, 400, 400)
    assert batch["support_imgs"].shape == (3, 2, 3, 400, 400)
    for k in range(3):
        cls = int(batch["class_id"][k])
        q = int(batch["query_source_idx"][k])
        assert src.image_class[q] == cls
        assert all(src.image_class[s] == cls for s in batch["support_source_idx"][k].tolist())
        assert q not in batch["support_source_idx"][k].tolist()
