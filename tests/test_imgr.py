"""IMGR (Eq. 2-7): cosine maps against brute-force loops and a hand-built cycle."""

import itertools

import numpy as np
import pytest
import torch

from cgmgm.models.imgr import IMGR, cosine_prior, cycle_consistent, local_prior


def _cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na + 1e-7) / (nb + 1e-7))


def _prior_loop(q, s, m):
    """Brute force Eq. 2: q [C, H, W], s [K, C, H', W'], m [K, H', W']."""
    c, h, w = q.shape
    out = np.zeros((h, w))
    for y, x in itertools.product(range(h), range(w)):
        best = -np.inf
        for k, i, j in itertools.product(range(s.shape[0]), range(s.shape[2]), range(s.shape[3])):
            best = max(best, _cos(q[:, y, x], s[k, :, i, j] * m[k, i, j]))
        out[y, x] = best
    return (out - out.min()) / (out.max() - out.min() + 1e-7)


@pytest.mark.parametrize("shots", [1, 3])
def test_cosine_prior_matches_loop(shots):
    g = torch.Generator().manual_seed(shots)
    q = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    s = torch.randn(2, shots, 5, 4, 6, generator=g, dtype=torch.float64)
    m = (torch.rand(2, shots, 4, 6, generator=g) > 0.5).double()
    got = cosine_prior(q, s, m)
    assert got.shape == (2, 1, 4, 6)
    for b in range(2):
        want = _prior_loop(q[b].numpy(), s[b].numpy(), m[b].numpy())
        np.testing.assert_allclose(got[b, 0].numpy(), want, atol=1e-9)


def test_local_prior_is_the_prior_of_patch_means():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    s = torch.randn(1, 1, 3, 4, 4, generator=g, dtype=torch.float64)
    m = (torch.rand(1, 1, 4, 4, generator=g) > 0.3).double()
    qn, sn = q[0].numpy(), (s[0, 0] * m[0, 0]).numpy()
    # patch means by hand: each 2x2 block -> its mean vector (mask applied before averaging)
    qp = qn.reshape(3, 2, 2, 2, 2).mean((2, 4))
    sp = sn.reshape(3, 2, 2, 2, 2).mean((2, 4))
    want = _prior_loop(qp, sp[None], np.ones((1, 2, 2)))
    got = local_prior(q, s, m)
    assert got.shape == (1, 1, 4, 4)
    # bilinear upsampling of a 2x2 map back to 4x4 keeps the corner values
    np.testing.assert_allclose(got[0, 0, ::3, ::3].numpy(), want, atol=1e-9)


def test_odd_sizes_are_handled():
    q = torch.randn(1, 3, 5, 7)
    s = torch.randn(1, 2, 3, 5, 7)
    m = torch.ones(1, 2, 5, 7)
    assert local_prior(q, s, m).shape == (1, 1, 5, 7)


def test_cycle_consistency_hand_built():
    # Query pixels (1 row x 4): q0, q1 in the coarse mask, q2, q3 outside.
    # q0 ~ support s0, and s0's best query match is q0 itself       -> cycle closes, kept.
    # q1 ~ support s1, but s1's best query match is q3 (outside M0) -> cycle breaks, dropped.
    e = torch.eye(4, dtype=torch.float64)
    query = torch.stack([e[0], e[1] + 0.2 * e[2], e[2], e[1] + 0.05 * e[3]], 1)[None, :, None, :]
    support = torch.stack([e[0], e[1] + 0.01 * e[3]], 1)[None, None, :, None, :]
    coarse = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 1, 4)
    got = cycle_consistent(query, support, coarse)
    assert got.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_cycle_never_adds_pixels():
    g = torch.Generator().manual_seed(3)
    q, s = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 2, 8, 6, 6, generator=g)
    coarse = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    assert (cycle_consistent(q, s, coarse) <= coarse).all()


def test_imgr_switches():
    g = torch.Generator().manual_seed(4)
    q, s = torch.randn(1, 8, 6, 6, generator=g), torch.randn(1, 1, 8, 6, 6, generator=g)
    m = torch.ones(1, 1, 6, 6)
    full = IMGR()(q, s, m)
    assert set(full) == {"cosine_prior", "coarse_mask", "initial_mask"}
    want = ((cosine_prior(q, s, m) + local_prior(q, s, m)) / 2 >= 0.5).float()
    torch.testing.assert_close(full["coarse_mask"], want)
    no_imr = IMGR(imr=False)(q, s, m)
    torch.testing.assert_close(no_imr["initial_mask"], no_imr["coarse_mask"])
    no_img = IMGR(img=False, imr=False)(q, s, m)
    assert no_img["initial_mask"].sum() == 0
    with pytest.raises(ValueError, match="imr=True needs img=True"):
        IMGR(img=False, imr=True)


def test_empty_support_mask_gives_finite_prior():
    q, s = torch.randn(1, 4, 5, 5), torch.randn(1, 1, 4, 5, 5)
    out = IMGR()(q, s, torch.zeros(1, 1, 5, 5))
    assert all(torch.isfinite(v).all() for v in out.values())
