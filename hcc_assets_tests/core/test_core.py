"""hcc_assets.core: atomic writes, publishing a folder, content versions, thumbnails, and the
package rule (standard library only at import time)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from hcc_assets.core.figures import THUMBNAIL_MAX_BYTES, array_png, figure_png, thumbnail, thumbnail_data_uri
from hcc_assets.core.files import (
    COMPLETE_MARKER,
    TEMP_NAME,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    publish_folder,
    temp_name,
)
from hcc_assets.core.versioning import content_version


def test_atomic_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "labels.csv"
    target.write_bytes(b"old content that is longer than the new one\n")
    atomic_write_bytes(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    atomic_write_text(target, "caf\u00e9\n")
    assert target.read_bytes() == "caf\u00e9\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["labels.csv"]
    assert TEMP_NAME.fullmatch(temp_name("labels.csv")) and temp_name("a").startswith(".")


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")

    def half_then_fail(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_publish_folder_renames_a_whole_folder_into_place_marker_included(tmp_path):
    final = tmp_path / "PATIENT-1"
    with publish_folder(final) as staging:
        assert staging.name.startswith(".") and staging.parent == tmp_path and not final.exists()
        (staging / "study_1").mkdir()
        (staging / "study_1" / "a.dcm").write_bytes(b"dicom")
    assert (final / COMPLETE_MARKER).read_bytes() == b""
    assert (final / "study_1" / "a.dcm").read_bytes() == b"dicom"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PATIENT-1"]  # hidden staging gone

    with publish_folder(final, marker=None, hidden_prefix=".import-") as staging:  # replaces the old folder
        assert staging.name == ".import-PATIENT-1.partial"
        (staging / "b.dcm").write_bytes(b"other")
    assert sorted(p.name for p in final.iterdir()) == ["b.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PATIENT-1"]  # nor the old copy set aside


def test_publish_folder_leaves_nothing_when_the_build_fails_or_the_folder_exists(tmp_path):
    final = tmp_path / "PATIENT-2"
    with pytest.raises(ValueError), publish_folder(final) as staging:
        (staging / "a.dcm").write_bytes(b"half")
        raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []

    final.mkdir()
    (final / "keep").write_bytes(b"x")
    with pytest.raises(FileExistsError), publish_folder(final, replace=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PATIENT-2"]
    assert sorted(p.name for p in final.iterdir()) == ["keep"]


def test_content_version_is_stable_order_independent_and_unchanged():
    identity = {"code_version": "1", "cases": [["pt-a", "f00d"]], "config": {"lr": 0.001, "depth": 10}}
    reordered = {"config": {"depth": 10, "lr": 0.001}, "cases": [["pt-a", "f00d"]], "code_version": "1"}
    assert content_version(identity) == content_version(reordered) == content_version(dict(identity))
    assert len(content_version(identity)) == 16 and len(content_version(identity, length=12)) == 12
    assert (
        content_version(identity, length=None)
        == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    )
    assert content_version({"a": 1}) != content_version({"a": 2})
    # the inputs the stored versions were made from: bytes and str as they are, JSON otherwise
    assert content_version(b"\x00\x01", length=None) == hashlib.sha256(b"\x00\x01").hexdigest()
    assert content_version("<html>\u00e9") == hashlib.sha256("<html>\u00e9".encode()).hexdigest()[:16]
    parts = (["pt-a"], 3, object)
    with pytest.raises(TypeError):
        content_version(parts)
    assert (
        content_version(parts, length=12, default=str)
        == (hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12])
    )


def test_a_thumbnail_of_a_large_figure_fits_in_16_kb():
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    png = array_png(noise)
    assert len(png) > THUMBNAIL_MAX_BYTES * 10
    with Image.open(io.BytesIO(png)) as decoded:  # array_png writes a real PNG
        assert np.array_equal(np.asarray(decoded), noise)
    uri = thumbnail_data_uri(png)
    assert THUMBNAIL_MAX_BYTES == 16 * 1024 and len(uri) <= THUMBNAIL_MAX_BYTES
    assert uri.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
    assert thumbnail_data_uri(png) == uri  # same figure, same bytes
    with pytest.raises(ValueError, match="no thumbnail"):
        thumbnail(png, max_bytes=100)


def test_figure_png_has_no_version_stamp_and_is_deterministic():
    from matplotlib.figure import Figure

    def draw() -> bytes:
        figure = Figure(figsize=(2, 2), dpi=50)
        figure.subplots().plot([0, 1], [1, 0])
        return figure_png(figure)

    png = draw()
    assert png.startswith(b"\x89PNG") and b"Software" not in png and draw() == png


def test_importing_core_files_and_errors_needs_only_the_standard_library():
    """The DICOM receiver imports hcc_assets.core.files on a gateway without numpy."""
    code = (
        "import sys; import hcc_assets.core, hcc_assets.core.files, hcc_assets.core.errors, "
        "hcc_assets.core.versioning, hcc_assets.core.figures; "
        "heavy = {'numpy', 'matplotlib', 'PIL'} & {m.split('.')[0] for m in sys.modules}; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
