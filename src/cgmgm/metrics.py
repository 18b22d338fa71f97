"""Scoring of few-shot segmentation episodes: the one home of evaluation.

Metrics (BAM definitions, in percent). States are integer pixel counts reduced by sum, so
splitting episodes across processes (DDP) or into batches of any size and summing equals one
process seeing them all in one batch.

- per-class IoU = sum of intersections / sum of unions over all episodes of the class;
- mIoU = mean per-class IoU over the classes that appeared (had >= 1 episode);
- FB-IoU = mean of the accumulated foreground IoU and background IoU;
- GmIoU (paper Table 1) = mIoU of the guidance map binarised at 0.5 (:func:`binarize`): a
  second :class:`FSSIoU` that :func:`score` feeds exactly like the prediction
  (:func:`episode_results` reports it next to the others).

Pixels whose target is ``IGNORE_INDEX`` (255) count nowhere. A union of 0 gives IoU 0 (BAM's
``I / (U + 1e-10)``). The prediction is the argmax of 2-class logits (ties go to background) or
a foreground probability > 0.5.

Geometry. Outputs reach the label's size through the one resize,
:func:`cgmgm.models.resize.resize` (bilinear, align_corners=True, as BAM). :func:`score` follows
the protocol (:class:`cgmgm.data.protocols.Protocol`):

- ``score_at_original`` (BAM/PFENet ``ori_resize``) and episodes carrying ``query_mask_orig`` /
  ``query_orig_size``: scored against the original label. BAM test.py pastes the label
  top-left into a 255-filled square of side max(H, W), upsamples the test-size logits to that
  square and compares there; equivalently (:func:`restore_original`), upsample to the square
  and keep its top-left H x W ("pad" test resize), or upsample to H x W directly ("squash").
  BAM scores one episode per batch; here every item is restored at its own size, so any batch
  size (and any mix of original sizes in a batch) gives the same counts.
- otherwise against ``query_mask`` at test size (HSNet's 400 x 400; or episodes that were not
  resized, whose ``query_mask`` is the original label).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from cgmgm.constants import IGNORE_INDEX
from cgmgm.models.resize import resize

if TYPE_CHECKING:
    from cgmgm.data.protocols import Protocol

__all__ = [
    "decide",
    "FSSIoU",
    "binarize",
    "classes_drawn",
    "episode_results",
    "flatten_results",
    "original_size_prediction",
    "restore_original",
    "score",
    "semantic_results",
]


# ---------------------------------------------------------------------- predictions


def _as_maps(output: Tensor) -> Tensor:
    """Logits [B, C, h, w] or probability [B, h, w] / [B, 1, h, w] -> float [B, C', h, w]."""
    if output.dim() == 3:
        output = output[:, None]
    if output.dim() != 4:
        raise ValueError(
            f"expected [B, C, h, w] logits or a [B, h, w] map, got {tuple(output.shape)}"
        )
    return output.float()


def decide(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """[B, C, H, W] -> long [B, H, W]: argmax of logits (C >= 2, ties to background) or
    probability > threshold (C = 1)."""
    if maps.shape[1] == 1:
        return (maps[:, 0] > threshold).long()
    if maps.shape[1] == 2:  # argmax(1) of two channels, in one pass (ties: background)
        return (maps[:, 1] > maps[:, 0]).long()
    return maps.argmax(1)


def binarize(prob: Tensor, threshold: float = 0.5, size: Sequence[int] | None = None) -> Tensor:
    """Foreground map ``prob > threshold`` as long {0, 1}.

    prob: [B, h, w] or [B, 1, h, w]; with ``size`` = (H, W) the map is first brought to that
    size by the one resize (bilinear, align_corners=True). Returns [B, H, W]. A value equal to
    the threshold is background, matching argmax over (bg, fg) with ties going to bg.
    """
    maps = _as_maps(prob)  # [B, C, h, w]
    if maps.shape[1] != 1:
        raise ValueError(f"expected [B, 1, h, w] or [B, h, w], got {tuple(prob.shape)}")
    return decide(maps if size is None else resize(maps, size), threshold)


def restore_original(
    maps: Tensor, orig_size: Tensor, canvas: int | Sequence[int], mode: str = "pad"
) -> Tensor:
    """Bring test-size maps back to each query's original label geometry.

    maps [B, C, h, w] (float); orig_size [B, 2] = (H, W) per item; returns float
    [B, C, S, S'] (``canvas`` = S or (S, S')) with item i's [C, H, W] map in the top-left
    corner and 0 elsewhere. ``mode`` is the test resize that made the maps: "pad"
    (BAM/PFENet: longer side to the test size, padded square) upsamples to max(H, W) squared
    and keeps the top-left H x W; "squash" (both sides to the test size) upsamples to H x W.
    """
    if mode not in ("pad", "squash"):
        raise ValueError(f"mode must be 'pad' or 'squash', got {mode!r}")
    sh, sw = (canvas, canvas) if isinstance(canvas, int) else (int(canvas[0]), int(canvas[1]))
    b, c = maps.shape[:2]
    out = maps.new_zeros((b, c, sh, sw), dtype=torch.float32)  # [B, C, S, S']
    for i, (h, w) in enumerate(orig_size.tolist()):  # each item at its own original size
        if h > sh or w > sw:
            raise ValueError(f"original size {h}x{w} exceeds the canvas {sh}x{sw}")
        side = (max(h, w),) * 2 if mode == "pad" else (h, w)
        up = resize(maps[i : i + 1].float(), side)  # [1, C, *side]
        out[i, :, :h, :w] = up[0, :, :h, :w]
    return out


def original_size_prediction(
    output: Tensor, batch: Mapping[str, Tensor], mode: str = "pad", threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """(prediction, target), both long [B, S, S], scored at original label size.

    ``output``: logits [B, C, h, w] (argmax) or foreground probability [B, (1,) h, w]
    (> threshold) at test size; ``batch`` holds ``query_mask_orig`` [B, S, S] (each label
    top-left, 255 elsewhere) and ``query_orig_size`` [B, 2]; ``mode``: the test resize
    (:func:`restore_original`). The prediction is 0 outside each H x W, where the target's 255
    makes it count nowhere.
    """
    if "query_mask_orig" not in batch:
        raise KeyError(
            "scoring at original size needs query_mask_orig / query_orig_size in the batch: "
            "build the episodes with original_size=S (EpisodeDataset / EpisodicDataModule)"
        )
    target = batch["query_mask_orig"]  # [B, S, S]
    maps = restore_original(
        _as_maps(output), batch["query_orig_size"], tuple(target.shape[-2:]), mode
    )  # [B, C, S, S]
    return decide(maps, threshold).to(target.device), target


# ---------------------------------------------------------------------- metric


class FSSIoU(Metric):
    """Class-wise IoU, mIoU and FB-IoU of binary episode predictions.

    Args:
        num_classes: classes of the fold (``class_idx`` ranges over 0..num_classes-1).
        ignore_index: target value excluded from every count.

    ``update(pred [B, H, W] {0, 1} (nonzero = fg), target [B, H, W] {0, 1, ignore},
    class_idx [B] long or int)``. ``compute()`` returns CPU tensors: ``mIoU``, ``FB-IoU``,
    ``fg-IoU``, ``bg-IoU`` (scalars, percent) and ``per_class`` [num_classes] (percent,
    NaN for classes without episodes).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    intersection: Tensor
    union: Tensor
    episodes: Tensor
    fb_intersection: Tensor
    fb_union: Tensor

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        zeros_c = torch.zeros(self.num_classes, dtype=torch.long)
        self.add_state("intersection", zeros_c.clone(), dist_reduce_fx="sum")  # [C]
        self.add_state("union", zeros_c.clone(), dist_reduce_fx="sum")  # [C]
        self.add_state("episodes", zeros_c.clone(), dist_reduce_fx="sum")  # [C]
        zeros_2 = torch.zeros(2, dtype=torch.long)
        self.add_state("fb_intersection", zeros_2.clone(), dist_reduce_fx="sum")  # [bg, fg]
        self.add_state("fb_union", zeros_2.clone(), dist_reduce_fx="sum")  # [bg, fg]

    def update(self, pred: Tensor, target: Tensor, class_idx: Tensor | int) -> None:
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(
                f"pred and target must both be [B, H, W]; got {tuple(pred.shape)} and "
                f"{tuple(target.shape)} (resize predictions to the label size first)"
            )
        b = pred.shape[0]
        class_idx = torch.as_tensor(class_idx, device=pred.device).long().reshape(-1)
        if class_idx.numel() == 1 and b != 1:
            class_idx = class_idx.expand(b)
        if class_idx.numel() != b:
            raise ValueError(f"class_idx has {class_idx.numel()} entries for a batch of {b}")

        valid = target != self.ignore_index  # [B, H, W]
        p_fg = pred != 0
        t_fg = target == 1
        t_bg = target == 0
        fg_i = (p_fg & t_fg).flatten(1).sum(1)  # [B]
        fg_u = ((p_fg | t_fg) & valid).flatten(1).sum(1)  # [B]
        bg_i = (~p_fg & t_bg).flatten(1).sum(1)  # [B]
        bg_u = ((~p_fg | t_bg) & valid).flatten(1).sum(1)  # [B]

        # One-hot sum instead of index_add_: deterministic on every device.
        onehot = F.one_hot(class_idx, self.num_classes).long()  # [B, C]
        self.intersection += (onehot * fg_i[:, None]).sum(0)
        self.union += (onehot * fg_u[:, None]).sum(0)
        self.episodes += onehot.sum(0)
        self.fb_intersection += torch.stack([bg_i.sum(), fg_i.sum()])
        self.fb_union += torch.stack([bg_u.sum(), fg_u.sum()])

    @staticmethod
    def _iou(inter: Tensor, union: Tensor) -> Tensor:
        inter, union = inter.detach().cpu().double(), union.detach().cpu().double()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))

    def compute(self) -> dict[str, Tensor]:
        seen = self.episodes.detach().cpu() > 0  # [C]
        iou = self._iou(self.intersection, self.union) * 100.0  # [C]
        per_class = torch.where(seen, iou, torch.full_like(iou, float("nan")))
        miou = iou[seen].mean() if bool(seen.any()) else torch.tensor(float("nan"))
        bg_iou, fg_iou = (self._iou(self.fb_intersection, self.fb_union) * 100.0).unbind()
        return {
            "mIoU": miou,
            "FB-IoU": (fg_iou + bg_iou) / 2.0,
            "fg-IoU": fg_iou,
            "bg-IoU": bg_iou,
            "per_class": per_class,
        }


# ---------------------------------------------------------------------- scoring


def score(metric: FSSIoU, output: Tensor, batch: Mapping[str, Tensor], protocol: Protocol) -> None:
    """Update ``metric`` with one batch as ``protocol`` scores it.

    ``output``: 2-class logits [B, 2, h, w] (the prediction) or a foreground probability
    [B, (1,) h, w] (the guidance map, binarised at 0.5: GmIoU). With
    ``protocol.score_at_original`` and a batch carrying ``query_mask_orig`` /
    ``query_orig_size`` (EpisodeDataset ``original_size``) it is scored against the
    original-size label (:func:`original_size_prediction`, ``protocol.resize`` geometry);
    otherwise resized to ``query_mask`` [B, H, W] and scored there.
    """
    if protocol.score_at_original and "query_mask_orig" in batch:
        pred, target = original_size_prediction(output, batch, protocol.resize)
    else:
        target = batch["query_mask"]  # [B, H, W]
        pred = decide(resize(_as_maps(output), target.shape[-2:]))  # [B, H, W]
    metric.update(pred, target, batch["class_idx"])


def flatten_results(
    results: dict[str, Tensor],
    prefix: str = "",
    class_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Flat ``{prefix}{key}: float`` dict for logging/JSON; ``per_class`` becomes
    ``{prefix}IoU/class_{id}`` (``class_ids`` default: 0-based positions), NaN entries skipped.
    """
    out: dict[str, float] = {}
    for key, value in results.items():
        if key == "per_class":
            ids = list(range(value.numel())) if class_ids is None else list(class_ids)
            if len(ids) != value.numel():
                raise ValueError(f"{len(ids)} class_ids for {value.numel()} classes")
            for cid, v in zip(ids, value.tolist(), strict=True):
                if v == v:  # not NaN
                    out[f"{prefix}IoU/class_{cid}"] = float(v)
        else:
            out[f"{prefix}{key}"] = float(value)
    return out


def episode_results(
    iou: FSSIoU, gm: FSSIoU, prefix: str = "", class_ids: Sequence[int] | None = None
) -> dict[str, float]:
    """Flat results of the prediction's metric ``iou`` (:func:`flatten_results`) plus
    ``{prefix}GmIoU``, the mIoU of the guidance map's metric ``gm``; percent."""
    results = flatten_results(iou.compute(), prefix, class_ids)
    results[f"{prefix}GmIoU"] = float(gm.compute()["mIoU"])
    return results


def classes_drawn(
    results: Mapping[str, object], class_ids: Sequence[int], prefix: str = "test/"
) -> int:
    """How many of ``class_ids`` had at least one episode: those with a per-class IoU
    ``{prefix}IoU/class_<id>`` in flat ``results`` (:func:`flatten_results` leaves the others
    out). mIoU averages these classes only."""
    return sum(f"{prefix}IoU/class_{int(c)}" in results for c in class_ids)


# ---------------------------------------------------------------------- semantic (stage 1)


def semantic_results(
    confmat: Tensor, class_ids: Sequence[int], prefix: str = "val/"
) -> dict[str, float]:
    """The base learner's scores from a confusion matrix [N + 1, N + 1] (rows: target, columns:
    prediction; index 0 background, j the base class ``class_ids[j - 1]``), accumulated over
    every image (torchmetrics ``MulticlassConfusionMatrix`` with ``ignore_index=255``).

    Per-class IoU = diag / (row + column - diag) as ``{prefix}IoU/class_<id>`` (percent) for
    the base classes with target pixels in the validation set; ``{prefix}mIoU`` = their mean,
    without background (BAM's stage-1 validation); ``{prefix}classes_present`` counts them. The
    averaged classes are fixed by the labels, never by the predictions (a class without any
    target pixel has no IoU; BAM's validation sets hold every base class).
    """
    cm = confmat.double()
    if len(class_ids) + 1 != cm.shape[0]:
        raise ValueError(f"{len(class_ids)} class ids for a {tuple(cm.shape)} confusion matrix")
    inter = cm.diagonal()  # [N + 1]
    target = cm.sum(1)  # [N + 1] target pixels per class
    union = target + cm.sum(0) - inter  # [N + 1]
    out: dict[str, float] = {}
    ious = []
    for j, cid in enumerate(class_ids, start=1):
        if target[j] > 0:
            iou = float(100.0 * inter[j] / union[j])
            out[f"{prefix}IoU/class_{int(cid)}"] = iou
            ious.append(iou)
    out[f"{prefix}mIoU"] = sum(ious) / len(ious) if ious else float("nan")
    out[f"{prefix}classes_present"] = float(len(ious))
    return out
