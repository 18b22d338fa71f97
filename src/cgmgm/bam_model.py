"""BAM's trained final model (meta learner + ensemble + frozen backbone + base learner) as a
cgmgm model: :func:`load_bam_model` maps BAM's state dict onto :class:`~cgmgm.lit.LitCGMGM`
built as ``ablation=bam`` (guidance [cosine], no IMG / IMR: the paper's BAM row).

BAM (github.com/chunbolang/BAM, model/BAM.py, train.py) saves ``{"epoch", "state_dict",
"optimizer"}`` with ``model.state_dict()`` of its ``OneModel`` (a ``module.`` prefix when
trained under DataParallel / DDP). Its keys, and where they go here (``model.`` = the
LitCGMGM's CGMGM):

=====================================  ==================================================
BAM                                    cgmgm
=====================================  ==================================================
``layer0..layer4.*``                   ``model.backbone.body.*`` (ResNet-50 deep stem or
                                       VGG-16-BN: ``cgmgm.models.backbone.
                                       split_bam_checkpoint``'s mapping of BAM's PSPNet)
``learner_base.0.*`` (PPM)             ``model.base_learner.ppm.*``
``learner_base.1.*`` (cls)             ``model.base_learner.cls.*``
``down_query.0`` / ``down_supp.0``     ``model.meta.down_query.0`` / ``down_supp.0``, input
                                       channels reordered (below)
``init_merge.0``                       ``model.meta.init_merge.0``
``ASPP_meta.layer6_0.0``               ``model.meta.aspp.pool.0`` (global pooling branch)
``ASPP_meta.layer6_{1,2,3,4}.0``       ``model.meta.aspp.branches.{0,1,2,3}.0`` (1x1, rates
                                       6, 12, 18; concatenated in that order by both)
``res1_meta.0``, ``res2_meta.{0,2}``   ``model.meta.res1.0``, ``model.meta.res2.{0,2}``
``cls_meta.{0,3}``                     ``model.meta.cls.{0,3}``
``gram_merge``, ``cls_merge``          ``model.ensemble.gram_merge``, ``.cls_merge``
``kshot_rw.{0,2}`` (shot > 1)          ``model.reweight.rw.{0,2}``
=====================================  ==================================================

BAM concatenates ``[layer3, layer2]`` before ``down_query`` / ``down_supp``; our backbone's mid
features are ``[layer2, layer3]``, so those two 1x1 weights get their input channels swapped
(an exact reordering). The shot count comes from ``kshot_rw`` (its input channels; absent:
1 shot), ``model.proj_dim`` from ``down_query`` (BAM's reduce_dim, 256), the base learner's
classes from ``learner_base.1.4`` (16 PASCAL-5i, 61 COCO-20i). Every key of the file must be
used and every tensor of the model given, with equal shapes; otherwise the error names the key.

What is not BAM's after loading (the weights are; the forward pass is this project's, see
README "How we read what the paper leaves open"): IMGR's cosine prior excludes masked-out
support pixels and is not recomputed from ``layer3 * mask``; support masks reach the feature
size by area average; our VGG-16 keeps layer3 / layer4 at stride 8 (pool4 dropped, conv5
dilated), where BAM's are at stride 16; the base learner's dropout is off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["BAM_META_KEYS", "bam_model_info", "load_bam_model", "map_bam_state"]

# BAM's final-model keys besides the backbone (layer0..4): (pattern, our LitCGMGM name)
BAM_META_KEYS: tuple[tuple[str, str], ...] = (
    (r"down_query\.0\.weight", "model.meta.down_query.0.weight"),
    (r"down_supp\.0\.weight", "model.meta.down_supp.0.weight"),
    (r"init_merge\.0\.weight", "model.meta.init_merge.0.weight"),
    (r"ASPP_meta\.layer6_0\.0\.(weight|bias)", r"model.meta.aspp.pool.0.\1"),
    (r"ASPP_meta\.layer6_1\.0\.(weight|bias)", r"model.meta.aspp.branches.0.0.\1"),
    (r"ASPP_meta\.layer6_2\.0\.(weight|bias)", r"model.meta.aspp.branches.1.0.\1"),
    (r"ASPP_meta\.layer6_3\.0\.(weight|bias)", r"model.meta.aspp.branches.2.0.\1"),
    (r"ASPP_meta\.layer6_4\.0\.(weight|bias)", r"model.meta.aspp.branches.3.0.\1"),
    (r"res1_meta\.0\.weight", "model.meta.res1.0.weight"),
    (r"res2_meta\.([02])\.weight", r"model.meta.res2.\1.weight"),
    (r"cls_meta\.0\.weight", "model.meta.cls.0.weight"),
    (r"cls_meta\.3\.(weight|bias)", r"model.meta.cls.3.\1"),
    (r"gram_merge\.weight", "model.ensemble.gram_merge.weight"),
    (r"cls_merge\.weight", "model.ensemble.cls_merge.weight"),
    (r"kshot_rw\.([02])\.(weight|bias)", r"model.reweight.rw.\1.\2"),
    (r"learner_base\.0\.(.+)", r"model.base_learner.ppm.\1"),
    (r"learner_base\.1\.(.+)", r"model.base_learner.cls.\1"),
)
_BACKBONE_KEY = re.compile(r"layer[0-4]\..+")
_SWAPPED = ("down_query.0.weight", "down_supp.0.weight")  # [layer3, layer2] -> [layer2, layer3]
# the keys that make a state dict BAM's final model (and not its stage-1 PSPNet)
_MARKERS = ("down_query.0.weight", "init_merge.0.weight", "cls_meta.3.weight")
# BAM's base learner's class count -> the dataset it was trained on (model/PSPNet.py)
_DATASET_OF_CLASSES = {16: "pascal", 61: "coco"}


def read_bam_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's state dict (``state_dict`` unwrapped, ``module.`` stripped); an error names
    the file when it is missing or unreadable."""
    from cgmgm.models.backbone import read_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--bam-weights {path}: no such file; pass BAM's trained final model (the "
            "train_epoch_<n>_<miou>.pth that BAM's train.py saves)"
        )
    try:
        state = read_state_dict(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise ValueError(
            f"--bam-weights {path} is not BAM's trained final model: torch cannot read it as a "
            f"state dict ({type(err).__name__}: {err})"
        ) from None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--bam-weights {path} holds more than tensors: not a BAM state dict")
    return state


def _refuse_other_layouts(state: Mapping[str, Any], path: Any) -> None:
    """An error naming the file and what it is instead, unless it is BAM's final model."""
    if all(k in state for k in _MARKERS) and any(_BACKBONE_KEY.fullmatch(k) for k in state):
        return
    if any(k.startswith(("ppm.", "encoder.")) for k in state):
        what = (
            "BAM's stage-1 PSPNet (backbone + base learner, no meta learner): use it as "
            "base_ckpt= of python -m cgmgm.train, or pass BAM's final model here"
        )
    elif any(k.startswith("model.") for k in state):
        what = "a cgmgm checkpoint: pass it with --ckpt instead"
    else:
        lack = [k for k in _MARKERS if k not in state] or ["layer0..4"]
        what = f"a state dict without BAM's meta learner (no {', '.join(lack)})"
    raise ValueError(
        f"--bam-weights {path} is not BAM's trained final model (model/BAM.py OneModel, with "
        f"layer0..4, learner_base, down_query, init_merge, ASPP_meta, ...): it is {what}"
    )


def bam_model_info(state: Mapping[str, torch.Tensor], path: Any = "?") -> dict[str, Any]:
    """What BAM's final-model state dict was built for: ``backbone`` (``resnet50_psp`` or
    ``vgg16``), ``shot``, ``proj_dim`` (reduce_dim), ``guidance_channels``,
    ``base_learner_classes`` and ``dataset`` (from the class count: pascal / coco / None).
    A state dict that is not BAM's final model is an error naming ``path``."""
    from cgmgm.models.backbone import bam_checkpoint_info

    _refuse_other_layouts(state, path)
    layers = {k: v for k, v in state.items() if _BACKBONE_KEY.fullmatch(k)}
    backbone = bam_checkpoint_info(layers)["backbone"]
    if backbone is None:
        raise ValueError(f"--bam-weights {path}: its layer0..4 are neither BAM's ResNet nor VGG")
    proj = int(state["down_query.0.weight"].shape[0])  # [D, C3 + C2, 1, 1]
    if "kshot_rw.weight" in state:
        raise ValueError(
            f"--bam-weights {path} was trained with kshot_trans_dim=0 (one K x K convolution "
            "kshot_rw.weight); the K-shot reweighting here is BAM's default K -> 2 -> K "
            "(kshot_trans_dim: 2), so its weights have nowhere to go"
        )
    rw = state.get("kshot_rw.0.weight")  # [hidden, K, 1, 1]
    cls = state.get("learner_base.1.4.weight")  # [N + 1, 512, 1, 1]
    if cls is None:
        raise ValueError(f"--bam-weights {path} has no learner_base.1.4.weight (base learner)")
    classes = int(cls.shape[0])
    return {
        "backbone": backbone,
        "shot": 1 if rw is None else int(rw.shape[1]),
        "proj_dim": proj,
        "guidance_channels": int(state["init_merge.0.weight"].shape[1]) - 2 * proj,
        "base_learner_classes": classes,
        "dataset": _DATASET_OF_CLASSES.get(classes),
    }


def map_bam_state(
    state: Mapping[str, torch.Tensor], low_channels: int, mid_channels: int, path: Any = "?"
) -> dict[str, torch.Tensor]:
    """BAM's final-model state dict -> LitCGMGM state-dict names (module docstring's table).

    ``low_channels`` / ``mid_channels``: the backbone's layer2 channels and layer2 + layer3
    (the input of down_query / down_supp, reordered from BAM's [layer3, layer2]). A key no
    rule explains is an error naming it."""
    from cgmgm.models.backbone import split_bam_checkpoint

    layers = {k: v for k, v in state.items() if _BACKBONE_KEY.fullmatch(k)}
    body, _head, _layout = split_bam_checkpoint(layers, path)
    out = {f"model.backbone.body.{k}": v for k, v in body.items()}
    unknown = []
    layer3 = mid_channels - low_channels  # layer3's channels, first in BAM's concatenation
    for key, value in state.items():
        if key in layers:
            continue
        for pattern, target in BAM_META_KEYS:
            if re.fullmatch(pattern, key):
                if key in _SWAPPED and value.shape[1] == mid_channels:
                    value = torch.cat([value[:, layer3:], value[:, :layer3]], 1)  # [D, C2+C3, 1, 1]
                out[re.sub(f"^{pattern}$", target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"--bam-weights {path}: {len(unknown)} key(s) that BAM's final model (model/BAM.py) "
            f"does not have, e.g. {unknown[:5]}: not a BAM state dict, or another version of it"
        )
    return out


def _check_and_load(module: torch.nn.Module, mapped: dict[str, torch.Tensor], path: Any) -> None:
    """Load ``mapped`` into ``module``: every tensor given, every shape equal; else an error
    naming the keys."""
    own = module.state_dict()
    mapped = dict(mapped)
    for key, value in own.items():  # old files may predate BatchNorm's counter
        if key.endswith("num_batches_tracked"):
            mapped.setdefault(key, value)
    missing = [k for k in own if k not in mapped]
    extra = [k for k in mapped if k not in own]
    wrong = [
        f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in mapped and mapped[k].shape != own[k].shape
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"--bam-weights {path} does not fit the BAM model built from it: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
            f"(e.g. {extra[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]})"
        )
    module.load_state_dict(mapped)


def load_bam_model(
    path: str | Path, shot: int | None = None, overrides: Sequence[str] = ()
) -> tuple[Any, dict[str, Any]]:
    """``(LitCGMGM, info)``: BAM's trained final model at ``path`` as ``ablation=bam`` with
    BAM's ensemble, every weight taken from the file (see the module docstring).

    ``shot``: the supports the caller has; it must be the file's (BAM's K-shot reweighting is
    built for its K). ``overrides``: Hydra overrides of the ``train`` config (e.g.
    ``protocol=hsnet``); the model and backbone come from the file and may not be overridden.
    ``info``: :func:`bam_model_info` plus ``protocol``.
    """
    from cgmgm.config import compose, to_plain
    from cgmgm.lit import LitCGMGM

    path = Path(path).expanduser()
    state = read_bam_state(path)
    info = bam_model_info(state, path)
    if info["guidance_channels"] != 1:
        raise ValueError(
            f"--bam-weights {path}: init_merge takes {info['guidance_channels']} guidance maps; "
            "BAM's takes one (the cosine prior)"
        )
    if shot is not None and int(shot) != info["shot"]:
        raise ValueError(
            f"--bam-weights {path} was trained for {info['shot']}-shot episodes (BAM's K-shot "
            f"reweighting is built for its K): give {info['shot']} --support pair(s), not {shot}"
        )
    groups = {o.lstrip("+~").split("=")[0].split(".")[0] for o in overrides}
    if groups & {"model", "backbone", "ablation"}:
        raise ValueError(
            f"--bam-weights {path}: the model and backbone come from the file; drop the "
            f"overrides of {sorted(groups & {'model', 'backbone', 'ablation'})}"
        )
    fixed = [
        "ablation=bam",
        f"backbone={info['backbone']}",
        "backbone.weights=none",
        f"model.proj_dim={info['proj_dim']}",
    ]
    cfg = compose("train", [*fixed, *overrides])
    module = LitCGMGM(
        model=to_plain(cfg.model),
        backbone=to_plain(cfg.backbone),
        class_ids=[1],
        protocol=str(cfg.protocol),
        base_learner_classes=info["base_learner_classes"],
        shot=info["shot"],
        meta={"bam_weights": str(path)},
    )
    bb = module.model.backbone
    _check_and_load(module, map_bam_state(state, bb.low_channels, bb.mid_channels, path), path)
    return module.eval(), {**info, "protocol": str(cfg.protocol)}
