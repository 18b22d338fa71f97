"""Table 1 on real photos, without training: how close is each guidance map to the truth?

On DAVIS-2016 in FSS-1000 layout (``<class>/<frame>.jpg`` + ``.png``, 255 = object), with the
frozen offline EfficientNet-Lite0 and the training-free CGMGM, for a fixed set of 1-shot
episodes (support = frame i, query = frame i + gap of the same sequence), it reports the
class-wise foreground IoU of
- the cosine prior (Eq. 2, min-max normalised, binarised at 0.5), and
- the GMM posterior p(fg|x) (Eq. 13, binarised at 0.5),
accumulated like mIoU (sum of intersections / sum of unions per class, mean over classes).

    python experiments/davis_guidance.py --root ../shared/data/davis2016
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cgmgm.models.backbone import build_backbone
from cgmgm.models.cgmgm import CGMGM


def _load(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [3, H, W] in [0, 1], mask [H, W] long 0/1) resized to size = (H, W)."""
    img = Image.open(path.with_suffix(".jpg")).convert("RGB").resize(size[::-1], Image.BILINEAR)
    mask = Image.open(path.with_suffix(".png")).convert("L").resize(size[::-1], Image.NEAREST)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return x, torch.from_numpy((np.asarray(mask) > 127).astype(np.int64))


def episodes(root: Path, per_class: int, gap: int = 4) -> list[tuple[str, Path, Path]]:
    """Fixed (class, support frame, query frame) triples, evenly spread over each sequence."""
    out = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        frames = sorted(cls.glob("*.jpg"))
        if len(frames) <= gap:
            raise ValueError(f"{cls}: needs more than {gap} frames for a support/query pair")
        starts = np.linspace(0, len(frames) - gap - 1, per_class).round().astype(int)
        out += [
            (cls.name, frames[i].with_suffix(""), frames[i + gap].with_suffix("")) for i in starts
        ]
    return out


@torch.no_grad()
def guidance_iou(root: Path, per_class: int = 3, size=(240, 432), img: bool = False) -> dict:
    """Class-wise foreground IoU (%) of the cosine prior and the GMM posterior.

    img=False (the training-free default) fits the mixtures on the support alone; img=True
    adds the query pixels labelled by the IMGR mask (IMR on), the full cross-data fit.
    """
    backbone = build_backbone("efficientnet_lite0", "imagenet")
    model = CGMGM(backbone, training_free=True, img=img, imr=img).eval()
    stats: dict[str, np.ndarray] = {}
    for cls, sup, qry in episodes(root, per_class):
        s_img, s_mask = _load(sup, size)
        q_img, q_mask = _load(qry, size)
        out = model(q_img[None], s_img[None, None], s_mask[None, None])
        st = stats.setdefault(cls, np.zeros((2, 2)))  # [map, (intersection, union)]
        for row, key in enumerate(("cosine_prior", "posterior")):
            up = F.interpolate(out[key], size=size, mode="bilinear", align_corners=False)[0, 0]
            pred, gt = up >= 0.5, q_mask.bool()
            st[row] += [(pred & gt).sum().item(), (pred | gt).sum().item()]
    iou = np.mean([s[:, 0] / np.maximum(s[:, 1], 1) for s in stats.values()], axis=0) * 100
    return {
        "cosine_prior": float(iou[0]),
        "posterior": float(iou[1]),
        "classes": len(stats),
        "episodes": len(stats) * per_class,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("../shared/data/davis2016"))
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(240, 432), metavar=("H", "W"))
    ap.add_argument("--cross", action="store_true", help="also fit on IMGR-labelled query pixels")
    args = ap.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"{args.root} not found: pass --root to a folder in FSS-1000 layout")
    res = guidance_iou(args.root, args.per_class, tuple(args.size), img=args.cross)
    fit = "support + IMGR-labelled query" if args.cross else "support only"
    print(f"episodes: {res['episodes']} ({res['classes']} classes, 1-shot, {args.size}, {fit})")
    print(f"GmIoU cosine prior : {res['cosine_prior']:.2f}")
    print(f"GmIoU GMM posterior: {res['posterior']:.2f}")


if __name__ == "__main__":
    main()
