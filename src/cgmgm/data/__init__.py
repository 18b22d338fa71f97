"""Data: class-index sources, episodic sampling, the Lightning data module."""

from cgmgm.data.datamodule import (
    SOURCES,
    EpisodeSampler,
    EpisodicDataModule,
    ShardedEvalSampler,
    build_source,
    register_source,
)
from cgmgm.data.episodes import (
    IGNORE_INDEX,
    ClassIndexSource,
    EpisodeDataset,
    SegmentationSource,
    Transform,
    base_classes,
    novel_classes,
    scaled_min_pixels,
)
from cgmgm.data.synthetic import CLASS_NAMES, CLASS_SPECS, ClassSpec, SyntheticShapes

__all__ = [
    "CLASS_NAMES",
    "CLASS_SPECS",
    "IGNORE_INDEX",
    "SOURCES",
    "ClassIndexSource",
    "ClassSpec",
    "EpisodeDataset",
    "EpisodeSampler",
    "EpisodicDataModule",
    "SegmentationSource",
    "ShardedEvalSampler",
    "SyntheticShapes",
    "Transform",
    "base_classes",
    "build_source",
    "novel_classes",
    "register_source",
    "scaled_min_pixels",
]
