"""A Hydra multirun directory -> a markdown table and the Fig. 6 plot.

Each job directory of the sweep holds ``metrics.json`` (written by ``cgmgm.train`` /
``cgmgm.eval``) and ``.hydra/overrides.yaml``. The table has one row per job: the overrides
that vary across jobs, then the metrics. The plot draws ``--metric`` against ``--x`` with one
line per value of ``--line`` (default: mIoU against M, one line per covariance type).

    python -m cgmgm.train -m model.gmm.components=1,2,3 model.gmm.covariance=diag,full
    python experiments/sweep_table.py multirun/train/<date_time>

With ``--over seed`` (any override key), jobs that differ only in that key become one row of
``mean ± std`` (sample standard deviation) over them, with the count ``n``:

    python -m cgmgm.train -m seed=0,1,2 ablation=bam,cgmgm
    python experiments/sweep_table.py multirun/train/<date_time> --over seed

Writes ``sweep_table.md`` and ``fig6.png`` into the sweep directory (or ``--out``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cgmgm.sweeps import METRICS, aggregate, fmt, job_value, load_jobs

__all__ = ["aggregate", "aggregate_table", "job_value", "load_jobs", "markdown_table", "plot"]


def markdown_table(jobs: list[dict[str, Any]], metrics: Sequence[str] = METRICS) -> str:
    """One row per job: the override keys whose values differ across jobs, then ``metrics``."""
    keys = []
    for job in jobs:
        keys += [k for k in job["overrides"] if k not in keys]
    varying = [k for k in keys if len({repr(job_value(j, k)) for j in jobs}) > 1] or keys
    header = ["job", *varying, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in jobs:
        row = [job["dir"].name, *(fmt(job_value(job, k)) for k in varying)]
        row += [fmt(job["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def aggregate_table(jobs: list[dict[str, Any]], over: str, metrics: Sequence[str] = METRICS) -> str:
    """Markdown: one row per group of :func:`aggregate`, metrics as ``mean ± std``."""
    rows = aggregate(jobs, over, metrics)
    keys = list(rows[0]["key"])
    varying = [k for k in keys if len({repr(r["key"][k]) for r in rows}) > 1] or keys
    header = [*varying, f"n ({over})", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [fmt(r["key"][k]) for k in varying] + [str(r["n"])]
        cells += [f"{fmt(r[m][0])} ± {fmt(r[m][1])}" for m in metrics]
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
