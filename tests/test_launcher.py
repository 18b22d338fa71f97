"""Sweeps through submitit (hydra-submitit-launcher): ``hydra/launcher=slurm`` composes with the
Table 2 sweep and sizes a job from its trainer, the sbatch script it writes (a stand-in
``sbatch`` keeps it), and a real two-job sweep through submitit's local executor
(``hydra/launcher=local``) with ``experiment=table5``'s end-of-sweep table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

import cgmgm.loggers  # noqa: F401 - registers ${cgmgm.pid:}, used by hydra.sweep.dir
from _model_helpers import TINY_DATA
from cgmgm.config import config_dir

TINY = [
    *TINY_DATA,
    "dataset.test_episodes=8",
    "model.proj_dim=32",
    "model.gmm.iters=3",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "base_ckpt=null",  # the meta learner alone: no stage 1
]
# Table 2's sweep (conf/experiment/table2.yaml) spelt out on the command line
TABLE2 = {"fold": "0,1,2,3", "shot": "1,5", "seed": "0,1,2", "backbone": "resnet50_psp,vgg16"}
TABLE2_SWEEP = ["dataset=pascal", "ablation=cgmgm", *(f"{k}={v}" for k, v in TABLE2.items())]


def _target(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _compose(overrides: list[str]):
    """``cgmgm.train -m <overrides>``'s config with its ``hydra`` node: the sweep's config in
    the launching process (hydra.compose composes a single run: it refuses sweeps)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        return hydra.compose_config("train", overrides, run_mode=RunMode.MULTIRUN)


def _launcher(overrides: list[str]) -> tuple[dict, dict]:
    """(resolved ``hydra`` node, unresolved config) of ``cgmgm.train hydra/launcher=slurm
    <overrides>``."""
    cfg = _compose(["hydra/launcher=slurm", *overrides])
    return _hydra(cfg), OmegaConf.to_container(cfg, resolve=False)


def _hydra(cfg) -> dict:
    """The resolved launcher, sweep dir, sweeper params and overrides of ``cfg.hydra``."""
    h = cfg.hydra
    return {
        "launcher": OmegaConf.to_container(h.launcher, resolve=True),
        "sweep": {"dir": str(h.sweep.dir)},
        "sweeper": {"params": OmegaConf.to_container(h.sweeper, resolve=True).get("params")},
        "overrides": OmegaConf.to_container(h.overrides, resolve=True),
    }


def _sweep_params(hydra: dict) -> dict[str, str]:
    """The sweep's {key: "a,b,..."}: the experiment's params, then the command line's."""
    params = {k: str(v) for k, v in (hydra["sweeper"]["params"] or {}).items()}
    for item in hydra["overrides"]["task"]:
        key, _, value = item.partition("=")
        params[key] = value
    return params


@pytest.mark.parametrize("how", ["overrides", "experiment"])
@pytest.mark.parametrize(
    ("trainer", "devices"), [(["trainer=gpu"], 1), (["trainer=ddp", "trainer.devices=4"], 4)]
)
def test_slurm_launcher_composes_with_the_table2_sweep(how, trainer, devices):
    sweep = TABLE2_SWEEP if how == "overrides" else ["experiment=table2"]
    hydra, cfg = _launcher([*sweep, *trainer])
    launcher = hydra["launcher"]
    assert launcher["_target_"] == _target(SlurmLauncher)
    params = _sweep_params(hydra)
    for key, values in TABLE2.items():
        assert sorted(params[key].split(",")) == sorted(values.split(",")), key
    jobs = math.prod(len(v.split(",")) for v in params.values())
    assert jobs == 4 * 2 * 3 * 2
    assert cfg["dataset"]["dataset"] == "pascal" and cfg["paper"]["row"] == "cgmgm"
    # a job's resources follow its trainer: one task per GPU (Lightning's DDP under srun)
    assert cfg["trainer"]["devices"] == devices
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == devices
    assert launcher["nodes"] == 1
    assert launcher["partition"] is None  # the cluster's default
    assert launcher["max_num_timeout"] == 0  # a resubmitted job would start again in its dir
    assert launcher["array_parallelism"] >= 1 and launcher["timeout_min"] > 0
    # submitit's logs live in the sweep dir, resolved once with it
    assert launcher["submitit_folder"] == f"{hydra['sweep']['dir']}/.submitit/%j"


def test_users_settings_win():
    """The README's Table 2 command with a user's sbatch settings."""
    hydra, cfg = _launcher(
        [
            "experiment=table2",
            "trainer=gpu",
            "dataset=pascal",
            "dataset.root=/data/pascal",
            "hydra.launcher.partition=x",
            "hydra.launcher.account=acc",
            "hydra.launcher.qos=high",
            "hydra.launcher.timeout_min=30",
            "+hydra.launcher.additional_parameters.mail-type=END",
            "hydra.launcher.setup=[module load cuda,source .venv/bin/activate]",
        ]
    )
    assert cfg["dataset"]["root"] == "/data/pascal"
    launcher = hydra["launcher"]
    assert (launcher["partition"], launcher["account"], launcher["qos"]) == ("x", "acc", "high")
    assert launcher["timeout_min"] == 30
    assert launcher["additional_parameters"] == {"mail-type": "END"}
    assert launcher["setup"] == ["module load cuda", "source .venv/bin/activate"]


def test_local_launcher_is_submitits_local_executor():
    cfg = _compose(["hydra/launcher=local"])
    hydra = _hydra(cfg)
    assert hydra["launcher"]["_target_"] == _target(LocalLauncher)
    assert hydra["launcher"]["submitit_folder"] == f"{hydra['sweep']['dir']}/.submitit/%j"
    assert hydra["launcher"]["gpus_per_node"] == 0  # the default trainer is the CPU one


def _fake_slurm(bin_dir: Path) -> None:
    """``srun`` (submitit looks for it) and an ``sbatch`` that keeps the script and fails."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "sbatch: a test stand-in" >&2\nexit 1\n'
    )
    for name in ("srun", "sbatch"):
        (bin_dir / name).chmod(0o755)


def test_slurm_sweep_writes_the_sbatch_script(tmp_path):
    _fake_slurm(tmp_path / "bin")
    script, sweep = tmp_path / "job.sh", tmp_path / "sweep"
    env = {**os.environ, "SBATCH_COPY": str(script), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    overrides = [
        "fold=0,1,2",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=2",
        "hydra.launcher.partition=gpuq",
        "hydra.launcher.account=acc",
        "+hydra.launcher.additional_parameters.mail-type=END",
        f"hydra.sweep.dir={sweep}",
        *TINY,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "cgmgm.train", "-m", *overrides],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "sbatch: a test stand-in" in proc.stderr, proc.stderr[-3000:]
    lines = set(script.read_text().splitlines())
    launcher = yaml.safe_load((config_dir() / "hydra" / "launcher" / "slurm.yaml").read_text())
    jobs = 3
    expected = {
        "--partition=gpuq",
        "--account=acc",
        "--mail-type=END",
        "--nodes=1",
        "--ntasks-per-node=2",  # trainer.devices
        "--gpus-per-node=2",
        f"--cpus-per-task={launcher['cpus_per_task']}",
        f"--mem={launcher['mem_gb']}GB",
        f"--time={launcher['timeout_min']}",
        f"--array=0-{jobs - 1}%{min(jobs, launcher['array_parallelism'])}",
        "--job-name=train",
        f"--output={sweep}/.submitit/%A_%a/%A_%a_0_log.out",
    }
    assert {f"#SBATCH {flag}" for flag in expected} <= lines
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].endswith(f"-m submitit.core._submit {sweep}/.submitit/%j")
    assert (sweep / "multirun.yaml").is_file()  # the sweep dir was claimed before submitting


def test_two_job_sweep_through_submitits_local_executor(tmp_path):
    """experiment=table5 cut to one row x seeds 0, 1: each job in a process of its own, in the
    one sweep dir the launching process made (its ${now:} and ${cgmgm.pid:} resolved there),
    then that process's table over both jobs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = [
        "experiment=table5",
        "dataset=synthetic",
        "backbone=efficientnet_lite0",
        "ablation=cgmgm",
        "seed=0,1",
        "hydra/launcher=local",
        *TINY,
    ]
    # its own process group: submitit's job processes outlive the launcher, end them all
    proc = subprocess.Popen(
        [sys.executable, "-m", "cgmgm.train", *overrides],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    sweeps = list((tmp_path / "multirun" / "table5").iterdir())
    assert len(sweeps) == 1, f"the jobs wrote outside the sweep dir: {sorted(sweeps)}"
    sweep = sweeps[0]
    pid = sweep.name.rsplit("_", 1)[1]
    metrics, job_ids = [], set()
    for num, seed in ((0, 0), (1, 1)):
        job = sweep / str(num)
        metrics.append(json.loads((job / "metrics.json").read_text()))
        assert metrics[-1]["seed"] == seed
        assert f"seed={seed}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra["job"]["num"] == num
        job_ids.add(str(hydra["job"]["id"]))  # submitit's job id: the job's process
    assert len(job_ids) == 2 and pid not in job_ids  # two processes, not the launching one
    for job_id in job_ids:  # submitit's logs and results of each job
        logs = sweep / ".submitit" / job_id
        for name in ("submitted.pkl", "0_result.pkl", "0_log.out", "0_log.err"):
            assert (logs / f"{job_id}_{name}").is_file(), name
    # the end-of-sweep table (cgmgm.sweeps.PaperTable) in the launching process: both jobs
    values = [m["test/GmIoU"] for m in metrics]
    assert values[0] != values[1]  # the seeds trained different models
    cell = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert cell in (sweep / "table5.md").read_text()


def test_a_job_is_sized_by_its_trainer_and_a_device_count_is_required():
    hydra, _ = _launcher(["seed=0,1"])  # the default CPU trainer: one task, no GPU
    assert (hydra["launcher"]["tasks_per_node"], hydra["launcher"]["gpus_per_node"]) == (1, 0)
    with pytest.raises(Exception, match=r"trainer.devices=-1 cannot size a cluster job"):
        _launcher(["seed=0,1", "trainer=ddp"])  # devices -1: "all visible GPUs"
