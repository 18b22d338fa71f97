"""Train CGMGM on a fold's base classes, then test on its novel classes.

    python -m cgmgm.train                                 # embedded benchmark, defaults
    python -m cgmgm.train dataset=synthetic fold=2 shot=5 model.guidance=cosine
    python -m cgmgm.train -m model.gmm.components=1,2,3 model.gmm.covariance=diag,full
    python -m cgmgm.train ckpt_path=<run dir>/checkpoints/last.ckpt     # resume fit

Writes into the Hydra output dir (``hydra.run.dir=...`` to choose it): ``checkpoints/``
(``last.ckpt`` and the best on ``val/mIoU``), ``csv/metrics.csv``, ``figures/*.png`` and
``metrics.json`` (flat keys ``test/mIoU``, ``test/FB-IoU``, ``test/GmIoU``,
``test/IoU/class_<id>``, in percent, plus the run's fold, shot, seed, guidance...).
Resuming into another output dir restarts the best-checkpoint bookkeeping (Lightning keeps
it per directory); to keep it, resume in place with ``hydra.run.dir=<run dir>``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from cgmgm.config import (
    check_protocol,
    config_dir,
    instantiate_callbacks,
    instantiate_loggers,
    protocol_record,
    report,
    run_info,
    to_plain,
)
from cgmgm.lit import LitCGMGM, class_names_of
from cgmgm.loggers import finish_loggers


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test, print the table and write metrics.json; returns the metrics dict."""
    start = time.perf_counter()
    if cfg.model.training_free:
        raise ValueError(
            "model=training_free has no parameters to train; run "
            "`python -m cgmgm.eval model=training_free` instead"
        )
    if cfg.test_ckpt not in ("best", "last"):
        raise ValueError(f"test_ckpt must be 'best' or 'last', got {cfg.test_ckpt!r}")
    out_dir = Path(cfg.paths.output_dir)
    # The frozen backbone stays in eval mode on purpose (LitCGMGM checks it every epoch).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    check_protocol(cfg, datamodule)
    info = run_info(cfg, to_plain(cfg.model), to_plain(cfg.backbone))
    module = LitCGMGM(
        model=to_plain(cfg.model),
        backbone=to_plain(cfg.backbone),
        class_ids=datamodule.classes,
        optim=to_plain(cfg.optim),
        class_names=class_names_of(datamodule),
        seed=int(cfg.seed),
        meta=info,
        protocol=str(cfg.protocol),
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    failed = True
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        best = next((c for c in trainer.checkpoint_callbacks if c.monitor == "val/mIoU"), None)
        ckpt = None  # the weights in memory (last)
        if cfg.test_ckpt == "best" and best is not None:
            ckpt = best.best_model_path or None
        results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics = {k: float(v) for k, v in results[0].items() if "IoU" in k}  # percent
        metrics.update(info)
        metrics.update(protocol_record(datamodule))
        metrics["test_ckpt"] = str(ckpt) if ckpt else "last"
        if best is not None and best.best_model_score is not None:
            metrics["val/mIoU_best"] = float(best.best_model_score)
        metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
        if trainer.is_global_zero:
            report(out_dir / "metrics.json", metrics, module)
        failed = False
    finally:
        finish_loggers(failed)
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns test mIoU (for sweepers)."""
    return float(train(cfg)["test/mIoU"])


if __name__ == "__main__":
    main()
