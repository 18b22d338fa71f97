"""Table 1's claim on real photos, without training: the GMM posterior is a far better
guidance map than the cosine prior (DAVIS-2016 in FSS-1000 layout, offline EfficientNet-Lite0)."""

from experiments.davis_guidance import episodes, guidance_iou


def test_episodes_are_fixed(shared_data):
    a = episodes(shared_data / "davis2016", 2)
    assert a == episodes(shared_data / "davis2016", 2)
    assert len(a) == 40 and all(s != q for _, s, q in a)


def test_gmm_posterior_beats_cosine_prior_on_davis(shared_data):
    res = guidance_iou(shared_data / "davis2016", per_class=1, size=(144, 256))
    assert res["episodes"] == 20
    # measured: cosine prior 11.7, posterior 38.0 (foreground IoU, %)
    assert res["posterior"] > res["cosine_prior"] + 15.0, res
