"""Embedded procedural benchmark shaped like PASCAL-5i (20 classes, 4 folds of 5).

Every image is a pure function of ``(seed, split, index)``: a smooth, textured
background plus 1-3 objects of distinct classes drawn with per-instance jitter
(size, aspect, position, rotation, colour, texture period and phase). A class
is a (shape, texture, colour pair) triple; classes that share a shape differ in
texture and colours, classes that share a colour differ in shape. Objects
occlude each other; the object side of every object boundary is labelled 255
(``border`` pixels wide), like VOC's boundary band.

Generating 1000 images at 96x96 takes about a second (numpy only); images are
cached in memory on first use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cgmgm.data.episodes import ClassIndexSource

__all__ = ["CLASS_SPECS", "CLASS_NAMES", "ClassSpec", "SyntheticShapes"]


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


class SyntheticShapes(ClassIndexSource):
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

    num_classes = 20
    fold_scheme = "block"
    class_names = CLASS_NAMES

    def __init__(
        self,
        split: str = "train",
        num_images: int | Mapping[str, int] | None = None,
        image_size: int | tuple[int, int] = 96,
        seed: int = 0,
        min_pixels: int | None = None,
        border: int = 1,
        max_objects: int = 3,
        cache: bool = True,
    ) -> None:
        if split not in _SPLIT_KEY:
            raise ValueError(f"split must be one of {sorted(_SPLIT_KEY)}, got {split!r}")
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
        mask = self._ignore_border(label)
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

    def _ignore_border(self, label: np.ndarray) -> np.ndarray:
        """Set object pixels within ``border`` px of a label change to 255. [H, W] -> [H, W]."""
        if self.border <= 0:
            return label
        obj = label > 0
        edge = np.zeros_like(obj)
        pad = np.pad(label, 1, mode="edge")
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            nb = pad[dy : dy + label.shape[0], dx : dx + label.shape[1]]
            edge |= nb != label
        band = edge & obj
        for _ in range(self.border - 1):
            grown = np.pad(band, 1)
            band = obj & (
                band | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
            )
        out = label.copy()
        out[band] = 255
        return out


def _interp_matrix(n: int, g: int) -> np.ndarray:
    """Bilinear (align-corners) interpolation weights from g knots to n pixels. -> [n, g]."""
    pos = np.linspace(0.0, g - 1.0, n)
    lo = np.clip(np.floor(pos).astype(int), 0, g - 2)
    frac = pos - lo
    m = np.zeros((n, g))
    m[np.arange(n), lo] = 1.0 - frac
    m[np.arange(n), lo + 1] = frac
    return m
