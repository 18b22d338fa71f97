"""A Hydra multirun directory -> a markdown table and the Fig. 6 plot.

Each job directory of the sweep holds ``metrics.json`` (written by ``cgmgm.train`` /
``cgmgm.eval``) and ``.hydra/overrides.yaml``. The table has one row per job: the overrides
that vary across jobs, then the metrics. The plot draws ``--metric`` against ``--x`` with one
line per value of ``--line`` (default: mIoU against M, one line per covariance type).

    python -m cgmgm.train -m model.gmm.components=1,2,3 model.gmm.covariance=diag,full
    python experiments/sweep_table.py multirun/train/<date_time>

With ``--over seed`` (any override key), jobs that differ only in that key become one row of
``mean ± std`` (sample standard deviation) over them, with the count ``n``:

    python -m cgmgm.train -m seed=0,1,2 model.guidance=gmm,cosine
    python experiments/sweep_table.py multirun/train/<date_time> --over seed

Writes ``sweep_table.md`` and ``fig6.png`` into the sweep directory (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.2f}"
    return "-" if v is None else str(v)


def markdown_table(jobs: list[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    """One row per job: the override keys whose values differ across jobs, then ``metrics``."""
    keys = []
    for job in jobs:
        keys += [k for k in job["overrides"] if k not in keys]
    varying = [k for k in keys if len({repr(job_value(j, k)) for j in jobs}) > 1] or keys
    header = ["job", *varying, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        row = [job["dir"].name, *(_fmt(job_value(job, k)) for k in varying)]
        row += [_fmt(job["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


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
        for m in metrics:
            vals = np.array(
                [float(j["metrics"][m]) for j in members if j["metrics"].get(m) is not None]
            )
            row[m] = (
                float(vals.mean()) if len(vals) else math.nan,
                float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            )
        rows.append(row)
    return rows


def aggregate_table(jobs: list[dict[str, Any]], over: str, metrics: Sequence[str] = METRICS) -> str:
    """Markdown: one row per group of :func:`aggregate`, metrics as ``mean ± std``."""
    rows = aggregate(jobs, over, metrics)
    keys = list(rows[0]["key"])
    varying = [k for k in keys if len({repr(r["key"][k]) for r in rows}) > 1] or keys
    header = [*varying, f"n ({over})", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [_fmt(r["key"][k]) for k in varying] + [str(r["n"])]
        cells += [f"{_fmt(r[m][0])} ± {_fmt(r[m][1])}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    jobs: list[dict[str, Any]],
    path: str | Path,
    x: str = "model.gmm.components",
    line: str = "model.gmm.covariance",
    metric: str = "test/mIoU",
) -> Path:
    """``metric`` against ``x``, one line per value of ``line`` (paper Fig. 6); PNG."""
    series: dict[Any, list[tuple[Any, float]]] = {}
    for job in jobs:
        xv, value = job_value(job, x), job["metrics"].get(metric)
        if xv is None or value is None:
            continue
        series.setdefault(job_value(job, line), []).append((xv, float(value)))
    fig = Figure(figsize=(4.5, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in sorted(series.items(), key=lambda kv: str(kv[0])):
        points.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(name))
    ax.set_xlabel("M (mixture components)" if x == "model.gmm.components" else x)
    ax.set_ylabel(f"{metric.split('/')[-1]} (%)")
    if all(isinstance(job_value(j, x), int) for j in jobs):
        ax.set_xticks(sorted({job_value(j, x) for j in jobs}))
    ax.legend(title=line.split(".")[-1])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    ap.add_argument("--x", default="model.gmm.components", help="x-axis override key")
    ap.add_argument("--line", default="model.gmm.covariance", help="one line per value of")
    ap.add_argument("--metric", default="test/mIoU")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default: sweep_dir)")
    ap.add_argument("--over", default=None, help="mean ± std over this key (e.g. seed)")
    args = ap.parse_args(argv)
    jobs = load_jobs(args.sweep_dir)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(jobs) if args.over is None else aggregate_table(jobs, args.over)
    (out / "sweep_table.md").write_text(table + "\n")
    print(table)
    print(f"\n{out / 'sweep_table.md'}")
    if args.over is None:  # Fig. 6 plots single jobs; with --over the table is the result
        print(plot(jobs, out / "fig6.png", args.x, args.line, args.metric))


if __name__ == "__main__":
    main()
