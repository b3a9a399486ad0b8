"""Data: cases on disk, the built-in phantom dataset, the preprocessing cache, splits and slice datasets."""

from ctseg.data.cases import Case, discover_cases

__all__ = ["Case", "discover_cases"]
