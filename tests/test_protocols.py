"""Protocols (BAM / HSNet / PFENet): their facts, test-time resizing, BAM's training augmentation
keeping 255 as ignore, and a pad-resize protocol scored end to end on files (the scoring itself
is tested in test_metrics.py)."""

import numpy as np
import pytest
import torch

from _data_fixtures import H, W, pascal_fixture
from cgmgm.data import EpisodeDataset, build_source
from cgmgm.data.protocols import BAM_SEEDS, PROTOCOLS, bam_seeds, get_protocol
from cgmgm.data.transforms import BAMTrainTransform, PadResize, SquashResize, bam_train_transform
from cgmgm.metrics import FSSIoU, score


def test_protocol_facts():
    assert set(PROTOCOLS) == {"bam", "hsnet", "pfenet"}
    bam, hsnet, pfenet = (PROTOCOLS[k] for k in ("bam", "hsnet", "pfenet"))
    assert BAM_SEEDS == bam_seeds() == (510, 365, 382, 322, 988) and bam.seeds == BAM_SEEDS
    assert bam.episodes("pascal") == bam.episodes("coco") == 1000
    assert hsnet.seeds == (0,) and hsnet.episodes("coco") == 1000
    assert pfenet.seeds == (321,)
    assert pfenet.episodes("pascal") == 5000 and pfenet.episodes("coco") == 20000
    assert bam.filter_novel and not hsnet.filter_novel and not pfenet.filter_novel
    assert bam.size("pascal") == 473 and bam.size("coco") == 641 and hsnet.size("coco") == 400
    assert bam.score_at_original and pfenet.score_at_original and not hsnet.score_at_original
    assert isinstance(bam.eval_transform("coco"), PadResize)
    assert isinstance(hsnet.eval_transform("pascal"), SquashResize)
    assert isinstance(hsnet.train_transform("pascal"), SquashResize)
    assert bam.as_dict()["name"] == "bam" and get_protocol("hsnet") is hsnet
    with pytest.raises(ValueError, match="choose one of"):
        get_protocol("oslsm")
    np_state = np.random.get_state()  # noqa: NPY002 (the global RNG stays untouched)
    bam_seeds()
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # noqa: NPY002


def test_pad_resize_matches_bam_geometry():
    t = PadResize(473)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 3, 255], np.uint8), size=(375, 500))
    out_img, out_mask, valid = t(img, mask)
    assert t.content_size(375, 500) == (352, 472)  # int(354.75) = 354 -> 352; 473 -> 472
    assert out_img.shape == (473, 473, 3) and out_mask.shape == (473, 473)
    assert (out_mask[352:] == 255).all() and (out_mask[:, 472:] == 255).all()
    assert (out_img[352:] == 0).all()
    assert valid[:352, :472].all() and valid[352:].sum() == 0 and valid[:, 472:].sum() == 0
    assert set(np.unique(out_mask)) <= {0, 3, 255}
    assert t.content_size(500, 100) == (472, 88)  # int(94.6) = 94 -> 88
    s_img, s_mask = SquashResize(400)(img, mask)
    assert s_img.shape == (400, 400, 3) and set(np.unique(s_mask)) <= {0, 3, 255}


def _blocks(h, w, seed):
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    for cls in (3, 7, 12):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        m[y : y + rng.integers(5, h // 2), x : x + rng.integers(5, w // 2)] = cls
    m[rng.random((h, w)) < 0.02] = 255
    return m


def test_bam_augmentation_keeps_class_ids_and_ignore():
    t = BAMTrainTransform(size=96, scale=(0.9, 1.1), rotate=10, rotate_p=1.0, seed=3)
    rng = np.random.default_rng(1)
    padded = 0
    for k in range(40):
        h, w = (int(v) for v in rng.integers(60, 140, 2))
        mask = _blocks(h, w, k)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out_img, out_mask, valid = t(img, mask)
        assert out_img.shape == (96, 96, 3) and out_img.dtype == np.uint8
        assert out_mask.shape == (96, 96) and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= set(np.unique(mask)) | {255}
        assert (out_mask[valid == 0] == 255).all()  # padding is ignore in the mask
        padded += int((valid == 0).mean() > 0.05)
    assert padded > 0  # rotation and crop padding appear in valid
    # a mask without 255 rotated by up to 10 degrees: the corners become 255
    plain = np.full((200, 200), 5, np.uint8)
    rot = BAMTrainTransform(size=200, scale=(1.0, 1.0), rotate=10, rotate_p=1.0, seed=0)
    outs = [rot(np.zeros((200, 200, 3), np.uint8), plain)[1] for _ in range(5)]
    assert any(o[0, 0] == 255 for o in outs) and all(set(np.unique(o)) <= {5, 255} for o in outs)


def test_bam_augmentation_presets_and_determinism():
    assert bam_train_transform("pascal").size == 473 and bam_train_transform("coco").size == 641
    img = np.random.default_rng(0).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    mask = _blocks(120, 150, 0)
    a, b = (BAMTrainTransform(size=64, seed=9) for _ in range(2))
    ra = [a(img, mask) for _ in range(4)]
    rb = [b(img, mask) for _ in range(4)]
    for (ia, ma, va), (ib, mb, vb) in zip(ra, rb, strict=True):
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb) and np.array_equal(va, vb)
    assert not all(np.array_equal(ra[0][1], r[1]) for r in ra[1:])  # random across calls


def test_augmentation_as_episode_transform(tmp_path):
    root = tmp_path / "voc"
    pascal_fixture(root)
    src = build_source("pascal", "train", root=root)
    ds = EpisodeDataset(src, 0, 1, "train", 4, transform=BAMTrainTransform(size=72, seed=0))
    ep = ds[1]
    assert ep["query_img"].shape == (3, 72, 72) and ep["support_masks"].shape == (1, 72, 72)
    assert set(ep["query_mask"].unique().tolist()) <= {0, 1, 255}


def test_end_to_end_pad_protocol_on_files(tmp_path):
    root = tmp_path / "voc"
    pascal_fixture(root)
    bam = PROTOCOLS["bam"]
    src = build_source("pascal", "val", root=root)
    t = PadResize(48)
    ds = EpisodeDataset(src, 1, 1, "test", 6, seed=0, transform=t, original_size=W)
    batch = torch.utils.data.default_collate([ds[k] for k in range(6)])
    assert batch["query_img"].shape == (6, 3, 48, 48) and batch["query_mask_orig"].shape == (
        6,
        W,
        W,
    )
    # query_valid is the content region of the pad resize: its padding is all ignore
    valid = batch["query_valid"]
    assert 0 < valid.mean() < 1 and (batch["query_mask"][valid == 0] == 255).all()
    # a perfect prediction at test size, scored at original size, stays close to 100
    q = batch["query_mask"]
    logits = torch.stack([(q == 0).float(), (q == 1).float()], 1) * 10
    metric = FSSIoU(len(ds.classes))
    score(metric, logits, batch, bam)
    assert float(metric.compute()["mIoU"]) > 85.0
    assert t.content_size(H, W) == (32, 48)
