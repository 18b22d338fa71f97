"""Train CGMGM on a fold's base classes, then test on its novel classes.

    python -m cgmgm.train                                 # embedded benchmark, defaults
    python -m cgmgm.train dataset=synthetic fold=2 shot=5 model.guidance=cosine
    python -m cgmgm.train -m model.gmm.components=1,2,3 model.gmm.covariance=diag,full
    python -m cgmgm.train hydra.run.dir=<run dir> ckpt_path=<run dir>/checkpoints/last.ckpt

Writes into the Hydra output dir (by default a new one per run, ``outputs/train/<time>_<pid>``;
``hydra.run.dir=...`` to choose it, refused if it already holds another run's files):
``checkpoints/`` (``last.ckpt`` after every validation and on Ctrl+C, and the best on
``val/mIoU``), ``csv/metrics.csv``, ``figures/*.png`` and ``metrics.json`` (flat keys
``test/mIoU``, ``test/FB-IoU``, ``test/GmIoU``, ``test/IoU/class_<id>``, in percent,
``test/classes_drawn`` of ``test/classes_total`` classes had test episodes, plus the run's
fold, shot, seed, guidance...).

Resume in place (the last command above) to keep the best-checkpoint bookkeeping (Lightning
keeps it per directory); nothing earlier is deleted: this run's config goes to
``.hydra-resume-<k>/``, its CSV logs to ``csv/resume-<k>/`` and an earlier ``metrics.json`` is
kept as ``metrics.earlier-<k>.json``. The checkpoint must come from cgmgm.train with this
run's backbone and model settings (an error says which differ).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from cgmgm.base_ckpt import check_base_checkpoint, load_base_checkpoint
from cgmgm.config import (
    attach_feature_cache,
    build_datamodule,
    check_protocol,
    config_dir,
    instantiate_callbacks,
    instantiate_loggers,
    keep_earlier,
    load_checkpoint,
    protocol_record,
    report,
    run_info,
    setting_diffs,
    to_plain,
)
from cgmgm.lit import LitCGMGM, class_names_of
from cgmgm.loggers import finish_loggers
from cgmgm.metrics import classes_drawn


class SaveOnInterrupt(L.Callback):
    """On Ctrl+C (SIGINT) or SIGTERM during fit, save ``dirpath/filename`` (by default the
    ``last.ckpt`` that resuming reads) before Lightning's graceful shutdown, and say how to
    resume. Single-process runs only (under DDP, ranks may not all reach the save)."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt", app: str = "cgmgm.train") -> None:
        self.dirpath, self.filename, self.app = Path(dirpath), filename, app

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if trainer.fast_dev_run or trainer.world_size > 1:
            return
        path = self.dirpath / self.filename
        trainer.save_checkpoint(path)
        print(
            f"\ninterrupted in epoch {trainer.current_epoch} (step {trainer.global_step}): saved "
            f"{path}; resume with `python -m {self.app} hydra.run.dir="
            f"{trainer.default_root_dir} ckpt_path={path}` (and this run's other overrides)",
            file=sys.stderr,
        )


def _check_resume_backbone(ckpt: dict[str, Any], cfg: DictConfig) -> None:
    """A resumed checkpoint must have been trained with this run's backbone."""
    trained = ckpt["hyper_parameters"]["backbone"]["name"]
    if trained != cfg.backbone.name:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} was trained with backbone={trained}, this run has "
            f"backbone={cfg.backbone.name}: resume it with backbone={trained} (or start a new "
            "run without ckpt_path)"
        )


def _check_resume_fits(ckpt: dict[str, Any], module: LitCGMGM, cfg: DictConfig) -> None:
    """The checkpoint's weights must fit ``module`` (else an error naming the model settings
    that differ); other differing settings of the model config are a warning."""
    theirs, own = ckpt["state_dict"], module.state_dict()
    missing = sorted(own.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & theirs.keys() if own[k].shape != theirs[k].shape)
    diffs = setting_diffs(ckpt["hyper_parameters"]["model"], to_plain(cfg.model), "model.")
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} does not fit this run's model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} differently shaped weights, e.g. "
            f"{example}); model settings that differ (checkpoint -> this run): "
            f"{'; '.join(diffs) or 'none (another version of the model code?)'}. Resume with "
            "the checkpoint's settings, or start a new run without ckpt_path"
        )
    if diffs:
        warnings.warn(
            f"resuming {cfg.ckpt_path} with other model settings than it was trained with "
            f"(checkpoint -> this run): {'; '.join(diffs)}",
            stacklevel=2,
        )


def _resumed_stage1(resume: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """The stage-1 record of a checkpoint being resumed; ``base_ckpt`` may only name its own
    stage-1 file (the weights come from the checkpoint either way)."""
    hp = resume["hyper_parameters"]
    stage1 = dict((hp.get("meta") or {}).get("stage1") or {})
    stage1["base_learner_classes"] = hp.get("base_learner_classes")
    if cfg.base_ckpt:
        given = str(Path(str(cfg.base_ckpt)).expanduser().resolve())
        if given != stage1.get("base_ckpt"):
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path} stands on base_ckpt={stage1.get('base_ckpt')}, not "
                f"{given}: resume without base_ckpt (the checkpoint holds its stage-1 weights), "
                "or start a new run on the other stage 1"
            )
    return stage1


def _stage1_record(cfg: DictConfig, base: Any) -> dict[str, Any]:
    """What the frozen backbone stands on, for metrics.json and the checkpoint."""
    if base is not None:
        return {"stage1": base.record()}
    return {
        "stage1": {
            "base_ckpt": None,
            "backbone_weights": str(cfg.backbone.weights),
            "note": "no stage 1: the backbone's own weights (e.g. ImageNet), not fine-tuned on "
            "the base classes, and no base learner (BAM's and the paper's runs stand on stage 1:"
            " python -m cgmgm.train_base, then base_ckpt=)",
        }
    }


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
    resume = None
    if cfg.ckpt_path:  # checked before anything is built: clear errors naming the file
        resume = load_checkpoint(cfg.ckpt_path)
        _check_resume_backbone(resume, cfg)
    # The frozen backbone stays in eval mode on purpose (LitCGMGM checks it every epoch).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    base, stage1 = None, None
    if resume is not None:  # the checkpoint holds its stage-1 weights (and says which file)
        stage1 = _resumed_stage1(resume, cfg)
    elif cfg.base_ckpt:
        base = load_base_checkpoint(cfg.base_ckpt)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    check_protocol(cfg, datamodule)
    if base is not None:
        check_base_checkpoint(
            base,
            dataset=str(cfg.dataset.get("dataset", "")),
            fold=int(cfg.fold),
            backbone=str(cfg.backbone.name),
            base_class_names=datamodule.class_names_for(
                datamodule.train_split, datamodule.train_class_ids
            ),
        )
    info = run_info(cfg, to_plain(cfg.model), to_plain(cfg.backbone))
    info.update(_stage1_record(cfg, base) if stage1 is None else {"stage1": stage1})
    if hasattr(datamodule, "class_record"):  # checkpoints carry the classes trained on, so
        classes = datamodule.class_record(training=True)  # that cgmgm.eval can refuse them
        info["train_class_names"] = classes["train_class_names"]
        info["test_class_names"] = classes["test_class_names"]
    module = LitCGMGM(
        model=to_plain(cfg.model),
        backbone=to_plain(cfg.backbone),
        class_ids=datamodule.classes,
        optim=to_plain(cfg.optim),
        class_names=class_names_of(datamodule),
        seed=int(cfg.seed),
        meta=info,
        protocol=str(cfg.protocol),
        base_learner_classes=(
            base.num_classes
            if base is not None
            else (stage1 or {}).get("base_learner_classes")  # a resumed stage 2
        ),
    )
    if base is not None:
        module.load_base(base)
        print(
            f"stage 2 on {base.path}: its fine-tuned backbone and base learner "
            f"({base.num_classes - 1} base classes), frozen; backbone.weights is not used"
        )
        del base
    if resume is not None:
        _check_resume_fits(resume, module, cfg)
        del resume
    cache = attach_feature_cache(cfg, module, datamodule, training=True)
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
        metrics["test/classes_drawn"] = classes_drawn(results[0], module.class_ids)
        metrics["test/classes_total"] = len(module.class_ids)
        metrics.update(info)
        metrics.update(protocol_record(datamodule))
        metrics["test_ckpt"] = str(ckpt) if ckpt else "last"
        metrics["feature_cache"] = {**cache, **module.feature_cache_stats()}
        if best is not None and best.best_model_score is not None:
            metrics["val/mIoU_best"] = float(best.best_model_score)
        metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
        if trainer.is_global_zero:
            keep_earlier(out_dir / "metrics.json")
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
