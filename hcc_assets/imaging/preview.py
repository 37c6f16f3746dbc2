"""Figure previews: the middle axial slice (with an optional mask overlay) as PNG.

Displayed radiologically: the patient's right on the viewer's left, anterior at the top.
Uses the Agg canvas directly (no pyplot), so it is safe in worker processes and threads. The
inline thumbnails of these figures are made by `hcc_assets.core.figures.thumbnail_data_uri`.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from hcc_assets.core.figures import figure_png
from hcc_assets.imaging.preprocess import resample_mask_like

# label 1 liver, 2 spleen, anything higher shares the last colour
MASK_COLOURS = ("#ff7f0e", "#1f77b4", "#2ca02c")


def radiological_axial_slice(image: nib.Nifti1Image, index: int | None = None) -> np.ndarray:
    """Axial slice `index` (default: the middle) of the RAS volume as a display array [row, col].

    In RAS, i grows toward the patient's right and j toward anterior; the display wants the
    patient's right on the left and anterior at the top, so both axes are reversed.
    """
    canonical = nib.as_closest_canonical(image)
    depth = canonical.shape[2]
    k = depth // 2 if index is None else index
    plane = np.asarray(canonical.dataobj[:, :, k], dtype=np.float32)
    return plane.T[::-1, ::-1]


def mid_slice_png(image: nib.Nifti1Image, mask: nib.Nifti1Image | None = None, title: str = "") -> bytes:
    # matplotlib is imported when a figure is drawn (0.6 s), not by every process that loads the
    # Dagster definitions through this module
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    canonical = nib.as_closest_canonical(image)
    plane = radiological_axial_slice(canonical)
    zooms = canonical.header.get_zooms()[:3]
    low, high = np.percentile(plane, (1, 99)) if plane.size else (0.0, 1.0)

    figure = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 0.92 if title else 1))
    # rows are A-P steps (zoom j), columns R-L steps (zoom i): keep millimetres square
    aspect = float(zooms[1]) / float(zooms[0])
    axes.imshow(
        plane, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=aspect, interpolation="nearest"
    )
    if mask is not None:
        on_grid = mask
        if mask.shape[:3] != image.shape[:3] or not np.allclose(mask.affine, image.affine, atol=1e-3):
            on_grid = resample_mask_like(mask, image)
        labels = radiological_axial_slice(on_grid).astype(np.int16)
        overlay = np.ma.masked_equal(np.clip(labels, 0, 3), 0)
        axes.imshow(
            overlay - 1,
            cmap=ListedColormap(MASK_COLOURS),
            vmin=0,
            vmax=2,
            alpha=0.4,
            aspect=aspect,
            interpolation="nearest",
        )
    axes.set_axis_off()
    axes.text(0.01, 0.5, "R", color="yellow", transform=axes.transAxes, va="center", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=9, color="white")
    return figure_png(figure, facecolor="black")
