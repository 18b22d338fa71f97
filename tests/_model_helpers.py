"""The model's defaults for tests, from their one home (conf/model/cgmgm.yaml)."""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch import nn

from cgmgm.config import compose_model
from cgmgm.lit import model_kwargs
from cgmgm.models.cgmgm import CGMGM

# The embedded benchmark made tiny, for whole runs of the apps (each test adds its own counts).
TINY_DATA = [
    "dataset.dataset_kwargs.image_size=32",
    "dataset.dataset_kwargs.num_images={train:200,val:80}",
    "dataset.batch_size=4",
    "dataset.eval_batch_size=8",
    "dataset.train_episodes=8",
    "dataset.val_episodes=8",
]


@functools.cache
def _default_model() -> dict[str, Any]:
    return compose_model()


def model_config(**dotted: Any) -> dict[str, Any]:
    """The default model config with ``dotted`` keys replaced, e.g. ``gmm__components=2`` for
    ``gmm.components`` (a double underscore stands for the dot)."""
    cfg = copy.deepcopy(_default_model())
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"model config has no key {key.replace('__', '.')!r}")
        node[leaf] = value
    return cfg


def make_model(backbone: nn.Module, **kwargs: Any) -> CGMGM:
    """CGMGM with the default model config, ``kwargs`` (CGMGM keywords) replacing defaults."""
    return CGMGM(backbone, **{**model_kwargs(_default_model()), **kwargs})
