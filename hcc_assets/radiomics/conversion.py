"""nibabel (RAS affine, [i, j, k] arrays) to SimpleITK (LPS origin/direction, [k, j, i] arrays)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def voxels(image: nib.spatialimages.SpatialImage, dtype: type) -> np.ndarray:
    """The 3-D voxel array in `dtype`, without a copy when the file already stores that type."""
    data: np.ndarray = np.asarray(image.dataobj, dtype=dtype)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}")
    return data


def to_sitk(
    image: nib.spatialimages.SpatialImage, data: np.ndarray | None = None, dtype: type = np.float32
) -> sitk.Image:
    """A SimpleITK image with `image`'s geometry and `data` (default: its voxels as `dtype`).

    One copy: nibabel reads NIfTI files in Fortran order, so `data.T` is already the C-ordered
    [k, j, i] array ITK wants and GetImageFromArray copies it once into ITK's buffer (an
    in-memory C-ordered array costs one more copy to reorder).
    """
    data = voxels(image, dtype) if data is None else data
    itk = sitk.GetImageFromArray(data.T)
    linear = _RAS_TO_LPS @ image.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    itk.SetSpacing(spacing.tolist())
    itk.SetDirection((linear / spacing).ravel().tolist())  # row-major; column j = index axis j
    itk.SetOrigin((_RAS_TO_LPS @ image.affine[:3, 3]).tolist())
    return itk
