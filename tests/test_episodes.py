"""Episodic sampling and the data module: purity, protocol, sharding invariance."""

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from cgmgm.data import (
    ClassIndexSource,
    EpisodeDataset,
    EpisodeSampler,
    EpisodicDataModule,
    ShardedEvalSampler,
    SyntheticShapes,
    novel_classes,
)


class TinySource(ClassIndexSource):
    """8x8 images whose red channel is the image index; masks given explicitly."""

    num_classes = 20

    def __init__(self, masks, min_pixels=4):
        super().__init__(min_pixels=min_pixels)
        self.masks = [np.asarray(m, dtype=np.uint8) for m in masks]

    def __len__(self):
        return len(self.masks)

    def load(self, i):
        i = self._check_index(i)
        img = np.zeros((8, 8, 3), dtype=np.uint8)
        img[..., 0] = i
        img[..., 1] = np.arange(8)[None, :] * 10  # a horizontal ramp, to see flips
        return img, self.masks[i]


def _mask(*blocks):
    """8x8 mask: blocks of (class, row slice)."""
    m = np.zeros((8, 8), dtype=np.uint8)
    for cls, rows in blocks:
        m[rows] = cls
    return m


@pytest.fixture(scope="module")
def val():
    return SyntheticShapes("val")


@pytest.fixture(scope="module")
def train():
    return SyntheticShapes("train")


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), k
        else:
            assert va == vb, k


def test_episode_keys_shapes_dtypes(val):
    ds = EpisodeDataset(val, fold=1, shot=5, split="test", num_episodes=20, seed=0)
    ep = ds[3]
    assert ep["query_img"].shape == (3, 96, 96) and ep["query_img"].dtype == torch.float32
    assert 0.0 <= ep["query_img"].min() and ep["query_img"].max() <= 1.0
    assert ep["query_mask"].shape == (96, 96) and ep["query_mask"].dtype == torch.long
    assert ep["support_imgs"].shape == (5, 3, 96, 96)
    assert ep["support_masks"].shape == (5, 96, 96) and ep["support_masks"].dtype == torch.long
    assert ep["support_source_idx"].shape == (5,)
    assert ep["index"] == 3
    assert ep["class_id"] in novel_classes(20, 1)
    assert ds.classes[ep["class_idx"]] == ep["class_id"]
    for m in (ep["query_mask"], ep["support_masks"]):
        assert set(torch.unique(m).tolist()) <= {0, 1, 255}
        assert (m == 1).any()


def test_episodes_are_pure_functions(val):
    a = EpisodeDataset(val, 0, 5, "test", 40, seed=7)
    b = EpisodeDataset(SyntheticShapes("val"), 0, 5, "test", 40, seed=7)
    forward = [a[i] for i in range(40)]
    backward = [b[i] for i in reversed(range(40))][::-1]
    for x, y in zip(forward, backward, strict=True):
        _same(x, y)
    _same(a[1000], b[1000])  # indices past num_episodes are valid and pure too
    # seed, fold and shot all enter the episode
    base = [a.sample(i) for i in range(40)]
    for other in (
        EpisodeDataset(val, 0, 5, "test", 40, seed=8),
        EpisodeDataset(val, 0, 4, "test", 40, seed=7),
    ):
        assert [other.sample(i) for i in range(40)] != base
    with pytest.raises(IndexError):
        a.sample(-1)


def test_does_not_touch_global_rng(val):
    ds = EpisodeDataset(val, 0, 1, "test", 10, seed=0)
    np_state = np.random.get_state()  # noqa: NPY002 (checking the legacy global RNG)
    torch_state = torch.get_rng_state()
    ds[4]
    after = np.random.get_state()  # noqa: NPY002
    assert all(np.array_equal(x, y) for x, y in zip(np_state, after, strict=True))
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("fold", range(4))
def test_test_split_protocol(val, fold):
    ds = EpisodeDataset(val, fold, 5, "test", 200, seed=fold)
    assert ds.classes == novel_classes(20, fold)
    seen = set()
    for i in range(200):
        cls, q, sup = ds.sample(i)
        seen.add(cls)
        assert cls in ds.classes
        assert q not in sup and len(set(sup)) == 5
        assert cls in val.classes_in(q) and all(cls in val.classes_in(s) for s in sup)
    assert seen == set(ds.classes)  # class-balanced draws cover the fold


@pytest.mark.parametrize("fold", range(4))
def test_train_split_protocol(train, fold):
    ds = EpisodeDataset(train, fold, 1, "train", 200, seed=0)
    novel = set(novel_classes(20, fold))
    assert set(ds.classes) == set(range(1, 21)) - novel
    used = {i for v in ds.class_images.values() for i in v.tolist()}
    assert used and all(not (train.labels_in(i) & novel) for i in used)  # BAM filter
    for i in range(100):
        cls, q, sup = ds.sample(i)
        assert cls not in novel and q not in sup
    unfiltered = EpisodeDataset(train, fold, 1, "train", 10, filter_novel=False)
    assert sum(map(len, unfiltered.class_images.values())) > sum(map(len, ds.class_images.values()))


def test_image_frequency_sampling(val):
    for sampling in ("image", "pair"):
        ds = EpisodeDataset(val, 2, 1, "test", 100, seed=0, sampling=sampling)
        for i in range(100):
            cls, q, sup = ds.sample(i)
            held = val.labels_in(q) if sampling == "image" else val.classes_in(q)
            assert cls in ds.classes and cls in held and q not in sup
            assert all(cls in val.classes_in(s) for s in sup)  # supports: the pixel rule
    with pytest.raises(ValueError, match="sampling must be one of"):
        EpisodeDataset(val, 2, 1, "test", 10, sampling="balanced")


@pytest.mark.parametrize(
    ("sampling", "p_query0", "p_class1"),
    [
        ("image", 1 / 7, 4 / 7 + 1 / 21),  # image 0 of 7, then one of its 3 classes
        ("pair", 3 / 9, 5 / 9),  # 9 (image, class) pairs, 3 of them image 0's
        ("class", (1 / 5 + 1 / 2 + 1 / 2) / 3, 1 / 3),  # class first, then its images
    ],
)
def test_sampling_modes_follow_their_distributions(sampling, p_query0, p_class1):
    # image 0 holds classes 1, 2, 3; images 1-4 class 1 only, image 5 class 2, image 6 class 3
    three = np.zeros((8, 8), dtype=np.uint8)
    three[0:2], three[2:4], three[4:6] = 1, 2, 3
    masks = [three] + [np.full((8, 8), c, dtype=np.uint8) for c in (1, 1, 1, 1, 2, 3)]
    masks[5][:4], masks[6][:4] = 2, 3  # a second image for classes 2 and 3 ...
    masks[5][4:], masks[6][4:] = 0, 0  # ... with background
    ds = EpisodeDataset(TinySource(masks), 0, 1, "test", 4000, classes=[1, 2, 3], sampling=sampling)
    draws = np.array([ds.sample(i)[:2] for i in range(4000)])  # [N, 2] (class, query)
    assert np.mean(draws[:, 1] == 0) == pytest.approx(p_query0, abs=0.03)
    assert np.mean(draws[:, 0] == 1) == pytest.approx(p_class1, abs=0.03)


def test_image_sampling_draws_the_query_class_as_bam():
    # BAM walks the images holding a class with the minimum pixel count, then draws the query's
    # class among every sampled class present in it with any pixel count; only the supports
    # need the minimum. Image 0: 16 px of class 1, 2 px of class 2 (below min_pixels = 4).
    first = _mask((1, slice(0, 2)))
    first[7, :2] = 2
    masks = [first] + [_mask((1, slice(0, 2)))] * 2 + [_mask((2, slice(0, 2)))] * 2
    ds = EpisodeDataset(TinySource(masks), 0, 1, "test", 3000, classes=[1, 2], sampling="image")
    draws = np.array([ds.sample(i)[:2] for i in range(3000)])  # [N, 2] (class, query)
    on_first = draws[draws[:, 1] == 0, 0]
    assert len(on_first) == pytest.approx(3000 / 5, rel=0.15)  # image 0 is one of 5 queries
    assert np.mean(on_first == 2) == pytest.approx(0.5, abs=0.06)  # its 2-px class: half
    for i in range(3000):
        cls, q, sup = ds.sample(i)
        assert all(s != q and cls in ds.source.classes_in(s) for s in sup)


def test_target_mapping_and_ignore():
    # class 1 rows 0-1, class 2 rows 2-3, ignore row 4; 3 images hold both classes.
    m = _mask((1, slice(0, 2)), (2, slice(2, 4)), (255, slice(4, 5)))
    src = TinySource([m, m, m])
    ds = EpisodeDataset(src, 0, 2, "test", 10, classes=[1, 2])
    for i in range(10):
        ep = ds[i]
        cls = ep["class_id"]
        expect = torch.from_numpy((m == cls).astype(np.int64))
        expect[torch.from_numpy(m == 255)] = 255
        assert torch.equal(ep["query_mask"], expect)
        assert all(torch.equal(s, expect) for s in ep["support_masks"])
        # the red channel identifies the loaded image
        assert round(ep["query_img"][0, 0, 0].item() * 255) == ep["query_source_idx"]
        got = [round(v * 255) for v in ep["support_imgs"][:, 0, 0, 0].tolist()]
        assert got == ep["support_source_idx"].tolist()


def test_min_pixel_rule_applies():
    big = _mask((3, slice(0, 2)))  # 16 px of class 3
    small = _mask((3, slice(0, 1)))
    small[0, 2:] = 0  # 2 px of class 3
    src = TinySource([big, big, small], min_pixels=4)
    ds = EpisodeDataset(src, 0, 1, "test", 5, classes=[3])
    assert ds.class_images[3].tolist() == [0, 1]
    assert src.labels_in(2) == {3} and src.classes_in(2) == set()


def test_too_few_images_is_a_clear_error():
    m = _mask((3, slice(0, 2)))
    src = TinySource([m, m, _mask((4, slice(0, 2)))] + [_mask((c, slice(0, 2))) for c in (1, 2, 5)])
    with pytest.raises(ValueError, match=r"class 4: 1 image.*Fix"):
        EpisodeDataset(src, 0, 1, "test", 5)
    with pytest.raises(ValueError, match=r"shot=2.*class 3: 2 image"):
        EpisodeDataset(src, 0, 2, "test", 5, classes=[3])
    ok = EpisodeDataset(src, 0, 1, "test", 5, classes=[3])
    assert ok.sample(0)[0] == 3


def test_transform_hook():
    m = _mask((1, slice(0, 3)))

    def flip(image, mask):
        return image[:, ::-1], mask[::-1]

    src = TinySource([m, m])
    plain = EpisodeDataset(src, 0, 1, "test", 3, classes=[1])[0]
    flipped = EpisodeDataset(src, 0, 1, "test", 3, classes=[1], transform=flip)[0]
    assert torch.equal(flipped["query_img"], plain["query_img"].flip(-1))
    assert torch.equal(flipped["query_mask"], plain["query_mask"].flip(0))


def _dm(**kw):
    args = dict(
        dataset="synthetic",
        dataset_kwargs={"num_images": 150, "image_size": 48},
        fold=1,
        shot=2,
        batch_size=4,
        train_episodes=24,
        val_episodes=10,
        test_episodes=25,
    )
    args.update(kw)
    dm = EpisodicDataModule(**args)
    dm.setup()
    return dm


def _collect(loader):
    batches = list(loader)
    out = {k: torch.cat([b[k] for b in batches]) for k in ("index", "class_id", "query_img")}
    out["support_masks"] = torch.cat([b["support_masks"] for b in batches])
    return out


def test_workers_do_not_change_test_episodes():
    dm0 = _dm(num_workers=0)
    dm2 = _dm(num_workers=2)
    a, b = _collect(dm0.test_dataloader()), _collect(dm2.test_dataloader())
    assert a["index"].tolist() == list(range(25))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    batch = next(iter(dm0.test_dataloader()))
    assert batch["query_img"].shape == (4, 3, 48, 48)
    assert batch["support_imgs"].shape == (4, 2, 3, 48, 48)
    assert batch["class_idx"].dtype == torch.long
    assert dm0.classes == novel_classes(20, 1)


@pytest.mark.parametrize("sampler_cls", [DistributedSampler, ShardedEvalSampler])
def test_ddp_shards_cover_the_same_episodes(sampler_cls):
    dm = _dm()
    ds = dm.test_set  # 25 episodes: odd, so DistributedSampler pads one duplicate
    ref = _collect(dm.test_dataloader())
    single = {i: (ref["query_img"][i], ref["support_masks"][i]) for i in range(25)}
    assert ref["index"].tolist() == list(range(25))
    union = set()
    for rank in range(2):
        kw = {"shuffle": False} if sampler_cls is DistributedSampler else {}
        sampler = sampler_cls(ds, num_replicas=2, rank=rank, **kw)
        got = _collect(DataLoader(ds, batch_size=3, sampler=sampler, num_workers=rank))
        for k, i in enumerate(got["index"].tolist()):
            union.add(i)  # a padded duplicate is the very same episode
            assert torch.equal(got["query_img"][k], single[i][0])
            assert torch.equal(got["support_masks"][k], single[i][1])
    assert union == set(single)


def test_sharded_eval_sampler_has_no_padding():
    dm = _dm()
    shards = [list(ShardedEvalSampler(dm.test_set, 3, r)) for r in range(3)]
    assert [len(s) for s in shards] == [9, 8, 8]
    assert sorted(sum(shards, [])) == list(range(25))
    assert isinstance(ShardedEvalSampler(dm.test_set, 3, 0), DistributedSampler)


def test_train_sampler_epochs_and_ddp_wrapper():
    s = EpisodeSampler(10, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and list(s) == e0
    s.set_epoch(2)
    assert sorted(s) == list(range(20, 30))
    fixed = EpisodeSampler(10, seed=3, resample=False)
    fixed.set_epoch(2)
    assert sorted(fixed) == list(range(10))
    # Lightning's DDP wrapper forwards set_epoch; the ranks split the same epoch's set.
    for epoch in (0, 1):
        got = []
        for rank in range(2):
            w = DistributedSamplerWrapper(EpisodeSampler(10, seed=3), num_replicas=2, rank=rank)
            w.set_epoch(epoch)
            got += list(w)
        assert sorted(got) == list(range(10 * epoch, 10 * epoch + 10))


def test_train_loader_and_dataset_factories():
    dm = _dm(dataset_kwargs=OmegaConf.create({"num_images": 150, "image_size": 48}))
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 6  # 24 episodes / batch 4, drop_last
    classes = torch.cat([b["class_id"] for b in batches]).tolist()
    assert not set(classes) & set(novel_classes(20, 1))
    assert dm.val_set is not None and len(dm.val_dataloader().dataset) == 10
    custom = EpisodicDataModule(
        dataset=lambda split: SyntheticShapes(split, num_images=150, image_size=48),
        fold=0,
        shot=1,
        test_episodes=5,
    )
    custom.setup("test")
    assert custom.test_set.source.split == "val" and custom.train_set is None
