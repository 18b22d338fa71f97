"""Synthetic PASCAL-5i-like sources (SyntheticShapes, SyntheticScenes): determinism, labels,
class separability and design, folds, sizes."""

import collections
import hashlib
import itertools
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cgmgm.data import (
    CLASS_SPECS,
    EpisodeDataset,
    SegmentationSource,
    SyntheticScenes,
    SyntheticShapes,
    base_classes,
    build_source,
    novel_classes,
    scaled_min_pixels,
)
from cgmgm.data.synthetic import SCENE_CLASSES, SCENE_TYPES, TEXTURES, Appearance


def _digest(src: SyntheticShapes, idx) -> str:
    h = hashlib.sha256()
    for i in idx:
        img, mask = src.render(i)
        h.update(img.tobytes())
        h.update(mask.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def val() -> SyntheticShapes:
    return SyntheticShapes("val")


@pytest.fixture(scope="module")
def train() -> SyntheticShapes:
    return SyntheticShapes("train")


def test_protocol_and_types(val):
    assert isinstance(val, SegmentationSource)
    assert val.num_classes == 20 and len(val) == 300
    img, mask = val.load(7)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8
    values = set(np.unique(mask).tolist())
    assert values <= set(range(21)) | {255}
    assert 0 in values and 255 in values  # background and an ignore border
    assert val.classes_in(7) <= val.labels_in(7) <= set(range(1, 21))
    with pytest.raises(IndexError):
        val.load(300)


def test_configurable_size_and_count():
    src = SyntheticShapes("train", num_images=10, image_size=(64, 80), border=0)
    assert len(src) == 10
    img, mask = src.load(3)
    assert img.shape == (64, 80, 3) and mask.shape == (64, 80)
    assert 255 not in np.unique(mask)  # border=0 -> no ignore band
    per_split = {"train": 12, "val": 7}
    assert len(SyntheticShapes("val", num_images=per_split)) == 7
    assert len(SyntheticShapes("test", num_images=per_split)) == 300
    assert src.min_pixels_for(mask.shape) == scaled_min_pixels(64, 80)
    assert scaled_min_pixels(500, 375) == 2 * 32 * 32


def test_ignore_border_is_thin_and_on_objects():
    src = SyntheticShapes("val", num_images=20)
    plain = SyntheticShapes("val", num_images=20, border=0)
    for i in range(20):
        _, m = src.load(i)
        _, m0 = plain.load(i)
        band = m == 255
        assert np.array_equal(m[~band], m0[~band])
        assert (m0[band] > 0).all()  # the band lies on object pixels
        assert band.sum() < 0.5 * (m0 > 0).sum()


def test_min_pixel_rule(val):
    for i in range(50):
        counts = val.class_pixel_counts(i)
        thr = val.min_pixels_for((96, 96))
        assert val.classes_in(i) == {c for c in range(1, 21) if counts[c] >= thr}
        assert val.labels_in(i) == {c for c in range(1, 21) if counts[c] > 0}


def test_deterministic_across_calls_instances_and_processes():
    a = SyntheticShapes("val", seed=3)
    idx = [0, 5, 123]
    d = _digest(a, idx)
    assert _digest(a, idx) == d
    assert _digest(SyntheticShapes("val", seed=3), idx[::-1][::-1]) == d
    # load() order does not matter
    b = SyntheticShapes("val", seed=3)
    b.load(123), b.load(0)
    assert np.array_equal(b.load(5)[0], a.render(5)[0])
    code = (
        "import hashlib; from cgmgm.data import SyntheticShapes as S; s = S('val', seed=3); "
        "h = hashlib.sha256()\n"
        "for i in [0, 5, 123]:\n"
        "    x, m = s.render(i); h.update(x.tobytes()); h.update(m.tobytes())\n"
        "print(h.hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == d
    # seed and split change the data
    assert _digest(SyntheticShapes("val", seed=4), idx) != d
    assert _digest(SyntheticShapes("train", seed=3), idx) != d


def test_generation_is_fast():
    src = SyntheticShapes("train", num_images=1000)
    t = time.perf_counter()
    for i in range(len(src)):
        src.classes_in(i)
    assert time.perf_counter() - t < 15.0  # ~1.5 s on 2 cores


def test_images_hold_distractors(val):
    multi = sum(len(val.labels_in(i)) >= 2 for i in range(len(val)))
    assert multi > 0.4 * len(val)


def _instance_features(img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Colour mean/std and gradient energy inside one class region."""
    x = img.astype(np.float64)
    gx = np.abs(np.diff(x, axis=1)).sum(-1)[:-1, :]  # [H-1, W-1]
    gy = np.abs(np.diff(x, axis=0)).sum(-1)[:, :-1]  # [H-1, W-1]
    inner = region[:-1, :-1] & region[1:, :-1] & region[:-1, 1:]
    px = x[region]
    grad = [gx[inner].mean(), gy[inner].mean()] if inner.any() else [0.0, 0.0]
    return np.concatenate([px.mean(0), px.std(0), grad])


def test_classes_are_distinguishable(train, val):
    """Nearest-centroid on colour/texture statistics beats chance (5%) by far."""

    def feats(src):
        X, y = [], []
        for i in range(len(src)):
            img, mask = src.load(i)
            for c in src.classes_in(i):
                X.append(_instance_features(img, mask == c))
                y.append(c)
        return np.asarray(X), np.asarray(y)

    Xtr, ytr = feats(train)
    Xte, yte = feats(val)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-9
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    centroids = np.stack([Xtr[ytr == c].mean(0) for c in range(1, 21)])
    dist = ((Xte[:, None] - centroids[None]) ** 2).sum(-1)
    acc = (dist.argmin(1) + 1 == yte).mean()
    assert acc > 0.6, acc  # ~0.93
    # class means differ pairwise
    d = ((centroids[:, None] - centroids[None]) ** 2).sum(-1)
    assert d[~np.eye(20, dtype=bool)].min() > 0.3  # ~1.4 in standardised units


def test_class_specs_unique():
    keys = {(s.shape, s.texture, s.colour_a, s.colour_b) for s in CLASS_SPECS}
    assert len(CLASS_SPECS) == 20 and len(keys) == 20
    palettes = {frozenset((s.colour_a, s.colour_b)) for s in CLASS_SPECS}
    assert len(palettes) == 20
    shapes_per_fold = [{CLASS_SPECS[c - 1].shape for c in novel_classes(20, f)} for f in range(4)]
    assert all(len(s) == 5 for s in shapes_per_fold)


def test_folds():
    for f in range(4):
        assert novel_classes(20, f) == list(range(5 * f + 1, 5 * f + 6))
        assert base_classes(20, f) == [c for c in range(1, 21) if not 5 * f < c <= 5 * f + 5]
    assert novel_classes(80, 1, scheme="interleaved") == [4 * k + 2 for k in range(20)]
    with pytest.raises(ValueError):
        novel_classes(20, 4)


@pytest.mark.parametrize("shot", [1, 5])
def test_every_class_has_enough_images(train, val, shot):
    for f in range(4):
        tr = EpisodeDataset(train, f, shot, "train", 10)
        te = EpisodeDataset(val, f, shot, "test", 10)
        assert min(len(v) for v in tr.class_images.values()) >= max(shot + 1, 20)
        assert min(len(v) for v in te.class_images.values()) >= max(shot + 1, 10)


def test_build_source():
    src = build_source("synthetic_shapes", "val", num_images=5, image_size=32)
    assert isinstance(src, SyntheticShapes) and len(src) == 5 and src.split == "val"
    scenes = build_source("synthetic", "val", num_images=5, image_size=32)
    assert isinstance(scenes, SyntheticScenes) and not isinstance(scenes, SyntheticShapes)
    assert len(scenes) == 5 and scenes.image_size == (32, 32)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_source("nope")


# ---------------------------------------------------------------------------------------
# SyntheticScenes
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes_val() -> SyntheticScenes:
    return SyntheticScenes("val")


@pytest.fixture(scope="module")
def scenes_train() -> SyntheticScenes:
    return SyntheticScenes("train")


def test_scenes_protocol_and_types(scenes_val):
    src = scenes_val
    assert isinstance(src, SegmentationSource)
    assert src.num_classes == 20 and src.fold_scheme == "block" and len(src) == 300
    assert src.class_names[0] == "background" and len(set(src.class_names)) == 21
    img, mask = src.load(7)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert mask.shape == (128, 128) and mask.dtype == np.uint8
    assert src.min_pixels_for(mask.shape) == scaled_min_pixels(128, 128)
    values = set(np.unique(mask).tolist())
    assert values <= set(range(21)) | {255}
    assert 0 in values and 255 in values
    assert src.classes_in(7) <= src.labels_in(7) <= set(range(1, 21))
    assert src.load(7) is src.load(7)  # cached
    with pytest.raises(IndexError):
        src.load(300)
    per_split = {"train": 12, "val": 7}
    assert len(SyntheticScenes("val", num_images=per_split)) == 7
    assert len(SyntheticScenes("test", num_images=per_split)) == 300
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("dev")
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticScenes("val", max_objects=0)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticScenes("val", image_size=8)


def _scenes_digest(src: SyntheticScenes, idx) -> str:
    h = hashlib.sha256()
    for i in idx:
        img, mask, parts = src.render_parts(i)
        h.update(img.tobytes())
        h.update(mask.tobytes())
        h.update(parts.tobytes())
    return h.hexdigest()


def test_scenes_deterministic_across_calls_instances_and_processes():
    a = SyntheticScenes("val", seed=3)
    idx = [0, 5, 123]
    d = _scenes_digest(a, idx)
    assert _scenes_digest(a, idx) == d
    assert _scenes_digest(SyntheticScenes("val", seed=3), idx) == d
    b = SyntheticScenes("val", seed=3)
    b.load(123), b.load(0)  # load order does not matter
    assert np.array_equal(b.load(5)[0], a.render(5)[0])
    assert np.array_equal(b.load(5)[1], a.render_parts(5)[1])
    code = (
        "import hashlib; from cgmgm.data import SyntheticScenes as S; s = S('val', seed=3); "
        "h = hashlib.sha256()\n"
        "for i in [0, 5, 123]:\n"
        "    x, m, p = s.render_parts(i); h.update(x.tobytes()); h.update(m.tobytes()); "
        "h.update(p.tobytes())\n"
        "print(h.hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # no dependence on str/set hashing
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == d
    assert _scenes_digest(SyntheticScenes("val", seed=4), idx) != d
    assert _scenes_digest(SyntheticScenes("train", seed=3), idx) != d
    assert _scenes_digest(SyntheticScenes("test", seed=3), idx) != d


def test_scenes_labels_parts_and_border():
    src = SyntheticScenes("val", num_images=30)
    plain = SyntheticScenes("val", num_images=30, border=0)
    wide = SyntheticScenes("val", num_images=30, border=2)
    for i in range(30):
        img, m, parts = src.render_parts(i)
        img0, m0, parts0 = plain.render_parts(i)
        assert np.array_equal(img, img0) and np.array_equal(parts, parts0)
        assert 255 not in m0
        # every part pixel carries its object's class, and nothing else does
        assert np.array_equal(m0 > 0, parts0 > 0)
        for c in np.unique(m0[m0 > 0]):
            assert parts0[m0 == c].max() <= len(SCENE_CLASSES[c - 1].parts)
        band = m == 255
        assert band.any() and np.array_equal(m[~band], m0[~band])
        assert (m0[band] > 0).all()  # the band lies on object pixels
        assert band.sum() < 0.5 * (m0 > 0).sum()
        band2 = wide.load(i)[1] == 255
        assert (band2 >= band).all() and band2.sum() > band.sum()


def test_scenes_min_pixel_rule(scenes_val):
    thr = scenes_val.min_pixels_for((128, 128))
    for i in range(50):
        counts = scenes_val.class_pixel_counts(i)
        assert scenes_val.classes_in(i) == {c for c in range(1, 21) if counts[c] >= thr}
        assert scenes_val.labels_in(i) == {c for c in range(1, 21) if counts[c] > 0}
        assert scenes_val.labels_in(i) <= set(scenes_val.object_classes(i))


def test_scenes_every_class_has_enough_images(scenes_train, scenes_val):
    per_class = np.zeros(21, dtype=int)
    for i in range(len(scenes_val)):
        for c in scenes_val.classes_in(i):
            per_class[c] += 1
    assert per_class[1:].min() >= 20, per_class[1:]
    for f in range(4):
        tr = EpisodeDataset(scenes_train, f, 5, "train", 10)  # BAM filter: no novel pixels
        te = EpisodeDataset(scenes_val, f, 5, "test", 10)
        assert min(len(v) for v in tr.class_images.values()) >= 40
        assert min(len(v) for v in te.class_images.values()) >= 20


def test_scenes_object_counts_and_sizes(scenes_val):
    counts = [len(scenes_val.object_classes(i)) for i in range(len(scenes_val))]
    shares = np.bincount(counts, minlength=4)[1:] / len(counts)
    assert len(shares) == 3 and (shares > 0.25).all(), shares  # 1, 2 and 3 objects
    for i in range(len(scenes_val)):
        classes = scenes_val.object_classes(i)
        assert len(set(classes)) == len(classes)
    # visible object area (ignore band excluded) as a fraction of the image
    frac = [
        scenes_val.class_pixel_counts(i)[c] / 128**2
        for i in range(len(scenes_val))
        for c in scenes_val.labels_in(i)
    ]
    lo, med, hi = np.percentile(frac, [10, 50, 90])
    assert 0.03 < lo and 0.05 < med < 0.3 and hi < 0.35, (lo, med, hi)
    single = SyntheticScenes("val", num_images=40, max_objects=1)
    assert all(len(single.object_classes(i)) == 1 for i in range(40))
    assert all(len(single.labels_in(i)) <= 1 for i in range(40))


def test_scenes_parts_look_unlike_each_other(scenes_val):
    """The per-part mean colours of one object are far apart: one prototype (their mean)
    is a poor description of the class."""
    min_dist: dict[int, list[float]] = {c: [] for c in range(1, 21)}
    for i in range(len(scenes_val)):
        img, mask, parts = scenes_val.render_parts(i)
        x = img.astype(np.float64)
        for c in scenes_val.classes_in(i):
            region = mask == c  # the ignore band excluded
            means = [
                x[region & (parts == k + 1)].mean(0)
                for k in range(len(SCENE_CLASSES[c - 1].parts))
                if (region & (parts == k + 1)).sum() >= 30
            ]
            if len(means) >= 2:
                d = [np.linalg.norm(a - b) for j, a in enumerate(means) for b in means[j + 1 :]]
                min_dist[c].append(min(d))
    for c, d in min_dist.items():
        name = SCENE_CLASSES[c - 1].name
        assert len(d) >= 10, name
        assert np.mean(np.asarray(d) >= 50.0) >= 0.9, (name, sorted(d)[:5])
        assert np.median(d) >= 90.0, (name, np.median(d))


def test_scene_class_design():
    assert len(SCENE_CLASSES) == 20 and len({c.name for c in SCENE_CLASSES}) == 20
    assert SyntheticScenes.class_names == ("background",) + tuple(c.name for c in SCENE_CLASSES)
    users: dict[Appearance, set[str]] = {}
    combos = set()
    for cls in SCENE_CLASSES:
        assert 2 <= len(cls.parts) <= 3, cls.name
        for part in cls.parts:
            a, b = part.modes
            assert a.texture in TEXTURES and b.texture in TEXTURES
            # the two modes of a part differ in texture or clearly in colour
            assert a != b and (
                a.texture != b.texture or np.linalg.norm(a.mean_colour() - b.mean_colour()) > 40
            ), (cls.name, part.name)
            for m in part.modes:
                users.setdefault(m, set()).add(cls.name)
        # no two parts of a class can look alike, whatever modes an instance draws
        for p, q in itertools.combinations(cls.parts, 2):
            for a, b in itertools.product(p.modes, q.modes):
                assert np.linalg.norm(a.mean_colour() - b.mean_colour()) > 55, (cls.name, p, q)
        combos.add(frozenset(m for part in cls.parts for m in part.modes))
    assert len(combos) == 20  # the combination of part appearances identifies the class
    shared = [m for m, names in users.items() if len(names) >= 3]
    assert len(shared) >= 4  # e.g. black wheels, glass, leaves, wood, metal
    # some shared appearance spans three folds: it gives neither the class nor the fold away
    fold_of = {c.name: (k // 5) for k, c in enumerate(SCENE_CLASSES)}
    assert any(len({fold_of[n] for n in users[m]}) >= 3 for m in shared)


def _background_stats(img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """(mean colour [3], mean absolute horizontal difference) over background pixels."""
    x = img.astype(np.float64)
    bg = mask == 0
    both = bg[:, 1:] & bg[:, :-1]
    grad = np.abs(np.diff(x, axis=1)).sum(-1)[both].mean()
    return x[bg].mean(0), float(grad)


def test_scene_backgrounds_vary(scenes_val):
    kinds = [scenes_val.scene_of(i) for i in range(100)]
    counts = collections.Counter(kinds)
    assert set(counts) == set(SCENE_TYPES) and min(counts.values()) >= 5, counts
    means, grads = [], collections.defaultdict(list)
    for i, kind in enumerate(kinds):
        mean, grad = _background_stats(*scenes_val.load(i))
        means.append(mean)
        grads[kind].append(grad)
    means = np.asarray(means)
    pair = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(100, 1)]
    assert np.median(pair) > 40  # backgrounds of two images usually differ in colour
    # scene_of names what is drawn: smooth fields are smooth (image noise only: ~14),
    # noise, clutter and mosaic are not (~70, ~36, ~31)
    smooth = np.median(grads["smooth"])
    assert smooth < 20 and np.median(grads["noise"]) > 3 * smooth
    assert np.median(grads["clutter"]) > 1.8 * smooth
    assert np.median(grads["mosaic"]) > 1.5 * smooth


@pytest.mark.parametrize("size", [64, (64, 100), (100, 64), (72, 160)])
def test_scenes_sizes(size):
    src = SyntheticScenes("train", num_images=60, image_size=size)
    h, w = (size, size) if isinstance(size, int) else size
    assert src.image_size == (h, w)
    frac = []
    for i in range(len(src)):
        img, mask, parts = src.render_parts(i)
        assert img.shape == (h, w, 3) and mask.shape == parts.shape == (h, w)
        frac += [src.class_pixel_counts(i)[c] / (h * w) for c in src.labels_in(i)]
    assert src.min_pixels_for((h, w)) == scaled_min_pixels(h, w)
    assert sum(len(src.classes_in(i)) > 0 for i in range(len(src))) >= 0.9 * len(src)
    assert 0.04 < np.median(frac) < 0.3
    # objects reach every side of the image: placement spans the whole (H, W) frame
    ys, xs = np.nonzero(np.stack([src.load(i)[1] for i in range(len(src))]).max(0) > 0)
    assert ys.min() < 0.1 * h and ys.max() > 0.9 * h and xs.min() < 0.1 * w and xs.max() > 0.9 * w
