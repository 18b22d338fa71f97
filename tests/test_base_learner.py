"""BAM's stage 1: the base learner (PPM + classifier) against an independent computation, the
base-class labels, the crop retries, the stage-1 scores, the hold-out split, and the app."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _data_fixtures import fss_fixture
from cgmgm.constants import IGNORE_INDEX
from cgmgm.data import EpisodicDataModule
from cgmgm.data.base import BaseDataModule, BaseImages, base_label_table
from cgmgm.data.transforms import BAMTrainTransform
from cgmgm.metrics import semantic_results
from cgmgm.models.backbone import build_backbone
from cgmgm.models.base_learner import BaseLearner
from cgmgm.models.pspnet import PSPNet


def _randomise_bn(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def _bn(x, w, b, mean, var, eps=1e-5):
    return (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps) * w[:, None, None] + b[
        :, None, None
    ]


def test_base_learner_matches_independent_pspnet_head():
    torch.manual_seed(0)
    c, n = 16, 5
    head = BaseLearner(c, n).eval()
    _randomise_bn(head)
    x = torch.randn(2, c, 13, 11)  # [B, C, h, w]: odd sizes for the bins' pooling
    sd = head.state_dict()
    # BAM's key names, so a released head loads unchanged
    assert {k.rsplit(".", 1)[0] for k in sd} >= {
        "ppm.features.0.1",
        "ppm.features.3.2",
        "cls.0",
        "cls.1",
        "cls.4",
    }
    assert sd["ppm.features.0.1.weight"].shape == (c // 4, c, 1, 1)
    assert sd["cls.0.weight"].shape == (512, 2 * c, 3, 3) and sd["cls.4.bias"].shape == (n,)
    # independent: numpy-free torch.nn.functional, written out per bin
    branches = [x]
    for i, b in enumerate((1, 2, 3, 6)):
        p = f"ppm.features.{i}."
        y = F.adaptive_avg_pool2d(x, b)
        y = F.conv2d(y, sd[p + "1.weight"])
        y = torch.relu(
            _bn(
                y,
                sd[p + "2.weight"],
                sd[p + "2.bias"],
                sd[p + "2.running_mean"],
                sd[p + "2.running_var"],
            )
        )
        branches.append(F.interpolate(y, size=(13, 11), mode="bilinear", align_corners=True))
    z = torch.cat(branches, 1)  # [B, 2C, h, w]
    z = F.conv2d(z, sd["cls.0.weight"], padding=1)
    z = torch.relu(
        _bn(
            z,
            sd["cls.1.weight"],
            sd["cls.1.bias"],
            sd["cls.1.running_mean"],
            sd["cls.1.running_var"],
        )
    )
    expected = F.conv2d(z, sd["cls.4.weight"], sd["cls.4.bias"])  # dropout off in eval
    with torch.no_grad():
        got = head(x)
    assert got.shape == (2, n, 13, 11)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_base_learner_needs_divisible_channels():
    with pytest.raises(ValueError, match="divisible by 4"):
        BaseLearner(30, 3)


def test_pspnet_fine_tunes_the_body_and_upsamples():
    net = PSPNet(build_backbone("efficientnet_lite0", weights=None), 4)
    assert all(p.requires_grad for p in net.parameters())
    assert net.body.training  # BatchNorm trains with the rest (BAM fine-tunes the backbone)
    logits = net(torch.rand(2, 3, 65, 97))
    assert logits.shape == (2, 4, 65, 97)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.body.parameters() if p.requires_grad)


def test_base_labels_keep_base_classes_only():
    table = base_label_table([2, 5, 7])
    mask = np.array([[0, 1, 2, 3], [5, 7, 255, 6]], dtype=np.uint8)
    assert table[mask].tolist() == [[0, 0, 1, 0], [2, 3, 255, 0]]  # novel 1, 3, 6 -> background
    with pytest.raises(ValueError, match="1..254"):
        base_label_table([0, 3])


class _Source:
    """Two 20x20 images: class 2 (base) and class 4 (novel) side by side, 255 border."""

    num_classes = 4

    def __len__(self):
        return 2

    def load(self, i):
        mask = np.zeros((20, 20), np.uint8)
        mask[:, :10], mask[:, 10:] = 2, 4
        mask[0] = 255
        return np.full((20, 20, 3), 10 * i, np.uint8), mask


def test_base_images_relabel_without_filtering():
    ds = BaseImages(_Source(), base=[1, 2, 3], indices=[0, 1])
    assert len(ds) == 2  # images with novel pixels stay (BAM's unfiltered list)
    item = ds[1]
    assert item["image"].shape == (3, 20, 20) and item["index"] == 1
    label = item["label"]
    assert set(label[1:, :10].unique().tolist()) == {2}  # class 2 -> its position 1 + 1
    assert set(label[1:, 10:].unique().tolist()) == {0}  # novel class 4 -> background
    assert set(label[0].unique().tolist()) == {IGNORE_INDEX}


def test_crop_retries_keep_most_labelled_pixels():
    # a 40x40 object in the middle of a 200x200 image, cropped to 100: about 40% of the draws
    # keep 85% of it
    image = np.zeros((200, 200, 3), np.uint8)
    mask = np.zeros((200, 200), np.uint8)
    mask[80:120, 80:120] = 1

    def kept(retries: int) -> np.ndarray:
        t = BAMTrainTransform(
            size=100,
            scale=(1.0, 1.0),
            rotate_p=0.0,
            blur_p=0.0,
            flip_p=0.0,
            seed=3,
            crop_retries=retries,
        )
        return np.array([(t(image, mask)[1] == 1).sum() / 1600 for _ in range(40)])

    plain, retried = kept(0), kept(30)
    assert (plain >= 0.85).mean() < 0.8  # many plain crops lose part of the object
    assert (retried >= 0.85).all()  # 30 retries: P(all fail) ~ 0.6^31


def test_semantic_results_match_numpy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=5000)
    pred = np.where(rng.random(5000) < 0.6, target, rng.integers(0, 4, size=5000))
    target[:100] = 255  # ignored
    keep = target != 255
    cm = np.zeros((4, 4), np.int64)
    np.add.at(cm, (target[keep], pred[keep]), 1)
    out = semantic_results(torch.from_numpy(cm), [11, 12, 13], "val/")
    ious = []
    for j, cid in enumerate([11, 12, 13], start=1):
        inter = np.sum((target == j) & (pred == j) & keep)
        union = np.sum(((target == j) | (pred == j)) & keep)
        assert out[f"val/IoU/class_{cid}"] == pytest.approx(100 * inter / union)
        ious.append(100 * inter / union)
    assert out["val/mIoU"] == pytest.approx(np.mean(ious))  # background not averaged
    assert out["val/classes_present"] == 3


def test_semantic_results_leave_out_absent_classes():
    # class 7 has no target pixel, only 2 false positives: not averaged (a fixed class set)
    cm = torch.tensor([[5, 2, 0], [0, 0, 0], [1, 0, 3]])
    out = semantic_results(cm, [7, 9])
    assert "val/IoU/class_7" not in out and out["val/classes_present"] == 1
    assert out["val/mIoU"] == pytest.approx(75.0)


def test_fss_layout_holds_out_every_kth_image(tmp_path):
    root = fss_fixture(tmp_path / "fss", classes=("a", "b", "c", "d"), per_class=5)
    ep = EpisodicDataModule(
        "fss1000",
        dataset_kwargs={"folds": 4},
        root=str(root),
        fold=1,
        train_transform=None,
        eval_transform=None,
        eval_split="test",
    )
    data = BaseDataModule(ep, holdout=5)
    rec = data.split_record()
    assert data.shared and rec["base_class_ids"] == [1, 3, 4]  # fold 1 = class "b" is novel
    assert rec["train_images"] == 16 and rec["val_images"] == 4
    assert not set(data.train_set.indices) & set(data.val_set.indices)
    assert "held out" in rec["val_split"]
    assert data.class_names == ["background", "a", "c", "d"]


def test_augmentation_streams_differ_across_ddp_ranks(monkeypatch):
    image = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
    mask = np.zeros((120, 120), np.uint8)

    def draws(rank: int) -> list[np.ndarray]:
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: rank is not None)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
        t = BAMTrainTransform(size=64, seed=5)
        return [t(image, mask)[0] for _ in range(3)]

    single, rank0, rank1 = draws(None), draws(0), draws(1)
    assert all(np.array_equal(a, b) for a, b in zip(single, rank0, strict=True))  # unchanged
    assert not all(np.array_equal(a, b) for a, b in zip(rank0, rank1, strict=True))
