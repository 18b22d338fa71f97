"""LightningModule, logger and reporting helpers (no Trainer runs)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

from cgmgm.config import compose, format_table, to_plain, write_metrics
from cgmgm.eval import aggregate
from cgmgm.lit import LitCGMGM
from cgmgm.loggers import finish_loggers, wandb_logger, wandb_mode

SMALL = ("model.proj_dim=16", "model.gmm.components=2", "model.gmm.iters=2")
BACKBONE = {"name": "efficientnet_lite0", "weights": None}


@functools.cache
def _config(*overrides: str) -> tuple[dict, dict]:
    """(model, optim) configs composed from conf/ (LitCGMGM reads every key, supplies none)."""
    cfg = compose("train", [*SMALL, *overrides])
    return to_plain(cfg.model), to_plain(cfg.optim)


MODEL = _config()[0]
OPTIM = _config()[1]


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
    module = _module(optim={**OPTIM, "lr": 0.005, "new_layer_lr_mult": 10})
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
    module = _module(optim={**OPTIM, "schedule": "cosine"})
    module.trainer = _Trainer()
    conf = module.configure_optimizers()
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)


def test_backbone_frozen_in_eval_and_training_free_has_no_optimiser():
    module = _module()
    module.train()
    assert not module.model.backbone.training
    module.on_train_epoch_start()  # the check passes
    free = _module(model=_config("model=training_free")[0])
    assert free.configure_optimizers() is None
    assert not list(free.model.trainable_parameters())
    with pytest.raises(RuntimeError, match="training-free"):
        free.on_train_start()


def test_loss_upsamples_logits_by_the_one_resize():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 5, 7, generator=g)
    target = torch.randint(0, 2, (2, 20, 28), generator=g)
    target[:, :3] = 255  # ignored
    up = F.interpolate(logits, size=(20, 28), mode="bilinear", align_corners=True)
    want = F.cross_entropy(up, target, ignore_index=255)
    assert torch.equal(LitCGMGM.loss(logits, target), want)


def _counts(maps, label, size, crop, align_corners=True):
    """(fg_i, fg_u, bg_i, bg_u) of maps upsampled to ``size`` (bilinear), cropped top-left to
    ``crop`` = (H, W) and scored against label [H, W] (255 ignored). maps: logits [2, h, w]
    (foreground = argmax 1) or a foreground probability [1, h, w] (foreground = p > 0.5)."""
    up = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=align_corners)
    up = up[0, :, : crop[0], : crop[1]]
    fg = up.argmax(0) == 1 if len(up) == 2 else up[0] > 0.5
    valid = label != 255
    t_fg, t_bg = label == 1, label == 0
    return (
        int((fg & t_fg).sum()),
        int(((fg | t_fg) & valid).sum()),
        int((~fg & t_bg).sum()),
        int(((~fg | t_bg) & valid).sum()),
    )


def test_eval_step_scores_at_original_size_when_given():
    """BAM/PFENet scoring: logits upsampled (bilinear, align_corners=True) to max(H, W)
    squared, the top-left H x W compared with the original label (255 ignored)."""
    g = torch.Generator().manual_seed(0)
    module = _module().eval()
    b, s, canvas = 2, 32, 44  # test size 32; original labels pasted on a 44 x 44 canvas
    sizes = [(30, 37), (41, 23)]  # one landscape, one portrait, both smaller than the canvas
    class_idx = torch.tensor([3, 1])
    orig = torch.full((b, canvas, canvas), 255, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        orig[i, :h, :w] = (torch.rand(h, w, generator=g) > 0.5).long()
        orig[i, :5, :5] = 255  # ignore pixels inside the image too
    # The label at test size as the pad resize makes it: nearest, longer side 32, 255 padding.
    query_mask = torch.full((b, s, s), 255, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        hh, ww = round(h * s / max(h, w)), round(w * s / max(h, w))
        small = F.interpolate(orig[i, None, None, :h, :w].float(), size=(hh, ww), mode="nearest")
        query_mask[i, :hh, :ww] = small[0, 0].long()
    batch = {
        "query_img": torch.rand(b, 3, s, s, generator=g),
        "query_mask": query_mask,
        "support_imgs": torch.rand(b, 1, 3, s, s, generator=g),
        "support_masks": torch.ones(b, 1, s, s, dtype=torch.long),
        "class_idx": class_idx,
        "query_mask_orig": orig,
        "query_orig_size": torch.tensor(sizes),
    }
    # The model's outputs are fixed here (this test is about scoring, not the model, whose
    # backbone alone takes seconds on a busy CPU): pixel-level logits and a coarse guidance
    # map, so that every geometry scores differently.
    logits = torch.randn(b, 2, s, s, generator=g)
    guidance = torch.rand(b, 1, 8, 8, generator=g)
    cosine, initial = torch.rand(b, 1, 8, 8, generator=g), torch.rand(b, 1, 8, 8, generator=g)
    assert module.model.guidance == ("posterior",) and module.map_names == [
        "cosine",
        "initial_mask",
        "posterior",
    ]

    def model(query_img, support_imgs, support_masks, query_valid=None, base_exclude=None):
        assert query_img is batch["query_img"] and support_imgs is batch["support_imgs"]
        assert base_exclude is None  # a test episode: every base class counts
        return {
            "logits": logits,
            "meta_logits": logits,
            "guidance": guidance,
            "posterior": guidance,
            "cosine_prior": cosine,
            "initial_mask": initial,
        }

    module.model.forward = model
    with torch.no_grad():
        out = module.test_step(batch, 0)
    assert torch.equal(out["pred"], logits.argmax(1))
    scores = module.scores["test"]
    assert sorted(scores) == ["gm", "gm_cosine", "gm_initial_mask", "gm_posterior", "iou"]
    assert scores["iou"].episodes.tolist() == [0, 1, 0, 1, 0]

    def states(count):
        """FSSIoU's states (intersection, union, fb_intersection, fb_union) from per-item
        counts ``count(i, h, w)`` -> (fg_i, fg_u, bg_i, bg_u)."""
        inter, union, fb_i, fb_u = [0] * 5, [0] * 5, [0, 0], [0, 0]
        for i, (h, w) in enumerate(sizes):
            fi, fu, bi, bu = count(i, h, w)
            inter[int(class_idx[i])] += fi
            union[int(class_idx[i])] += fu
            fb_i, fb_u = [fb_i[0] + bi, fb_i[1] + fi], [fb_u[0] + bu, fb_u[1] + fu]
        return inter, union, fb_i, fb_u

    def square(i, h, w):  # the protocol: max(H, W) squared, crop the top-left H x W
        return _counts(logits[i], orig[i, :h, :w], (max(h, w),) * 2, (h, w))

    want = states(square)
    iou = scores["iou"]
    got = (iou.intersection.tolist(), iou.union.tolist())
    assert got + (iou.fb_intersection.tolist(), iou.fb_union.tolist()) == want

    # The guidance (a probability) is scored the same way, binarised at 0.5.
    def gm_square(i, h, w):
        return _counts(guidance[i], orig[i, :h, :w], (max(h, w),) * 2, (h, w))

    gm = scores["gm"]
    assert (gm.intersection.tolist(), gm.union.tolist()) == states(gm_square)[:2]
    # every guidance map has its own GmIoU; the primary one (posterior) is GmIoU itself
    others = (("gm_posterior", guidance), ("gm_cosine", cosine), ("gm_initial_mask", initial))
    for name, m in others:

        def map_square(i, h, w, m=m):
            return _counts(m[i], orig[i, :h, :w], (max(h, w),) * 2, (h, w))

        got_map = scores[name]
        assert (got_map.intersection.tolist(), got_map.union.tolist()) == states(map_square)[:2], (
            name
        )
    assert not module.scores["val"]["iou"].episodes.any()  # a test step scores the test only

    # Wrong canvases give other counts, so the assertion above tells them apart.
    wrong = {
        "non-square (squash to H x W)": lambda i, h, w: _counts(
            logits[i], orig[i, :h, :w], (h, w), (h, w)
        ),
        "the whole canvas": lambda i, h, w: _counts(
            logits[i], orig[i, :h, :w], (canvas, canvas), (h, w)
        ),
        "align_corners=False": lambda i, h, w: _counts(
            logits[i], orig[i, :h, :w], (max(h, w),) * 2, (h, w), align_corners=False
        ),
        "the test size": lambda i, h, w: _counts(logits[i], query_mask[i], (s, s), (s, s)),
    }
    for name, count in wrong.items():
        assert states(count)[:2] != want[:2], name


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


def test_format_table_has_final_and_meta_columns_and_map_rows():
    metrics = {
        "test/IoU/class_1": 50.0,
        "test/meta/IoU/class_1": 40.0,
        "test/mIoU": 50.0,
        "test/meta/mIoU": 40.0,
        "test/FB-IoU": 60.0,
        "test/meta/FB-IoU": 55.0,
        "test/GmIoU": 20.0,
        "test/GmIoU/cosine": 11.0,
        "test/GmIoU/posterior": 20.0,
    }
    table = format_table(metrics, [1], None)
    lines = table.splitlines()
    assert "final IoU (%)" in lines[0] and "meta IoU (%)" in lines[0]
    width = len(lines[0]) - len(lines[0].lstrip())  # the names' column, then the values
    row = {ln[:width].strip(): ln[width:].split() for ln in lines[2:] if ln[:1] != "-"}
    assert row["class   1"] == ["50.00", "40.00"]
    assert row["mIoU"] == ["50.00", "40.00"] and row["FB-IoU"] == ["60.00", "55.00"]
    # a guidance map is the meta learner's input: one GmIoU, in the first column
    assert lines[-3].split() == ["GmIoU", "20.00"]
    assert lines[-2].split() == ["GmIoU/cosine", "11.00"]
    assert lines[-1].split() == ["GmIoU/posterior", "20.00"]
    assert "GmIoU/initial_mask" not in table  # absent from metrics: no row
    # without the meta learner's scores: one column, as before
    single = format_table({k: v for k, v in metrics.items() if "/meta/" not in k}, [1], None)
    assert "meta" not in single and "IoU (%)" in single.splitlines()[0]
