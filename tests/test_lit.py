"""LightningModule, logger and reporting helpers (no Trainer runs)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

from cgmgm.config import format_table, to_plain, write_metrics
from cgmgm.eval import aggregate
from cgmgm.lit import LitCGMGM
from cgmgm.loggers import finish_loggers, wandb_logger, wandb_mode

MODEL = {"guidance": "gmm", "proj_dim": 16, "gmm": {"components": 2, "iters": 2}}
BACKBONE = {"name": "efficientnet_lite0", "weights": None}


class _Trainer:
    estimated_stepping_batches = 10


def _module(**kw) -> LitCGMGM:
    return LitCGMGM(**{"model": MODEL, "backbone": BACKBONE, "class_ids": [1, 2, 3, 4, 5], **kw})


def test_hyperparameters_must_be_plain():
    with pytest.raises(TypeError, match="model must be a plain dict"):
        _module(model=OmegaConf.create(MODEL))
    module = _module(model=to_plain(OmegaConf.create(MODEL)))
    assert type(module.hparams.model) is dict


def test_optimiser_is_bams_sgd_with_poly_decay():
    module = _module(optim={"lr": 0.005, "new_layer_lr_mult": 10})
    module.trainer = _Trainer()
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    (group,) = opt.param_groups  # every trainable parameter is a new layer
    assert group["lr"] == pytest.approx(0.05)
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    params = {id(p) for p in group["params"]}
    assert params == {id(p) for p in module.model.trainable_parameters()}
    assert not any(id(p) in params for p in module.model.backbone.parameters())
    for _ in range(5):
        opt.step()
        sched["scheduler"].step()
    assert group["lr"] == pytest.approx(0.05 * (1 - 5 / 10) ** 0.9)


def test_cosine_schedule_switch():
    module = _module(optim={"schedule": "cosine"})
    module.trainer = _Trainer()
    conf = module.configure_optimizers()
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)


def test_backbone_frozen_in_eval_and_training_free_has_no_optimiser():
    module = _module()
    module.train()
    assert not module.model.backbone.training
    module.on_train_epoch_start()  # the check passes
    free = _module(model={"training_free": True})
    assert free.configure_optimizers() is None
    assert not list(free.model.trainable_parameters())
    with pytest.raises(RuntimeError, match="training-free"):
        free.on_train_start()


def test_eval_step_scores_at_original_size_when_given():
    module = _module().eval()
    b, s = 2, 32
    batch = {
        "query_img": torch.rand(b, 3, s, s),
        "query_mask": torch.zeros(b, s, s, dtype=torch.long),
        "support_imgs": torch.rand(b, 1, 3, s, s),
        "support_masks": torch.ones(b, 1, s, s, dtype=torch.long),
        "class_idx": torch.tensor([0, 1]),
        "query_mask_orig": torch.full((b, 40, 40), 255, dtype=torch.long),
        "query_orig_size": torch.tensor([[30, 40], [40, 20]]),
    }
    batch["query_mask_orig"][0, :30, :40] = 1
    batch["query_mask_orig"][1, :40, :20] = 0
    with torch.no_grad():
        out = module.test_step(batch, 0)
    assert out["pred"].shape == (b, s, s)
    assert module.test_iou.union.sum() > 0  # scored on the 40x40 canvas
    assert int(module.test_iou.episodes.sum()) == 2


def test_wandb_mode_never_prompts(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"
    with pytest.warns(UserWarning, match="offline instead"):
        assert wandb_mode("online") == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "online"
    with pytest.raises(ValueError):
        wandb_mode("sometimes")


def test_wandb_logger_offline_run_finishes(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = wandb_logger(save_dir=str(tmp_path), project="cgmgm-test")
    assert isinstance(logger, WandbLogger)
    logger.log_metrics({"test/mIoU": 1.0}, step=0)
    import wandb

    assert wandb.run is not None
    finish_loggers()
    assert wandb.run is None
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_format_table_and_metrics_json(tmp_path):
    metrics = {
        "test/IoU/class_1": 50.0,
        "test/IoU/class_2": 25.0,
        "test/mIoU": 37.5,
        "test/FB-IoU": 60.0,
        "test/GmIoU": 20.0,
        "test/mIoU_std": 1.5,
    }
    table = format_table(metrics, [1, 2], ["background", "disc", "square"], std_suffix="_std")
    assert "class   1 disc" in table and "37.50 ±  1.50" in table and "GmIoU" in table
    path = write_metrics(tmp_path / "m.json", {**metrics, "nan": float("nan")})
    assert '"nan": null' in path.read_text()


def test_aggregate_mean_std_and_per_seed():
    agg = aggregate({1: {"test/mIoU": 40.0}, 2: {"test/mIoU": 50.0}})
    assert agg["test/mIoU"] == 45.0
    assert agg["test/mIoU_std"] == pytest.approx(math.sqrt(50.0))
    assert agg["seed1/test/mIoU"] == 40.0 and agg["seed2/test/mIoU"] == 50.0
    assert aggregate({3: {"test/mIoU": 40.0}})["test/mIoU_std"] == 0.0
