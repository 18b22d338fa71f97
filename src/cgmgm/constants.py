"""Constants of the few-shot segmentation benchmarks, each defined here only.

- ``IGNORE_INDEX`` = 255: the label value of pixels that count nowhere, neither in the loss nor
  in any IoU (PASCAL VOC object borders, COCO crowd regions, the padding of test resizes and
  augmentation). PASCAL VOC / SBD labels, BAM, PFENet and HSNet all use 255.
- ``MIN_PIXELS`` = 2 * 32 * 32 = 2048: PASCAL-5i and COCO-20i count a class in an image when it
  holds at least this many pixels (PFENet / BAM util/dataset.py ``make_dataset``:
  ``if tmp_label.sum() >= 2 * 32 * 32``), measured on the original label.
- ``PASCAL_AREA`` = 500 * 375: a typical PASCAL VOC image, the area ``MIN_PIXELS`` is scaled
  from for images of other sizes (:func:`cgmgm.data.episodes.scaled_min_pixels`).
"""

from __future__ import annotations

__all__ = ["IGNORE_INDEX", "MIN_PIXELS", "PASCAL_AREA"]

IGNORE_INDEX = 255
MIN_PIXELS = 2 * 32 * 32
PASCAL_AREA = 500 * 375
