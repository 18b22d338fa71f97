"""Glue between the Hydra configs in ``conf/`` and the Lightning objects (no nn.Module here).

``config_dir()`` finds the configs both in a source checkout / editable install (the
repository's top-level ``conf/``) and in an installed wheel (``cgmgm/conf``, force-included by
pyproject.toml), so ``python -m cgmgm.train`` composes from any working directory.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cgmgm

__all__ = [
    "CKPT_WHAT",
    "CKPT_WHAT_BASE",
    "attach_feature_cache",
    "build_datamodule",
    "check_protocol",
    "compose",
    "compose_model",
    "config_dir",
    "format_table",
    "instantiate_callbacks",
    "instantiate_loggers",
    "keep_earlier",
    "load_checkpoint",
    "protocol_record",
    "report",
    "run_info",
    "setting_diffs",
    "to_plain",
    "write_metrics",
]


def config_dir() -> Path:
    """Absolute path of the config directory: ``<package>/conf`` when installed from a wheel,
    else the repository's top-level ``conf/`` (source checkout, editable install)."""
    package = Path(cgmgm.__file__).resolve().parent
    for candidate in (package / "conf", package.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"cgmgm configs not found in {package / 'conf'} (installed wheel) or "
        f"{package.parents[1] / 'conf'} (source checkout); reinstall the package"
    )


def compose(config_name: str = "train", overrides: Sequence[str] = (), hydra: bool = False) -> Any:
    """The composed (unresolved) config of ``python -m cgmgm.<config_name> <overrides>``
    (inside a running cgmgm app too: its Hydra already knows the configs), with its ``hydra``
    node when ``hydra`` is true."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, list(overrides), return_hydra_config=hydra)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name, list(overrides), return_hydra_config=hydra)


def compose_model(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved ``model`` config for ``overrides`` (e.g. ``["model.img=false",
    "dataset=coco"]``), as plain Python: the model's defaults for Python callers, from their one
    home in conf/model/cgmgm.yaml (and the dataset's recipe)."""
    return to_plain(compose("train", overrides).model)


def to_plain(cfg: Any) -> Any:
    """A resolved OmegaConf node -> plain dicts/lists/scalars (anything else passes through)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _instantiate_named(cfg: Mapping[str, Any] | None, kind: str) -> list[Any]:
    """Instantiate every non-null ``_target_`` node of a ``{name: node}`` mapping, in order."""
    from hydra.utils import instantiate

    out = []
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ValueError(f"{kind} {name!r} has no _target_: {node}")
        out.append(instantiate(node))
    return out


def instantiate_loggers(cfg: Mapping[str, Any] | None) -> list[Any]:
    """Loggers of the ``logger`` group (a ``{name: node}`` mapping; empty for ``logger=none``)."""
    return _instantiate_named(cfg, "logger")


def instantiate_callbacks(cfg: Mapping[str, Any] | None) -> list[Any]:
    """Callbacks of the ``callbacks`` group (``{name: node}``; null entries are dropped)."""
    return _instantiate_named(cfg, "callback")


def build_datamodule(cfg: Any, **overrides: Any) -> Any:
    """The ``dataset`` config's data module, with the ``cache`` config's image settings."""
    from hydra.utils import instantiate

    cache = cfg.cache
    return instantiate(
        cfg.dataset, cache=bool(cache.enabled), image_cache_mb=int(cache.images_mb), **overrides
    )


def attach_feature_cache(cfg: Any, module: Any, datamodule: Any, training: bool) -> dict[str, Any]:
    """Give ``module`` the ``cache`` config's frozen-feature cache (when enabled), print where
    it is on (training episodes too with ``training``) and why not elsewhere, and return that
    record for metrics.json."""
    cache = cfg.cache
    if cache.memory_gb is None or float(cache.memory_gb) < 0:
        raise ValueError(f"cache.memory_gb must be a number >= 0, got {cache.memory_gb}")
    directory = cache.dir or None
    enabled = bool(cache.enabled) and (float(cache.memory_gb) > 0 or directory is not None)
    if enabled:
        module.use_feature_cache(int(float(cache.memory_gb) * 2**30), directory)
    record = getattr(datamodule, "cache_record", None)
    splits = record(training) if record is not None else {}
    if cache.enabled and not enabled:  # episodes keep their image memory, features are not kept
        splits["features"] = "off: cache.memory_gb is 0 and there is no cache.dir"
    record = {"enabled": enabled, **splits}
    print("feature cache: " + "; ".join(f"{k} {v}" for k, v in splits.items()))
    return record


def run_info(cfg: Any, model: Mapping[str, Any], backbone: Mapping[str, Any]) -> dict[str, Any]:
    """Plain description of a run (checkpoints' ``meta`` and metrics.json): the run's data
    settings from ``cfg``, the headline switches of the ``model`` / ``backbone`` configs tested
    and the whole resolved ``model`` config (``model``), so a number says what produced it."""
    gmm = model.get("gmm") or {}
    return {
        "dataset": str(cfg.dataset.get("dataset", "")),
        "protocol": str(cfg.protocol),
        "fold": int(cfg.fold),
        "shot": int(cfg.shot),
        "seed": int(cfg.seed),
        "backbone": str(backbone["name"]),
        "guidance": model.get("guidance"),
        "components": gmm.get("components"),
        "covariance": gmm.get("covariance"),
        "img": model.get("img"),
        "imr": model.get("imr"),
        "training_free": bool(model.get("training_free", False)),
        "model": dict(model),
    }


def report(
    path: Path, metrics: Mapping[str, Any], module: Any, title: str = "", **table: Any
) -> None:
    """Write ``metrics`` to ``path`` (JSON) and print the per-class table under ``title``
    (``table``: extra :func:`format_table` options, e.g. ``std_suffix``)."""
    write_metrics(path, metrics)
    print(f"\n{title}\n" if title else "\n", end="")
    print(format_table(metrics, module.class_ids, module.class_names, **table))
    print(f"metrics: {path}")


def check_protocol(cfg: Any, datamodule: Any) -> None:
    """The run's ``protocol`` must be the data module's (the dataset configs interpolate
    ``protocol: ${protocol}``), so that scoring, seeds and the record agree with the data."""
    from cgmgm.data.protocols import get_protocol

    name = get_protocol(cfg.protocol).name  # unknown names: an error listing the choices
    dm = getattr(datamodule, "protocol", None)
    if dm is None or dm.name != name:
        raise ValueError(
            f"protocol={name} but the data module follows "
            f"{dm.name if dm is not None else 'none'}: set the top-level protocol= only "
            "(a dataset config passes it on with `protocol: ${protocol}`)"
        )


def protocol_record(datamodule: Any) -> dict[str, Any]:
    """What a run's numbers follow, for metrics.json: the protocol's description (or None),
    the test episodes per run, the original-size canvas, the dataset root and the train and
    test classes."""
    protocol = getattr(datamodule, "protocol", None)
    classes = datamodule.class_record() if hasattr(datamodule, "class_record") else {}
    return {
        "dataset_root": datamodule.dataset_kwargs.get("root"),
        "protocol": protocol.as_dict() if protocol is not None else None,
        "test_episodes": int(datamodule.test_episodes),
        "test_seed": getattr(datamodule, "test_seed", None),  # its test episodes' seed
        "original_size": datamodule.original_size,
        **classes,  # train / test class ids and names, seen test classes
    }


def keep_earlier(path: Path) -> None:
    """Move an existing ``path`` (``x.json``) aside to ``x.earlier-<k>.json``: never overwrite."""
    if not path.exists():
        return
    k = 1
    while (kept := path.with_name(f"{path.stem}.earlier-{k}{path.suffix}")).exists():
        k += 1
    path.rename(kept)
    print(f"{path.name}: the earlier one is kept as {kept}", file=sys.stderr)


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as JSON (NaN as null); returns the path."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(dict(metrics)), indent=2) + "\n")
    return path


def format_table(
    metrics: Mapping[str, Any],
    class_ids: Sequence[int],
    class_names: Sequence[str] | None = None,
    prefix: str = "test/",
    std_suffix: str | None = None,
    summary: Sequence[str] = ("mIoU", "FB-IoU", "GmIoU"),
) -> str:
    """Per-class IoU, then mIoU, FB-IoU and GmIoU (percent) as a small text table, with a
    row per guidance map's GmIoU (``GmIoU/<map>``) present in ``metrics``.

    With the meta learner's scores in ``metrics`` (``{prefix}meta/...``, a run with BAM's
    ensemble) there are two columns: ``final`` (the ensemble) and ``meta``.
    ``class_names[c]`` names class id ``c`` (index 0 = background). With ``std_suffix``
    (e.g. ``"_std"``), each value is shown as ``mean ± std``. A class without test episodes
    shows "-"; with ``{prefix}classes_drawn`` / ``{prefix}classes_total`` in ``metrics``, the
    mIoU row says over how many classes it averages (a mean over seeds with ``std_suffix``).
    """

    def cell(key: str) -> str:
        v = metrics.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        s = f"{v:6.2f}"
        if std_suffix is not None and metrics.get(key + std_suffix) is not None:
            s += f" ± {metrics[key + std_suffix]:5.2f}"
        return s

    columns = [prefix]
    headers = ["IoU (%)"]
    if f"{prefix}meta/mIoU" in metrics:
        columns, headers = [prefix, f"{prefix}meta/"], ["final IoU (%)", "meta IoU (%)"]
    maps = [f"GmIoU/{m}" for m in ("cosine", "initial_mask", "posterior")]
    summary = list(summary) + [m for m in maps if f"{prefix}{m}" in metrics]
    rows = []
    for cid in class_ids:
        name = class_names[cid] if class_names is not None and cid < len(class_names) else ""
        cells = [cell(f"{c}IoU/class_{cid}") for c in columns]
        rows.append((f"class {cid:>3} {name}".rstrip(), cells))
    for name in summary:
        gm = name.startswith("GmIoU")  # the guidance maps are the meta learner's inputs
        rows.append(
            (
                name,
                [cell(f"{prefix}{name}")] + ["" for _ in columns[1:]]
                if gm
                else [cell(f"{c}{name}") for c in columns],
            )
        )
    note = ""  # after the mIoU: the classes it averages
    drawn, total = metrics.get(f"{prefix}classes_drawn"), metrics.get(f"{prefix}classes_total")
    if drawn is not None and total:
        per_seed = " per seed (mean)" if std_suffix is not None else ""
        note = f"   over {float(drawn):g} of {int(total)} classes drawn{per_seed}"
        if float(drawn) < int(total):
            note += " (-: no test episode)"
    width = max(len(r[0]) for r in rows)
    widths = [max([len(h)] + [len(r[1][i]) for r in rows]) for i, h in enumerate(headers)]

    def line(name: str, cells: Sequence[str]) -> str:
        return (
            f"{name:{width}}  "
            + "  ".join(f"{c:{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()
        )

    lines = [line("", headers), "-" * (width + 2 + sum(widths) + 2 * (len(widths) - 1))]
    for i, (name, cells) in enumerate(rows):
        if i == len(class_ids):
            lines.append("-" * len(lines[1]))
        lines.append(line(name, cells) + (note if name == "mIoU" else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- checkpoints (both apps)

CKPT_WHAT = "a cgmgm checkpoint (a .ckpt file written by cgmgm.train)"
CKPT_WHAT_BASE = "a cgmgm stage-1 checkpoint (a .ckpt file written by cgmgm.train_base)"


def _unreadable(err: Exception) -> str:
    """Why torch.load(weights_only=True) failed, without its advice to drop weights_only."""
    text = str(err)
    if "Unsupported global" in text or "Unsupported operand" in text:
        return "it holds Python objects besides tensors and plain types"
    if "zip archive" in text or "central directory" in text:
        return "a damaged or truncated file"
    if isinstance(err, EOFError):
        return "the file ends early"
    return "not a PyTorch checkpoint file"


def load_checkpoint(path: str | Path, stage: int = 2, key: str = "ckpt_path") -> dict[str, Any]:
    """A cgmgm checkpoint loaded with ``torch.load(..., weights_only=True)`` (plain types and
    tensors): of :class:`~cgmgm.lit.LitCGMGM` (``stage`` 2, cgmgm.train) or of
    :class:`~cgmgm.lit_base.LitBase` (``stage`` 1, cgmgm.train_base). Anything else (no such
    file, empty, unreadable, another program's or the other stage's checkpoint) is an error
    naming the file (as the config key ``key``)."""
    import torch

    what = CKPT_WHAT_BASE if stage == 1 else CKPT_WHAT

    path = Path(path).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        hint = f", e.g. {key}={last}" if last.is_file() else ""
        raise IsADirectoryError(f"{key}={path} is a directory; pass {what}{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file; pass {what}")
    if path.stat().st_size == 0:
        raise ValueError(
            f"{key}={path} is an empty file (0 bytes; an interrupted save?), not {what}"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ValueError(
            f"{key}={path} is not {what}: torch.load cannot read it ({_unreadable(err)})"
        ) from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    hp = hp if isinstance(hp, dict) else {}
    lacks = []
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)):
        lacks.append("state_dict")
    needs, kind = ("base_classes", list) if stage == 1 else ("model", dict)
    if not isinstance(hp.get(needs), kind):
        lacks.append(f"hyper_parameters.{needs}")
    if not (isinstance(hp.get("backbone"), dict) and "name" in hp["backbone"]):
        lacks.append("hyper_parameters.backbone.name")
    if lacks:
        raise ValueError(f"{key}={path} is not {what}: it has no {', '.join(lacks)}")
    return ckpt


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def setting_diffs(trained: Any, current: Any, prefix: str) -> list[str]:
    """``key: <checkpoint's> -> <this run's>`` for every (dotted) key whose value differs."""
    a, b = _flat(trained, prefix), _flat(current, prefix)
    unset = object()
    return [
        f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key, unset) != b.get(key, unset)
    ]
