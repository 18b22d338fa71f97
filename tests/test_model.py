"""The assembled CGMGM module: shapes, switches, gradients, degenerate masks."""

import pytest
import torch

from _model_helpers import make_model
from cgmgm.models.backbone import build_backbone
from cgmgm.models.cgmgm import mask_fractions


def _episode(b=2, k=1, h=64, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, 3, h, w, generator=g)
    s = torch.rand(b, k, 3, h, w, generator=g)
    m = torch.zeros(b, k, h, w, dtype=torch.long)
    m[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    m[..., h // 4 - 1, :] = 255  # an ignore border
    return q, s, m


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("guidance", [["posterior"], ["cosine"], ["cosine", "posterior"]])
def test_output_shapes(tiny_backbone, shots, guidance):
    model = make_model(tiny_backbone, guidance=guidance, proj_dim=32, em_iters=3)
    q, s, m = _episode(k=shots)
    out = model(q, s, m)
    assert out["logits"].shape == (2, 2, 64, 48)
    for key in ("guidance", "cosine_prior", "coarse_mask", "initial_mask"):
        assert out[key].shape == (2, 1, 8, 6), key
    assert out["meta_logits"].shape == (2, 2, 64, 48)
    assert out["guidance_maps"].shape == (2, len(guidance), 8, 6)
    assert ("posterior" in out) == ("posterior" in guidance)
    assert torch.equal(out["logits"], out["meta_logits"])  # no base learner: no ensemble
    assert torch.isfinite(out["logits"]).all()


def test_real_backbone_5_shot_shapes():
    model = make_model(build_backbone("efficientnet_lite0", weights="imagenet"), em_iters=2)
    q, s, m = _episode(b=1, k=5, h=97, w=65)
    out = model(q, s, m)
    assert out["logits"].shape == (1, 2, 97, 65)
    assert out["posterior"].shape == (1, 1, 13, 9)


def test_gradient_reaches_down_query_through_the_posterior(tiny_backbone):
    model = make_model(tiny_backbone, proj_dim=16, em_iters=3)
    q, s, m = _episode()
    out = model(q, s, m)
    out["posterior"].sum().backward()  # only the GMM path: IMGR masks are not differentiable
    grad = model.meta.down_query[0].weight.grad  # the mixtures live in down_query's space
    assert grad is not None and grad.abs().sum() > 0
    assert model.meta.down_supp[0].weight.grad is None  # the prototype is not on this path
    assert all(p.grad is None for p in model.backbone.parameters())


def test_gmm_grad_switch_cuts_the_posterior_path(tiny_backbone):
    model = make_model(tiny_backbone, proj_dim=16, em_iters=3, gmm_grad=False)
    q, s, m = _episode()
    out = model(q, s, m)
    # with gmm_grad off the mixture is a constant; the posterior still depends on the query
    # features, so the projection gets gradient only through them
    out["posterior"].sum().backward()
    with_grad = make_model(tiny_backbone, proj_dim=16, em_iters=3)
    with_grad.load_state_dict(model.state_dict())
    with_grad(q, s, m)["posterior"].sum().backward()
    a, b = model.meta.down_query[0].weight.grad, with_grad.meta.down_query[0].weight.grad
    assert a is not None and a.abs().sum() > 0
    assert not torch.allclose(a, b)


def test_training_free_has_no_parameters_and_predicts_the_posterior(tiny_backbone):
    model = make_model(tiny_backbone, training_free=True, em_iters=3)
    assert model.trainable_parameters() == [] and model.meta is None
    q, s, m = _episode()
    out = model(q, s, m)
    pred = out["logits"].argmax(1)
    up = torch.nn.functional.interpolate(
        out["posterior"], size=(64, 48), mode="bilinear", align_corners=True
    )
    assert torch.equal(pred, (up[:, 0] > 0.5).long())


def test_meta_logits_are_upsampled_by_the_one_resize(tiny_backbone):
    """Both branches upsample their logits as the scores do: bilinear, align_corners=True."""
    model = make_model(tiny_backbone, proj_dim=16, em_iters=3).eval()
    seen = []
    model.meta.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        out = model(*_episode())
    (coarse,) = seen  # [B, 2, h, w]
    assert coarse.shape[-2:] != out["logits"].shape[-2:]
    up = torch.nn.functional.interpolate(coarse, size=(64, 48), mode="bilinear", align_corners=True)
    assert torch.equal(out["meta_logits"], up)
    assert torch.equal(out["logits"], up)


def test_empty_support_mask_is_finite(tiny_backbone):
    model = make_model(tiny_backbone, proj_dim=16, em_iters=3)
    q, s, m = _episode()
    m[:] = 0
    out = model(q, s, m)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("img,imr", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("cov,components", [("diag", 1), ("full", 2), ("diag", 6)])
def test_ablation_switches_run(tiny_backbone, img, imr, cov, components):
    model = make_model(
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
        make_model(tiny_backbone, guidance="prototype")
    with pytest.raises(ValueError, match="model.guidance"):
        make_model(tiny_backbone, guidance="gmm")  # the old spelling of [posterior]
    with pytest.raises(ValueError, match="covariance"):
        make_model(tiny_backbone, covariance="spherical")
    with pytest.raises(ValueError, match="imr=True needs img=True"):
        make_model(tiny_backbone, img=False, imr=True)


def test_mask_fractions_count_ignore_for_neither():
    m = torch.tensor([[1, 1, 0, 255], [1, 0, 0, 255]])
    fg, bg = mask_fractions(m, (1, 2))
    torch.testing.assert_close(fg, torch.tensor([[0.75, 0.0]]))
    torch.testing.assert_close(bg, torch.tensor([[0.25, 0.5]]))


class CellBackbone(torch.nn.Module):
    """Per-cell features (no spatial mixing across 8x8 cells): mid = the cell's mean colour and
    its squares, high = a fixed signed mix of them. A cell's features depend on its own pixels
    only, so padding can reach a cell only through the model's fits and normalisations."""

    mid_channels, high_channels = 6, 6

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("mix", torch.randn(6, 6, generator=g))

    def forward(self, x):
        cell = torch.nn.functional.avg_pool2d(x, 8, ceil_mode=True)  # [B, 3, h, w]
        mid = torch.cat([cell, cell**2], 1)  # [B, 6, h, w]
        high = torch.einsum("oc,bchw->bohw", self.mix, mid - 0.3)  # signed
        return mid, high


def _scene(fg_rgb, bg_rgb, box, h=64, w=64, noise=0.02, seed=0):
    """An image [3, H, W] of one colour box on a plain background, with its mask [H, W]."""
    g = torch.Generator().manual_seed(seed)
    img = torch.tensor(bg_rgb).view(3, 1, 1).expand(3, h, w).clone()
    y0, y1, x0, x1 = box
    img[:, y0:y1, x0:x1] = torch.tensor(fg_rgb).view(3, 1, 1)
    img = (img + noise * torch.randn(3, h, w, generator=g)).clamp(0, 1)
    mask = torch.zeros(h, w, dtype=torch.long)
    mask[y0:y1, x0:x1] = 1
    return img, mask


@pytest.mark.parametrize("img", [False, True])
def test_training_free_posterior_finds_a_separable_object(img):
    # support: a red box on blue; query: a red box elsewhere on blue with a grey strip. The
    # posterior must segment the query's box (argmax of the posterior = the prediction).
    s_img, s_mask = _scene((0.9, 0.1, 0.1), (0.1, 0.1, 0.9), (8, 40, 8, 40))
    q_img, q_mask = _scene((0.9, 0.1, 0.1), (0.1, 0.1, 0.9), (24, 56, 32, 64), seed=1)
    q_img[:, :8, :] = 0.5  # a grey strip the support never shows
    model = make_model(CellBackbone(), training_free=True, img=img, imr=img).eval()
    out = model(q_img[None], s_img[None, None], s_mask[None, None])
    # at the feature cells (8 px each) the decision is exactly the box's cells
    cells = torch.zeros(8, 8, dtype=torch.bool)
    cells[3:7, 4:8] = True
    assert torch.equal(out["posterior"][0, 0] > 0.5, cells)
    post = out["posterior"][0, 0]
    assert post[cells].min() > 0.99 and post[1:][~cells[1:]].max() < 0.01
    # the grey strip (cell row 0) is in no support: the support-only fit can only guess
    # (p near 0.5); the cross-data fit sees it in the query's background (the paper's point)
    assert post[0].max() < (0.01 if img else 0.5)
    pred = out["logits"].argmax(1)[0]  # the prediction, upsampled to pixels
    iou = ((pred == 1) & (q_mask == 1)).sum() / ((pred == 1) | (q_mask == 1)).sum()
    assert iou > 0.85


def test_padding_enters_no_fit_and_no_normalisation():
    # The same query content, padded on the right with two different fillings: with
    # query_valid every map inside the image is identical; without it they differ.
    s_img, s_mask = _scene((0.9, 0.1, 0.1), (0.1, 0.6, 0.2), (8, 40, 8, 40))
    q_img, _ = _scene((0.9, 0.1, 0.1), (0.2, 0.2, 0.7), (16, 48, 8, 32), seed=1)
    valid = torch.ones(1, 64, 64)
    valid[:, :, 40:] = 0
    pads = []
    for fill in ((0.0, 0.0, 0.0), (0.9, 0.1, 0.1)):  # black, and the object's own colour
        q = q_img.clone()
        q[:, :, 40:] = torch.tensor(fill).view(3, 1, 1)
        pads.append(q[None])
    model = make_model(CellBackbone(), training_free=True).eval()
    keys = ("cosine_prior", "coarse_mask", "initial_mask", "posterior", "log_likelihood")
    with_valid = [model(q, s_img[None, None], s_mask[None, None], valid) for q in pads]
    for key in keys:
        a, b = (o[key][..., :5] for o in with_valid)  # cells 0-4 are inside the image
        torch.testing.assert_close(a, b, msg=key)
        if key in ("cosine_prior", "coarse_mask", "initial_mask"):
            assert (with_valid[0][key][..., 5:] == 0).all(), key
    without = [model(q, s_img[None, None], s_mask[None, None]) for q in pads]
    for key in ("cosine_prior", "log_likelihood"):  # the padding moves both without query_valid
        assert not torch.allclose(without[0][key][..., :5], without[1][key][..., :5]), key


@pytest.mark.parametrize("kshot", ["mean", "pool"])
def test_kshot_prototype_is_per_shot_then_averaged(kshot):
    from cgmgm.models.cgmgm import masked_average

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 2, 4, 3, 3, generator=g)
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0, 0, 0] = 1.0  # shot 0: one pixel
    w[0, 1] = 1.0  # shot 1: all nine pixels
    got = masked_average(feats, w, kshot)[0]
    eps = 5e-4  # BAM's Weighted_GAP: sum(f * m) / (sum(m) + 5e-4)
    shot0 = feats[0, 0, :, 0, 0] / (1 + eps)
    shot1 = feats[0, 1].sum((1, 2)) / (9 + eps)
    if kshot == "mean":
        want = (shot0 + shot1) / 2
    else:
        want = (feats[0, 0, :, 0, 0] + feats[0, 1].sum((1, 2))) / (10 + eps)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if kshot == "mean":  # BAM's K-shot reweighting: the shots' prototypes, weighted
        sw = torch.tensor([[0.2, 0.8]])
        weighted = masked_average(feats, w, kshot, sw)[0]
        torch.testing.assert_close(weighted, 0.2 * shot0 + 0.8 * shot1, atol=1e-6, rtol=1e-6)
    else:
        with pytest.raises(ValueError, match="kshot='mean'"):
            masked_average(feats, w, kshot, torch.tensor([[0.5, 0.5]]))


def test_em_and_posterior_stay_fp32_under_autocast():
    # bf16 mixed precision (trainer=gpu precision=bf16-mixed; CPU autocast here) must not
    # reach the EM or the log-likelihoods: the same posterior as in fp32
    from cgmgm.models.gmm import CDGMG
    from cgmgm.models.qcpe import QCPE

    g = torch.Generator().manual_seed(3)
    support, query = torch.randn(2, 1, 8, 6, 6, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    fg = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    mq = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    cdgmg, qcpe = CDGMG(2, "diag", 5, False, 0.1), QCPE()
    ref = qcpe(query, cdgmg(support, fg, 1 - fg, query, mq))["posterior"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theta = cdgmg(support, fg, 1 - fg, query, mq)
        amp = qcpe(query, theta)["posterior"]
    assert theta.means.dtype == torch.float32 and amp.dtype == torch.float32
    torch.testing.assert_close(amp, ref, rtol=0, atol=1e-6)
