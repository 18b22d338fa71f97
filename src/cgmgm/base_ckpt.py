"""The stage-1 checkpoint that stage 2 stands on: ``python -m cgmgm.train base_ckpt=<file>``.

Two kinds of file are read (:func:`load_base_checkpoint`):

- a cgmgm stage-1 checkpoint (``cgmgm.train_base``'s ``checkpoints/*.ckpt``): the fine-tuned
  backbone body (``net.body.*``) and the base learner (``net.head.*``), with the dataset, fold,
  backbone and base classes it was trained on;
- BAM's released stage-1 PSPNet, ``initmodel/PSPNet/{pascal,coco}/split{k}/{resnet50,vgg}/
  best.pth`` (read by :func:`cgmgm.models.backbone.split_bam_checkpoint`): it names no dataset,
  fold or classes, so the path's ``{pascal,coco}/split{k}`` (required) and the head's class
  count stand in.

:func:`check_base_checkpoint` refuses a file whose dataset, fold, backbone or base classes
differ from the run's, naming both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BaseCheckpoint", "check_base_checkpoint", "load_base_checkpoint"]

# BAM's release: initmodel/PSPNet/<dataset>/split<k>/<backbone>/best.pth
_BAM_PATH = re.compile(r"(pascal|coco)[\\/]+split(\d+)[\\/]+(resnet50|vgg)", re.IGNORECASE)
_BAM_DATASET = {"pascal": "pascal", "coco": "coco"}


@dataclass
class BaseCheckpoint:
    """A stage-1 checkpoint's weights and what they were trained on (None: not recorded)."""

    path: Path
    kind: str  # "cgmgm" (cgmgm.train_base) or "bam" (BAM's released PSPNet)
    backbone: str | None
    dataset: str | None
    fold: int | None
    num_classes: int  # base classes + background
    base_class_names: list[str] | None
    body: dict[str, torch.Tensor] = field(repr=False)
    head: dict[str, torch.Tensor] = field(repr=False)

    def record(self) -> dict[str, Any]:
        """For metrics.json and the stage-2 checkpoint's meta."""
        return {
            "base_ckpt": str(self.path),
            "base_ckpt_kind": self.kind,
            "base_ckpt_dataset": self.dataset,
            "base_ckpt_fold": self.fold,
            "base_ckpt_backbone": self.backbone,
            "base_learner_classes": self.num_classes,
        }


def load_base_checkpoint(path: str | Path) -> BaseCheckpoint:
    """Read a stage-1 checkpoint (see the module docstring); anything else is an error naming
    the file and what to pass instead."""
    from cgmgm.config import load_checkpoint
    from cgmgm.models.backbone import bam_checkpoint_info, read_state_dict, split_bam_checkpoint

    path = Path(path).expanduser()
    if path.is_dir():
        best = path / "checkpoints" / "best.ckpt"
        hint = f" (e.g. base_ckpt={best})" if best.is_file() else ""
        raise IsADirectoryError(f"base_ckpt={path} is a directory; pass a checkpoint file{hint}")
    if path.is_file() and path.suffix == ".ckpt":
        ckpt = load_checkpoint(path, stage=1, key="base_ckpt")
        hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
        meta = hp.get("meta") or {}
        names = meta.get("base_class_names")
        return BaseCheckpoint(
            path=path.resolve(),
            kind="cgmgm",
            backbone=str(hp["backbone"]["name"]),
            dataset=meta.get("dataset"),
            fold=None if meta.get("fold") is None else int(meta["fold"]),
            num_classes=len(hp["base_classes"]) + 1,
            base_class_names=None if names is None else [str(n) for n in names],
            body=_strip(state, "net.body."),
            head=_strip(state, "net.head."),
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"base_ckpt={path}: no such file; pass a stage-1 checkpoint (python -m "
            "cgmgm.train_base writes <run>/checkpoints/best.ckpt) or BAM's "
            "initmodel/PSPNet/<dataset>/split<k>/<backbone>/best.pth"
        )
    state = read_state_dict(path)
    info = bam_checkpoint_info(state)
    body, head, layout = split_bam_checkpoint(state, path)
    if head is None or info["backbone"] is None:
        raise ValueError(
            f"base_ckpt={path} holds no base learner (layout {layout!r}: backbone weights "
            "only). Pass it as backbone.weights= instead, and base_ckpt= a stage-1 checkpoint "
            "(cgmgm.train_base's, or BAM's initmodel/PSPNet/.../best.pth)"
        )
    hint = _BAM_PATH.search(str(path.resolve()))
    if hint is None:  # BAM's file records no dataset or fold: its folder names them
        raise ValueError(
            f"base_ckpt={path} is a BAM stage-1 checkpoint ({layout}), which records no "
            "dataset or fold, and its path does not name them as BAM's release does "
            "(initmodel/PSPNet/<pascal|coco>/split<k>/<resnet50|vgg>/best.pth). Every fold "
            "has as many base classes, so nothing else could tell another fold's file apart: "
            "keep the file under BAM's folder names"
        )
    return BaseCheckpoint(
        path=path.resolve(),
        kind="bam",
        backbone=str(info["backbone"]),
        dataset=_BAM_DATASET[hint.group(1).lower()],
        fold=int(hint.group(2)),
        num_classes=int(info["num_classes"]),
        base_class_names=None,
        body=body,
        head=head,
    )


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def check_base_checkpoint(
    base: BaseCheckpoint,
    *,
    dataset: str,
    fold: int,
    backbone: str,
    base_class_names: Sequence[str],
) -> None:
    """Raise ValueError naming both sides when ``base`` was trained on another dataset, fold,
    backbone or set of base classes than this run's (only what the file records is compared;
    a BAM file's dataset and fold come from its path, when it follows BAM's layout)."""
    diffs = []
    if base.backbone is not None and base.backbone != backbone:
        diffs.append(f"backbone: {base.backbone} (checkpoint) vs {backbone} (this run)")
    if base.dataset is not None and base.dataset != dataset:
        diffs.append(f"dataset: {base.dataset} (checkpoint) vs {dataset} (this run)")
    if base.fold is not None and base.fold != int(fold):
        diffs.append(f"fold: {base.fold} (checkpoint) vs {fold} (this run)")
    names = [str(n) for n in base_class_names]
    if base.base_class_names is not None and base.base_class_names != names:
        diffs.append(
            f"base classes: {_show(base.base_class_names)} (checkpoint) vs {_show(names)} "
            "(this run)"
        )
    elif base.num_classes != len(names) + 1:
        diffs.append(
            f"base learner classes: {base.num_classes} (checkpoint) vs {len(names)} base "
            "classes + background (this run)"
        )
    if diffs:
        raise ValueError(
            f"base_ckpt={base.path} was trained for another setting than this run: "
            + "; ".join(diffs)
            + ". Stage 2 needs the stage-1 checkpoint of its own dataset, fold and backbone: "
            "set them to the checkpoint's, or train stage 1 for this setting (python -m "
            "cgmgm.train_base with the same dataset=, fold= and backbone=)"
        )


def _show(names: Sequence[str], limit: int = 6) -> str:
    return "[" + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") + "]"
