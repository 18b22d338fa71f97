"""A run's outputs: output-dir checks (a Hydra callback), logger factories (a CSV logger that
never deletes earlier logs, a Weights & Biases logger that never prompts or blocks), what a
W&B run holds besides the training curves, and job cleanup.

A W&B run of ``cgmgm.train`` / ``cgmgm.eval`` holds (:mod:`cgmgm.wandb_runs` reads it back):

- ``wandb.config``: the job's whole resolved Hydra config (:func:`log_run_config`), its
  command-line ``overrides`` (a list of strings) and ``sweep`` ({dir, job_num} in a multirun,
  else null); the LightningModule's hyper-parameters under ``module``;
- the summary: the job's ``metrics.json``, the same keys and values (:func:`log_final_metrics`),
  and under ``METRICS_KEYS_KEY`` the list of those keys;
- per-class IoU tables (``{stage}/per_class_IoU``, :func:`log_class_table`) and the episode
  figures and guidance maps as images (:class:`cgmgm.figures.EpisodeFigures`).

Importing this module registers the ``${cgmgm.pid:}`` resolver (the process id) that
conf/hydra/default.yaml puts in the default output dirs, so that runs started at the same
moment never share one.
"""

from __future__ import annotations

import functools
import json
import netrc
import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

__all__ = [
    "OutputDirCheck",
    "csv_logger",
    "finish_loggers",
    "is_wandb",
    "log_class_table",
    "log_final_metrics",
    "log_run_config",
    "run_config",
    "task_overrides",
    "wandb_api_key_configured",
    "wandb_logger",
    "wandb_mode",
    "wandb_unreachable",
]

OmegaConf.register_new_resolver("cgmgm.pid", lambda: os.getpid(), replace=True, use_cache=True)


def job_tasks(devices: Any) -> int:
    """Processes a cluster job runs (conf/hydra/launcher/): ``trainer.devices``, a count."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    raise ValueError(
        f"trainer.devices={devices!r} cannot size a cluster job: give the count, e.g. "
        "trainer=ddp trainer.devices=4 (one task per device)"
    )


def job_gpus(accelerator: Any, devices: Any) -> int:
    """GPUs a cluster job asks for: ``trainer.devices`` on a GPU trainer, none on the CPU one."""
    tasks = job_tasks(devices)
    return 0 if str(accelerator) == "cpu" else tasks


OmegaConf.register_new_resolver("cgmgm.job_tasks", job_tasks, replace=True)
OmegaConf.register_new_resolver("cgmgm.job_gpus", job_gpus, replace=True)


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        return path.expanduser().resolve().is_relative_to(folder.expanduser().resolve())
    except (OSError, RuntimeError):
        return False


def _has_files(folder: Path) -> bool:
    """True if ``folder`` exists and holds anything (OSError if it cannot be listed)."""
    if not folder.exists():
        return False
    return any(folder.iterdir())


class OutputDirCheck(Callback):
    """Hydra callback: every run gets an output dir of its own, checked before Hydra writes.

    - An output dir that cannot be created or written: one line naming it, exit status 1.
    - An existing non-empty output dir (``hydra.run.dir=`` / ``hydra.sweep.dir=`` of an
      earlier run) is refused, so that no run overwrites another's files; except a resume in
      place (``ckpt_path`` inside ``hydra.run.dir``, tasks ``resume_tasks``): Hydra then writes
      this run's config to ``.hydra-resume-<k>`` beside the earlier ``.hydra``.
    - The dir is claimed atomically (``mkdir`` of Hydra's output subdir; ``multirun.yaml`` of a
      sweep), so two runs started at once with the same explicit dir cannot both take it.
    """

    def __init__(self, resume_tasks: list[str] | tuple[str, ...] = ("train",)) -> None:
        self.resume_tasks = tuple(resume_tasks)

    @staticmethod
    def _fail(task: str, message: str) -> NoReturn:
        raise SystemExit(f"cgmgm.{task}: error: {message}")

    def _cannot_write(self, task: str, folder: Path, key: str, err: OSError) -> NoReturn:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(folder) else ""
        self._fail(
            task,
            f"cannot write the output dir {folder}: {err.strerror or type(err).__name__}"
            f"{where}; choose a writable one with {key}=<dir>",
        )

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            # a DDP child: Lightning re-runs the app into rank 0's (claimed, non-empty) dir
            return
        task = str(config.get("task_name", "run"))
        run_dir = Path(str(config.hydra.run.dir))
        subdir = config.hydra.output_subdir
        key = "hydra.run.dir"
        try:
            busy = _has_files(run_dir)
        except OSError as err:
            self._cannot_write(task, run_dir, key, err)
        if busy:
            try:
                ckpt = config.get("ckpt_path")
            except Exception:  # noqa: BLE001 - an interpolation only the job can resolve
                ckpt = None
            if task in self.resume_tasks and ckpt and _is_inside(Path(str(ckpt)), run_dir):
                self._resume_in_place(config, task, run_dir, subdir)
                return
            self._refuse(task, run_dir, key, resumable=task in self.resume_tasks)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if subdir is None:
                with tempfile.TemporaryFile(dir=run_dir):
                    pass
            else:  # the claim: only one process can create it
                (run_dir / str(subdir)).mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            self._refuse(task, run_dir, key, resumable=task in self.resume_tasks)
        except OSError as err:
            self._cannot_write(task, run_dir, key, err)

    def _refuse(self, task: str, folder: Path, key: str, resumable: bool) -> NoReturn:
        hint = (
            f", or resume that run in place with {key}={folder} "
            f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"
            if resumable and key == "hydra.run.dir"
            else ""
        )
        self._fail(
            task,
            f"the output dir {folder} already holds another run's files, which this run would "
            f"overwrite; leave {key} unset for a new dir of its own, or choose an empty one"
            f"{hint}",
        )

    def _resume_in_place(self, config: DictConfig, task: str, run_dir: Path, subdir: Any) -> None:
        if subdir is not None:
            for k in range(1, 10_000):
                name = f"{subdir}-resume-{k}"
                try:
                    (run_dir / name).mkdir(parents=True, exist_ok=False)
                except FileExistsError:
                    continue
                except OSError as err:
                    self._cannot_write(task, run_dir, "hydra.run.dir", err)
                break
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = name
        print(
            f"cgmgm.{task}: resuming in place in {run_dir}: earlier files are kept"
            + (f"; this run's config is in {name}/" if subdir is not None else ""),
            file=sys.stderr,
        )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = str(config.get("task_name", "run"))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        key = "hydra.sweep.dir"
        try:
            if _has_files(sweep_dir):
                self._refuse(task, sweep_dir, key, resumable=False)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            # the claim; the launcher writes the sweep's config into it
            (sweep_dir / "multirun.yaml").open("x").close()
        except FileExistsError:
            self._refuse(task, sweep_dir, key, resumable=False)
        except OSError as err:
            self._cannot_write(task, sweep_dir, key, err)


def csv_logger(save_dir: str, name: str = "csv", version: str = "", **kwargs: Any) -> Any:
    """A Lightning ``CSVLogger`` in ``save_dir/name/version`` that never deletes earlier logs.

    Lightning's CSV logger deletes the ``metrics.csv`` it finds in its dir; when that dir
    already holds logs (a run resumed in place), this run logs to ``<version>/resume-<k>``
    beside them instead.
    """
    from lightning.pytorch.loggers import CSVLogger

    base = Path(save_dir) / name
    chosen = version
    if _has_files(base / version):
        k = 1
        while _has_files(base / version / f"resume-{k}"):
            k += 1
        chosen = str(Path(version) / f"resume-{k}") if version else f"resume-{k}"
        print(
            f"csv logger: {base / version} holds earlier logs (kept); this run logs to "
            f"{base / chosen}",
            file=sys.stderr,
        )
    return CSVLogger(save_dir=save_dir, name=name, version=chosen, **kwargs)


WANDB_MODES = ("online", "offline", "disabled")


def wandb_api_key_configured() -> bool:
    """True if ``WANDB_API_KEY`` is set or ~/.netrc (or ``$NETRC``) holds the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str | None = None) -> str:
    """The W&B mode to run in: ``mode`` if given, else ``$WANDB_MODE``, else ``online`` when an
    API key is configured and ``offline`` otherwise. ``online`` without a key would prompt for
    one, so it falls back to ``offline`` with a warning."""
    mode = mode or os.environ.get("WANDB_MODE") or None
    if mode == "dryrun":
        mode = "offline"
    if mode is None:
        mode = "online" if wandb_api_key_configured() else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "online" and not wandb_api_key_configured():
        warnings.warn(
            "wandb: no API key (WANDB_API_KEY or `wandb login`); logging offline instead "
            "(upload later with `wandb sync`)",
            stacklevel=2,
        )
        mode = "offline"
    return mode


def wandb_unreachable(timeout: float = 5.0) -> str | None:
    """None if the W&B server (``$WANDB_BASE_URL``, or the ``$HTTPS_PROXY`` in between) accepts
    a TCP connection within ``timeout`` seconds, else why not."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if "://" in str(proxy) else f"http://{proxy}") if proxy else url
    host = target.hostname or "api.wandb.ai"
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except (OSError, ValueError) as err:
        return f"{host}: {err or type(err).__name__}"


# wandb.config keys beside the job's Hydra config (its top level): the command-line overrides,
# the multirun record and the LightningModule's hyper-parameters.
OVERRIDES_KEY = "overrides"
SWEEP_KEY = "sweep"
MODULE_KEY = "module"
RUN_KEYS = (OVERRIDES_KEY, SWEEP_KEY, MODULE_KEY)
# Summary key listing the keys of the job's metrics.json (also in the summary).
METRICS_KEYS_KEY = "cgmgm/metrics_keys"


def _make_wandb_logger_class() -> type:
    from lightning.fabric.utilities.logger import _convert_params
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    class CGMGMWandbLogger(WandbLogger):
        """Lightning's ``WandbLogger`` with the LightningModule's hyper-parameters under
        ``module`` in ``wandb.config``: its top level is the job's Hydra config
        (:func:`log_run_config`), which they would otherwise overwrite where names clash
        (``model``, ``backbone``: a checkpoint's, in cgmgm.eval)."""

        @rank_zero_only
        def log_hyperparams(self, params: Any) -> None:
            super().log_hyperparams({MODULE_KEY: dict(_convert_params(params))})

    CGMGMWandbLogger.__module__ = __name__
    CGMGMWandbLogger.__qualname__ = "CGMGMWandbLogger"  # pickle finds it by this name
    return CGMGMWandbLogger


_wandb_logger_class = functools.cache(_make_wandb_logger_class)


def __getattr__(name: str) -> Any:
    # CGMGMWandbLogger is built on first use: importing Lightning here would slow down every
    # Hydra start-up (this module holds the output-dir callback); pickle finds it here too.
    if name == "CGMGMWandbLogger":
        return _wandb_logger_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sweep_record() -> dict[str, Any] | None:
    """{dir, job_num, params, task} of the Hydra multirun this job belongs to (params and
    task: its sweeper params and command-line overrides, from its multirun.yaml), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    record = {"dir": str(Path(str(hc.sweep.dir)).resolve()), "job_num": int(hc.job.num)}
    # what the whole sweep asked for, so that a table read from W&B marks the jobs without a
    # finished run as missing (cgmgm.tables)
    record["params"], record["task"] = sweep_request(record["dir"])
    return record


def sweep_request(sweep_dir: str | Path) -> tuple[dict[str, str], list[str]]:
    """(sweeper params, command-line overrides) of the multirun in ``sweep_dir``, from its
    ``multirun.yaml`` (({}, []) when it has none): what Hydra expands into the sweep's jobs."""
    path = Path(sweep_dir) / "multirun.yaml"
    hydra = (OmegaConf.load(path).get("hydra") or {}) if path.is_file() else {}
    params = OmegaConf.select(hydra, "sweeper.params") if hydra else None
    task = OmegaConf.select(hydra, "overrides.task") if hydra else None
    return {str(k): str(v) for k, v in (params or {}).items()}, [str(o) for o in task or []]


def wandb_logger(
    mode: str | None = None,
    save_dir: str = ".",
    tags: list[str] | None = None,
    init_timeout: float = 60.0,
    connect_timeout: float = 5.0,
    group: str | None = None,
    **kwargs: Any,
) -> Any:
    """A Lightning ``WandbLogger`` (:class:`CGMGMWandbLogger`) in :func:`wandb_mode` ``mode``,
    with a bounded start-up.

    Online, the W&B server must answer within ``connect_timeout`` seconds (0: no check), else
    the run logs offline with a warning (upload later with ``wandb sync``), instead of
    waiting for ``wandb.init`` to time out and fail.

    ``group`` null: in a Hydra multirun, the sweep dir's name (every job of a sweep in one W&B
    group), else none. ``kwargs`` go to ``WandbLogger`` (project, entity, name, log_model, ...)
    and on to ``wandb.init``. Run files go to ``save_dir/wandb``.
    """
    import wandb

    mode = wandb_mode(mode)
    if mode == "online" and connect_timeout > 0:
        reason = wandb_unreachable(connect_timeout)
        if reason is not None:
            warnings.warn(
                f"wandb: cannot reach the W&B server ({reason}); logging offline instead "
                f"(upload later with `wandb sync {Path(save_dir) / 'wandb'}/offline-run-*`). "
                "Set WANDB_MODE=offline to log offline without this check",
                stacklevel=2,
            )
            mode = "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode != "online":
        kwargs["log_model"] = False  # nothing can be uploaded
    if group is None and (sweep := _sweep_record()) is not None:
        group = Path(sweep["dir"]).name
    settings = wandb.Settings(init_timeout=init_timeout, silent=True)
    logger = _wandb_logger_class()(
        save_dir=save_dir, mode=mode, tags=tags or None, group=group, settings=settings, **kwargs
    )
    init = getattr(logger, "_wandb_init", {})
    if init.get("anonymous") is None:  # wandb >= 0.19 warns on any value of this retired option
        init.pop("anonymous", None)
    return logger


def is_wandb(logger: Any) -> bool:
    """Whether ``logger`` is a Lightning ``WandbLogger`` (without importing W&B otherwise)."""
    return any(c.__name__ == "WandbLogger" for c in type(logger).__mro__)


def _wandb_loggers(loggers: Any) -> list[Any]:
    """The W&B loggers among ``loggers``, on global rank 0 only (elsewhere their experiment is
    a stand-in without config or summary)."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return []
    return [lg for lg in loggers or [] if is_wandb(lg)]


def task_overrides(cfg: Any) -> list[str]:
    """The job's command-line overrides (Hydra's ``overrides.task``; [] outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if "hydra" in cfg:  # compose(..., return_hydra_config=True)
        return [str(o) for o in cfg.hydra.overrides.task]
    if HydraConfig.initialized():
        return [str(o) for o in HydraConfig.get().overrides.task]
    return []


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """What a W&B run's config holds: the job's resolved Hydra config (without the ``hydra``
    node) plus ``overrides`` (the command-line overrides, as given) and ``sweep`` ({dir,
    job_num} in a multirun, else None)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    clash = [k for k in RUN_KEYS if k in plain]
    if clash:
        raise ValueError(
            f"the config has top-level keys {clash}, which wandb.config keeps for the run's "
            f"record ({', '.join(RUN_KEYS)}): rename them in the config files under conf/"
        )
    plain[OVERRIDES_KEY] = task_overrides(cfg)
    plain[SWEEP_KEY] = _sweep_record()
    return plain


def log_run_config(loggers: Any, cfg: DictConfig) -> None:
    """Put :func:`run_config` into ``wandb.config`` of every W&B logger among ``loggers``
    (others are left alone)."""
    for logger in _wandb_loggers(loggers):
        logger.experiment.config.update(run_config(cfg), allow_val_change=True)


def log_final_metrics(loggers: Any, metrics_path: str | Path) -> None:
    """The job's ``metrics.json`` (read back from ``metrics_path``, so exactly what is on disk:
    same keys, percent, NaN as null) into the summary of every W&B logger among ``loggers``,
    with the list of its keys under ``METRICS_KEYS_KEY``."""
    runs = _wandb_loggers(loggers)
    if not runs:
        return
    metrics = json.loads(Path(metrics_path).read_text())
    if METRICS_KEYS_KEY in metrics:
        raise ValueError(f"{metrics_path} holds the reserved key {METRICS_KEYS_KEY!r}")
    for logger in runs:
        logger.experiment.summary.update({**metrics, METRICS_KEYS_KEY: list(metrics)})


def log_class_table(
    loggers: Any, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None
) -> None:
    """A table (``columns``, ``rows``) to every logger among ``loggers`` with a ``log_table``
    (W&B); loggers without one (CSV) are left alone."""
    for logger in loggers or []:
        if callable(getattr(logger, "log_table", None)):
            logger.log_table(key=key, columns=columns, data=rows, step=step)


def finish_loggers(failed: bool = False) -> None:
    """End this job's W&B run, if one is active (call at the end of every job, so that
    multirun jobs each get their own run)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
