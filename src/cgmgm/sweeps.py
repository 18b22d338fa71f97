"""Hydra sweeps -> tables: each job's ``metrics.json`` and config, mean ± std over seeds, and
the layouts of the paper's Tables 1 and 5 (the others, the command and the rest: cgmgm.tables).

The table experiments (``experiment=table5`` ...) attach :class:`PaperTable` as a Hydra
callback: when the multirun ends it reads every job of the sweep directory and prints and
writes ``table5.md`` there (an earlier one is kept as ``table5.earlier-<k>.md``) through
:mod:`cgmgm.tables`, whose ``--collect`` prints it again (e.g. for a sweep that was interrupted
and resumed by hand).

A row's paper number comes from the job's ``paper`` node (the ``ablation=`` config that names
the row); it is shown only when the job ran the paper's system for that row (its ``img``,
``imr``, exactly its guidance maps, and BAM's ensemble), so a user's override or a run without
stage 1 never borrows the paper's number ("(not the row)"). Jobs of one row are averaged over
seeds; any other override that varies (e.g. ``fold``) makes rows of its own, labelled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.experimental.callback import Callback

METRICS = ("test/mIoU", "test/FB-IoU", "test/GmIoU")


def _value(text: str) -> Any:
    """An override's value as int / float when it parses, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = _value(value)
    return out


def _select(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job under ``sweep_dir`` with a metrics.json, sorted by job number: dicts with
    ``dir``, ``overrides`` ({key: value}), ``config`` (.hydra/config.yaml) and ``metrics``."""
    jobs = []
    for metrics_path in sorted(Path(sweep_dir).glob("*/metrics.json")):
        job = metrics_path.parent
        hydra_dir = job / ".hydra"
        overrides = []
        if (hydra_dir / "overrides.yaml").is_file():
            overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
        config = {}
        if (hydra_dir / "config.yaml").is_file():
            config = yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {}
        jobs.append(
            {
                "dir": job,
                "overrides": _parse_overrides(overrides),
                "config": config,
                "metrics": json.loads(metrics_path.read_text()),
            }
        )
    jobs.sort(
        key=lambda j: (
            (0, int(j["dir"].name), "") if j["dir"].name.isdigit() else (1, 0, j["dir"].name)
        )
    )
    if not jobs:
        raise FileNotFoundError(f"no <job>/metrics.json under {sweep_dir}")
    return jobs


def job_value(job: dict[str, Any], key: str) -> Any:
    """``key`` from the job's overrides, else from its composed config."""
    if key in job["overrides"]:
        return job["overrides"][key]
    return _select(job["config"], key)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.2f}"
    return "-" if v is None else str(v)


def mean_std(
    jobs: Sequence[dict[str, Any]], metrics: Sequence[str]
) -> dict[str, tuple[float, float]]:
    """{metric: (mean, sample std)} over the jobs that have it (std 0 for one job; NaN mean for
    none)."""
    out = {}
    for m in metrics:
        vals = np.array([float(j["metrics"][m]) for j in jobs if j["metrics"].get(m) is not None])
        out[m] = (
            float(vals.mean()) if len(vals) else math.nan,
            float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        )
    return out


def aggregate(
    jobs: list[dict[str, Any]], over: str, metrics: Sequence[str] = METRICS
) -> list[dict[str, Any]]:
    """Group the jobs that differ only in ``over``; each group -> a row dict with ``key``
    ({override: value} of the group), ``n`` and, per metric, ``mean`` and ``std`` (sample std;
    0 for one job; NaN when no job has it)."""
    keys = []
    for job in jobs:
        keys += [k for k in job["overrides"] if k not in keys and k != over]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault(tuple(repr(job_value(job, k)) for k in keys), []).append(job)
    rows = []
    for members in groups.values():
        row: dict[str, Any] = {"key": {k: job_value(members[0], k) for k in keys}}
        row["n"] = len(members)
        row.update(mean_std(members, metrics))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------- paper tables


def _ran_row(job: dict[str, Any]) -> bool:
    """Whether the job ran the paper's system for its ``paper`` node's Table 5 row: that row's
    img / imr and exactly its guidance ([posterior] with C&Q, else [initial_mask] with IMG, else
    [cosine]), with BAM's ensemble (a stage-1 base learner)."""
    t5 = _select(job["config"], "paper.table5") or {}
    model = job["config"].get("model") or {}
    expected = ["posterior"] if t5.get("cq") else ["initial_mask"] if t5.get("img") else ["cosine"]
    return (
        bool(t5)
        and (model.get("img"), model.get("imr")) == (t5.get("img"), t5.get("imr"))
        and list(model.get("guidance") or []) == expected
        and _had_ensemble(job["metrics"])
    )


def _had_ensemble(metrics: dict[str, Any]) -> bool:
    """Whether the run had BAM's ensemble: its record, or (runs from before the record) the meta
    learner's own scores, which only an ensemble run reports."""
    return bool(metrics.get("ensemble", "test/meta/mIoU" in metrics))


def _cell(mean_std: tuple[float, float], n: int) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _rows(jobs: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Jobs grouped by paper row (mean ± std over the rest: the seeds), in the paper's order."""
    others = []  # overrides besides the row and the seed: a row per value (e.g. per fold)
    for job in jobs:
        others += [k for k in job["overrides"] if k not in (*others, "seed", "ablation")]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        row = _select(job["config"], "paper.row")
        if row is None:
            raise ValueError(
                f"{job['dir']}: the job names no paper row (run it with ablation=<row>, e.g. "
                "experiment=table5)"
            )
        varying = tuple(f"{k}={job_value(job, k)}" for k in others)
        groups.setdefault((str(row), varying), []).append(job)
    shown = [k for k in others if len({repr(job_value(j, k)) for j in jobs}) > 1]
    out = []
    for (name, varying), members in groups.items():
        label = ", ".join(v for v in varying if v.split("=", 1)[0] in shown)
        r: dict[str, Any] = {"row": name, "n": len(members), "jobs": members, "label": label}
        r["paper"] = _select(members[0]["config"], "paper")
        r["ran_row"] = all(_ran_row(j) for j in members)
        r["seeds"] = [job_value(j, "seed") for j in members]
        r.update(mean_std(members, metrics))
        out.append(r)
    out.sort(key=lambda r: (r["label"], (r["paper"].get("table5") or {}).get("order", 99)))
    return out


def _mark(flag: Any) -> str:
    return "✓" if flag else ""


TABLE5_METRICS = (
    "test/mIoU",
    "test/meta/mIoU",
    "test/FB-IoU",
    "test/GmIoU",
    "test/GmIoU/cosine",
    "test/GmIoU/initial_mask",
    "test/GmIoU/posterior",
)


def table5(jobs: list[dict[str, Any]]) -> str:
    """Table 5's layout (IMG | IMR | C&Q | mIoU) with the paper's mIoU beside ours (final =
    BAM's ensemble, meta = the meta learner alone), FB-IoU and each guidance map's GmIoU."""
    rows = _rows(jobs, TABLE5_METRICS)
    header = [
        "IMG", "IMR", "C&Q", "paper mIoU", "ours mIoU (final)", "meta mIoU", "FB-IoU",
        "GmIoU (guidance)", "GmIoU cosine", "GmIoU M_q", "GmIoU posterior", "n",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        t5, n = r["paper"].get("table5") or {}, r["n"]
        paper = f"{t5['mIoU']:.2f}" if r["ran_row"] and "mIoU" in t5 else "(not the row)"
        cfg = r["jobs"][0]["config"]["model"]
        cells = [_mark(cfg["img"]), _mark(cfg["imr"]), _mark("posterior" in cfg["guidance"])]
        cells[0] = f"{r['label']}: {cells[0]}" if r["label"] else cells[0]
        cells += [paper] + [_cell(r[m], n) for m in TABLE5_METRICS] + [str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table1(jobs: list[dict[str, Any]]) -> str:
    """Table 1's layout (guidance method | GmIoU | FmIoU), the paper's beside ours."""
    metrics = ("test/GmIoU", "test/mIoU")
    rows = [r for r in _rows(jobs, metrics) if r["paper"].get("table1")]
    header = ["guidance", "paper GmIoU", "paper FmIoU", "ours GmIoU", "ours FmIoU", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        t1, n = r["paper"]["table1"], r["n"]
        paper = [f"{t1['GmIoU']:.2f}", f"{t1['FmIoU']:.2f}"] if r["ran_row"] else ["-", "-"]
        name = t1["guidance"] + ("" if r["ran_row"] else " (not the row)")
        name = f"{r['label']}: {name}" if r["label"] else name
        cells = [name, *paper, *(_cell(r[m], n) for m in metrics), str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class PaperTable(Callback):
    """Hydra callback: at the end of a multirun, the paper's table ``table`` (a name of
    :data:`cgmgm.tables.TABLES`, e.g. ``table5``) of its jobs, printed and written to
    ``<sweep dir>/<table>.md``."""

    def __init__(self, table: str) -> None:
        from cgmgm.tables import TABLES

        if str(table) not in TABLES:
            raise ValueError(f"PaperTable: table must be one of {list(TABLES)}, got {table!r}")
        self.table = str(table)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from cgmgm.tables import write_table

        write_table(self.table, [Path(config.hydra.sweep.dir)])
