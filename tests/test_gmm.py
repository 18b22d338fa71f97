"""CDGMG (Eq. 8-11): the batched EM against scikit-learn and against itself."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture as SkGMM

from cgmgm.models.gmm import CDGMG, GaussianMixture, _standardise, fit_gmm, log_likelihood


def _blobs(rng, n=(150, 120, 90), d=4, spread=3.0):
    parts = [rng.normal(rng.normal(0, spread, d), rng.uniform(0.3, 1.5, d), (k, d)) for k in n]
    return np.concatenate(parts)


def _relative_reg(x: np.ndarray, reg: float) -> float:
    """Our reg_covar is relative to the RMS variance of the data: the absolute equivalent."""
    return reg * x.var(0).mean()


def _sk_from(gm: GaussianMixture, cov: str, x: np.ndarray, iters: int, reg: float) -> SkGMM:
    w = gm.weights[0].double().numpy()
    prec = (
        1.0 / gm.covariances[0].double().numpy()
        if cov == "diag"
        else np.linalg.inv(gm.covariances[0].double().numpy())
    )
    return SkGMM(
        w.size,
        covariance_type=cov,
        max_iter=iters,
        tol=0.0,
        reg_covar=_relative_reg(x, reg),
        weights_init=w / w.sum(),
        means_init=gm.means[0].double().numpy(),
        precisions_init=prec,
    ).fit(x)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_em_matches_sklearn(cov, seed):
    rng = np.random.default_rng(seed)
    x = _blobs(rng)
    xt, w = torch.tensor(x)[None], torch.ones(1, len(x), dtype=torch.float64)
    init = fit_gmm(xt, w, 3, cov, iters=0)  # our deterministic initial theta^0
    ours = fit_gmm(xt, w, 3, cov, iters=12)
    sk = _sk_from(init, cov, x, 12, 1e-6)
    order = np.argsort(sk.means_[:, 0])
    mine = np.argsort(ours.means[0, :, 0].numpy())
    np.testing.assert_allclose(ours.means[0].numpy()[mine], sk.means_[order], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.weights[0].numpy()[mine], sk.weights_[order], atol=1e-7)
    np.testing.assert_allclose(
        ours.covariances[0].numpy()[mine], sk.covariances_[order], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(log_likelihood(ours, xt)[0].numpy(), sk.score_samples(x), atol=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_em_float32_close_to_sklearn(cov):
    rng = np.random.default_rng(5)
    x = _blobs(rng, d=16) * 40.0 + 7.0
    xt = torch.tensor(x, dtype=torch.float32)[None]
    init = fit_gmm(xt.double(), torch.ones(1, len(x), dtype=torch.float64), 3, cov, iters=0)
    ours = fit_gmm(xt, torch.ones(1, len(x)), 3, cov, iters=8)
    sk = _sk_from(init, cov, x, 8, 1e-6)
    ll = log_likelihood(ours, xt)[0].double().numpy()
    np.testing.assert_allclose(ll, sk.score_samples(x), rtol=1e-4, atol=1e-3)


def test_recovers_well_separated_means():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    x = np.concatenate([rng.normal(c, 0.5, (200, 3)) for c in centres])
    gm = fit_gmm(torch.tensor(x)[None], torch.ones(1, 600, dtype=torch.float64), 3, "diag", 20)
    got = gm.means[0].numpy()
    dist = np.linalg.norm(got[:, None] - centres[None], axis=-1).min(0)
    assert dist.max() < 0.2, got


def test_init_param_is_respected():
    rng = np.random.default_rng(8)
    x = torch.tensor(_blobs(rng))[None]
    w = torch.ones(1, x.shape[1], dtype=torch.float64)
    init = fit_gmm(x, w, 3, "diag", iters=0)
    assert torch.allclose(
        fit_gmm(x, w, 3, "diag", 7).means, fit_gmm(x, w, 3, "diag", 7, init=init).means
    )
    other = init._replace(means=init.means.flip(1) + 1.0)
    assert not torch.allclose(
        fit_gmm(x, w, 3, "diag", 1, init=other).means, fit_gmm(x, w, 3, "diag", 1).means
    )


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_batch_equals_items_alone(cov):
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(3, 200, 6, generator=g, dtype=torch.float64)
        * torch.tensor([1.0, 5.0, 0.2])[:, None, None]
    )
    w = (torch.rand(3, 200, generator=g) > 0.4).double()
    w[1, :50] = 0.3  # soft weights too
    batch = fit_gmm(x, w, 3, cov, 6)
    for i in range(3):
        one = fit_gmm(x[i : i + 1], w[i : i + 1], 3, cov, 6)
        for a, b in zip(batch[:4], one[:4], strict=True):
            torch.testing.assert_close(a[i : i + 1], b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_zero_weight_points_change_nothing(cov):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 120, 5, generator=g, dtype=torch.float64)
    w = torch.ones(2, 120, dtype=torch.float64)
    junk = torch.randn(2, 60, 5, generator=g, dtype=torch.float64) * 100 + 50
    xa, wa = torch.cat([x, junk], 1), torch.cat([w, torch.zeros(2, 60, dtype=torch.float64)], 1)
    perm = torch.randperm(180, generator=g)
    a, b = fit_gmm(x, w, 3, cov, 5), fit_gmm(xa[:, perm], wa[:, perm], 3, cov, 5)
    for ta, tb in zip(a[:4], b[:4], strict=True):
        torch.testing.assert_close(ta, tb, rtol=1e-8, atol=1e-8)


def test_classes_sharing_features_equal_separate_fits():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 300, 4, generator=g, dtype=torch.float64)
    fg = (torch.rand(2, 300, generator=g) > 0.5).double()
    x = x + 3 * fg[..., None]
    both = fit_gmm(x, torch.stack([1 - fg, fg], 1), 2, "diag", 6, reg_covar=0.0)
    for c, wc in enumerate([1 - fg, fg]):
        alone = fit_gmm(x, wc, 2, "diag", 6, reg_covar=0.0)
        torch.testing.assert_close(both.means[:, c], alone.means)
        torch.testing.assert_close(both.covariances[:, c], alone.covariances)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_log_likelihood_against_scipy(cov):
    rng = np.random.default_rng(4)
    d, m = 3, 2
    means = rng.normal(0, 2, (m, d))
    if cov == "diag":
        covs = rng.uniform(0.2, 2.0, (m, d))
        dense = [np.diag(c) for c in covs]
        pc = 1 / np.sqrt(covs)
    else:
        a = rng.normal(0, 1, (m, d, d))
        dense = [ai @ ai.T + 0.5 * np.eye(d) for ai in a]
        covs = np.stack(dense)
        pc = np.stack([np.linalg.inv(np.linalg.cholesky(c)).T for c in dense])
    weights = np.array([0.3, 0.7])
    gm = GaussianMixture(
        torch.tensor(np.log(weights))[None],
        torch.tensor(means)[None],
        torch.tensor(covs)[None],
        torch.tensor(pc)[None],
        torch.tensor([True]),
    )
    x = rng.normal(0, 3, (50, d))
    want = np.log(
        sum(
            w * multivariate_normal(mu, c).pdf(x)
            for w, mu, c in zip(weights, means, dense, strict=True)
        )
    )
    np.testing.assert_allclose(
        log_likelihood(gm, torch.tensor(x)[None])[0].numpy(), want, rtol=1e-10
    )


def test_gradient_flows_to_features():
    x = torch.randn(1, 80, 3, dtype=torch.float64, requires_grad=True)
    gm = fit_gmm(x, torch.ones(1, 80, dtype=torch.float64), 2, "diag", 4)
    gm.means.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x.grad = None
    gm = fit_gmm(x, torch.ones(1, 80, dtype=torch.float64), 2, "diag", 4, grad=False)
    assert not gm.means.requires_grad


def test_empty_class_is_flagged_and_finite():
    x = torch.randn(2, 50, 4)
    w = torch.ones(2, 50)
    w[1] = 0
    gm = fit_gmm(x, w, 3, "full", 3)
    assert gm.valid.tolist() == [True, False]
    assert all(torch.isfinite(t).all() for t in gm[:4])
    assert torch.isfinite(log_likelihood(gm, x)).all()


def test_bad_input_is_refused():
    x = torch.randn(1, 10, 2)
    with pytest.raises(ValueError, match="weight must be"):
        fit_gmm(x, torch.ones(1, 9), 2)
    with pytest.raises(ValueError, match="covariance"):
        fit_gmm(x, torch.ones(1, 10), 2, "spherical")
    with pytest.raises(ValueError, match="NaN"):
        fit_gmm(x.clone().fill_(float("nan")), torch.ones(1, 10), 2)
    with pytest.raises(ValueError, match=">= 0"):
        fit_gmm(x, -torch.ones(1, 10), 2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 6),
    m=st.integers(1, 4),
    scale=st.sampled_from([1e-3, 1e-1, 1.0, 1e2, 1e3]),
    offset=st.sampled_from([0.0, 1.0, 1e3]),
    kind=st.sampled_from(["random", "duplicated", "one_pixel", "empty"]),
    cov=st.sampled_from(["diag", "full"]),
    seed=st.integers(0, 2**16),
)
def test_degenerate_inputs_stay_finite(n, d, m, scale, offset, kind, cov, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, d, generator=g) * scale + offset
    w = torch.ones(1, n)
    if kind == "duplicated":
        x[:] = x[:, :1]
    elif kind == "one_pixel":
        w[:] = 0
        w[0, 0] = 1
    elif kind == "empty":
        w[:] = 0
    gm = fit_gmm(x, w, m, cov, 5)
    assert all(torch.isfinite(t).all() for t in gm[:4]), kind
    assert gm.valid.item() == (kind != "empty")
    ll = log_likelihood(gm, x)
    assert torch.isfinite(ll).all(), (kind, ll)


def test_cdgmg_uses_support_and_query_labels():
    g = torch.Generator().manual_seed(0)
    b, k, d, h, w = 2, 2, 8, 6, 6
    support = torch.randn(b, k, d, h, w, generator=g)
    query = torch.randn(b, d, h, w, generator=g)
    fg = (torch.rand(b, k, h, w, generator=g) > 0.5).float()
    mq = (torch.rand(b, 1, h, w, generator=g) > 0.5).float()
    theta = CDGMG(2, "diag", 5, grad=True, reg_covar=1e-6)(support, fg, 1 - fg, query, mq)
    xs = support.permute(0, 1, 3, 4, 2).reshape(b, -1, d)
    x = torch.cat([xs, query.flatten(2).transpose(1, 2)], 1)
    wfg = torch.cat([fg.flatten(1), mq.flatten(1)], 1)
    ref = fit_gmm(x, torch.stack([1 - wfg, wfg], 1), 2, "diag", 5)
    torch.testing.assert_close(theta.means, ref.means)
    only_support = CDGMG(2, "diag", 5, grad=True, reg_covar=1e-6)(support, fg, 1 - fg, query, None)
    ref_s = fit_gmm(xs, torch.stack([1 - fg.flatten(1), fg.flatten(1)], 1), 2, "diag", 5)
    torch.testing.assert_close(only_support.means, ref_s.means)


# ---------------------------------------------------------------- independent references


def _hand_init(rng, x: np.ndarray, m: int, cov: str) -> GaussianMixture:
    """theta^0 built in numpy (not by fit_gmm): m data points as means, the data's (co)variance
    for every component, unequal weights. Leading dim [1]."""
    means = x[rng.choice(len(x), m, replace=False)]
    weights = np.arange(1.0, m + 1) / np.arange(1.0, m + 1).sum()
    if cov == "diag":
        covs = np.repeat(x.var(0)[None], m, 0)
        pc = 1.0 / np.sqrt(covs)
    else:
        covs = np.repeat(np.cov(x.T, bias=True)[None], m, 0)
        pc = np.stack([np.linalg.inv(np.linalg.cholesky(c)).T for c in covs])
    return GaussianMixture(
        *(torch.tensor(a)[None] for a in (np.log(weights), means, covs, pc)), torch.tensor([True])
    )


def _em_reference(x, w, init: GaussianMixture, iters: int, reg: float):
    """Weighted EM written out in numpy/scipy: x [N, D], w [N] >= 0, init with leading dim [1],
    ``reg`` the absolute variance floor. Returns (weights [M], means [M, D], covariances)."""
    full = init.covariance_type == "full"
    log_pi = init.log_weights[0].numpy().copy()
    means = init.means[0].numpy().copy()
    covs = init.covariances[0].numpy().copy()
    m, d = means.shape
    for _ in range(iters):
        dense = covs if full else [np.diag(c) for c in covs]
        logp = np.stack([multivariate_normal(means[k], dense[k]).logpdf(x) for k in range(m)])
        logp = logp + log_pi[:, None]  # [M, N]
        r = np.exp(logp - logsumexp(logp, axis=0)) * w  # [M, N]
        nk = r.sum(1)
        log_pi = np.log(nk / nk.sum())
        means = r @ x / nk[:, None]
        new = []
        for k in range(m):
            xc = x - means[k]
            s = (r[k][:, None] * xc).T @ xc / nk[k]
            new.append(s + reg * np.eye(d) if full else np.diag(s) + reg)
        covs = np.stack(new)
    return np.exp(log_pi), means, covs


def _spread(x: np.ndarray, w: np.ndarray) -> float:
    """Mean over features of the w-weighted variance: the unit of reg_covar."""
    p = w / w.sum()
    centre = p @ x
    return float((p @ (x - centre) ** 2).mean())


def _assert_params(gm: GaussianMixture, i: tuple, want, rtol: float, atol: float) -> None:
    weights, means, covs = want
    np.testing.assert_allclose(gm.weights[i].detach().numpy(), weights, rtol=rtol, atol=atol)
    np.testing.assert_allclose(gm.means[i].detach().numpy(), means, rtol=rtol, atol=atol)
    np.testing.assert_allclose(gm.covariances[i].detach().numpy(), covs, rtol=rtol, atol=atol)


@pytest.mark.parametrize("moments", [False, True])
def test_standardise_both_paths_match_numpy(moments):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 50, 3, generator=g, dtype=torch.float64) * 7.0 + 20.0
    w = torch.rand(2, 2, 50, generator=g, dtype=torch.float64)
    w[:, :, :10] = 0.0  # points in neither class do not count
    w[1, 1] = 0.0  # an empty class
    for xi in (x, x.clone().requires_grad_(True)):  # in-place path, autograd path
        z, centre, scale = _standardise(xi, w, moments)
        assert z.requires_grad == xi.requires_grad
        for b in range(2):
            xn, wn = x[b].numpy(), w[b].sum(0).numpy()
            c = wn @ xn / wn.sum()
            var = _spread(xn, wn) + 1e-10 * ((c**2).mean() + 1.0)
            zs = (xn - c) / np.sqrt(var)
            want = np.concatenate([zs, zs**2], -1) if moments else zs
            np.testing.assert_allclose(centre[b].detach().numpy(), c, rtol=1e-12)
            np.testing.assert_allclose(scale[b].item(), np.sqrt(var), rtol=1e-12)
            np.testing.assert_allclose(z[b].detach().numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_autograd_path_matches_sklearn(cov):
    rng = np.random.default_rng(31)
    x = _blobs(rng) * 4.0 + 3.0
    xt = torch.tensor(x)[None].requires_grad_(True)
    w = torch.ones(1, len(x), dtype=torch.float64)
    init = fit_gmm(xt.detach(), w, 3, cov, iters=0)
    ours = fit_gmm(xt, w, 3, cov, iters=12, grad=True)
    # The in-place standardisation cannot run on a tensor that needs grad (out= raises), so a
    # differentiable result means the autograd path ran.
    assert ours.means.requires_grad and ours.covariances.requires_grad
    sk = _sk_from(init, cov, x, 12, 1e-6)  # same theta^0: components keep their order
    _assert_params(ours, (0,), (sk.weights_, sk.means_, sk.covariances_), 1e-6, 1e-7)


@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_and_inplace_paths_agree(cov, dtype):
    g = torch.Generator().manual_seed(32)
    x = (torch.randn(2, 300, 8, generator=g, dtype=torch.float64) * 40.0 + 7.0).to(dtype)
    x[:, :100] += 60.0  # two clusters
    w = torch.stack([(torch.rand(2, 300, generator=g) > 0.3).to(dtype), torch.ones(2, 300)], 1)
    w[0, 0, :50] = 0.4  # soft weights
    plain = fit_gmm(x, w, 3, cov, 10)
    graph = fit_gmm(x.clone().requires_grad_(True), w, 3, cov, 10, grad=True)
    assert graph.means.requires_grad and not plain.means.requires_grad
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(plain[:4], graph[:4], strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=tol, atol=tol * float(a.abs().max()))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_integer_weights_equal_duplicated_points(cov):
    rng = np.random.default_rng(33)
    x = _blobs(rng, n=(80, 60, 50), d=3)
    twice = rng.random(len(x)) < 0.3
    x_dup = np.concatenate([x, x[twice]])
    init = _hand_init(rng, x, 3, cov)  # the deterministic init would differ between the two
    w2 = torch.tensor(1.0 + twice)[None]
    ours = fit_gmm(torch.tensor(x)[None], w2, 3, cov, 10, init=init)
    ones = torch.ones(1, len(x_dup), dtype=torch.float64)
    dup = fit_gmm(torch.tensor(x_dup)[None], ones, 3, cov, 10, init=init)
    for a, b in zip(ours[:4], dup[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    sk = _sk_from(init, cov, x_dup, 10, 1e-6)  # scikit-learn on the duplicated points
    _assert_params(ours, (0,), (sk.weights_, sk.means_, sk.covariances_), 1e-6, 1e-7)
    # The duplication is not a no-op: the weight-1 fit differs.
    plain = fit_gmm(torch.tensor(x)[None], torch.ones_like(w2), 3, cov, 10, init=init)
    assert not torch.allclose(plain.means, ours.means, atol=1e-3)


@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("c", [1.0, 0.01, 37.0])
def test_soft_weights_match_reference_em(cov, c):
    rng = np.random.default_rng(34)
    x = _blobs(rng, n=(70, 50, 40), d=3) * 2.0 - 5.0
    w = rng.uniform(0.05, 1.0, len(x))
    w[rng.random(len(x)) < 0.2] = 0.0
    init = _hand_init(rng, x, 3, cov)
    ours = fit_gmm(torch.tensor(x)[None], torch.tensor(c * w)[None], 3, cov, 8, init=init)
    want = _em_reference(x, w, init, 8, 1e-6 * _spread(x, w))  # unscaled weights
    _assert_params(ours, (0,), want, 1e-8, 1e-10)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_scaling_one_class_of_two_changes_nothing(cov):
    # Two classes share the features; class 1's weights are multiplied by c. Without a variance
    # floor (whose unit is the spread of both classes together) each class's parameters equal
    # the reference EM of that class alone with its unscaled weights.
    rng = np.random.default_rng(35)
    x = _blobs(rng, n=(70, 60, 50), d=3)
    w = np.stack([rng.uniform(0.0, 1.0, len(x)), rng.uniform(0.0, 1.0, len(x))])
    inits = [_hand_init(rng, x, 2, cov) for _ in range(2)]
    both = GaussianMixture(*(torch.stack([a, b], 1) for a, b in zip(*inits, strict=True)))
    wt = torch.tensor(w * np.array([[1.0], [0.02]]))[None]
    ours = fit_gmm(torch.tensor(x)[None], wt, 2, cov, 6, reg_covar=0.0, init=both)
    for k in range(2):
        want = _em_reference(x, w[k], inits[k], 6, 0.0)
        _assert_params(ours, (0, k), want, 1e-8, 1e-10)


def test_default_variance_floor_survives_a_dead_channel():
    # After the projection's ReLU a channel can be exactly 0 over a class's pixels. A query
    # pixel that is foreground in every other channel, with a little activation (0.1) in that
    # channel, must stay foreground under the model's default floor (conf/model/cgmgm.yaml);
    # with scikit-learn's 1e-6 it falls thousands of nats below the background.
    from cgmgm.config import compose_model
    from cgmgm.models.qcpe import posterior

    g = torch.Generator().manual_seed(0)
    n, d = 200, 8
    fg = 2.0 + 0.5 * torch.randn(n, d, generator=g)
    fg[:, 0] = 0.0  # the dead channel
    bg = 0.5 * torch.randn(n, d, generator=g)
    bg[:, 0] = 1.0 + torch.randn(n, generator=g)
    x = torch.cat([bg, fg])[None]  # [1, 2n, D]
    w = torch.zeros(1, 2, 2 * n)
    w[0, 0, :n], w[0, 1, n:] = 1.0, 1.0  # (bg, fg)
    query = torch.full((1, 1, d), 2.0)
    query[0, 0, 0] = 0.1

    def p_fg(reg):
        theta = fit_gmm(x, w, 3, "diag", 10, reg_covar=reg)
        ll = log_likelihood(theta, query)  # [1, 2, 1]
        return posterior(ll, theta.valid)[0, 0].item(), (ll[0, 1, 0] - ll[0, 0, 0]).item()

    default = compose_model()["gmm"]["reg_covar"]
    p, margin = p_fg(default)
    assert p > 0.99 and margin > 5.0
    p_tiny, margin_tiny = p_fg(1e-6)
    assert p_tiny < 0.01 and margin_tiny < -1000.0


# ---------------------------------------------------------------- the chunked diag EM
# Without autograd the diag EM reads x in chunks (gmm._CPU_CHUNK_BYTES) and folds the
# standardisation's scale into its coefficients; these tests shrink the chunks to a few points,
# with a ragged last chunk, and check it against references written independently of it.


def _stack_inits(inits: list[list[GaussianMixture]]) -> GaussianMixture:
    """inits[b][c] with leading dim [1] -> one GaussianMixture with leading dims [B, C]."""
    rows = [GaussianMixture(*(torch.stack(f, 1) for f in zip(*row, strict=True))) for row in inits]
    return GaussianMixture(*(torch.cat(f, 0) for f in zip(*rows, strict=True)))


def _brute_em_step(x, w, gm: GaussianMixture, reg: float):
    """One weighted EM iteration with torch.distributions: x [N, D], w [N], gm leading dim [1]
    (one class), ``reg`` the absolute variance floor -> (weights [M], means, covariances)."""
    from torch.distributions import MultivariateNormal, Normal

    full = gm.covariance_type == "full"
    logp = []
    for k in range(gm.means.shape[1]):
        mu, cov = gm.means[0, k], gm.covariances[0, k]
        dist = MultivariateNormal(mu, cov) if full else Normal(mu, cov.sqrt())
        lp = dist.log_prob(x) if full else dist.log_prob(x).sum(-1)  # [N]
        logp.append(lp + gm.log_weights[0, k])
    r = torch.softmax(torch.stack(logp, 1), 1) * w[:, None]  # [N, M]
    nk = r.sum(0)
    means = r.T @ x / nk[:, None]
    covs = []
    for k in range(len(nk)):
        xc = x - means[k]
        s = (r[:, k, None] * xc).T @ xc / nk[k]
        covs.append(s + reg * torch.eye(x.shape[1]) if full else s.diagonal() + reg)
    return nk / nk.sum(), means, torch.stack(covs)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_one_em_step_equals_torch_distributions(cov, monkeypatch):
    # E-step (Eq. 10) and M-step (Eq. 11) against per-component log-densities from
    # torch.distributions, two episodes x two classes sharing the features, soft and zero weights.
    monkeypatch.setattr("cgmgm.models.gmm._CPU_CHUNK_BYTES", 2 * 8 * (2 * 3 + 16) * 7)  # 7 points
    rng = np.random.default_rng(41)
    xs = [_blobs(rng, n=(40, 30, 27), d=3) * s + o for s, o in ((1.0, 0.0), (30.0, -200.0))]
    x = torch.tensor(np.stack(xs))  # [2, 97, 3]
    w = torch.tensor(rng.uniform(0.0, 1.0, (2, 2, 97)))
    w[w < 0.25] = 0.0
    inits = [[_hand_init(rng, xs[b], 3, cov) for _ in range(2)] for b in range(2)]
    ours = fit_gmm(x, w, 3, cov, 1, init=_stack_inits(inits), reg_covar=1e-3)
    for b in range(2):
        reg = 1e-3 * _spread(xs[b], w[b].sum(0).numpy())
        for c in range(2):
            want = _brute_em_step(x[b], w[b, c], inits[b][c], reg)
            _assert_params(ours, (b, c), tuple(t.numpy() for t in want), 1e-9, 1e-11)


@pytest.mark.parametrize("scale", [1.0, 1e9])
def test_chunked_diag_em_matches_reference(scale, monkeypatch):
    # Eight iterations, chunks of 5 points (the last one ragged), against the numpy EM. At scale
    # 1e9 the second episode's buffer holds x' instead of x - centre (its squares are not
    # folded), next to an episode that is.
    rng = np.random.default_rng(42)
    xs = [_blobs(rng, n=(50, 40, 33), d=4), _blobs(rng, n=(60, 33, 30), d=4) * scale]
    x = torch.tensor(np.stack(xs))  # [2, 123, 4]
    w = torch.tensor(rng.uniform(0.05, 1.0, (2, 123)))
    w[torch.tensor(rng.random((2, 123))) < 0.2] = 0.0
    inits = [[_hand_init(rng, xs[b], 3, "diag")] for b in range(2)]
    init = GaussianMixture(*(t[:, 0] for t in _stack_inits(inits)))  # leading dims [B]
    default = fit_gmm(x, w, 3, "diag", 8, init=init)  # one chunk
    monkeypatch.setattr("cgmgm.models.gmm._CPU_CHUNK_BYTES", 2 * 8 * (2 * 4 + 16) * 5)
    ours = fit_gmm(x, w, 3, "diag", 8, init=init)
    for b in range(2):
        wb = w[b].numpy()
        want = _em_reference(xs[b], wb, inits[b][0], 8, 1e-6 * _spread(xs[b], wb))
        _assert_params(ours, (b,), want, 1e-8, 1e-10 * (scale if b else 1.0) ** 2)
    for a, d in zip(ours[:4], default[:4], strict=True):
        torch.testing.assert_close(a, d, rtol=1e-11, atol=0.0)


def test_chunked_diag_em_float32_at_size():
    # The bench's regime (D = 256, a few thousand points, fg and bg sharing features) in
    # float32 against the same fit in float64.
    g = torch.Generator().manual_seed(43)
    centres = torch.randn(2, 6, 256, generator=g) * 2.0
    comp = torch.randint(0, 6, (2, 3000), generator=g)
    x = centres[torch.arange(2)[:, None], comp] + torch.randn(2, 3000, 256, generator=g)
    fg = (comp >= 3).float()
    w = torch.stack([1 - fg, fg], 1)
    x = x + 5.0  # an offset: the centring matters
    ours = fit_gmm(x, w, 3, "diag", 10, grad=False)
    ref = fit_gmm(x.double(), w.double(), 3, "diag", 10, grad=False)
    torch.testing.assert_close(ours.means.double(), ref.means, rtol=0, atol=2e-5)
    torch.testing.assert_close(ours.covariances.double(), ref.covariances, rtol=1e-4, atol=0)
    torch.testing.assert_close(ours.log_weights.double(), ref.log_weights, rtol=0, atol=1e-5)
    ll, ll_ref = log_likelihood(ours, x).double(), log_likelihood(ref, x.double())
    torch.testing.assert_close(ll, ll_ref, rtol=1e-5, atol=1e-3)
