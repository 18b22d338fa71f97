"""BAM's base learner: a PSPNet head on the backbone's last stage (BAM's stage 1).

    X^h [B, C, h, w] --PPM (bins 1, 2, 3, 6)--> [B, 2C, h, w] --cls--> logits [B, N + 1, h, w]

- PPM (pyramid pooling): per bin b, adaptive average pooling to b x b, a 1x1 convolution
  C -> C / 4 without bias, BatchNorm, ReLU, upsampled back to h x w (bilinear,
  align_corners=True: :func:`cgmgm.models.resize.resize`) and concatenated after X^h
  (C + 4 * C / 4 = 2C channels; ResNet-50: 2048 -> 4096, 512 per bin).
- cls: 3x3 convolution 2C -> 512 without bias, BatchNorm, ReLU, Dropout2d(0.1), 1x1
  convolution 512 -> N + 1 with bias (N base classes of the fold, plus background = 0).

Child names follow BAM's PSPNet (``ppm.features.{i}.{1,2}``, ``cls.{0,1,4}``), so the head of
a BAM stage-1 checkpoint (``initmodel/PSPNet/.../best.pth``) loads into it unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cgmgm.models.resize import resize

__all__ = ["PPM", "BaseLearner", "PPM_BINS"]

PPM_BINS = (1, 2, 3, 6)


class PPM(nn.Module):
    """Pyramid pooling: [B, C, h, w] -> [B, C + len(bins) * reduction, h, w]."""

    def __init__(self, channels: int, reduction: int, bins: tuple[int, ...] = PPM_BINS):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(channels, reduction, 1, bias=False),
                nn.BatchNorm2d(reduction),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [resize(f(x), size) for f in self.features], 1)


class BaseLearner(nn.Module):
    """PSPNet head: high-level features [B, C, h, w] -> logits [B, num_classes, h, w]
    (``num_classes`` = the fold's base classes + background)."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        bins = len(PPM_BINS)
        if channels % bins:
            raise ValueError(f"PPM needs channels divisible by {bins}, got {channels}")
        self.channels, self.num_classes = int(channels), int(num_classes)
        self.ppm = PPM(channels, channels // bins)
        self.cls = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, num_classes, 1),
        )

    def forward(self, high: Tensor) -> Tensor:
        """high [B, C, h, w] -> logits [B, num_classes, h, w] (at the feature resolution)."""
        return self.cls(self.ppm(high))
