"""IMGR (Eq. 2-7): cosine maps against brute-force loops and a hand-built cycle."""

import itertools

import numpy as np
import pytest
import torch

from cgmgm.models.imgr import IMGR, cosine_prior, cycle_consistent, local_prior


def _cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na + 1e-7) / (nb + 1e-7))


def _prior_loop(q, s, m, kshot="mean", valid=None):
    """Brute force Eq. 2: q [C, H, W], s [K, C, H', W'], m [K, H', W'], valid [H, W] or None.

    Support pixels with m = 0 are excluded from the max; "mean": one min-max normalised prior
    per shot, averaged; "pool": the max over every shot's pixels, normalised once. Min and max
    run over the valid query pixels; invalid ones get 0.
    """
    c, h, w = q.shape
    valid = np.ones((h, w), bool) if valid is None else valid.astype(bool)
    groups = [[k] for k in range(s.shape[0])] if kshot == "mean" else [list(range(s.shape[0]))]
    maps = []
    for shots in groups:
        out = np.zeros((h, w))
        for y, x in itertools.product(range(h), range(w)):
            best = -np.inf
            for k in shots:
                for i, j in itertools.product(range(s.shape[2]), range(s.shape[3])):
                    if m[k, i, j] > 0:
                        best = max(best, _cos(q[:, y, x], s[k, :, i, j]))
            out[y, x] = 0.0 if best == -np.inf else best
        lo, hi = out[valid].min(), out[valid].max()
        maps.append(np.where(valid, (out - lo) / (hi - lo + 1e-7), 0.0))
    return np.mean(maps, axis=0)


@pytest.mark.parametrize("kshot", ["mean", "pool"])
@pytest.mark.parametrize("shots", [1, 3])
def test_cosine_prior_matches_loop(shots, kshot):
    g = torch.Generator().manual_seed(shots)
    q = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    s = torch.randn(2, shots, 5, 4, 6, generator=g, dtype=torch.float64)
    m = (torch.rand(2, shots, 4, 6, generator=g) > 0.5).double() * 0.7  # fractions count
    valid = torch.ones(2, 1, 4, 6, dtype=torch.float64)
    valid[1, :, :, 4:] = 0  # item 1: two padded columns
    got = cosine_prior(q, s, m, valid, kshot)
    assert got.shape == (2, 1, 4, 6)
    for b in range(2):
        want = _prior_loop(q[b].numpy(), s[b].numpy(), m[b].numpy(), kshot, valid[b, 0].numpy())
        np.testing.assert_allclose(got[b, 0].numpy(), want, atol=1e-9)


def test_masked_support_pixels_are_excluded_not_zero_vectors():
    # Signed features: every masked support pixel points away from every query pixel, so each
    # maximum is negative; zero vectors for the masked-out pixels would floor them all at 0.
    q = torch.tensor([[1.0, 0.5, 0.0, -0.5]]).view(1, 1, 1, 4).expand(1, 2, 1, 4).clone()
    q[:, 1] = 1.0  # query pixels (1, 1), (0.5, 1), (0, 1), (-0.5, 1)
    s = torch.tensor([[-1.0, 5.0], [-1.0, 5.0]]).view(1, 1, 2, 1, 2)  # (-1,-1) in, (5,5) out
    m = torch.tensor([[[[1.0, 0.0]]]])
    got = cosine_prior(q, s, m)[0, 0, 0]
    raw = torch.nn.functional.cosine_similarity(q[0, :, 0].T, s[0, 0, :, 0, 0][None], dim=1)
    want = (raw - raw.min()) / (raw.max() - raw.min() + 1e-7)
    torch.testing.assert_close(got, want.float())
    assert raw.max() < 0  # with zero vectors the max would be 0 everywhere: a flat prior


def test_local_prior_is_the_prior_of_patch_means():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    s = torch.randn(1, 1, 3, 4, 4, generator=g, dtype=torch.float64)
    m = (torch.rand(1, 1, 4, 4, generator=g) > 0.3).double()
    m[0, 0, 2:, 2:] = 0  # one patch wholly outside the mask: excluded from the max
    qn, sn = q[0].numpy(), (s[0, 0] * m[0, 0]).numpy()
    # patch means by hand: each 2x2 block -> its mean vector (mask applied before averaging)
    qp = qn.reshape(3, 2, 2, 2, 2).mean((2, 4))
    sp = sn.reshape(3, 2, 2, 2, 2).mean((2, 4))
    mp = m[0, 0].numpy().reshape(2, 2, 2, 2).mean((1, 3))
    want = _prior_loop(qp, sp[None], mp[None])
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


def _cycle_loop(q, s, m0, valid=None):
    """Brute force Eq. 5-7: q [C, H, W], s [K, C, H', W'], m0 [H, W], valid [H, W] or None."""
    c, h, w = q.shape
    qs = [q[:, y, x] for y in range(h) for x in range(w)]  # query pixels j, row-major
    k, _, hs, ws = s.shape
    ss = [s[i, :, y, x] for i, y, x in itertools.product(range(k), range(hs), range(ws))]
    ms = m0.reshape(-1)
    ok = np.ones(h * w, bool) if valid is None else valid.reshape(-1) > 0

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    out = np.zeros(h * w)
    for j, qj in enumerate(qs):
        i_star = max(range(len(ss)), key=lambda i: cos(ss[i], qj))
        back = [jj for jj in range(h * w) if ok[jj]]
        j_star = max(back, key=lambda jj: cos(ss[i_star], qs[jj]))
        out[j] = float(ms[j] == 1 and ms[j_star] == 1)
    return out.reshape(h, w)


@pytest.mark.parametrize("shots", [1, 2])
@pytest.mark.parametrize("with_valid", [False, True])
def test_cycle_matches_loop(shots, with_valid):
    g = torch.Generator().manual_seed(10 * shots + with_valid)
    b, c, h, w, hs, ws = 3, 6, 5, 7, 3, 5
    q = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    s = torch.randn(b, shots, c, hs, ws, generator=g, dtype=torch.float64)
    coarse = (torch.rand(b, 1, h, w, generator=g) > 0.4).double()
    valid = None
    if with_valid:  # the padding of the test resize: the last columns are outside the image
        valid = torch.ones(b, 1, h, w, dtype=torch.float64)
        valid[..., 5:] = 0
        coarse = coarse * valid
    got = cycle_consistent(q, s, coarse, valid)
    assert got.shape == (b, 1, h, w)
    want = np.stack(
        [
            _cycle_loop(
                q[i].numpy(),
                s[i].numpy(),
                coarse[i, 0].numpy(),
                None if valid is None else valid[i, 0].numpy(),
            )
            for i in range(b)
        ]
    )
    np.testing.assert_array_equal(got[:, 0].numpy(), want)
    # The check is not vacuous: it removes some coarse pixels and keeps others.
    assert 0 < want.sum() < coarse.sum()
    # float32 features give the same masks (no near-ties in these draws).
    got32 = cycle_consistent(q.float(), s.float(), coarse.float(), valid)
    np.testing.assert_array_equal(got32[:, 0].numpy(), want)


def test_cycle_two_shots_hand_built():
    # Query 1 x 3 pixels, coarse mask [1, 1, 0]; two shots of one support pixel each.
    # q0 = (1, 0.2): best support pixel is shot 0's s0 = (1, 0), whose best query pixel is
    #   q2 = (1, 0) (cosine 1 > 0.98), outside M0 -> the cycle breaks: q0 removed.
    # q1 = (0, 1): best support pixel is shot 1's s1 = (0.1, 1), whose best query pixel is
    #   q1 itself, inside M0 -> kept.
    query = torch.tensor([[1.0, 0.0, 1.0], [0.2, 1.0, 0.0]]).view(1, 2, 1, 3)
    support = torch.tensor([[[1.0], [0.0]], [[0.1], [1.0]]]).view(1, 2, 2, 1, 1)
    coarse = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    assert cycle_consistent(query, support, coarse).flatten().tolist() == [0.0, 1.0, 0.0]
    # With q2 outside the image the return step cannot land there: q0's cycle closes on q0.
    valid = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 3)
    assert cycle_consistent(query, support, coarse, valid).flatten().tolist() == [1.0, 1.0, 0.0]


def _imgr(img=True, imr=True, kshot="mean"):
    return IMGR(img=img, imr=imr, threshold=0.5, kshot=kshot)


def test_imgr_switches():
    g = torch.Generator().manual_seed(4)
    q, s = torch.randn(1, 8, 6, 6, generator=g), torch.randn(1, 1, 8, 6, 6, generator=g)
    m = torch.ones(1, 1, 6, 6)
    full = _imgr()(q, s, m)
    assert set(full) == {"cosine_prior", "coarse_mask", "initial_mask"}
    want = ((cosine_prior(q, s, m) + local_prior(q, s, m)) / 2 >= 0.5).float()
    torch.testing.assert_close(full["coarse_mask"], want)
    no_imr = _imgr(imr=False)(q, s, m)
    torch.testing.assert_close(no_imr["initial_mask"], no_imr["coarse_mask"])
    no_img = _imgr(img=False, imr=False)(q, s, m)
    assert no_img["initial_mask"].sum() == 0
    with pytest.raises(ValueError, match="imr=True needs img=True"):
        _imgr(img=False, imr=True)
    with pytest.raises(ValueError, match="kshot"):
        _imgr(kshot="max")


def test_empty_support_mask_gives_finite_prior():
    q, s = torch.randn(1, 4, 5, 5), torch.randn(1, 1, 4, 5, 5)
    out = _imgr()(q, s, torch.zeros(1, 1, 5, 5))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_padding_enters_neither_branch():
    # Query 5 x 7 cells whose last 2 columns are padding (the 2x2 patch of columns 4-5
    # straddles the edge):
    # two different paddings give the same global and local priors inside the image.
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 6, 5, 7, generator=g, dtype=torch.float64)
    s = torch.randn(1, 2, 6, 5, 7, generator=g, dtype=torch.float64)
    m = (torch.rand(1, 2, 5, 7, generator=g) > 0.4).double()
    valid = torch.ones(1, 1, 5, 7, dtype=torch.float64)
    valid[..., 5:] = 0
    q2 = q.clone()
    q2[..., 5:] = 50 * torch.randn(1, 6, 5, 2, generator=g, dtype=torch.float64)
    for prior in (cosine_prior, lambda *a: local_prior(a[0], a[1], a[2], 2, a[3])):
        a, b = prior(q, s, m, valid), prior(q2, s, m, valid)
        torch.testing.assert_close(a[..., :5], b[..., :5])
        assert (a[..., 5:] == 0).all() and (b[..., 5:] == 0).all()
    # without query_valid the padding moves both
    assert not torch.allclose(local_prior(q, s, m)[..., :5], local_prior(q2, s, m)[..., :5])


@pytest.mark.parametrize("kshot", ["mean", "pool"])
def test_imgr_on_inside_columns_equals_the_whole_map(kshot):
    # IMGR computes the global branch and the cycle on the query's inside pixels only (items
    # of different padding in one batch); the whole-map functions give the same maps
    g = torch.Generator().manual_seed(5)
    b, k, c, h, w = 3, 2, 16, 9, 11
    query, support = torch.randn(b, c, h, w, generator=g), torch.randn(b, k, c, h, w, generator=g)
    mask = (torch.rand(b, k, h, w, generator=g) > 0.6).float()
    valid = torch.ones(b, 1, h, w)
    valid[0, :, :, 7:] = 0  # padding on the right
    valid[1, :, 6:] = 0  # padding below
    imgr = IMGR(img=True, imr=True, threshold=0.5, kshot=kshot)
    out = imgr(query, support, mask, valid)
    s_g = cosine_prior(query, support, mask, valid, kshot)
    torch.testing.assert_close(out["cosine_prior"], s_g, rtol=0, atol=1e-6)
    s_l = local_prior(query, support, mask, 2, valid, kshot)
    coarse = (((out["cosine_prior"] + s_l) / 2 >= 0.5) & (valid > 0)).float()
    assert torch.equal(out["coarse_mask"], coarse)
    assert torch.equal(out["initial_mask"], cycle_consistent(query, support, coarse, valid))
    assert out["initial_mask"].sum() > 0 and (out["cosine_prior"] * (1 - valid)).abs().sum() == 0


def test_shot_weights_weigh_the_shots_priors():
    """BAM's K-shot reweighting: each shot's normalised prior, summed with the shot weights
    (brute force, one shot at a time), for the global prior, the local one and IMGR."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    s = torch.randn(2, 3, 5, 4, 6, generator=g, dtype=torch.float64)
    m = (torch.rand(2, 3, 4, 6, generator=g) > 0.4).double()
    valid = torch.ones(2, 1, 4, 6, dtype=torch.float64)
    valid[0, :, 3:] = 0  # item 0: a padded row
    w = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=torch.float64)
    got = cosine_prior(q, s, m, valid, "mean", shot_weights=w)
    for b in range(2):
        shots = [
            _prior_loop(q[b].numpy(), s[b, k : k + 1].numpy(), m[b, k : k + 1].numpy(), "mean",
                        valid[b, 0].numpy())
            for k in range(3)
        ]  # fmt: skip
        want = sum(float(w[b, k]) * shots[k] for k in range(3))
        np.testing.assert_allclose(got[b, 0].numpy(), want, atol=1e-9)
    # uniform weights are the plain mean; weights that are not give another map
    third = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(cosine_prior(q, s, m, valid, "mean", shot_weights=third),
                               cosine_prior(q, s, m, valid, "mean"))  # fmt: skip
    assert not torch.allclose(got, cosine_prior(q, s, m, valid, "mean"))
    with pytest.raises(ValueError, match="kshot='mean'"):
        cosine_prior(q, s, m, valid, "pool", shot_weights=w)
    # the local prior: the same weighting on patch means
    local = local_prior(q, s, m, 2, valid, "mean", shot_weights=w)
    per_shot = [
        local_prior(q, s[:, k : k + 1], m[:, k : k + 1], 2, valid, "mean") for k in range(3)
    ]
    torch.testing.assert_close(
        local, sum(w[:, k, None, None, None] * per_shot[k] for k in range(3))
    )
    # IMGR hands the weights to both priors
    imgr = IMGR(img=True, imr=False, threshold=0.5, kshot="mean")
    out = imgr(q, s, m, valid, w)
    torch.testing.assert_close(out["cosine_prior"], got)
    coarse = ((got + local) / 2 >= 0.5) & (valid > 0)
    assert torch.equal(out["coarse_mask"] > 0, coarse)
