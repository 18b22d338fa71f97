"""BAM's ensemble: the meta learner's output fused with the frozen base learner's (BAM, Sec. 3).

    G(f)     = f f^T / (|f_i| |f_j| + 1e-7)       channel cosines of low-level features f [C, HW]
    psi_k    = ||G(f_q) - G(f_s,k)||_F / C         scene difference of the query and shot k
    w        = softmax_k(rw(sort(psi))) unsorted   K-shot weights (K > 1; w = 1 for one shot)
    psi      = sum_k w_k psi_k
    B        = sum over base classes of softmax(base logits)   base background (in training the
                                                                episode's own class is left out)
    bg', fg' = g0 p_meta_bg + g1 psi, g0 p_meta_fg + g1 psi     ``gram_merge`` (1x1, 2 -> 1)
    bg_final = v0 bg' + v1 B                                    ``cls_merge``  (1x1, 2 -> 1)
    final    = [bg_final, fg']                                  scored like logits (BAM)

``gram_merge`` and ``cls_merge`` have no bias and start at [1, 0], where ``final`` is the meta
learner's softmax exactly. ``rw`` is BAM's 1x1 convolutions K -> 2 -> K with a ReLU between.
The low-level features are the backbone's layer2 (BAM's ``low_fea``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Ensemble", "KShotReweighting", "base_background", "gram_matrix", "scene_difference"]

GRAM_EPS = 1e-7


def gram_matrix(features: Tensor) -> Tensor:
    """features [B, C, H, W] -> channel cosines [B, C, C]."""
    with torch.autocast(features.device.type, enabled=False):  # fp32 under autocast too
        f = features.flatten(2).float()  # [B, C, HW]
        norm = f.norm(dim=2, keepdim=True)  # [B, C, 1]
        return (f @ f.transpose(1, 2)) / (norm @ norm.transpose(1, 2) + GRAM_EPS)


def scene_difference(query_low: Tensor, support_low: Tensor) -> Tensor:
    """psi_k: query [B, C, H, W], support [B, K, C, H, W] low-level features -> [B, K]."""
    b, k = support_low.shape[:2]
    g_q = gram_matrix(query_low)  # [B, C, C]
    g_s = gram_matrix(support_low.flatten(0, 1)).unflatten(0, (b, k))  # [B, K, C, C]
    c = g_q.shape[-1]
    return (g_q[:, None] - g_s).flatten(2).norm(dim=2) / c  # ||.||_F / ||1_{CxC}||_F


class KShotReweighting(nn.Module):
    """BAM's K-shot weights: psi [B, K] -> weights [B, K] (softmax over shots).

    The shots' psi are sorted ascending, mapped by 1x1 convolutions K -> hidden -> K (ReLU
    between), put back in the shots' order and normalised by a softmax, so the weights are
    equivariant to the order of the shots. One shot: weight 1, no parameters used.
    """

    def __init__(self, shot: int, hidden: int = 2):
        super().__init__()
        self.shot = int(shot)
        self.rw = None
        if self.shot > 1:
            self.rw = nn.Sequential(
                nn.Conv2d(self.shot, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, shot, 1)
            )

    def forward(self, psi: Tensor) -> Tensor:
        if psi.shape[1] != self.shot:
            raise ValueError(
                f"psi has {psi.shape[1]} shots, the reweighting was built for {self.shot}"
            )
        if self.rw is None:
            return torch.ones_like(psi)
        ordered, order = psi.sort(dim=1)  # [B, K]
        scores = self.rw(ordered[..., None, None])[..., 0, 0]  # [B, K], sorted order
        back = torch.empty_like(scores).scatter_(1, order, scores)  # the shots' order
        return back.softmax(dim=1)


def base_background(base_logits: Tensor, exclude: Tensor | None = None) -> Tensor:
    """B [B, 1, h, w]: the base learner's probability summed over its base classes (channels
    1..N of ``base_logits`` [B, N + 1, h, w]); ``exclude`` [B] long: per item, a base label
    (1..N) left out of the sum (the episode's own class, in training), or -1 for none."""
    prob = base_logits.softmax(dim=1)[:, 1:]  # [B, N, h, w]
    if exclude is None:
        return prob.sum(1, keepdim=True)
    labels = torch.arange(1, base_logits.shape[1], device=base_logits.device)  # [N]
    keep = (labels[None] != exclude[:, None]).to(prob.dtype)  # [B, N]
    return (prob * keep[:, :, None, None]).sum(1, keepdim=True)


def _merge_conv() -> nn.Conv2d:
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    return conv


class Ensemble(nn.Module):
    """The fusion (see the module docstring): meta logits [B, 2, h, w], base background
    [B, 1, h, w] and psi [B] -> final [B, 2, h, w] (bg, fg)."""

    def __init__(self):
        super().__init__()
        self.gram_merge = _merge_conv()
        self.cls_merge = _merge_conv()

    def forward(self, meta_logits: Tensor, base_bg: Tensor, psi: Tensor) -> Tensor:
        p = meta_logits.softmax(dim=1)  # [B, 2, h, w]
        psi_map = psi.view(-1, 1, 1, 1).to(p.dtype).expand_as(p[:, :1])  # [B, 1, h, w]
        bg = self.gram_merge(torch.cat([p[:, :1], psi_map], 1))  # [B, 1, h, w]
        fg = self.gram_merge(torch.cat([p[:, 1:], psi_map], 1))  # [B, 1, h, w]
        bg = self.cls_merge(torch.cat([bg, base_bg], 1))  # [B, 1, h, w]
        return torch.cat([bg, fg], 1)  # [B, 2, h, w]
