"""LightningModule around :class:`~cgmgm.models.cgmgm.CGMGM`: loss, optimiser, metrics.

- Loss (BAM): ``loss.final`` x CE(final logits) + ``loss.meta`` x CE(meta learner's logits)
  against ``query_mask``, ignoring 255; without a base learner (the meta learner alone) the
  one output's CE. In training the base background leaves out the episode's own class
  (BAM: the training class is a base class the base learner knows).
- Optimiser (BAM): SGD, momentum 0.9, weight decay 1e-4, base lr 0.005 with a 10x multiplier
  on the new layers (every trainable parameter: meta learner and ensemble), poly decay
  ``(1 - step / total) ** 0.9`` stepped every iteration, total = the trainer's estimated
  stepping batches; ``schedule="cosine"`` is the paper's cosine decay (Sec. 4.1) instead.
  The backbone is frozen and stays in eval mode (checked every epoch).
- Metrics (val and test): :class:`~cgmgm.metrics.FSSIoU` of the final prediction (argmax of
  the logits; the ensemble's with a base learner), logged in percent as ``{stage}/mIoU``,
  ``{stage}/FB-IoU``, ``{stage}/IoU/class_<id>``; with an ensemble the meta learner's own as
  ``{stage}/meta/...`` (BAM reports both); ``{stage}/GmIoU``: the primary guidance map
  binarised at 0.5 (paper Table 1), and ``{stage}/GmIoU/<map>`` for every map computed
  (cosine, initial_mask with IMG, posterior when used).
  Scored by :func:`cgmgm.metrics.score` under the run's protocol: at the original label size
  when episodes carry ``query_mask_orig`` (BAM/PFENet), else against ``query_mask``.
- Frozen features: with :meth:`LitCGMGM.use_feature_cache`, batches carrying ``image_keys``
  take the backbone's outputs from a :class:`~cgmgm.features.FeatureCache` (identical results).
- Training randomness (the meta learner's dropout) is a pure function of (seed, epoch, batch,
  rank), so resuming from a checkpoint reproduces an uninterrupted run.

Hyper-parameters are plain dicts/lists/scalars, so checkpoints load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cgmgm.constants import IGNORE_INDEX
from cgmgm.data.protocols import get_protocol
from cgmgm.features import FeatureCache, backbone_fingerprint
from cgmgm.loggers import log_class_table
from cgmgm.metrics import FSSIoU, decide, episode_results, flatten_results, score
from cgmgm.models.backbone import build_backbone, load_body_state
from cgmgm.models.base_learner import BaseLearner
from cgmgm.models.cgmgm import CGMGM, GUIDANCES
from cgmgm.models.resize import resize

_PLAIN = (str, int, float, bool, type(None))
# Map outputs passed on to callbacks (figures), at feature resolution [B, 1, h, w].
MAP_KEYS = ("guidance", "cosine_prior", "posterior", "initial_mask")
# The keys of the ``loss`` config (conf/train.yaml): the weights of CE(final) and CE(meta).
LOSS_KEYS = ("final", "meta")
# The keys of the ``optim`` config (conf/train.yaml, the one home of their values).
OPTIM_KEYS = ("lr", "new_layer_lr_mult", "momentum", "weight_decay", "schedule", "poly_power")
# model config key (dotted) -> CGMGM keyword; conf/model/cgmgm.yaml is the one home of values.
MODEL_KEYS = {
    "guidance": "guidance",
    "img": "img",
    "imr": "imr",
    "kshot": "kshot",
    "threshold": "threshold",
    "proj_dim": "proj_dim",
    "training_free": "training_free",
    "gmm.components": "components",
    "gmm.covariance": "covariance",
    "gmm.iters": "em_iters",
    "gmm.grad": "gmm_grad",
    "gmm.reg_covar": "reg_covar",
}


def _require(cfg: Mapping[str, Any], keys: Any, what: str, home: str) -> dict[str, Any]:
    """{dotted key: value} of ``cfg`` for every key; a missing key is an error naming it."""
    out, missing = {}, []
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                missing.append(key)
                break
            node = node[part]
        else:
            out[key] = node
    if missing:
        raise ValueError(
            f"the {what} config lacks {missing}: compose it from {home} "
            "(cgmgm.config.compose_model() in Python) rather than writing it by hand"
        )
    return out


def _check_plain(value: Any, name: str) -> None:
    """Raise TypeError unless ``value`` is built from dict/list/tuple and scalars only."""
    if isinstance(value, Mapping):
        if type(value) is not dict:
            raise TypeError(f"{name} must be a plain dict, got {type(value).__name__}")
        for k, v in value.items():
            _check_plain(v, f"{name}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{name}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{name} must be a plain value, got {type(value).__name__}")


def model_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """CGMGM keywords from a complete ``model`` config (every key of conf/model/cgmgm.yaml)."""
    values = _require(model, MODEL_KEYS, "model", "conf/model/cgmgm.yaml")
    return {MODEL_KEYS[k]: v for k, v in values.items()}


def build_model(
    model: Mapping[str, Any],
    backbone: Mapping[str, Any],
    base_learner_classes: int | None = None,
    shot: int = 1,
) -> CGMGM:
    """CGMGM from the ``model`` and ``backbone`` config groups (see conf/model/cgmgm.yaml),
    with a base learner over ``base_learner_classes`` (base classes + background) and BAM's
    ensemble for ``shot`` shots when given (its weights and the backbone's then come from a
    stage-1 checkpoint: :meth:`LitCGMGM.load_base`)."""
    bb = _require(backbone, ("name", "weights"), "backbone", "conf/backbone/<name>.yaml")
    weights = "none" if base_learner_classes else bb["weights"]  # the stage-1 body replaces them
    net = build_backbone(bb["name"], weights)
    base = None
    if base_learner_classes:
        base = BaseLearner(net.high_channels, int(base_learner_classes))
    return CGMGM(net, base_learner=base, shot=int(shot), **model_kwargs(model))


def sgd_with_decay(trainer: L.Trainer, groups: list[dict], o: Mapping[str, Any]) -> dict:
    """BAM's SGD over parameter ``groups`` (each with its own lr) with a per-iteration decay,
    ``o["schedule"]`` poly (``o["poly_power"]``) or cosine, over the trainer's estimated
    stepping batches: the optimiser config of both stages."""
    optimizer = torch.optim.SGD(
        groups, lr=groups[0]["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
    )
    total = trainer.estimated_stepping_batches
    if not np.isfinite(total):
        raise ValueError("the lr schedule needs a finite trainer.max_epochs or max_steps")
    if o["schedule"] == "poly":
        scheduler = torch.optim.lr_scheduler.PolynomialLR(
            optimizer, total_iters=int(total), power=o["poly_power"]
        )
    elif o["schedule"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total))
    else:
        raise ValueError(f"optim.schedule must be 'poly' or 'cosine', got {o['schedule']!r}")
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
    }


class LitCGMGM(L.LightningModule):
    """Train / validate / test CGMGM on episodic batches.

    Args:
        model: the ``model`` config (guidance, img, imr, threshold, proj_dim, training_free,
            gmm: {components, covariance, iters, grad, reg_covar}).
        backbone: the ``backbone`` config ({name, weights}).
        class_ids: the evaluated (novel) class ids, in the order of ``batch["class_idx"]``.
        optim: {lr, new_layer_lr_mult, momentum, weight_decay, schedule, poly_power}, every
            key (conf/train.yaml); None only for a model that is not trained.
        class_names: names indexed by class id (0 = background), for tables and figures.
        seed: seed of the training randomness (dropout).
        meta: free plain-typed run information stored in the checkpoint (fold, shot, ...).
        protocol: the evaluation protocol that scores val/test batches ("bam", "hsnet",
            "pfenet"; :func:`cgmgm.metrics.score`).
        base_learner_classes: stage 2 on a stage-1 checkpoint: the base learner's classes
            (base + background); its weights and the backbone's are then loaded with
            :meth:`load_base` (and come back with the rest from this module's checkpoints).
        shot: the episodes' shots (BAM's K-shot reweighting of the ensemble is built for it).
        loss: {final, meta}: the weights of CE(final) and CE(meta) (conf/train.yaml); None
            only for a model that is not trained.
    """

    def __init__(
        self,
        model: dict,
        backbone: dict,
        class_ids: list[int],
        optim: dict | None = None,
        class_names: list[str] | None = None,
        seed: int = 0,
        meta: dict | None = None,
        protocol: str = "bam",
        base_learner_classes: int | None = None,
        shot: int = 1,
        loss: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("model", model), ("backbone", backbone), ("optim", optim)):
            _check_plain(value, name)
        _check_plain(list(class_ids), "class_ids")
        _check_plain(class_names, "class_names")
        _check_plain(meta, "meta")
        _check_plain(loss, "loss")
        self.protocol = get_protocol(protocol)
        self.save_hyperparameters()
        self.model = build_model(model, backbone, base_learner_classes, shot)
        self.class_ids = [int(c) for c in class_ids]
        self.class_names = class_names
        n = len(self.class_ids)
        # per stage: the final prediction, the meta learner's (with an ensemble), the primary
        # guidance map (GmIoU) and each computed map (GmIoU/<map>)
        maps = ["cosine"] + (["initial_mask"] if self.model.imgr.img else [])
        maps += ["posterior"] if "posterior" in self.model.guidance else []
        self.map_names = maps
        self.scores = torch.nn.ModuleDict()
        for stage in ("val", "test"):
            names = ["iou", "gm"] + (["meta"] if self.model.has_ensemble else [])
            names += [f"gm_{m}" for m in maps]
            self.scores[stage] = torch.nn.ModuleDict({k: FSSIoU(n) for k in names})
        # frozen-feature cache (use_feature_cache); not state: checkpoints never hold it
        self._cache_spec: tuple[int, str | None] | None = None
        self.feature_cache: FeatureCache | None = None

    def load_base(self, base: Any) -> None:
        """Take the backbone and the base learner from a stage-1 checkpoint
        (:class:`cgmgm.base_ckpt.BaseCheckpoint`); both stay frozen."""
        if self.model.base_learner is None:
            raise RuntimeError("build the module with base_learner_classes to load a base")
        load_body_state(self.model.backbone.body, base.body, base.path)
        self.model.base_learner.load_state_dict(base.head)

    @property
    def training_free(self) -> bool:
        return bool(self.model.training_free)

    # ------------------------------------------------------------------ frozen features

    def use_feature_cache(self, max_bytes: int, directory: str | None = None) -> None:
        """Serve the frozen backbone's outputs from a :class:`~cgmgm.features.FeatureCache`
        for batches carrying ``image_keys`` (episodes whose images are cacheable); results are
        identical with and without it. ``max_bytes`` 0 with no ``directory``: no cache."""
        self._cache_spec = (int(max_bytes), directory) if max_bytes or directory else None
        self.feature_cache = None

    def bind_feature_cache(self) -> None:
        """(Re)bind the cache to the backbone's current weights (after any checkpoint load);
        run at the start of fit, validation and test."""
        spec = self._cache_spec
        if spec is None:
            return
        fingerprint = backbone_fingerprint(self.model.backbone)
        if self.feature_cache is None or self.feature_cache.backbone_id != fingerprint:
            self.feature_cache = FeatureCache(fingerprint, *spec)

    def feature_cache_stats(self) -> dict[str, int]:
        """Images served from memory (``hits``), from disk and computed (``misses``)."""
        return {} if self.feature_cache is None else self.feature_cache.stats()

    def on_fit_start(self) -> None:
        self.bind_feature_cache()

    def on_validation_start(self) -> None:
        self.bind_feature_cache()

    def on_test_start(self) -> None:
        self.bind_feature_cache()

    def forward(
        self, batch: Mapping[str, Any], base_exclude: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Episode batch -> CGMGM outputs (``logits`` [B, 2, H, W], maps [B, 1, h, w]);
        ``base_exclude`` as :meth:`CGMGM.forward`."""
        cache, keys = self.feature_cache, batch.get("image_keys")
        if cache is None or keys is None:
            return self.model(
                batch["query_img"],
                batch["support_imgs"],
                batch["support_masks"],
                batch.get("query_valid"),
                base_exclude,
            )
        query_img = batch["query_img"]  # [B, 3, H, W]
        query, support = cache.episode_features(
            self.model.backbone, query_img, batch["support_imgs"], keys
        )
        return self.model.from_features(
            query,  # ([B, Cm, h, w], [B, Ch, h, w])
            support,  # ([B*K, Cm, h, w], [B*K, Ch, h, w])
            batch["support_masks"],
            batch.get("query_valid"),
            tuple(query_img.shape[-2:]),
            base_exclude,
        )

    @staticmethod
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of logits [B, 2, H, W] against target [B, H, W] (255 ignored)."""
        return F.cross_entropy(resize(logits, target.shape[-2:]), target, ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------------ training

    def _check_backbone_frozen(self) -> None:
        bb = self.model.backbone
        if bb.training or any(p.requires_grad for p in bb.parameters()):
            raise RuntimeError("the backbone must stay frozen and in eval mode")

    def on_train_start(self) -> None:
        if self.training_free:
            raise RuntimeError(
                "the training-free model has no parameters to train; evaluate it with "
                "`python -m cgmgm.eval model=training_free`"
            )

    def on_train_epoch_start(self) -> None:
        self._check_backbone_frozen()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws depend on (seed, epoch, batch, rank) only: resumes are exact.
        seq = np.random.SeedSequence(
            [int(self.hparams.seed), self.current_epoch, batch_idx, self.global_rank]
        )
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> 1))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        target = batch["query_mask"]  # [B, H, W]
        if not self.model.has_ensemble:
            loss = self.loss(self(batch)["logits"], target)
            self.log("train/loss", loss, prog_bar=True, batch_size=target.shape[0])
            return loss
        w = _require(self.hparams.loss or {}, LOSS_KEYS, "loss", "conf/train.yaml")
        # BAM: a training episode's class is a base class; its base label (its position in
        # the training classes + 1, the base learner's order) leaves the base background
        out = self(batch, base_exclude=batch["class_idx"].long() + 1)
        final = self.loss(out["logits"], target)
        meta = self.loss(out["meta_logits"], target)
        loss = w["final"] * final + w["meta"] * meta
        b = target.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict({"train/loss_final": final, "train/loss_meta": meta}, batch_size=b)
        return loss

    def configure_optimizers(self) -> Any:
        """BAM's SGD with a per-iteration decay (poly, or the paper's cosine); None for the
        training-free model."""
        if self.training_free:
            return None
        o = _require(self.hparams.optim or {}, OPTIM_KEYS, "optim", "conf/train.yaml")
        backbone = {id(p) for p in self.model.backbone.parameters()}
        trainable = self.model.trainable_parameters()
        new = [p for p in trainable if id(p) not in backbone]
        old = [p for p in trainable if id(p) in backbone]  # empty while the backbone is frozen
        groups = [{"params": new, "lr": o["lr"] * o["new_layer_lr_mult"]}]
        if old:
            groups.append({"params": old, "lr": o["lr"]})
        return sgd_with_decay(self.trainer, groups, o)

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        scores = self.scores[stage]
        out = self(batch)
        score(scores["iou"], out["logits"], batch, self.protocol)
        score(scores["gm"], out["guidance"], batch, self.protocol)  # GmIoU
        if "meta" in scores:
            score(scores["meta"], out["meta_logits"], batch, self.protocol)
        for m in self.map_names:
            score(scores[f"gm_{m}"], out[GUIDANCES[m]], batch, self.protocol)
        target = batch["query_mask"]  # [B, H, W]
        logits = resize(out["logits"], target.shape[-2:])  # [B, 2, H, W]
        if stage == "val" and not self.training_free:  # monitored in training; a test has none
            self.log("val/loss", self.loss(logits, target), batch_size=target.shape[0])
        maps = {k: out[k].detach() for k in MAP_KEYS if k in out}
        return {"pred": decide(logits), **maps}  # pred [B, H, W], maps [B, 1, h, w]

    def _log_epoch(self, stage: str) -> None:
        scores = self.scores[stage]
        # metrics are already reduced over processes by torchmetrics
        results = episode_results(scores["iou"], scores["gm"], f"{stage}/", self.class_ids)
        if "meta" in scores:
            results.update(
                flatten_results(scores["meta"].compute(), f"{stage}/meta/", self.class_ids)
            )
        for m in self.map_names:
            results[f"{stage}/GmIoU/{m}"] = float(scores[f"gm_{m}"].compute()["mIoU"])
        self.log_dict(results)
        self._log_class_table(stage)
        for metric in scores.values():
            metric.reset()

    def _log_class_table(self, stage: str) -> None:
        """Per-class IoU (percent; None for a class without episodes) as a table
        ``{stage}/per_class_IoU`` to the loggers with a ``log_table`` (W&B): class id, class
        name, IoU of the final output, the meta learner's (with an ensemble) and episodes.
        Not during the sanity check (whose scores Lightning does not log either)."""
        trainer = self._trainer
        if trainer is None or trainer.sanity_checking:
            return
        if not any(callable(getattr(lg, "log_table", None)) for lg in trainer.loggers):
            return
        scores = self.scores[stage]
        iou = scores["iou"]
        with iou.sync_context():  # every process's episodes (a no-op in one process)
            episodes = iou.episodes.detach().cpu().tolist()  # [C]
        per_class = {"IoU": iou.compute()["per_class"].tolist()}  # [C], NaN: no episode
        if "meta" in scores:
            per_class["meta_IoU"] = scores["meta"].compute()["per_class"].tolist()
        names = self.class_names or []
        rows = []
        for i, cid in enumerate(self.class_ids):
            values = [v[i] if v[i] == v[i] else None for v in per_class.values()]
            name = names[cid] if cid < len(names) else ""
            rows.append([cid, name, *values, int(episodes[i])])
        columns = ["class_id", "class_name", *per_class, "episodes"]
        log_class_table(trainer.loggers, f"{stage}/per_class_IoU", columns, rows, self.global_step)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


def class_names_of(datamodule: Any) -> list[str] | None:
    """Class names of a datamodule's evaluation source (index = class id), if it has them."""
    try:
        names = getattr(datamodule.source(datamodule.eval_split), "class_names", None)
    except Exception:  # noqa: BLE001 - names are cosmetic
        return None
    return [str(n) for n in names] if names is not None else None
