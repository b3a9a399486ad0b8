"""Cases on disk and the built-in phantom dataset."""

from ctseg.data.cases import Case, discover_cases

__all__ = ["Case", "discover_cases"]
