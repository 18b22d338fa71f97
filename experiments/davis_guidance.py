"""Table 1 on real photos, without training: how close is each guidance map to the truth?

On a folder in FSS-1000 layout (``<class>/<n>.jpg`` + ``.png``, 255 = object: DAVIS-2016, whose
support and query are neighbouring frames of one video, or coco-mini-dev, whose are different
photos), with the frozen offline EfficientNet-Lite0 and the training-free CGMGM, for a fixed set
of 1-shot episodes (support = file i, query = file i + gap of the same class folder), it reports
the class-wise foreground IoU of
- the cosine prior (Eq. 2, min-max normalised, binarised at 0.5),
- IMGR's initial query mask M_q (Eq. 2-7; with ``--cross``), and its precision,
- the GMM posterior p(fg|x) (Eq. 13, binarised at 0.5),
accumulated like mIoU (sum of intersections / sum of unions per class, mean over classes).

    python experiments/davis_guidance.py --root ../shared/data/davis2016
    python experiments/davis_guidance.py --root ../shared/data/coco-mini-dev --cross
    python experiments/davis_guidance.py --root ... model.gmm.reg_covar=1e-6   # any model key

The model is ``model=training_free`` composed from conf/ (its defaults), then ``--cross``
(``model.img=true model.imr=true``: support + IMGR-labelled query) or ``--support-only``
(``model.img=false model.imr=false``), then the overrides given.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cgmgm.config import compose_model
from cgmgm.lit import model_kwargs
from cgmgm.models.backbone import build_backbone
from cgmgm.models.cgmgm import CGMGM


def _load(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image ``path`` and its ``.png`` mask -> (image [3, H, W] in [0, 1], mask [H, W] long
    0/1), resized to size = (H, W)."""
    img = Image.open(path).convert("RGB").resize(size[::-1], Image.BILINEAR)
    mask = Image.open(path.with_suffix(".png")).convert("L").resize(size[::-1], Image.NEAREST)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return x, torch.from_numpy((np.asarray(mask) > 127).astype(np.int64))


def episodes(root: Path, per_class: int, gap: int = 4) -> list[tuple[str, Path, Path]]:
    """Fixed (class, support file, query file) triples, evenly spread over each class folder
    (a folder with fewer than gap + 1 images uses the largest gap it has)."""
    out = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        frames = sorted(p for p in cls.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if len(frames) < 2:
            raise ValueError(f"{cls}: needs at least 2 images for a support/query pair")
        g = min(gap, len(frames) - 1)
        starts = np.linspace(0, len(frames) - g - 1, per_class).round().astype(int)
        pairs = [(frames[i], frames[i + g]) for i in starts]
        out += [(cls.name, s, q) for s, q in pairs]
    return out


class MemoBackbone(nn.Module):
    """A frozen backbone that computes each distinct image batch once (keyed by its bytes), so
    that several model variants can be probed on the same episodes at the cost of one."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner = backbone
        self.mid_channels, self.high_channels = backbone.mid_channels, backbone.high_channels
        self._memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = hashlib.sha1(images.detach().contiguous().numpy().tobytes()).hexdigest()
        if key not in self._memo:
            self._memo[key] = self.inner(images)
        return self._memo[key]


@torch.no_grad()
def guidance_iou(
    root: Path,
    per_class: int = 5,
    size: tuple[int, int] = (240, 432),
    overrides: list[str] | tuple[str, ...] = (),
    backbone: nn.Module | None = None,
) -> dict:
    """Class-wise foreground IoU (%) of the cosine prior, the initial mask and the posterior
    of the training-free model ``model=training_free`` + ``overrides``."""
    cfg = compose_model(["model=training_free", *overrides])
    if backbone is None:
        backbone = build_backbone("efficientnet_lite0", "imagenet")
    model = CGMGM(backbone, **model_kwargs(cfg)).eval()
    keys = ("cosine_prior", "initial_mask", "posterior")
    stats: dict[str, np.ndarray] = {}
    for cls, sup, qry in episodes(root, per_class):
        s_img, s_mask = _load(sup, size)
        q_img, q_mask = _load(qry, size)
        out = model(q_img[None], s_img[None, None], s_mask[None, None])
        st = stats.setdefault(cls, np.zeros((3, 3)))  # [map, (intersection, union, predicted)]
        for row, key in enumerate(keys):
            up = F.interpolate(out[key], size=size, mode="bilinear", align_corners=False)[0, 0]
            pred, gt = up >= 0.5, q_mask.bool()
            st[row] += [(pred & gt).sum().item(), (pred | gt).sum().item(), pred.sum().item()]
    s = np.stack(list(stats.values()))  # [classes, map, 3]
    iou = (s[..., 0] / np.maximum(s[..., 1], 1)).mean(0) * 100
    precision = s[:, 1, 0].sum() / max(s[:, 1, 2].sum(), 1) * 100
    return {
        **{k: float(v) for k, v in zip(keys, iou, strict=True)},
        "initial_mask_precision": float(precision),
        "img": bool(cfg["img"]),
        "classes": len(stats),
        "episodes": len(stats) * per_class,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("../shared/data/davis2016"))
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(240, 432), metavar=("H", "W"))
    fit = ap.add_mutually_exclusive_group()
    fit.add_argument("--cross", action="store_true", help="fit on IMGR-labelled query pixels too")
    fit.add_argument("--support-only", action="store_true", help="fit on the support alone")
    ap.add_argument("overrides", nargs="*", help="model config overrides, e.g. model.threshold=0.6")
    args = ap.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"{args.root} not found: pass --root to a folder in FSS-1000 layout")
    overrides = list(args.overrides)
    if args.cross:
        overrides = ["model.img=true", "model.imr=true", *overrides]
    elif args.support_only:
        overrides = ["model.img=false", "model.imr=false", *overrides]
    res = guidance_iou(args.root, args.per_class, tuple(args.size), overrides)
    fit_name = "support + IMGR-labelled query" if res["img"] else "support only"
    n = f"{res['episodes']} ({res['classes']} classes, 1-shot, {args.size}, {fit_name})"
    print(f"episodes: {n}")
    if overrides:
        print(f"overrides: {' '.join(overrides)}")
    print(f"GmIoU cosine prior : {res['cosine_prior']:.2f}")
    if res["img"]:
        print(
            f"GmIoU initial mask : {res['initial_mask']:.2f} "
            f"(precision {res['initial_mask_precision']:.1f}%)"
        )
    print(f"GmIoU GMM posterior: {res['posterior']:.2f}")


if __name__ == "__main__":
    main()
