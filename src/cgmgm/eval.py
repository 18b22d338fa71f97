"""Test CGMGM on a fold's novel classes for several episode seeds; report mean and std.

    python -m cgmgm.eval ckpt_path=outputs/train/<run>/checkpoints/last.ckpt
    python -m cgmgm.eval model=training_free fold=1          # no checkpoint needed
    python -m cgmgm.eval ckpt_path=... eval.seeds=[0,1,2] shot=5

With ``ckpt_path``, the model and backbone configs come from the checkpoint's
hyper-parameters (``backbone=`` / ``model.`` overrides are ignored, with a warning), and
``fold`` / ``shot`` / ``protocol`` default to the checkpoint's. The checkpoint is read with
``torch.load(..., weights_only=True)``; a file that is not a cgmgm checkpoint is an error
naming it. ``metrics.json`` in the Hydra output dir holds ``test/<metric>`` (mean over
seeds), ``test/<metric>_std`` (sample standard deviation, 0 for one seed) and
``seed<S>/test/<metric>`` per seed, in percent; ``test/classes_drawn`` (mean over seeds) of
``test/classes_total`` novel classes had test episodes (mIoU averages those of each seed).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from cgmgm.config import (
    attach_feature_cache,
    build_datamodule,
    check_protocol,
    config_dir,
    instantiate_callbacks,
    instantiate_loggers,
    load_checkpoint,
    protocol_record,
    report,
    run_info,
    setting_diffs,
    to_plain,
    write_metrics,
)
from cgmgm.data.protocols import get_protocol
from cgmgm.lit import LitCGMGM, class_names_of
from cgmgm.loggers import finish_loggers, log_final_metrics, log_run_config, task_overrides
from cgmgm.metrics import classes_drawn


def _warn_ignored_overrides(cfg: DictConfig, hp: dict[str, Any], path: Any) -> None:
    """With ``ckpt_path``, the model and backbone come from the checkpoint: warn about
    ``backbone...`` / ``model...`` overrides that would change them (they are ignored)."""
    groups = {o.lstrip("+~").split("=")[0].split(".")[0].split("@")[0] for o in task_overrides(cfg)}
    diffs = []
    if "backbone" in groups:
        diffs += setting_diffs(hp["backbone"], to_plain(cfg.backbone), "backbone.")
    if "model" in groups:
        diffs += setting_diffs(hp["model"], to_plain(cfg.model), "model.")
    if diffs:
        warnings.warn(
            f"ignoring {'; '.join(diffs)}: with ckpt_path the model and backbone come from "
            f"the checkpoint {path} (trained with backbone={hp['backbone']['name']}); drop "
            "these overrides, or train a checkpoint with them",
            stacklevel=3,
        )


def _resolve_from_checkpoint(cfg: DictConfig, meta: dict[str, Any]) -> None:
    """Fill null ``cfg.fold`` / ``cfg.shot`` / ``cfg.protocol`` from the checkpoint's run info
    (else 0, 1, "bam"); warn where the evaluation departs from the training run."""
    with open_dict(cfg):
        for key, default in (("fold", 0), ("shot", 1), ("protocol", "bam")):
            if cfg[key] is None:
                cfg[key] = type(default)(meta.get(key, default))
    if "fold" in meta and "train_class_names" not in meta and int(cfg.fold) != int(meta["fold"]):
        warnings.warn(  # newer checkpoints name their classes: the data module refuses then
            f"testing fold {cfg.fold} with a checkpoint trained on fold {meta['fold']}: "
            "its novel classes were not held out",
            stacklevel=2,
        )
    if "protocol" in meta and cfg.protocol != meta["protocol"]:
        warnings.warn(
            f"testing under protocol {cfg.protocol!r} a checkpoint trained under "
            f"{meta['protocol']!r} (training images, augmentation and sizes differ)",
            stacklevel=2,
        )


def build_module(
    cfg: DictConfig,
    class_ids: list[int],
    class_names: list[str] | None,
    ckpt: dict[str, Any] | None = None,
):
    """The module to test: from ``cfg.ckpt_path`` (``ckpt``: that checkpoint, already loaded),
    or the training-free model from ``cfg``."""
    if cfg.ckpt_path:
        ckpt = ckpt if ckpt is not None else load_checkpoint(cfg.ckpt_path)
        hp = dict(ckpt["hyper_parameters"])
        backbone = {**hp["backbone"], "weights": None}  # the checkpoint holds the weights
        hp.pop("original_resize", None)  # checkpoints before protocols were configurable
        shot = cfg.get("shot")  # null: the checkpoint's
        if hp.get("base_learner_classes") and shot is not None and int(hp["shot"]) != int(shot):
            raise ValueError(
                f"{cfg.ckpt_path} was trained for {hp.get('shot', 1)}-shot episodes with BAM's "
                f"ensemble, whose K-shot reweighting is built for that count: evaluate it with "
                f"shot={hp.get('shot', 1)}, not shot={shot}"
            )
        if isinstance(hp["model"].get("guidance"), str):
            raise ValueError(
                f"{cfg.ckpt_path} predates BAM's meta learner and ensemble (its model.guidance "
                f"is {hp['model']['guidance']!r}, its decoder another network): train it again "
                "with this version (python -m cgmgm.train ...)"
            )
        if "kshot" not in hp["model"]:  # checkpoints before the K-shot reading was a switch
            hp["model"] = {**hp["model"], "kshot": "pool"}
            warnings.warn(
                f"{cfg.ckpt_path} predates model.kshot: evaluating it with kshot=pool (every "
                "shot's pixels pooled, as it was trained); since then masked-out support "
                "pixels are excluded from the cosine prior's max instead of entering as zero "
                "vectors, so its numbers may differ from those it had",
                stacklevel=2,
            )
        module = LitCGMGM(
            **{
                **hp,
                "backbone": backbone,
                "class_ids": class_ids,
                "class_names": class_names,
                "protocol": str(cfg.protocol),  # the protocol of this evaluation
            }
        )
        module.load_state_dict(ckpt["state_dict"])
        return module
    return LitCGMGM(
        model=to_plain(cfg.model),
        backbone=to_plain(cfg.backbone),
        class_ids=class_ids,
        class_names=class_names,
        seed=int(cfg.seed),
        protocol=str(cfg.protocol),
    )


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Mean, sample std and per-seed copies of every metric key."""
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for results in per_seed.values() for k in results))
    for key in keys:
        values = np.array([r.get(key, np.nan) for r in per_seed.values()], dtype=float)
        values = values[~np.isnan(values)]
        out[key] = float(values.mean()) if values.size else float("nan")
        out[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    for seed, results in per_seed.items():
        out.update({f"seed{seed}/{k}": v for k, v in results.items()})
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test once per ``cfg.eval.seeds``, print the table, write metrics.json; return it."""
    start = time.perf_counter()
    meta: dict[str, Any] = {}
    ckpt = None
    if cfg.ckpt_path:
        ckpt = load_checkpoint(cfg.ckpt_path)
        meta = dict(ckpt["hyper_parameters"].get("meta") or {})
        _warn_ignored_overrides(cfg, ckpt["hyper_parameters"], cfg.ckpt_path)
    elif not cfg.model.training_free:
        raise ValueError(
            "nothing to evaluate: pass ckpt_path=<checkpoint> (from cgmgm.train), or "
            "model=training_free for the model without trained parameters"
        )
    _resolve_from_checkpoint(cfg, meta)
    if cfg.get("test_seed") is not None:
        raise ValueError(
            "cgmgm.eval runs one test per seed of eval.seeds; set eval.seeds=[S] instead of "
            "test_seed"
        )
    seeds = cfg.eval.seeds
    seeds = list(get_protocol(cfg.protocol).seeds) if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("eval.seeds is empty; leave it null for the protocol's seeds")
    out_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    seen = meta.get("train_class_names")  # a checkpoint's training classes: never tested on
    datamodule = build_datamodule(cfg, test_seed=seeds[0], seen_classes=seen)
    check_protocol(cfg, datamodule)
    module = build_module(cfg, datamodule.classes, class_names_of(datamodule), ckpt)
    del ckpt
    cache = attach_feature_cache(cfg, module, datamodule, training=False)
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    failed = True
    try:
        log_run_config(trainer.loggers, cfg)  # W&B: the whole config and the overrides
        per_seed = {}
        for seed in seeds:
            datamodule.set_test_seed(seed)  # the same images (and caches), other episodes
            try:
                results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
            except Exception as err:
                if per_seed and trainer.is_global_zero:  # keep the finished seeds' results
                    partial = {**aggregate(per_seed), "seeds_done": list(per_seed)}
                    partial["failed_seed"], partial["error"] = seed, f"{type(err).__name__}: {err}"
                    path = write_metrics(out_dir / "metrics.partial.json", partial)
                    print(f"seed {seed} failed; the {len(per_seed)} finished seed(s): {path}")
                raise
            per_seed[seed] = {k: float(v) for k, v in results.items() if "IoU" in k}
            per_seed[seed]["test/classes_drawn"] = float(classes_drawn(results, module.class_ids))
        metrics = aggregate(per_seed)
        metrics["test/classes_total"] = len(module.class_ids)
        metrics.update(run_info(cfg, module.hparams.model, module.hparams.backbone))
        metrics.update(protocol_record(datamodule))
        metrics["seeds"] = seeds
        metrics["test_seed"] = seeds  # every test seed (protocol_record has the last one's)
        metrics["feature_cache"] = {**cache, **module.feature_cache_stats()}
        metrics["ckpt_path"] = str(cfg.ckpt_path) if cfg.ckpt_path else None
        if "stage1" in meta:  # what the checkpoint's frozen backbone stands on
            metrics["stage1"] = meta["stage1"]
        metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {k: v for k, v in metrics.items() if isinstance(v, float)}, step=0
                )
                logger.save()
            title = f"{len(seeds)} seed(s) {seeds}: mean ± std"
            report(out_dir / "metrics.json", metrics, module, title=title, std_suffix="_std")
            log_final_metrics(trainer.loggers, out_dir / "metrics.json")
        failed = False
    finally:
        finish_loggers(failed)
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the mean test mIoU."""
    return float(evaluate(cfg)["test/mIoU"])


if __name__ == "__main__":
    main()
