"""Embedded procedural benchmarks shaped like PASCAL-5i (20 classes, 4 block folds of 5).

Every image is a pure function of ``(seed, split, index)``, generated with numpy on the
fly (nothing to download) and cached in memory on first use. Labels: 0 background,
1..20 the class on all of an object's pixels, 255 on a ``border``-pixel band on the object
side of every object boundary (like VOC's boundary band).

:class:`SyntheticScenes` (registered as "synthetic", 128 px by default) is the benchmark
on which the paper's two arguments can show:

1. *One prototype and a cosine cannot describe a class whose pixels spread over several
   appearance modes; a Gaussian mixture per class can.* Every class is an object of 2-3
   parts of deliberately unlike appearance (a car: a red or blue-striped body, cyan or
   graded glass, black or hub-dotted wheels), and each part has two alternative
   appearances drawn per instance, so a class has up to 8 appearance combinations and its
   pixels form several well separated clusters: their mean (one prototype) is far from all
   of them. Parts share appearances across classes (black wheels, glass, leaves, wood,
   metal), so one part alone does not identify a class; the combination, and the shape,
   do. The classes stay easy for a human to tell apart (:data:`SCENE_CLASSES`).
2. *The query's background differs from the support's, so a background model fitted on
   the query's own pixels helps.* Every image draws one of six scene types
   (:data:`SCENE_TYPES`: smooth colour field, clutter of small random polygons, Voronoi
   mosaic, stripes, bricks, coloured noise) with random colours and scales, so a query's
   background is usually unlike its support's; 0-3 mid-sized blobs that belong to no
   class, and objects of other (base) classes, act as distractors.

Each image holds 1..max_objects objects of distinct classes, each covering 6-28% of the
image before occlusion (log-uniform), with per-instance size, aspect, position, small
rotation, mirroring, colour jitter, brightness and shading; placement avoids heavy
overlap. Object counts and classes are balanced per block of 20 images (every class leads
one image per block and has nearly equal totals), so with the default 1000 train / 300 val
images every class has >= ~25 val images above the PASCAL-scaled pixel threshold.
Generating 1000 images at 128x128 takes ~3 s on one idle core.

:class:`SyntheticShapes` (registered as "synthetic_shapes", 96 px) is the older, easier
source: a smooth, textured background plus 1-3 objects of distinct classes drawn with
per-instance jitter (size, aspect, position, rotation, colour, texture period and phase).
A class is a (shape, texture, colour pair) triple, so one prototype describes it; classes
that share a shape differ in texture and colours, classes that share a colour differ in
shape. Generating 1000 images at 96x96 takes about a second.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cgmgm.constants import IGNORE_INDEX
from cgmgm.data.episodes import ClassIndexSource

__all__ = [
    "CLASS_NAMES",
    "CLASS_SPECS",
    "SCENE_CLASSES",
    "SCENE_CLASS_NAMES",
    "SCENE_TYPES",
    "TEXTURES",
    "Appearance",
    "ClassSpec",
    "Part",
    "Prim",
    "SceneClass",
    "SyntheticScenes",
    "SyntheticShapes",
]


@dataclass(frozen=True)
class ClassSpec:
    """Appearance of one synthetic class; ``period`` is in object-radius units."""

    name: str
    shape: str
    texture: str
    period: float
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]


_C = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (225, 205, 40),
    "magenta": (195, 50, 190),
    "cyan": (40, 195, 205),
    "orange": (235, 135, 30),
    "purple": (110, 40, 165),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "brown": (130, 80, 40),
    "pink": (245, 155, 185),
}

# Class k (1-based) is CLASS_SPECS[k - 1]; k and k + 10 share a shape; no two classes
# share a colour pair.
CLASS_SPECS: tuple[ClassSpec, ...] = (
    ClassSpec("disc", "disc", "stripes", 0.5, _C["red"], _C["white"]),
    ClassSpec("square", "square", "checker", 0.45, _C["blue"], _C["yellow"]),
    ClassSpec("triangle", "triangle", "dots", 0.45, _C["green"], _C["black"]),
    ClassSpec("ring", "ring", "stripes", 0.35, _C["orange"], _C["blue"]),
    ClassSpec("cross", "cross", "noise", 0.5, _C["magenta"], _C["cyan"]),
    ClassSpec("star", "star", "stripes", 0.4, _C["yellow"], _C["purple"]),
    ClassSpec("ellipse", "ellipse", "checker", 0.4, _C["white"], _C["brown"]),
    ClassSpec("diamond", "diamond", "dots", 0.4, _C["cyan"], _C["brown"]),
    ClassSpec("hexagon", "hexagon", "gradient", 1.0, _C["pink"], _C["green"]),
    ClassSpec("crescent", "crescent", "stripes", 0.3, _C["black"], _C["orange"]),
    ClassSpec("disc-checker", "disc", "checker", 0.5, _C["green"], _C["magenta"]),
    ClassSpec("square-stripes", "square", "stripes", 0.25, _C["purple"], _C["white"]),
    ClassSpec("triangle-noise", "triangle", "noise", 0.5, _C["blue"], _C["pink"]),
    ClassSpec("ring-dots", "ring", "dots", 0.35, _C["yellow"], _C["black"]),
    ClassSpec("cross-stripes", "cross", "stripes", 0.3, _C["red"], _C["cyan"]),
    ClassSpec("star-checker", "star", "checker", 0.35, _C["brown"], _C["pink"]),
    ClassSpec("ellipse-noise", "ellipse", "noise", 0.5, _C["orange"], _C["green"]),
    ClassSpec("diamond-stripes", "diamond", "stripes", 0.3, _C["white"], _C["blue"]),
    ClassSpec("hexagon-dots", "hexagon", "dots", 0.4, _C["red"], _C["yellow"]),
    ClassSpec("crescent-gradient", "crescent", "gradient", 1.0, _C["cyan"], _C["purple"]),
)
CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(s.name for s in CLASS_SPECS)

_SPLIT_KEY = {"train": 0, "val": 1, "test": 2}
# the generators' code: a changed generator never serves cached features of the old one
_GENERATOR_ID = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:16]
_DEFAULT_NUM_IMAGES = {"train": 1000, "val": 300, "test": 300}
_SQRT3 = math.sqrt(3.0)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indicator of ``shape`` in local coordinates (object radius = 1). u, v: [h, w]."""
    au, av = np.abs(u), np.abs(v)
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "triangle":
        return (v >= -0.6) & (_SQRT3 * au + v <= 1.2)
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "cross":
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    if shape == "star":
        frac = (np.arctan2(v, u) * (5.0 / (2.0 * math.pi))) % 1.0
        spike = np.abs(frac - 0.5) * 2.0  # 1 at the 5 tips, 0 between them
        return np.sqrt(r2) <= 0.42 + 0.58 * spike
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "diamond":
        return au / 0.7 + av / 1.1 <= 1.0
    if shape == "hexagon":
        return (av <= _SQRT3 / 2) & (_SQRT3 * au + av <= _SQRT3)
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8**2)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(spec: ClassSpec, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mixing weight in [0, 1] between ``colour_a`` and ``colour_b``. u, v: [h, w]."""
    p = spec.period * rng.uniform(0.85, 1.2)
    if spec.texture == "stripes":
        phase = rng.uniform(0.0, 1.0)
        return (((u / p + phase) % 1.0) < 0.5).astype(np.float32)
    if spec.texture == "checker":
        ou, ov = rng.uniform(0.0, p, size=2)
        return ((np.floor((u + ou) / p) + np.floor((v + ov) / p)) % 2).astype(np.float32)
    if spec.texture == "dots":
        ou, ov = rng.uniform(0.0, p, size=2)
        du = (u + ou) % p - p / 2
        dv = (v + ov) % p - p / 2
        return (du * du + dv * dv <= (0.3 * p) ** 2).astype(np.float32)
    if spec.texture == "noise":
        # Sum of random plane waves squashed by tanh: smooth blotches of size ~ p.
        acc = np.zeros_like(u)
        for _ in range(4):
            ang = rng.uniform(0.0, 2.0 * math.pi)
            f = 2.0 * math.pi / (p * rng.uniform(0.8, 1.6))
            acc += np.sin(f * (u * math.cos(ang) + v * math.sin(ang)) + rng.uniform(0, 2 * math.pi))
        return 0.5 + 0.5 * np.tanh(1.5 * acc)
    if spec.texture == "gradient":
        return np.clip((u + 1.0) / 2.0, 0.0, 1.0)
    raise ValueError(f"unknown texture {spec.texture!r}")


class _ProceduralSource(ClassIndexSource):
    """What both generators share: the split streams, the image count, the size and the
    in-memory cache; a subclass sets ``default_size`` and implements ``render(i)``."""

    num_classes = 20
    fold_scheme = "block"
    default_size: int = 128

    def __init__(
        self,
        split: str = "train",
        num_images: int | Mapping[str, int] | None = None,
        image_size: int | tuple[int, int] | None = None,
        seed: int = 0,
        min_pixels: int | None = None,
        border: int = 1,
        max_objects: int = 3,
        cache: bool = True,
    ) -> None:
        if split not in _SPLIT_KEY:
            raise ValueError(f"split must be one of {sorted(_SPLIT_KEY)}, got {split!r}")
        if image_size is None:
            image_size = self.default_size
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        h, w = (int(s) for s in image_size)
        if min(h, w) < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {(h, w)}")
        if not 1 <= max_objects <= self.num_classes:
            raise ValueError(f"max_objects must be in 1..{self.num_classes}, got {max_objects}")
        super().__init__(min_pixels=min_pixels, image_size=(h, w))
        self.split = split
        if isinstance(num_images, Mapping):
            num_images = num_images.get(split)
        self.num_images = _DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
        self.image_size = (h, w)
        self.seed = int(seed)
        self.border = int(border)
        self.max_objects = int(max_objects)
        self.cache = bool(cache)
        self._images: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_images

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 [H, W, 3] and class-index mask uint8 [H, W] (255 = ignore)."""
        i = self._check_index(i)
        item = self._images.get(i)
        if item is None:
            item = self.render(i)
            if self.cache:
                self._images[i] = item
        return item

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def image_key(self, i: int) -> str:
        """What image i's pixels depend on: the generator (this file's contents), its
        parameters and i (keys the frozen-feature cache, :mod:`cgmgm.features`)."""
        h, w = self.image_size
        return (
            f"{type(self).__name__}@{_GENERATOR_ID}:{self.split}:seed={self.seed}:{h}x{w}:"
            f"border={self.border}:objects={self.max_objects}:{self._check_index(i)}"
        )


class SyntheticShapes(_ProceduralSource):
    """Procedural 20-class segmentation source (PASCAL-5i-like folds).

    Args:
        split: "train", "val" or "test"; selects disjoint image streams.
        num_images: images in the split, or a {split: count} mapping (default and for
            missing splits: train 1000, val/test 300).
        image_size: int or (H, W); every image has this size.
        seed: data seed; image i is a pure function of (seed, split, i).
        min_pixels: a class counts in an image with at least this many pixels
            (default: PASCAL's 2*32*32 scaled to the image area).
        border: width in pixels of the 255 band on the object side of each
            object boundary (0 disables it).
        max_objects: objects per image are drawn uniformly from 1..max_objects.
        cache: keep generated images in memory.
    """

    class_names = CLASS_NAMES
    default_size = 96

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate image i without touching the cache (pure function of seed, split, i)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_KEY[self.split], i]))
        h, w = self.image_size
        s = float(min(h, w))
        img = self._background(rng)  # [H, W, 3] float32
        label = np.zeros((h, w), dtype=np.uint8)  # [H, W]

        n_obj = int(rng.integers(1, self.max_objects + 1))
        classes = rng.choice(self.num_classes, size=n_obj, replace=False) + 1
        for cls in classes:
            spec = CLASS_SPECS[cls - 1]
            r = s * rng.uniform(0.13, 0.28)
            sx, sy = rng.uniform(0.85, 1.15, size=2)
            cx = rng.uniform(0.6 * r, w - 0.6 * r)
            cy = rng.uniform(0.6 * r, h - 0.6 * r)
            theta = rng.uniform(0.0, 2.0 * math.pi)
            reach = 1.25 * r * max(sx, sy)
            y0, y1 = max(0, int(cy - reach)), min(h, int(math.ceil(cy + reach)) + 1)
            x0, x1 = max(0, int(cx - reach)), min(w, int(math.ceil(cx + reach)) + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # [h', w'] each
            dx, dy = xx - cx, yy - cy
            c, sn = math.cos(theta), math.sin(theta)
            u = (c * dx + sn * dy) / (r * sx)
            v = (-sn * dx + c * dy) / (r * sy)
            inside = _shape_mask(spec.shape, u, v)  # [h', w'] bool
            t = _texture(spec, u, v, rng)[..., None]  # [h', w', 1]
            bright = rng.uniform(0.8, 1.15)
            ca = (np.asarray(spec.colour_a) + rng.normal(0.0, 12.0, 3)) * bright
            cb = (np.asarray(spec.colour_b) + rng.normal(0.0, 12.0, 3)) * bright
            colour = (ca * (1.0 - t) + cb * t).astype(np.float32)  # [h', w', 3]
            patch = img[y0:y1, x0:x1]
            patch[inside] = colour[inside]
            label[y0:y1, x0:x1][inside] = cls

        img += rng.normal(0.0, 5.0, size=img.shape).astype(np.float32)
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        mask = _ignore_band(label, self.border)
        return image, mask

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Smooth random colour field plus a faint distractor texture. -> [H, W, 3] float32."""
        h, w = self.image_size
        g = 4
        base = rng.uniform(50.0, 200.0, size=3)
        grid = base + rng.normal(0.0, 35.0, size=(g, g, 3))  # [g, g, 3]
        wy = _interp_matrix(h, g)  # [H, g]
        wx = _interp_matrix(w, g)  # [W, g]
        rows = (wy @ grid.reshape(g, g * 3)).reshape(h, g, 3)  # [H, g, 3]
        bg = np.ascontiguousarray((rows.transpose(0, 2, 1) @ wx.T).transpose(0, 2, 1))
        bg = bg.astype(np.float32)  # [H, W, 3]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = rng.uniform(0.0, math.pi)
        period = rng.uniform(0.08, 0.25) * min(h, w)
        wave = np.sin(2 * math.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period)
        bg += (rng.uniform(5.0, 18.0) * wave)[..., None]
        return bg


def _interp_matrix(n: int, g: int) -> np.ndarray:
    """Bilinear (align-corners) interpolation weights from g knots to n pixels. -> [n, g]."""
    pos = np.linspace(0.0, g - 1.0, n)
    lo = np.clip(np.floor(pos).astype(int), 0, g - 2)
    frac = pos - lo
    m = np.zeros((n, g))
    m[np.arange(n), lo] = 1.0 - frac
    m[np.arange(n), lo + 1] = frac
    return m


# ----------------------------------------------------------------------------------------
# SyntheticScenes: multi-part, multi-mode objects on strongly varying scenes
# ----------------------------------------------------------------------------------------

TEXTURES = ("flat", "stripes", "checker", "dots", "blotch", "gradient", "rays", "static")
SCENE_TYPES = ("smooth", "clutter", "mosaic", "stripes", "bricks", "noise")
_DOT_RADIUS = 0.3  # dot radius in texture periods (dots cover pi * 0.3**2 ~ 28% of a part)


@dataclass(frozen=True)
class Appearance:
    """One appearance mode of a part: ``texture`` mixes ``colour_a`` (weight 0) with
    ``colour_b`` (weight 1); ``period`` is in object-radius units ("flat" uses colour_a only).
    """

    texture: str
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int] = (0, 0, 0)
    period: float = 0.3

    def mean_colour(self) -> np.ndarray:
        """Expected mean RGB of a part in this mode (before per-instance jitter). -> [3]."""
        frac = {"flat": 0.0, "dots": math.pi * _DOT_RADIUS**2}.get(self.texture, 0.5)
        a, b = np.asarray(self.colour_a, float), np.asarray(self.colour_b, float)
        return (1.0 - frac) * a + frac * b


@dataclass(frozen=True)
class Prim:
    """A primitive shape in object coordinates (object radius ~1; u right, v down).

    "ellipse": params (cu, cv, a, b, angle); "dome": the upper half (v <= cv) of that
    ellipse; "poly": a convex polygon, params the flattened vertices (u0, v0, u1, v1, ...).
    """

    kind: str
    params: tuple[float, ...]


@dataclass(frozen=True)
class Part:
    """A part of a class: the union of ``shapes``, painted in one of its two ``modes``
    (drawn independently per instance and part)."""

    name: str
    shapes: tuple[Prim, ...]
    modes: tuple[Appearance, Appearance]


@dataclass(frozen=True)
class SceneClass:
    """A SyntheticScenes class; its parts are painted in order (later parts on top) and
    part k (0-based) has part label k + 1 in :meth:`SyntheticScenes.render_parts`."""

    name: str
    parts: tuple[Part, ...]


def _E(cu: float, cv: float, a: float, b: float, angle: float = 0.0) -> Prim:
    return Prim("ellipse", (cu, cv, a, b, angle))


def _D(cu: float, cv: float, a: float, b: float) -> Prim:
    return Prim("dome", (cu, cv, a, b, 0.0))


def _P(*verts: tuple[float, float]) -> Prim:
    return Prim("poly", tuple(float(x) for vert in verts for x in vert))


def _R(cu: float, cv: float, hw: float, hh: float) -> Prim:
    """Axis-aligned rectangle: centre (cu, cv), half sizes (hw, hh)."""
    return _P((cu - hw, cv - hh), (cu + hw, cv - hh), (cu + hw, cv + hh), (cu - hw, cv + hh))


_RGB = dict(
    _C,
    navy=(25, 35, 110),
    darkgreen=(25, 95, 40),
    darkred=(110, 20, 25),
    lime=(165, 225, 60),
    tan=(215, 180, 125),
    grey=(128, 128, 128),
    lightgrey=(200, 200, 200),
    darkgrey=(65, 65, 65),
    lightcyan=(175, 230, 245),
    terracotta=(195, 95, 55),
)


def _A(texture: str, a: str, b: str = "black", period: float = 0.3) -> Appearance:
    return Appearance(texture, _RGB[a], _RGB[b], period)


def _modes(a: Appearance, b: Appearance) -> tuple[Appearance, Appearance]:
    return (a, b)


# Appearances shared by several classes: one part alone does not identify its class.
_WHEEL = _modes(_A("flat", "black"), _A("dots", "black", "lightgrey", 0.25))
_GLASS = _modes(_A("flat", "lightcyan"), _A("gradient", "lightcyan", "white"))
_LEAVES = _modes(_A("blotch", "green", "darkgreen", 0.4), _A("dots", "darkgreen", "lime", 0.22))
_WOOD = _A("stripes", "brown", "tan", 0.18)
_METAL = _A("gradient", "grey", "lightgrey")
_BLACK = _A("flat", "black")
_PETALS = tuple(
    _E(0.38 * math.cos(a), -0.35 + 0.38 * math.sin(a), 0.28, 0.16, a)
    for a in np.arange(6) * (math.pi / 3)
)

# Class k (1-based) is SCENE_CLASSES[k - 1]; the block folds are classes 1-5, 6-10, 11-15,
# 16-20. Parts are listed in painting order.
SCENE_CLASSES: tuple[SceneClass, ...] = (
    SceneClass(
        "car",
        (
            Part(
                "body",
                (_R(0.0, 0.1, 1.0, 0.28),),
                _modes(_A("flat", "red"), _A("stripes", "blue", "navy", 0.25)),
            ),
            Part(
                "windows", (_P((-0.55, -0.18), (0.5, -0.18), (0.3, -0.6), (-0.35, -0.6)),), _GLASS
            ),
            Part("wheels", (_E(-0.55, 0.4, 0.25, 0.25), _E(0.55, 0.4, 0.25, 0.25)), _WHEEL),
        ),
    ),
    SceneClass(
        "bus",
        (
            Part(
                "body",
                (_R(0.0, 0.0, 1.0, 0.5),),
                _modes(_A("flat", "yellow"), _A("checker", "orange", "white", 0.3)),
            ),
            Part(
                "windows",
                (
                    _R(-0.6, -0.2, 0.22, 0.16),
                    _R(-0.05, -0.2, 0.22, 0.16),
                    _R(0.5, -0.2, 0.22, 0.16),
                ),
                _GLASS,
            ),
            Part("wheels", (_E(-0.6, 0.5, 0.22, 0.22), _E(0.6, 0.5, 0.22, 0.22)), _WHEEL),
        ),
    ),
    SceneClass(
        "tree",
        (
            Part("trunk", (_R(0.0, 0.55, 0.15, 0.45),), _modes(_WOOD, _A("flat", "brown"))),
            Part(
                "canopy",
                (
                    _E(0.0, -0.35, 0.6, 0.55),
                    _E(-0.45, -0.05, 0.4, 0.35),
                    _E(0.45, -0.05, 0.4, 0.35),
                ),
                _modes(_LEAVES[0], _A("blotch", "yellow", "orange", 0.4)),
            ),
        ),
    ),
    SceneClass(
        "mushroom",
        (
            Part(
                "stem",
                (_P((-0.22, 0.0), (0.22, 0.0), (0.3, 0.95), (-0.3, 0.95)),),
                _modes(_A("flat", "white"), _A("stripes", "tan", "white", 0.15)),
            ),
            Part(
                "cap",
                (_D(0.0, 0.05, 0.95, 0.85),),
                _modes(_A("dots", "red", "white", 0.3), _A("dots", "brown", "tan", 0.3)),
            ),
        ),
    ),
    SceneClass(
        "house",
        (
            Part(
                "walls",
                (_R(0.0, 0.35, 0.75, 0.6),),
                _modes(_A("flat", "tan"), _A("checker", "red", "darkred", 0.2)),
            ),
            Part(
                "roof",
                (_P((-0.95, -0.22), (0.95, -0.22), (0.0, -0.95)),),
                _modes(_A("stripes", "darkred", "black", 0.15), _A("flat", "navy")),
            ),
            Part(
                "openings",
                (_R(0.0, 0.67, 0.17, 0.28), _R(-0.45, 0.2, 0.16, 0.15), _R(0.45, 0.2, 0.16, 0.15)),
                _modes(_GLASS[0], _WOOD),
            ),
        ),
    ),
    SceneClass(
        "cart",
        (
            Part(
                "basket",
                (_P((-0.95, -0.55), (0.95, -0.55), (0.75, 0.35), (-0.75, 0.35)),),
                _modes(_WOOD, _A("checker", "purple", "white", 0.25)),
            ),
            Part("wheels", (_E(-0.45, 0.5, 0.3, 0.3), _E(0.45, 0.5, 0.3, 0.3)), _WHEEL),
        ),
    ),
    SceneClass(
        "snowman",
        (
            Part(
                "body",
                (_E(0.0, 0.45, 0.55, 0.5), _E(0.0, -0.28, 0.38, 0.34)),
                _modes(_A("flat", "white"), _A("gradient", "lightgrey", "white")),
            ),
            Part(
                "hat",
                (_R(0.0, -0.78, 0.24, 0.17), _R(0.0, -0.6, 0.4, 0.05)),
                _modes(_BLACK, _A("stripes", "red", "black", 0.2)),
            ),
            Part(
                "scarf",
                (_R(0.0, 0.02, 0.42, 0.1),),
                _modes(
                    _A("checker", "red", "yellow", 0.2), _A("stripes", "green", "darkgreen", 0.2)
                ),
            ),
        ),
    ),
    SceneClass(
        "lamp",
        (
            Part(
                "stand",
                (_R(0.0, 0.25, 0.07, 0.6), _E(0.0, 0.85, 0.5, 0.14)),
                _modes(_METAL, _BLACK),
            ),
            Part(
                "shade",
                (_P((-0.35, -0.92), (0.35, -0.92), (0.7, -0.3), (-0.7, -0.3)),),
                _modes(_A("flat", "yellow"), _A("stripes", "orange", "white", 0.2)),
            ),
        ),
    ),
    SceneClass(
        "fish",
        (
            Part(
                "fins",
                (
                    _P((0.55, 0.0), (1.0, -0.45), (1.0, 0.45)),
                    _P((-0.35, -0.3), (0.25, -0.3), (-0.15, -0.7)),
                ),
                _modes(_A("flat", "yellow"), _A("flat", "magenta")),
            ),
            Part(
                "body",
                (_E(-0.1, 0.0, 0.75, 0.45),),
                _modes(_A("stripes", "orange", "white", 0.35), _A("checker", "cyan", "blue", 0.25)),
            ),
        ),
    ),
    SceneClass(
        "rocket",
        (
            Part(
                "fins",
                (
                    _P((-0.28, 0.25), (-0.65, 0.85), (-0.28, 0.7)),
                    _P((0.28, 0.25), (0.65, 0.85), (0.28, 0.7)),
                ),
                _modes(_A("flat", "blue"), _A("flat", "orange")),
            ),
            Part(
                "body",
                (_R(0.0, 0.05, 0.28, 0.65),),
                _modes(_A("gradient", "lightgrey", "white"), _A("checker", "grey", "white", 0.3)),
            ),
            Part(
                "nose",
                (_P((-0.28, -0.6), (0.28, -0.6), (0.0, -1.0)),),
                _modes(_A("flat", "red"), _A("flat", "navy")),
            ),
        ),
    ),
    SceneClass(
        "boat",
        (
            Part(
                "sail",
                (
                    _P((-0.05, -0.95), (-0.05, 0.25), (-0.75, 0.25)),
                    _P((0.05, -0.8), (0.05, 0.25), (0.6, 0.25)),
                ),
                _modes(_A("flat", "white"), _A("stripes", "blue", "white", 0.25)),
            ),
            Part(
                "hull",
                (_P((-1.0, 0.3), (1.0, 0.3), (0.7, 0.72), (-0.7, 0.72)),),
                _modes(_A("flat", "navy"), _WOOD),
            ),
        ),
    ),
    SceneClass(
        "flower",
        (
            Part(
                "stem",
                (
                    _R(0.0, 0.45, 0.06, 0.5),
                    _E(0.22, 0.55, 0.24, 0.09, -0.5),
                    _E(-0.22, 0.7, 0.22, 0.08, 0.5),
                ),
                _modes(_LEAVES[0], _A("flat", "green")),
            ),
            Part("petals", _PETALS, _modes(_A("flat", "pink"), _A("flat", "magenta"))),
            Part(
                "centre",
                (_E(0.0, -0.35, 0.2, 0.2),),
                _modes(_A("dots", "yellow", "orange", 0.2), _A("dots", "brown", "black", 0.2)),
            ),
        ),
    ),
    SceneClass(
        "robot",
        (
            Part(
                "limbs",
                (
                    _R(-0.25, 0.72, 0.12, 0.26),
                    _R(0.25, 0.72, 0.12, 0.26),
                    _R(-0.62, 0.0, 0.1, 0.34),
                    _R(0.62, 0.0, 0.1, 0.34),
                ),
                _modes(_BLACK, _A("flat", "darkgrey")),
            ),
            Part(
                "torso",
                (_R(0.0, 0.05, 0.48, 0.42),),
                _modes(_A("checker", "blue", "navy", 0.25), _A("stripes", "orange", "yellow", 0.2)),
            ),
            Part(
                "head",
                (_R(0.0, -0.67, 0.3, 0.26),),
                _modes(_METAL, _A("checker", "grey", "white", 0.25)),
            ),
        ),
    ),
    SceneClass(
        "ladybug",
        (
            Part("head", (_E(0.0, -0.62, 0.38, 0.26),), _modes(_BLACK, _A("flat", "darkgrey"))),
            Part(
                "shell",
                (_E(0.0, 0.12, 0.78, 0.68),),
                _modes(_A("dots", "red", "black", 0.3), _A("dots", "yellow", "black", 0.3)),
            ),
        ),
    ),
    SceneClass(
        "bottle",
        (
            Part(
                "glass",
                (
                    _R(0.0, 0.3, 0.4, 0.65),
                    _P((-0.4, -0.35), (0.4, -0.35), (0.15, -0.68), (-0.15, -0.68)),
                    _R(0.0, -0.78, 0.15, 0.12),
                ),
                _modes(_A("gradient", "darkgreen", "green"), _A("flat", "brown")),
            ),
            Part(
                "label",
                (_R(0.0, 0.35, 0.4, 0.25),),
                _modes(_A("stripes", "white", "red", 0.15), _A("flat", "yellow")),
            ),
            Part("cap", (_R(0.0, -0.93, 0.17, 0.07),), _modes(_A("flat", "red"), _METAL)),
        ),
    ),
    SceneClass(
        "locomotive",
        (
            Part(
                "boiler",
                (_R(-0.25, 0.05, 0.65, 0.3),),
                _modes(_A("flat", "green"), _A("stripes", "navy", "blue", 0.25)),
            ),
            Part(
                "cabin",
                (_R(0.62, -0.15, 0.32, 0.5), _R(-0.65, -0.4, 0.1, 0.18)),
                _modes(_A("flat", "red"), _A("flat", "yellow")),
            ),
            Part(
                "wheels",
                (_E(-0.65, 0.5, 0.2, 0.2), _E(-0.15, 0.5, 0.2, 0.2), _E(0.6, 0.5, 0.2, 0.2)),
                _WHEEL,
            ),
        ),
    ),
    SceneClass(
        "tv",
        (
            Part(
                "frame",
                (_R(0.0, -0.1, 0.95, 0.68), _P((-0.3, 0.9), (0.3, 0.9), (0.1, 0.55), (-0.1, 0.55))),
                _modes(_WOOD, _A("flat", "darkgrey")),
            ),
            Part(
                "screen",
                (_R(0.0, -0.12, 0.77, 0.5),),
                _modes(_A("blotch", "blue", "cyan", 0.35), _A("static", "black", "lightgrey")),
            ),
        ),
    ),
    SceneClass(
        "pottedplant",
        (
            Part(
                "leaves",
                (
                    _E(0.0, -0.3, 0.52, 0.55),
                    _E(-0.45, -0.02, 0.38, 0.22, 0.5),
                    _E(0.45, -0.02, 0.38, 0.22, -0.5),
                ),
                _LEAVES,
            ),
            Part(
                "pot",
                (_P((-0.45, 0.28), (0.45, 0.28), (0.32, 0.95), (-0.32, 0.95)),),
                _modes(_A("flat", "terracotta"), _A("checker", "blue", "white", 0.25)),
            ),
        ),
    ),
    SceneClass(
        "umbrella",
        (
            Part("handle", (_R(0.0, 0.42, 0.06, 0.5),), _modes(_BLACK, _METAL)),
            Part(
                "canopy",
                (_D(0.0, -0.05, 1.0, 0.8),),
                _modes(_A("rays", "magenta", "white", 0.25), _A("rays", "red", "yellow", 0.25)),
            ),
        ),
    ),
    SceneClass(
        "duck",
        (
            Part(
                "body",
                (_E(0.15, 0.3, 0.8, 0.45),),
                _modes(_A("flat", "white"), _A("blotch", "tan", "brown", 0.35)),
            ),
            Part(
                "head",
                (_E(-0.5, -0.4, 0.36, 0.34),),
                _modes(_A("flat", "darkgreen"), _A("flat", "navy")),
            ),
            Part(
                "beak",
                (_P((-0.75, -0.5), (-0.75, -0.3), (-1.12, -0.4)),),
                _modes(_A("flat", "orange"), _A("flat", "yellow")),
            ),
        ),
    ),
)
SCENE_CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(c.name for c in SCENE_CLASSES)


def _poly_mask(verts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside a convex polygon (either orientation). verts [n, 2]; x, y: [...] -> bool."""
    pos = np.ones(x.shape, dtype=bool)
    neg = np.ones(x.shape, dtype=bool)
    for k in range(len(verts)):
        (x0, y0), (x1, y1) = verts[k], verts[(k + 1) % len(verts)]
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        pos &= cross >= 0
        neg &= cross <= 0
    return pos | neg


def _prim_mask(prim: Prim, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Indicator of a primitive in object coordinates. u, v: [...] -> bool [...]."""
    p = prim.params
    if prim.kind == "poly":
        return _poly_mask(np.asarray(p).reshape(-1, 2), u, v)
    cu, cv, a, b, ang = p
    du, dv = u - cu, v - cv
    if ang:
        c, s = math.cos(ang), math.sin(ang)
        du, dv = c * du + s * dv, -s * du + c * dv
    inside = (du / a) ** 2 + (dv / b) ** 2 <= 1.0
    if prim.kind == "dome":
        inside &= v <= cv
    elif prim.kind != "ellipse":
        raise ValueError(f"unknown primitive {prim.kind!r}")
    return inside


def _part_mask(part: Part, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = _prim_mask(part.shapes[0], u, v)
    for prim in part.shapes[1:]:
        out |= _prim_mask(prim, u, v)
    return out


_GEOMETRY: dict[int, tuple[float, float]] = {}


def _class_geometry(cls: int) -> tuple[float, float]:
    """(area, extent) of class ``cls`` (1-based) in object units: area of the union of its
    parts, extent the largest distance of an object point from the object origin."""
    geo = _GEOMETRY.get(cls)
    if geo is None:
        n, lim = 261, 1.3
        g = np.linspace(-lim, lim, n)
        u, v = np.meshgrid(g, g)  # [n, n] each
        inside = np.zeros_like(u, dtype=bool)
        for part in SCENE_CLASSES[cls - 1].parts:
            inside |= _part_mask(part, u, v)
        step = g[1] - g[0]
        area = float(inside.sum()) * step * step
        extent = float(np.sqrt(u[inside] ** 2 + v[inside] ** 2).max()) + step
        geo = _GEOMETRY[cls] = (area, extent)
    return geo


def _mix_weights(
    app: Appearance, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Texture weight in [0, 1] of ``colour_b`` at object coordinates u, v: [N] -> [N]."""
    kind = app.texture
    p = app.period * rng.uniform(0.85, 1.2)
    if kind == "flat":
        return np.zeros_like(u)
    if kind == "stripes":
        ang = rng.uniform(0.0, math.pi)
        w = u * math.cos(ang) + v * math.sin(ang)
        return (((w / p + rng.uniform()) % 1.0) < 0.5).astype(np.float32)
    if kind == "checker":
        ou, ov = rng.uniform(0.0, p, size=2)
        return ((np.floor((u + ou) / p) + np.floor((v + ov) / p)) % 2).astype(np.float32)
    if kind == "dots":
        ou, ov = rng.uniform(0.0, p, size=2)
        du = (u + ou) % p - p / 2
        dv = (v + ov) % p - p / 2
        return (du * du + dv * dv <= (_DOT_RADIUS * p) ** 2).astype(np.float32)
    if kind == "blotch":
        acc = np.zeros_like(u)
        for _ in range(4):
            ang = rng.uniform(0.0, 2.0 * math.pi)
            f = 2.0 * math.pi / (p * rng.uniform(0.8, 1.6))
            acc += np.sin(f * (u * math.cos(ang) + v * math.sin(ang)) + rng.uniform(0, 2 * math.pi))
        return 0.5 + 0.5 * np.tanh(1.5 * acc)
    if kind == "gradient":
        ang = rng.uniform(0.0, 2.0 * math.pi)
        return np.clip(0.5 + 0.5 * (u * math.cos(ang) + v * math.sin(ang)), 0.0, 1.0)
    if kind == "rays":
        n = max(3, round(2.0 / p))
        frac = np.arctan2(v, u) * (n / (2.0 * math.pi)) + rng.uniform()
        return ((frac % 1.0) < 0.5).astype(np.float32)
    if kind == "static":
        return rng.uniform(0.0, 1.0, size=u.shape).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20.0, 235.0, size=3)


class SyntheticScenes(_ProceduralSource):
    """Procedural 20-class segmentation source of multi-part objects on varied scenes
    (PASCAL-5i-like block folds). See the module docstring for the design.

    Args:
        split: "train", "val" or "test"; selects disjoint image streams.
        num_images: images in the split, or a {split: count} mapping (default and for
            missing splits: train 1000, val/test 300).
        image_size: int or (H, W); every image has this size (default 128: 16x16 cells at
            stride 8; meant for >= 64, works down to 16).
        seed: data seed; image i is a pure function of (seed, split, i).
        min_pixels: a class counts in an image with at least this many pixels
            (default: PASCAL's 2*32*32 scaled to the image area).
        border: width in pixels of the 255 band on the object side of each
            object boundary (0 disables it).
        max_objects: images hold 1..max_objects objects of distinct classes, in equal
            shares; counts and classes are balanced per block of 20 images (see
            :meth:`object_classes`), so every class has nearly the same number of objects.
        cache: keep generated images in memory.
    """

    class_names = SCENE_CLASS_NAMES
    default_size = 128
    scene_classes = SCENE_CLASSES
    scene_types = SCENE_TYPES
    area_range = (0.06, 0.28)  # object area as a fraction of the image (log-uniform)

    def __init__(self, *args, **kwargs) -> None:  # the arguments of _ProceduralSource
        super().__init__(*args, **kwargs)
        self._blocks: dict[int, list[list[int]]] = {}  # object classes per 20 images

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate image i without touching the cache (pure function of seed, split, i).
        -> image uint8 [H, W, 3], class-index mask uint8 [H, W]."""
        image, mask, _ = self.render_parts(i)
        return image, mask

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_KEY[self.split], int(i), stream])

    def scene_of(self, i: int) -> str:
        """Scene type of image i's background (one of ``SCENE_TYPES``)."""
        return SCENE_TYPES[int(self._rng(i, 11).integers(len(SCENE_TYPES)))]

    def object_classes(self, i: int) -> list[int]:
        """Classes of image i's objects in painting order (later ones on top); an object may
        end up hidden by later ones or below ``min_pixels``, see :meth:`classes_in`."""
        return self._object_classes(int(i), self._rng(i, 12))

    def _object_classes(self, i: int, rng: np.random.Generator) -> list[int]:
        classes = self._block(i // 20)[i % 20]
        return [classes[k] for k in rng.permutation(len(classes))]

    def _block(self, b: int) -> list[list[int]]:
        """Object classes of the 20 images of block b (images 20b .. 20b + 19).

        Object counts cycle through 1..max_objects in shuffled order, and the objects'
        classes are read from a chain of shuffled lists of all 20 classes (first objects
        first), so every class has one first object per block and nearly equal totals.
        """
        block = self._blocks.get(b)
        if block is None:
            n = self.num_classes
            rng = np.random.default_rng([self.seed, _SPLIT_KEY[self.split], b, 13])
            n_obj = rng.permutation(np.resize(np.arange(1, self.max_objects + 1), 20))  # [20]
            slots = [(k, j) for j in range(self.max_objects) for k in range(20) if n_obj[k] > j]
            chain = np.concatenate([rng.permutation(n) + 1 for _ in range(-(-len(slots) // n))])
            block = [[] for _ in range(20)]
            for (k, _), c in zip(slots, chain.tolist(), strict=False):
                if c in block[k]:  # rare clash within an image: any class it lacks
                    c = int(rng.choice([x for x in range(1, n + 1) if x not in block[k]]))
                block[k].append(c)
            self._blocks[b] = block
        return block

    def render_parts(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image i with its part labels: image uint8 [H, W, 3], class-index mask uint8
        [H, W] (as :meth:`render`), part mask uint8 [H, W]: 0 off objects, k + 1 on part k
        of the class at that pixel (``SCENE_CLASSES[c - 1].parts[k]``; no ignore band)."""
        i = int(i)
        h, w = self.image_size
        scene_rng = self._rng(i, 11)
        scene = SCENE_TYPES[int(scene_rng.integers(len(SCENE_TYPES)))]
        img = self._scene(scene, scene_rng)  # [H, W, 3] float32
        self._distractors(img, scene_rng)
        label = np.zeros((h, w), dtype=np.uint8)  # [H, W]
        parts = np.zeros((h, w), dtype=np.uint8)  # [H, W]

        rng = self._rng(i, 12)
        classes = self._object_classes(i, rng)
        placed: list[tuple[float, float, float]] = []  # (cx, cy, reach) in pixels
        for cls in classes:
            self._draw_object(cls, img, label, parts, placed, rng)

        img += rng.standard_normal(img.shape, dtype=np.float32) * 4.0 + 0.5
        image = np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)  # rounded
        return image, _ignore_band(label, self.border), parts

    # -- objects --------------------------------------------------------------------------

    def _draw_object(self, cls, img, label, parts, placed, rng) -> None:
        """Paint one instance of class ``cls`` into img [H, W, 3], label and parts [H, W]."""
        h, w = self.image_size
        spec = SCENE_CLASSES[cls - 1]
        area, extent = _class_geometry(cls)
        lo, hi = self.area_range
        frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        sx, sy = rng.uniform(0.85, 1.15, size=2)
        r = math.sqrt(frac * h * w / (area * sx * sy))
        r = min(r, 0.55 * min(h, w) / (extent * max(sx, sy)))  # mostly inside the image
        reach = extent * r * max(sx, sy)
        # Centre: the candidate farthest (relative to sizes) from the objects already placed.
        best, best_score = (w / 2.0, h / 2.0), -1.0
        for _ in range(6):
            cx = rng.uniform(min(0.7 * reach, w / 2), max(w - 0.7 * reach, w / 2))
            cy = rng.uniform(min(0.7 * reach, h / 2), max(h - 0.7 * reach, h / 2))
            score = min(
                (math.hypot(cx - px, cy - py) / (reach + pr) for px, py, pr in placed),
                default=math.inf,
            )
            if score > best_score:
                best, best_score = (cx, cy), score
            if score >= 0.75:
                break
        cx, cy = best
        placed.append((cx, cy, reach))

        theta = rng.uniform(-0.45, 0.45)
        flip = -1.0 if rng.uniform() < 0.5 else 1.0
        y0, y1 = max(0, int(cy - reach)), min(h, int(math.ceil(cy + reach)) + 1)
        x0, x1 = max(0, int(cx - reach)), min(w, int(math.ceil(cx + reach)) + 1)
        if y0 >= y1 or x0 >= x1:
            return
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5  # [h', 1]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5  # [1, w']
        dx, dy = xx - cx, yy - cy
        c, s = math.cos(theta), math.sin(theta)
        u = flip * (c * dx + s * dy) / (r * sx)  # [h', w']
        v = (-s * dx + c * dy) / (r * sy)  # [h', w']
        bright = rng.uniform(0.85, 1.12)
        ang = rng.uniform(0.0, 2.0 * math.pi)
        patch, lab, prt = img[y0:y1, x0:x1], label[y0:y1, x0:x1], parts[y0:y1, x0:x1]
        for k, part in enumerate(spec.parts):
            app = part.modes[int(rng.integers(2))]
            inside = _part_mask(part, u, v)  # [h', w'] bool
            if not inside.any():
                continue
            pu, pv = u[inside], v[inside]  # [N] each
            t = _mix_weights(app, pu, pv, rng)[:, None]  # [N, 1]
            ca = np.asarray(app.colour_a) + rng.normal(0.0, 10.0, 3)  # [3]
            cb = np.asarray(app.colour_b) + rng.normal(0.0, 10.0, 3)  # [3]
            shade = bright * (1.0 + 0.1 * (pu * math.cos(ang) + pv * math.sin(ang)))  # [N]
            patch[inside] = ((ca * (1.0 - t) + cb * t) * shade[:, None]).astype(np.float32)
            lab[inside] = cls
            prt[inside] = k + 1

    # -- scenes ---------------------------------------------------------------------------

    def _scene(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """Background of one scene type. -> [H, W, 3] float32."""
        h, w = self.image_size
        s = float(min(h, w))
        yy = np.arange(h, dtype=np.float32)[:, None]  # [H, 1]
        xx = np.arange(w, dtype=np.float32)[None, :]  # [1, W]
        if kind == "smooth":
            return _smooth_field(rng, h, w, int(rng.integers(2, 5)), _random_colour(rng), 45.0)
        if kind == "clutter":
            img = _smooth_field(rng, h, w, 3, _random_colour(rng), 25.0)
            n = int(np.clip(round(h * w / rng.uniform(60.0, 150.0)), 8, 2000))
            _paint_blobs(img, rng, n, s * 0.025, s * 0.07)
            return img
        if kind == "mosaic":
            cell = max(3.0, s * rng.uniform(0.05, 0.12))
            palette = np.stack([_random_colour(rng) for _ in range(int(rng.integers(3, 6)))])
            gh, gw = int(h / cell) + 3, int(w / cell) + 3
            seeds = np.stack(np.mgrid[0:gh, 0:gw], -1) - 1 + rng.uniform(0, 1, (gh, gw, 2))
            seeds = seeds * cell  # [gh, gw, 2] (y, x) of one seed per grid cell
            cols = palette[rng.integers(len(palette), size=(gh, gw))]  # [gh, gw, 3]
            cols = cols + rng.normal(0.0, 12.0, size=cols.shape)
            iy = (yy / cell).astype(np.int64) + 1  # [H, 1] grid row of each pixel (shifted)
            ix = (xx / cell).astype(np.int64) + 1  # [1, W]
            sy_, sx_ = seeds[..., 0].ravel(), seeds[..., 1].ravel()  # [gh * gw] each
            best = np.full((h, w), np.inf, dtype=np.float32)
            nearest = np.zeros((h, w), dtype=np.int64)  # [H, W] flat index of the nearest seed
            for oy in (-1, 0, 1):
                for ox in (-1, 0, 1):
                    k = (iy + oy) * gw + (ix + ox)  # [H, W]
                    d = (sy_[k] - yy) ** 2 + (sx_[k] - xx) ** 2
                    closer = d < best
                    best = np.where(closer, d, best)
                    nearest = np.where(closer, k, nearest)
            return cols.reshape(-1, 3)[nearest].astype(np.float32)
        if kind == "stripes":
            ang = rng.uniform(0.0, math.pi)
            period = max(3.0, s * rng.uniform(0.04, 0.15))
            phase = (xx * math.cos(ang) + yy * math.sin(ang)) / period
            if rng.uniform() < 0.5:
                t = ((phase % 1.0) < 0.5).astype(np.float32)
            else:
                t = 0.5 + 0.5 * np.sin(2.0 * math.pi * phase)
            ca, cb = _random_colour(rng), _random_colour(rng)
            base = _smooth_field(rng, h, w, 3, np.zeros(3), 20.0)
            return base + (ca * (1.0 - t[..., None]) + cb * t[..., None]).astype(np.float32)
        if kind == "bricks":
            ang = rng.uniform(-0.3, 0.3) + (math.pi / 2 if rng.uniform() < 0.25 else 0.0)
            c, sn = math.cos(ang), math.sin(ang)
            bu, bv = c * xx + sn * yy, -sn * xx + c * yy  # [H, W] brick-aligned coordinates
            bh = max(3.0, s * rng.uniform(0.05, 0.1))
            bw = bh * rng.uniform(1.8, 3.0)
            row = np.floor(bv / bh)
            shifted = bu + 0.5 * bw * (row % 2)
            col = np.floor(shifted / bw)
            mortar = max(1.0, 0.15 * bh)
            gap = ((bv % bh) < mortar) | ((shifted % bw) < mortar)
            table = _random_colour(rng) + rng.normal(0.0, 18.0, size=(97, 3))  # [97, 3]
            idx = (row.astype(np.int64) * 31 + col.astype(np.int64) * 7) % 97  # [H, W]
            out = table[idx].astype(np.float32)  # [H, W, 3]
            out[gap] = _random_colour(rng)
            return out
        if kind == "noise":
            t = np.zeros((h, w), dtype=np.float32)
            for amp, cells in ((1.0, 4), (0.7, 10), (0.5, max(4, int(s / 6))), (0.35, int(s / 3))):
                grid = rng.normal(0.0, amp, size=(cells + 1, cells + 1))  # [g, g]
                t += _upsample(grid.astype(np.float32), h, w)
            t = 0.5 + 0.5 * np.tanh(t)  # [H, W]
            ca, cb = _random_colour(rng), _random_colour(rng)
            out = (ca * (1.0 - t[..., None]) + cb * t[..., None]).astype(np.float32)
            out += rng.standard_normal((h, w, 3), dtype=np.float32) * rng.uniform(10.0, 25.0)
            return out
        raise ValueError(f"unknown scene type {kind!r}")

    def _distractors(self, img: np.ndarray, rng: np.random.Generator) -> None:
        """0-3 mid-sized blobs of random colour that belong to no class. img: [H, W, 3]."""
        s = float(min(self.image_size))
        for _ in range(int(rng.integers(0, 4))):
            _paint_blob(img, rng, s * rng.uniform(0.06, 0.14), _random_colour(rng), shade=True)


def _paint_blobs(img: np.ndarray, rng: np.random.Generator, n: int, r0: float, r1: float):
    """Paint n small random convex polygons (3-7 vertices, radius in [r0, r1] px, random flat
    colours) in place, all at once; later ones on top. img: [H, W, 3]."""
    h, w = img.shape[:2]
    f32 = np.float32
    t = int(math.ceil(2.0 * r1)) + 2  # tile side
    radius = rng.uniform(r0, r1, size=n).astype(f32)  # [n]
    aspect = rng.uniform(0.5, 1.0, size=n).astype(f32)
    ang = rng.uniform(0.0, math.pi, size=n)
    centre = (rng.uniform(0.0, 1.0, size=(n, 2)) * (h, w)).astype(f32)  # [n, 2] (y, x)
    colour = rng.uniform(20.0, 235.0, size=(n, 3)).astype(f32)
    nv = rng.integers(3, 8, size=n)  # vertices per polygon
    va = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=(n, 7)), axis=1)  # [n, 7]
    va = np.where(np.arange(7) < nv[:, None], va, va[np.arange(n), nv - 1][:, None])
    vu, vv = np.cos(va).astype(f32), np.sin(va).astype(f32)  # [n, 7] (repeats: empty edges)
    y0 = np.floor(centre[:, 0] - t / 2).astype(np.int64)  # [n] tile corner
    x0 = np.floor(centre[:, 1] - t / 2).astype(np.int64)
    ys = y0[:, None, None] + np.arange(t)[None, :, None]  # [n, t, 1]
    xs = x0[:, None, None] + np.arange(t)[None, None, :]  # [n, 1, t]
    dy = (ys + 0.5).astype(f32) - centre[:, 0, None, None]  # [n, t, 1]
    dx = (xs + 0.5).astype(f32) - centre[:, 1, None, None]  # [n, 1, t]
    c, sn = np.cos(ang).astype(f32)[:, None, None], np.sin(ang).astype(f32)[:, None, None]
    pu = (c * dx + sn * dy) / radius[:, None, None]  # [n, t, t]
    pv = (c * dy - sn * dx) / (radius * aspect)[:, None, None]
    pos = np.ones(pu.shape, dtype=bool)
    neg = np.ones(pu.shape, dtype=bool)
    for k in range(7):
        u0, v0 = vu[:, k, None, None], vv[:, k, None, None]
        u1, v1 = vu[:, (k + 1) % 7, None, None], vv[:, (k + 1) % 7, None, None]
        cross = (u1 - u0) * (pv - v0) - (v1 - v0) * (pu - u0)
        pos &= cross >= 0
        neg &= cross <= 0
    inside = (pos | neg) & (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)  # [n, t, t]
    k, a, b = np.nonzero(inside)  # k ascending: later polygons are written last
    img[ys[k, a, 0], xs[k, 0, b]] = colour[k]


def _paint_blob(
    img: np.ndarray, rng: np.random.Generator, radius: float, colour: np.ndarray, shade=False
) -> None:
    """Paint a random convex polygon (3-7 vertices) or ellipse in place. img: [H, W, 3]."""
    h, w = img.shape[:2]
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    y0, y1 = max(0, int(cy - radius)), min(h, int(math.ceil(cy + radius)) + 1)
    x0, x1 = max(0, int(cx - radius)), min(w, int(math.ceil(cx + radius)) + 1)
    aspect = rng.uniform(0.5, 1.0)
    ang = rng.uniform(0.0, math.pi)
    n = int(rng.integers(3, 9))  # 8 = ellipse
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5  # [h', 1]
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5  # [1, w']
    c, s = math.cos(ang), math.sin(ang)
    pu = (c * (xx - cx) + s * (yy - cy)) / radius  # [h', w']
    pv = (-s * (xx - cx) + c * (yy - cy)) / (radius * aspect)
    if n == 8:
        inside = pu * pu + pv * pv <= 1.0
    else:
        a = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
        inside = _poly_mask(np.stack([np.cos(a), np.sin(a)], 1), pu, pv)
    if shade:
        g = 1.0 + 0.2 * pu[inside]  # [N]
        img[y0:y1, x0:x1][inside] = (colour * g[:, None]).astype(np.float32)
    else:
        img[y0:y1, x0:x1][inside] = colour.astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, h: int, w: int, g: int, base: np.ndarray, spread: float
) -> np.ndarray:
    """Bilinearly upsampled g x g random colour grid around ``base``. -> [H, W, 3] float32."""
    grid = base + rng.normal(0.0, spread, size=(g, g, 3))  # [g, g, 3]
    return _upsample(grid.astype(np.float32), h, w)


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear (align-corners) upsampling by gathers (no BLAS). [gh, gw, ...] -> [h, w, ...]."""
    for axis, n in ((0, h), (1, w)):
        g = grid.shape[axis]
        pos = np.linspace(0.0, g - 1.0, n, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), g - 2)
        frac = (pos - lo).reshape((n,) + (1,) * (grid.ndim - 1 - axis))
        a, b = np.take(grid, lo, axis=axis), np.take(grid, lo + 1, axis=axis)
        grid = a + (b - a) * frac
    return grid


def _ignore_band(label: np.ndarray, border: int) -> np.ndarray:
    """Set object pixels within ``border`` px of a label change to 255. [H, W] -> [H, W]."""
    if border <= 0:
        return label
    obj = label > 0
    edge = np.zeros_like(obj)
    pad = np.pad(label, 1, mode="edge")
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy : dy + label.shape[0], dx : dx + label.shape[1]] != label
    band = edge & obj
    for _ in range(border - 1):
        grown = np.pad(band, 1)
        band = obj & (
            band | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
        )
    out = label.copy()
    out[band] = IGNORE_INDEX
    return out
