"""IMGR: Initial Mask Generating and Refining (paper Eq. 2-7).

Generating (IMG, Eq. 2-4): a double-branch cosine prior on the high-level features.
- Global branch (Eq. 2): S_G(j) = max_i cos(X_s^h(i), X_q^h(j)) over the support pixels i inside
  the support mask (M_s(i) > 0), min-max normalised over the query pixels j (the PFENet prior).
  Reading: X_s^h (x) M_s of Eq. 2 selects the support pixels; masked-out pixels are excluded
  from the max rather than entering it as zero vectors (whose cosine 0 would floor the prior
  on signed features such as EfficientNet's). A cosine does not see a pixel's scale, so a
  fractional M_s(i) > 0 counts like 1, as in BAM's ``layer4 * mask`` prior.
- K shots (``kshot``): "mean" (BAM) computes one prior per shot, min-max normalises each and
  averages them; "pool" takes the max over the pixels of every shot, then one min-max. As in
  BAM, a shot whose mask is empty at the feature resolution contributes a prior of 0 to the
  mean (so with K = 5 one empty shot scales the prior by 4/5).
- Local branch (Eq. 3-4, h = w = 2): the same on 2x2-patch means of the masked features
  (every pixel represented by the mean of its patch; a patch counts when any of its support
  pixels is inside the mask), computed at half resolution and upsampled back.
- M_q^0 = [(S_G + S_L) / 2 >= threshold].

Query pixels outside the image (the test resize's padding, ``query_valid`` = 0) enter no
min-max, get prior 0 and never enter M_q^0 nor the cycle's return step.

Refining (IMR, Eq. 5-7), a cycle-consistency check: with A = cos(X_q^h, X_s^h),
i*(j) = argmax_i A(i, j) and j*(j) = argmax_j' A(i*(j), j'); a query pixel j stays foreground
only if M_q^0(j) = 1 and M_q^0(j*) = 1. Reading: Eq. 5 masks the query by M_q^0; we read that
mask as selecting the pixels j whose cycle is checked (the M_q^0(j) = 1 term of Eq. 7), while
the return step j* searches every query pixel inside the image. Were the masked-out query
pixels zero vectors in the return step, j* would fall inside M_q^0 whenever any cosine is
positive, and on ReLU features (cosines >= 0) the refinement would never remove a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-7
KSHOT = ("mean", "pool")


def cosine_matrix(query: Tensor, support: Tensor) -> Tensor:
    """Cosine similarity of every query pixel with every support pixel ("MatMul" of Eq. 2/4/5).

    query [B, C, Nq], support [B, C, Ns] -> [B, Ns, Nq]. Zero vectors give cosine 0.
    """
    q = query / (query.norm(dim=1, keepdim=True) + _EPS)
    s = support / (support.norm(dim=1, keepdim=True) + _EPS)
    return torch.bmm(s.transpose(1, 2), q)


def _minmax(x: Tensor, valid: Tensor | None) -> Tensor:
    """Min-max normalise over the last dim, over the ``valid`` entries only (0 elsewhere).

    x [B, K, N]; valid [B, 1, N] bool or None -> [B, K, N] in [0, 1].
    """
    if valid is None:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        return (x - lo) / (hi - lo + _EPS)
    lo = x.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    out = ((x - lo) / (hi - lo + _EPS)).masked_fill(~valid, 0.0)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)  # no valid pixel at all


def _valid_flat(query_valid: Tensor | None) -> Tensor | None:
    """[B, 1, H, W] (float or bool; > 0 = inside the image) -> [B, 1, H*W] bool, or None."""
    return None if query_valid is None else query_valid.flatten(1)[:, None] > 0


def cosine_prior(
    query: Tensor,
    support: Tensor,
    support_mask: Tensor,
    query_valid: Tensor | None = None,
    kshot: str = "mean",
    sim: Tensor | None = None,
    shot_weights: Tensor | None = None,
) -> Tensor:
    """Eq. 2: the global similarity S_G, max over masked support pixels, min-max normalised.

    query [B, C, H, W]; support [B, K, C, H', W']; support_mask [B, K, H', W'] in [0, 1];
    query_valid [B, 1, H, W] (> 0 inside the image) or None -> [B, 1, H, W] in [0, 1].
    ``sim``: their :func:`cosine_matrix` [B, K*H'*W', H*W] when already computed (IMGR shares
    it with the cycle check). ``shot_weights`` [B, K] (kshot "mean" only): the shots' priors
    are summed with these weights (BAM's K-shot reweighting) instead of averaged.
    """
    if kshot not in KSHOT:
        raise ValueError(f"kshot must be one of {KSHOT}, got {kshot!r}")
    b, c, h, w = query.shape
    k = support.shape[1]
    if sim is None:
        sim = cosine_matrix(query.flatten(2), support.transpose(1, 2).flatten(2))
    sim = sim.view(b, k, -1, h * w)  # [B, K, Ns, Nq]
    inside = (support_mask.flatten(2) > 0)[..., None]  # [B, K, Ns, 1]
    sim = sim.masked_fill(~inside, float("-inf"))
    best = sim.amax((1, 2))[:, None] if kshot == "pool" else sim.amax(2)  # [B, K', Nq]
    best = best.masked_fill(best == float("-inf"), 0.0)  # a shot with an empty mask
    prior = _minmax(best, _valid_flat(query_valid))  # [B, K', Nq]
    if shot_weights is None:
        return prior.mean(1).view(b, 1, h, w)
    if kshot != "mean":
        raise ValueError("shot_weights weigh one prior per shot: they need kshot='mean'")
    return (prior * shot_weights[:, :, None].to(prior.dtype)).sum(1).view(b, 1, h, w)


def _patch_mean(x: Tensor, size: int) -> Tensor:
    """Mean over non-overlapping size x size patches (PS of Eq. 3); odd edges are padded by
    replication so every pixel belongs to a full patch. [N, C, H, W] -> [N, C, H/s, W/s]."""
    h, w = x.shape[-2:]
    pad = (0, (-w) % size, 0, (-h) % size)
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    return F.avg_pool2d(x, size)


def local_prior(
    query: Tensor,
    support: Tensor,
    support_mask: Tensor,
    patch: int = 2,
    query_valid: Tensor | None = None,
    kshot: str = "mean",
    shot_weights: Tensor | None = None,
) -> Tensor:
    """Eq. 3-4: S_L on patch means, upsampled back. Shapes as cosine_prior."""
    b, k, c, hs, ws = support.shape
    mask = support_mask.flatten(0, 1)[:, None]  # [B*K, 1, H', W']
    masked = support.flatten(0, 1) * mask  # X_s^h (x) M_s, [B*K, C, H', W']
    rs = _patch_mean(masked, patch).unflatten(0, (b, k))  # R_s, [B, K, C, H'/2, W'/2]
    rm = _patch_mean(mask, patch)[:, 0].unflatten(0, (b, k))  # [B, K, H'/2, W'/2]
    if query_valid is None:
        rq, rv = _patch_mean(query, patch), None  # R_q, [B, C, H/2, W/2]
    else:  # a patch's mean over its pixels inside the image only (padding enters no mean)
        v = (query_valid > 0).to(query.dtype)  # [B, 1, H, W]
        rv = _patch_mean(v, patch)  # [B, 1, H/2, W/2], > 0: the patch holds an image pixel
        rq = _patch_mean(query * v, patch) / rv.clamp_min(_EPS)
    s_local = cosine_prior(rq, rs, rm, rv, kshot, shot_weights=shot_weights)  # [B,1,H/2,W/2]
    up = F.interpolate(s_local, size=query.shape[-2:], mode="bilinear", align_corners=False)
    return up if query_valid is None else up * (query_valid > 0)


def cycle_consistent(
    query: Tensor,
    support: Tensor,
    coarse: Tensor,
    query_valid: Tensor | None = None,
    sim: Tensor | None = None,
) -> Tensor:
    """Eq. 5-7: keep coarse foreground pixels whose cycle q -> s -> q lands in the foreground.

    query [B, C, H, W]; support [B, K, C, H', W']; coarse M_q^0 [B, 1, H, W] in {0, 1};
    query_valid [B, 1, H, W] or None (the return step searches valid pixels only)
    -> M_q [B, 1, H, W] in {0, 1}. ``sim``: as :func:`cosine_prior`.
    """
    b, _, h, w = query.shape
    if sim is None:
        sim = cosine_matrix(query.flatten(2), support.transpose(1, 2).flatten(2))
    a = sim  # A, [B, Ns, Nq]
    i_star = a.argmax(1)  # [B, Nq]: best support pixel of each query pixel j (Eq. 6)
    valid = _valid_flat(query_valid)  # [B, 1, Nq] or None
    back_a = a if valid is None else a.masked_fill(~valid, float("-inf"))
    best_query = back_a.argmax(2)  # [B, Ns]: best query pixel of each support pixel i
    j_star = best_query.gather(1, i_star)  # [B, Nq]: j* = argmax_j' A(i*(j), j')
    m0 = coarse.flatten(1)  # [B, Nq]
    back = m0.gather(1, j_star)  # M_q^0(j*)
    return (m0 * back).view(b, 1, h, w)  # Eq. 7


def _inside_columns(query: Tensor, query_valid: Tensor | None):
    """The query's pixels inside the image, as columns: (query [B, C, 1, n], valid
    [B, 1, 1, n] or None, columns [B, n] or None), n = the most inside pixels of an item; an
    item with fewer has columns marked invalid at the end. Without ``query_valid``: the whole
    map as it is (columns None)."""
    b, c, h, w = query.shape
    if query_valid is None:
        return query.flatten(2)[:, :, None], None, None
    inside = query_valid.flatten(1) > 0  # [B, H*W]
    counts = inside.sum(1)  # [B]
    n = max(int(counts.max()), 1)
    cols = torch.argsort((~inside).to(torch.uint8), dim=1, stable=True)[:, :n]  # inside first
    q = query.flatten(2).gather(2, cols[:, None].expand(b, c, n))  # [B, C, n]
    valid = torch.arange(n, device=query.device)[None] < counts[:, None]  # [B, n]
    return q[:, :, None], valid[:, None, None].to(query.dtype), cols


def _take(x: Tensor, cols: Tensor | None, valid: Tensor | None) -> Tensor:
    """Map [B, 1, H, W] -> its ``cols`` [B, 1, 1, n] (0 on invalid columns)."""
    if cols is None:
        return x.flatten(2)[:, :, None]
    return x.flatten(1).gather(1, cols)[:, None, None] * valid


def _place(x: Tensor, cols: Tensor | None, like: Tensor) -> Tensor:
    """Columns [B, 1, 1, n] back to a map [B, 1, H, W] shaped as ``like`` (0 elsewhere)."""
    b, _, h, w = like.shape
    if cols is None:
        return x.reshape(b, 1, h, w)
    out = x.new_zeros(b, h * w)
    out.scatter_(1, cols, x.reshape(b, -1))  # invalid columns hold 0 (min-max / cycle)
    return out.view(b, 1, h, w)


class IMGR(nn.Module):
    """Initial mask M_q from high-level features (Eq. 2-7).

    img=False skips generation (no query pixels enter the GMM: a support-only fit, Table 5),
    imr=False skips the cycle refinement (M_q = M_q^0); ``kshot`` as :func:`cosine_prior`.
    """

    def __init__(
        self,
        img: bool,
        imr: bool,
        threshold: float,
        kshot: str,
        patch: int = 2,
    ):
        super().__init__()
        if imr and not img:
            raise ValueError("IMGR: imr=True needs img=True (the refinement refines M_q^0)")
        if kshot not in KSHOT:
            raise ValueError(f"IMGR: kshot must be one of {KSHOT}, got {kshot!r}")
        self.img, self.imr, self.threshold, self.patch = img, imr, threshold, patch
        self.kshot = kshot

    def forward(
        self,
        query: Tensor,
        support: Tensor,
        support_mask: Tensor,
        query_valid: Tensor | None = None,
        shot_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """query [B, C, H, W]; support [B, K, C, H, W]; support_mask [B, K, H, W] in [0, 1];
        query_valid [B, 1, H, W] (> 0 inside the image) or None; shot_weights [B, K] or None
        (the shots' priors averaged; see :func:`cosine_prior`).

        Returns cosine_prior S_G, coarse M_q^0 and initial_mask M_q, each [B, 1, H, W];
        with img=False the masks are all zero.
        """
        # The global branch and the cycle see the query's pixels inside the image only
        # (padding enters neither): on those columns, as a [B, C, 1, n] map; A (the "MatMul"
        # of Eq. 2 and 5) is computed once for both, [B, K*H*W, n]
        q_in, v_in, cols = _inside_columns(query, query_valid)
        sim = cosine_matrix(q_in.flatten(2), support.transpose(1, 2).flatten(2))
        s_g_in = cosine_prior(
            q_in, support, support_mask, v_in, self.kshot, sim, shot_weights
        )  # [B, 1, 1, n]
        s_g = _place(s_g_in, cols, query)  # [B, 1, H, W], 0 on padding
        if not self.img:
            zeros = torch.zeros_like(s_g)
            return {"cosine_prior": s_g, "coarse_mask": zeros, "initial_mask": zeros}
        s_l = local_prior(
            query, support, support_mask, self.patch, query_valid, self.kshot, shot_weights
        )
        coarse = (s_g + s_l) / 2 >= self.threshold  # M_q^0, [B, 1, H, W] bool
        if query_valid is not None:
            coarse = coarse & (query_valid > 0)
        coarse = coarse.to(query.dtype)
        refined = coarse
        if self.imr:
            coarse_in = _take(coarse, cols, v_in)  # [B, 1, 1, n]
            refined_in = cycle_consistent(q_in, support, coarse_in, v_in, sim)
            refined = _place(refined_in, cols, query)
        return {"cosine_prior": s_g, "coarse_mask": coarse, "initial_mask": refined}
