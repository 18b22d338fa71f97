"""BAM's meta learner and CGMGM inside BAM (meta learner + frozen base learner + ensemble),
against independent computations: the layers as BAM defines them, the ensemble at its
initialisation, the base background with and without the episode's class, what trains and
what stays frozen, K-shot reweighting under a permutation of the shots, every guidance subset,
and the LightningModule's two-term loss."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cgmgm.models.cgmgm as cgmgm_module
from _model_helpers import make_model
from cgmgm.config import compose_model
from cgmgm.lit import LitCGMGM
from cgmgm.models.base_learner import BaseLearner
from cgmgm.models.meta_learner import ASPP, MetaLearner

C, IN, G = 16, 12, 3  # meta learner width, input (mid) channels, guidance maps
N_BASE = 5  # base classes of the stand-in base learner (+ background)
SMALL = {"proj_dim": C, "em_iters": 2, "components": 2}


# ------------------------------------------------------------------------- the meta learner


def _conv_facts(conv: nn.Module) -> tuple:
    assert isinstance(conv, nn.Conv2d)
    return (
        tuple(conv.weight.shape),
        conv.bias is not None,
        conv.padding,
        conv.dilation,
        conv.stride,
    )


def test_meta_learner_layers_are_bams():
    meta = MetaLearner(IN, C, G)
    for proj in (meta.down_query, meta.down_supp):  # 1x1, no bias, ReLU, Dropout2d(0.5)
        conv, relu, drop = proj
        assert _conv_facts(conv) == ((C, IN, 1, 1), False, (0, 0), (1, 1), (1, 1))
        assert isinstance(relu, nn.ReLU) and isinstance(drop, nn.Dropout2d) and drop.p == 0.5
    assert meta.down_query[0].weight is not meta.down_supp[0].weight  # own weights
    conv, relu = meta.init_merge  # [query, prototype, guidance maps] -> C
    assert _conv_facts(conv) == ((C, 2 * C + G, 1, 1), False, (0, 0), (1, 1), (1, 1))
    assert isinstance(relu, nn.ReLU)
    conv, relu = meta.res1  # the ASPP's 5 C channels -> C
    assert _conv_facts(conv) == ((C, 5 * C, 1, 1), False, (0, 0), (1, 1), (1, 1))
    convs = [m for m in meta.res2 if isinstance(m, nn.Conv2d)]
    assert [_conv_facts(c) for c in convs] == [((C, C, 3, 3), False, (1, 1), (1, 1), (1, 1))] * 2
    assert sum(isinstance(m, nn.ReLU) for m in meta.res2) == 2
    conv3, relu, drop, conv1 = meta.cls
    assert _conv_facts(conv3) == ((C, C, 3, 3), False, (1, 1), (1, 1), (1, 1))
    assert isinstance(drop, nn.Dropout2d) and drop.p == 0.1
    assert _conv_facts(conv1) == ((2, C, 1, 1), True, (0, 0), (1, 1), (1, 1))  # bg, fg
    # the ASPP: a pooled 1x1 and four branches (1x1, 3x3 at rates 6, 12, 18), all with bias
    aspp = [_conv_facts(m) for m in meta.aspp.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(aspp) == sorted(
        [((C, C, 1, 1), True, (0, 0), (1, 1), (1, 1))] * 2
        + [((C, C, 3, 3), True, (r, r), (r, r), (1, 1)) for r in (6, 12, 18)]
    )
    # no batch norm anywhere: it trains on one episode as on many
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in meta.modules())


def test_aspp_has_five_branches_and_a_pooled_branch_constant_over_space():
    torch.manual_seed(0)
    aspp = ASPP(C)
    x = torch.randn(2, C, 9, 7)
    y = aspp(x)
    assert y.shape == (2, 5 * C, 9, 7)
    pooled = y[:, :C]
    assert torch.equal(pooled, pooled[:, :, :1, :1].expand_as(pooled))
    # BAM: global average pooling -> 1x1 conv (bias) -> ReLU, tiled
    conv = aspp.pool[0]
    want = F.relu(F.conv2d(x.mean((2, 3), keepdim=True), conv.weight, conv.bias))
    torch.testing.assert_close(pooled[:, :, 4, 3], want[:, :, 0, 0])
    # the other branches: ReLU(conv(x)) at rates 1 (1x1), 6, 12, 18 (3x3, same-size padding)
    for i, conv in enumerate(m[0] for m in aspp.branches):
        d = conv.dilation[0]
        want = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=d * (conv.kernel_size[0] // 2),
                               dilation=d))  # fmt: skip
        torch.testing.assert_close(y[:, (i + 1) * C : (i + 2) * C], want, msg=f"branch {i}")


def _meta_by_hand(meta: MetaLearner, query, prototype, guidance):
    """BAM's meta learner written out with torch.nn.functional (eval mode: no dropout)."""

    def conv(m, x, pad=0, dil=1):
        return F.conv2d(x, m.weight, m.bias, padding=pad, dilation=dil)

    proto = prototype[:, :, None, None].expand(-1, -1, *query.shape[-2:])
    x = F.relu(conv(meta.init_merge[0], torch.cat([query, proto, guidance], 1)))
    g = F.relu(conv(meta.aspp.pool[0], F.adaptive_avg_pool2d(x, 1))).expand_as(x)
    branches = [g] + [
        F.relu(conv(b[0], x, pad=b[0].dilation[0] * (b[0].kernel_size[0] // 2),
                    dil=b[0].dilation[0]))
        for b in meta.aspp.branches
    ]  # fmt: skip
    x = F.relu(conv(meta.res1[0], torch.cat(branches, 1)))
    r = F.relu(conv(meta.res2[0], x, pad=1))
    r = F.relu(conv(meta.res2[2], r, pad=1))
    x = r + x
    x = F.relu(conv(meta.cls[0], x, pad=1))
    return conv(meta.cls[3], x)


def test_meta_learner_forward_matches_bams_computation():
    torch.manual_seed(0)
    meta = MetaLearner(IN, C, G).eval()
    query = torch.relu(torch.randn(2, C, 8, 6))
    prototype = torch.rand(2, C)
    guidance = torch.rand(2, G, 8, 6)
    out = meta(query, prototype, guidance)
    assert out.shape == (2, 2, 8, 6)
    torch.testing.assert_close(out, _meta_by_hand(meta, query, prototype, guidance))
    meta.train()  # dropout in the classifier: training outputs differ from evaluation's
    assert not torch.allclose(meta(query, prototype, guidance), out)


# ------------------------------------------------------------- CGMGM with a base learner


def _episode(b=2, k=1, h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, 3, h, w, generator=g)
    s = torch.rand(b, k, 3, h, w, generator=g)
    m = torch.zeros(b, k, h, w, dtype=torch.long)
    for i, j in itertools.product(range(b), range(k)):  # a different box per shot
        y0, x0 = 4 + 6 * j + 3 * i, 8 + 5 * j
        m[i, j, y0 : y0 + 28, x0 : x0 + 24] = 1
    m[..., 2, :] = 255  # an ignore row
    return q, s, m


def _with_base(backbone, shot=1, **kw):
    torch.manual_seed(0)
    base = BaseLearner(backbone.high_channels, N_BASE + 1, hidden=32)
    return make_model(backbone, base_learner=base, shot=shot, **{**SMALL, **kw})


def _hook(module: nn.Module) -> list:
    seen: list = []
    module.register_forward_hook(lambda mod, args, out: seen.append((args, out)))
    return seen


def test_ensemble_starts_as_the_meta_learners_softmax(tiny_backbone):
    model = _with_base(tiny_backbone).eval()
    assert model.has_ensemble and model.reweight is not None
    seen = _hook(model.meta)
    q, s, m = _episode()
    with torch.no_grad():
        out = model(q, s, m)
    ((_, meta),) = seen  # [B, 2, h, w], the meta learner's logits at the feature size
    up = F.interpolate(meta, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out["meta_logits"], up, rtol=0, atol=0)
    # gram_merge and cls_merge start at [1, 0]: the final output is the meta learner's
    # softmax (at the feature size, then upsampled), whatever psi and the base learner say
    want = F.interpolate(meta.softmax(1), size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out["logits"], want, rtol=0, atol=1e-7)
    assert out["psi"].shape == (2,) and out["shot_weights"].shape == (2, 1)
    assert torch.equal(out["shot_weights"], torch.ones(2, 1))  # one shot: weight 1


def _base_background_by_hand(model, q, exclude):
    """Sum of the base learner's base-class probabilities, class by class, leaving out
    ``exclude[b]`` (a base label 1..N) for item b, or none when ``exclude`` is None."""
    with torch.no_grad():
        _, high = model.backbone(q)
        prob = model.base_learner(high).softmax(1)  # [B, N + 1, h, w]
    out = torch.zeros_like(prob[:, :1])
    for b in range(prob.shape[0]):
        for c in range(1, N_BASE + 1):
            if exclude is None or c != int(exclude[b]):
                out[b, 0] += prob[b, c]
    return out


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_base_background_leaves_out_the_training_class(tiny_backbone, mode):
    model = _with_base(tiny_backbone)
    with torch.no_grad():  # away from [1, 0], so the base background reaches the output
        model.ensemble.cls_merge.weight.copy_(torch.tensor([0.7, 0.6]).view(1, 2, 1, 1))
    model.train(mode == "train")
    seen = _hook(model.ensemble)
    q, s, m = _episode()
    exclude = torch.tensor([2, 5])
    with torch.no_grad():
        torch.manual_seed(1)
        out_ex = model(q, s, m, base_exclude=exclude)
        torch.manual_seed(1)  # the same dropout masks in training mode
        out_all = model(q, s, m)
    (args_ex, fused_ex), (args_all, fused_all) = seen
    base_ex, base_all = args_ex[1], args_all[1]  # Ensemble(meta, base_bg, psi)
    torch.testing.assert_close(base_ex, _base_background_by_hand(model, q, exclude))
    torch.testing.assert_close(base_all, _base_background_by_hand(model, q, None))
    assert (base_all - base_ex).min() > 0  # the left-out class held probability everywhere
    # the final background: cls_merge of the meta background and the base background; the
    # final foreground does not see the base learner
    p = args_ex[0].softmax(1)
    torch.testing.assert_close(fused_ex[:, :1], 0.7 * p[:, :1] + 0.6 * base_ex)
    torch.testing.assert_close(out_ex["meta_logits"], out_all["meta_logits"], rtol=0, atol=0)
    torch.testing.assert_close(out_ex["logits"][:, 1], out_all["logits"][:, 1], rtol=0, atol=0)
    assert not torch.allclose(out_ex["logits"][:, 0], out_all["logits"][:, 0])
    up = F.interpolate(fused_ex, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out_ex["logits"], up, rtol=0, atol=0)
    assert not model.base_learner.training


def test_only_the_meta_learner_and_the_ensemble_train(tiny_backbone):
    model = _with_base(tiny_backbone, shot=3)
    model.train()
    assert not model.base_learner.training  # frozen: model.train() leaves it in eval mode
    assert not any(p.requires_grad for p in model.base_learner.parameters())
    q, s, m = _episode(k=3)
    target = m[:, 0].clone()  # any labels, 255 kept as ignore
    torch.manual_seed(0)
    out = model(q, s, m, base_exclude=torch.tensor([1, 4]))
    loss = F.cross_entropy(out["logits"], target, ignore_index=255)
    loss = loss + F.cross_entropy(out["meta_logits"], target, ignore_index=255)
    loss.backward()
    for name, p in model.meta.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"meta.{name}"
    for name in ("gram_merge", "cls_merge"):
        grad = getattr(model.ensemble, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, p in model.reweight.named_parameters():  # K = 3: BAM's K-shot weights train
        assert p.grad is not None and p.grad.abs().sum() > 0, f"reweight.{name}"
    frozen = [*model.backbone.parameters(), *model.base_learner.parameters()]
    assert frozen and all(p.grad is None or not p.grad.any() for p in frozen)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {
        id(p)
        for p in (
            *model.meta.parameters(),
            *model.ensemble.parameters(),
            *model.reweight.parameters(),
        )
    }


def test_kshot_weights_follow_the_shots_and_the_output_does_not(tiny_backbone):
    model = _with_base(tiny_backbone, shot=3).eval()
    q, s, m = _episode(k=3, seed=3)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = model(q, s, m)
        b = model(q, s[:, perm], m[:, perm])  # images and masks permuted together
    torch.testing.assert_close(a["shot_weights"].sum(1), torch.ones(2))
    assert (a["shot_weights"] > 0).all()
    torch.testing.assert_close(b["shot_weights"], a["shot_weights"][:, perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(b["psi"], a["psi"], atol=1e-5, rtol=0)
    for key in ("logits", "meta_logits", "cosine_prior", "posterior"):
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0, msg=key)
    # the weights are not uniform here, so reweighting is not the plain mean
    assert (a["shot_weights"] - 1 / 3).abs().max() > 1e-4


KEYS = {"cosine": "cosine_prior", "initial_mask": "initial_mask", "posterior": "posterior"}
SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations(KEYS, r)]  # 7 subsets


# every subset with IMG; without IMG (Table 5's C&Q rows) those that need no initial mask
RUNS = [(g, img) for g in SUBSETS for img in (True, False) if img or "initial_mask" not in g]


@pytest.mark.parametrize(
    ("guidance", "img"), RUNS, ids=[f"{'+'.join(g)}-img{int(i)}" for g, i in RUNS]
)
def test_every_guidance_subset_runs(tiny_backbone, guidance, img):
    # given in reverse: the maps are stacked in one fixed order (cosine, initial_mask, posterior)
    model = _with_base(tiny_backbone, guidance=guidance[::-1], img=img, imr=img).eval()
    assert model.guidance == tuple(guidance)
    assert model.meta.init_merge[0].weight.shape[1] == 2 * C + len(guidance)
    with torch.no_grad():
        out = model(*_episode())
    maps = out["guidance_maps"]
    assert maps.shape == (2, len(guidance), 8, 8)
    for i, g in enumerate(guidance):
        assert torch.equal(maps[:, i : i + 1], out[KEYS[g]]), g
    assert ("posterior" in out) == ("posterior" in guidance)
    assert ("log_likelihood" in out) == ("posterior" in guidance)
    primary = next(g for g in ("posterior", "initial_mask", "cosine") if g in guidance)
    assert out["guidance"] is out[KEYS[primary]]
    assert out["logits"].shape == out["meta_logits"].shape == (2, 2, 64, 64)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize(
    ("guidance", "img"),
    [([], True), (["gmm"], True), ("gmm", True), (["cosine", "cosine"], True),
     (["posterior", "prototype"], True), (["initial_mask"], False),
     (["cosine", "initial_mask"], False)],
)  # fmt: skip
def test_bad_guidance_is_refused(tiny_backbone, guidance, img):
    with pytest.raises(ValueError, match=r"model\.guidance"):
        _with_base(tiny_backbone, guidance=guidance, img=img, imr=False)
    with pytest.raises(ValueError, match=r"model\.guidance"):
        make_model(tiny_backbone, guidance=guidance, img=img, imr=False)


def test_a_string_names_one_map(tiny_backbone):
    model = make_model(tiny_backbone, guidance="cosine", **SMALL)
    assert model.guidance == ("cosine",) and model.meta.init_merge[0].weight.shape[1] == 2 * C + 1


# ------------------------------------------------------------------ the LightningModule


BACKBONE = {"name": "efficientnet_lite0", "weights": None}
CLASS_IDS = [1, 2, 3, 4, 5]


def _lit(**kw) -> LitCGMGM:
    model = compose_model([f"model.proj_dim={C}", "model.gmm.components=2", "model.gmm.iters=2"])
    return LitCGMGM(
        **{
            "model": model,
            "backbone": BACKBONE,
            "class_ids": CLASS_IDS,
            "base_learner_classes": N_BASE + 1,
            "loss": {"final": 0.7, "meta": 1.3},
            **kw,
        }
    )


def _batch(s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 2, (2, s, s), generator=g)
    target[:, :3] = 255
    return {
        "query_img": torch.rand(2, 3, s, s, generator=g),
        "query_mask": target,
        "support_imgs": torch.rand(2, 1, 3, s, s, generator=g),
        "support_masks": (torch.rand(2, 1, s, s, generator=g) > 0.5).long(),
        "class_idx": torch.tensor([0, 3]),
    }


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_loss_is_bams_two_terms_with_the_class_left_out():
    module = _lit()
    assert module.model.has_ensemble and "meta" in module.scores["val"]
    batch = _batch()
    g = torch.Generator().manual_seed(1)
    final, meta = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 2, 8, 8, generator=g)
    calls = []

    def model(query_img, support_imgs, support_masks, query_valid=None, base_exclude=None):
        calls.append(base_exclude)
        return {"logits": final, "meta_logits": meta}

    module.model.forward = model
    module.train()
    loss = module.training_step(batch, 0)
    (exclude,) = calls
    assert torch.equal(exclude, batch["class_idx"] + 1)  # base labels are 1-based

    def ce(logits):  # upsampled as BAM does (bilinear, align_corners=True), 255 ignored
        up = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=True)
        return F.cross_entropy(up, batch["query_mask"], ignore_index=255)

    torch.testing.assert_close(loss, 0.7 * ce(final) + 1.3 * ce(meta))

    untrained = _lit(loss=None)  # an ensemble needs the loss weights to train
    untrained.model.forward = model
    with pytest.raises(ValueError, match="loss"):
        untrained.training_step(batch, 0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_the_real_model_leaves_out_the_class_in_training_only(monkeypatch):
    module = _lit()
    seen = []
    real = cgmgm_module.base_background

    def spy(base_logits, exclude=None):
        seen.append(None if exclude is None else exclude.clone())
        return real(base_logits, exclude)

    monkeypatch.setattr(cgmgm_module, "base_background", spy)
    batch = _batch()
    module.train()
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
    train_exclude, val_exclude = seen
    assert torch.equal(train_exclude, batch["class_idx"] + 1)
    assert val_exclude is None  # evaluation: every base class is background
    assert int(module.scores["val"]["meta"].episodes.sum()) == 2
