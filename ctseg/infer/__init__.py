"""Inference: the one model loader (`model_loader`), one volume's slice-wise inference (`volume`),
post-processing (`postprocess`), the per-case `ctseg predict` driver (`cases`) and the MONAI
bundle export (`export`, `bundle_transforms`).

`Segmenter` is the Python API (load a model once, segment many volumes in memory).
"""

from ctseg.infer.segmenter import Segmenter, Segmentation

__all__ = ["Segmentation", "Segmenter"]
