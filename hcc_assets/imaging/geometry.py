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


def onto_grid(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray) -> np.ndarray:
    """`data` (first three axes on the voxels of `affine`; any axes after them carried along) placed
    on the grid of `shape` and `target_affine` (both affines RAS or both LPS) without resampling:
    its voxels must be the target's voxels, in any axis order and direction (a mask saved by a tool
    that flips rows, as dcm2niix does, or a SEG that runs its frames the other way). Target voxels
    it does not cover are 0. ValueError when its voxels are not the target's, or reach outside.

    Written by hand: nibabel's orientation tools (io_orientation, apply_orientation) reorder a whole
    array's axes, not onto another image's grid with an offset, and nibabel.processing's
    resample_from_to interpolates, so it would also take a mask half a voxel off; a reference mask
    must be the T2's voxels or be refused."""
    to_target = np.linalg.inv(target_affine) @ affine  # source (a, b, c) -> target (i, j, k)
    axes, offset = to_target[:3, :3], to_target[:3, 3]
    whole_axes = np.round(axes)
    if not (
        np.allclose(axes, whole_axes, atol=1e-3)
        and (np.abs(whole_axes).sum(axis=0) == 1).all()
        and (np.abs(whole_axes).sum(axis=1) == 1).all()
        and np.allclose(offset, np.round(offset), atol=1e-2)
    ):
        raise ValueError("its voxels are not the T2 volume's voxels")
    where = np.indices(data.shape[:3], dtype=np.int64).reshape(3, -1)
    index = whole_axes.astype(np.int64) @ where + np.round(offset).astype(np.int64)[:, None]
    if (index < 0).any() or (index >= np.asarray(shape[:3])[:, None]).any():
        raise ValueError("it reaches outside the T2 volume")
    placed = np.zeros((*shape[:3], *data.shape[3:]), dtype=data.dtype)
    placed[index[0], index[1], index[2]] = data.reshape(-1, *data.shape[3:])
    return placed
