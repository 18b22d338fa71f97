"""The parametric decoder: ASPP for multi-scale context, then convolutions with ReLU.

Input: the query features, the support prototype broadcast over the query (masked average
pooling, as BAM/PFENet) and the guidance map (the QCPE posterior, or the cosine prior for
the prototype + cosine baseline). Output: 2-class logits at the feature resolution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.ReLU(inplace=True)
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling without batch norm (as BAM's meta learner), so that it
    trains with any batch size, one episode included: a 1x1 branch, one dilated 3x3 branch
    per rate and an image-pooling branch, concatenated and fused by a 1x1 convolution."""

    def __init__(self, channels: int, rates: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_relu(channels, channels, 1)]
            + [_conv_relu(channels, channels, 3, r) for r in rates]
        )
        self.pool = _conv_relu(channels, channels, 1)
        self.fuse = _conv_relu(channels * (len(rates) + 2), channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand_as(x)
        return self.fuse(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class Decoder(nn.Module):
    def __init__(
        self,
        channels: int = 256,
        guidance_channels: int = 1,
        num_classes: int = 2,
        rates: tuple[int, ...] = (6, 12, 18),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.merge = _conv_relu(2 * channels + guidance_channels, channels, 1)
        self.aspp = ASPP(channels, rates)
        self.refine = nn.Sequential(_conv_relu(channels, channels), _conv_relu(channels, channels))
        self.head = nn.Sequential(
            _conv_relu(channels, channels),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, query: Tensor, prototype: Tensor, guidance: Tensor) -> Tensor:
        """query [B, C, H, W]; prototype [B, C]; guidance [B, G, H, W] -> logits [B, 2, H, W]."""
        proto = prototype[..., None, None].expand_as(query)  # [B, C, H, W]
        x = self.merge(torch.cat([query, proto, guidance], 1))
        x = self.aspp(x)
        x = x + self.refine(x)
        return self.head(x)
