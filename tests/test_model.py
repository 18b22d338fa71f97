"""The assembled CGMGM module: shapes, switches, gradients, degenerate masks."""

import pytest
import torch

from cgmgm.models.backbone import build_backbone
from cgmgm.models.cgmgm import CGMGM, mask_fractions


def _episode(b=2, k=1, h=64, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, 3, h, w, generator=g)
    s = torch.rand(b, k, 3, h, w, generator=g)
    m = torch.zeros(b, k, h, w, dtype=torch.long)
    m[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    m[..., h // 4 - 1, :] = 255  # an ignore border
    return q, s, m


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("guidance", ["gmm", "cosine"])
def test_output_shapes(tiny_backbone, shots, guidance):
    model = CGMGM(tiny_backbone, guidance=guidance, proj_dim=32, em_iters=3)
    q, s, m = _episode(k=shots)
    out = model(q, s, m)
    assert out["logits"].shape == (2, 2, 64, 48)
    for key in ("guidance", "cosine_prior", "coarse_mask", "initial_mask"):
        assert out[key].shape == (2, 1, 8, 6), key
    assert ("posterior" in out) == (guidance == "gmm")
    assert torch.isfinite(out["logits"]).all()


def test_real_backbone_5_shot_shapes():
    model = CGMGM(build_backbone("efficientnet_lite0", weights="imagenet"), em_iters=2)
    q, s, m = _episode(b=1, k=5, h=97, w=65)
    out = model(q, s, m)
    assert out["logits"].shape == (1, 2, 97, 65)
    assert out["posterior"].shape == (1, 1, 13, 9)


def test_gradient_reaches_projection_through_the_posterior(tiny_backbone):
    model = CGMGM(tiny_backbone, proj_dim=16, em_iters=3)
    q, s, m = _episode()
    out = model(q, s, m)
    out["posterior"].sum().backward()  # only the GMM path: IMGR masks are not differentiable
    grad = model.proj[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_gmm_grad_switch_cuts_the_posterior_path(tiny_backbone):
    model = CGMGM(tiny_backbone, proj_dim=16, em_iters=3, gmm_grad=False)
    q, s, m = _episode()
    out = model(q, s, m)
    # with gmm_grad off the mixture is a constant; the posterior still depends on the query
    # features, so the projection gets gradient only through them
    out["posterior"].sum().backward()
    with_grad = CGMGM(tiny_backbone, proj_dim=16, em_iters=3)
    with_grad.load_state_dict(model.state_dict())
    with_grad(q, s, m)["posterior"].sum().backward()
    assert not torch.allclose(model.proj[0].weight.grad, with_grad.proj[0].weight.grad)


def test_training_free_has_no_parameters_and_predicts_the_posterior(tiny_backbone):
    model = CGMGM(tiny_backbone, training_free=True, em_iters=3)
    assert model.trainable_parameters() == []
    q, s, m = _episode()
    out = model(q, s, m)
    pred = out["logits"].argmax(1)
    up = torch.nn.functional.interpolate(out["posterior"], size=(64, 48), mode="bilinear")
    assert torch.equal(pred, (up[:, 0] > 0.5).long())


def test_empty_support_mask_is_finite(tiny_backbone):
    model = CGMGM(tiny_backbone, proj_dim=16, em_iters=3)
    q, s, m = _episode()
    m[:] = 0
    out = model(q, s, m)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("img,imr", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("cov,components", [("diag", 1), ("full", 2), ("diag", 6)])
def test_ablation_switches_run(tiny_backbone, img, imr, cov, components):
    model = CGMGM(
        tiny_backbone,
        img=img,
        imr=imr,
        covariance=cov,
        components=components,
        proj_dim=8,
        em_iters=2,
    )
    out = model(*_episode())
    assert torch.isfinite(out["posterior"]).all()
    if not img:
        assert out["initial_mask"].sum() == 0


def test_bad_switches_are_refused(tiny_backbone):
    with pytest.raises(ValueError, match="guidance"):
        CGMGM(tiny_backbone, guidance="prototype")
    with pytest.raises(ValueError, match="covariance"):
        CGMGM(tiny_backbone, covariance="spherical")
    with pytest.raises(ValueError, match="imr=True needs img=True"):
        CGMGM(tiny_backbone, img=False, imr=True)


def test_mask_fractions_count_ignore_for_neither():
    m = torch.tensor([[1, 1, 0, 255], [1, 0, 0, 255]])
    fg, bg = mask_fractions(m, (1, 2))
    torch.testing.assert_close(fg, torch.tensor([[0.75, 0.0]]))
    torch.testing.assert_close(bg, torch.tensor([[0.25, 0.5]]))
