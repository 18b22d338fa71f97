"""BAM's two stages end to end on tiny data: ``cgmgm.train_base`` then ``cgmgm.train
base_ckpt=``, the exact handover of the fine-tuned backbone and base learner, the checks that
refuse another setting's checkpoint, and evaluation of a stage-2 checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _model_helpers import TINY_DATA
from cgmgm.config import compose
from cgmgm.eval import build_module
from cgmgm.lit_base import LitBase
from cgmgm.models.resize import resize
from cgmgm.train import train
from cgmgm.train_base import train_base

QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
STAGE1 = [
    "dataset.dataset_kwargs.image_size=32",
    "dataset.dataset_kwargs.num_images={train:24,val:12}",
    "base.batch_size=4",
    "trainer.max_epochs=2",
    *QUIET,
]
STAGE2 = [
    *TINY_DATA,
    "dataset.test_episodes=8",
    "model.proj_dim=32",
    "model.gmm.iters=3",
    "trainer.max_epochs=1",
    *QUIET,
]


def _cfg(name: str, out: Path, *overrides: str):
    return compose(name, [f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("stage1")
    metrics = train_base(_cfg("train_base", out, *STAGE1))
    return {"out": out, "metrics": metrics}


def test_stage1_writes_base_metrics_and_best_checkpoint(stage1):
    saved = json.loads((stage1["out"] / "metrics.json").read_text())
    base = list(range(6, 21))  # fold 0 of the embedded benchmark: classes 1-5 are novel
    assert saved["base_class_ids"] == base
    per_class = [saved[k] for c in base if (k := f"val/IoU/class_{c}") in saved]
    assert per_class and all(0 <= v <= 100 for v in per_class)
    assert saved["val/mIoU"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-3)
    assert saved["val/classes_present"] == len(per_class)
    assert Path(saved["base_ckpt"]).is_file() and Path(saved["base_ckpt"]).name == "best.ckpt"
    assert saved["stage"] == 1 and saved["fold"] == 0 and saved["train_images"] == 24
    assert "bam_reported_base_mIoU" not in saved  # only beside PASCAL / COCO runs
    ckpt = torch.load(saved["base_ckpt"], map_location="cpu", weights_only=True)
    assert any(k.startswith("net.head.ppm.") for k in ckpt["state_dict"])
    # the reported scores are the best checkpoint's: validate it again and compare
    import lightning as L
    from hydra.utils import instantiate

    from cgmgm.data.base import BaseDataModule

    cfg = _cfg("train_base", stage1["out"] / "again", *STAGE1)
    data = BaseDataModule(instantiate(cfg.dataset, cache=False), **cfg.base)
    module = LitBase.load_from_checkpoint(saved["base_ckpt"], map_location="cpu", weights_only=True)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    again = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert again.keys() == {k for k in saved if k.startswith("val/")}
    assert all(again[k] == pytest.approx(saved[k], abs=1e-4) for k in again)
    assert saved["best_epoch"] in (0, 1)


def test_stage2_takes_backbone_and_base_learner_exactly(stage1, tmp_path):
    base_ckpt = stage1["metrics"]["base_ckpt"]
    metrics = train(_cfg("train", tmp_path, *STAGE2, f"base_ckpt={base_ckpt}"))
    assert metrics["stage1"]["base_ckpt"] == base_ckpt
    assert metrics["stage1"]["base_ckpt_kind"] == "cgmgm"
    # with a base learner: BAM's ensemble, its output scored beside the meta learner's
    for key in ("test/mIoU", "test/meta/mIoU", "test/meta/FB-IoU", "test/GmIoU"):
        assert 0.0 <= metrics[key] <= 100.0, key
    one = torch.load(base_ckpt, map_location="cpu", weights_only=True)
    two_path = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    two = torch.load(two_path, map_location="cpu", weights_only=True)
    s1, s2 = one["state_dict"], two["state_dict"]
    body = [k for k in s1 if k.startswith("net.body.")]
    assert body and all(torch.equal(s1[k], s2["model.backbone.body." + k[9:]]) for k in body)
    head = [k for k in s1 if k.startswith("net.head.")]
    assert all(torch.equal(s1[k], s2["model.base_learner." + k[9:]]) for k in head)

    # the stage-2 checkpoint evaluates (its base learner comes back from its own weights)
    # and reproduces stage 1's network in eval mode
    cfg = _cfg("eval", tmp_path / "eval", *TINY_DATA, "protocol=bam", f"ckpt_path='{two_path}'")
    module = build_module(cfg, [1, 2, 3, 4, 5], None, two)
    five = _cfg("eval", tmp_path / "e5", *TINY_DATA, "shot=5", f"ckpt_path='{two_path}'")
    with pytest.raises(ValueError, match="1-shot episodes with BAM's ensemble.*shot=1, not shot=5"):
        build_module(five, [1, 2, 3, 4, 5], None, two)  # its K-shot reweighting is for 1 shot
    net = LitBase.load_from_checkpoint(
        base_ckpt,
        map_location="cpu",
        weights_only=True,
        backbone={"name": "efficientnet_lite0", "weights": None},
    ).net.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = net(images)
        _, high = module.model.backbone(images)
        got = module.model.base_logits(high)
    torch.testing.assert_close(resize(got, (32, 32)), expected, atol=1e-5, rtol=1e-5)
    assert not module.model.base_learner.training
    module.train()
    assert not module.model.base_learner.training and not module.model.backbone.training
    assert not any(p.requires_grad for p in module.model.base_learner.parameters())


def test_without_stage1_says_so(tmp_path):
    cfg = _cfg("train", tmp_path, *STAGE2, "base_ckpt=null", "+trainer.fast_dev_run=true")
    metrics = train(cfg)
    assert metrics["stage1"]["base_ckpt"] is None and "no stage 1" in metrics["stage1"]["note"]
    assert not any(k.startswith("test/meta/") for k in metrics)  # no ensemble: one output


FIT_DATA = "dataset.dataset_kwargs.num_images={train:100,val:40}"
FIT_STAGE1 = "stage1.overrides=['base.batch_size=8','trainer.max_epochs=1']"


def _stage1_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_fit_is_the_default_and_trains_stage1_once(tmp_path, capsys):
    from cgmgm.train import stage1_config

    root = tmp_path / "stage1"
    fit = [*STAGE2, FIT_DATA, f"stage1.root={root}", FIT_STAGE1]
    quick = "+trainer.fast_dev_run=true"  # stage 2's trainer only: stage 1 trains its epoch
    first = train(_cfg("train", tmp_path / "a", *fit, quick))  # base_ckpt=fit: the default
    out = capsys.readouterr().out
    assert "stage 1: training the base learner in" in out
    (run,) = _stage1_dirs(root)  # one stage 1, in its own directory under stage1.root
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["stage"] == 1 and saved["epochs"] == 1  # stage1.overrides reached it
    assert first["stage1"]["base_ckpt"] == saved["base_ckpt"]
    assert Path(saved["base_ckpt"]).resolve().is_relative_to(run.resolve())
    assert first["stage1"]["base_ckpt_kind"] == "cgmgm"
    # the paper's system: the ensemble's scores and the meta learner's beside them
    for key in ("test/mIoU", "test/meta/mIoU", "test/meta/FB-IoU", "test/GmIoU/posterior"):
        assert 0.0 <= first[key] <= 100.0, key

    # another stage-2 setting of the same fold reuses it, trains no second stage 1
    second = train(_cfg("train", tmp_path / "b", *fit, "model.gmm.components=2", quick))
    out = capsys.readouterr().out
    assert "stage 1: reusing the finished stage 1" in out and "training the base" not in out
    assert second["stage1"]["base_ckpt"] == first["stage1"]["base_ckpt"]
    assert _stage1_dirs(root) == [run]

    # stage 1's directory is named by stage 1's settings only (no training needed to see it)
    def where(*extra: str) -> str:
        return stage1_config(_cfg("train", tmp_path / "c", *fit, *extra)).paths.output_dir

    assert where() == str(run.resolve())
    assert where("shot=5", "model.guidance=[cosine]", "loss.meta=0.5") == str(run.resolve())
    assert where("seed=1") != where()
    assert where("stage1.overrides=['base.batch_size=8','trainer.max_epochs=2']") != where()

    # a stage-1 directory holding an unfinished run is never overwritten: the error says how
    # to resume it
    other = Path(where("seed=1"))
    other.mkdir(parents=True)
    (other / "train.log").write_text("an interrupted stage 1\n")
    with pytest.raises(FileExistsError, match="unfinished stage 1.*ckpt_path="):
        train(_cfg("train", tmp_path / "d", *fit, "seed=1"))
    assert (other / "train.log").read_text() == "an interrupted stage 1\n"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fold=1", r"fold: 0 \(checkpoint\) vs 1 \(this run\)"),
        ("dataset=synthetic_shapes", r"dataset: synthetic \(checkpoint\) vs synthetic_shapes"),
    ],
)
def test_stage2_refuses_another_settings_checkpoint(stage1, tmp_path, override, message):
    base_ckpt = stage1["metrics"]["base_ckpt"]
    overrides = STAGE2 if override.startswith("fold") else QUIET
    with pytest.raises(ValueError, match=message):
        train(_cfg("train", tmp_path, *overrides, override, f"base_ckpt={base_ckpt}"))


def test_stage2_refuses_another_backbone(stage1, tmp_path):
    base_ckpt = stage1["metrics"]["base_ckpt"]
    with pytest.raises(ValueError, match=r"backbone: efficientnet_lite0 \(checkpoint\) vs vgg16"):
        train(_cfg("train", tmp_path, *STAGE2, "backbone=vgg16", f"base_ckpt={base_ckpt}"))


def test_stage2_checkpoint_is_not_a_base_checkpoint(tmp_path):
    stage2 = tmp_path / "stage2.ckpt"  # what cgmgm.train saves: a model config, no base classes
    hp = {"model": {}, "backbone": {"name": "efficientnet_lite0"}}
    torch.save({"state_dict": {}, "hyper_parameters": hp}, stage2)
    with pytest.raises(ValueError, match="not a cgmgm stage-1 checkpoint.*base_classes"):
        train(_cfg("train", tmp_path / "run", *STAGE2, f"base_ckpt={stage2}"))


def test_missing_base_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="cgmgm.train_base"):
        train(_cfg("train", tmp_path, *STAGE2, f"base_ckpt={tmp_path / 'nope.pth'}"))


def test_stage1_on_fss_layout_with_bam_augmentation(tmp_path):
    from _data_fixtures import fss_fixture

    root = fss_fixture(tmp_path / "fss", classes=("a", "b", "c", "d"), per_class=5)
    overrides = [
        "dataset=fss1000",
        f"dataset.root={root}",
        "dataset.num_workers=0",
        "fold=1",
        "base.crop=32",  # BAM's stage-1 augmentation at a fixture's size
        "base.batch_size=4",
        "trainer.max_epochs=1",
        *QUIET,
    ]
    metrics = train_base(_cfg("train_base", tmp_path / "run", *overrides))
    assert metrics["base_class_names"] == ["a", "c", "d"]  # fold 1 of 4 blocks: "b" is novel
    assert (metrics["train_images"], metrics["val_images"]) == (16, 4)
    assert "held out" in metrics["val_split"]
    assert 1 <= metrics["val/classes_present"] <= 3


def test_stage1_resumes_in_place(tmp_path):
    first = train_base(_cfg("train_base", tmp_path, *STAGE1, "trainer.max_epochs=1"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    resumed = train_base(
        _cfg("train_base", tmp_path, *STAGE1, "trainer.max_epochs=2", f"ckpt_path={last}")
    )
    assert first["epochs"] == 1 and resumed["epochs"] == 2
    assert (tmp_path / "metrics.earlier-1.json").is_file()  # the first run's numbers kept
    # the best checkpoint's scores, whichever epoch it came from (re-validated when it
    # predates the resume)
    assert resumed["val/mIoU"] >= first["val/mIoU"] - 1e-6
    with pytest.raises(ValueError, match=r"fold: 0 \(checkpoint\) vs 1 \(this run\)"):
        train_base(_cfg("train_base", tmp_path / "y", *STAGE1, "fold=1", f"ckpt_path={last}"))
    with pytest.raises(ValueError, match="backbone=efficientnet_lite0"):
        train_base(
            _cfg("train_base", tmp_path / "x", *STAGE1, "backbone=vgg16", f"ckpt_path={last}")
        )


def test_stage2_resumes_and_evaluates_on_its_stage1(stage1, tmp_path):
    from cgmgm.eval import evaluate

    base_ckpt = stage1["metrics"]["base_ckpt"]
    train(_cfg("train", tmp_path, *STAGE2, f"base_ckpt={base_ckpt}"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    # resumed without base_ckpt: the checkpoint holds the stage-1 weights and says whose
    resumed = train(_cfg("train", tmp_path, *STAGE2, "trainer.max_epochs=2", f"ckpt_path={last}"))
    assert resumed["stage1"]["base_ckpt"] == base_ckpt
    other = tmp_path / "other.ckpt"
    other.write_bytes(Path(base_ckpt).read_bytes())
    with pytest.raises(ValueError, match="stands on base_ckpt="):
        train(_cfg("train", tmp_path / "x", *STAGE2, f"ckpt_path={last}", f"base_ckpt={other}"))
    # the eval app on the stage-2 checkpoint: its own weights, and the record of its stage 1
    cfg = _cfg(
        "eval",
        tmp_path / "eval",
        *TINY_DATA,
        "dataset.test_episodes=8",
        "eval.seeds=[0]",
        *QUIET,
        f"ckpt_path={last}",
    )
    metrics = evaluate(cfg)
    assert metrics["stage1"]["base_ckpt"] == base_ckpt and 0 <= metrics["test/mIoU"] <= 100


def test_training_episodes_class_idx_plus_one_is_the_base_learners_label(tmp_path):
    """The ensemble leaves out base label class_idx + 1 in training: that must be the label
    stage 1 gave the episode's class (cgmgm.data.base.base_label_table of its base classes)."""
    from cgmgm.config import build_datamodule
    from cgmgm.data.base import base_label_table

    cfg = _cfg("train", tmp_path, *STAGE2, "base_ckpt=null", "fold=2")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    table = base_label_table(dm.train_class_ids)
    batches = 0
    for batch in dm.train_dataloader():
        labels = table[batch["class_id"].numpy()]
        assert (labels == batch["class_idx"].numpy() + 1).all()
        assert (labels > 0).all()  # every training class is a base class
        batches += 1
    assert batches > 0


def test_stage1_is_named_by_what_it_trains_only(tmp_path):
    """Stage-2-only settings (its recipe, episode counts, batch sizes, test seed, devices) share
    one stage 1; stage 1's own settings and the dataset's images do not."""
    from cgmgm.train import stage1_config

    def where(*extra: str) -> str:
        cfg = _cfg("train", tmp_path, *STAGE2, f"stage1.root={tmp_path / 's1'}", *extra)
        return stage1_config(cfg).paths.output_dir

    same = ("recipe.lr=0.01", "recipe.components=2", "dataset.batch_size=4", "test_seed=7",
            "dataset.train_episodes=16", "trainer.devices=1", "shot=5")  # fmt: skip
    for extra in same:
        assert where(extra) == where(), extra
    for extra in ("recipe.base_lr=0.01", "fold=1", "dataset.dataset_kwargs.image_size=48"):
        assert where(extra) != where(), extra
    with pytest.raises(ValueError, match="takes dataset from this run"):
        where("stage1.overrides=['dataset=pascal']")


def test_a_finished_stage1_of_other_settings_is_not_reused(tmp_path):
    """Its stage1.yaml must be this run's stage 1 (e.g. resumed by hand with other settings)."""
    from cgmgm.train import fit_stage1, stage1_config, stage1_identity

    cfg = _cfg("train", tmp_path, *STAGE2, f"stage1.root={tmp_path / 's1'}")
    out = Path(stage1_config(cfg).paths.output_dir)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "best.ckpt").write_bytes(b"x")
    (out / "metrics.json").write_text(json.dumps({"base_ckpt": str(out / "checkpoints/best.ckpt")}))
    theirs = stage1_identity(stage1_config(cfg))
    theirs["optim"]["lr"] = 0.5
    (out / "stage1.yaml").write_text(yaml.safe_dump(theirs))
    with pytest.raises(ValueError, match=r"other settings \(optim.lr"):
        fit_stage1(cfg)
    (out / "stage1.yaml").write_text(yaml.safe_dump(stage1_identity(stage1_config(cfg))))
    assert fit_stage1(cfg) == str(out / "checkpoints/best.ckpt")
