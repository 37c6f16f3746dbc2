"""Figure previews: the middle axial slice (with an optional mask overlay) as PNG, and small
thumbnails of any PNG figure for inline display.

Displayed radiologically: the patient's right on the viewer's left, anterior at the top.
Uses the Agg canvas directly (no pyplot), so it is safe in worker processes and threads.

The full figures are files in the data lake; what asset metadata (Dagster's event log, one copy
per event) carries inline is at most a `thumbnail_data_uri` of THUMBNAIL_MAX_BYTES.
"""

from __future__ import annotations

import base64
import io

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from hcc_assets.imaging.preprocess import resample_mask_like

# the largest inline thumbnail (the whole data URI, base64 included) an event-log entry may carry
THUMBNAIL_MAX_BYTES = 16 * 1024
THUMBNAIL_BOX = (480, 240)  # largest width, height in pixels; aspect kept

# label 1 liver, 2 spleen, anything higher shares the last colour
MASK_COLOURS = ListedColormap(["#ff7f0e", "#1f77b4", "#2ca02c"])


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
    canonical = nib.as_closest_canonical(image)
    plane = radiological_axial_slice(canonical)
    zooms = canonical.header.get_zooms()[:3]
    low, high = np.percentile(plane, (1, 99)) if plane.size else (0.0, 1.0)

    figure = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 0.92 if title else 1))
    # rows are A-P steps (zoom j), columns R-L steps (zoom i): keep millimetres square
    aspect = float(zooms[1]) / float(zooms[0])
    axes.imshow(plane, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=aspect, interpolation="nearest")
    if mask is not None:
        on_grid = mask
        if mask.shape[:3] != image.shape[:3] or not np.allclose(mask.affine, image.affine, atol=1e-3):
            on_grid = resample_mask_like(mask, image)
        labels = radiological_axial_slice(on_grid).astype(np.int16)
        overlay = np.ma.masked_equal(np.clip(labels, 0, 3), 0)
        axes.imshow(overlay - 1, cmap=MASK_COLOURS, vmin=0, vmax=2, alpha=0.4, aspect=aspect, interpolation="nearest")
    axes.set_axis_off()
    axes.text(0.01, 0.5, "R", color="yellow", transform=axes.transAxes, va="center", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=9, color="white")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="black")
    return buffer.getvalue()


def thumbnail(png: bytes, max_bytes: int = THUMBNAIL_MAX_BYTES, box: tuple[int, int] = THUMBNAIL_BOX
              ) -> tuple[str, bytes]:
    """A downscaled copy of the image `png` as (MIME type, bytes) whose data URI
    (`thumbnail_data_uri`) is at most `max_bytes` long: within `box`, as a 64-colour PNG or a JPEG,
    whichever is smaller (JPEG, ~5-8 KB, for the slices, overlays and training curves here); shrunk
    further until it fits. Same input, same bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGBA") if "A" in opened.getbands() or opened.mode == "P" else opened.convert("RGB")
    if image.mode == "RGBA":  # figures are opaque; any transparency goes on white
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        image = background
    width, height = box
    while True:
        small = image.copy()
        small.thumbnail((max(width, 1), max(height, 1)), Image.Resampling.LANCZOS)
        candidates = []
        buffer = io.BytesIO()
        small.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, format="PNG", optimize=True)
        candidates.append(("image/png", buffer.getvalue()))
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=75, optimize=True)
        candidates.append(("image/jpeg", buffer.getvalue()))
        mime, data = min(candidates, key=lambda candidate: len(candidate[1]))
        if _data_uri_length(mime, data) <= max_bytes:
            return mime, data
        if width <= 16 or height <= 16:
            raise ValueError(f"no thumbnail of this image fits in {max_bytes} bytes")
        width, height = int(width * 0.8), int(height * 0.8)


def thumbnail_data_uri(png: bytes, max_bytes: int = THUMBNAIL_MAX_BYTES, box: tuple[int, int] = THUMBNAIL_BOX) -> str:
    """`thumbnail(png)` as a `data:` URI of at most `max_bytes` characters."""
    mime, data = thumbnail(png, max_bytes, box)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _data_uri_length(mime: str, data: bytes) -> int:
    return len(f"data:{mime};base64,") + 4 * -(-len(data) // 3)
