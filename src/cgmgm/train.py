"""The paper's system on a fold: BAM's stage 1, CGMGM + BAM's ensemble trained on the fold's
base classes, then the test on its novel classes.

    python -m cgmgm.train                                 # embedded benchmark, defaults
    python -m cgmgm.train dataset=synthetic fold=2 shot=5 ablation=bam
    python -m cgmgm.train base_ckpt=<stage-1 run>/checkpoints/best.ckpt  # stage 2 only
    python -m cgmgm.train base_ckpt=null                  # the meta learner alone
    python -m cgmgm.train -m model.gmm.components=1,2,3 model.gmm.covariance=diag,full
    python -m cgmgm.train hydra.run.dir=<run dir> ckpt_path=<run dir>/checkpoints/last.ckpt

Stage 1 (``base_ckpt=fit``, the default) is :func:`cgmgm.train_base.train_base` with this
run's dataset, fold, backbone, seed, recipe and logger, in its own directory under
``stage1.root`` named by those settings and a hash of its whole config; a finished stage 1
there is reused (every shot, ablation and stage-2 setting of a fold shares it, as in BAM).

Writes into the Hydra output dir (by default a new one per run, ``outputs/train/<time>_<pid>``;
``hydra.run.dir=...`` to choose it, refused if it already holds another run's files):
``checkpoints/`` (``last.ckpt`` after every validation and on Ctrl+C, and the best on
``val/mIoU``), ``csv/metrics.csv``, ``figures/*.png`` and ``metrics.json`` (flat keys
``test/mIoU``, ``test/FB-IoU``, ``test/GmIoU``, ``test/IoU/class_<id>``, in percent,
``test/classes_drawn`` of ``test/classes_total`` classes had test episodes, the meta
learner's own ``test/meta/...`` beside the ensemble's, ``test/GmIoU/<map>`` per guidance map,
plus the run's fold, shot, seed, guidance...).

Resume in place (the last command above) to keep the best-checkpoint bookkeeping (Lightning
keeps it per directory); nothing earlier is deleted: this run's config goes to
``.hydra-resume-<k>/``, its CSV logs to ``csv/resume-<k>/`` and an earlier ``metrics.json`` is
kept as ``metrics.earlier-<k>.json``. The checkpoint must come from cgmgm.train with this
run's backbone and model settings (an error says which differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import yaml
from filelock import FileLock
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from cgmgm.base_ckpt import check_base_checkpoint, load_base_checkpoint
from cgmgm.config import (
    attach_feature_cache,
    build_datamodule,
    check_protocol,
    compose,
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
from cgmgm.loggers import finish_loggers, log_final_metrics, log_run_config
from cgmgm.metrics import classes_drawn
from cgmgm.train_base import train_base


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
    if cfg.base_ckpt and cfg.base_ckpt != "fit":
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


# What stage 1 takes from this run's config: whole nodes, then top-level values, then the
# trainer's device keys (the rest of stage 1's trainer is its own: epochs from the recipe).
STAGE1_NODES = ("dataset", "backbone", "recipe", "logger")
STAGE1_VALUES = ("fold", "seed", "protocol", "test_seed")
STAGE1_DEVICE = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def stage1_config(cfg: DictConfig) -> DictConfig:
    """cgmgm.train_base's config for this run's stage 1, with ``paths.output_dir`` its
    directory under ``stage1.root``: named by dataset, fold, backbone and seed, and a hash of the
    whole resolved config, so another setting never reuses it. ``stage1.overrides`` are Hydra
    overrides of stage 1's own keys; those of the keys taken from this run (``STAGE1_NODES``,
    ``STAGE1_VALUES``, e.g. ``seed=0`` or ``dataset.train_transform=protocol``) are applied
    after them and win."""
    shared = STAGE1_NODES + STAGE1_VALUES
    own, late = [], []  # stage 1's own keys (composed), keys taken from this run (set after)
    for item in map(str, cfg.stage1.overrides):
        key = item.split("=", 1)[0].lstrip("+~")
        (late if key.split(".")[0] in shared else own).append(item)
    base = compose("train_base", own)
    OmegaConf.set_struct(base, False)
    for node in STAGE1_NODES:
        base[node] = OmegaConf.to_container(cfg[node], resolve=False) if cfg.get(node) else None
    for key in STAGE1_VALUES:
        base[key] = cfg[key]
    for item in late:  # e.g. seed=0 (one stage 1 for every seed), dataset.train_transform=...
        key, _, value = item.partition("=")
        if key[:1] in "+~" or key in STAGE1_NODES:
            raise ValueError(
                f"stage1.overrides: {item!r}: stage 1 takes {key.lstrip('+~').split('.')[0]} "
                "from this run; set a key of it (e.g. dataset.train_transform=protocol), not "
                "the group, and without + or ~"
            )
        if OmegaConf.select(base, key, default="<missing>") == "<missing>":
            raise ValueError(f"stage1.overrides: {key!r} is not a key of stage 1's config")
        OmegaConf.update(base, key, yaml.safe_load(value) if value else None)
    for key in STAGE1_DEVICE:
        if key in cfg.trainer:
            base.trainer[key] = cfg.trainer[key]
    base.paths.output_dir = "<stage1>"
    identity = json.dumps(stage1_identity(base), sort_keys=True, default=str)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
    name = (
        f"{cfg.dataset.get('dataset', 'data')}-fold{base.fold}-{cfg.backbone.name}-seed{base.seed}"
    )
    base.paths.output_dir = str(
        Path(str(cfg.stage1.root)).expanduser().resolve() / f"{name}-{digest}"
    )
    OmegaConf.set_struct(base, True)
    return base


# Keys of stage 1's config that cannot change what it trains: where it writes and logs, how
# stage 2 draws episodes (the dataset node is stage 2's), stage 2's recipe (stage 1's own
# values are resolved into its optim and trainer), and which devices run it.
STAGE1_INERT = ("paths", "logger", "callbacks", "hydra", "recipe", "test_seed", "shot")
STAGE1_INERT_DATA = (
    "batch_size", "eval_batch_size", "num_workers", "train_episodes", "val_episodes",
    "test_episodes", "sampling", "shot", "test_seed",
)  # fmt: skip
STAGE1_INERT_TRAINER = ("default_root_dir", "accelerator", "devices", "num_nodes", "strategy")


def stage1_identity(base: DictConfig) -> dict[str, Any]:
    """The resolved settings that make a stage 1 what it is (its directory's hash, and
    ``stage1.yaml`` in it): stage 1's config without ``STAGE1_INERT*``."""
    mine = OmegaConf.to_container(base, resolve=True)
    for key in STAGE1_INERT:
        mine.pop(key, None)
    mine["trainer"] = {k: v for k, v in mine["trainer"].items() if k not in STAGE1_INERT_TRAINER}
    data = mine.get("dataset") or {}
    mine["dataset"] = {k: v for k, v in data.items() if k not in STAGE1_INERT_DATA}
    return mine


def _global_rank() -> int:
    """This process's rank among a distributed job's (0 outside one), from the launchers'
    environment (torchrun / Lightning: RANK or LOCAL_RANK; SLURM: SLURM_PROCID)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def fit_stage1(cfg: DictConfig) -> str:
    """``base_ckpt=fit``: this run's stage-1 checkpoint, from a finished stage 1 in its
    directory (:func:`stage1_config`) or trained there now; returns its path. A directory
    holding an unfinished stage 1 is an error saying how to resume it (nothing is overwritten),
    one whose ``stage1.yaml`` differs from this run's stage 1 an error naming the difference;
    concurrent runs of one setting wait for each other on a lock beside the directory (taken by
    rank 0 of a distributed job: the other ranks join its stage 1)."""
    base = stage1_config(cfg)
    out = Path(base.paths.output_dir)
    identity = stage1_identity(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    leader = _global_rank() == 0
    with FileLock(str(out) + ".lock") if leader else contextlib.nullcontext():
        done = _finished_stage1(out)
        if done is not None:
            _check_stage1_record(out, identity)
            print(f"stage 1: reusing the finished stage 1 in {out} ({done})")
        else:
            if leader and out.exists() and any(out.iterdir()):
                raise FileExistsError(
                    f"stage 1 dir {out} holds an unfinished stage 1 (no metrics.json): resume it "
                    f"with `python -m cgmgm.train_base hydra.run.dir={out} "
                    f"ckpt_path={out}/checkpoints/last.ckpt` and the settings in "
                    f"{out}/stage1.yaml as overrides, or move it away to train it again"
                )
            if leader:
                out.mkdir(parents=True, exist_ok=True)
                (out / "stage1.yaml").write_text(yaml.safe_dump(identity, sort_keys=True))
            print(f"stage 1: training the base learner in {out}")
            done = train_base(base)["base_ckpt"]
    if not done:
        raise RuntimeError(f"stage 1 in {out} saved no best checkpoint (no validation ran?)")
    return str(done)


def _check_stage1_record(out: Path, identity: dict[str, Any]) -> None:
    """A finished stage 1 is reused only if its ``stage1.yaml`` is this run's stage 1."""
    path = out / "stage1.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{out} holds a finished stage 1 without stage1.yaml (its settings): move it away, "
            "or pass its checkpoint as base_ckpt=<it>/checkpoints/best.ckpt"
        )
    theirs = yaml.safe_load(path.read_text())
    diffs = setting_diffs(theirs, yaml.safe_load(yaml.safe_dump(identity)), "")
    if diffs:
        raise ValueError(
            f"the finished stage 1 in {out} was trained with other settings ({'; '.join(diffs[:6])}"
            f"{'; ...' if len(diffs) > 6 else ''}: its -> this run's; see {path}): move it away, "
            "or pass base_ckpt=<a stage-1 checkpoint>"
        )


def _finished_stage1(out: Path) -> str | None:
    """The best checkpoint of a finished stage 1 in ``out`` (its metrics.json says which)."""
    path = out / "metrics.json"
    if not path.is_file():
        return None
    ckpt = json.loads(path.read_text()).get("base_ckpt")
    if not ckpt or not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"{path} names stage-1 checkpoint {ckpt}, which is missing: move {out} away to "
            "train stage 1 again, or pass base_ckpt=<a stage-1 checkpoint>"
        )
    return str(ckpt)


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
    elif cfg.base_ckpt == "fit":
        base = load_base_checkpoint(fit_stage1(cfg))
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
        shot=int(cfg.shot),
        loss=to_plain(cfg.loss),
    )
    if base is not None:
        module.load_base(base)
        print(
            f"stage 2 on {base.path}: its fine-tuned backbone and base learner "
            f"({base.num_classes - 1} base classes), frozen; backbone.weights is not used; "
            "BAM's ensemble fuses the meta learner with the base learner"
        )
        del base
    elif not module.model.has_ensemble:
        print(
            "stage 2 without a base learner (base_ckpt=null): the meta learner alone on the "
            f"backbone's own weights ({cfg.backbone.weights}), no ensemble; test/mIoU is the "
            "meta learner's"
        )
    if resume is not None:
        _check_resume_fits(resume, module, cfg)
        del resume
    cache = attach_feature_cache(cfg, module, datamodule, training=True)
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    failed = True
    try:
        log_run_config(trainer.loggers, cfg)  # W&B: the whole config and the overrides
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
        # test/mIoU is BAM's ensemble's with a base learner, else the meta learner's alone
        metrics["ensemble"] = module.model.has_ensemble
        metrics["feature_cache"] = {**cache, **module.feature_cache_stats()}
        if best is not None and best.best_model_score is not None:
            metrics["val/mIoU_best"] = float(best.best_model_score)
        metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
        if trainer.is_global_zero:
            keep_earlier(out_dir / "metrics.json")
            report(out_dir / "metrics.json", metrics, module)
            log_final_metrics(trainer.loggers, out_dir / "metrics.json")
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
