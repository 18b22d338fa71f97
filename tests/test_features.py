"""The frozen-feature cache (cgmgm.features) and the transformed-image memory: exact (episodes,
metrics and checkpoints identical with them on and off), keyed so that nothing stale is served,
and off with augmentation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from _data_fixtures import fss_fixture
from _model_helpers import TINY_DATA
from cgmgm.config import config_dir
from cgmgm.data import EpisodeDataset, SyntheticScenes
from cgmgm.data.transforms import PadResize, bam_train_transform
from cgmgm.eval import evaluate
from cgmgm.features import ByteLRU, FeatureCache, backbone_fingerprint
from cgmgm.models.backbone import build_backbone
from cgmgm.train import train

QUIET = [
    "model.gmm.iters=3",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks.figures=null",
]
TINY = [  # the embedded benchmark, small
    *TINY_DATA,
    "dataset.test_episodes=12",
    "model.proj_dim=32",
    "base_ckpt=null",  # the meta learner alone: no stage 1 (test_stages.py runs both)
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
]


def _cfg(name: str, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=[*QUIET, f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "imagenet")


# ---------------------------------------------------------------------- the cache itself


def test_backbone_outputs_do_not_depend_on_the_batch(lite0):
    # what makes the cache exact: an image's features are the same in any batch
    x = torch.rand(5, 3, 48, 56, generator=torch.Generator().manual_seed(0))
    mid, high = lite0(x)
    for i in range(5):
        m, h = lite0(x[i : i + 1])
        assert torch.equal(m[0], mid[i]) and torch.equal(h[0], high[i])


def test_cache_serves_the_backbones_outputs_computing_each_image_once(lite0):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 40, 40, generator=g)
    cache = FeatureCache(backbone_fingerprint(lite0), max_bytes=2**30)
    rows = torch.stack([images[0], images[1], images[0], images[2], images[1]])  # [5, 3, H, W]
    keys = ["a", "b", "a", "c", "b"]
    mid, high = cache.features(lite0, rows, keys)
    ref_mid, ref_high = lite0(rows)
    assert torch.equal(mid, ref_mid) and torch.equal(high, ref_high)
    assert cache.misses == 3 and cache.hits == 0  # a repeated key within a batch runs once
    mid2, high2 = cache.features(lite0, None, ["c", "a"])  # no images needed: all cached
    assert torch.equal(mid2, ref_mid[[3, 0]]) and torch.equal(high2, ref_high[[3, 0]])
    assert cache.hits == 2 and cache.misses == 3
    with pytest.raises(RuntimeError, match="not in the feature cache"):
        cache.features(lite0, None, ["d"])


def test_fingerprint_follows_every_weight(lite0):
    before = backbone_fingerprint(lite0)
    other = build_backbone("efficientnet_lite0", "imagenet")
    assert backbone_fingerprint(other) == before
    name, p = next(iter(other.state_dict().items()))
    p.view(-1)[0] += 1e-6  # one weight of one layer
    assert backbone_fingerprint(other) != before
    a, b = FeatureCache(before, 2**20), FeatureCache(backbone_fingerprint(other), 2**20)
    assert a.key("img", torch.device("cpu")) != b.key("img", torch.device("cpu"))


def test_lru_keeps_the_budget():
    lru = ByteLRU(100)
    for k in range(4):
        lru.put(k, str(k), 40)
    assert len(lru) == 2 and lru.bytes == 80 and lru.get(0) is None and lru.get(3) == "3"
    lru.get(2)  # 2 is now the most recent: 3 leaves first
    lru.put(9, "9", 40)
    assert lru.get(3) is None and lru.get(2) == "2"
    lru.put("big", "x", 101)  # over the budget: not kept
    assert lru.get("big") is None
    with pytest.raises(ValueError, match="byte budget"):
        ByteLRU(-1)


def test_disk_cache_is_read_back_by_a_new_process_state(lite0, tmp_path):
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    fp = backbone_fingerprint(lite0)
    first = FeatureCache(fp, 2**30, tmp_path)
    mid, high = first.features(lite0, x, ["p", "q"])
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))
    second = FeatureCache(fp, 2**30, tmp_path)  # another run: memory empty, disk warm
    mid2, high2 = second.features(lite0, None, ["q", "p"])
    assert torch.equal(mid2, mid[[1, 0]]) and torch.equal(high2, high[[1, 0]])
    assert second.disk_hits == 2 and second.misses == 0
    files[0].write_bytes(b"torn")
    with pytest.raises(RuntimeError, match="cannot be read.*delete it"):
        FeatureCache(fp, 2**30, tmp_path).features(lite0, None, ["p", "q"])


# ---------------------------------------------------------------------- episode keys


def test_image_keys_name_transform_and_file(tmp_path):
    root = fss_fixture(tmp_path / "fss")
    from cgmgm.data import FSS1000

    src = FSS1000(root=root)
    ds = EpisodeDataset(src, 0, 1, "test", 4, classes=[1, 2, 3], transform=PadResize(64))
    ep = ds[0]
    assert ep["image_keys"][0] == ds.image_key(ep["query_source_idx"])
    assert "PadResize(size=64" in ep["image_keys"][0] and str(src.image_paths[0].parent) in (
        ds.image_key(0)
    )
    other = EpisodeDataset(src, 0, 1, "test", 4, classes=[1, 2, 3], transform=PadResize(48))
    assert other.image_key(0) != ds.image_key(0)  # another transform: another key
    before = ds.image_key(0)
    path = src.image_paths[0]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the file changed
    assert ds.image_key(0) != before


def test_augmentation_turns_the_cache_off_and_says_why():
    src = SyntheticScenes("train", num_images=200, image_size=32)
    aug = EpisodeDataset(src, 0, 1, "train", 4, transform=bam_train_transform(size=32))
    assert not aug.cache and "augmentation on" in aug.cache_reason
    assert "image_keys" not in aug[0]
    off = EpisodeDataset(src, 0, 1, "train", 4, cache=False)
    assert off.cache_reason == "turned off" and "image_keys" not in off[0]
    on = EpisodeDataset(src, 0, 1, "train", 4)
    assert on.cache and len(on[0]["image_keys"]) == 2


def test_episodes_are_identical_with_the_memory_on_and_off(tmp_path):
    src_dir = fss_fixture(tmp_path / "fss")
    from cgmgm.data import FSS1000

    kw = dict(classes=[1, 2, 3], transform=PadResize(64), original_size=64)
    on = EpisodeDataset(FSS1000(root=src_dir), 0, 2, "test", 12, **kw)
    off = EpisodeDataset(FSS1000(root=src_dir), 0, 2, "test", 12, cache=False, **kw)
    for i in list(range(12)) * 2:  # twice: the second pass comes from memory
        a, b = on[i], off[i]
        assert a.keys() - {"image_keys"} == b.keys()
        for k in b:
            va, vb = a[k], b[k]
            assert torch.equal(va, vb) if torch.is_tensor(vb) else va == vb, k
    assert len(on._image_cache) > 0 and len(off._image_cache) == 0
    on[0]["query_img"].add_(1.0)  # a caller's in-place edit never reaches the memory
    assert torch.equal(on[0]["query_img"], off[0]["query_img"])


# ---------------------------------------------------------------------- whole runs


def test_training_is_identical_with_the_cache_on_and_off(tmp_path):
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        metrics = train(_cfg("train", out, *TINY, f"cache.enabled={flag}"))
        state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        runs[flag] = (metrics, state, json.loads((out / "metrics.json").read_text()))
    (m_on, s_on, j_on), (m_off, s_off, j_off) = runs["true"], runs["false"]
    assert s_on.keys() == s_off.keys()
    for k in s_off:
        assert torch.equal(s_on[k], s_off[k]), k
    assert {k: v for k, v in m_on.items() if "IoU" in k} == {
        k: v for k, v in m_off.items() if "IoU" in k
    }
    cache_on, cache_off = j_on["feature_cache"], j_off["feature_cache"]
    assert cache_on["train"] == "on" and cache_on["eval"] == "on"
    # 2 epochs x 8 episodes x 2 images + val + test, from at most 200 + 80 distinct images
    assert cache_on["hits"] > 0 and cache_on["misses"] <= 280
    assert cache_off == {"enabled": False, "train": "off: turned off", "eval": "off: turned off"}


def test_evaluation_is_identical_with_the_cache_on_and_off(tmp_path):
    root = fss_fixture(tmp_path / "fss")
    results = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        cfg = _cfg(
            "eval",
            out,
            "model=training_free",
            "dataset=fss1000",
            f"dataset.root={root}",
            "dataset.num_workers=0",
            "dataset.test_episodes=10",
            "dataset.eval_transform={_target_:cgmgm.data.transforms.PadResize,size:64}",
            "eval.seeds=[0,1]",
            f"cache.enabled={flag}",
        )
        results[flag] = evaluate(cfg)
    on, off = results["true"], results["false"]
    assert {k: v for k, v in on.items() if "IoU" in k} == {
        k: v for k, v in off.items() if "IoU" in k
    }
    assert on["feature_cache"]["eval"] == "on"
    # 2 seeds x 10 episodes x 2 images touch the fixture's 9 images: each computed once
    assert 0 < on["feature_cache"]["misses"] <= 9 and on["feature_cache"]["hits"] > 9
    assert np.isfinite(on["test/mIoU"])


def test_cache_dir_expands_the_home_directory():
    # `cache.dir=~/.cache/cgmgm` from the command line means the user's home, not a "~" folder
    cache = FeatureCache("ab" * 20, 2**20, "~/.cache/cgmgm")
    assert cache.directory == Path.home() / ".cache" / "cgmgm" / ("ab" * 8)


def test_disk_cache_that_cannot_be_written_warns_and_keeps_going(lite0, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = FeatureCache(backbone_fingerprint(lite0), 2**30, blocker)  # mkdir under a file fails
    x = torch.rand(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="cannot write.*only in memory"):
        mid, _ = cache.features(lite0, x, ["a"])
    assert cache.directory is None and torch.equal(cache.features(lite0, None, ["a"])[0], mid)
    assert FeatureCache("ab" * 20, 1, "").directory is None  # cache.dir= (empty): no disk


def test_fingerprint_follows_the_architecture(lite0):
    other = build_backbone("efficientnet_lite0", "imagenet")
    conv = next(m for m in other.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (1, 1))
    conv.dilation = (3, 3)  # same weights, another layer: another fingerprint
    assert backbone_fingerprint(other) != backbone_fingerprint(lite0)


def test_cache_settings_that_cache_nothing_say_so(tmp_path):
    from cgmgm.config import attach_feature_cache, build_datamodule

    cfg = _cfg("train", tmp_path, *TINY, "cache.memory_gb=0")
    dm = build_datamodule(cfg)

    class Module:
        def use_feature_cache(self, *args):
            raise AssertionError("no cache to use")

    record = attach_feature_cache(cfg, Module(), dm, training=True)
    assert record["enabled"] is False and "memory_gb is 0" in record["features"]
    with pytest.raises(ValueError, match="cache.memory_gb must be a number"):
        attach_feature_cache(
            _cfg("train", tmp_path, *TINY, "cache.memory_gb=null"), Module(), dm, True
        )


def test_train_transform_test_needs_a_protocol():
    from cgmgm.data import EpisodicDataModule

    with pytest.raises(ValueError, match="protocol's test resize.*no protocol"):
        EpisodicDataModule("synthetic", protocol=None, train_transform="test")


def test_malformed_image_keys_are_an_error():
    from cgmgm.config import compose_model
    from cgmgm.lit import LitCGMGM

    lit = LitCGMGM(
        compose_model(["model.proj_dim=8"]), {"name": "efficientnet_lite0", "weights": None}, [1]
    )
    lit.use_feature_cache(2**20)
    lit.bind_feature_cache()
    batch = {
        "query_img": torch.rand(3, 3, 32, 32),
        "support_imgs": torch.rand(3, 1, 3, 32, 32),
        "support_masks": torch.zeros(3, 1, 32, 32, dtype=torch.long),
        "image_keys": ["q0", "s0"],  # one episode's keys, not collated
    }
    with pytest.raises(ValueError, match=r"K \+ 1 = 2 sequences of B = 3 keys"):
        lit(batch)
