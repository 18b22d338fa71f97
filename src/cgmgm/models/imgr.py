"""IMGR: Initial Mask Generating and Refining (paper Eq. 2-7).

Generating (IMG, Eq. 2-4): a double-branch cosine prior on the high-level features.
- Global branch (Eq. 2): S_G(j) = max_i cos(X_s^h(i) * M_s(i), X_q^h(j)) over every support pixel
  i of every shot, min-max normalised over the query pixels j (the PFENet prior). Masked-out
  support pixels are zero vectors and so have cosine 0.
- Local branch (Eq. 3-4, h = w = 2): the same on 2x2-patch means (every pixel represented by the
  mean of its patch), computed at half resolution and upsampled back.
- M_q^0 = [(S_G + S_L) / 2 >= threshold].

Refining (IMR, Eq. 5-7), a cycle-consistency check: with A = cos(X_q^h, X_s^h),
i*(j) = argmax_i A(i, j) and j*(j) = argmax_j' A(i*(j), j'); a query pixel j stays foreground
only if M_q^0(j) = 1 and M_q^0(j*) = 1. Reading: Eq. 5 masks the query by M_q^0; we read that
mask as selecting the pixels j whose cycle is checked (the M_q^0(j) = 1 term of Eq. 7), while
the return step j* searches every query pixel. Were the masked-out query pixels zero vectors in
the return step, j* would fall inside M_q^0 whenever any cosine is positive, and on ReLU
features (cosines >= 0) the refinement would never remove a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_EPS = 1e-7


def cosine_matrix(query: Tensor, support: Tensor) -> Tensor:
    """Cosine similarity of every query pixel with every support pixel ("MatMul" of Eq. 2/4/5).

    query [B, C, Nq], support [B, C, Ns] -> [B, Ns, Nq]. Zero vectors give cosine 0.
    """
    q = query / (query.norm(dim=1, keepdim=True) + _EPS)
    s = support / (support.norm(dim=1, keepdim=True) + _EPS)
    return torch.bmm(s.transpose(1, 2), q)


def _minmax(x: Tensor) -> Tensor:
    """Min-max normalise over the last dim. [B, N] -> [B, N] in [0, 1]."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    return (x - lo) / (hi - lo + _EPS)


def cosine_prior(query: Tensor, support: Tensor, support_mask: Tensor) -> Tensor:
    """Eq. 2: the global similarity S_G, max over support pixels, min-max normalised.

    query [B, C, H, W]; support [B, K, C, H', W']; support_mask [B, K, H', W'] in [0, 1]
    -> [B, 1, H, W] in [0, 1].
    """
    b, c, h, w = query.shape
    masked = support * support_mask[:, :, None]  # X_s^h (x) M_s, [B, K, C, H', W']
    sup = masked.transpose(1, 2).flatten(2)  # [B, C, K*H'*W']
    sim = cosine_matrix(query.flatten(2), sup).amax(1)  # [B, H*W]
    return _minmax(sim).view(b, 1, h, w)


def _patch_mean(x: Tensor, size: int) -> Tensor:
    """Mean over non-overlapping size x size patches (PS of Eq. 3); odd edges are padded by
    replication so every pixel belongs to a full patch. [N, C, H, W] -> [N, C, H/s, W/s]."""
    h, w = x.shape[-2:]
    pad = (0, (-w) % size, 0, (-h) % size)
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    return F.avg_pool2d(x, size)


def local_prior(query: Tensor, support: Tensor, support_mask: Tensor, patch: int = 2) -> Tensor:
    """Eq. 3-4: S_L on patch means, upsampled back. Shapes as cosine_prior."""
    b, k, c, hs, ws = support.shape
    masked = (support * support_mask[:, :, None]).flatten(0, 1)  # [B*K, C, H', W']
    rs = _patch_mean(masked, patch).unflatten(0, (b, k))  # R_s, [B, K, C, H'/2, W'/2]
    rq = _patch_mean(query, patch)  # R_q, [B, C, H/2, W/2]
    ones = torch.ones_like(rs[:, :, 0])
    s_local = cosine_prior(rq, rs, ones)  # the mask is already applied inside the patch means
    return F.interpolate(s_local, size=query.shape[-2:], mode="bilinear", align_corners=False)


def cycle_consistent(query: Tensor, support: Tensor, coarse: Tensor) -> Tensor:
    """Eq. 5-7: keep coarse foreground pixels whose cycle q -> s -> q lands in the foreground.

    query [B, C, H, W]; support [B, K, C, H', W']; coarse M_q^0 [B, 1, H, W] in {0, 1}
    -> M_q [B, 1, H, W] in {0, 1}.
    """
    b, _, h, w = query.shape
    sup = support.transpose(1, 2).flatten(2)  # [B, C, K*H'*W']
    a = cosine_matrix(query.flatten(2), sup)  # A, [B, Ns, Nq]
    i_star = a.argmax(1)  # [B, Nq]: best support pixel of each query pixel j (Eq. 6)
    best_query = a.argmax(2)  # [B, Ns]: best query pixel of each support pixel i
    j_star = best_query.gather(1, i_star)  # [B, Nq]: j* = argmax_j' A(i*(j), j')
    m0 = coarse.flatten(1)  # [B, Nq]
    back = m0.gather(1, j_star)  # M_q^0(j*)
    return (m0 * back).view(b, 1, h, w)  # Eq. 7


class IMGR(nn.Module):
    """Initial mask M_q from high-level features (Eq. 2-7).

    img=False skips generation (no query pixels enter the GMM: a support-only fit, Table 5),
    imr=False skips the cycle refinement (M_q = M_q^0).
    """

    def __init__(self, img: bool = True, imr: bool = True, threshold: float = 0.5, patch: int = 2):
        super().__init__()
        if imr and not img:
            raise ValueError("IMGR: imr=True needs img=True (the refinement refines M_q^0)")
        self.img, self.imr, self.threshold, self.patch = img, imr, threshold, patch

    def forward(self, query: Tensor, support: Tensor, support_mask: Tensor) -> dict[str, Tensor]:
        """query [B, C, H, W]; support [B, K, C, H, W]; support_mask [B, K, H, W] in [0, 1].

        Returns cosine_prior S_G, coarse M_q^0 and initial_mask M_q, each [B, 1, H, W];
        with img=False the masks are all zero.
        """
        s_g = cosine_prior(query, support, support_mask)
        if not self.img:
            zeros = torch.zeros_like(s_g)
            return {"cosine_prior": s_g, "coarse_mask": zeros, "initial_mask": zeros}
        s_l = local_prior(query, support, support_mask, self.patch)
        coarse = ((s_g + s_l) / 2 >= self.threshold).to(query.dtype)  # M_q^0
        refined = cycle_consistent(query, support, coarse) if self.imr else coarse
        return {"cosine_prior": s_g, "coarse_mask": coarse, "initial_mask": refined}
