"""cgmgm: the Cross Gaussian Mixture Generative Model for few-shot semantic segmentation."""

__version__ = "0.1.0"
