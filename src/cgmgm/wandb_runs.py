"""Jobs of ``cgmgm.train`` / ``cgmgm.eval`` read back from Weights & Biases, in the format of
:func:`cgmgm.sweeps.load_jobs`, so that a table from W&B equals the table from disk.

    load_wandb_jobs("multirun/table5")         # W&B run folders under a dir (offline or not)
    load_wandb_jobs("my-team/cgmgm:table5")    # runs of a W&B project (group table5) online

A local source is searched recursively for run folders (``wandb/offline-run-*`` or
``wandb/run-*``); each one's ``run-<id>.wandb`` file (the run's record log, which W&B writes
offline and online alike) holds its config and summary, read by :func:`read_run_file`.
A W&B path ``entity/project`` (``:group`` to keep one group: by default a multirun's sweep-dir
name, :func:`cgmgm.loggers.wandb_logger`) is read through ``wandb.Api().runs``; it needs an API
key (``wandb login``) and never prompts.

What :mod:`cgmgm.loggers` puts into a run: the job's resolved Hydra config at the top level of
``wandb.config`` with ``overrides`` and ``sweep`` beside it, and ``metrics.json`` in the
summary with the list of its keys. A job's ``config`` here is that resolved config (the
``.hydra/config.yaml`` on disk keeps interpolations such as ``${paths.output_dir}``), its
``dir`` the output dir the job wrote (``paths.output_dir``), as :func:`load_jobs` gives it.

Runs that are not such jobs (stage 1 of ``cgmgm.train``, ``cgmgm.train_base``, other
programs) are left out with a warning naming them; so is a job's run without metrics (failed,
interrupted, still running: :mod:`cgmgm.tables` lists it as missing from the sweep's record in
the other jobs' ``sweep``), and, when another run of the same output dir (a resume in place)
has metrics, any earlier run of that dir (the latest one is what the dir's metrics.json
holds).
"""

from __future__ import annotations

import json
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cgmgm.loggers import METRICS_KEYS_KEY, OVERRIDES_KEY, RUN_KEYS, wandb_api_key_configured
from cgmgm.sweeps import _parse_overrides

__all__ = ["load_wandb_jobs", "read_run_file"]

# The run file (``run-<id>.wandb``): a 7-byte file header (":W&B", magic 0xBEE1, version 0),
# then blocks of 32 KiB holding chunks of serialized ``wandb_internal_pb2.Record`` messages, each
# chunk with a 7-byte header (CRC-32 of its type byte and data, data length, type).
_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT, _FILE_MAGIC = b":W&B", 0xBEE1
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4

# W&B path "entity/project" or "entity/project:group".
_WANDB_PATH = re.compile(r"^(?P<entity>[^/:\s]+)/(?P<project>[^/:\s]+)(?::(?P<group>.+))?$")
API_TIMEOUT_S = 60  # seconds a W&B API call may take
JOB_TASKS = ("train", "eval")  # the apps whose runs are jobs (task_name of their configs)


def _records(path: Path) -> Iterator[bytes]:
    """The serialized records of a run file, in order; a damaged file is an error naming it
    (a run still being written may end in a partial record, which is left out)."""
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: not a W&B run file (too short)")
    ident, magic, _version = _FILE_HEADER.unpack_from(data)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = _FILE_HEADER.size, None
    while pos + _CHUNK_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # a block's tail too short for a header: padding
            pos += left
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        pos = start + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        if len(chunk) < length:  # the run is still writing (or was killed) mid-record
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: damaged W&B run file (checksum mismatch at byte {pos})")
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                yield pending
                pending = None
        else:
            raise ValueError(f"{path}: damaged W&B run file (chunk type {kind} at byte {pos})")


def _apply(target: dict[str, Any], items: Any, remove: Any = ()) -> None:
    """Config / summary updates (``key`` or the path ``nested_key``, ``value_json``) onto
    ``target``, then removals."""
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    for item in remove:
        path = list(item.nested_key) or [item.key]
        node = target
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)


def read_run_file(path: str | Path) -> dict[str, Any]:
    """A run file's ``config`` and ``summary`` (plain dicts, as the run left them) and its
    ``id``, ``project``, ``entity``, ``group``, ``name`` and ``start_time`` (seconds)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    out: dict[str, Any] = {"config": {}, "summary": {}, "path": path}
    for data in _records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                id=run.run_id,
                project=run.project,
                entity=run.entity,
                group=run.run_group,
                name=run.display_name or run.run_id,
                start_time=run.start_time.seconds + run.start_time.nanos * 1e-9,
            )
            _apply(out["config"], run.config.update, run.config.remove)
            _apply(out["summary"], run.summary.update, run.summary.remove)
        elif kind == "config":
            _apply(out["config"], record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(out["summary"], record.summary.update, record.summary.remove)
    if "id" not in out:
        raise ValueError(f"{path}: a W&B run file without its run record")
    return out


def _local_runs(root: Path) -> list[dict[str, Any]]:
    """Every W&B run folder under ``root`` (its run file read)."""
    files = sorted({p.resolve() for p in root.rglob("run-*.wandb") if p.is_file()})
    runs = []
    for f in files:
        run = read_run_file(f)
        run["where"] = str(f.parent)
        runs.append(run)
    if not runs:
        raise FileNotFoundError(
            f"no W&B run under {root} (looked for */wandb/*run-*/run-<id>.wandb): run the jobs "
            "with logger=wandb, or pass a W&B path entity/project[:group]"
        )
    return runs


def _summary_dict(summary: Any) -> dict[str, Any]:
    raw = getattr(summary, "_json_dict", None)  # the public API's summary: its plain JSON
    return dict(raw if isinstance(raw, dict) else summary)


def _api_runs(source: str, api: Any) -> list[dict[str, Any]]:
    """The runs of a W&B path ``entity/project[:group]`` through ``api`` (``wandb.Api()``)."""
    m = _WANDB_PATH.match(source)
    assert m is not None
    if api is None:
        if not wandb_api_key_configured():
            raise RuntimeError(
                f"reading {source} from W&B needs an API key (`wandb login` or WANDB_API_KEY); "
                "or pass a local dir holding the runs' wandb/ folders"
            )
        import wandb

        api = wandb.Api(timeout=API_TIMEOUT_S)
    path = f"{m['entity']}/{m['project']}"
    filters = {"group": m["group"]} if m["group"] else None
    runs = []
    for run in api.runs(path, filters=filters, lazy=False):
        runs.append(
            {
                "config": dict(run.config),
                "summary": _summary_dict(run.summary),
                "id": str(run.id),
                "name": str(getattr(run, "name", None) or run.id),
                "group": getattr(run, "group", None),
                "start_time": str(getattr(run, "created_at", "") or ""),
                "where": f"{path}/{run.id}",
            }
        )
    if not runs:
        raise LookupError(
            f"no run in the W&B project {path}"
            + (f" with group {m['group']!r}" if m["group"] else "")
        )
    return runs


def _label(run: dict[str, Any]) -> str:
    return f"W&B run {run['name']} ({run['where']})"


def _job(run: dict[str, Any]) -> dict[str, Any]:
    """A run -> a :func:`cgmgm.sweeps.load_jobs` job (its metrics None when it has none)."""
    config = {k: v for k, v in run["config"].items() if k not in RUN_KEYS and k != "_wandb"}
    output_dir = (config.get("paths") or {}).get("output_dir")
    if not output_dir:
        raise ValueError(f"{_label(run)}: its config has no paths.output_dir")
    summary = run["summary"]
    keys = summary.get(METRICS_KEYS_KEY)
    metrics = None
    if keys is not None:
        missing = [k for k in keys if k not in summary]
        if missing:
            raise ValueError(f"{_label(run)}: its summary lacks metrics {missing[:5]}")
        metrics = {k: summary[k] for k in keys}
    return {
        "dir": Path(str(output_dir)),
        "overrides": _parse_overrides(run["config"][OVERRIDES_KEY] or []),
        "config": config,
        "metrics": metrics,
    }


def _sort_key(job: dict[str, Any]) -> tuple:
    name = job["dir"].name  # as load_jobs: by job number, then by name
    first = (0, int(name), "") if name.isdigit() else (1, 0, name)
    return (*first, str(job["dir"]))


def load_wandb_jobs(source: str | Path, api: Any = None) -> list[dict[str, Any]]:
    """The jobs logged to W&B under ``source``, as :func:`cgmgm.sweeps.load_jobs` gives them
    (dicts with ``dir``, ``overrides`` {key: value}, ``config``, ``metrics``), sorted by job
    number, then by output dir.

    ``source``: a dir holding W&B run folders (searched recursively), or a W&B path
    ``entity/project`` or ``entity/project:group`` read through ``api`` (default
    ``wandb.Api()``; anything with ``runs(path, filters=..., lazy=...)`` yielding runs with
    ``config``, ``summary``, ``id``, ``name``, ``group``, ``created_at``).
    """
    text = str(source)
    if Path(text).expanduser().is_dir():
        runs = _local_runs(Path(text).expanduser())
    elif _WANDB_PATH.match(text):
        runs = _api_runs(text, api)
    else:
        raise FileNotFoundError(f"{text} is neither a dir nor a W&B path entity/project[:group]")
    ours, others = [], []
    for run in runs:
        config = run["config"]
        is_job = OVERRIDES_KEY in config and config.get("task_name") in JOB_TASKS
        (ours if is_job else others).append(run)
    if others:
        warnings.warn(
            f"{len(others)} W&B run(s) under {text} are not jobs of cgmgm.train / cgmgm.eval "
            f"(e.g. stage 1), left out: {', '.join(_label(r) for r in others)}",
            stacklevel=2,
        )
    by_dir: dict[Path, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for run in ours:
        job = _job(run)
        by_dir.setdefault(job["dir"], []).append((run, job))
    jobs = []
    for folder, pairs in by_dir.items():
        done = sorted(
            (p for p in pairs if p[1]["metrics"] is not None), key=lambda p: p[0]["start_time"]
        )
        if not done:  # a table lists it as missing (cgmgm.tables: its sweep's record)
            warnings.warn(
                f"{_label(pairs[-1][0])} (job {folder}) has no final metrics in its summary: "
                "the job failed, was interrupted or is still running (a finished cgmgm.train / "
                "cgmgm.eval job with logger=wandb puts its metrics.json there); left out",
                stacklevel=2,
            )
            continue
        left = [r for r, _ in pairs if r is not done[-1][0]]
        if left:
            warnings.warn(
                f"job {folder} has {len(pairs)} W&B runs (resumed in place?): using the "
                f"latest finished one, {_label(done[-1][0])}; left out: "
                f"{', '.join(_label(r) for r in left)}",
                stacklevel=2,
            )
        jobs.append(done[-1][1])
    if not jobs:
        raise LookupError(f"no job of cgmgm.train / cgmgm.eval among the W&B runs under {text}")
    jobs.sort(key=_sort_key)
    return jobs
