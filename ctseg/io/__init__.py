"""Reading CT series and label maps, writing NIfTI: the geometry every other stage relies on."""

from ctseg.io.dicom import load_series, scan_series
from ctseg.io.formats import load_image
from ctseg.io.masks import load_mask
from ctseg.io.nifti import load_nifti, save_nifti
from ctseg.io.volume import CTVolume

__all__ = ["CTVolume", "load_image", "load_mask", "load_nifti", "load_series", "save_nifti",
           "scan_series"]
