"""CDGMG: Cross Data Gaussian Mixture Generating (paper Eq. 8-11), as a batched weighted EM.

Public API (users' scripts call these names and positions)::

    params = fit_gmm(x, weight, components=3, covariance="diag", iters=10)
    ll = log_likelihood(params, x)  # log p(x | c) of Eq. 8 / Eq. 12

``x`` is [B, N, D]; ``weight`` is [B, N] (one class) or [B, C, N] (C classes that share the
same features, e.g. fg and bg of an episode). A weight of 0 means "not in this class"; soft
weights in (0, 1] are allowed (fractional mask coverage). Each (batch item, class) pair is an
independent mixture, and each batch item's result equals fitting it alone. The classes of one
batch item share its standardisation, so the variance floor (relative to the spread of all its
classes' points) is shared too: with ``reg_covar = 0`` a class's result equals fitting it alone;
with a floor it is that fit with the item's floor.

Readings of points the paper leaves open (see DESIGN.md):
- Initialisation is deterministic (no global RNG): the weighted points of a class are split
  into M groups of equal weight along their principal axis (found by power iteration), and
  one M-step on that hard assignment gives theta^0. ``init=`` overrides it.
- EM runs a fixed number of iterations, with no early stop.
- A variance floor ``reg_covar`` is added to every covariance diagonal (as scikit-learn's
  ``reg_covar``), but measured relative to the spread of the episode's data, so that the
  fit behaves the same for features of scale 1e-3 and 1e3. Internally every batch item is
  centred and scaled once (shared by its classes); the returned parameters are in the
  original units.
- Gradients: the EM iterations run without gradient; the last iteration runs with
  gradient when ``grad=True``, so the final parameters are a differentiable function of x.
- Speed (diag): without autograd, every EM iteration reads x once, in chunks of points that
  fit in the CPU's cache (on a GPU: one chunk). Each chunk is centred into a small buffer
  [u, u*u, 1] (u = x - centre; the scale of the standardisation is folded into the
  coefficients), and the E-step (Eq. 10) and the M-step sums (Eq. 11) are two thin matrix
  products on it. Only the default initial split allocates a [B, N, D] array (on CPUs, fresh
  large arrays cost page faults that take longer than the arithmetic).
- A class whose total weight is 0 (an empty mask) gets ``valid = False`` and finite
  placeholder parameters; callers decide what an empty class means (QCPE: uniform posterior).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COVARIANCES = ("diag", "full")
_LOG_2PI = math.log(2.0 * math.pi)
# Diag EM without autograd on a CPU streams x in chunks whose buffer [B, n, 2D + _PAD] has about
# this many bytes (the L2 caches of two cores; measured best among 1-8 MiB at the bench's size).
_CPU_CHUNK_BYTES = 4 << 20
# Columns after [u, u*u] in the chunk buffer: a column of ones (it carries the E-step's
# constant and counts N_k in the M-step product) and zeros that keep rows 64-byte aligned.
_PAD = 16


class GaussianMixture(NamedTuple):
    """Mixture parameters theta_c = {pi_c, mu_c, Sigma_c} of Eq. 8, for a batch of classes.

    Shapes use ``...`` for the leading batch dims ([B] or [B, C]):
    log_weights [..., M]; means [..., M, D];
    covariances [..., M, D] ("diag": variances) or [..., M, D, D] ("full");
    precision_chol [..., M, D] ("diag": 1/sqrt(var)) or [..., M, D, D] ("full": P with
    Sigma^-1 = P P^T, P upper triangular, scikit-learn's convention);
    valid [...] bool (the class had positive total weight).
    """

    log_weights: Tensor
    means: Tensor
    covariances: Tensor
    precision_chol: Tensor
    valid: Tensor

    @property
    def covariance_type(self) -> str:
        return "full" if self.covariances.dim() == self.means.dim() + 1 else "diag"

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()


def _check_inputs(x: Tensor, weight: Tensor, components: int, covariance: str) -> Tensor:
    """Validate shapes and return the weight as [B, C, N]."""
    if x.dim() != 3:
        raise ValueError(f"fit_gmm: x must be [B, N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"fit_gmm: x must be floating point, got {x.dtype}")
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    if weight.dim() != 3 or weight.shape[0] != x.shape[0] or weight.shape[2] != x.shape[1]:
        raise ValueError(
            f"fit_gmm: weight must be [B, N] or [B, C, N] matching x [B, N, D]={tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if covariance not in COVARIANCES:
        raise ValueError(f"fit_gmm: covariance must be one of {COVARIANCES}, got {covariance!r}")
    if int(components) < 1:
        raise ValueError(f"fit_gmm: components must be >= 1, got {components}")
    if not torch.isfinite(weight.sum()) or bool((weight < 0).any()):
        raise ValueError("fit_gmm: weight must be finite and >= 0")
    if x.numel():
        # EM squares (centred) x: beyond sqrt(max) / 100 its sums and the covariances in x's
        # units overflow to inf, and the fit would silently return placeholders (or hang).
        lo, hi = torch.aminmax(x.detach())
        peak = float(torch.maximum(-lo, hi))
        limit = math.sqrt(torch.finfo(x.dtype).max) / 100.0
        if math.isfinite(peak) and peak > limit:  # NaN / inf: the error of _standardise
            raise ValueError(
                f"fit_gmm: |x| reaches {peak:.3g}, beyond {limit:.3g}, where EM's squares of x "
                f"overflow {x.dtype}: rescale the features (or pass float64 ones)"
            )
    return weight.to(x.dtype)


def _chunk_rows(x: Tensor, width: int) -> int:
    """Points per chunk when a pass over x [B, N, D] fills a buffer [B, rows, width]: on a CPU
    the buffer stays in cache (about _CPU_CHUNK_BYTES); elsewhere one chunk holds every point."""
    b, n = x.shape[:2]
    if x.device.type != "cpu":
        return max(n, 1)
    return max(1, min(n, _CPU_CHUNK_BYTES // max(1, b * width * x.element_size())))


def _item_weights(weight: Tensor) -> Tensor:
    """weight [B, C, N] -> [B, N], summing to 1 per item: a point counts once even if it is in
    several classes; an item with no weight at all counts its points equally."""
    w = weight.sum(1)  # [B, N]
    total = w.sum(1, keepdim=True)  # [B, 1]
    return torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / w.shape[1]))


def _floor(centre: Tensor) -> Tensor:
    """[B, D] -> [B]: a floor on the spread, relative to the feature magnitude, that keeps
    constant (duplicated) data finite."""
    return 1e-10 * (centre.pow(2).mean(1) + 1.0)


def _check_centre(centre: Tensor) -> None:
    if not bool(torch.isfinite(centre).all()):  # NaN/inf anywhere in x reaches the centre
        raise ValueError("fit_gmm: x contains NaN or inf")


def _centre_var(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted centre [B, D] and spread [B] (mean over features of the weighted variance, plus
    the floor) of each batch item, in one pass over x without autograd and without a [B, N, D]
    temporary: each chunk's weighted mean and sum of squared deviations, combined exactly
    (Chan, Golub and LeVeque's pairwise update: no cancellation of large squares)."""
    w = _item_weights(weight)  # [B, N], sums to 1
    b, n, d = x.shape
    rows = _chunk_rows(x, d)
    buf = x.new_empty(b, rows, d)  # [B, rows, D]
    tiny = torch.finfo(x.dtype).tiny
    parts = []  # per chunk: weight [B, 1, 1], weighted sum and mean [B, 1, D], M2 [B, 1, D]
    for s in range(0, n, rows):
        xk, wk = x[:, s : s + rows], w[:, None, s : s + rows]  # [B, k, D], [B, 1, k]
        tot = wk.sum(-1, keepdim=True)  # [B, 1, 1]
        sk = torch.bmm(wk, xk)  # [B, 1, D]
        mk = sk / tot.clamp_min(tiny)  # the chunk's weighted mean (0 if it has no weight)
        sq = buf[:, : xk.shape[1]]
        torch.sub(xk, mk, out=sq)
        sq.mul_(sq)
        parts.append((tot, sk, mk, torch.bmm(wk, sq)))
    centre = torch.stack([p[1] for p in parts]).sum(0)  # [B, 1, D]
    _check_centre(centre)
    # sum_n w_n (x_n - centre)^2 = sum over chunks of M2_k + W_k (mean_k - centre)^2
    m2 = sum(m2k + tot * (mk - centre) ** 2 for tot, _, mk, m2k in parts)  # [B, 1, D]
    centre = centre[:, 0]  # [B, D]
    return centre, m2[:, 0].mean(1) + _floor(centre)


def _standardise(x: Tensor, weight: Tensor, moments: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Centre and scale each batch item by its weighted mean and RMS spread.

    x [B, N, D], weight [B, C, N] -> (z, centre [B, D], scale [B]) where z is the standardised
    x' [B, N, D], or with ``moments`` the array [x', x'*x'] [B, N, 2D] that the autograd E-step
    and M-step read as one thin matrix product.
    """
    if (x.requires_grad or weight.requires_grad) and torch.is_grad_enabled():
        w = _item_weights(weight)  # [B, N]
        centre = torch.bmm(w[:, None], x)[:, 0]  # [B, D]
        _check_centre(centre)
        xc = x - centre[:, None]
        scale = (torch.bmm(w[:, None], xc * xc)[:, 0].mean(1) + _floor(centre)).sqrt()  # [B]
        xs = xc / scale[:, None, None]
        return (torch.cat([xs, xs * xs], -1) if moments else xs), centre, scale
    # Without autograd: the spread in chunks, then x' (and x'^2) written in place.
    centre, var = _centre_var(x, weight)
    b, n, d = x.shape
    z = x.new_empty(b, n, 2 * d if moments else d)
    lo = z[..., :d]
    torch.sub(x, centre[:, None], out=lo)
    if moments:
        torch.mul(lo, lo, out=z[..., d:]).div_(var[:, None, None])
    lo.mul_(var.rsqrt()[:, None, None])
    return z, centre, var.sqrt()


def _precision_chol_full(cov: Tensor, reg: float) -> tuple[Tensor, Tensor]:
    """Sigma [..., D, D] -> (Sigma + jitter, P upper with Sigma^-1 = P P^T)."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    cov = 0.5 * (cov + cov.transpose(-1, -2)) + reg * eye
    chol, info = torch.linalg.cholesky_ex(cov)
    jitter = reg
    while bool((info > 0).any()):  # rare: grow the jitter only where the factorisation failed
        jitter *= 10.0
        bad = (info > 0)[..., None, None]
        cov = torch.where(bad, cov + jitter * eye, cov)
        chol, info = torch.linalg.cholesky_ex(cov)
    # P = L^-T, from L^-1 by a triangular solve against the identity.
    linv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return cov, linv.transpose(-1, -2)


def _moments(x: Tensor) -> Tensor:
    """[x, x*x] concatenated: [B, N, D] -> [B, N, 2D]."""
    return torch.cat([x, x * x], dim=-1)


def _log_gauss(z: Tensor, means: Tensor, prec_chol: Tensor, full: bool) -> Tensor:
    """log N(x; mu_m, Sigma_m) of Eq. 12 for every point and component.

    z: [B, N, 2D] moments [x, x*x] ("diag") or x [B, N, D] ("full"); means [B, K, D];
    prec_chol [B, K, D] (diag) or [B, K, D, D] (full) -> [B, N, K], where K = C * M
    components of all classes at once (they share the features).
    """
    d = means.shape[-1]
    if not full:
        prec = prec_chol**2  # [B, K, D] = 1 / var
        # ||(x - mu) / sigma||^2 = x^2 . prec - 2 x . (mu prec) + mu^2 . prec, as one product.
        coef = torch.cat([-2.0 * means * prec, prec], dim=-1)  # [B, K, 2D]
        maha = torch.bmm(z, coef.transpose(1, 2)) + (means**2 * prec).sum(-1)[:, None, :]
        maha = maha.clamp_min(0.0)  # [B, N, K]
        log_det = prec_chol.log().sum(-1)  # [B, K] = log |Sigma|^-1/2
    else:
        cols = []
        for k in range(means.shape[1]):  # K is small (C * M); each step is one [N, D] x [D, D]
            p = prec_chol[:, k]  # [B, D, D]
            y = z @ p - (means[:, k, None, :] @ p)  # [B, N, D]
            cols.append(y.pow(2).sum(-1))
        maha = torch.stack(cols, -1)  # [B, N, K]
        log_det = prec_chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [B, K]
    return -0.5 * (d * _LOG_2PI + maha) + log_det[:, None, :]


def _e_step(z: Tensor, weight: Tensor, gm: GaussianMixture, full: bool) -> Tensor:
    """Eq. 10: weighted responsibilities w_cn * p_cn[m]. weight [B, C, N] -> [B, N, C, M]."""
    b, c, m = gm.log_weights.shape
    pc = gm.precision_chol.flatten(1, 2)
    logp = _log_gauss(z, gm.means.flatten(1, 2), pc, full).view(b, -1, c, m)  # [B, N, C, M]
    logp = logp + gm.log_weights[:, None]
    # Softmax over the M components of each class, written out: torch.softmax is slow on a
    # last dimension of 1-6 entries.
    # The clamp keeps exp() out of float32's denormal range (slow on CPUs); exp(-80) ~ 2e-35.
    resp = (logp - logp.amax(-1, keepdim=True)).clamp_min_(-80.0).exp_()
    resp = resp * (weight.transpose(1, 2)[..., None] / resp.sum(-1, keepdim=True))
    return resp


def _m_step(z: Tensor, wresp: Tensor, reg: float, full: bool) -> GaussianMixture:
    """Eq. 11 with weights: z as in _log_gauss, wresp [B, N, C, M] -> theta (standard units)."""
    b, n, c, m = wresp.shape
    r = wresp.flatten(2)  # [B, N, K]
    if not full:
        sums = torch.bmm(r.transpose(1, 2), z)  # [B, K, 2D]: sum_n r_nk [x_n, x_n^2]
        return _diag_theta(sums, r.sum(1), c, m, reg)
    eps = 10.0 * torch.finfo(z.dtype).eps
    nk = r.sum(1) + eps  # [B, K]  N_cm
    nc = wresp.sum((1, 3))  # [B, C]  N_c
    log_weights = (nk.view(b, c, m) / (nc[..., None] + m * eps)).log()  # pi_cm = N_cm / N_c
    means = torch.bmm(r.transpose(1, 2), z) / nk[..., None]  # [B, K, D]
    covs = []
    for k in range(c * m):
        xc = z - means[:, k, None, :]  # [B, N, D]
        covs.append((xc * r[:, :, k, None]).transpose(1, 2) @ xc / nk[:, k, None, None])
    cov, prec_chol = _precision_chol_full(torch.stack(covs, 1), reg)  # [B, K, D, D]
    shape = (b, c, m)
    return GaussianMixture(
        log_weights,
        means.reshape(*shape, -1),
        cov.reshape(*shape, *cov.shape[2:]),
        prec_chol.reshape(*shape, *prec_chol.shape[2:]),
        nc > 0,
    )


def _diag_theta(sums: Tensor, n_k: Tensor, c: int, m: int, reg: float) -> GaussianMixture:
    """Eq. 11 for diagonal covariances, from the weighted sums of one pass over the points.

    sums [B, K, 2D] = sum_n r_nk [x_n, x_n^2]; n_k [B, K] = sum_n r_nk (K = C * M, r the
    weighted responsibilities) -> theta with leading dims [B, C] (standard units).
    """
    b, d = sums.shape[0], sums.shape[-1] // 2
    eps = 10.0 * torch.finfo(sums.dtype).eps
    nc = n_k.view(b, c, m).sum(-1)  # [B, C]  N_c
    nk = n_k + eps  # [B, K]  N_cm
    log_weights = (nk.view(b, c, m) / (nc[..., None] + m * eps)).log()  # pi_cm = N_cm / N_c
    mom = sums / nk[..., None]  # [B, K, 2D]: E[x], E[x^2]
    means = mom[..., :d]  # mu_cm
    var = (mom[..., d:] - means**2).clamp_min(0.0) + reg  # Sigma_cm (diagonal) + floor
    shape = (b, c, m, d)
    return GaussianMixture(
        log_weights, means.reshape(shape), var.reshape(shape), var.rsqrt().reshape(shape), nc > 0
    )


def _diag_coef(gm: GaussianMixture, width: int, a: Tensor) -> tuple[Tensor, Tensor]:
    """The E-step (Eq. 10, 12) of diagonal Gaussians as one linear map of [u, u*u, 1].

    gm with leading dims [B, C] in standard units x' = a u (a [B], u the buffer's units) ->
    (coef [B, K, width], cap [B, K, 1]) with
    coef . [u, u*u, 1, 0...] = log pi_k + log N(x'; mu_k, Sigma_k)
                             = cap_k - 1/2 sum_d (x'_d - mu_kd)^2 / sigma_kd^2,
    since (x' - mu)^2 p = u^2 (a^2 p) - 2 u (a mu p) + mu^2 p; cap_k (the value at x' = mu_k)
    bounds it.
    """
    b, c, m, d = gm.means.shape
    means = gm.means.flatten(1, 2)  # [B, K, D]
    pc = gm.precision_chol.flatten(1, 2)  # [B, K, D] = 1 / sigma
    prec = pc * pc  # [B, K, D] = 1 / var
    a = a[:, None, None]  # [B, 1, 1]
    # log pi_k - D/2 log 2 pi + log |Sigma_k|^-1/2
    cap = gm.log_weights.flatten(1) + pc.log().sum(-1) - 0.5 * d * _LOG_2PI  # [B, K]
    coef = means.new_zeros(b, c * m, width)  # [B, K, width]
    coef[..., :d] = means * prec * a
    coef[..., d : 2 * d] = -0.5 * prec * (a * a)
    coef[..., 2 * d] = cap - 0.5 * (means * means * prec).sum(-1)
    return coef, cap[..., None]


class _DiagPasses:
    """Passes over the points for the diag EM without autograd, chunk by chunk (Eq. 10-11).

    x [B, N, D] in original units is centred on the fly, u = x - centre, into one buffer
    [B, rows, 2D + _PAD] that holds [u, u*u, 1, 0...] for a chunk of points; weight [B, C, N].
    The standardisation's scale x' = u / sqrt(var) (centre [B, D], var [B]) is folded into the
    E-step coefficients and the M-step sums, which saves a pass over each chunk; an item whose
    scale is far from 1 (where u*u could over- or underflow) is scaled in the buffer instead.
    The views of every chunk are made once, so an EM iteration costs a few calls per chunk.
    """

    def __init__(self, x: Tensor, weight: Tensor, centre: Tensor, var: Tensor):
        b, n, d = x.shape
        width = 2 * d + _PAD
        rows = _chunk_rows(x, width)
        buf = x.new_zeros(b, rows, width)  # [B, rows, 2D + _PAD]
        buf[..., 2 * d] = 1.0
        self.d, self.width = d, width
        self.centre = centre[:, None]  # [B, 1, D]
        inv = var.rsqrt()  # [B]
        # scale in [2^-20, 2^20] (the spread's floor keeps var >= 1e-10 already)
        fold = (var >= 2.0**-40) & (var <= 2.0**40)
        self.a = torch.where(fold, inv, torch.ones_like(inv))  # [B]: x' = a u
        # [B, 1, 1] factor applied in the buffer, or None where every item folds
        self.inv = None if bool(fold.all()) else torch.where(fold, 1.0, inv)[:, None, None]
        self.chunks = []  # per chunk: x [B, k, D], w [B, C, 1, k], z [B, k, W], u, u^2 views
        for s in range(0, n, rows):
            k = min(rows, n - s)
            z = buf[:, :k]
            w = weight[:, :, None, s : s + k]
            self.chunks.append((x[:, s : s + k], w, z, z[..., :d], z[..., d : 2 * d]))

    def _load(self, chunk: tuple) -> Tensor:
        """Fill the buffer with one chunk's [u, u^2, 1, 0...]: [B, k, W]."""
        xk, _, z, lo, hi = chunk
        torch.sub(xk, self.centre, out=lo)
        if self.inv is not None:
            lo.mul_(self.inv)
        torch.mul(lo, lo, out=hi)
        return z

    def sums(self, gm: GaussianMixture) -> Tensor:
        """E-step of theta ``gm`` (standard units, leading dims [B, C]) and the M-step sums:
        [B, K, W] = sum_n r_nk [u_n, u_n^2, 1, 0...] with r = w_cn p_cn[m] (Eq. 10); column 2D
        is N_k."""
        b, c, m = gm.log_weights.shape
        coef, cap = _diag_coef(gm, self.width, self.a)  # [B, K, W], [B, K, 1]
        out = coef.new_zeros(b, c * m, self.width)  # [B, K, W]
        for chunk in self.chunks:
            z = self._load(chunk)
            k = z.shape[1]
            # log pi_k N(x; theta_k) [B, K, k]; the cap keeps (x - mu)^2 >= 0 under rounding
            logp = torch.bmm(coef, z.transpose(1, 2)).clamp_max_(cap)
            r = torch.softmax(logp.view(b, c, m, k), 2).mul_(chunk[1])  # [B, C, M, k]
            out.baddbmm_(r.view(b, c * m, k), z)
        return out

    def sums_of(self, resp: Tensor) -> Tensor:
        """The M-step sums for given weighted responsibilities resp [B, K, N] -> [B, K, W]."""
        out = resp.new_zeros(resp.shape[0], resp.shape[1], self.width)
        s = 0
        for chunk in self.chunks:
            z = self._load(chunk)
            out.baddbmm_(resp[:, :, s : s + z.shape[1]], z)
            s += z.shape[1]
        return out

    def theta(self, sums: Tensor, c: int, m: int, reg: float) -> GaussianMixture:
        """Eq. 11 (standard units) from the output of sums / sums_of."""
        d, a = self.d, self.a[:, None, None]  # [B, 1, 1]
        mom = torch.cat([sums[..., :d] * a, sums[..., d : 2 * d] * (a * a)], -1)  # [B, K, 2D]
        return _diag_theta(mom, sums[..., 2 * d], c, m, reg)


def _initial_assignment(x: Tensor, weight: Tensor, m: int, power_iters: int = 8) -> Tensor:
    """Deterministic hard split of each class into M equal-weight groups along its principal axis.

    x [B, N, D], weight [B, C, N] -> one-hot weighted responsibilities [B, N, C, M].
    """
    total = weight.sum(-1, keepdim=True).clamp_min(1e-30)  # [B, C, 1]
    w = weight / total
    mean = torch.einsum("bcn,bnd->bcd", w, x)  # [B, C, D]
    v = torch.ones_like(mean) / math.sqrt(x.shape[-1])  # [B, C, D], fixed start
    for _ in range(power_iters):  # v <- Cov v without forming the D x D covariance
        proj = torch.einsum("bnd,bcd->bcn", x, v) - (mean * v).sum(-1, keepdim=True)
        v = torch.einsum("bcn,bnd->bcd", w * proj, x) - (w * proj).sum(-1, keepdim=True) * mean
        v = F.normalize(v, dim=-1)
    proj = torch.einsum("bnd,bcd->bcn", x, v)  # [B, C, N]
    order = proj.argsort(-1)
    cum = torch.gather(w, -1, order).cumsum(-1) - 0.5 * torch.gather(w, -1, order)
    group_sorted = (cum * m).floor().clamp(0, m - 1).long()
    group = torch.empty_like(group_sorted).scatter_(-1, order, group_sorted)  # [B, C, N]
    onehot = F.one_hot(group, m).to(x.dtype)  # [B, C, N, M]
    return (onehot * weight[..., None]).transpose(1, 2)  # [B, N, C, M]


def _affine(gm: GaussianMixture, centre: Tensor, scale: Tensor, inverse: bool) -> GaussianMixture:
    """theta of x' = (x - centre) / scale from theta of x, or back with ``inverse``.

    centre [B, D], scale [B]; theta has leading dims [B, C].
    """
    s = scale.view(-1, 1, 1, 1)  # over [C, M, D]
    c = centre.view(centre.shape[0], 1, 1, -1)
    means, f = (gm.means * s + c, s) if inverse else ((gm.means - c) / s, 1.0 / s)
    if gm.covariance_type == "full":
        f = f[..., None]
    return gm._replace(
        means=means, covariances=gm.covariances * f**2, precision_chol=gm.precision_chol / f
    )


def _placeholder(gm: GaussianMixture) -> GaussianMixture:
    """Finite parameters for empty classes: uniform weights, zero means, unit covariance."""
    ok = gm.valid
    m = gm.log_weights.shape[-1]
    okm = ok[..., None]
    log_weights = torch.where(okm, gm.log_weights, torch.full_like(gm.log_weights, -math.log(m)))
    means = torch.where(okm[..., None], gm.means, torch.zeros_like(gm.means))
    extra = (None,) * (gm.covariances.dim() - ok.dim())
    okc = ok[(...,) + extra]
    if gm.covariance_type == "full":
        eye = torch.eye(gm.means.shape[-1], dtype=gm.means.dtype, device=gm.means.device)
        cov = torch.where(okc, gm.covariances, eye.expand_as(gm.covariances))
        pc = torch.where(okc, gm.precision_chol, eye.expand_as(gm.precision_chol))
    else:
        cov = torch.where(okc, gm.covariances, torch.ones_like(gm.covariances))
        pc = torch.where(okc, gm.precision_chol, torch.ones_like(gm.precision_chol))
    return GaussianMixture(log_weights, means, cov, pc, ok)


def fit_gmm(
    x: Tensor,
    weight: Tensor,
    components: int = 3,
    covariance: str = "diag",
    iters: int = 10,
    *,
    reg_covar: float = 1e-6,
    init: GaussianMixture | None = None,
    grad: bool = True,
) -> GaussianMixture:
    """Fit one weighted Gaussian mixture per (batch item, class) with EM (Eq. 9-11).

    Args:
        x: [B, N, D] features (support and query pixels of an episode, flattened); fp16 and
            bf16 are fitted in float32 and the parameters returned in x's dtype.
        weight: [B, N] or [B, C, N], >= 0; 0 = the point is not in that class.
        components: M, Gaussians per class (Eq. 8).
        covariance: "diag" (independent dims) or "full" (correlated), Fig. 6.
        iters: EM iterations (E-step Eq. 10 + M-step Eq. 11), no early stop.
        reg_covar: variance floor added to the covariance diagonal, relative to the data's
            spread (1.0 = the RMS variance of the batch item's data).
        init: optional starting parameters theta^0 in original units, shaped like the
            result; default is the deterministic principal-axis split.
        grad: run the last iteration with autograd on, so the result is differentiable in x.

    Returns:
        GaussianMixture with leading dims [B] (weight [B, N]) or [B, C] (weight [B, C, N]).
    """
    single = weight.dim() == 2
    out_dtype = x.dtype
    if x.is_floating_point() and torch.finfo(x.dtype).bits < 32:
        # fp16 / bf16: EM and the Cholesky factorisation run in float32 (no half Cholesky; the
        # squares overflow fp16); the parameters come back in x's dtype.
        x = x.float()
        if init is not None:
            init = GaussianMixture(*(t.float() if t.is_floating_point() else t for t in init))
    weight = _check_inputs(x, weight, components, covariance)
    if not grad:
        x, weight = x.detach(), weight.detach()
    full = covariance == "full"
    m = int(components)
    if iters < 0:
        raise ValueError(f"fit_gmm: iters must be >= 0, got {iters}")
    # The standardisation and the last iteration record a graph only when there is something to
    # differentiate.
    graph = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    z = None  # [B, N, 2D] ("diag") or [B, N, D] ("full"), only where it is needed whole
    if full or graph:
        z, centre, scale = _standardise(x, weight, moments=not full)

    with torch.no_grad():
        xd, wd = x.detach(), weight.detach()
        if z is None:
            centre, var = _centre_var(xd, wd)  # [B, D], [B]
            scale = var.sqrt()
        else:
            var = scale.detach().square()
        passes = None if full else _DiagPasses(xd, wd, centre.detach(), var)
        if init is None:
            if z is None:  # diag without autograd: x' only for the initial split
                xs = torch.sub(xd, centre[:, None]).mul_(var.rsqrt()[:, None, None])  # [B, N, D]
            else:
                xs = z.detach()[..., : x.shape[-1]]
            first = _initial_assignment(xs, wd, m)  # [B, N, C, M]
            del xs
            if full:
                gm = _m_step(z.detach(), first, reg_covar, full)
            else:  # the same M-step (Eq. 11), as one pass over x
                resp = first.flatten(2).transpose(1, 2).contiguous()  # [B, K, N]
                gm = passes.theta(passes.sums_of(resp), weight.shape[1], m, reg_covar)
        else:
            if single:
                init = GaussianMixture(*(t.unsqueeze(1) for t in init[:4]), init.valid.unsqueeze(1))
            gm = _affine(init, centre.detach(), scale.detach(), inverse=False)
            if gm.log_weights.shape != (x.shape[0], weight.shape[1], m):
                raise ValueError(
                    f"fit_gmm: init has log_weights {tuple(gm.log_weights.shape)}, "
                    f"expected {(x.shape[0], weight.shape[1], m)}"
                )
            gm = gm._replace(valid=weight.sum(-1) > 0)
        plain = iters - 1 if graph and iters > 0 else iters  # iterations without autograd
        for _ in range(plain):
            if full:
                gm = _m_step(z.detach(), _e_step(z.detach(), wd, gm, full), reg_covar, full)
            else:  # one pass over x (Eq. 10-11)
                gm = passes.theta(passes.sums(gm), weight.shape[1], m, reg_covar)

    if graph and iters > 0:
        gm = _m_step(z, _e_step(z, weight, gm, full), reg_covar, full)
    gm = _placeholder(_affine(gm, centre, scale, inverse=True))
    if single:
        gm = GaussianMixture(*(t.squeeze(1) for t in gm))
    if out_dtype != gm.means.dtype:
        gm = GaussianMixture(*(t.to(out_dtype) if t.is_floating_point() else t for t in gm))
    return gm


def log_likelihood(params: GaussianMixture, x: Tensor) -> Tensor:
    """log p(x | c; theta_c) of Eq. 8/12, computed with log-sum-exp.

    params with leading dims [B] -> [B, N]; with [B, C] -> [B, C, N]. x is [B, N, D].
    Classes with ``valid = False`` evaluate their placeholder parameters (finite values).
    fp16 / bf16 inputs are evaluated in float32 (their squares overflow) and returned in x's
    dtype.
    """
    if torch.finfo(x.dtype).bits < 32:
        half = x.dtype
        up = GaussianMixture(*(t.float() if t.is_floating_point() else t for t in params))
        return log_likelihood(up, x.float()).to(half)
    single = params.log_weights.dim() == 2
    if single:
        params = GaussianMixture(*(t.unsqueeze(1) for t in params))
    b, c, m = params.log_weights.shape
    full = params.covariance_type == "full"
    # Shift x by the mixture's mean centre so the expanded quadratic form has no large cancellation.
    shift = (params.weights[..., None] * params.means).sum(-2).mean(1)  # [B, D]
    xs = x - shift[:, None]
    means = (params.means - shift[:, None, None]).flatten(1, 2)
    z = xs if full else _moments(xs)
    logp = _log_gauss(z, means, params.precision_chol.flatten(1, 2), full).view(b, -1, c, m)
    ll = torch.logsumexp(logp + params.log_weights[:, None], dim=-1).transpose(1, 2)  # [B, C, N]
    return ll.squeeze(1) if single else ll


class CDGMG(nn.Module):
    """Cross Data Gaussian Mixture Generating: one fg and one bg mixture per episode (Eq. 8-11).

    Each class is fitted on the union of the support pixels (labelled by M_s) and the query
    pixels (labelled by the initial mask M_q); ignore pixels (255) and padding enter neither.
    """

    def __init__(self, components: int, covariance: str, iters: int, grad: bool, reg_covar: float):
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"CDGMG: covariance must be one of {COVARIANCES}, got {covariance!r}")
        if components < 1:
            raise ValueError(f"CDGMG: components must be >= 1, got {components}")
        self.components, self.covariance, self.iters = components, covariance, iters
        self.grad, self.reg_covar = grad, reg_covar

    def extra_repr(self) -> str:
        return f"components={self.components}, covariance={self.covariance}, iters={self.iters}"

    def forward(
        self,
        support: Tensor,
        support_fg: Tensor,
        support_bg: Tensor,
        query: Tensor,
        query_fg: Tensor | None,
        query_valid: Tensor | None = None,
    ) -> GaussianMixture:
        """support [B, K, D, H, W]; support_fg, support_bg [B, K, H, W] in [0, 1] (fractions
        of each feature cell; cells under ignore have fg + bg < 1); query [B, D, H, W];
        query_fg M_q [B, 1, H, W] in {0, 1}, or None for a support-only fit; query_valid
        [B, 1, H, W] in {0, 1} (0: padding, in neither class) or None (every cell).

        Returns theta with leading dims [B, 2]: index 0 = background, 1 = foreground.
        """
        b, k, d = support.shape[:3]
        xs = support.permute(0, 1, 3, 4, 2).reshape(b, -1, d)  # [B, K*H*W, D]
        ws = torch.stack([support_bg, support_fg], 1).flatten(2)  # [B, 2, K*H*W]
        if query_fg is None:
            x, w = xs, ws
        else:
            xq = query.flatten(2).transpose(1, 2)  # [B, H*W, D]
            mq = query_fg.flatten(1)  # [B, H*W]
            wq = torch.stack([1.0 - mq, mq], 1)  # [B, 2, H*W]
            if query_valid is not None:
                wq = wq * query_valid.flatten(1)[:, None]  # padding enters neither class
            x, w = torch.cat([xs, xq], 1), torch.cat([ws, wq], 2)
        # the EM stays fp32 under AMP (fit_gmm upcasts half inputs; autocast would not let it)
        with torch.autocast(x.device.type, enabled=False):
            return fit_gmm(
                x,
                w,
                self.components,
                self.covariance,
                self.iters,
                reg_covar=self.reg_covar,
                grad=self.grad,
            )
