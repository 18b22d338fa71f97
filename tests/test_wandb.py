"""Weights & Biases, offline and never prompting: one tiny training job (a one-job multirun,
CSV and W&B) and one training-free evaluation, each a real process with stdin closed and no
API key; then what their W&B runs hold (read back from the runs' own record files) and
cgmgm.wandb_runs.load_wandb_jobs against cgmgm.sweeps.load_jobs, from disk and through a
stand-in for wandb.Api."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from _model_helpers import TINY_DATA
from cgmgm.config import compose, to_plain
from cgmgm.figures import guidance_images
from cgmgm.lit import LitCGMGM
from cgmgm.loggers import METRICS_KEYS_KEY, RUN_KEYS
from cgmgm.sweeps import load_jobs
from cgmgm.wandb_runs import load_wandb_jobs, read_run_file

TEST_EPISODES = 8
IMAGE_SIZE = 32
TINY = [
    *[o for o in TINY_DATA if "image_size" not in o],
    f"dataset.dataset_kwargs.image_size={IMAGE_SIZE}",
    f"dataset.test_episodes={TEST_EPISODES}",
    "model.proj_dim=32",
    "model.gmm.iters=3",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> SimpleNamespace:
    """A training job (multirun of one job: ``sweep/0``, loggers CSV and W&B) and an
    evaluation (``eval``), W&B offline without an API key (HOME without .netrc)."""
    root = tmp_path_factory.mktemp("wandb")
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(home), NETRC=str(home / ".netrc"), WANDB_MODE="offline", WANDB_SILENT="true",
        WANDB_DIR=str(root / "wandb-dir"), WANDB_CACHE_DIR=str(root / "wandb-cache"),
        WANDB_CONFIG_DIR=str(root / "wandb-config"), OMP_NUM_THREADS="1",
    )  # fmt: skip
    sweep = root / "sweep"
    _run(
        ["cgmgm.train", "-m", "seed=0", "logger=[csv,wandb]", "base_ckpt=null",
         f"hydra.sweep.dir={sweep}", *TINY],
        root, env,
    )  # fmt: skip
    _run(
        ["cgmgm.eval", "model=training_free", "logger=wandb", "eval.seeds=[0]",
         f"hydra.run.dir={root / 'eval'}", *TINY],
        root, env,
    )  # fmt: skip
    return SimpleNamespace(root=root, sweep=sweep, job=sweep / "0", eval=root / "eval")


def _run_folder(job_dir: Path) -> Path:
    folders = sorted((job_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, folders
    return folders[0]


def _run_record(job_dir: Path) -> dict:
    return read_run_file(next(_run_folder(job_dir).glob("run-*.wandb")))


def _resolved_disk_config(job_dir: Path) -> dict:
    """The job's .hydra/config.yaml with its interpolations resolved (the one Hydra resolver
    in it, paths.output_dir, is the job dir)."""
    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(job_dir)
    return OmegaConf.to_container(cfg, resolve=True)


def _metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


# ------------------------------------------------------------------ what a run holds


def test_config_holds_resolved_config_overrides_and_sweep(jobs):
    run = _run_record(jobs.job)
    config = run["config"]
    assert {k: v for k, v in config.items() if k not in (*RUN_KEYS, "_wandb")} == (
        _resolved_disk_config(jobs.job)
    )
    on_disk = yaml.safe_load((jobs.job / ".hydra" / "overrides.yaml").read_text())
    assert config["overrides"] == on_disk and "base_ckpt=null" in on_disk
    multirun = yaml.safe_load((jobs.sweep / "multirun.yaml").read_text())["hydra"]
    assert config["sweep"] == {
        "dir": str(jobs.sweep.resolve()),
        "job_num": 0,  # and what the whole sweep asked for (cgmgm.tables marks the rest missing)
        "params": {k: str(v) for k, v in (multirun["sweeper"]["params"] or {}).items()},
        "task": multirun["overrides"]["task"],
    }
    assert config["sweep"]["task"]  # the sweep's command line
    assert run["group"] == jobs.sweep.name  # a sweep's jobs share a W&B group
    # the LightningModule's hyper-parameters sit under "module", not over the Hydra config
    assert config["module"]["class_ids"] == [1, 2, 3, 4, 5]
    assert config["module"]["model"] == config["model"]

    ev = _run_record(jobs.eval)["config"]
    assert ev["sweep"] is None and ev["task_name"] == "eval"
    assert "model=training_free" in ev["overrides"]
    assert ev["paths"]["output_dir"] == str(jobs.eval)


@pytest.mark.parametrize("which", ["job", "eval"])
def test_summary_holds_metrics_json(jobs, which):
    job_dir = getattr(jobs, which)
    summary = _run_record(job_dir)["summary"]
    metrics = _metrics(job_dir)
    assert summary[METRICS_KEYS_KEY] == list(metrics)
    assert {k: summary[k] for k in metrics} == metrics
    if which == "eval":
        assert "test/mIoU_std" in summary and "seed0/test/mIoU" in summary


def _table(job_dir: Path, key: str) -> dict:
    entry = _run_record(job_dir)["summary"][key]
    assert entry["_type"] == "table-file"
    return json.loads((_run_folder(job_dir) / "files" / entry["path"]).read_text())


def test_per_class_iou_table(jobs):
    metrics = _metrics(jobs.job)
    table = _table(jobs.job, "test/per_class_IoU")
    # no stage 1 (base_ckpt=null): no ensemble, hence no meta learner column
    assert not any(k.startswith("test/meta/") for k in metrics)
    assert table["columns"] == ["class_id", "class_name", "IoU", "episodes"]
    rows = {r[0]: dict(zip(table["columns"], r, strict=True)) for r in table["data"]}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert [rows[c]["class_name"] for c in sorted(rows)] == metrics["test_class_names"]
    assert sum(r["episodes"] for r in rows.values()) == TEST_EPISODES
    for cid, row in rows.items():
        key = f"test/IoU/class_{cid}"
        assert (row["episodes"] > 0) == (key in metrics)  # no episode: no IoU, in both
        if key in metrics:
            assert row["IoU"] == pytest.approx(metrics[key], abs=1e-4)
        else:
            assert row["IoU"] is None
    drawn = [r for r in rows.values() if r["episodes"]]
    assert metrics["test/mIoU"] == pytest.approx(
        sum(r["IoU"] for r in drawn) / len(drawn), abs=1e-4
    )
    # the validation table too, equal to the epoch's logged val/IoU/class_<id>
    summary = _run_record(jobs.job)["summary"]
    for cid, _name, iou, episodes in _table(jobs.job, "val/per_class_IoU")["data"]:
        assert (f"val/IoU/class_{cid}" in summary) == (episodes > 0)
        if episodes:
            assert iou == pytest.approx(summary[f"val/IoU/class_{cid}"], abs=1e-4)


def test_csv_log_unchanged(jobs):
    with (jobs.job / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert not any("per_class" in k for k in rows[0])
    tested = [r for r in rows if r.get("test/mIoU")]
    assert len(tested) == 1
    assert float(tested[0]["test/mIoU"]) == pytest.approx(_metrics(jobs.job)["test/mIoU"])


def test_figures_and_guidance_maps_as_images(jobs):
    summary = _run_record(jobs.job)["summary"]
    files = _run_folder(jobs.job) / "files"
    episodes = summary["test/episodes"]
    assert episodes["_type"] == "images/separated" and episodes["count"] == 1
    on_disk = sorted((jobs.job / "figures").glob("test*.png"))
    assert len(on_disk) == 1
    logged = np.asarray(Image.open(files / episodes["filenames"][0]).convert("RGB"))
    assert np.array_equal(logged, np.asarray(Image.open(on_disk[0]).convert("RGB")))
    # default model: IMG on and the posterior as guidance, so all three maps are computed
    guidance = summary["test/guidance"]
    assert guidance["captions"] == ["cosine prior", "initial mask M_q", "GMM posterior p(fg|x)"]
    assert guidance["count"] == 3
    for name in guidance["filenames"]:
        assert Image.open(files / name).size == (IMAGE_SIZE, IMAGE_SIZE)
    assert "val/guidance" in summary and "val/episodes" in summary


def test_guidance_images_geometry_and_values():
    """Each map present is brought to the query's size; 0 and 1 land on jet's two ends."""
    query = torch.full((1, 3, 16, 20), 0.5)  # [B, 3, H, W] grey
    ones, zeros = torch.ones(1, 1, 4, 5), torch.zeros(1, 1, 4, 5)  # [B, 1, h, w]
    images = guidance_images({"query_img": query}, {"posterior": ones, "cosine_prior": zeros})
    assert [t for t, _ in images] == ["cosine prior", "GMM posterior p(fg|x)"]
    low, high = images[0][1], images[1][1]
    assert low.shape == high.shape == (16, 20, 3) and low.dtype == np.uint8
    assert (low == low[0, 0]).all() and (high == high[0, 0]).all()  # constant maps
    assert low[0, 0, 2] > low[0, 0, 0]  # 0: blue end
    assert high[0, 0, 0] > high[0, 0, 2]  # 1: red end


class _TableRecorder:
    def __init__(self):
        self.tables = []

    def log_table(self, key, columns, data, step=None):
        self.tables.append((key, columns, data, step))


def test_class_table_with_meta_learner_and_classes_without_episodes():
    """An ensemble module's table: the final and the meta learner's IoU per class, against
    IoU = intersection / union summed over each class's episodes, counted by hand."""
    model = to_plain(compose("train", ["model.proj_dim=16", "model.gmm.iters=2"]).model)
    backbone = {"name": "efficientnet_lite0", "weights": None}
    names = ["background", "cat", "dog", "cow"]
    module = LitCGMGM(model, backbone, [1, 2, 3], class_names=names, base_learner_classes=4)
    assert module.model.has_ensemble
    target = torch.zeros(3, 4, 4, dtype=torch.long)  # [B, H, W] episodes of classes 1, 1, 2
    target[:, :2] = 1  # 8 foreground pixels each
    target[2, 3, 3] = 255  # ignored
    final = torch.zeros_like(target)
    final[0, :2] = 1  # episode 0: exact (I 8, U 8)
    final[1, :1] = 1  # episode 1: I 4, U 8
    final[2, :, :] = 1  # episode 2: I 8, U 15 (the ignored pixel counts nowhere)
    meta = torch.zeros_like(target)  # empty: I 0 everywhere
    class_idx = torch.tensor([0, 0, 1])  # positions in class_ids
    module.scores["test"]["iou"].update(final, target, class_idx)
    module.scores["test"]["meta"].update(meta, target, class_idx)
    recorder = _TableRecorder()
    module._trainer = SimpleNamespace(sanity_checking=False, loggers=[recorder], global_step=7)
    module._log_class_table("test")
    ((key, columns, rows, step),) = recorder.tables
    assert (key, step) == ("test/per_class_IoU", 7)
    assert columns == ["class_id", "class_name", "IoU", "meta_IoU", "episodes"]
    expected = [
        [1, "cat", 100 * (8 + 4) / (8 + 8), 0.0, 2],
        [2, "dog", 100 * 8 / 15, 0.0, 1],
        [3, "cow", None, None, 0],
    ]
    assert [r[:2] + r[4:] for r in rows] == [e[:2] + e[4:] for e in expected]
    for row, exp in zip(rows, expected, strict=True):
        assert row[2:4] == [pytest.approx(v) if v is not None else None for v in exp[2:4]]
    module._trainer = SimpleNamespace(sanity_checking=True, loggers=[recorder], global_step=0)
    module._log_class_table("test")  # the sanity check logs no table
    assert len(recorder.tables) == 1


# ------------------------------------------------------------------ reading runs back


def test_load_wandb_jobs_from_disk_equals_load_jobs(jobs):
    (ours,) = load_wandb_jobs(jobs.sweep)
    (disk,) = load_jobs(jobs.sweep)
    assert set(ours) == set(disk) == {"dir", "overrides", "config", "metrics"}
    assert ours["dir"] == disk["dir"].resolve()
    assert ours["overrides"] == disk["overrides"]
    assert ours["overrides"]["seed"] == 0 and ours["overrides"]["base_ckpt"] == "null"
    assert ours["metrics"] == disk["metrics"]
    assert ours["config"] == _resolved_disk_config(jobs.job)
    # both jobs under one root (and no run twice through wandb/latest-run), job number first
    both = load_wandb_jobs(jobs.root)
    assert [j["dir"].resolve() for j in both] == [jobs.job.resolve(), jobs.eval.resolve()]
    assert both[1]["metrics"] == _metrics(jobs.eval)


class FakeApi:
    """Stands in for wandb.Api: ``runs(path, filters=..., lazy=...)`` over given runs."""

    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None, **kwargs):
        self.calls.append((path, filters))
        group = (filters or {}).get("group")
        return [r for r in self._runs if group is None or r.group == group]


def _api_run(job_dir: Path, **changes) -> SimpleNamespace:
    """What wandb.Api gives for the job's run (config without W&B's own "_" keys)."""
    rec = _run_record(job_dir)
    run = SimpleNamespace(
        config={k: v for k, v in rec["config"].items() if not k.startswith("_")},
        summary=dict(rec["summary"]), id=rec["id"], name=f"run-{rec['id']}",
        group=rec["group"], created_at="2026-01-01T00:00:00Z",
    )  # fmt: skip
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def test_load_wandb_jobs_through_the_api(jobs):
    stage1 = SimpleNamespace(
        config={"task_name": "train_base", "overrides": [], "paths": {"output_dir": "s1"}},
        summary={"val/mIoU": 1.0}, id="s1", name="stage1",
        group=jobs.sweep.name, created_at="2026-01-01T00:00:00Z",
    )  # fmt: skip
    api = FakeApi([_api_run(jobs.job), _api_run(jobs.eval), stage1])
    with pytest.warns(UserWarning, match="left out: W&B run stage1"):
        got = load_wandb_jobs(f"team/cgmgm:{jobs.sweep.name}", api=api)
    assert api.calls == [("team/cgmgm", {"group": jobs.sweep.name})]
    assert got == load_wandb_jobs(jobs.sweep)
    everything = load_wandb_jobs(
        "team/cgmgm", api=FakeApi([_api_run(jobs.job), _api_run(jobs.eval)])
    )
    assert [j["dir"].resolve() for j in everything] == [jobs.job.resolve(), jobs.eval.resolve()]


def test_runs_without_metrics(jobs):
    bare = dict(_api_run(jobs.job).summary)
    for key in [*bare[METRICS_KEYS_KEY], METRICS_KEYS_KEY]:
        bare.pop(key)
    unfinished = _api_run(jobs.job, summary=bare, id="zz9", name="crashed-7")
    with (
        pytest.warns(UserWarning, match=r"crashed-7.*team/cgmgm/zz9.*no final metrics"),
        pytest.raises(LookupError, match="no job"),
    ):  # left out, named (a table marks it missing from its sweep's record); nothing else
        load_wandb_jobs("team/cgmgm", api=FakeApi([unfinished]))
    # resumed in place: the earlier, unfinished run of the same job dir is left out, and of two
    # finished ones the latest counts (it wrote the metrics.json on disk)
    earlier = _api_run(jobs.job, id="aa1", created_at="2025-12-01T00:00:00Z")
    earlier.summary = {**earlier.summary, "test/mIoU": -1.0}
    runs = [unfinished, _api_run(jobs.job), earlier]
    with pytest.warns(UserWarning, match="3 W&B runs.*left out.*crashed-7"):
        (job,) = load_wandb_jobs("team/cgmgm", api=FakeApi(runs))
    assert job["metrics"] == _metrics(jobs.job)


def test_bad_sources_never_prompt(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RuntimeError, match="wandb login"):
        load_wandb_jobs("team/cgmgm")
    with pytest.raises(FileNotFoundError, match="neither a dir nor a W&B path"):
        load_wandb_jobs(str(tmp_path / "missing" / "dir" / "x"))
    with pytest.raises(FileNotFoundError, match="no W&B run under"):
        load_wandb_jobs(tmp_path)


def test_damaged_run_file_is_an_error(jobs, tmp_path):
    src = next(_run_folder(jobs.job).glob("run-*.wandb"))
    data = bytearray(src.read_bytes())
    data[7 + 7 + 1] ^= 0xFF  # a byte of the first record (after the file and chunk headers)
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"run-bad.wandb: damaged"):
        read_run_file(bad)
    shutil.copy(src, tmp_path / "run-good.wandb")
    assert read_run_file(tmp_path / "run-good.wandb")["config"] == _run_record(jobs.job)["config"]


def test_the_wandb_logger_class_pickles_by_name():
    """ddp_spawn and other launchers pickle the logger: its class is found by name."""
    import pickle

    from cgmgm import loggers

    cls = loggers.CGMGMWandbLogger
    assert pickle.loads(pickle.dumps(cls)) is cls
