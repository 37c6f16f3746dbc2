"""nibabel (RAS affine, [i, j, k] arrays) to SimpleITK (LPS origin/direction, [k, j, i] arrays)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.orientations import apply_orientation, inv_ornt_aff

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


def standard_axial_order(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform (one row per axis: new axis, flip) that stores a volume in
    the voxel order of a standard axial DICOM series, keeping its slice axis last.

    Why: pyradiomics defines some features by the voxel array's axes. Maximum2DDiameterRow and
    Column are taken in the planes of two index axes, and the mesh features triangulate the mask in
    voxel order. The same anatomy stored transposed (readout and phase swapped), mirrored (a
    feet-first position) or rotated (a prone one) would otherwise give other values: a demo study
    stored transposed swapped the two diameters and moved the radiomic P(HCC) from 0.930 to 0.978.
    nibabel's as_closest_canonical is not used: it would also move the slice axis of a coronal or
    sagittal series, and force2D texture (params.yaml) must stay in the acquired planes.

    The slice axis stays last. The two in-plane axes are ordered by the patient axis each runs
    closest to (x, then y, then z), and every axis points toward +LPS (left, posterior, superior),
    as an axial series of a supine, head-first patient is stored (IOP 1\\0\\0\\0\\1\\0, slices
    ascending): such a series maps onto itself.
    """
    lps = _RAS_TO_LPS @ np.asarray(affine, dtype=float)[:3, :3]
    nearest = [int(np.argmax(np.abs(lps[:, axis]))) for axis in range(3)]
    in_plane = [0, 1] if nearest[0] <= nearest[1] else [1, 0]  # new axis of input axes 0 and 1
    return np.array(
        [[new_axis, 1.0 if lps[nearest[axis], axis] > 0 else -1.0] for axis, new_axis in enumerate([*in_plane, 2])]
    )


def in_standard_axial_order(
    image: nib.spatialimages.SpatialImage, *arrays: np.ndarray
) -> tuple[nib.spatialimages.SpatialImage, tuple[np.ndarray, ...]]:
    """`arrays` (each on `image`'s grid) in `image`'s `standard_axial_order` (views, no copies), and
    an image with the affine that goes with them; `image` and `arrays` themselves when already so."""
    ornt = standard_axial_order(image.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return image, arrays
    reordered = tuple(apply_orientation(array, ornt) for array in arrays)
    return nib.Nifti1Image(reordered[0], image.affine @ inv_ornt_aff(ornt, arrays[0].shape)), reordered
