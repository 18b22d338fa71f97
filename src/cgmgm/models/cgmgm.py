"""CGMGM: backbone -> IMGR -> CDGMG -> QCPE -> decoder (paper Fig. 2).

    images --backbone (frozen)--> mid X (L2+L3 -> 1x1 -> 256), high X^h (L4)
    IMGR  (Eq. 2-7)   X^h_s, X^h_q, M_s          -> initial query mask M_q
    CDGMG (Eq. 8-11)  X_s, X_q, M_s, M_q         -> theta_fg, theta_bg
    QCPE  (Eq. 12-13) X_q, theta                 -> p(fg | x)
    decoder           [X_q, prototype, guidance] -> 2-class logits

Ablation switches (Tables 1 and 5, Fig. 6): ``guidance`` "gmm" (C&Q on) or "cosine" (the
prototype + cosine-prior baseline, C&Q off); ``img`` / ``imr`` (IMGR parts); ``components`` and
``covariance`` of the mixtures. ``training_free=True`` keeps only the frozen backbone: the
mixtures are fitted on its mid features as they are and the prediction is the posterior's argmax.

Every switch is a required keyword: the model's defaults live in one place, the Hydra config
``conf/model/cgmgm.yaml`` (``cgmgm.config.compose_model()`` gives them to Python callers).

K shots (``kshot``): "mean" (BAM) averages one cosine prior and one prototype per shot; "pool"
pools the pixels of every shot into one prior and one prototype. The mixtures are always fitted
on the pixels of every shot together.

``base_learner`` (optional, from a stage-1 checkpoint): BAM's base learner
(:mod:`cgmgm.models.base_learner`), frozen, on the backbone's high-level features
(:meth:`CGMGM.base_logits`), for BAM's ensemble.

Query pixels outside the image (``query_valid`` = 0: the padding of BAM's test resize) enter
no fit and no normalisation; a feature cell counts as inside when at least half its area is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgmgm.models.decoder import Decoder
from cgmgm.models.gmm import CDGMG
from cgmgm.models.imgr import IMGR
from cgmgm.models.qcpe import QCPE
from cgmgm.models.resize import resize

GUIDANCES = ("gmm", "cosine")


def mask_fractions(masks: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Label masks [..., H, W] (0 bg, 1 fg, 255 ignore) -> (fg, bg) area fractions at ``size``.

    Each output cell holds the fraction of its input area that is fg (or bg); ignore pixels
    count for neither, so fg + bg < 1 near ignore borders.
    """
    lead = masks.shape[:-2]
    m = masks.reshape(-1, 1, *masks.shape[-2:])
    onehot = torch.cat([(m == 1), (m == 0)], 1).float()  # [N, 2, H, W]
    frac = F.adaptive_avg_pool2d(onehot, size)  # [N, 2, h, w]
    fg, bg = frac[:, 0].reshape(*lead, *size), frac[:, 1].reshape(*lead, *size)
    return fg, bg


def masked_average(features: Tensor, weight: Tensor, kshot: str) -> Tensor:
    """Masked average pooling: [B, K, C, H, W], [B, K, H, W] -> prototype [B, C].

    kshot "mean": one prototype per shot, averaged over shots (BAM); "pool": one average over
    the pixels of every shot.
    """
    if kshot == "pool":
        num = (features * weight[:, :, None]).sum((1, 3, 4))  # [B, C]
        return num / (weight.sum((1, 2, 3))[:, None] + 1e-5)
    num = (features * weight[:, :, None]).sum((3, 4))  # [B, K, C]
    return (num / (weight.sum((2, 3))[..., None] + 1e-5)).mean(1)


def valid_cells(query_valid: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixels inside the image [B, H, W] (bool or 0/1) -> feature cells [B, 1, h, w] (0/1 float)
    whose area is at least half inside."""
    frac = F.adaptive_avg_pool2d(query_valid[:, None].float(), size)  # [B, 1, h, w]
    return (frac >= 0.5).float()


class CGMGM(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        *,
        guidance: str,
        img: bool,
        imr: bool,
        kshot: str,
        threshold: float,
        proj_dim: int,
        training_free: bool,
        components: int,
        covariance: str,
        em_iters: int,
        gmm_grad: bool,
        reg_covar: float,
        base_learner: nn.Module | None = None,
    ):
        super().__init__()
        if guidance not in GUIDANCES:
            raise ValueError(f"CGMGM: guidance must be one of {GUIDANCES}, got {guidance!r}")
        if training_free and guidance != "gmm":
            raise ValueError("CGMGM: training_free predicts the GMM posterior; use guidance='gmm'")
        self.backbone = backbone
        self.guidance = guidance
        self.training_free = training_free
        self.kshot = kshot  # checked by IMGR
        self.imgr = IMGR(img=img, imr=imr, threshold=threshold, kshot=kshot)
        self.cdgmg = CDGMG(components, covariance, em_iters, gmm_grad, reg_covar)
        self.qcpe = QCPE()
        if training_free:
            self.proj, self.decoder = None, None
        else:
            self.proj = nn.Sequential(
                nn.Conv2d(backbone.mid_channels, proj_dim, 1, bias=False), nn.ReLU(inplace=True)
            )
            self.decoder = Decoder(proj_dim, guidance_channels=1)
        # BAM's stage-1 base learner on the backbone's last stage, frozen like the backbone
        # (BatchNorm and dropout in eval mode; BAM leaves its dropout on, a quirk not kept)
        self.base_learner = base_learner
        if base_learner is not None:
            base_learner.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> CGMGM:
        super().train(mode)
        if self.base_learner is not None:
            self.base_learner.eval()  # frozen: ignore the parent's .train()
        return self

    def base_logits(self, high: Tensor) -> Tensor:
        """The frozen base learner on high-level features [B, Ch, h, w] -> logits
        [B, N + 1, h, w] over the stage-1 base classes + background (BAM's ensemble input)."""
        if self.base_learner is None:
            raise RuntimeError("this model has no base learner: train it with base_ckpt=")
        with torch.no_grad():
            return self.base_learner(high)

    def forward(
        self,
        query_img: Tensor,
        support_imgs: Tensor,
        support_masks: Tensor,
        query_valid: Tensor | None = None,
    ) -> dict:
        """query_img [B, 3, H, W]; support_imgs [B, K, 3, H, W]; support_masks [B, K, H, W]
        (0 bg, 1 fg, 255 ignore), images as floats in [0, 1]; query_valid [B, H, W] (1 inside
        the image, 0 on padding) or None (every pixel is inside).

        Returns a dict: ``logits`` [B, 2, H, W]; at the feature resolution [B, 1, h, w]:
        ``guidance`` (the map given to the decoder), ``cosine_prior`` (Eq. 2), ``coarse_mask``
        (M_q^0), ``initial_mask`` (M_q), and for guidance "gmm" ``posterior`` p(fg|x) and
        ``log_likelihood`` [B, 2, h, w] (bg, fg).
        """
        b, k = support_imgs.shape[:2]
        if support_masks.shape != (b, k, *support_imgs.shape[-2:]):
            raise ValueError(
                f"support_masks must be [B, K, H, W]={(b, k, *support_imgs.shape[-2:])}, "
                f"got {tuple(support_masks.shape)}"
            )
        query = self.backbone(query_img)  # ([B, Cm, h, w], [B, Ch, h, w])
        support = self.backbone(support_imgs.flatten(0, 1))  # ([B*K, Cm, h, w], [B*K, Ch, h, w])
        size = tuple(query_img.shape[-2:])
        return self.from_features(query, support, support_masks, query_valid, size)

    def from_features(
        self,
        query: tuple[Tensor, Tensor],
        support: tuple[Tensor, Tensor],
        support_masks: Tensor,
        query_valid: Tensor | None,
        size: tuple[int, int],
    ) -> dict:
        """:meth:`forward` after the frozen backbone: ``query`` = (mid [B, Cm, h, w], high
        [B, Ch, h, w]) and ``support`` = (mid [B*K, Cm, h, w], high [B*K, Ch, h, w]), the
        backbone's outputs (e.g. from a feature cache); ``support_masks`` [B, K, H, W] and
        ``query_valid`` [B, H, W] or None at the input size; ``size`` = (H, W) of the query image,
        the size of ``logits``."""
        (mid_q, high_q), (mid_s, high_s) = query, support
        b, k = support_masks.shape[:2]
        if mid_s.shape[0] != b * k:
            raise ValueError(
                f"{mid_s.shape[0]} support feature maps for B x K = {b} x {k} support masks"
            )
        if self.proj is not None:
            mid_q, mid_s = self.proj(mid_q), self.proj(mid_s)  # [*, 256, h, w]
        cells = mid_q.shape[-2:]  # (h, w)
        mid_s = mid_s.unflatten(0, (b, k))  # [B, K, D, h, w]
        high_s = high_s.unflatten(0, (b, k))  # [B, K, Ch, h, w]
        fg, bg = mask_fractions(support_masks, cells)  # [B, K, h, w] each
        valid = None if query_valid is None else valid_cells(query_valid, cells)  # [B, 1, h, w]

        out = self.imgr(high_q, high_s, fg, valid)
        if self.guidance == "gmm":
            query_fg = out["initial_mask"] if self.imgr.img else None
            theta = self.cdgmg(mid_s, fg, bg, mid_q, query_fg, valid)  # [B, 2] (bg, fg)
            out.update(self.qcpe(mid_q, theta))
            out["guidance"] = out["posterior"]
        else:
            out["guidance"] = out["cosine_prior"]

        if self.training_free:
            # upsampled by the one resize that also scores guidance maps: scored at the input
            # size, the prediction is the posterior map binarised at 0.5 (its mIoU equals its
            # GmIoU); at original size the two are close, not equal
            p = resize(out["posterior"], size)  # [B, 1, H, W]
            out["logits"] = torch.cat([1 - p, p], 1).clamp_min(1e-6).log()
        else:
            prototype = masked_average(mid_s, fg, self.kshot)  # [B, D]
            logits = self.decoder(mid_q, prototype, out["guidance"])
            out["logits"] = resize(logits, size)  # [B, 2, H, W]
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The new layers (projection, decoder); the backbone stays frozen."""
        return [p for p in self.parameters() if p.requires_grad]
