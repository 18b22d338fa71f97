"""Runs that go wrong (issue 9): resume in place, shared or unwritable output dirs, bad
checkpoints, Ctrl+C, W&B without network, half-precision / huge GMM inputs, test sets that
leave classes undrawn. The Hydra apps run in this process (``main()`` with ``sys.argv``), on
tiny episodes of the embedded benchmark."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import hydra.core.utils
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

import cgmgm.train as train_app
from _model_helpers import TINY_DATA
from cgmgm.config import config_dir, format_table
from cgmgm.eval import evaluate
from cgmgm.loggers import wandb_logger
from cgmgm.models.gmm import fit_gmm, log_likelihood
from cgmgm.train import train

TINY = [
    *TINY_DATA,
    "dataset.test_episodes=2",  # < 5 novel classes: some are never drawn
    "model.proj_dim=32",
    "model.gmm.iters=3",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "callbacks.figures=null",
]
NO_LOGGING = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
# the meta learner alone: no stage 1 (test_stages.py runs both stages); train's key only
NO_STAGE1 = ["base_ckpt=null"]


def _main(app: str, *args: str) -> object:
    """``python -m cgmgm.<app> *args`` in this process: its exit code (SystemExit's)."""
    module = importlib.import_module(f"cgmgm.{app}")
    argv = sys.argv
    stage = NO_STAGE1 if app == "train" else []
    sys.argv = [f"cgmgm.{app}", *args, *stage, *NO_LOGGING]
    try:
        module.main()
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = argv
    return 0


def _cfg(name: str, out: Path, *overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(
            name, overrides=[*TINY, *(NO_STAGE1 if name == "train" else []),
                             f"paths.output_dir={out}", *overrides],
            return_hydra_config=hydra_cfg,
        )  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, str]:
    """One tiny training run through the Hydra app (1 epoch): its dir and its stdout."""
    out = tmp_path_factory.mktemp("run") / "train"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = _main("train", f"hydra.run.dir={out}", *TINY)
    assert code == 0 and (out / "checkpoints" / "last.ckpt").is_file()
    return out, stdout.getvalue()


# ---------------------------------------------------------------- 4: resume in place


def test_resume_in_place_keeps_earlier_logs_and_config(run_dir, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(run_dir[0], out)
    before = _snapshot(out)
    epochs = (out / "csv" / "metrics.csv").read_text()
    assert "val/mIoU" in epochs
    code = _main(
        "train", f"hydra.run.dir={out}", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        *TINY, "trainer.max_epochs=2",
    )  # fmt: skip
    assert code == 0
    after = _snapshot(out)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "csv/metrics.csv"):
        assert after[name] == before[name], name  # the first run's record, untouched
    assert "ckpt_path=" in after[".hydra-resume-1/overrides.yaml"].decode()
    resumed = (out / "csv" / "resume-1" / "metrics.csv").read_text()
    assert "val/mIoU" in resumed and "test/mIoU" in resumed
    kept = json.loads(after["metrics.earlier-1.json"])
    assert kept["test/mIoU"] == json.loads(before["metrics.json"])["test/mIoU"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- 5: one dir per run


def test_default_output_dirs_differ_for_runs_started_together(monkeypatch):
    class Frozen(datetime.datetime):  # two processes reading the clock at the same instant
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 1, 12, 0, 0, 123456)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    dirs = []
    for pid in (4242, 4243):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        for app in ("train", "eval"):
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(app, return_hydra_config=True)
            dirs += [str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)]
    assert len(set(dirs)) == len(dirs), dirs


def test_existing_output_dir_is_refused(run_dir, tmp_path):
    out = run_dir[0]
    before = _snapshot(out)
    code = _main("train", f"hydra.run.dir={out}", *TINY)  # not a resume: refused
    assert isinstance(code, str) and "\n" not in code
    assert str(out) in code and "already holds another run's files" in code
    assert f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}" in code  # how to resume instead
    code = _main("eval", f"hydra.run.dir={out}", f"ckpt_path={out / 'checkpoints/last.ckpt'}")
    assert isinstance(code, str) and "already holds another run's files" in code
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "metrics.json").write_text("{}")
    code = _main("eval", "-m", f"hydra.sweep.dir={sweep}", "model=training_free", "seed=0,1")
    assert isinstance(code, str) and str(sweep) in code and "hydra.sweep.dir" in code
    assert _snapshot(out) == before and (sweep / "0" / "metrics.json").read_text() == "{}"


def test_ddp_child_ranks_reuse_rank_zeros_dir(tmp_path, monkeypatch):
    # Lightning starts ranks >= 1 by re-running the app into rank 0's (already claimed,
    # non-empty) output dir, with LOCAL_RANK set: they must not be refused.
    from hydra import compose, initialize_config_dir

    from cgmgm.config import config_dir
    from cgmgm.loggers import OutputDirCheck

    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)
    (out / "train.log").write_text("rank 0 was here\n")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", [f"hydra.run.dir={out}"], return_hydra_config=True)
    check = OutputDirCheck()
    monkeypatch.setenv("LOCAL_RANK", "1")
    check.on_run_start(cfg)  # no SystemExit
    assert (out / "train.log").read_text() == "rank 0 was here\n"
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        check.on_run_start(cfg)


# ---------------------------------------------------------------- 12: unwritable dir


@pytest.mark.parametrize(
    ("app", "args"),
    [
        ("train", ["hydra.run.dir={bad}"]),
        ("eval", ["hydra.run.dir={bad}", "model=training_free"]),
        ("train", ["-m", "hydra.sweep.dir={bad}", "seed=0,1"]),
    ],
)
def test_unwritable_output_dir_is_one_clear_line(tmp_path, capsys, app, args):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a dir")
    bad = blocker / "out"
    code = _main(app, *(a.format(bad=bad) for a in args))
    assert isinstance(code, str) and "\n" not in code, code
    assert f"cannot write the output dir {bad}" in code and "=<dir>" in code
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------- 9: checkpoints


def test_unreadable_checkpoints_are_named(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    for path, why in ((junk, "not a cgmgm checkpoint"), (empty, "empty file"),
                      (other, "hyper_parameters.model")):  # fmt: skip
        for app, run in (("train", train), ("eval", evaluate)):
            with pytest.raises(ValueError) as err:
                run(_cfg(app, tmp_path / "out", f"ckpt_path={path}"))
            message = str(err.value)
            assert str(path) in message and why in message, message
            assert "weights_only=False" not in message
            assert err.value.__context__ is None or err.value.__suppress_context__  # no chain


def test_resume_with_another_backbone_or_model_says_which(run_dir, tmp_path):
    ckpt = run_dir[0] / "checkpoints" / "last.ckpt"
    expected = (
        "trained with backbone=efficientnet_lite0, this run has backbone=resnet50: resume it "
        "with backbone=efficientnet_lite0"
    )
    with pytest.raises(ValueError, match=expected):
        train(_cfg("train", tmp_path / "a", f"ckpt_path={ckpt}", "backbone=resnet50"))
    with pytest.raises(ValueError, match=r"does not fit .*model.proj_dim: 32 -> 16"):
        train(_cfg("train", tmp_path / "b", f"ckpt_path={ckpt}", "model.proj_dim=16"))


def test_eval_warns_that_backbone_override_is_ignored(run_dir, tmp_path):
    ckpt = run_dir[0] / "checkpoints" / "last.ckpt"
    cfg = _cfg(
        "eval", tmp_path, f"ckpt_path={ckpt}", "backbone=resnet50", "eval.seeds=[0]",
        hydra_cfg=True,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="ignoring backbone.name: efficientnet_lite0 -> resnet50"):
        ev = evaluate(cfg)
    assert ev["backbone"] == "efficientnet_lite0"


# ---------------------------------------------------------------- 10: Ctrl+C


class _CtrlC(L.Callback):
    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.current_epoch == 0 and trainer.global_step == 1:
            raise KeyboardInterrupt


def test_ctrl_c_in_first_epoch_saves_last_ckpt_to_resume(tmp_path, monkeypatch, capsys):
    instantiate = train_app.instantiate_callbacks
    monkeypatch.setattr(
        train_app, "instantiate_callbacks", lambda cfg: [*instantiate(cfg), _CtrlC()]
    )
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits with 1
            train(_cfg("train", tmp_path))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after the first
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"saved {last}" in capsys.readouterr().err
    assert torch.load(last, weights_only=True)["global_step"] == 1
    monkeypatch.setattr(train_app, "instantiate_callbacks", instantiate)
    metrics = train(_cfg("train", tmp_path, f"ckpt_path={last}"))
    assert 0.0 <= metrics["test/mIoU"] <= 100.0
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the epoch was completed


# ---------------------------------------------------------------- 11: W&B without network


def test_wandb_online_without_network_falls_back_to_offline(monkeypatch, tmp_path):
    def no_network(address, timeout=None, *args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)  # and no real connection
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.warns(UserWarning, match=r"cannot reach the W&B server.*WANDB_MODE=offline"):
        logger = wandb_logger(save_dir=str(tmp_path), project="cgmgm-test")
    assert logger._wandb_init["mode"] == "offline"


# ---------------------------------------------------------------- 13: GMM dtypes, overflow


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fit_gmm_half_precision_full_covariance(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 4, generator=g)
    w = (torch.rand(2, 64, generator=g) > 0.5).float()
    ref = fit_gmm(x, w, 2, "full", 3)
    gm = fit_gmm(x.to(dtype), w.to(dtype), 2, "full", 3)
    assert gm.means.dtype == gm.covariances.dtype == gm.precision_chol.dtype == dtype
    assert bool(gm.valid.all())
    torch.testing.assert_close(gm.means.float(), ref.means, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_log_likelihood_half_precision_is_finite(dtype):
    # D = 256 features of scale 30: the squared distances (~2e5) overflow fp16 (max 65504)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 128, 256, generator=g) * 30
    w = torch.stack([(torch.rand(2, 128, generator=g) > 0.5).float()] * 2, 1)
    w[:, 0] = 1 - w[:, 1]
    ref = log_likelihood(fit_gmm(x, w, 2, "diag", 3), x)  # [2, 2, 128], float32
    ll = log_likelihood(fit_gmm(x.to(dtype), w.to(dtype), 2, "diag", 3), x.to(dtype))
    assert ll.dtype == dtype and bool(torch.isfinite(ll).all())
    torch.testing.assert_close(ll.float(), ref, rtol=0.02, atol=2.0)


def test_fit_gmm_overflowing_input_is_an_error():
    x = torch.randn(2, 64, 4) * 1e20
    w = torch.ones(2, 64)
    for covariance in ("diag", "full"):
        with pytest.raises(ValueError, match=r"\|x\| reaches .* overflow .*rescale"):
            fit_gmm(x, w, 2, covariance, 3)
    assert bool(fit_gmm(x.double(), w.double(), 2, "diag", 3).valid.all())


# ---------------------------------------------------------------- 14: classes drawn


def test_classes_drawn_next_to_the_miou(run_dir, tmp_path, capsys):
    out, stdout = run_dir
    saved = json.loads((out / "metrics.json").read_text())
    drawn = sum(f"test/IoU/class_{c}" in saved for c in range(1, 6))
    assert saved["test/classes_drawn"] == drawn and 1 <= drawn <= 2
    assert saved["test/classes_total"] == 5
    assert f"over {drawn} of 5 classes drawn" in stdout

    ev = evaluate(_cfg("eval", tmp_path, "model=training_free", "eval.seeds=[0,1]"))
    table = capsys.readouterr().out
    per_seed = [ev[f"seed{s}/test/classes_drawn"] for s in (0, 1)]
    assert ev["test/classes_drawn"] == pytest.approx(sum(per_seed) / 2)
    assert ev["test/classes_total"] == 5
    assert f"over {ev['test/classes_drawn']:g} of 5 classes drawn per seed" in table
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/classes_drawn"] == pytest.approx(ev["test/classes_drawn"])

    table = format_table({"test/mIoU": 50.0, "test/IoU/class_1": 50.0,
                          "test/classes_drawn": 1, "test/classes_total": 2}, [1, 2])  # fmt: skip
    assert "over 1 of 2 classes drawn (-: no test episode)" in table


# ---------------------------------------------------------------- 6: a late failure in eval


def test_eval_keeps_the_finished_seeds_when_a_later_one_fails(tmp_path, monkeypatch):
    import lightning

    real_test = lightning.pytorch.Trainer.test
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk vanished")
        return real_test(self, *args, **kwargs)

    monkeypatch.setattr(lightning.pytorch.Trainer, "test", flaky)
    cfg = _cfg("eval", tmp_path, "model=training_free", "eval.seeds=[0,1,2]", "logger=none")
    with pytest.raises(OSError, match="disk vanished"):
        evaluate(cfg)
    partial = json.loads((tmp_path / "metrics.partial.json").read_text())
    assert partial["seeds_done"] == [0, 1] and partial["failed_seed"] == 2
    assert "disk vanished" in partial["error"] and 0 <= partial["test/mIoU"] <= 100
    assert "seed1/test/mIoU" in partial and not (tmp_path / "metrics.json").exists()
