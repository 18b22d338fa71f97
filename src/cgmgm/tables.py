"""The paper's tables and Fig. 6 as commands: launch their runs, or collect runs that exist,
and write each in the paper's layout with the paper's numbers beside ours.

    python -m cgmgm.tables table2 --dry-run                  # the runs and their estimated cost
    python -m cgmgm.tables table2                            # launch the sweep (a Hydra multirun)
    python -m cgmgm.tables table2 dataset=synthetic backbone=efficientnet_lite0 fold=0,1 seed=0
    python -m cgmgm.tables table2 --collect multirun/table2/<dir> [<dir> ...]
    python -m cgmgm.tables table4 --collect multirun/table2/<dir>   # FB-IoU of Table 2's runs
    python -m cgmgm.tables table5 --wandb <entity>/<project>:<group>   # runs read from W&B

Tables: ``table1`` (guidance GmIoU and final mIoU), ``table2`` (PASCAL-5i, 4 folds x 1/5-shot x
ResNet-50 and VGG-16), ``table3`` (COCO-20i), ``table4`` (FB-IoU on PASCAL-5i), ``table5`` (the
ablation rows), ``fig6`` (M = 1..5 x diag/full: mIoU and the model's FLOPs, counted by
``torch.utils.flop_counter``). Each is the sweep ``conf/experiment/<experiment>.yaml``; the
overrides after the table's name are Hydra's, passed to ``python -m cgmgm.train -m`` as they are,
so they replace the sweep's values key by key (``fold=0`` runs fold 0 only, ``dataset=fss1000
dataset.root=...`` stands in for PASCAL). A launched sweep writes its table when it ends (the
Hydra callback :class:`cgmgm.sweeps.PaperTable`, into the sweep dir); ``--collect`` writes it
from finished runs. Every job the sweeps asked for (``multirun.yaml``) without a finished run is
marked missing, in its cell and in a list under the table; a cell is never 0 for a missing run.
The paper's numbers come from the rows' configs (``paper:`` in conf/ablation/bam.yaml and
cgmgm.yaml).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cgmgm import sweeps
from cgmgm.config import compose, keep_earlier, to_plain

__all__ = ["TABLES", "count_flops", "expand_sweep", "main", "write_table"]

FOLDS = (0, 1, 2, 3)
SHOTS = (1, 5)
PAPER_BACKBONES = {"resnet50": "ResNet50", "resnet50_psp": "ResNet50", "vgg16": "VGG-16"}
PAPER_ROWS = ("bam", "cgmgm")  # the rows whose configs hold the paper's Table 2-4 numbers
MISSING = "missing"


@dataclass(frozen=True)
class Table:
    name: str  # table2, fig6, ...
    experiment: str  # conf/experiment/<experiment>.yaml
    title: str


TABLES = {
    t.name: t
    for t in (
        Table("table1", "table1_guidance", "Table 1: guidance GmIoU and final mIoU (1-shot)"),
        Table("table2", "table2", "Table 2: mIoU on PASCAL-5i, 1-shot and 5-shot"),
        Table("table3", "table3", "Table 3: mIoU on COCO-20i, 1-shot and 5-shot"),
        Table("table4", "table4", "Table 4: FB-IoU on PASCAL-5i, 1-shot and 5-shot"),
        Table("table5", "table5", "Table 5: the parts of CGMGM (1-shot)"),
        Table("fig6", "fig6", "Fig. 6: Gaussians M and covariance against mIoU and FLOPs"),
    )
}


# --------------------------------------------------------------------------- the sweep's jobs


def expand_sweep(params: Mapping[str, Any] | None, overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a Hydra multirun, each its list of overrides, as Hydra's basic sweeper
    expands them: the sweep's ``hydra.sweeper.params``, then the command line's ``overrides``,
    which replace a param of the same key."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = [f"{k}={v}" for k, v in (params or {}).items()] + [str(o) for o in overrides]
    parsed = OverridesParser.create().parse_overrides(items)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _job_key(overrides: Sequence[str] | Mapping[str, Any]) -> tuple:
    if not isinstance(overrides, Mapping):
        overrides = sweeps._parse_overrides(overrides)
    return tuple(sorted((k, repr(v)) for k, v in overrides.items()))


def expected_jobs(sweep_dir: Path) -> list[list[str]]:
    """The jobs a sweep directory's ``multirun.yaml`` asked for ([] when it has none)."""
    from cgmgm.loggers import sweep_request

    params, task = sweep_request(sweep_dir)
    return expand_sweep(params, task) if params or task else []


def missing_jobs(
    expected: Sequence[Sequence[str]], jobs: Sequence[Mapping[str, Any]]
) -> list[list[str]]:
    """The ``expected`` jobs that no finished job ran (by their overrides)."""
    done = {_job_key(j["overrides"]) for j in jobs}
    return [list(e) for e in expected if _job_key(e) not in done]


# ------------------------------------------------------------------------- the paper's numbers


def paper_numbers() -> dict[str, dict[str, Any]]:
    """{row: its ``paper`` node} for the rows of Tables 2-4 (conf/ablation/<row>.yaml)."""
    return {row: to_plain(compose("train", [f"ablation={row}"]).paper) for row in PAPER_ROWS}


def _row_name(job: Mapping[str, Any]) -> str:
    """The job's row: its ``ablation=`` row ("bam" / "cgmgm" / ...), "cgmgm" for the default
    model, with "(no ensemble)" when it ran without stage 1 or "(modified)" when its model is
    not the row's."""
    row = sweeps._select(job["config"], "paper.row")
    if row is None:
        return "cgmgm (no paper row)"
    if not sweeps._had_ensemble(job["metrics"]):
        return f"{row} (no ensemble)"
    return row if sweeps._ran_row(job) else f"{row} (modified)"


def _label(row: str) -> str:
    names = {"bam": "BAM†", "cgmgm": "CGMGM"}
    head, _, rest = row.partition(" ")
    return f"{names.get(head, head)} {rest}".strip()


# ---------------------------------------------------------------------------------- cells


def _cell(values: Sequence[float]) -> str:
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _fold_mean(per_fold: Mapping[int, Sequence[float]]) -> str:
    """The mean over the 4 folds of the seed means, only when every fold has runs."""
    have = [f for f in FOLDS if per_fold.get(f)]
    if len(have) < len(FOLDS):
        return f"{MISSING} ({len(have)}/{len(FOLDS)} folds)"
    return f"{np.mean([np.mean(per_fold[f]) for f in FOLDS]):.2f}"


def _values(jobs: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    out = []
    for j in jobs:
        v = j["metrics"].get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"{j['dir']}: metrics.json has no {metric} (a failed run?)")
        out.append(float(v))
    return out


def _group(jobs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """Jobs by (row, "<backbone> on <dataset>"): runs on different data never share a cell."""
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for j in jobs:
        m = j["metrics"]
        out.setdefault((_row_name(j), f"{m.get('backbone')} on {m.get('dataset')}"), []).append(j)
    return out


def _by(jobs: Sequence[Mapping[str, Any]], shot: int, fold: int) -> list[Mapping[str, Any]]:
    return [
        j for j in jobs if j["metrics"].get("shot") == shot and j["metrics"].get("fold") == fold
    ]


# ---------------------------------------------------------------------------------- layouts


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fold_table(jobs: Sequence[Mapping[str, Any]], key: str) -> str:
    """Tables 2 and 3: mIoU per fold and the mean, 1-shot then 5-shot; the paper's BAM† and
    CGMGM rows per paper backbone, then ours (mean ± sample std over training seeds)."""
    header = ["method", "backbone"]
    for shot in SHOTS:
        header += [f"{shot}-shot fold-{f}" for f in FOLDS] + [f"{shot}-shot mean"]
    rows = []
    paper = paper_numbers()
    for backbone in ("vgg16", "resnet50"):
        for row in PAPER_ROWS:
            numbers = (paper[row].get(key) or {}).get(backbone)
            if numbers:
                cells = [f"{v:.2f}" for shot in SHOTS for v in numbers[shot]]
                rows.append([f"{_label(row)} (paper)", PAPER_BACKBONES[backbone], *cells])
    for (row, backbone), members in sorted(_group(jobs).items()):
        cells = []
        for shot in SHOTS:
            per_fold = {f: _values(_by(members, shot, f), "test/mIoU") for f in FOLDS}
            cells += [_cell(per_fold[f]) for f in FOLDS] + [_fold_mean(per_fold)]
        rows.append([f"{_label(row)} (ours)", backbone, *cells])
    return _md(header, rows)


def table2(jobs: Sequence[Mapping[str, Any]]) -> str:
    return fold_table(jobs, "table2")


def table3(jobs: Sequence[Mapping[str, Any]]) -> str:
    return fold_table(jobs, "table3")


def table4(jobs: Sequence[Mapping[str, Any]]) -> str:
    """Table 4: FB-IoU (the mean over the 4 folds), 1-shot and 5-shot, the paper's beside ours;
    then ours per fold."""
    header = ["method", "backbone", "1-shot", "5-shot"]
    rows = []
    paper = paper_numbers()
    for row in PAPER_ROWS:
        numbers = (paper[row].get("table4") or {}).get("resnet50")
        if numbers:
            rows.append(
                [f"{_label(row)} (paper)", "ResNet50", *(f"{numbers[s]:.2f}" for s in SHOTS)]
            )
    detail = []
    for (row, backbone), members in sorted(_group(jobs).items()):
        cells, per_shot = [], []
        for shot in SHOTS:
            per_fold = {f: _values(_by(members, shot, f), "test/FB-IoU") for f in FOLDS}
            cells.append(_fold_mean(per_fold))
            per_shot.append([_cell(per_fold[f]) for f in FOLDS])
        rows.append([f"{_label(row)} (ours)", backbone, *cells])
        for shot, folds in zip(SHOTS, per_shot, strict=True):
            detail.append([f"{_label(row)} (ours)", backbone, f"{shot}-shot", *folds])
    text = _md(header, rows)
    if detail:
        head = ["method", "backbone", "shot", *(f"fold-{f}" for f in FOLDS)]
        text += "\n\nOurs per fold (FB-IoU, mean ± sample std over training seeds):\n\n"
        text += _md(head, detail)
    return text


def table1(jobs: Sequence[Mapping[str, Any]]) -> str:
    return sweeps.table1(list(jobs))


def table5(jobs: Sequence[Mapping[str, Any]]) -> str:
    return sweeps.table5(list(jobs))


# ---------------------------------------------------------------------------------- Fig. 6


def count_flops(module: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
    """FLOPs of one ``module(*args, **kwargs)`` call counted by ``torch.utils.flop_counter``
    (matrix products and convolutions: 2 per multiply-add; element-wise operations are not
    counted): ``{"total": n, <submodule name>: n, ...}`` for the module's direct children."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=2)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    counts = counter.get_flop_counts()
    out = {"total": int(counter.get_total_flops())}
    root = type(module).__name__
    for name, ops in counts.items():
        parts = name.split(".")
        if name != "Global" and parts[0] == root and len(parts) == 2:
            out[parts[1]] = int(sum(ops.values()))
    return out


def episode_size(cfg: Mapping[str, Any], protocol: str | None, dataset: str | None) -> int:
    """The images' side in a job's test episodes: the dataset's own size (the embedded
    benchmark's ``image_size``) or its protocol's test resize (BAM: 473 PASCAL, 641 COCO)."""
    from cgmgm.data.protocols import get_protocol

    native = sweeps._select(dict(cfg), "dataset.dataset_kwargs.image_size")
    return int(native or get_protocol(protocol or "bam").size(str(dataset)))


def flops_of_job(job: Mapping[str, Any]) -> dict[str, int]:
    """The FLOPs of the job's model (as configured: guidance, M, covariance, base learner over
    its base classes) on one episode of its shot at its test size (:func:`episode_size`); weights
    play no part."""
    import torch

    from cgmgm.lit import build_model

    cfg, metrics = job["config"], job["metrics"]
    model_cfg = dict(metrics.get("model") or cfg["model"])
    backbone = {"name": metrics.get("backbone") or cfg["backbone"]["name"], "weights": "none"}
    shot = int(metrics.get("shot") or cfg.get("shot") or 1)
    classes = metrics.get("train_class_ids") if metrics.get("ensemble") else None
    net = build_model(model_cfg, backbone, len(classes) + 1 if classes else None, shot).eval()
    proto = metrics.get("protocol")
    proto = proto.get("name") if isinstance(proto, Mapping) else proto
    size = episode_size(cfg, proto, metrics.get("dataset"))
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(1, 3, size, size, generator=gen)
    s = torch.rand(1, shot, 3, size, size, generator=gen)
    m = (torch.rand(1, shot, size, size, generator=gen) > 0.5).long()
    counts = count_flops(net, q, s, m)
    counts["size"] = size
    return counts


def _fold_cell(jobs: Sequence[Mapping[str, Any]], metric: str) -> str:
    """Mean ± sample std over seeds (one fold), or the mean over folds of the seed means."""
    folds = sorted({j["metrics"].get("fold") for j in jobs}, key=str)
    if len(folds) <= 1:
        return _cell(_values(jobs, metric))
    means = [
        np.mean(_values([j for j in jobs if j["metrics"].get("fold") == f], metric)) for f in folds
    ]
    return f"{np.mean(means):.2f} (mean of folds {', '.join(map(str, folds))})"


def _gmm_key(job: Mapping[str, Any]) -> tuple[int, str]:
    m = job["metrics"]
    if m.get("components") is None or m.get("covariance") is None:
        raise ValueError(f"{job['dir']}: metrics.json records no components / covariance")
    return int(m["components"]), str(m["covariance"])


def fig6(jobs: Sequence[Mapping[str, Any]], out_dir: Path | None = None) -> str:
    """Fig. 6 as a table (M x covariance: mIoU, mean ± sample std over seeds, and GFLOPs of the
    model and of its CDGMG + QCPE per episode) and, with ``out_dir``, ``fig6.png``. Rows: the
    paper's M = 1..5 and any other M that ran; columns: diag, full and any other covariance."""
    cells: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for j in jobs:
        cells.setdefault(_gmm_key(j), []).append(j)
    flops = {k: flops_of_job(v[0]) for k, v in cells.items()}
    covs = ["diag", "full"] + sorted({c for _, c in cells} - {"diag", "full"})
    header = ["M", *(f"{c} mIoU" for c in covs), *(f"{c} GFLOPs" for c in covs)]
    header += [f"{c} GFLOPs CDGMG+QCPE" for c in covs]
    rows = []
    for m in sorted({1, 2, 3, 4, 5} | {m for m, _ in cells}):
        r = [str(m)] + [_fold_cell(cells[m, c], "test/mIoU") if (m, c) in cells else MISSING
                        for c in covs]  # fmt: skip
        for part in ("total", "gmm"):
            for c in covs:
                f = flops.get((m, c))
                if f is None:
                    r.append(MISSING)
                elif part == "total":
                    r.append(f"{f['total'] / 1e9:.3f}")
                else:
                    r.append(f"{(f.get('cdgmg', 0) + f.get('qcpe', 0)) / 1e9:.4f}")
        rows.append(r)
    text = _md(header, rows)
    if flops:
        size = next(iter(flops.values()))["size"]
        text += (
            f"\n\nFLOPs: one {jobs[0]['metrics'].get('shot')}-shot episode at {size}x{size}, "
            "counted by torch.utils.flop_counter (matrix products and convolutions, 2 per "
            "multiply-add; element-wise operations not counted). The paper gives Fig. 6 as a "
            "plot only (its numbers are not in the text); it chose M = 3, diag (Table 5's "
            "69.85)."
        )
    if out_dir is not None and cells:
        text += f"\n\n{_plot_fig6(cells, flops, covs, Path(out_dir) / 'fig6.png')}"
    return text


def _plot_fig6(cells, flops, covs, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    ax_m, ax_f = fig.subplots(1, 2)
    for cov in covs:
        ms = sorted(m for (m, c) in cells if c == cov)
        if not ms:
            continue
        means = [np.mean(_values(cells[(m, cov)], "test/mIoU")) for m in ms]
        ax_m.plot(ms, means, marker="o", label=cov)
        ax_f.plot(ms, [flops[(m, cov)]["total"] / 1e9 for m in ms], marker="o", label=cov)
    for ax, ylabel in ((ax_m, "mIoU (%)"), (ax_f, "GFLOPs per episode")):
        ax.set_xlabel("M (Gaussians per class)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({m for m, _ in cells}))
        ax.grid(alpha=0.3)
        ax.legend(title="covariance")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    keep_earlier(path)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------- writing a table


LAYOUTS = {"table1": table1, "table2": table2, "table3": table3, "table4": table4,
           "table5": table5}  # fmt: skip


def _values_of(jobs: Sequence[Mapping[str, Any]], key: str) -> str:
    return ", ".join(sorted({str(j["metrics"].get(key)) for j in jobs}))


def _protocol_line(jobs: Sequence[Mapping[str, Any]]) -> str:
    """What our numbers followed: dataset, backbone, folds, shots, protocol (test episodes,
    test seeds) and the training seeds."""
    parts = [f"{k} {_values_of(jobs, k)}" for k in ("dataset", "backbone", "fold", "shot")]
    protos = set()
    for j in jobs:
        m = j["metrics"]
        p = m.get("protocol")
        name = p.get("name") if isinstance(p, Mapping) else p
        seeds = m.get("test_seed", m.get("seeds"))  # cgmgm.train: one test seed; eval: several
        if seeds is None:  # runs from before the record: the config's, else the protocol's first
            seeds = j["config"].get("test_seed")
            seeds = seeds if seeds is not None else (p or {}).get("seeds", [None])[0]
        protos.add(f"{name} ({m.get('test_episodes')} test episodes, test seed(s) {seeds})")
    parts.append("protocol " + "; ".join(sorted(protos)))
    seeds = sorted({str(sweeps.job_value(j, "seed")) for j in jobs})
    parts.append(f"mean ± sample std over training seeds {', '.join(seeds)}")
    return "ours: " + " · ".join(parts)


def _paper_protocol() -> str:
    from cgmgm.data.protocols import get_protocol

    bam = get_protocol("bam").as_dict()
    episodes = ", ".join(f"{k} {v}" for k, v in bam["test_episodes"].items())
    return (
        f"the paper: BAM's protocol (test episodes per run: {episodes}; the mean of runs with "
        f"test seeds {bam['seeds']}; labels scored at "
        f"{'original size' if bam['score_at_original'] else 'the test size'}), PASCAL-5i / "
        "COCO-20i, ResNet-50 / VGG-16 with BAM's stage 1, 4-fold means"
    )


def render(name: str, jobs: Sequence[Mapping[str, Any]], missing: Sequence[Sequence[str]] = (),
           out_dir: Path | None = None) -> str:  # fmt: skip
    """Table ``name`` of ``jobs`` in the paper's layout, with where its numbers come from and
    the jobs still missing."""
    table = TABLES[name]
    body = fig6(jobs, out_dir) if name == "fig6" else LAYOUTS[name](jobs)
    text = f"{table.title}\n\n{body}\n\n{_protocol_line(jobs)}\n{_paper_protocol()}"
    if missing:
        text += f"\n\nMissing ({len(missing)} of the sweep's jobs have no finished run):\n"
        text += "\n".join("- " + " ".join(m) for m in missing)
    return text


def _dedupe(jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One job per output dir (the same sweep given twice, or on disk and in W&B); an error if
    two records of one dir disagree."""
    out: dict[Path, dict[str, Any]] = {}
    for j in jobs:
        key = Path(j["dir"]).expanduser().resolve()
        if key in out and out[key]["metrics"] != j["metrics"]:
            raise ValueError(f"two different records of the job {key} (disk and W&B?)")
        out.setdefault(key, j)
    return list(out.values())


def load_runs(collect: Sequence[Path], wandb: Sequence[str] = ()) -> tuple[list, list]:
    """(jobs, missing) from sweep directories and W&B sources: each job once, and the jobs the
    sweeps asked for (a sweep dir's multirun.yaml; a W&B job's ``sweep`` record) that have no
    finished run."""
    jobs: list[dict[str, Any]] = []
    expected: list[list[str]] = []
    for d in collect:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--collect {d}: no such directory (a Hydra sweep dir)")
        found = list(Path(d).glob("*/metrics.json"))
        jobs += sweeps.load_jobs(d) if found else []
        expected += expected_jobs(Path(d))
    for source in wandb:
        from cgmgm.wandb_runs import load_wandb_jobs

        found = load_wandb_jobs(source)
        jobs += found
        records = {repr(r): r for j in found if (r := (j["config"].get("sweep") or {})).get("dir")}
        for r in records.values():
            expected += expand_sweep(r.get("params"), r.get("task") or [])
    if not jobs and not expected:
        raise FileNotFoundError(
            f"no finished runs (<job>/metrics.json) and no sweep (multirun.yaml) in {list(collect)}"
        )
    unique = list({_job_key(e): e for e in expected}.values())
    return _dedupe(jobs), missing_jobs(unique, jobs)


def write_table(name: str, collect: Sequence[Path], wandb: Sequence[str] = (),
                out: Path | None = None) -> str:  # fmt: skip
    """Print table ``name`` of the runs in ``collect`` / ``wandb`` and write it to ``out``
    (default ``<first collect dir>/<name>.md``, or ``outputs/tables/<name>.md`` for W&B runs
    alone; an earlier file is kept beside it)."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; choose one of {list(TABLES)}")
    jobs, missing = load_runs(collect, wandb)
    if out is None:  # beside the runs, or for W&B runs alone outputs/tables/
        out = (Path(collect[0]) if collect else Path("outputs") / "tables") / f"{name}.md"
    text = render(name, jobs, missing, out.parent) if jobs else None
    if text is None:
        text = f"{TABLES[name].title}\n\nno finished run yet; missing:\n" + "\n".join(
            "- " + " ".join(m) for m in missing
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    keep_earlier(out)  # a table written again never replaces the one before it
    out.write_text(text + "\n")
    print(f"\n{text}\n\n{out}")
    return text


# ------------------------------------------------------------------------------- dry run


def _sweep_jobs(name: str, overrides: Sequence[str]) -> list[list[str]]:
    """The jobs ``python -m cgmgm.tables <name> <overrides>`` launches."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = compose("train", [f"experiment={TABLES[name].experiment}", *fixed], hydra=True)
    return expand_sweep(to_plain(cfg.hydra.sweeper.params) or {}, overrides)


def _time_step(cfg: Any) -> tuple[float, float]:
    """Seconds per episode of a training step (forward, backward) at the job's batch size and
    of a test forward at its eval batch size, of the job's stage-2 model, measured here once on
    random images at the job's size (the first call includes warm-up: an overestimate)."""
    import torch

    from cgmgm.lit import build_model

    model, bb = to_plain(cfg.model), {"name": cfg.backbone.name, "weights": "none"}
    ensemble = cfg.base_ckpt is not None
    net = build_model(model, bb, 16 if ensemble else None, int(cfg.shot))
    size = episode_size({"dataset": to_plain(cfg.dataset)}, cfg.protocol, cfg.dataset.dataset)
    times = []
    for train, batch in ((True, cfg.dataset.batch_size), (False, cfg.dataset.eval_batch_size)):
        b, k = int(batch), int(cfg.shot)
        q, s = torch.rand(b, 3, size, size), torch.rand(b, k, 3, size, size)
        m = (torch.rand(b, k, size, size) > 0.5).long()
        net.train(train)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train):
            out = net(q, s, m)
            if train:
                out["logits"].sum().backward()
        times.append((time.perf_counter() - t0) / b)
    return times[0], times[1]


def _episode_counts(cfg: Any) -> dict[str, Any]:
    """Training / validation / test episodes of one job, from its data (or why unknown)."""
    from cgmgm.config import build_datamodule

    try:
        dm = build_datamodule(cfg)
        dm.setup("fit")
        train = len(dm.train_set)
        val, test = int(dm.val_episodes or 0), int(dm.test_episodes)
    except Exception as err:  # noqa: BLE001 - reported, not hidden: the estimate says why
        return {"error": f"{type(err).__name__}: {err}"}
    return {"train": train, "epochs": int(cfg.trainer.max_epochs), "val": val, "test": test}


def dry_run(name: str, overrides: Sequence[str], timing: bool = True) -> list[list[str]]:
    """Print the jobs ``python -m cgmgm.tables <name> <overrides>`` would launch, the stage-1
    runs they need (trained or reused), and an estimate of their cost on this machine."""
    from cgmgm.train import _finished_stage1, stage1_config

    jobs = _sweep_jobs(name, overrides)
    command = " ".join(["python -m cgmgm.train -m", f"experiment={TABLES[name].experiment}"])
    command = " ".join([command, *overrides])
    print(f"{TABLES[name].title}: {len(jobs)} jobs ({command})")
    stage1: dict[str, bool] = {}
    total, unknown, rates = 0.0, [], {}
    for i, job in enumerate(jobs):
        cfg = compose("train", [f"experiment={TABLES[name].experiment}", *job])
        line = f"  {i:>3}  {' '.join(o for o in job if not o.lstrip('+~').startswith('hydra'))}"
        if cfg.base_ckpt == "fit":
            out = stage1_config(cfg).paths.output_dir
            stage1.setdefault(out, _finished_stage1(Path(out)) is not None)
        if timing:
            key = (cfg.backbone.name, int(cfg.shot), repr(to_plain(cfg.model)), cfg.base_ckpt)
            if key not in rates:
                rates[key] = _time_step(cfg)
            train_s, test_s = rates[key]
            n = _episode_counts(cfg)
            if "error" in n:
                unknown.append(f"job {i}: episodes unknown ({n['error']})")
                line += f"  [{train_s:.2f} s/train episode, {test_s:.2f} s/test episode]"
            else:
                cost = (
                    n["train"] * n["epochs"] * train_s
                    + (n["val"] * n["epochs"] + n["test"]) * test_s
                )
                total += cost
                line += (
                    f"  [{n['train']} x {n['epochs']} train, {n['val']} val/epoch, {n['test']} "
                    f"test episodes: ~{cost / 60:.1f} min]"
                )
        print(line)
    todo = [d for d, done in stage1.items() if not done]
    print(f"stage 1: {len(stage1)} distinct ({len(todo)} to train, {len(stage1) - len(todo)} "
          "finished and reused)")  # fmt: skip
    for d in todo:
        print(f"  train: {d}")
    if timing:
        print(
            f"estimated stage-2 cost here: ~{total / 3600:.2f} h of one process (one step timed "
            "per setting on random images at the job's size and batch; stage 1 not included)"
        )
        for u in unknown:
            print(f"  {u}")
    return jobs


# --------------------------------------------------------------------------------- the CLI


def launch(name: str, overrides: Sequence[str]) -> int:
    """``python -m cgmgm.train -m experiment=<the table's> <overrides>``: Hydra's launcher
    (``hydra/launcher=slurm`` for a cluster) runs the jobs; the sweep writes the table."""
    cmd = [sys.executable, "-m", "cgmgm.train", "-m", f"experiment={TABLES[name].experiment}"]
    cmd += list(overrides)
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=os.environ.copy())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cgmgm.tables",
        description="the paper's tables and Fig. 6: launch their sweep or collect its runs",
    )
    ap.add_argument("table", choices=list(TABLES))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the sweep (key=value)")
    ap.add_argument("--collect", nargs="+", type=Path, default=[], metavar="SWEEP_DIR",
                    help="write the table from these sweep dirs' runs; launch nothing")  # fmt: skip
    ap.add_argument("--wandb", action="append", default=[], metavar="SOURCE",
                    help="W&B runs: entity/project[:group] or a dir of run folders")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="the table's file (collect mode)")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and their cost")
    ap.add_argument("--no-timing", action="store_true", help="dry run without timing a step")
    args = ap.parse_args(argv)
    if args.dry_run:
        dry_run(args.table, args.overrides, timing=not args.no_timing)
        return 0
    if args.collect or args.wandb:
        if args.overrides:
            ap.error("overrides launch a sweep; with --collect / --wandb give none")
        write_table(args.table, args.collect, args.wandb, args.out)
        return 0
    return launch(args.table, args.overrides)


if __name__ == "__main__":
    raise SystemExit(main())
