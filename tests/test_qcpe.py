"""QCPE (Eq. 12-13): the posterior is Bayes' rule with a uniform prior."""

import numpy as np
import torch
from scipy.stats import multivariate_normal

from cgmgm.models.gmm import fit_gmm
from cgmgm.models.qcpe import QCPE, posterior


def test_posterior_equals_bayes_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 200, 3, generator=g, dtype=torch.float64)
    fg = (x[0, :, 0] > 0).double()[None]
    theta = fit_gmm(x, torch.stack([1 - fg, fg], 1), 2, "diag", 5)
    q = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64)
    out = QCPE()(q, theta)
    pts = q[0].flatten(1).T.numpy()  # [20, 3]

    def density(c):
        w, mu, var = theta.weights[0, c], theta.means[0, c], theta.covariances[0, c]
        return sum(
            w[m].item() * multivariate_normal(mu[m].numpy(), np.diag(var[m].numpy())).pdf(pts)
            for m in range(2)
        )

    p_bg, p_fg = density(0), density(1)
    want = p_fg / (p_fg + p_bg)
    np.testing.assert_allclose(out["posterior"][0, 0].flatten().numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(
        out["log_likelihood"][0, 1].flatten().numpy(), np.log(p_fg), rtol=1e-9
    )


def test_posterior_is_stable_for_tiny_likelihoods():
    ll = torch.tensor([[[-1e4, -2e4, -5e3], [-1e4 + 1.0, -1e4, -5e3]]])
    p = posterior(ll, torch.tensor([[True, True]]))
    assert torch.isfinite(p).all()
    torch.testing.assert_close(
        p[0], torch.tensor([torch.sigmoid(torch.tensor(1.0)).item(), 1.0, 0.5])
    )


def test_invalid_class_gives_uniform_posterior():
    ll = torch.randn(2, 2, 7)
    p = posterior(ll, torch.tensor([[True, False], [True, True]]))
    assert (p[0] == 0.5).all() and not (p[1] == 0.5).all()
