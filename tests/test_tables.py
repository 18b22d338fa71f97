"""python -m cgmgm.tables: the paper's tables from sweeps (layouts, missing runs, the paper's
numbers), their dry run, FLOPs for Fig. 6, and one real launch end to end."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from _model_helpers import TINY_DATA
from cgmgm import tables
from cgmgm.config import compose

# the paper's Table 2 (CGMGM, ResNet-50, 1-shot) and Table 4 (FB-IoU), copied from its text
PAPER_T2_R50_1SHOT = [71.14, 74.99, 69.62, 63.65, 69.85]
PAPER_T4 = {"bam": (79.71, 82.18), "cgmgm": (80.51, 83.05)}


def _cells(text: str, first: str) -> list[str]:
    """The cells of the markdown row whose first cell is ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{text}")


def _job(root, n, overrides, metrics, row="cgmgm"):
    """A finished job of a sweep, as cgmgm.train writes it (metrics.json, .hydra/)."""
    d = root / str(n)
    cfg = compose("train", [f"ablation={row}", f"paths.output_dir={d}", *overrides])
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    plain = OmegaConf.to_container(cfg, resolve=True)
    keep = {k: plain[k] for k in ("model", "paper", "seed", "fold", "shot", "dataset", "backbone")}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(keep))
    record = {"dataset": "synthetic", "backbone": "efficientnet_lite0", "ensemble": True}
    record.update(fold=plain["fold"], shot=plain["shot"], model=plain["model"])
    record.update(components=plain["model"]["gmm"]["components"])
    record.update(covariance=plain["model"]["gmm"]["covariance"], train_class_ids=list(range(15)))
    record.update(protocol={"name": "bam"}, test_episodes=1000, test_seed=510)
    (d / "metrics.json").write_text(json.dumps({**record, **metrics}))


def _sweep(root, params, task=()):
    root.mkdir(parents=True, exist_ok=True)
    hydra = {"sweeper": {"params": params}, "overrides": {"task": list(task)}}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


def test_expand_sweep_is_hydras_product_and_the_command_line_replaces_a_param():
    params = {"dataset": "pascal", "fold": "0,1,2,3", "shot": "1,5", "seed": "0,1,2"}
    jobs = tables.expand_sweep(params, ["fold=2", "seed=0,1", "model.proj_dim=64"])
    assert len(jobs) == 1 * 2 * 2
    for job in jobs:
        d = dict(o.split("=", 1) for o in job)
        assert d["fold"] == "2" and d["dataset"] == "pascal" and d["model.proj_dim"] == "64"
    assert {tuple(sorted(j)) for j in jobs} == {
        tuple(sorted(["dataset=pascal", "fold=2", f"shot={s}", f"seed={e}", "model.proj_dim=64"]))
        for s, e in itertools.product((1, 5), (0, 1))
    }


def test_table2_layout_mean_std_over_seeds_missing_cells_and_the_papers_rows(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    params = {"ablation": "cgmgm", "fold": "0,1,2,3", "shot": "1,5", "seed": "0,1"}
    _sweep(sweep, params)
    values = {}  # (fold, shot, seed) -> mIoU; fold 3 and every 5-shot run never finished
    n = 0
    for fold, seed in itertools.product((0, 1, 2), (0, 1)):
        values[fold, seed] = 10.0 * fold + 3.0 * seed + 1.5
        ov = ["ablation=cgmgm", f"fold={fold}", "shot=1", f"seed={seed}"]
        _job(sweep, n, ov, {"test/mIoU": values[fold, seed], "test/FB-IoU": 50.0 + fold})
        n += 1
    text = tables.write_table("table2", [sweep])
    assert text in capsys.readouterr().out
    assert (sweep / "table2.md").read_text().strip() == text.strip()
    ours = _cells(text, "CGMGM (ours)")
    assert ours[1] == "efficientnet_lite0 on synthetic"
    for fold in (0, 1, 2):
        vals = [values[fold, 0], values[fold, 1]]
        assert ours[2 + fold] == f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
    assert ours[5] == "missing" and ours[6] == "missing (3/4 folds)"  # never a 0
    assert ours[7:11] == ["missing"] * 4 and ours[11] == "missing (0/4 folds)"
    paper = [r for r in text.splitlines() if r.startswith("| CGMGM (paper) | ResNet50 |")]
    assert paper and [float(c) for c in _cells(paper[0], "CGMGM (paper)")[2:7]] == (
        PAPER_T2_R50_1SHOT
    )
    assert "BAM† (paper) | VGG-16 | 63.18" in text
    # the missing jobs are listed: fold 3 (1-shot) and every 5-shot job, 2 seeds each
    assert "Missing (10 of the sweep's jobs have no finished run)" in text
    assert "- ablation=cgmgm fold=3 seed=0 shot=1" in text
    assert "ours: dataset synthetic" in text
    assert "protocol bam (1000 test episodes, test seed(s) 510)" in text
    # written again: the first file is kept; the same sweep given twice counts each job once
    assert tables.write_table("table2", [sweep, sweep]) == text
    assert (sweep / "table2.earlier-1.md").read_text().strip() == text.strip()


def test_table4_fold_mean_of_fb_iou_only_with_all_folds(tmp_path):
    sweep = tmp_path / "s"
    _sweep(sweep, {"ablation": "cgmgm", "fold": "0,1,2,3", "shot": "1,5", "seed": "0,1"})
    fb = {}
    n = 0
    for fold, shot, seed in itertools.product((0, 1, 2, 3), (1, 5), (0, 1)):
        if shot == 5 and fold == 2:
            continue  # 5-shot fold 2 is missing
        fb[fold, shot, seed] = 40.0 + fold + shot + 0.5 * seed
        ov = ["ablation=cgmgm", f"fold={fold}", f"shot={shot}", f"seed={seed}"]
        _job(sweep, n, ov, {"test/mIoU": 1.0, "test/FB-IoU": fb[fold, shot, seed]})
        n += 1
    text = tables.write_table("table4", [sweep])
    ours = _cells(text, "CGMGM (ours)")
    expect = statistics.mean(
        statistics.mean([fb[f, 1, 0], fb[f, 1, 1]]) for f in (0, 1, 2, 3)
    )  # the mean over folds of the seed means
    assert ours[2] == f"{expect:.2f}" and ours[3] == "missing (3/4 folds)"
    for row, (one, five) in PAPER_T4.items():
        cells = _cells(text, f"{'BAM†' if row == 'bam' else 'CGMGM'} (paper)")
        assert cells[2:4] == [f"{one:.2f}", f"{five:.2f}"]
    assert "Missing (2 of the sweep's jobs" in text


def test_a_job_without_stage_1_is_labelled_and_gets_no_paper_row(tmp_path):
    sweep = tmp_path / "s"
    _job(sweep, 0, ["fold=0", "shot=1", "seed=0"], {"test/mIoU": 5.0, "ensemble": False})
    text = tables.write_table("table2", [sweep])
    assert _cells(text, "CGMGM (no ensemble) (ours)")[2] == "5.00"


def test_count_flops_counts_a_convolution_by_its_formula():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.rand(2, 3, 10, 12)
    assert tables.count_flops(conv, x)["total"] == 2 * (2 * 10 * 12) * 8 * 3 * 3 * 3
    lin = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    counts = tables.count_flops(lin, torch.rand(4, 5))
    assert counts["total"] == 2 * 4 * (5 * 7 + 7 * 2) and counts["0"] == 2 * 4 * 5 * 7


def test_fig6_table_has_mIoU_and_flops_that_grow_with_m_and_full_covariance(tmp_path):
    sweep = tmp_path / "s"
    _sweep(sweep, {"model.gmm.components": "1,2,3,4,5", "model.gmm.covariance": "diag,full"})
    n = 0
    for m, cov in ((1, "diag"), (3, "diag"), (3, "full"), (6, "diag")):  # 6: COCO's M
        ov = [f"model.gmm.components={m}", f"model.gmm.covariance={cov}", "seed=0"]
        ov += ["dataset.dataset_kwargs.image_size=64", "backbone.weights=none"]
        _job(sweep, n, ov, {"test/mIoU": 10.0 * m + (cov == "full")})
        n += 1
    text = tables.write_table("fig6", [sweep])
    one, three = _cells(text, "1"), _cells(text, "3")
    assert one[1] == "10.00" and three[1:3] == ["30.00", "31.00"] and one[2] == "missing"
    assert _cells(text, "2")[1] == "missing" and _cells(text, "6")[1] == "60.00"
    gflops = {(m, c): float(_cells(text, str(m))[3 + (c == "full")]) for m, c in
              ((1, "diag"), (3, "diag"), (3, "full"))}  # fmt: skip
    assert gflops[1, "diag"] < gflops[3, "diag"] < gflops[3, "full"]
    gmm = {c: float(three[5 + (c == "full")]) for c in ("diag", "full")}
    assert 0 < gmm["diag"] < gmm["full"]
    assert (sweep / "fig6.png").stat().st_size > 0 and "64x64" in text


def test_dry_run_lists_the_jobs_and_the_stage_1_runs(capsys):
    jobs = tables.dry_run("table2", ["fold=0", "backbone=vgg16"], timing=False)
    out = capsys.readouterr().out
    assert len(jobs) == 2 * 3  # shots x seeds
    assert "6 jobs" in out and "stage 1: 3 distinct (3 to train" in out
    assert "backbone=vgg16 fold=0 shot=5 seed=2" in out
    assert "/pascal-fold0-vgg16-seed2-" in out  # the experiment's dataset, this job's stage 1


def test_collect_refuses_an_unknown_dir_and_overrides_with_collect(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        tables.main(["table2", "--collect", str(tmp_path / "nope")])
    with pytest.raises(SystemExit):
        tables.main(["table2", "fold=0", "--collect", str(tmp_path)])


def test_launch_runs_the_sweep_and_writes_the_table(tmp_path):
    """A real one-job Table 2 sweep on the tiny embedded benchmark (meta learner alone)."""
    sweep = tmp_path / "t2"
    tiny = [*TINY_DATA, "dataset.test_episodes=8", "model.proj_dim=32", "model.gmm.iters=3"]
    tiny += ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "base_ckpt=null"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cgmgm.tables", "table2", "dataset=synthetic",
         "backbone=efficientnet_lite0", "fold=0", "shot=1", "seed=0", f"hydra.sweep.dir={sweep}",
         *tiny],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (sweep / "table2.md").read_text()
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    ours = _cells(text, "CGMGM (no ensemble) (ours)")
    assert ours[2] == f"{metrics['test/mIoU']:.2f}" and ours[3] == "missing"
    assert "Missing" not in text  # the sweep asked for one job and it finished
    assert "(8 test episodes, test seed(s) 510)" in text  # what the number followed


def test_wandb_runs_make_the_same_table(tmp_path, monkeypatch):
    """--wandb reads jobs through cgmgm.wandb_runs (tested in test_wandb.py on real offline
    runs); the table of those jobs equals the table of the same jobs on disk."""
    from cgmgm import sweeps, wandb_runs

    sweep = tmp_path / "s"
    for n, seed in enumerate((0, 1)):
        ov = ["ablation=cgmgm", "fold=1", "shot=5", f"seed={seed}"]
        _job(sweep, n, ov, {"test/mIoU": 20.0 + seed, "test/FB-IoU": 50.0})
    seen = []
    monkeypatch.setattr(
        wandb_runs, "load_wandb_jobs", lambda source: seen.append(source) or sweeps.load_jobs(sweep)
    )
    monkeypatch.chdir(tmp_path)
    tables.main(["table2", "--wandb", "team/cgmgm:t2"])
    from_wandb = (tmp_path / "outputs" / "tables" / "table2.md").read_text()
    tables.main(["table2", "--collect", str(sweep)])
    assert seen == ["team/cgmgm:t2"] and from_wandb == (sweep / "table2.md").read_text()
    assert _cells(from_wandb, "CGMGM (ours)")[8] == f"20.50 ± {statistics.stdev([20, 21]):.2f}"


def test_a_wandb_sweeps_record_marks_its_unfinished_jobs_missing(tmp_path, monkeypatch):
    from cgmgm import sweeps, wandb_runs

    sweep = tmp_path / "s"
    ov = ["ablation=cgmgm", "fold=1", "shot=1", "seed=0"]
    _job(sweep, 0, ov, {"test/mIoU": 20.0, "test/FB-IoU": 50.0})
    record = {"dir": str(sweep), "job_num": 0, "params": {"fold": "1,2"},
              "task": ["ablation=cgmgm", "shot=1", "seed=0"]}  # fmt: skip
    jobs = sweeps.load_jobs(sweep)
    jobs[0]["config"]["sweep"] = record  # as cgmgm.loggers.run_config records it in W&B
    monkeypatch.setattr(wandb_runs, "load_wandb_jobs", lambda source: jobs)
    text = tables.write_table("table2", [], ["team/cgmgm"], tmp_path / "t.md")
    assert (
        "Missing (1 of the sweep's jobs" in text and "- fold=2 ablation=cgmgm shot=1 seed=0" in text
    )
