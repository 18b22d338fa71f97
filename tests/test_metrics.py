"""FSSIoU against a brute-force numpy reference; exactness under DDP-style splits."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cgmgm.metrics import FSSIoU, binarize, flatten_results

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


def test_flatten_results():
    m = FSSIoU(3)
    x = torch.ones(1, 2, 2, dtype=torch.long)
    m.update(x, x, 1)
    flat = flatten_results(m.compute(), "test/", class_ids=[6, 7, 8])
    assert flat["test/mIoU"] == 100.0 and "test/FB-IoU" in flat
    assert flat["test/IoU/class_7"] == 100.0
    assert "test/IoU/class_6" not in flat  # classes without episodes are omitted
    assert all(isinstance(v, float) for v in flat.values())
