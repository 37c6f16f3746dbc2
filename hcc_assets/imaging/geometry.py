"""The one voxel-to-world convention shared by the DICOM writer, the reader and the masks.

A DICOM slice stack becomes an array `volume[i, j, k]` where
  i = column index (along the first ImageOrientationPatient vector, step PixelSpacing[1]),
  j = row index    (along the second ImageOrientationPatient vector, step PixelSpacing[0]),
  k = slice index, slices sorted by ascending position along normal = row_cos x col_cos.
So `volume[:, :, k] == pixel_array_of_slice_k.T`.

DICOM positions are LPS millimetres; NIfTI affines here are RAS (flip x and y).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def slice_normal(orientation: np.ndarray | Sequence[float]) -> np.ndarray:
    """Unit normal of a slice with ImageOrientationPatient `orientation` (6 numbers)."""
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def affine_lps(
    orientation: np.ndarray | Sequence[float],
    first_position: np.ndarray | Sequence[float],
    pixel_spacing: np.ndarray | Sequence[float],
    slice_spacing: float,
) -> np.ndarray:
    """4x4 voxel (i, j, k) -> LPS mm affine for the convention above.

    `pixel_spacing` is DICOM PixelSpacing: [row spacing (between rows), column spacing].
    `first_position` is ImagePositionPatient of the slice with the lowest normal position.
    """
    iop = np.asarray(orientation, dtype=float)
    row_cos, col_cos = iop[:3], iop[3:]
    row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * col_spacing
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = slice_normal(iop) * float(slice_spacing)
    affine[:3, 3] = np.asarray(first_position, dtype=float)
    return affine


def affine_ras(
    orientation: np.ndarray | Sequence[float],
    first_position: np.ndarray | Sequence[float],
    pixel_spacing: np.ndarray | Sequence[float],
    slice_spacing: float,
) -> np.ndarray:
    """Same as `affine_lps`, expressed in RAS as NIfTI expects."""
    return LPS_TO_RAS @ affine_lps(orientation, first_position, pixel_spacing, slice_spacing)
