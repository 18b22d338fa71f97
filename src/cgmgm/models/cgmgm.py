"""CGMGM inside BAM: backbone -> IMGR -> CDGMG -> QCPE -> BAM's meta learner -> BAM's ensemble
(paper Fig. 2 on BAM, the system behind the paper's tables).

    images --backbone (frozen)--> mid (L2+L3), high X^h (L4), low (L2, the first mid channels)
    IMGR  (Eq. 2-7)   X^h_s, X^h_q, M_s           -> cosine prior S_G, initial query mask M_q
    CDGMG (Eq. 8-11)  X_s, X_q, M_s, M_q          -> theta_fg, theta_bg
    QCPE  (Eq. 12-13) X_q, theta                  -> posterior p(fg | x)
    meta learner      [X_q, prototype, guidance]  -> meta logits     (models/meta_learner.py)
    ensemble          meta, base learner, psi     -> final (bg, fg)  (models/ensemble.py)

``guidance``: which maps the meta learner receives, any subset of ``GUIDANCES`` = cosine prior
(BAM's), IMGR initial mask, GMM posterior, so every row of Tables 1 and 5 is a configuration
(conf/ablation/). ``img`` / ``imr`` switch the IMGR parts: without IMG the mixtures are fitted
on the support pixels alone (Table 5's "C&Q" row). The mixtures live in the query projection's
space: ``down_query``'s convolution and ReLU (before its dropout) map the query and the support
features alike, so the cross fit sees one feature space (BAM's ``down_supp`` makes the
prototype, as in BAM). ``training_free=True`` keeps only the frozen backbone: the mixtures are
fitted on its mid features as they are and the prediction is the posterior's argmax.

``base_learner`` (from a stage-1 checkpoint, frozen): with it the model is BAM's two learners
fused by BAM's ensemble, ``logits`` the final output and ``meta_logits`` the meta learner's;
without it the model is the meta learner alone (``logits`` = ``meta_logits``, ``ensemble``
False). K shots: BAM's K-shot reweighting (weights from the shots' scene differences psi)
combines the shots' cosine priors and prototypes when the model has an ensemble and
``kshot="mean"``; otherwise "mean" averages them and "pool" pools every shot's pixels. The
mixtures are always fitted on the pixels of every shot together.

Every switch is a required keyword: the model's defaults live in one place, the Hydra config
``conf/model/cgmgm.yaml`` (``cgmgm.config.compose_model()`` gives them to Python callers).

Query pixels outside the image (``query_valid`` = 0: the padding of BAM's test resize) enter
no fit and no normalisation; a feature cell counts as inside when at least half its area is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cgmgm.models.ensemble import Ensemble, KShotReweighting, base_background, scene_difference
from cgmgm.models.gmm import CDGMG
from cgmgm.models.imgr import IMGR
from cgmgm.models.meta_learner import PROTOTYPE_EPS, MetaLearner
from cgmgm.models.qcpe import QCPE
from cgmgm.models.resize import resize

# The guidance maps the meta learner can receive, in the order they are stacked; the output
# key of each ("cosine_prior" from IMGR's Eq. 2, "initial_mask" M_q, "posterior" p(fg|x)).
GUIDANCES = {"cosine": "cosine_prior", "initial_mask": "initial_mask", "posterior": "posterior"}


def check_guidance(guidance: str | Sequence[str], img: bool) -> tuple[str, ...]:
    """The guidance maps in stacking order (``GUIDANCES``'s); an error names a bad choice."""
    names = (guidance,) if isinstance(guidance, str) else tuple(guidance)
    bad = [g for g in names if g not in GUIDANCES]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(
            f"model.guidance must be a non-empty list of distinct maps from {list(GUIDANCES)}, "
            f"got {list(names)} (e.g. model.guidance=[posterior] or [cosine,posterior]; the "
            "paper's rows: ablation=bam|cq|img_cq|img_imr|cgmgm)"
        )
    if "initial_mask" in names and not img:
        raise ValueError("model.guidance has initial_mask, which needs model.img=true")
    return tuple(g for g in GUIDANCES if g in names)


def primary_guidance(guidance: Sequence[str]) -> str:
    """The map whose GmIoU is reported as ``GmIoU``: CGMGM's posterior if used, else the
    initial mask, else the cosine prior."""
    return next(g for g in ("posterior", "initial_mask", "cosine") if g in guidance)


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


def masked_average(
    features: Tensor, weight: Tensor, kshot: str, shot_weights: Tensor | None = None
) -> Tensor:
    """Masked average pooling (BAM's Weighted_GAP, eps 5e-4): [B, K, C, H, W], [B, K, H, W] ->
    prototype [B, C].

    kshot "mean": one prototype per shot, averaged over shots (BAM), or summed with
    ``shot_weights`` [B, K] (BAM's K-shot reweighting); "pool": one average over the pixels of
    every shot.
    """
    if kshot == "pool":
        if shot_weights is not None:
            raise ValueError("shot_weights weigh one prototype per shot: they need kshot='mean'")
        num = (features * weight[:, :, None]).sum((1, 3, 4))  # [B, C]
        return num / (weight.sum((1, 2, 3))[:, None] + PROTOTYPE_EPS)
    num = (features * weight[:, :, None]).sum((3, 4))  # [B, K, C]
    per_shot = num / (weight.sum((2, 3))[..., None] + PROTOTYPE_EPS)  # [B, K, C]
    if shot_weights is None:
        return per_shot.mean(1)
    return (per_shot * shot_weights[..., None]).sum(1)


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
        guidance: str | Sequence[str],
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
        shot: int = 1,
    ):
        super().__init__()
        self.guidance = check_guidance(guidance, img)
        if training_free and self.guidance != ("posterior",):
            raise ValueError(
                "CGMGM: training_free predicts the GMM posterior; use guidance=[posterior]"
            )
        if training_free and base_learner is not None:
            raise ValueError("CGMGM: the training-free model has no meta learner to ensemble")
        self.backbone = backbone
        self.training_free = training_free
        self.kshot = kshot  # checked by IMGR
        self.imgr = IMGR(img=img, imr=imr, threshold=threshold, kshot=kshot)
        self.cdgmg = CDGMG(components, covariance, em_iters, gmm_grad, reg_covar)
        self.qcpe = QCPE()
        self.meta = None
        if not training_free:
            self.meta = MetaLearner(backbone.mid_channels, proj_dim, len(self.guidance))
        # BAM's stage-1 base learner on the backbone's last stage, frozen like the backbone
        # (BatchNorm and dropout in eval mode; BAM leaves its dropout on, a quirk not kept),
        # and BAM's ensemble on top of both learners
        self.base_learner = base_learner
        self.ensemble, self.reweight = None, None
        if base_learner is not None:
            base_learner.requires_grad_(False).eval()
            self.ensemble = Ensemble()
            self.reweight = KShotReweighting(shot)

    @property
    def has_ensemble(self) -> bool:
        return self.ensemble is not None

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
        base_exclude: Tensor | None = None,
    ) -> dict:
        """query_img [B, 3, H, W]; support_imgs [B, K, 3, H, W]; support_masks [B, K, H, W]
        (0 bg, 1 fg, 255 ignore), images as floats in [0, 1]; query_valid [B, H, W] (1 inside
        the image, 0 on padding) or None (every pixel is inside); base_exclude [B] long: the
        base learner's label of each episode's class (1..N), left out of the base background
        (BAM, in training), or None (every base class counts: evaluation).

        Returns a dict: ``logits`` [B, 2, H, W] (the final output: the ensemble's, or the meta
        learner's without a base learner), ``meta_logits`` [B, 2, H, W]; at the feature
        resolution [B, 1, h, w]: ``guidance`` (the primary guidance map,
        :func:`primary_guidance`), ``cosine_prior`` (Eq. 2), ``coarse_mask`` (M_q^0),
        ``initial_mask`` (M_q), with the posterior ``posterior`` p(fg|x) and
        ``log_likelihood`` [B, 2, h, w] (bg, fg); ``guidance_maps`` [B, G, h, w]; with an
        ensemble ``psi`` [B] and ``shot_weights`` [B, K].
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
        return self.from_features(query, support, support_masks, query_valid, size, base_exclude)

    def from_features(
        self,
        query: tuple[Tensor, Tensor],
        support: tuple[Tensor, Tensor],
        support_masks: Tensor,
        query_valid: Tensor | None,
        size: tuple[int, int],
        base_exclude: Tensor | None = None,
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
        cells = mid_q.shape[-2:]  # (h, w)
        fg, bg = mask_fractions(support_masks, cells)  # [B, K, h, w] each
        valid = None if query_valid is None else valid_cells(query_valid, cells)  # [B, 1, h, w]
        high_s = high_s.unflatten(0, (b, k))  # [B, K, Ch, h, w]

        out: dict = {}
        weights = None  # [B, K]: BAM's K-shot weights, with an ensemble
        if self.ensemble is not None:
            low = self.backbone.low_channels  # layer2, the first mid channels (BAM's low_fea)
            psi_k = scene_difference(mid_q[:, :low], mid_s[:, :low].unflatten(0, (b, k)))
            weights = self.reweight(psi_k)  # [B, K]
            out["psi"] = (weights * psi_k).sum(1)  # [B]
            out["shot_weights"] = weights
        if self.kshot != "mean":
            weights = None  # "pool": one prior and one prototype over every shot's pixels
        out.update(self.imgr(high_q, high_s, fg, valid, weights))

        # the mixtures' space: down_query's 1x1 + ReLU (its dropout comes after) for the query
        # and the support alike; the backbone's own features for the training-free model
        to_space = nn.Identity() if self.meta is None else self.meta.down_query[:2]
        gmm_q = to_space(mid_q)  # [B, D, h, w]
        if "posterior" in self.guidance:
            gmm_s = to_space(mid_s).unflatten(0, (b, k))  # [B, K, D, h, w]
            query_fg = out["initial_mask"] if self.imgr.img else None
            theta = self.cdgmg(gmm_s, fg, bg, gmm_q, query_fg, valid)
            out.update(self.qcpe(gmm_q, theta))
        maps = torch.cat([out[GUIDANCES[g]] for g in self.guidance], 1)  # [B, G, h, w]
        out["guidance_maps"] = maps
        out["guidance"] = out[GUIDANCES[primary_guidance(self.guidance)]]  # [B, 1, h, w]

        if self.meta is None:
            # upsampled by the one resize that also scores guidance maps: scored at the input
            # size, the prediction is the posterior map binarised at 0.5 (its mIoU equals its
            # GmIoU); at original size the two are close, not equal
            p = resize(out["posterior"], size)  # [B, 1, H, W]
            out["logits"] = out["meta_logits"] = torch.cat([1 - p, p], 1).clamp_min(1e-6).log()
            return out
        feat_s = self.meta.down_supp(mid_s).unflatten(0, (b, k))  # [B, K, D, h, w]
        prototype = masked_average(feat_s, fg, self.kshot, weights)  # [B, D]
        feat_q = self.meta.down_query[2](gmm_q)  # down_query's Dropout2d(0.5)
        meta = self.meta(feat_q, prototype, maps)  # [B, 2, h, w]
        out["meta_logits"] = resize(meta, size)  # [B, 2, H, W]
        if self.ensemble is None:
            out["logits"] = out["meta_logits"]
            return out
        base = resize(self.base_logits(high_q), cells)  # [B, N + 1, h, w]
        base_bg = base_background(base, base_exclude)  # [B, 1, h, w]
        out["logits"] = resize(self.ensemble(meta, base_bg, out["psi"]), size)  # [B, 2, H, W]
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The meta learner and the ensemble; the backbone and the base learner stay frozen."""
        return [p for p in self.parameters() if p.requires_grad]
