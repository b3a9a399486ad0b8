"""ctseg: CT DICOM to 2D segmentation networks, MONAI bundles and NIfTI masks."""

__version__ = "0.1.0"
