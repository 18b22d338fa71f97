import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class TinyBackbone(nn.Module):
    """A frozen stand-in with the backbone contract: (mid, high) at output stride 8; mid's
    first ``low_channels`` are the low-level features (BAM's layer2, for the Gram matrices)."""

    low_channels, mid_channels, high_channels = 6, 12, 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mid = nn.Conv2d(3, self.mid_channels, 8, stride=8, padding=0)
        self.high = nn.Conv2d(self.mid_channels, self.high_channels, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
            p.requires_grad_(False)

    def forward(self, x):
        x = nn.functional.pad(x, (0, (-x.shape[-1]) % 8, 0, (-x.shape[-2]) % 8))
        mid = torch.relu(self.mid(x))
        return mid, torch.relu(self.high(mid))


@pytest.fixture
def tiny_backbone():
    return TinyBackbone()


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real-photo data lives in ../shared/data)")
    return SHARED_DATA
