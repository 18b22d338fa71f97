"""Does BAM's fine-tuned backbone make CGMGM's cross-data fit pay? Guidance maps, no training.

On the test episodes of a fold's novel classes (the run's dataset config and protocol, the
protocol's first episode seed), with the training-free CGMGM on a backbone that is either the
ImageNet one (``backbone.weights``) or stage 1's fine-tuned one (``--base-ckpt``), it scores
like GmIoU (binarised at 0.5, per-class IoU accumulated over episodes, mean over classes):

- ``cosine``: the cosine prior (Eq. 2);
- ``initial``: IMGR's initial query mask M_q (Eq. 2-7), and its precision (the share of its
  foreground pixels that are foreground in the label, over all episodes);
- ``posterior_cross``: the GMM posterior fitted on support + IMGR-labelled query pixels
  (``model.img=true model.imr=true``, the paper's CDGMG);
- ``posterior_support``: the posterior fitted on the support alone (``img=false imr=false``).

    python experiments/stage1_probe.py dataset=fss1000 dataset.root=../shared/data/coco-mini-dev \\
        fold=0 dataset.classes=null dataset.test_episodes=300 \\
        --base-ckpt outputs/train_base/<run>/checkpoints/best.ckpt --out probe.json

Overrides are the eval app's (conf/eval.yaml; ``model.*`` keys change both variants). The
backbone's features are computed once per image (:class:`cgmgm.features.FeatureCache`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cgmgm.base_ckpt import check_base_checkpoint, load_base_checkpoint
from cgmgm.config import build_datamodule, compose, to_plain
from cgmgm.features import FeatureCache, backbone_fingerprint
from cgmgm.lit import model_kwargs
from cgmgm.metrics import FSSIoU, decide, score
from cgmgm.models.backbone import build_backbone, load_body_state
from cgmgm.models.cgmgm import CGMGM
from cgmgm.models.resize import resize

MAPS = ("cosine", "initial", "posterior_cross", "posterior_support")


def probe(overrides: list[str], base_ckpt: str | None) -> dict:
    cfg = compose("eval", ["model=training_free", "protocol=bam", "shot=1", *overrides])
    if cfg.fold is None:
        raise ValueError("give fold=<k>: the probe runs on one fold's novel classes")
    dm = build_datamodule(cfg, test_seed=None)
    dm.setup("test")
    bb_cfg = to_plain(cfg.backbone)
    backbone = build_backbone(bb_cfg["name"], "none" if base_ckpt else bb_cfg["weights"])
    source = f"{bb_cfg['name']} ({bb_cfg['weights']})"
    if base_ckpt:
        base = load_base_checkpoint(base_ckpt)
        check_base_checkpoint(
            base,
            dataset=str(cfg.dataset.dataset),
            fold=int(cfg.fold),
            backbone=bb_cfg["name"],
            base_class_names=dm.class_names_for(dm.train_split, dm.train_class_ids),
        )
        load_body_state(backbone.body, base.body, base.path)
        source = f"{bb_cfg['name']} fine-tuned by stage 1 ({base.path})"
    model = to_plain(cfg.model)
    cross = CGMGM(backbone, **model_kwargs({**model, "img": True, "imr": True})).eval()
    support = CGMGM(backbone, **model_kwargs({**model, "img": False, "imr": False})).eval()
    cache = FeatureCache(backbone_fingerprint(backbone), 8 * 2**30)
    n = len(dm.classes)
    metrics = {name: FSSIoU(n) for name in MAPS}
    true_pos = predicted = 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            q = batch["query_img"]  # [B, 3, H, W]
            q_feats, s_feats = cache.episode_features(
                backbone, q, batch["support_imgs"], batch["image_keys"]
            )
            args = (
                q_feats,
                s_feats,
                batch["support_masks"],
                batch.get("query_valid"),
                tuple(q.shape[-2:]),
            )
            out_c, out_s = cross.from_features(*args), support.from_features(*args)
            maps = {
                "cosine": out_c["cosine_prior"],
                "initial": out_c["initial_mask"],
                "posterior_cross": out_c["posterior"],
                "posterior_support": out_s["posterior"],
            }
            for name, m in maps.items():
                score(metrics[name], m, batch, dm.protocol)
            target = batch["query_mask"]  # [B, H, W]
            pred = decide(resize(out_c["initial_mask"].float(), target.shape[-2:])) == 1
            true_pos += int((pred & (target == 1)).sum())
            predicted += int((pred & (target != 255)).sum())
    result = {f"{name}_GmIoU": float(m.compute()["mIoU"]) for name, m in metrics.items()}
    result["initial_precision"] = 100.0 * true_pos / max(predicted, 1)
    result.update(
        backbone=source,
        dataset=str(cfg.dataset.dataset),
        root=dm.dataset_kwargs.get("root"),
        fold=int(cfg.fold),
        classes=dm.class_names_for(dm.eval_split, dm.classes),
        episodes=len(dm.test_set),
        test_seed=dm.test_seed,
        seconds=round(time.perf_counter() - start, 1),
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-ckpt", default=None, help="stage-1 checkpoint (else ImageNet)")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("overrides", nargs="*", help="eval app overrides (dataset=..., fold=...)")
    args = ap.parse_args()
    result = probe(args.overrides, args.base_ckpt)
    for key in (*(f"{m}_GmIoU" for m in MAPS), "initial_precision"):
        print(f"{key:24s} {result[key]:6.2f}")
    print(f"{result['episodes']} episodes, {result['backbone']}, {result['seconds']} s")
    if args.out is not None:
        if args.out.exists():
            raise FileExistsError(f"{args.out} exists: choose another --out (nothing overwritten)")
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
