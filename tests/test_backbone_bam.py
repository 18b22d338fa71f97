"""BAM's backbones and weight files: ``resnet50_psp`` (PSPNet's deep-stem, dilated ResNet-50)
and the key layouts of BAM's ``resnet50_v2.pth`` and stage-1 PSPNet ``best.pth`` (ResNet, VGG).

The fixture files are written from module trees built here out of torchvision's blocks under
BAM's attribute names, independently of the code under test; a backbone loaded from them must
reproduce the forward pass of those trees. Set ``CGMGM_BAM_INITMODEL`` to BAM's ``initmodel/``
directory to also load the real files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.vgg import cfgs, make_layers

from cgmgm.models.backbone import (
    LAYOUTS,
    bam_checkpoint_info,
    build_backbone,
    detect_layout,
    read_state_dict,
    split_bam_checkpoint,
)

H, W = 65, 97  # odd sizes: stride-8 maps of ceil(H/8) x ceil(W/8)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VGG_SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))  # BAM's get_vgg16_layer ranges
HEAD_KEY = re.compile(r"ppm\.features\.[0-3]\.[12]\.\w+|cls\.[014]\.\w+")
INITMODEL = os.environ.get("CGMGM_BAM_INITMODEL")
DATA = Path(os.environ.get("CGMGM_TEST_DATA", "/work/shared/data"))


# ----------------------------------------------------------------------------- BAM-like trees


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PPMLike(nn.Module):
    """BAM's PPM children: ``features[i] = (AdaptiveAvgPool2d, Conv2d, BatchNorm2d, ReLU)``."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(channels, reduction, 1, bias=False),
                nn.BatchNorm2d(reduction),
                nn.ReLU(inplace=True),
            )
            for b in (1, 2, 3, 6)
        )


class BamPSPNetLike(nn.Module):
    """BAM's stage-1 model as its state dict sees it: layer0..layer4, then ``encoder`` holding
    the same five modules again, then the PSP head ``ppm`` and ``cls``."""

    def __init__(self, layers: list[nn.Module], channels: int, classes: int):
        super().__init__()
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.encoder = nn.Sequential(*layers)
        self.ppm = PPMLike(channels, channels // 4)
        self.cls = nn.Sequential(
            nn.Conv2d(2 * channels, 512, 3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(512, classes, 1),
        )


class SemsegResNetLike(nn.Module):
    """The deep-stem ResNet of ``resnet50_v2.pth``: stem convs/BNs as top-level attributes."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        stem = list(layers[0])
        self.conv1, self.bn1, self.relu1 = stem[0:3]
        self.conv2, self.bn2, self.relu2 = stem[3:6]
        self.conv3, self.bn3, self.relu3 = stem[6:9]
        self.maxpool = stem[9]
        self.layer1, self.layer2, self.layer3, self.layer4 = layers[1:]
        self.fc = nn.Linear(2048, 1000)


def pspnet_resnet50_layers() -> list[nn.Module]:
    """PSPNet's ResNet-50 as BAM's layer0..layer4: deep stem, torchvision Bottlenecks, every
    layer3 block's 3x3 conv dilated 2 and layer4's dilated 4, all at stride 1."""
    tv = torchvision.models.resnet50()
    layer0 = nn.Sequential(
        conv3x3(3, 64, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 64),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        conv3x3(64, 128),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    shortcut = nn.Sequential(nn.Conv2d(128, 256, 1, bias=False), nn.BatchNorm2d(256))
    layer1 = nn.Sequential(
        Bottleneck(128, 64, downsample=shortcut), Bottleneck(256, 64), Bottleneck(256, 64)
    )
    for stage, d in ((tv.layer3, 2), (tv.layer4, 4)):
        for name, module in stage.named_modules():
            if name.endswith("conv2"):
                module.dilation, module.padding, module.stride = (d, d), (d, d), (1, 1)
            elif name.endswith("downsample.0"):
                module.stride = (1, 1)
    return [layer0, layer1, tv.layer2, tv.layer3, tv.layer4]


def randomise_batchnorm(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def calibrate_batchnorm(stages: nn.Sequential, images: torch.Tensor) -> None:
    """Running statistics = one batch's statistics, so random deep features stay O(1)."""
    for m in stages.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, that batch's statistics
    stages.train()
    with torch.no_grad():
        stages((images - MEAN) / STD)
    stages.eval()


def reference_features(layers: list[nn.Module], images: torch.Tensor):
    """(mid, high) by BAM's own tree: mid = layer2 + layer3, high = layer4."""
    with torch.no_grad():
        x = layers[1](layers[0]((images - MEAN) / STD))
        l2 = layers[2](x)
        l3 = layers[3](l2)
        l4 = layers[4](l3)
    return torch.cat([l2, l3], 1), l4


def without_batch_counts(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> SimpleNamespace:
    """BAM ResNet-50 files (stage-1 best.pth from DataParallel, resnet50_v2.pth) + reference."""
    torch.manual_seed(0)
    layers = pspnet_resnet50_layers()
    model = BamPSPNetLike(layers, 2048, classes=16).eval()
    randomise_batchnorm(model)
    calibrate_batchnorm(model.encoder, torch.rand(1, 3, H, W))
    folder = tmp_path_factory.mktemp("initmodel")
    best = folder / "best.pth"
    wrapped = nn.DataParallel(model)  # BAM trains wrapped: every key starts with "module."
    torch.save({"epoch": 1, "state_dict": wrapped.state_dict(), "optimizer": {}}, best)
    imagenet = SemsegResNetLike(layers)
    v2 = folder / "resnet50_v2.pth"
    torch.save(without_batch_counts(imagenet.state_dict()), v2)  # an old file: no counters
    images = torch.rand(1, 3, H, W)
    mid, high = reference_features(layers, images)
    return SimpleNamespace(
        model=model, best=best, v2=v2, images=images, mid=mid, high=high, folder=folder
    )


@pytest.fixture(scope="module")
def psp_from_best(resnet):
    return build_backbone("resnet50_psp", weights=str(resnet.best))


@pytest.fixture(scope="module")
def resnet_state(resnet) -> dict:
    return read_state_dict(resnet.best)


@pytest.fixture(scope="module")
def vgg(tmp_path_factory) -> SimpleNamespace:
    """BAM VGG-16-BN stage-1 best.pth (``module.`` keys) and a torchvision vgg16_bn file."""
    torch.manual_seed(1)
    features = make_layers(cfgs["D"], batch_norm=True)  # torchvision vgg16_bn().features
    randomise_batchnorm(features)
    modules = list(features)
    layers = [nn.Sequential(*modules[a:b]) for a, b in VGG_SLICES]  # re-indexed from 0
    model = BamPSPNetLike(layers, 512, classes=61)
    folder = tmp_path_factory.mktemp("initmodel_vgg")
    best = folder / "best.pth"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {}}, best)
    tv_file = folder / "vgg16_bn.pth"
    tv_state = {f"features.{k}": v for k, v in without_batch_counts(features.state_dict()).items()}
    tv_state |= {"classifier.0.weight": torch.zeros(2, 2), "classifier.0.bias": torch.zeros(2)}
    torch.save(tv_state, tv_file)
    return SimpleNamespace(model=model, features=features, best=best, tv_file=tv_file)


# ----------------------------------------------------------------------------- resnet50_psp


def test_resnet50_psp_is_pspnets_resnet(psp_from_best):
    body = psp_from_best.body
    stem = [body.conv1[i] for i in (0, 3, 6)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem] == [
        (3, 64, (3, 3), (2, 2)),
        (64, 64, (3, 3), (1, 1)),
        (64, 128, (3, 3), (1, 1)),
    ]
    assert body.bn1.num_features == 128 and body.layer1[0].conv1.in_channels == 128
    assert body.layer2[0].conv2.stride == (2, 2) and body.layer2[0].conv2.dilation == (1, 1)
    for stage, d in (("layer3", 2), ("layer4", 4)):
        for block in getattr(body, stage):
            conv = block.conv2
            assert (conv.dilation, conv.padding, conv.stride) == ((d, d), (d, d), (1, 1)), stage
        assert getattr(body, stage)[0].downsample[0].stride == (1, 1)
    assert (psp_from_best.mid_channels, psp_from_best.high_channels) == (1536, 2048)
    assert torch.allclose(psp_from_best.mean.flatten(), MEAN.flatten())
    assert torch.allclose(psp_from_best.std.flatten(), STD.flatten())


def test_bam_pspnet_checkpoint_reproduces_bams_features(resnet, psp_from_best):
    mid, high = psp_from_best(resnet.images)
    assert mid.shape == (1, 1536, 9, 13) and high.shape == (1, 2048, 9, 13)
    assert high.abs().mean() > 0.1  # calibrated random features: a meaningful comparison
    torch.testing.assert_close(mid, resnet.mid, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(high, resnet.high, rtol=1e-4, atol=1e-4)


def test_resnet50_v2_file_loads_the_same_backbone(resnet, psp_from_best):
    """Same tensors in the same places as the best.pth backbone, which reproduces BAM's
    features (test above), so this file's mapping is right too."""
    saved = torch.load(resnet.v2, weights_only=True)
    assert {"conv3.weight", "bn3.running_var", "fc.weight"} <= saved.keys()
    assert not any(k.startswith("module.") or "num_batches" in k for k in saved)
    bb = build_backbone("resnet50_psp", weights=str(resnet.v2))
    a = without_batch_counts(bb.state_dict())
    b = without_batch_counts(psp_from_best.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(bb.body.bn1.running_var, resnet.model.layer0[7].running_var)
    assert torch.equal(bb.body.conv1[3].weight, resnet.model.layer0[3].weight)


def test_split_resnet_checkpoint(resnet, resnet_state, psp_from_best):
    saved = torch.load(resnet.best, weights_only=True)
    assert set(saved) == {"epoch", "state_dict", "optimizer"}
    assert all(k.startswith("module.") for k in saved["state_dict"])
    body, head, layout = split_bam_checkpoint(resnet_state)
    assert layout == "bam_pspnet_resnet" and layout in LAYOUTS
    assert body.keys() == psp_from_best.body.state_dict().keys()
    model = resnet.model
    assert torch.equal(body["conv1.0.weight"], model.layer0[0].weight)
    assert torch.equal(body["conv1.4.running_mean"], model.layer0[4].running_mean)
    assert torch.equal(body["conv1.6.weight"], model.layer0[6].weight)
    assert torch.equal(body["bn1.bias"], model.layer0[7].bias)
    assert torch.equal(body["layer4.2.conv3.weight"], model.layer4[2].conv3.weight)
    expected_head = {f"ppm.{k}": v for k, v in model.ppm.state_dict().items()}
    expected_head |= {f"cls.{k}": v for k, v in model.cls.state_dict().items()}
    assert head.keys() == expected_head.keys()
    assert all(HEAD_KEY.fullmatch(k) for k in head), sorted(head)
    assert all(torch.equal(head[k], v) for k, v in expected_head.items())


def test_either_copy_of_the_backbone_is_enough(resnet_state):
    full, _, _ = split_bam_checkpoint(resnet_state)
    for drop in ("encoder.", "layer"):
        state = {k: v for k, v in resnet_state.items() if not k.startswith(drop)}
        body, head, layout = split_bam_checkpoint(state)
        assert layout == "bam_pspnet_resnet" and head is not None
        assert body.keys() == full.keys()
        assert all(torch.equal(body[k], full[k]) for k in full)


def test_encoder_and_layer_copies_must_agree(resnet_state):
    state = dict(resnet_state)
    state["encoder.3.2.conv2.weight"] = state["encoder.3.2.conv2.weight"] + 1e-3
    with pytest.raises(RuntimeError, match=r"x/best\.pth.*encoder\.3\.2\.conv2\.weight differs"):
        split_bam_checkpoint(state, "x/best.pth")
    state = dict(resnet_state)
    del state["encoder.1.0.bn1.running_var"]
    with pytest.raises(RuntimeError, match=r"layer1\.0\.bn1\.running_var has no copy"):
        split_bam_checkpoint(state, "x/best.pth")


def test_disagreeing_copies_in_a_file_are_an_error(tmp_path):
    state = {
        "layer0.0.weight": torch.zeros(64, 3, 3, 3),
        "encoder.0.0.weight": torch.ones(64, 3, 3, 3),
        "layer1.0.conv1.weight": torch.zeros(64, 128, 1, 1),
        "encoder.1.0.conv1.weight": torch.zeros(64, 128, 1, 1),
    }
    path = tmp_path / "best.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(RuntimeError, match=r"best\.pth.*encoder\.0\.0\.weight differs"):
        build_backbone("resnet50_psp", weights=str(path))


def test_unexplained_keys_are_reported_with_the_file(resnet_state, tmp_path):
    state = {k: v for k, v in resnet_state.items() if k.startswith(("layer", "aux."))}
    state["aux.0.weight"] = torch.zeros(1)  # a key no layout explains
    path = tmp_path / "odd_best.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"odd_best\.pth.*1 unexpected.*aux\.0\.weight"):
        build_backbone("resnet50_psp", weights=str(path))


# ----------------------------------------------------------------------------- VGG


def test_bam_vgg_checkpoint_equals_torchvision_features(vgg):
    body, head, layout = split_bam_checkpoint(read_state_dict(vgg.best))
    assert layout == "bam_pspnet_vgg"
    tv = without_batch_counts(vgg.features.state_dict())
    body_features = {k.removeprefix("features."): v for k, v in without_batch_counts(body).items()}
    assert body_features.keys() == {k for k in tv if int(k.split(".")[0]) < 43}
    assert all(torch.equal(body_features[k], tv[k]) for k in body_features)
    assert torch.equal(body["features.34.weight"], vgg.model.layer4[0].weight)
    assert torch.equal(body["features.25.running_var"], vgg.model.layer3[1].running_var)
    assert all(HEAD_KEY.fullmatch(k) for k in head) and head["cls.0.weight"].shape[1] == 1024

    from_bam = build_backbone("vgg16", weights=str(vgg.best))
    from_tv = build_backbone("vgg16", weights=str(vgg.tv_file))
    a, b = from_bam.state_dict(), from_tv.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 3, 40, 56)
    assert all(torch.equal(p, q) for p, q in zip(from_bam(x), from_tv(x), strict=True))


# ----------------------------------------------------------------------------- errors, info


def test_checkpoint_for_another_architecture_is_an_error(resnet, vgg):
    with pytest.raises(RuntimeError, match=r"best\.pth.*ResNet-50.*'resnet50_psp', not 'vgg16'"):
        build_backbone("vgg16", weights=str(resnet.best))
    with pytest.raises(RuntimeError, match=r"VGG-16-BN.*'vgg16', not 'resnet50_psp'"):
        build_backbone("resnet50_psp", weights=str(vgg.best))
    with pytest.raises(RuntimeError, match=r"resnet50_v2\.pth.*backbone\.name=resnet50_psp"):
        build_backbone("resnet50", weights=str(resnet.v2))


def test_bam_checkpoint_info(resnet, resnet_state, vgg):
    assert bam_checkpoint_info(resnet_state) == {
        "layout": "bam_pspnet_resnet",
        "backbone": "resnet50_psp",
        "num_classes": 16,
        "channels": 2048,
    }
    assert bam_checkpoint_info(str(vgg.best)) == {
        "layout": "bam_pspnet_vgg",
        "backbone": "vgg16",
        "num_classes": 61,
        "channels": 512,
    }
    info = bam_checkpoint_info(resnet.v2)
    assert info == {
        "layout": "bam_resnet_imagenet",
        "backbone": "resnet50_psp",
        "num_classes": None,
        "channels": None,
    }
    timm_like = {"conv1.weight": torch.zeros(1), "layer1.0.conv1.weight": torch.zeros(1)}
    assert bam_checkpoint_info(timm_like)["layout"] == "timm"
    assert bam_checkpoint_info(timm_like)["backbone"] is None


def test_layout_detection_is_unambiguous():
    z = torch.zeros(1)
    assert detect_layout({"conv1.0.weight": z, "bn1.weight": z}) == "timm"  # timm deep stem
    assert detect_layout({"features.0.weight": z, "classifier.0.weight": z}) == "timm"
    assert detect_layout({"conv2.weight": z, "conv3.weight": z, "bn3.weight": z}) == (
        "bam_resnet_imagenet"
    )
    assert detect_layout({"encoder.0.0.weight": z, "encoder.2.3.weight": z}) == "bam_pspnet_vgg"
    mixed = {"layer0.0.weight": z, "layer1.0.weight": z, "layer1.0.conv1.weight": z}
    with pytest.raises(RuntimeError, match=r"m\.pth.*mix ResNet and VGG"):
        detect_layout(mixed, "m.pth")
    with pytest.raises(RuntimeError, match="neither ResNet nor VGG"):
        detect_layout({"layer0.0.weight": z, "ppm.features.0.1.weight": z})


def test_imagenet_for_resnet50_psp_names_bams_file():
    with pytest.raises(RuntimeError, match=r"resnet50_psp.*initmodel/resnet50_v2\.pth") as err:
        build_backbone("resnet50_psp", weights="imagenet")
    assert "backbone.weights=none" in str(err.value)


# ----------------------------------------------------------------------------- real files


def initmodel_file(relative: str) -> Path:
    if not INITMODEL:
        pytest.skip(
            "set CGMGM_BAM_INITMODEL to BAM's initmodel/ directory (resnet50_v2.pth, "
            "vgg16_bn.pth, PSPNet/<dataset>/split<k>/<arch>/best.pth) to load the real files"
        )
    path = Path(INITMODEL).expanduser() / relative
    if not path.exists():
        pytest.skip(f"{path} not found (CGMGM_BAM_INITMODEL={INITMODEL})")
    return path


def test_real_resnet50_v2():
    path = initmodel_file("resnet50_v2.pth")
    assert bam_checkpoint_info(path)["layout"] == "bam_resnet_imagenet"
    bb = build_backbone("resnet50_psp", weights=str(path))
    mid, high = bb(torch.rand(1, 3, H, W))
    assert torch.isfinite(mid).all() and torch.isfinite(high).all()
    photo = DATA / "davis2016" / "blackswan" / "00000.jpg"
    state, _, _ = split_bam_checkpoint(read_state_dict(path))
    if not photo.is_file() or "fc.weight" not in state:
        return
    # the stem mapping is right iff the undilated ImageNet classifier knows a black swan (100)
    import timm

    model = timm.create_model("resnet50", stem_type="deep", stem_width=64).eval()
    result = model.load_state_dict(state, strict=False)  # old file: no num_batches_tracked
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result
    img = Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = model((x - MEAN) / STD)
    assert 100 in logits.topk(5).indices[0].tolist()


def test_real_vgg16_bn():
    path = initmodel_file("vgg16_bn.pth")
    assert bam_checkpoint_info(path)["layout"] == "timm"
    bb = build_backbone("vgg16", weights=str(path))
    assert torch.isfinite(bb(torch.rand(1, 3, H, W))[1]).all()


def test_real_pspnet_checkpoints():
    root = initmodel_file("PSPNet")
    files = sorted(root.glob("*/split*/*/best.pth"))
    if not files:
        pytest.skip(f"no {root}/<dataset>/split<k>/<arch>/best.pth")
    built = set()
    for path in files:
        dataset, arch = path.parts[-4], path.parts[-2]
        name = "vgg16" if arch.startswith("vgg") else "resnet50_psp"
        state = read_state_dict(path)
        info = bam_checkpoint_info(state)
        assert info["backbone"] == name, path
        assert info["channels"] == (512 if name == "vgg16" else 2048), path
        if dataset in ("pascal", "coco"):
            assert info["num_classes"] == {"pascal": 16, "coco": 61}[dataset], path
        body, head, _ = split_bam_checkpoint(state, path)
        assert head is not None and all(HEAD_KEY.fullmatch(k) for k in head), path
        if name not in built:  # one build per architecture keeps this test short
            bb = build_backbone(name, weights=str(path))
            assert torch.isfinite(bb(torch.rand(1, 3, H, W))[1]).all()
            built.add(name)


# ----------------------------------------------------------------------------- base_ckpt=


def _bam_head_reference(model: BamPSPNetLike, high: torch.Tensor) -> torch.Tensor:
    """BAM's PSPNet head, written out: PPM branches upsampled (align_corners) after x, cls."""
    size = high.shape[-2:]
    outs = [high] + [
        F.interpolate(f(high), size=size, mode="bilinear", align_corners=True)
        for f in model.ppm.features
    ]
    return model.cls(torch.cat(outs, 1))


def test_bam_release_as_base_checkpoint(resnet, tmp_path):
    from cgmgm.base_ckpt import check_base_checkpoint, load_base_checkpoint
    from cgmgm.models.backbone import load_body_state
    from cgmgm.models.base_learner import BaseLearner

    path = tmp_path / "initmodel" / "PSPNet" / "pascal" / "split2" / "resnet50" / "best.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(resnet.best.read_bytes())
    base = load_base_checkpoint(path)
    assert (base.kind, base.backbone, base.dataset, base.fold) == (
        "bam",
        "resnet50_psp",
        "pascal",
        2,
    )
    assert base.num_classes == 16
    names = [f"c{i}" for i in range(15)]
    check_base_checkpoint(
        base, dataset="pascal", fold=2, backbone="resnet50_psp", base_class_names=names
    )
    with pytest.raises(ValueError, match=r"fold: 2 \(checkpoint\) vs 0 \(this run\)"):
        check_base_checkpoint(
            base, dataset="pascal", fold=0, backbone="resnet50_psp", base_class_names=names
        )
    with pytest.raises(ValueError, match=r"base learner classes: 16 \(checkpoint\) vs 60"):
        check_base_checkpoint(
            base, dataset="pascal", fold=2, backbone="resnet50_psp", base_class_names=names * 4
        )
    # the frozen stage-2 pieces reproduce BAM's backbone and base learner
    net = build_backbone("resnet50_psp", weights=None)
    load_body_state(net.body, base.body, base.path)
    head = BaseLearner(2048, 16).eval()
    head.load_state_dict(base.head)
    with torch.no_grad():
        mid, high = net(resnet.images)
        expected = _bam_head_reference(resnet.model.eval(), resnet.high)
        torch.testing.assert_close(high, resnet.high)
        torch.testing.assert_close(head(high), expected, atol=1e-4, rtol=1e-4)


def test_bam_release_outside_its_folders_is_refused(resnet):
    from cgmgm.base_ckpt import load_base_checkpoint

    with pytest.raises(ValueError, match="records no dataset or fold"):
        load_base_checkpoint(resnet.best)  # <tmp>/best.pth: no pascal|coco/split<k> in it


def test_backbone_only_file_is_not_a_base_checkpoint(resnet):
    from cgmgm.base_ckpt import load_base_checkpoint

    with pytest.raises(ValueError, match="holds no base learner.*backbone.weights="):
        load_base_checkpoint(resnet.v2)
