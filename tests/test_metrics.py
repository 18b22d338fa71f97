"""Scoring: FSSIoU against a brute-force numpy reference, exactness under DDP-style splits and
any batch size, the one resize, scoring at original label size (BAM ``ori_resize``) and at test
size (HSNet), GmIoU."""

import dataclasses
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cgmgm.data.protocols import PROTOCOLS
from cgmgm.metrics import (
    FSSIoU,
    binarize,
    episode_results,
    flatten_results,
    original_size_prediction,
    restore_original,
    score,
)
from cgmgm.models.resize import resize

C = 5


def _random_batch(rng, b=40, h=13, w=17, missing=3):
    pred = rng.integers(0, 2, size=(b, h, w))
    target = (rng.random((b, h, w)) < rng.random((b, 1, 1))).astype(np.int64)
    target[rng.random((b, h, w)) < 0.1] = 255
    cls = rng.integers(0, C, size=b)
    cls[cls == missing] = 0  # class `missing` never appears
    return pred, target, cls


def _reference(pred, target, cls):
    """Per-episode loops, BAM definitions, percent."""
    inter, union = np.zeros(C), np.zeros(C)
    fb_i, fb_u = np.zeros(2), np.zeros(2)
    for p, t, c in zip(pred, target, cls, strict=True):
        v = t != 255
        p, t = p[v], t[v]
        inter[c] += np.sum((p == 1) & (t == 1))
        union[c] += np.sum((p == 1) | (t == 1))
        for k in (0, 1):
            fb_i[k] += np.sum((p == k) & (t == k))
            fb_u[k] += np.sum((p == k) | (t == k))
    seen = np.isin(np.arange(C), cls)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0) * 100
    per_class = np.where(seen, iou, np.nan)
    fb = fb_i / fb_u * 100
    return {"mIoU": iou[seen].mean(), "FB-IoU": fb.mean(), "per_class": per_class, "fb": fb}


def _t(*arrays):
    return [torch.as_tensor(a) for a in arrays]


def _check(res, ref):
    assert res["mIoU"].item() == pytest.approx(ref["mIoU"], abs=1e-9)
    assert res["FB-IoU"].item() == pytest.approx(ref["FB-IoU"], abs=1e-9)
    assert res["bg-IoU"].item() == pytest.approx(ref["fb"][0], abs=1e-9)
    assert res["fg-IoU"].item() == pytest.approx(ref["fb"][1], abs=1e-9)
    np.testing.assert_allclose(res["per_class"].numpy(), ref["per_class"], atol=1e-9)


def test_matches_bruteforce_in_batches():
    rng = np.random.default_rng(0)
    pred, target, cls = _random_batch(rng)
    m = FSSIoU(C)
    for sl in (slice(0, 7), slice(7, 8), slice(8, 40)):
        m.update(*_t(pred[sl], target[sl], cls[sl]))
    res = m.compute()
    ref = _reference(pred, target, cls)
    _check(res, ref)
    assert math.isnan(res["per_class"][3].item())
    assert 0 < res["mIoU"].item() < 100


def test_ignore_pixels_do_not_count():
    rng = np.random.default_rng(1)
    pred, target, cls = _random_batch(rng, b=8)
    a, b = FSSIoU(C), FSSIoU(C)
    a.update(*_t(pred, target, cls))
    flipped = pred.copy()
    flipped[target == 255] = 1 - flipped[target == 255]
    b.update(*_t(flipped, target, cls))
    for key in ("intersection", "union", "fb_intersection", "fb_union"):
        assert torch.equal(getattr(a, key), getattr(b, key))


def test_perfect_and_inverted_predictions():
    rng = np.random.default_rng(2)
    _, target, cls = _random_batch(rng, b=10)
    target[:, 0, 0], target[:, 0, 1] = 0, 1  # every episode has fg and bg pixels
    good = np.where(target == 255, 0, target)
    m = FSSIoU(C)
    m.update(*_t(good, target, cls))
    res = m.compute()
    assert res["mIoU"].item() == 100.0 and res["FB-IoU"].item() == 100.0
    m.reset()
    m.update(*_t(np.where(target == 1, 0, 1), target, cls))
    res = m.compute()
    assert res["mIoU"].item() == 0.0 and res["FB-IoU"].item() == 0.0


def test_scalar_class_idx_and_shape_errors():
    m = FSSIoU(C)
    pred = torch.ones(2, 4, 4, dtype=torch.long)
    m.update(pred, pred.clone(), 2)
    assert m.episodes.tolist() == [0, 0, 2, 0, 0]
    with pytest.raises(ValueError, match="resize"):
        m.update(pred, torch.ones(2, 5, 4), 1)
    with pytest.raises(ValueError, match="class_idx"):
        m.update(pred, pred, torch.tensor([0, 1, 2]))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_halves_summed_equal_whole():
    """DDP reduction (sum of states) over a split equals one process."""
    rng = np.random.default_rng(3)
    pred, target, cls = _random_batch(rng, b=31)
    whole = FSSIoU(C)
    whole.update(*_t(pred, target, cls))
    halves = [FSSIoU(C), FSSIoU(C)]
    halves[0].update(*_t(pred[:15], target[:15], cls[:15]))
    halves[1].update(*_t(pred[15:], target[15:], cls[15:]))
    summed = FSSIoU(C)
    for key in ("intersection", "union", "episodes", "fb_intersection", "fb_union"):
        setattr(summed, key, getattr(halves[0], key) + getattr(halves[1], key))
    merged = FSSIoU(C)
    merged.merge_state(halves[0])
    merged.merge_state(halves[1])
    expected = whole.compute()
    for m in (summed, merged):
        got = m.compute()
        for key in ("mIoU", "FB-IoU"):
            assert got[key].item() == expected[key].item()
        assert torch.equal(got["per_class"].nan_to_num(-1), expected["per_class"].nan_to_num(-1))
    _check(expected, _reference(pred, target, cls))


def _ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rng = np.random.default_rng(4)
        pred, target, cls = _random_batch(rng, b=21)
        m = FSSIoU(C)
        sl = slice(rank, None, 2)  # uneven shards: 11 and 10 episodes
        m.update(*_t(pred[sl], target[sl], cls[sl]))
        res = m.compute()  # torchmetrics all-reduces the summed states
        torch.save({k: v.clone() for k, v in res.items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_real_gloo_ddp_sync(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    rng = np.random.default_rng(4)
    ref = _reference(*_random_batch(rng, b=21))
    for rank in range(2):
        _check(torch.load(tmp_path / f"rank{rank}.pt"), ref)


def test_binarize():
    prob = torch.tensor([[[0.2, 0.5], [0.51, 0.9]]])  # [1, 2, 2]
    assert binarize(prob).tolist() == [[[0, 0], [1, 1]]]  # 0.5 itself is background
    assert torch.equal(binarize(prob[:, None]), binarize(prob))
    up = binarize(prob, size=(4, 4))
    assert up.shape == (1, 4, 4) and up.dtype == torch.long
    assert up[0, 0, 0] == 0 and up[0, 3, 3] == 1
    ref = F.interpolate(prob[:, None], size=(4, 4), mode="bilinear", align_corners=True)
    assert torch.equal(up, (ref[:, 0] > 0.5).long())  # the one resize: align_corners=True
    with pytest.raises(ValueError):
        binarize(torch.rand(1, 2, 3, 3))


def test_gmiou_is_a_second_instance():
    rng = np.random.default_rng(5)
    _, target, cls = _random_batch(rng, b=6)
    guidance = torch.rand(6, 13, 17)
    gm = FSSIoU(C)
    gm.update(binarize(guidance), torch.as_tensor(target), torch.as_tensor(cls))
    ref = _reference((guidance > 0.5).long().numpy(), target, cls)
    assert gm.compute()["mIoU"].item() == pytest.approx(ref["mIoU"], abs=1e-9)


def test_resize_is_bilinear_align_corners_true():
    maps = torch.randn(2, 3, 5, 7)
    assert resize(maps, (5, 7)) is maps  # already that size
    up = resize(maps, torch.Size([9, 4]))
    assert torch.equal(up, F.interpolate(maps, size=(9, 4), mode="bilinear", align_corners=True))
    assert torch.equal(up[..., 0, 0], maps[..., 0, 0])  # corners are kept (align_corners)
    assert torch.equal(up[..., -1, -1], maps[..., -1, -1])


def test_episode_results_adds_the_gmiou():
    iou, gm = FSSIoU(3), FSSIoU(3)
    ones, zeros = torch.ones(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long)
    iou.update(ones, ones, 1)
    gm.update(zeros, ones, 1)
    res = episode_results(iou, gm, "val/", class_ids=[6, 7, 8])
    assert res == {**flatten_results(iou.compute(), "val/", [6, 7, 8]), "val/GmIoU": 0.0}
    assert res["val/mIoU"] == 100.0


def test_flatten_results():
    m = FSSIoU(3)
    x = torch.ones(1, 2, 2, dtype=torch.long)
    m.update(x, x, 1)
    flat = flatten_results(m.compute(), "test/", class_ids=[6, 7, 8])
    assert flat["test/mIoU"] == 100.0 and "test/FB-IoU" in flat
    assert flat["test/IoU/class_7"] == 100.0
    assert "test/IoU/class_6" not in flat  # classes without episodes are omitted
    assert all(isinstance(v, float) for v in flat.values())


# ---------------------------------------------------------------------- scoring by protocol

STATES = ("intersection", "union", "episodes", "fb_intersection", "fb_union")
SIZES = [(37, 50), (50, 21), (44, 44), (12, 49), (50, 50), (30, 41), (9, 13)]  # (H, W)
CANVAS = 50


def _original_batch(seed=0, n_cls=3):
    """Test-size logits [N, 2, 17, 17] and guidance [N, 1, 6, 6] of queries whose original
    labels (random {0, 1, 255}) have the mixed sizes SIZES, pasted on a CANVAS square."""
    g = torch.Generator().manual_seed(seed)
    n = len(SIZES)
    labels, masks = [], torch.full((n, CANVAS, CANVAS), 255, dtype=torch.long)
    for k, (h, w) in enumerate(SIZES):
        lab = torch.randint(0, 2, (h, w), generator=g)
        lab[torch.rand(h, w, generator=g) < 0.1] = 255
        labels.append(lab.numpy())
        masks[k, :h, :w] = lab
    batch = {
        "query_mask_orig": masks,
        "query_orig_size": torch.tensor(SIZES),
        "class_idx": torch.arange(n) % n_cls,
    }
    logits = torch.randn(n, 2, 17, 17, generator=g)
    guidance = torch.rand(n, 1, 6, 6, generator=g)
    return logits, guidance, labels, batch


def _brute_force(maps, labels, cls_idx, n_cls, mode="pad"):
    """Per-episode reference (BAM test.py for "pad"): the label pasted top-left in a 255 square
    of side max(H, W), the maps upsampled (bilinear, align_corners=True) to it; "squash": to
    H x W. Foreground = argmax 1 of logits [2, h, w] or probability [1, h, w] > 0.5.
    Returns FSSIoU's integer states as numpy arrays."""
    inter, union, episodes = (np.zeros(n_cls, np.int64) for _ in range(3))
    fb_i, fb_u = np.zeros(2, np.int64), np.zeros(2, np.int64)
    for m, lab, c in zip(maps, labels, cls_idx, strict=True):
        h, w = lab.shape
        side = (max(h, w),) * 2 if mode == "pad" else (h, w)
        back = np.full(side, 255, np.int64)
        back[:h, :w] = lab
        up = F.interpolate(m[None].float(), size=side, mode="bilinear", align_corners=True)[0]
        pred = (up.argmax(0) if len(up) == 2 else (up[0] > 0.5).long()).numpy()
        valid = back != 255
        episodes[c] += 1
        for k, (p_on, t_on) in enumerate(((pred == 0, back == 0), (pred == 1, back == 1))):
            i = (p_on & t_on & valid).sum()
            u = ((p_on | t_on) & valid).sum()
            fb_i[k] += i
            fb_u[k] += u
            if k == 1:
                inter[c] += i
                union[c] += u
    return {
        "intersection": inter,
        "union": union,
        "episodes": episodes,
        "fb_intersection": fb_i,
        "fb_union": fb_u,
    }


def _scored(protocol, output, batch, batch_size, n_cls=3):
    """FSSIoU's states after scoring ``output`` in consecutive batches of ``batch_size``."""
    metric = FSSIoU(n_cls)
    n = output.shape[0]
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        score(metric, output[part], {k: v[part] for k, v in batch.items()}, protocol)
    return {k: getattr(metric, k).numpy() for k in STATES}


def test_scoring_at_original_size_equals_brute_force():
    logits, _, labels, batch = _original_batch()
    metric = FSSIoU(3)
    score(metric, logits, batch, PROTOCOLS["bam"])
    got = metric.compute()
    ref = _brute_force(logits, labels, batch["class_idx"].tolist(), 3)
    iou = ref["intersection"] / np.maximum(ref["union"], 1) * 100
    assert float(got["mIoU"]) == pytest.approx(iou.mean(), abs=1e-9)
    fb = ref["fb_intersection"] / ref["fb_union"] * 100
    assert float(got["FB-IoU"]) == pytest.approx(fb.mean(), abs=1e-9)
    pred, target = original_size_prediction(logits, batch)
    assert pred.shape == target.shape == (len(SIZES), CANVAS, CANVAS)
    for k, (h, w) in enumerate(SIZES):  # 0 outside each label
        assert (pred[k, h:] == 0).all() and (pred[k, :, w:] == 0).all()
    # a probability map goes through the same geometry, thresholded at 0.5
    prob = logits.softmax(1)[:, 1]
    pred_p, _ = original_size_prediction(prob, batch)
    for k, (h, w) in enumerate(SIZES):
        side = max(h, w)
        up = F.interpolate(
            prob[k][None, None], size=(side, side), mode="bilinear", align_corners=True
        )
        assert torch.equal(pred_p[k, :h, :w], (up[0, 0, :h, :w] > 0.5).long())


@pytest.mark.parametrize("mode", ["pad", "squash"])
def test_original_size_scores_do_not_depend_on_batch_size(mode):
    """The same episodes (mixed original sizes) scored one by one, three at a time and all in
    one batch give the same integer counts, equal to the per-episode reference; for the
    prediction (logits) and the guidance map (GmIoU) alike."""
    protocol = dataclasses.replace(PROTOCOLS["bam"], resize=mode)
    logits, guidance, labels, batch = _original_batch(seed=1)
    cls_idx = batch["class_idx"].tolist()
    for output in (logits, guidance):
        ref = _brute_force(output, labels, cls_idx, 3, mode)
        for batch_size in (1, 3, len(SIZES)):
            got = _scored(protocol, output, batch, batch_size)
            for key in STATES:
                assert np.array_equal(got[key], ref[key]), (mode, batch_size, key)
    other = dataclasses.replace(protocol, resize="squash" if mode == "pad" else "pad")
    assert not np.array_equal(
        _scored(other, logits, batch, 3)["union"], _scored(protocol, logits, batch, 3)["union"]
    )  # the resize mode matters, so the equalities above test it


def test_restore_original_squash_and_errors():
    maps = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = restore_original(maps, torch.tensor([[8, 6]]), 10, mode="squash")
    assert out.shape == (1, 1, 10, 10) and (out[0, 0, 8:] == 0).all()
    ref = F.interpolate(maps, size=(8, 6), mode="bilinear", align_corners=True)
    assert torch.allclose(out[0, 0, :8, :6], ref[0, 0])
    with pytest.raises(ValueError, match="exceeds the canvas"):
        restore_original(maps, torch.tensor([[12, 6]]), 10)
    with pytest.raises(ValueError, match="'pad' or 'squash'"):
        restore_original(maps, torch.tensor([[8, 6]]), 10, mode="crop")
    with pytest.raises(KeyError, match="original_size"):
        original_size_prediction(maps, {"query_mask": torch.zeros(1, 4, 4)})


def test_hsnet_scores_at_test_size():
    logits = torch.randn(2, 2, 5, 5)
    target = torch.randint(0, 2, (2, 20, 20))
    metric = FSSIoU(1)
    score(metric, logits, {"query_mask": target, "class_idx": 0}, PROTOCOLS["hsnet"])
    up = F.interpolate(logits, size=(20, 20), mode="bilinear", align_corners=True).argmax(1)
    ref = FSSIoU(1)
    ref.update(up, target, 0)
    for key in STATES:
        assert torch.equal(getattr(metric, key), getattr(ref, key))


def test_original_size_protocol_without_original_labels_scores_query_mask():
    """Episodes that were not resized carry no query_mask_orig: their query_mask is the
    original label, scored as it is."""
    logits = torch.randn(2, 2, 6, 6)
    target = torch.randint(0, 2, (2, 6, 6))
    a, b = FSSIoU(1), FSSIoU(1)
    score(a, logits, {"query_mask": target, "class_idx": 0}, PROTOCOLS["bam"])
    b.update(logits.argmax(1), target, 0)
    for key in STATES:
        assert torch.equal(getattr(a, key), getattr(b, key))
