"""Thumbnails of figures for inline asset metadata (hcc_assets.core.figures.thumbnail)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from hcc_assets.core.figures import THUMBNAIL_MAX_BYTES, thumbnail, thumbnail_data_uri
from hcc_assets.imaging.preview import mid_slice_png
from hcc_assets_tests.imaging.test_preprocess import body_phantom


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(uri: str) -> Image.Image:
    header, data = uri.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_a_slice_preview_becomes_a_small_deterministic_thumbnail():
    image, mask = body_phantom((1, 0, 0, 0, 1, 0))
    png = mid_slice_png(image, mask, title="pt-0123456789ab T2")
    uri = thumbnail_data_uri(png)
    assert len(uri) <= THUMBNAIL_MAX_BYTES and len(uri) < len(png)
    small = _decode(uri)
    assert max(small.size) <= 480 and min(small.size) >= 64
    assert thumbnail_data_uri(png) == uri  # same figure, same bytes


def test_an_incompressible_image_is_shrunk_until_it_fits():
    noise = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    png = _png(noise)
    assert len(png) > 1_000_000
    for limit in (THUMBNAIL_MAX_BYTES, 4096):
        uri = thumbnail_data_uri(png, max_bytes=limit)
        assert len(uri) <= limit
        assert _decode(uri).size[0] / _decode(uri).size[1] == pytest.approx(4 / 3, rel=0.05)  # aspect kept
    with pytest.raises(ValueError, match="no thumbnail"):
        thumbnail(png, max_bytes=100)


def test_transparent_and_grey_images_are_accepted():
    rgba = np.zeros((300, 500, 4), dtype=np.uint8)
    rgba[50:250, 100:400] = (200, 30, 30, 255)  # an opaque box on a transparent background
    mime, data = thumbnail(_png(rgba))
    with Image.open(io.BytesIO(data)) as small:
        corner = small.convert("RGB").getpixel((0, 0))
    assert mime in ("image/png", "image/jpeg") and min(corner) > 240  # transparency goes on white
    grey = (np.arange(256 * 256, dtype=np.uint32).reshape(256, 256) % 251).astype(np.uint8)
    assert len(thumbnail_data_uri(_png(grey))) <= THUMBNAIL_MAX_BYTES
