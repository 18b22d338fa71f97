"""BAM's stage-1 network: the backbone, fine-tuned, under the base learner (a PSPNet).

    images [B, 3, H, W] in [0, 1] --normalise--> body --layer4 X^h--> BaseLearner
        --> logits [B, N + 1, h, w] --resize--> [B, N + 1, H, W]

The body is the backbone's (:class:`~cgmgm.models.backbone.Backbone` ``.body``, so its weights
keep the backbone's key names and go back into a frozen backbone for stage 2), here with
gradients and BatchNorm in training mode: BAM fine-tunes it on the fold's base classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from cgmgm.models.backbone import Backbone
from cgmgm.models.base_learner import BaseLearner
from cgmgm.models.resize import resize

__all__ = ["PSPNet"]


class PSPNet(nn.Module):
    """Fine-tunable backbone body + :class:`BaseLearner` over ``num_classes`` (base + bg)."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.body = backbone.body.requires_grad_(True).train()  # the Backbone kept it in eval
        self.register_buffer("mean", backbone.mean.clone(), persistent=False)
        self.register_buffer("std", backbone.std.clone(), persistent=False)
        self.head = BaseLearner(backbone.high_channels, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> logits [B, num_classes, H, W]."""
        high = self.body((images - self.mean) / self.std)[-1]  # [B, C, ceil(H/8), ceil(W/8)]
        return resize(self.head(high), images.shape[-2:])
