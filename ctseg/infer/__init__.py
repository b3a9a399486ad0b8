"""Inference: one model loader, the slice-wise predictor, post-processing, bundle export.

`Segmenter` is the Python API (load a model once, segment many volumes in memory).
"""

from ctseg.infer.segmenter import Segmenter, Segmentation

__all__ = ["Segmentation", "Segmenter"]
