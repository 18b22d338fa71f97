"""QCPE: Query Category Posterior Extracting (paper Eq. 12-13).

Eq. 12 gives log p(x_q | c; theta_c) = log sum_m pi_cm N(x_q; mu_cm, Sigma_cm). Eq. 13 as printed
divides the two log-likelihoods, which is not a probability. We implement Bayes' rule (Eq. 1)
with the uniform prior p(c) = 1/2 the paper states:

    p(fg | x_q) = p(x_q | fg) / (p(x_q | fg) + p(x_q | bg)) = softmax_c(log p(x_q | c))[fg],

evaluated with log-sum-exp so that log-likelihoods of -1e4 still give a finite posterior.
Where either class has no pixels (an empty fit) the posterior is uniform (0.5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cgmgm.models.gmm import GaussianMixture, log_likelihood


def posterior(log_lik: Tensor, valid: Tensor) -> Tensor:
    """Bayes' rule with a uniform prior (Eq. 1 / 13).

    log_lik [B, 2, N] (index 0 = background, 1 = foreground); valid [B, 2] bool
    -> p(fg | x) [B, N], 0.5 where a class is invalid.
    """
    p_fg = torch.softmax(log_lik, dim=1)[:, 1]  # [B, N]
    ok = valid.all(1, keepdim=True)  # [B, 1]
    return torch.where(ok, p_fg, torch.full_like(p_fg, 0.5))


class QCPE(nn.Module):
    """theta_bg, theta_fg and query features -> log p(x|bg), log p(x|fg), p(fg|x)."""

    def forward(self, query: Tensor, params: GaussianMixture) -> dict[str, Tensor]:
        """query [B, D, H, W]; params with leading dims [B, 2] (bg, fg) -> maps [B, *, H, W]."""
        b, d, h, w = query.shape
        x = query.flatten(2).transpose(1, 2)  # [B, H*W, D]
        with torch.autocast(x.device.type, enabled=False):  # fp32 under AMP (it upcasts half)
            ll = log_likelihood(params, x)  # [B, 2, H*W], Eq. 12
        post = posterior(ll, params.valid)  # [B, H*W], Eq. 13 (Bayes' rule)
        return {"log_likelihood": ll.view(b, 2, h, w), "posterior": post.view(b, 1, h, w)}
