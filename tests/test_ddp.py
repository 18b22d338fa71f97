"""Multi-process runs that have really run: ``trainer=ddp`` on 2 CPU processes (gloo).

``python -m cgmgm.train`` (stage 1, stage 2, test) and ``python -m cgmgm.eval`` run as
subprocesses under Lightning's DDP launcher, which re-runs the Hydra app for rank 1. Each
rank records the episodes it saw (:class:`EpisodeRecorder`, a callback added by override);
the test then checks, against independent single-process computations:

- both ranks ran in one output dir (Hydra's default ``${now:...}_${cgmgm.pid:}`` dir, or an
  explicit ``hydra.run.dir``), stage 1 trained once under the rank-0 lock, and metrics.json
  was written once;
- the ranks' training batches are disjoint halves of the single-process epoch
  (:class:`~cgmgm.data.datamodule.EpisodeSampler` through Lightning's DDP wrapper), their
  val/test batches the no-padding shards ``rank::2`` of every episode, every episode's
  tensors equal to the single-process data module's (``num_workers=0``; the DDP run loads with
  a worker per rank), and the ranks' weights equal after fit (gradients all-reduced);
- the test metrics of the DDP run equal a single-process test of its checkpoint, and a DDP
  evaluation (two seeds) equals the single-process one, per class.

tests/test_episodes.py covers the samplers alone (``ShardedEvalSampler``, the DDP wrapper over
``EpisodeSampler``, worker counts for test loaders); tests/test_metrics.py the metric states'
sum over a gloo process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from _model_helpers import TINY_DATA

TESTS = Path(__file__).resolve().parent
WORLD = 2  # processes per DDP run
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={WORLD}"]
TEST_EPISODES = 9  # odd: shards of 5 and 4, so padding would show
DATA = [
    *TINY_DATA,
    "dataset.dataset_kwargs.num_images={train:100,val:40}",
    "dataset.train_episodes=16",  # 16 / (batch 4 x 2 ranks): 2 steps per rank and epoch
    "dataset.val_episodes=7",
    f"dataset.test_episodes={TEST_EPISODES}",
]
MODEL = ["model.proj_dim=32", "model.gmm.iters=3"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
EPOCHS = 2
# stage 1 (BAM's base learner): one short epoch, enough for a checkpoint to stand on
STAGE1 = (
    "stage1.overrides=['base.batch_size=8','trainer.max_epochs=1','trainer.limit_train_batches=2',"
    "'+trainer.limit_val_batches=1','trainer.enable_progress_bar=false']"
)
TEST_SEED = 510  # BAM's first test seed: the train run's test episodes (test_seed=null)
EVAL_SEEDS = [TEST_SEED, 7]
# Launcher variables a surrounding job may have set: the runs must start their own group.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def _digest(batch: dict[str, Any], b: int | None) -> str:
    """The identity of episode ``b`` of a batch (or of one episode, ``b`` None): its tensors'
    bytes and its class and image indices."""
    h = hashlib.sha1()
    for key in ("query_img", "query_mask", "support_imgs", "support_masks"):
        t = batch[key] if b is None else batch[key][b]
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for key in ("class_id", "query_source_idx", "support_source_idx"):
        v = batch[key] if b is None else batch[key][b]
        h.update(str(v.tolist() if hasattr(v, "tolist") else v).encode())
    return h.hexdigest()


class EpisodeRecorder(L.Callback):
    """Appends, per batch, this rank's episodes (index and :func:`_digest`) to
    ``dirpath/rank<r>.jsonl``; after fit, a digest of the module's weights."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record.update(rank=trainer.global_rank, world=trainer.world_size, pid=os.getpid())
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _batch(self, trainer: L.Trainer, stage: str, batch: dict[str, Any]) -> None:
        index = batch["index"].tolist()  # [B]
        episodes = [[i, _digest(batch, b)] for b, i in enumerate(index)]
        self._write(trainer, {"stage": stage, "epoch": trainer.current_epoch, "episodes": episodes})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch(trainer, "train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dl_idx=0) -> None:
        self._batch(trainer, "val", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dl_idx=0) -> None:
        self._batch(trainer, "test", batch)

    def on_fit_end(self, trainer, pl_module) -> None:
        h = hashlib.sha1()
        for key, value in sorted(pl_module.state_dict().items()):
            h.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
        self._write(trainer, {"stage": "weights", "digest": h.hexdigest()})


def _recorder(dirpath: Path) -> list[str]:
    return [
        f"+callbacks.episodes._target_={__name__}.EpisodeRecorder",
        f"+callbacks.episodes.dirpath={dirpath}",
    ]


def _run(app: str, cwd: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m cgmgm.<app>`` with ``overrides`` in ``cwd``; this module importable (the
    recorder), one thread per process, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", f"cgmgm.{app}", *overrides],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"cgmgm.{app} under DDP failed:\n{proc.stderr[-4000:]}"
    return proc, elapsed


def _records(dirpath: Path) -> dict[int, list[dict[str, Any]]]:
    """The recorder's records per rank; every rank saw a world of WORLD processes."""
    files = sorted(dirpath.glob("rank*.jsonl"))
    assert [f.name for f in files] == [f"rank{r}.jsonl" for r in range(WORLD)], files
    out = {}
    for r, f in enumerate(files):
        out[r] = [json.loads(line) for line in f.read_text().splitlines()]
        assert {(x["rank"], x["world"]) for x in out[r]} == {(r, WORLD)}
    pids = {r: {x["pid"] for x in recs} for r, recs in out.items()}
    assert len(pids[0]) == len(pids[1]) == 1 and pids[0] != pids[1]  # two processes
    return out


def _seen(records: list[dict[str, Any]], stage: str, epoch: int | None = None) -> list[list]:
    """[[index, digest], ...] of ``stage`` (and ``epoch``) in the order the rank saw them."""
    return [
        e
        for x in records
        if x["stage"] == stage and (epoch is None or x["epoch"] == epoch)
        for e in x["episodes"]
    ]


def _iou_keys(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(prefix) and "IoU" in k}


@pytest.fixture(scope="module")
def ddp_train(tmp_path_factory) -> dict[str, Any]:
    """Stage 1 + stage 2 + test of ``python -m cgmgm.train`` on 2 CPU processes, in Hydra's
    default output dir (cwd = a fresh folder), loading with one worker per rank."""
    cwd = tmp_path_factory.mktemp("ddp_train")
    record = cwd / "episodes"
    proc, elapsed = _run(
        "train",
        cwd,
        *DDP_CPU, *DATA, *MODEL, *QUIET, *_recorder(record),
        "dataset.num_workers=1", f"trainer.max_epochs={EPOCHS}",
        f"stage1.root={cwd / 'stage1'}", STAGE1,
    )  # fmt: skip
    print(f"DDP train run (stage 1 + stage 2 + test): {elapsed:.1f} s")
    runs = sorted((cwd / "outputs" / "train").iterdir())
    assert len(runs) == 1, runs  # rank 1 joined rank 0's default dir
    return {"cwd": cwd, "out": runs[0], "record": record, "proc": proc}


def test_ddp_train_runs_both_ranks_in_one_dir(ddp_train):
    out, cwd = ddp_train["out"], ddp_train["cwd"]
    # Hydra wrote rank 0's log and config; Lightning re-ran the app for rank 1 into that dir
    assert (out / "train.log").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert (out / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in out.glob("metrics*.json")) == ["metrics.json"]
    assert ddp_train["proc"].stdout.count(f"metrics: {out / 'metrics.json'}") == 1  # rank 0's
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["test_ckpt"]).is_file() and Path(metrics["test_ckpt"]).parent == (
        out / "checkpoints"
    )
    assert {"test_seed510.png"} <= {p.name for p in (out / "figures").iterdir()}
    # stage 1 trained once, under rank 0's lock (rank 1 joined its DDP job), and stage 2
    # stands on its best checkpoint
    assert ddp_train["proc"].stdout.count("stage 1: training the base learner in") == WORLD
    stage1 = [p for p in (cwd / "stage1").iterdir() if p.is_dir()]
    assert len(stage1) == 1 and (stage1[0] / "stage1.yaml").is_file()
    assert sorted(p.name for p in stage1[0].glob("metrics*.json")) == ["metrics.json"]
    base = json.loads((stage1[0] / "metrics.json").read_text())["base_ckpt"]
    assert Path(base).is_file() and metrics["stage1"]["base_ckpt"] == base
    assert metrics["ensemble"] is True and "test/meta/mIoU" in metrics


def test_ddp_train_shards_episodes_without_padding(ddp_train):
    from cgmgm.config import build_datamodule, compose
    from cgmgm.data.datamodule import EpisodeSampler

    records = _records(ddp_train["record"])
    # the same episodes, one process and no workers: the data module of the run's config
    cfg = compose("train", [*DATA, "dataset.num_workers=0", "paths.output_dir=unused"])
    dm = build_datamodule(cfg)
    dm.setup()
    sets = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}
    assert dm.test_set.seed == TEST_SEED and len(dm.test_set) == TEST_EPISODES

    def check_contents(seen: list[list], stage: str) -> None:
        for index, digest in seen:
            assert digest == _digest(sets[stage][index], None), (stage, index)

    n_train = len(dm.train_set)
    for epoch in range(EPOCHS):
        single = EpisodeSampler(n_train, int(cfg.seed), resample=dm.resample_train)
        single.set_epoch(epoch)
        shards = [[i for i, _ in _seen(records[r], "train", epoch)] for r in range(WORLD)]
        assert [len(s) for s in shards] == [n_train // WORLD] * WORLD, shards
        assert not set(shards[0]) & set(shards[1])  # data parallel: no episode twice
        assert sorted(shards[0] + shards[1]) == sorted(single)  # the single-process epoch
        for r in range(WORLD):
            check_contents(_seen(records[r], "train", epoch), "train")
    for stage, n in (("val", len(dm.val_set)), ("test", TEST_EPISODES)):
        epochs = range(EPOCHS) if stage == "val" else [None]
        for epoch in epochs:
            for r in range(WORLD):
                seen = _seen(records[r], stage, epoch)
                assert [i for i, _ in seen] == list(range(r, n, WORLD)), (stage, epoch, r)
                check_contents(seen, stage)
    # gradients were all-reduced: both ranks end with the same weights
    weights = [[x["digest"] for x in records[r] if x["stage"] == "weights"] for r in range(2)]
    assert len(weights[0]) == 1 and weights[0] == weights[1]


def test_ddp_train_metrics_equal_a_single_process_test(ddp_train, tmp_path):
    from cgmgm.config import compose
    from cgmgm.eval import evaluate

    ddp = json.loads((ddp_train["out"] / "metrics.json").read_text())
    cfg = compose(
        "eval",
        [
            *DATA, *QUIET, "logger=none", "callbacks.figures=null",
            f"ckpt_path='{ddp['test_ckpt']}'", f"eval.seeds=[{TEST_SEED}]",
            f"paths.output_dir={tmp_path / 'single'}",
        ],
    )  # fmt: skip
    start = time.perf_counter()
    single = evaluate(cfg)
    print(f"single-process test of the DDP checkpoint: {time.perf_counter() - start:.1f} s")
    want = _iou_keys(ddp, "test/")
    got = _iou_keys(single, f"seed{TEST_SEED}/test/")
    got = {k.removeprefix(f"seed{TEST_SEED}/"): v for k, v in got.items()}
    assert any(k.startswith("test/IoU/class_") for k in want)
    assert any(k.startswith("test/meta/IoU/class_") for k in want)  # BAM's ensemble's parts
    assert set(got) == set(want)  # the same classes drawn
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    assert want["test/FB-IoU"] > 0 and want["test/GmIoU"] > 0  # nonzero counts were summed


def test_ddp_eval_equals_single_process_per_class(tmp_path):
    from cgmgm.config import compose
    from cgmgm.eval import evaluate

    run = [
        "model=training_free", *DATA, *QUIET, "logger=csv",
        f"eval.seeds=[{','.join(map(str, EVAL_SEEDS))}]",
    ]  # fmt: skip
    out = tmp_path / "ddp"  # an explicit dir: Lightning appends rank 0's for rank 1
    proc, elapsed = _run(
        "eval", tmp_path, *DDP_CPU, *run, *_recorder(tmp_path / "episodes"), f"hydra.run.dir={out}"
    )
    print(f"DDP eval run ({len(EVAL_SEEDS)} seeds): {elapsed:.1f} s")
    assert (out / "train_ddp_process_1.log").is_file()  # Lightning names it so for any app
    assert sorted(p.name for p in out.glob("metrics*.json")) == ["metrics.json"]
    assert proc.stdout.count(f"metrics: {out / 'metrics.json'}") == 1  # rank 0's table only
    assert {f"test_seed{s}.png" for s in EVAL_SEEDS} <= {
        p.name for p in (out / "figures").iterdir()
    }
    records = _records(tmp_path / "episodes")
    for r in range(WORLD):  # one test per seed, each sharded rank::2 without padding
        tests = [x["episodes"] for x in records[r] if x["stage"] == "test"]
        indices = [i for batch in tests for i, _ in batch]
        assert indices == list(range(r, TEST_EPISODES, WORLD)) * len(EVAL_SEEDS)
    ddp = json.loads((out / "metrics.json").read_text())

    cfg = compose("eval", [*run, "callbacks.figures=null", f"paths.output_dir={tmp_path / 's'}"])
    single = evaluate(cfg)
    want = _iou_keys(ddp, "seed")
    assert set(_iou_keys(single, "seed")) == set(want) and want
    for key, value in want.items():
        assert single[key] == pytest.approx(value, abs=1e-4), key
    for key, value in _iou_keys(ddp, "test/").items():  # mean and std over the seeds
        assert single[key] == pytest.approx(value, abs=1e-4), key
    # mixed predictions, so that the comparison can fail: foreground and background found,
    # most classes scored above 0
    per_class = [v for k, v in want.items() if "/test/IoU/class_" in k]
    assert sum(v > 0 for v in per_class) > len(per_class) / 2, per_class
    for s in EVAL_SEEDS:
        assert want[f"seed{s}/test/fg-IoU"] > 0 and want[f"seed{s}/test/bg-IoU"] > 0
