"""BAM's ensemble pieces against brute-force loops: Gram matrices, psi, the K-shot weights, the
base background, and the fusion at its initialisation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cgmgm.models.ensemble import (
    Ensemble,
    KShotReweighting,
    base_background,
    gram_matrix,
    scene_difference,
)


def _gram_loop(f: torch.Tensor) -> torch.Tensor:
    """One item [C, H, W] -> [C, C], entry by entry."""
    c = f.shape[0]
    flat = f.reshape(c, -1).double()
    out = torch.empty(c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(c):
            dot = float((flat[i] * flat[j]).sum())
            out[i, j] = dot / (
                math.sqrt(float((flat[i] ** 2).sum())) * math.sqrt(float((flat[j] ** 2).sum()))
                + 1e-7
            )
    return out


def test_gram_and_psi_match_loops():
    torch.manual_seed(0)
    q = torch.rand(2, 6, 5, 4)  # [B, C, H, W], non-negative like ReLU features
    s = torch.rand(2, 3, 6, 5, 4)  # [B, K, C, H, W]
    s[1, 2] = 0.0  # an empty support map: cosines of zero vectors are 0, not NaN
    g = gram_matrix(q)
    for b in range(2):
        torch.testing.assert_close(g[b].double(), _gram_loop(q[b]), atol=1e-5, rtol=1e-5)
    psi = scene_difference(q, s)
    assert psi.shape == (2, 3) and torch.isfinite(psi).all()
    for b, k in itertools.product(range(2), range(3)):
        diff = _gram_loop(q[b]) - _gram_loop(s[b, k])
        expected = math.sqrt(float((diff**2).sum())) / 6  # ||.||_F / ||ones(C, C)||_F
        assert float(psi[b, k]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(scene_difference(q, q[:, None]).abs().max()) < 1e-6  # a scene with itself


def test_kshot_weights_sum_to_one_and_follow_the_shots():
    torch.manual_seed(0)
    rw = KShotReweighting(5)
    psi = torch.rand(4, 5)
    w = rw(psi)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    perm = torch.randperm(5)
    torch.testing.assert_close(rw(psi[:, perm]), w[:, perm])  # equivariant to the shots' order
    # the weights depend on the rank of each shot: brute force through the sorted order
    for b in range(4):
        order = psi[b].argsort()
        scores = rw.rw(psi[b][order].view(1, 5, 1, 1)).view(5)
        expected = torch.empty(5)
        expected[order] = scores
        torch.testing.assert_close(w[b], expected.softmax(0))
    assert torch.equal(KShotReweighting(1)(psi[:, :1]), torch.ones(4, 1))
    with pytest.raises(ValueError, match="3 shots"):
        rw(psi[:, :3])


def test_base_background_leaves_out_the_episodes_class():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 4, 4)  # background + 5 base classes
    prob = logits.softmax(1)
    full = base_background(logits)
    torch.testing.assert_close(full, 1 - prob[:, :1])  # every base class at test time
    exclude = torch.tensor([2, -1, 5])
    part = base_background(logits, exclude)
    for b, c in enumerate(exclude.tolist()):
        keep = [j for j in range(1, 6) if j != c]
        torch.testing.assert_close(part[b, 0], prob[b, keep].sum(0))


def test_fusion_at_initialisation_is_the_meta_learner():
    torch.manual_seed(0)
    meta = torch.randn(2, 2, 5, 5)
    final = Ensemble()(meta, torch.rand(2, 1, 5, 5), torch.rand(2))
    assert torch.equal(final, meta.softmax(1))


def test_fusion_trains_its_convolutions_and_nothing_upstream():
    torch.manual_seed(0)
    ens = Ensemble()
    with torch.no_grad():  # away from [1, 0], where psi's and B's gradients vanish
        ens.gram_merge.weight.copy_(torch.tensor([0.9, 0.3]).view(1, 2, 1, 1))
        ens.cls_merge.weight.copy_(torch.tensor([0.8, 0.4]).view(1, 2, 1, 1))
    meta = torch.randn(2, 2, 5, 5, requires_grad=True)
    base_bg = torch.rand(2, 1, 5, 5)  # from the frozen base learner: a constant
    final = ens(meta, base_bg, torch.rand(2))
    torch.nn.functional.cross_entropy(final, torch.randint(0, 2, (2, 5, 5))).backward()
    assert ens.gram_merge.weight.grad.abs().sum() > 0 and ens.cls_merge.weight.grad.abs().sum() > 0
    assert meta.grad is not None and meta.grad.abs().sum() > 0
