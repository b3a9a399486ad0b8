"""Evaluation: metrics in physical units, `ctseg evaluate` reports, run comparison, experiments.

Only the metrics are imported here, so the training loop does not pull in matplotlib.
"""

from ctseg.evaluate.metrics import segmentation_metrics, slice_dice

__all__ = ["segmentation_metrics", "slice_dice"]
