"""Stage 1 of BAM: train the base learner on a fold's base classes, fine-tuning the backbone.

    python -m cgmgm.train_base                              # embedded benchmark
    python -m cgmgm.train_base dataset=fss1000 dataset.root=../shared/data/coco-mini-dev fold=1
    python -m cgmgm.train_base dataset=pascal dataset.root=data/pascal fold=0 \\
        backbone=resnet50_psp backbone.weights=initmodel/resnet50_v2.pth trainer=gpu

Then stage 2 stands on it: ``python -m cgmgm.train base_ckpt=<run>/checkpoints/best.ckpt``
(same dataset, fold and backbone; BAM's released ``initmodel/PSPNet/.../best.pth`` work too).

Writes into the Hydra output dir (``outputs/train_base/<time>_<pid>``): ``checkpoints/`` (the
best on ``val/mIoU``, the base classes' mIoU without background, and ``last.ckpt``),
``csv/metrics.csv`` and ``metrics.json``: the best checkpoint's per-class base IoU
(``val/IoU/class_<id>``) and mIoU (percent), its path (``base_ckpt``), what was trained and
validated on, and, on PASCAL-5i and COCO-20i, BAM's reported base mIoU for the fold.
Resume in place with ``hydra.run.dir=<run dir> ckpt_path=<run dir>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cgmgm.config import (
    check_protocol,
    config_dir,
    instantiate_callbacks,
    instantiate_loggers,
    keep_earlier,
    load_checkpoint,
    report,
    to_plain,
)
from cgmgm.data.base import BaseDataModule
from cgmgm.lit_base import LitBase
from cgmgm.loggers import finish_loggers

# BAM's authors' stage-1 base mIoU (ResNet-50 PSPNet, %), per fold (DESIGN.md).
BAM_REPORTED_BASE_MIOU = {
    "pascal": (71.43, 69.17, 69.19, 73.72),
    "coco": (50.84, 49.41, 51.95, 50.89),
}


def train_base(cfg: DictConfig) -> dict[str, Any]:
    """Fit the base learner, validate its best checkpoint, write metrics.json; returns it."""
    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    resume = load_checkpoint(cfg.ckpt_path, stage=1) if cfg.ckpt_path else None
    L.seed_everything(cfg.seed, workers=True)
    episodic = instantiate(cfg.dataset, cache=False)  # stage 1 augments: no feature cache
    check_protocol(cfg, episodic)
    data = BaseDataModule(episodic, seed=int(cfg.seed), **to_plain(cfg.base))
    dataset = str(cfg.dataset.get("dataset", ""))
    if resume is not None:
        _check_resume(resume["hyper_parameters"], cfg, dataset, data.base_classes)
        del resume
    split = data.split_record()
    meta = {
        "stage": 1,
        "dataset": dataset,
        "dataset_root": episodic.dataset_kwargs.get("root"),
        "protocol": str(cfg.protocol),
        "fold": int(cfg.fold),
        "num_folds": int(episodic.num_folds),
        "seed": int(cfg.seed),
        "backbone": str(cfg.backbone.name),
        **split,
    }
    module = LitBase(
        backbone=to_plain(cfg.backbone),
        base_classes=data.base_classes,
        optim=to_plain(cfg.optim),
        class_names=_names_by_id(episodic),
        seed=int(cfg.seed),
        meta=meta,
    )
    print(
        f"stage 1: {data.num_classes - 1} base classes of fold {cfg.fold} + background; "
        f"{split['train_images']} training images, {split['val_images']} validation images "
        f"({split['val_split']})"
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    failed = True
    try:
        trainer.fit(module, datamodule=data, ckpt_path=cfg.ckpt_path or None, weights_only=True)
        best = next((c for c in trainer.checkpoint_callbacks if c.monitor == "val/mIoU"), None)
        path = (best.best_model_path or None) if best is not None else None
        results = None
        if path:  # the scores the best checkpoint was saved with
            results = torch.load(path, map_location="cpu", weights_only=True).get("val_results")
        if results is None:  # no validation behind it (e.g. saved by an older version)
            validated = trainer.validate(module, datamodule=data, ckpt_path=path, weights_only=True)
            results = validated[0]
        metrics: dict[str, Any] = {k: float(v) for k, v in results.items() if k != "epoch"}
        if "epoch" in results:
            metrics["best_epoch"] = int(results["epoch"])
        metrics["base_ckpt"] = str(Path(path).resolve()) if path else None
        metrics.update(meta)
        reported = BAM_REPORTED_BASE_MIOU.get(dataset)
        if cfg.backbone.name != "resnet50_psp":  # BAM's numbers are of its ResNet-50
            reported = None
        if reported is not None and 0 <= int(cfg.fold) < len(reported):
            metrics["bam_reported_base_mIoU"] = reported[int(cfg.fold)]
        metrics["epochs"] = int(trainer.current_epoch)
        metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
        if trainer.is_global_zero:
            keep_earlier(out_dir / "metrics.json")
            report(
                out_dir / "metrics.json",
                metrics,
                module,
                "stage 1: the base classes (best checkpoint)",
                prefix="val/",
                summary=("mIoU",),
            )
            if reported is not None:
                print(
                    f"base mIoU {metrics['val/mIoU']:.2f} (BAM's authors, ResNet-50, "
                    f"{dataset} fold {cfg.fold}: {metrics['bam_reported_base_mIoU']:.2f})"
                )
            print(f"stage 2: python -m cgmgm.train base_ckpt={metrics['base_ckpt']} ...")
        failed = False
    finally:
        finish_loggers(failed)
    return metrics


def _check_resume(hp: dict[str, Any], cfg: DictConfig, dataset: str, base: list[int]) -> None:
    """A resumed stage-1 checkpoint must be of this run's backbone, dataset, fold and classes
    (else its best.ckpt would record one setting and hold weights of another)."""
    meta = hp.get("meta") or {}
    pairs = [
        ("backbone", hp["backbone"]["name"], str(cfg.backbone.name)),
        ("dataset", meta.get("dataset"), dataset),
        ("fold", meta.get("fold"), int(cfg.fold)),
        ("base classes", list(hp["base_classes"]), list(base)),
    ]
    diffs = [f"{k}: {a} (checkpoint) vs {b} (this run)" for k, a, b in pairs if a != b]
    if diffs:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} was trained for another setting: {'; '.join(diffs)}. "
            f"Resume it with its own settings (e.g. backbone={pairs[0][1]} fold={pairs[2][1]}),"
            " or start a new run without ckpt_path"
        )


def _names_by_id(episodic: Any) -> list[str] | None:
    """Class names indexed by class id (0 = background), as the table and figures read them."""
    names = getattr(episodic.source(episodic.train_split), "class_names", None)
    return [str(n) for n in names] if names is not None else None


@hydra.main(config_path=str(config_dir()), config_name="train_base", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the best base mIoU (for sweepers)."""
    return float(train_base(cfg)["val/mIoU"])


if __name__ == "__main__":
    main()
