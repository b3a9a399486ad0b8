"""Evaluation, scoring only: metrics in physical units, `ctseg evaluate` and `ctseg report`
reports and their figures. Jobs that train or time models live in `ctseg.study`.

Only the metrics are imported here, so the training loop does not pull in matplotlib.
"""

from ctseg.evaluate.metrics import prediction_scores, segmentation_metrics, slice_dice

__all__ = ["prediction_scores", "segmentation_metrics", "slice_dice"]
