"""Facts about a volume that a radiologist checks: shape, spacing, orientation, intensities."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def volume_summary(image: nib.Nifti1Image) -> dict:
    data = np.asarray(image.dataobj, dtype=np.float32)
    zooms = image.header.get_zooms()[:3]
    directions = image.affine[:3, :3] / np.asarray(zooms)
    # angle between each voxel axis and its closest world axis: 0 for axial, > 0 for oblique
    obliquity = float(np.degrees(np.arccos(np.clip(np.abs(directions).max(axis=0), -1, 1))).max())
    return {
        "shape": [int(s) for s in image.shape[:3]],
        "spacing_mm": [round(float(z), 4) for z in zooms],
        "orientation": "".join(nib.aff2axcodes(image.affine)),
        "obliquity_deg": round(obliquity, 2),
        "intensity_mean": float(data.mean()),
        "intensity_std": float(data.std()),
        "finite": bool(np.isfinite(data).all()),
    }
