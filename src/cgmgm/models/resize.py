"""The one resize of prediction maps (logits, foreground probabilities, guidance maps).

Bilinear with ``align_corners=True``, as BAM upsamples its outputs, for the loss and the
prediction (model/BAM.py) and for scoring at original size (test.py ``ori_resize``). It lives
with the model, which upsamples its logits with it, and depends on torch only, so the scoring
module (:mod:`cgmgm.metrics`), the LightningModule and the figures import it without the model
ever importing them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize"]


def resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (align_corners=True) of float maps [B, C, h, w] to ``size`` = (H, W):
    returns [B, C, H, W], ``maps`` itself when it already has that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)
