"""BAM's meta learner (Lang et al. 2022, model/BAM.py), the decoder CGMGM's guidance feeds.

    query     cat(layer2, layer3) -> down_query: 1x1 -> 256, no bias, ReLU, Dropout2d(0.5)
    support   cat(layer2, layer3) -> down_supp  (same layers, own weights)
    prototype masked average of the support features (eps 5e-4), tiled over the query
    merge     init_merge: cat(query, prototype, guidance maps) -> 1x1 -> 256, no bias, ReLU
    ASPP      global pooling + 1x1, 1x1, 3x3 at rates 6, 12, 18 (bias, ReLU, no BN) -> 1280
    res1      1x1 1280 -> 256, no bias, ReLU
    res2      two 3x3 256 -> 256, no bias, ReLU; added to its input
    cls       3x3 256, no bias, ReLU, Dropout2d(0.1), 1x1 -> 2 (with bias)

BAM gives ``init_merge`` one guidance map, the cosine prior; here it takes ``guidance_channels``
maps (any subset of cosine prior, IMGR initial mask, GMM posterior: :mod:`cgmgm.models.cgmgm`).
Child names follow BAM's (``down_query``, ``down_supp``, ``init_merge``, ``ASPP_meta`` ->
``aspp``, ``res1_meta`` -> ``res1``, ``res2_meta`` -> ``res2``, ``cls_meta`` -> ``cls``). No
batch norm anywhere, so it trains with any batch size, one episode included.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PROTOTYPE_EPS = 5e-4  # BAM's Weighted_GAP


def _conv(cin: int, cout: int, k: int, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=bias)


def projection(in_channels: int, channels: int) -> nn.Sequential:
    """BAM's down_query / down_supp: 1x1 -> ``channels``, no bias, ReLU, Dropout2d(0.5)."""
    return nn.Sequential(_conv(in_channels, channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(0.5))


class ASPP(nn.Module):
    """BAM's ASPP: [global pooling -> 1x1 (tiled), 1x1, 3x3 at each rate], convolutions with
    bias and ReLU, concatenated: [B, C, H, W] -> [B, (len(rates) + 2) * C, H, W]."""

    def __init__(self, channels: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        branch = [_conv(channels, channels, 1, bias=True)]
        branch += [_conv(channels, channels, 3, r, bias=True) for r in rates]
        self.pool = nn.Sequential(_conv(channels, channels, 1, bias=True), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList(nn.Sequential(c, nn.ReLU(inplace=True)) for c in branch)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand_as(x)  # [B, C, H, W]
        return torch.cat([pooled] + [b(x) for b in self.branches], 1)


class MetaLearner(nn.Module):
    """query [B, C, h, w] (down_query's output), prototype [B, C], guidance [B, G, h, w] ->
    meta logits [B, 2, h, w] (bg, fg). ``down_query`` / ``down_supp`` are applied by the
    caller, which also needs their features for the prototype and the mixtures."""

    def __init__(self, in_channels: int, channels: int = 256, guidance_channels: int = 1):
        super().__init__()
        self.down_query = projection(in_channels, channels)
        self.down_supp = projection(in_channels, channels)
        self.init_merge = nn.Sequential(
            _conv(2 * channels + guidance_channels, channels, 1), nn.ReLU(inplace=True)
        )
        self.aspp = ASPP(channels)
        self.res1 = nn.Sequential(_conv(5 * channels, channels, 1), nn.ReLU(inplace=True))
        self.res2 = nn.Sequential(
            _conv(channels, channels, 3),
            nn.ReLU(inplace=True),
            _conv(channels, channels, 3),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Sequential(
            _conv(channels, channels, 3),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(channels, 2, 1),
        )

    def forward(self, query: Tensor, prototype: Tensor, guidance: Tensor) -> Tensor:
        proto = prototype[..., None, None].expand_as(query)  # [B, C, h, w]
        x = self.init_merge(torch.cat([query, proto, guidance], 1))  # [B, C, h, w]
        x = self.res1(self.aspp(x))  # [B, C, h, w]
        x = self.res2(x) + x
        return self.cls(x)  # [B, 2, h, w]
