"""Few-shot segmentation metrics (BAM protocol), exact under DDP.

States are integer pixel counts reduced by sum, so splitting episodes across
processes and summing equals one process seeing them all. Results are in percent.

- per-class IoU = sum of intersections / sum of unions over all episodes of the class;
- mIoU = mean per-class IoU over the classes that appeared (had >= 1 episode);
- FB-IoU = mean of the accumulated foreground IoU and background IoU;
- GmIoU (paper Table 1) = mIoU of a guidance map binarised at 0.5 (:func:`binarize`),
  i.e. a second :class:`FSSIoU` instance fed with the binarised map.

Pixels whose target is ``ignore_index`` (255) count nowhere. A union of 0 gives IoU 0
(BAM's ``I / (U + 1e-10)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["FSSIoU", "binarize", "classes_drawn", "flatten_results"]


def binarize(prob: Tensor, threshold: float = 0.5, size: tuple[int, int] | None = None) -> Tensor:
    """Foreground map ``prob > threshold`` as long {0, 1}.

    prob: [B, h, w] or [B, 1, h, w]; if ``size`` = (H, W) differs from (h, w) the map is
    first resized bilinearly (align_corners=False). Returns [B, H, W]. A value equal to the
    threshold is background, matching argmax over (bg, fg) with ties going to bg.
    """
    if prob.dim() == 4:
        if prob.shape[1] != 1:
            raise ValueError(f"expected [B, 1, h, w] or [B, h, w], got {tuple(prob.shape)}")
        prob = prob[:, 0]
    if prob.dim() != 3:
        raise ValueError(f"expected [B, 1, h, w] or [B, h, w], got {tuple(prob.shape)}")
    if size is not None and tuple(prob.shape[-2:]) != tuple(size):
        prob = F.interpolate(prob[:, None].float(), size=size, mode="bilinear")[:, 0]
    return (prob > threshold).long()


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

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs) -> None:
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


def classes_drawn(
    results: Mapping[str, object], class_ids: Sequence[int], prefix: str = "test/"
) -> int:
    """How many of ``class_ids`` had at least one episode: those with a per-class IoU
    ``{prefix}IoU/class_<id>`` in flat ``results`` (:func:`flatten_results` leaves the others
    out). mIoU averages these classes only."""
    return sum(f"{prefix}IoU/class_{int(c)}" in results for c in class_ids)
