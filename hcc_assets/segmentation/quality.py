"""What a reader checks on a liver mask: size, plausibility, fragments, coverage, agreement; and Figure 1."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from hcc_assets.core.figures import array_png

from .config import LABEL_LIVER, LABEL_SPLEEN, MaskQualityConfig

_AFFINE_TOLERANCE_MM = 1e-3
# the native volume's axes as the NIfTI writer lays them out: (columns, rows, slices)
_AXIS_NAMES = ("column", "row", "slice")


def liver_at_edge(liver: np.ndarray) -> tuple[float, str]:
    """How much of the liver the scan's field of view cuts off, and where: over the six faces of
    the volume, the most liver voxels on one face as a share of the liver's largest cross-section
    parallel to it, with that face ("slice 1 of 26"); (0.0, "") for an empty mask or a liver clear
    of every face. A dome that just reaches the top slice gives a few percent; a field of view that
    ends mid-liver gives tens of percent, and then radiomic shape features (volume, surface,
    diameters) describe only the part that was scanned."""
    worst, where = 0.0, ""
    for axis, name in enumerate(_AXIS_NAMES):
        areas = liver.sum(axis=tuple(other for other in range(3) if other != axis))
        peak = int(areas.max()) if areas.size else 0
        if peak == 0:
            continue
        for index in (0, len(areas) - 1):
            share = float(areas[index]) / peak
            if share > worst:
                worst, where = share, f"{name} {index + 1} of {len(areas)}"
    return round(worst, 4), where


def mask_quality(
    mask: nib.Nifti1Image,
    reference: nib.Nifti1Image | None = None,
    config: MaskQualityConfig | None = None,
    prediction: nib.Nifti1Image | None = None,
) -> dict:
    """Liver/spleen voxel counts and volumes, plausibility, liver components, Dice vs reference.

    Components use face connectivity (6 neighbours): with 5-9 mm slices, voxels touching only at
    an edge or corner are not convincingly one organ. They are counted on `prediction`, the
    network's output before `keep_largest_components` made `mask` of it, where given: how much of
    what the network called liver lay apart is what says the model was unsure. Dice is None without
    a reference, and 1.0 when both masks lack the label.
    """
    config = config or MaskQualityConfig()
    labels = np.asarray(mask.dataobj)
    voxel_ml = abs(float(np.linalg.det(mask.affine[:3, :3]))) / 1000.0  # mm^3 -> mL, oblique-safe
    liver = labels == LABEL_LIVER
    liver_voxels = int(np.count_nonzero(liver))
    spleen_voxels = int(np.count_nonzero(labels == LABEL_SPLEEN))
    liver_ml = liver_voxels * voxel_ml

    at_edge_fraction, at_edge = liver_at_edge(liver)
    predicted_liver = liver if prediction is None else np.asarray(prediction.dataobj) == LABEL_LIVER
    components, count = ndimage.label(predicted_liver)
    sizes = np.bincount(components.ravel())[1:] if count else np.zeros(0, int)
    result = {
        "liver_voxels": liver_voxels,
        "liver_volume_ml": round(liver_ml, 3),
        "liver_volume_plausible": config.liver_volume_ml_min <= liver_ml <= config.liver_volume_ml_max,
        "liver_volume_range_ml": [config.liver_volume_ml_min, config.liver_volume_ml_max],
        "liver_components": int(count),
        "liver_at_edge_fraction": at_edge_fraction,
        "liver_at_edge": at_edge,
        "liver_largest_component_fraction": round(float(sizes.max() / sizes.sum()), 6) if count else 0.0,
        "spleen_voxels": spleen_voxels,
        "spleen_volume_ml": round(spleen_voxels * voxel_ml, 3),
        "dice_liver": None,
        "dice_spleen": None,
    }
    if reference is not None:
        if reference.shape[:3] != mask.shape[:3] or not np.allclose(
            reference.affine, mask.affine, atol=_AFFINE_TOLERANCE_MM
        ):
            raise ValueError(f"reference grid {reference.shape} differs from the mask's {mask.shape}")
        truth = np.asarray(reference.dataobj)
        result["dice_liver"] = round(dice(liver, truth == LABEL_LIVER), 6)
        result["dice_spleen"] = round(dice(labels == LABEL_SPLEEN, truth == LABEL_SPLEEN), 6)
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


# Overlay colours (RGB) and opacity; liver and spleen as in the study's Figure 1 style.
_COLOURS = {LABEL_LIVER: (230, 60, 40), LABEL_SPLEEN: (40, 120, 240)}
_ALPHA = 0.45


def overlay_png(image: nib.Nifti1Image, mask: nib.Nifti1Image, min_size: int = 256) -> bytes:
    """Figure 1: the axial slice through the liver's centre with liver and spleen coloured.

    Shown in radiological convention (patient's right on the left, anterior up), from the closest
    RAS voxel order, so any stored orientation looks the same. Intensities are windowed to the
    slice's 1st-99th percentile; small slices are enlarged by whole pixels. Pure numpy + zlib:
    the same inputs always give the same bytes.
    """
    if image.shape[:3] != mask.shape[:3]:
        raise ValueError(f"image {image.shape} and mask {mask.shape} are not on one grid")
    canonical = nib.as_closest_canonical(image)
    labels = np.asarray(nib.as_closest_canonical(mask).dataobj)
    liver_slices = np.flatnonzero((labels == LABEL_LIVER).any(axis=(0, 1)))
    k = round(liver_slices.mean()) if liver_slices.size else labels.shape[2] // 2

    def radiological(plane: np.ndarray) -> np.ndarray:  # (x=R, y=A) -> rows A..P, columns R..L
        return plane.T[::-1, ::-1]

    grey = radiological(np.asarray(canonical.dataobj[:, :, k], dtype=np.float32))
    low, high = np.percentile(grey, [1, 99]) if grey.size else (0.0, 1.0)
    grey = np.clip((grey - low) / max(high - low, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    plane = radiological(labels[:, :, k])
    for label, colour in _COLOURS.items():
        rgb[plane == label] = (1 - _ALPHA) * rgb[plane == label] + _ALPHA * np.array(colour)
    scale = max(1, -(-min_size // max(rgb.shape[:2])))
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    return array_png(np.round(rgb).astype(np.uint8))
