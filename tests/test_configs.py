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
GROUPS = (
    "dataset",
    "backbone",
    "model",
    "ablation",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
)


def _compose(name: str, overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=[*overrides, f"paths.output_dir={tmp_path}"])


def test_config_dir_is_the_repository_conf():
    assert config_dir() == CONF.resolve()


def test_defaults_have_the_documented_keys(tmp_path):
    cfg = _compose("train", [], tmp_path)
    assert (cfg.fold, cfg.shot, cfg.seed) == (0, 1, 0)
    assert cfg.backbone.name == "efficientnet_lite0"
    assert list(cfg.model.guidance) == ["posterior"] and not cfg.model.training_free
    # the paper's system: stage 1 first (trained into stage1.root, relative to the cwd), then
    # stage 2 trained on BAM's two losses
    assert cfg.base_ckpt == "fit" and cfg.stage1.root == "outputs/stage1"
    assert list(cfg.stage1.overrides) == []
    assert (cfg.loss.final, cfg.loss.meta) == (1.0, 1.0)
    # the main job is the paper's full model: IMG, IMR, C&Q, M = 3, diag
    assert (cfg.model.img, cfg.model.imr, cfg.model.gmm.components) == (True, True, 3)
    assert (cfg.model.gmm.covariance, cfg.model.proj_dim, cfg.model.kshot) == ("diag", 256, "mean")
    for key in ("threshold", "gmm.iters", "gmm.grad", "gmm.reg_covar"):
        assert OmegaConf.select(cfg.model, key) is not None, key
    assert (cfg.optim.new_layer_lr_mult, cfg.optim.momentum) == (10, 0.9)
    assert cfg.optim.weight_decay == pytest.approx(1e-4) and cfg.optim.schedule == "poly"
    assert cfg.optim.lr == pytest.approx(0.02)  # the embedded benchmark's recipe (BAM: 0.005)
    assert cfg.trainer.max_epochs == 2
    assert list(cfg.logger) == ["csv"]
    cfg = _compose("train", ["fold=2", "shot=5", "seed=7"], tmp_path)
    assert (cfg.dataset.fold, cfg.dataset.shot, cfg.dataset.seed) == (2, 5, 7)


# eval takes the model from its checkpoint: it has no ablation group; the experiments are the
# paper's training sweeps (train only)
TRAIN_ONLY = ("ablation", "experiment")


@pytest.mark.parametrize(
    ("group", "config_name"),
    [(g, c) for c in ("train", "eval") for g in GROUPS if c == "train" or g not in TRAIN_ONLY],
)
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
        cfg = compose("train", overrides=["experiment=fig6"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params["model.gmm.components"] == "1,2,3,4,5"
    assert cfg.hydra.sweeper.params["model.gmm.covariance"] == "diag,full"
    assert cfg.hydra.sweeper.params["seed"] == "0,1,2"
    assert cfg.hydra.callbacks.paper_table.table == "fig6"
    assert (cfg.dataset.dataset, cfg.backbone.name, cfg.shot) == ("pascal", "resnet50_psp", 1)


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


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def _expected_model(option: str, recipe: dict) -> dict:
    """conf/model/<option>.yaml read by hand: its `defaults` parent first, then itself, with
    the recipe's components where the file defers to it."""
    own = _yaml(CONF / "model" / f"{option}.yaml")
    parents = [d for d in own.pop("defaults", []) if d != "_self_"]
    out: dict = {}
    for parent in parents:
        out = _expected_model(parent, recipe)
    gmm = {**out.get("gmm", {}), **own.pop("gmm", {})}
    out = {**out, **own, "gmm": gmm}
    if gmm.get("components") == "${recipe.components}":
        gmm["components"] = recipe["components"]
    return out


def test_dataset_configs_describe_data_and_recipe_only():
    recipe_keys = set(_yaml(CONF / "recipe" / "default.yaml"))
    for path in sorted((CONF / "dataset").glob("*.yaml")):
        raw = _yaml(path)
        assert set(raw) <= {"dataset", "recipe", "defaults"}, f"{path.name} sets {sorted(raw)}"
        for parent in raw.get("defaults", []):  # only another dataset config may be inherited
            assert parent == "_self_" or (CONF / "dataset" / f"{parent}.yaml").is_file(), parent
        assert set(raw.get("recipe", {})) <= recipe_keys, path.name


DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_resolved_model_is_what_was_asked(dataset, tmp_path):
    recipe = {
        **_yaml(CONF / "recipe" / "default.yaml"),
        **_yaml(CONF / "dataset" / f"{dataset}.yaml").get("recipe", {}),
    }
    for model in MODELS:
        cfg = _compose("train", [f"dataset={dataset}", f"model={model}"], tmp_path)
        got = OmegaConf.to_container(cfg.model, resolve=True)
        assert got == _expected_model(model, recipe), (dataset, model)
        assert cfg.trainer.max_epochs == recipe["epochs"]
        assert cfg.optim.lr == pytest.approx(recipe["lr"])
        # the user's keys always win over the dataset's recipe and the model's defaults
        user = [
            "model.img=false",
            "model.imr=false",
            "model.gmm.components=5",
            "model.proj_dim=64",
            "optim.lr=0.3",
            "trainer.max_epochs=7",
        ]
        cfg = _compose("train", [f"dataset={dataset}", f"model={model}", *user], tmp_path)
        assert (cfg.model.img, cfg.model.imr, cfg.model.gmm.components) == (False, False, 5)
        assert (cfg.model.proj_dim, cfg.optim.lr, cfg.trainer.max_epochs) == (64, 0.3, 7)


def test_paper_recipes_ride_with_their_datasets(tmp_path):
    coco = _compose("train", ["dataset=coco"], tmp_path)
    assert (coco.model.gmm.components, coco.trainer.max_epochs) == (6, 50)
    pascal = _compose("train", ["dataset=pascal"], tmp_path)
    assert (pascal.model.gmm.components, pascal.trainer.max_epochs) == (3, 200)
    assert pascal.optim.lr == pytest.approx(0.005)


def test_stage2_clips_gradients_and_the_user_can_turn_it_off():
    from cgmgm.config import compose

    assert compose("train", []).trainer.gradient_clip_val == 10.0
    assert compose("train", ["trainer=gpu"]).trainer.gradient_clip_val == 10.0
    assert compose("train", ["trainer.gradient_clip_val=null"]).trainer.gradient_clip_val is None
    assert compose("train_base", []).trainer.get("gradient_clip_val") is None  # BAM's stage 1


# The paper's rows (Table 5; Table 1's BAM and CGMGM): guidance maps, IMG, IMR.
ROWS = {
    "bam": (["cosine"], False, False),
    "cq": (["posterior"], False, False),
    "img_cq": (["posterior"], True, False),
    "img_imr": (["initial_mask"], True, True),
    "cgmgm": (["posterior"], True, True),
}


def test_every_paper_row_is_an_ablation_that_builds(tmp_path):
    from cgmgm.lit import model_kwargs
    from cgmgm.models.cgmgm import check_guidance

    assert sorted(p.stem for p in (CONF / "ablation").glob("*.yaml")) == sorted(ROWS)
    for row, (guidance, img, imr) in ROWS.items():
        cfg = _compose("train", [f"ablation={row}"], tmp_path)
        model = OmegaConf.to_container(cfg.model, resolve=True)
        assert (model["guidance"], model["img"], model["imr"]) == (guidance, img, imr), row
        kw = model_kwargs(model)
        assert check_guidance(kw["guidance"], kw["img"]) == tuple(guidance), row
    # the full model's row is the model's defaults
    default = OmegaConf.to_container(_compose("train", [], tmp_path).model, resolve=True)
    full = _compose("train", ["ablation=cgmgm"], tmp_path).model
    assert OmegaConf.to_container(full, resolve=True) == default
