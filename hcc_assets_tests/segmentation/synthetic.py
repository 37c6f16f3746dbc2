"""Tiny synthetic T2 volumes with a liver and a spleen, painted in RAS world millimetres.

Anatomy is defined in the world, so a case stored LPS-flipped or slightly oblique shows the
same organs: what the segmenter's orientation handling has to cope with.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def synthetic_case(
    seed: int, shape=(48, 48, 16), spacing=(6.0, 6.0, 8.0), lps_storage: bool = False, oblique_deg: float = 0.0
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(float32 T2-like image, uint8 mask with liver 1 and spleen 2) on one grid."""
    rng = np.random.default_rng(seed)
    directions = _rotation_z(oblique_deg) @ (np.diag([-1.0, -1.0, 1.0]) if lps_storage else np.eye(3))
    linear = directions * np.asarray(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape) - 1) / 2)

    ijk = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), -1)
    world = ijk @ linear.T.astype(np.float32) + affine[:3, 3].astype(np.float32)

    def ellipsoid(center, semi_axes) -> np.ndarray:
        return (((world - np.asarray(center, np.float32)) / np.asarray(semi_axes, np.float32)) ** 2).sum(-1) < 1

    jitter = lambda scale: rng.uniform(-scale, scale, 3)  # noqa: E731
    body = ((world[..., 0] / 130) ** 2 + (world[..., 1] / 100) ** 2) < 1
    # RAS: the patient's right (liver) is +x, left (spleen) -x, anterior +y.
    liver = ellipsoid(np.array([50, 5, 0]) + jitter(8), np.array([70, 58, 55]) * rng.uniform(0.85, 1.1, 3))
    spleen = ellipsoid(np.array([-75, -35, 10]) + jitter(6), np.array([26, 40, 38]) * rng.uniform(0.85, 1.1, 3))
    spleen &= ~liver

    labels = np.zeros(shape, np.uint8)
    labels[liver & body] = 1
    labels[spleen & body] = 2
    tissue = np.where(body, 100.0, 5.0) + 40.0 * (labels == 2) - 45.0 * (labels == 1)
    gain = rng.uniform(0.7, 1.4)  # MR intensities are arbitrary units
    image = (gain * (tissue + rng.normal(0, 10, shape))).astype(np.float32)
    return _nifti(image, affine), _nifti(labels, affine)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def write_cases(folder: Path, count: int, first_seed: int = 0, **kwargs) -> list[tuple[str, Path, Path]]:
    """Write `count` cases (every third LPS-stored, every fourth 8 degrees oblique) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(count):
        seed = first_seed + index
        image, mask = synthetic_case(seed, lps_storage=seed % 3 == 1, oblique_deg=8.0 * (seed % 4 == 2), **kwargs)
        case_id = f"case{seed:03d}"
        image_path, mask_path = folder / f"{case_id}_image.nii.gz", folder / f"{case_id}_mask.nii.gz"
        nib.save(image, image_path)
        nib.save(mask, mask_path)
        cases.append((case_id, image_path, mask_path))
    return cases
