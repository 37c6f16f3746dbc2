"""A reference liver (and spleen) mask from a DICOM RT Structure Set drawn on the T2 series.

Contouring tools (treatment planning systems, 3D Slicer's SlicerRT, MIM) save structures as
closed planar contours in patient coordinates, not as voxels. An RT Structure Set of the study
that references the chosen T2 series and has an ROI named "liver" becomes the patient's reference
mask when there is neither a NIfTI nor a DICOM SEG one: each contour is mapped onto the T2 volume's
voxel grid (it must lie on one of its slices) and filled there, a pixel belonging to the structure
when its centre lies inside the polygon; contours of one ROI on one slice combine by even-odd (an
inner contour is a hole), as the DICOM standard's planar contours are drawn.

The polygon fill is scikit-image's (`skimage.draw.polygon2mask`); the mapping from patient
coordinates to the volume's voxels is the project's own (geometry.py), since the mask must land on
exactly the voxels `nifti_volume` writes. rt-utils, which does both, builds its own series geometry
and needs OpenCV for the fill. Messages name ROIs by number only (their names are free text).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from pydicom import dcmread

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_series import REFERENCE_ORGANS, AnnotationFile, SeriesInfo, liver_annotation
from hcc_assets.imaging.geometry import LPS_TO_RAS

ON_SLICE_TOLERANCE = 0.1  # of the slice spacing: how far a contour's points may lie off a slice


def reference_mask_from_rtstruct(
    annotations: tuple[AnnotationFile, ...], series: SeriesInfo, image: nib.Nifti1Image
) -> np.ndarray | None:
    """The label volume (uint8, liver 1, spleen 2, on the grid of `image`, the series' volume) of the
    one RT Structure Set that references `series` and has a liver ROI; None when there is none.

    PatientInputError when several structure sets contour the series' liver, a contour does not lie
    on a slice of the series, or the liver and spleen ROIs overlap."""
    found = liver_annotation(
        annotations, "rtstruct", series, dcmread, _organ_rois, ("RT Structure Set", "RT Structure Sets contour")
    )
    if found is None:
        return None
    structure_set, organs = found
    labels = np.zeros(image.shape[:3], dtype=np.uint8)
    for label, roi_number in sorted(organs.items()):
        mask = _filled_roi(structure_set, roi_number, image, series.label)
        if (labels[mask] != 0).any():
            raise PatientInputError(
                f"the RT Structure Set of {series.label} has overlapping ROIs {', '.join(map(str, organs.values()))} "
                "(liver, spleen)"
            )
        labels[mask] = label
    return labels


def _organ_rois(structure_set) -> dict[int, int]:
    """label -> ROINumber of the ROIs named like an organ of REFERENCE_ORGANS (case and spaces aside)."""
    found: dict[int, int] = {}
    for roi in structure_set.get("StructureSetROISequence", []):
        name = " ".join(str(roi.get("ROIName", "")).split()).lower()
        for label, organ in REFERENCE_ORGANS.items():
            if name == organ and label not in found:
                found[label] = int(roi.ROINumber)
    return found


def _filled_roi(structure_set, roi_number: int, image: nib.Nifti1Image, label: str) -> np.ndarray:
    """The voxels of the volume inside the ROI's closed planar contours (even-odd per slice)."""
    from skimage.draw import polygon2mask

    shape = image.shape[:3]
    to_voxels = np.linalg.inv(image.affine) @ LPS_TO_RAS  # patient (LPS) mm -> the volume's (i, j, k)
    mask = np.zeros(shape, dtype=bool)
    contours = next(
        (item for item in structure_set.get("ROIContourSequence", []) if int(item.ReferencedROINumber) == roi_number),
        None,
    )
    for contour in contours.get("ContourSequence", []) if contours is not None else []:
        if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
            continue  # points and open lines enclose nothing
        points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
        voxels = (to_voxels @ np.c_[points, np.ones(len(points))].T)[:3].T
        k = round(float(voxels[:, 2].mean()))
        if np.abs(voxels[:, 2] - k).max() > ON_SLICE_TOLERANCE or not 0 <= k < shape[2]:
            raise PatientInputError(
                f"the RT Structure Set of {label} has a contour of ROI {roi_number} that lies on no slice of the series"
            )
        mask[:, :, k] ^= polygon2mask(shape[:2], voxels[:, :2])
    return mask
