"""Data: class-index sources, episodic sampling, the Lightning data module.

Importing the package registers the sources "synthetic" (:class:`SyntheticScenes`),
"synthetic_shapes" (:class:`SyntheticShapes`), "pascal", "coco", "fss1000" and "folder"
(:func:`build_source`).
"""

from cgmgm.data.coco import COCO2014
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
    source_novel_classes,
)
from cgmgm.data.files import DatasetError, FileSource
from cgmgm.data.folder import FolderSource
from cgmgm.data.fss1000 import FSS1000
from cgmgm.data.pascal import PascalVOC
from cgmgm.data.protocols import PROTOCOLS, Protocol, get_protocol
from cgmgm.data.synthetic import (
    CLASS_NAMES,
    CLASS_SPECS,
    ClassSpec,
    SyntheticScenes,
    SyntheticShapes,
)

__all__ = [
    "CLASS_NAMES",
    "CLASS_SPECS",
    "COCO2014",
    "FSS1000",
    "IGNORE_INDEX",
    "PROTOCOLS",
    "SOURCES",
    "ClassIndexSource",
    "ClassSpec",
    "DatasetError",
    "EpisodeDataset",
    "EpisodeSampler",
    "EpisodicDataModule",
    "FileSource",
    "FolderSource",
    "PascalVOC",
    "Protocol",
    "SegmentationSource",
    "ShardedEvalSampler",
    "SyntheticScenes",
    "SyntheticShapes",
    "Transform",
    "base_classes",
    "build_source",
    "get_protocol",
    "novel_classes",
    "register_source",
    "scaled_min_pixels",
    "source_novel_classes",
]
