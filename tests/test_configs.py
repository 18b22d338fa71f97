"""Hydra configs: every group option composes and resolves, in a source checkout and after a
non-editable wheel install run from another working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cgmgm.config import config_dir, instantiate_callbacks, instantiate_loggers
from cgmgm.data import DatasetError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("dataset", "backbone", "model", "trainer", "logger", "callbacks", "experiment")


def _compose(name: str, overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=[*overrides, f"paths.output_dir={tmp_path}"])


def test_config_dir_is_the_repository_conf():
    assert config_dir() == CONF.resolve()


def test_defaults_have_the_documented_keys(tmp_path):
    cfg = _compose("train", [], tmp_path)
    assert (cfg.fold, cfg.shot, cfg.seed) == (0, 1, 0)
    assert cfg.backbone.name == "efficientnet_lite0"
    assert cfg.model.guidance == "gmm" and not cfg.model.training_free
    for key in ("img", "imr", "threshold", "gmm.components", "gmm.covariance", "gmm.iters"):
        assert OmegaConf.select(cfg.model, key) is not None, key
    assert (cfg.optim.new_layer_lr_mult, cfg.optim.momentum) == (10, 0.9)
    assert cfg.optim.weight_decay == pytest.approx(1e-4) and cfg.optim.schedule == "poly"
    assert cfg.optim.lr == pytest.approx(0.02)  # the embedded benchmark's budget (BAM: 0.005)
    assert list(cfg.logger) == ["csv"]
    cfg = _compose("train", ["fold=2", "shot=5", "seed=7"], tmp_path)
    assert (cfg.dataset.fold, cfg.dataset.shot, cfg.dataset.seed) == (2, 5, 7)


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group, config_name, tmp_path):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options, f"conf/{group} is empty"
    for option in options:
        overrides = [f"{group}={option}"]
        if config_name == "eval":
            overrides += ["fold=0", "shot=1", "protocol=bam"]  # eval fills these in first
        cfg = _compose(config_name, overrides, tmp_path)
        plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert plain["paths"]["output_dir"] == str(tmp_path)
        if group == "dataset":
            dm = instantiate(cfg.dataset)
            assert (dm.fold, dm.shot) == (0, 1) and dm.protocol.name == "bam"
            if cfg.dataset.get("root", "embedded") is None:  # a real dataset: say what to set
                with pytest.raises(DatasetError, match=r"needs a dataset root \(dataset\.root="):
                    dm.classes  # noqa: B018 - the source is built on first use
            else:
                assert len(dm.classes) > 0
        elif group == "logger":
            assert len(instantiate_loggers(cfg.logger)) == (0 if option == "none" else 1)
        elif group == "callbacks":
            assert instantiate_callbacks(cfg.callbacks)
        elif group == "trainer":
            assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_experiment_fig6_is_a_sweep(tmp_path):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=fig6_sweep"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params["model.gmm.components"] == "1,2,3,4,5"
    assert cfg.hydra.sweeper.params["model.gmm.covariance"] == "diag,full"


def test_wheel_install_composes_from_any_directory(tmp_path):
    """Build the wheel, install it (no deps) into a target dir, compose from another cwd."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("cgmgm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cgmgm/conf/train.yaml" in names and "cgmgm/conf/model/cgmgm.yaml" in names

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import cgmgm.config as c; print(c.config_dir())"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == (target / "cgmgm" / "conf").resolve()
    job = subprocess.run(
        [sys.executable, "-m", "cgmgm.train", "--cfg", "job", "--resolve", "fold=2", "shot=5",
         "paths.output_dir=out"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    assert (cfg.fold, cfg.shot, cfg.dataset.fold, cfg.dataset.shot) == (2, 5, 2, 5)
    assert cfg.model.gmm.covariance == "diag"
