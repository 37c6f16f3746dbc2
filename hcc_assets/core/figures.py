"""Figures as PNG bytes, and the small inline thumbnails asset metadata carries.

- `figure_png`: a matplotlib Figure as PNG, without pyplot (no global figure state: safe in
  worker processes and threads) and without matplotlib's version stamp, so the same figure gives
  the same bytes on every run.
- `array_png`: a uint8 grey or RGB pixel array as PNG, pure zlib: the same pixels always give
  the same bytes, whatever library versions are installed.
- `thumbnail` / `thumbnail_data_uri`: a downscaled copy of a PNG whose data URI is at most
  THUMBNAIL_MAX_BYTES (16 KB). The full figures are files in the data lake; what asset metadata
  (Dagster's event log, one copy per event) carries inline is at most such a thumbnail.
- `plot_history`: the study's Figure 2, training curves (accuracy and loss over epochs).

numpy, matplotlib and Pillow (which matplotlib requires) are imported inside the functions that
use them: importing this module costs nothing.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

# the largest inline thumbnail (the whole data URI, base64 included) an event-log entry may carry
THUMBNAIL_MAX_BYTES = 16 * 1024
THUMBNAIL_BOX = (480, 240)  # largest width, height in pixels; aspect kept


def figure_png(figure: Figure, facecolor: str | None = None) -> bytes:
    """The matplotlib `figure` as PNG bytes (Agg; no version stamp: same figure, same bytes).
    `facecolor` overrides the background (e.g. "black" for image slices)."""
    buffer = io.BytesIO()
    if facecolor is None:  # the rcParams' savefig.facecolor
        figure.savefig(buffer, format="png", metadata={"Software": None})
    else:
        figure.savefig(buffer, format="png", metadata={"Software": None}, facecolor=facecolor)
    return buffer.getvalue()


def array_png(pixels: np.ndarray) -> bytes:
    """Encode a uint8 array, (h, w) grey or (h, w, 3) RGB, as an 8-bit PNG (no filter, zlib level
    6, no timestamp or other metadata: the same pixels always give the same bytes)."""
    import numpy as np

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        colour_type = 0  # greyscale
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type = 2  # truecolour
    else:
        raise ValueError(f"expected an (h, w) or (h, w, 3) array, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def thumbnail(
    png: bytes, max_bytes: int = THUMBNAIL_MAX_BYTES, box: tuple[int, int] = THUMBNAIL_BOX
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
            buffer, format="PNG", optimize=True
        )
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


def plot_history(history: Sequence[Any], best_epoch: int | None = None) -> bytes:
    """The study's Figure 2: accuracy and loss over epochs, training and validation, as PNG bytes.

    `history` holds one record per epoch, a mapping or a dataclass (e.g. the deep arm's
    EpochRecord) with `epoch`, `train_acc`, `val_acc`, `train_loss` and `val_loss`."""
    import matplotlib.style
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg renders the PNG

    records = [r if isinstance(r, Mapping) else dataclasses.asdict(r) for r in history]
    epochs = [r["epoch"] for r in records]
    # matplotlib's own style: nnU-Net's import sets a global seaborn style with 2.5x fonts
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
        for axes, metric, title in zip(
            figure.subplots(1, 2), ("acc", "loss"), ("Accuracy", "Loss (binary cross-entropy)")
        ):
            axes.plot(epochs, [r[f"train_{metric}"] for r in records], label="training")
            axes.plot(epochs, [r[f"val_{metric}"] for r in records], label="validation")
            if best_epoch:
                axes.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
            axes.set(title=title, xlabel="epoch")
            axes.legend()
        return figure_png(figure)
