"""End-to-end runs of the Hydra apps on tiny episodes of the embedded benchmark: fast_dev_run,
checkpoints (weights_only), exact resume, eval from a checkpoint and training-free, a two-job
multirun with W&B offline, and the sweep table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from experiments import sweep_table
from hydra import compose, initialize_config_dir

from _model_helpers import TINY_DATA
from cgmgm.config import config_dir
from cgmgm.eval import evaluate
from cgmgm.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_DATA,
    "dataset.test_episodes=8",
    "model.proj_dim=32",
    "model.gmm.iters=3",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]
NOVEL_FOLD0 = [1, 2, 3, 4, 5]


# the meta learner alone: no stage 1 (test_stages.py runs both stages)
NO_STAGE1 = ["base_ckpt=null"]


def _cfg(name: str, out: Path, *overrides: str):
    stage = NO_STAGE1 if name == "train" else []  # eval takes the model from its checkpoint
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=[*TINY, *stage, f"paths.output_dir={out}", *overrides])


def _assert_percent_metrics(metrics: dict, prefix: str = "test/", mean: bool = True) -> None:
    for key in ("mIoU", "FB-IoU", "GmIoU", "fg-IoU", "bg-IoU"):
        assert 0.0 <= metrics[f"{prefix}{key}"] <= 100.0, key
    # per-class IoU of the novel classes that had episodes; one run's mIoU is their mean
    per_class = [metrics[k] for c in NOVEL_FOLD0 if (k := f"{prefix}IoU/class_{c}") in metrics]
    assert per_class and all(0.0 <= v <= 100.0 for v in per_class)
    if mean:
        assert metrics[f"{prefix}mIoU"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-3)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_fast_dev_run(tmp_path):
    metrics = train(_cfg("train", tmp_path, "+trainer.fast_dev_run=true"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
    assert (saved["fold"], saved["shot"], saved["seed"]) == (0, 1, 0)
    assert saved["guidance"] == ["posterior"]
    assert "test/GmIoU" in saved and "test/FB-IoU" in saved
    # every map computed has its GmIoU; the primary one (the posterior) is GmIoU itself
    for m in ("cosine", "initial_mask", "posterior"):
        assert 0.0 <= saved[f"test/GmIoU/{m}"] <= 100.0, m
    assert saved["test/GmIoU/posterior"] == pytest.approx(saved["test/GmIoU"])
    assert not any(k.startswith("test/meta/") for k in saved)  # no ensemble without stage 1


def test_training_free_cannot_train(tmp_path):
    with pytest.raises(ValueError, match="cgmgm.eval model=training_free"):
        train(_cfg("train", tmp_path, "model=training_free"))


def test_train_resume_and_eval(tmp_path, capsys):
    # Uninterrupted: 2 epochs.
    straight = tmp_path / "straight"
    metrics = train(_cfg("train", straight))
    _assert_percent_metrics(metrics)
    saved = json.loads((straight / "metrics.json").read_text())
    assert saved["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
    table = capsys.readouterr().out
    for word in ("class   1", "mIoU", "FB-IoU", "GmIoU"):
        assert word in table
    ckpts = straight / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and list(ckpts.glob("best-*.ckpt"))
    assert (straight / "csv" / "metrics.csv").is_file()
    figures = {p.name for p in (straight / "figures").glob("*.png")}
    assert {"val_epoch000.png", "val_epoch001.png", "test_seed510.png"} <= figures  # BAM's
    assert saved["protocol"]["name"] == "bam" and saved["test_episodes"] == 8

    # Checkpoints hold plain types only.
    ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert type(hp["model"]) is dict and hp["meta"]["fold"] == 0 and hp["class_ids"] == NOVEL_FOLD0

    # Interrupted after epoch 1 (the same 2-epoch schedule), then resumed in place.
    resumed = tmp_path / "resumed"
    stop = [
        "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
        "+callbacks.stop.monitor=val/mIoU",
        "+callbacks.stop.mode=max",
        "+callbacks.stop.stopping_threshold=-1.0",
    ]
    train(_cfg("train", resumed, *stop))
    first = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0
    again = train(_cfg("train", resumed, f"ckpt_path={resumed / 'checkpoints' / 'last.ckpt'}"))
    a, b = _state(ckpts / "last.ckpt"), _state(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    for key in ("test/mIoU", "test/FB-IoU", "test/GmIoU"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key

    # Eval from the checkpoint, two seeds; fold and shot come from the checkpoint.
    out = tmp_path / "eval"
    ev = evaluate(_cfg("eval", out, f"ckpt_path={ckpts / 'last.ckpt'}", "eval.seeds=[321,7]"))
    assert ev["fold"] == 0 and ev["shot"] == 1 and ev["seeds"] == [321, 7]
    for key in ("test/mIoU", "test/FB-IoU", "test/GmIoU"):
        assert f"{key}_std" in ev and f"seed321/{key}" in ev and f"seed7/{key}" in ev
        mean = (ev[f"seed321/{key}"] + ev[f"seed7/{key}"]) / 2
        assert ev[key] == pytest.approx(mean)
    _assert_percent_metrics(ev, "seed7/test/")
    assert json.loads((out / "metrics.json").read_text())["test/mIoU"] == pytest.approx(
        ev["test/mIoU"]
    )
    assert {"test_seed321.png", "test_seed7.png"} <= {p.name for p in (out / "figures").iterdir()}
    assert ev["protocol"]["name"] == "bam"  # eval's protocol: null -> the checkpoint's

    # Another protocol than the training run's warns; a checkpoint written before protocols
    # were configurable (hparam original_resize) still loads.
    old = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    old["hyper_parameters"]["original_resize"] = "pad"
    del old["hyper_parameters"]["protocol"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="under protocol 'hsnet' a checkpoint trained under"):
        ev = evaluate(
            _cfg("eval", tmp_path / "hs", f"ckpt_path={tmp_path / 'old.ckpt'}", "protocol=hsnet")
        )
    assert ev["seeds"] == [0] and ev["protocol"]["name"] == "hsnet"
    with pytest.raises(ValueError, match="eval.seeds=\\[S\\] instead of test_seed"):
        evaluate(_cfg("eval", tmp_path / "x", f"ckpt_path={ckpts / 'last.ckpt'}", "test_seed=4"))

    # A checkpoint of the model before BAM's meta learner (model.guidance a string, another
    # decoder's weights) is refused with the fix, not loaded half-way.
    older = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    older["hyper_parameters"]["model"]["guidance"] = "gmm"
    torch.save(older, tmp_path / "older.ckpt")
    with pytest.raises(ValueError, match="predates BAM's meta learner.*python -m cgmgm.train"):
        evaluate(_cfg("eval", tmp_path / "y", f"ckpt_path={tmp_path / 'older.ckpt'}"))


def test_eval_training_free_without_checkpoint(tmp_path):
    ev = evaluate(_cfg("eval", tmp_path, "model=training_free", "eval.seeds=[0,1]"))
    assert ev["training_free"] and ev["fold"] == 0 and ev["ckpt_path"] is None
    _assert_percent_metrics(ev, mean=False)
    _assert_percent_metrics(ev, "seed1/test/")
    assert ev["test/mIoU_std"] >= 0.0
    # training-free predictions are the binarised posterior: GmIoU equals mIoU
    assert ev["test/GmIoU"] == pytest.approx(ev["test/mIoU"], abs=1e-6)


def test_eval_needs_a_checkpoint_for_the_trained_model(tmp_path):
    with pytest.raises(ValueError, match="ckpt_path"):
        evaluate(_cfg("eval", tmp_path))


def test_multirun_with_wandb_offline_and_sweep_table(tmp_path):
    """Two jobs, W&B with no key and no WANDB_MODE: offline, no prompt, one run per job."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"))
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if "max_epochs" not in o] + ["trainer.max_epochs=1", *NO_STAGE1]
    proc = subprocess.run(
        [sys.executable, "-m", "cgmgm.train", "-m", "model.gmm.components=1,2",
         "logger=wandb", f"hydra.sweep.dir={sweep}", *overrides],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = []
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["components"] == int(job) + 1
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()
        runs += list((sweep / job / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # each job finished its own run

    out = tmp_path / "table"
    sweep_table.main([str(sweep), "--out", str(out)])
    table = (out / "sweep_table.md").read_text().splitlines()
    assert "model.gmm.components" in table[0] and "test/mIoU" in table[0]
    assert len(table) == 4
    assert (out / "fig6.png").stat().st_size > 0
