"""figure_metadata: a figure goes to the lake as a file; the metadata gets its path and a small
thumbnail, never the image itself (Dagster keeps every metadata value of every run)."""

from __future__ import annotations

from hcc_assets.core.figures import THUMBNAIL_MAX_BYTES
from hcc_assets.defs.metadata import figure_metadata
from hcc_assets.imaging.preview import mid_slice_png
from hcc_assets.lake import DataLake
from hcc_assets_tests.imaging.test_preprocess import body_phantom
from hcc_assets_tests.imaging.test_thumbnail import _decode as decode


def test_figure_metadata_writes_the_png_to_the_lake_and_links_it(memory_root):
    lake = DataLake(memory_root)
    image, mask = body_phantom((1, 0, 0, 0, 1, 0))
    png = mid_slice_png(image, mask)
    path = lake.patient_figure("pt-0123456789ab", "nifti_volume", "mid_slice")
    assert path == lake.path("patients", "pt-0123456789ab", "figures", "nifti_volume_mid_slice.png")
    metadata = figure_metadata(lake, "mid_slice", path, png, "mid axial [slice]")
    assert set(metadata) == {"mid_slice", "mid_slice_thumbnail"}
    assert metadata["mid_slice"].value == path and lake.read_bytes(path) == png
    markdown = metadata["mid_slice_thumbnail"].value
    assert markdown.startswith("![mid axial (slice)](data:image/") and markdown.endswith(")")
    assert len(markdown.encode()) <= THUMBNAIL_MAX_BYTES
    decode(markdown[len("![mid axial (slice)](") : -1])

    cohort = lake.cohort_figure("hcc_classifier", "0123abcd", "figure_2")
    assert cohort == lake.path("figures", "hcc_classifier", "0123abcd", "figure_2.png")
    assert set(figure_metadata(lake, "figure_2", cohort, png, "curves", thumbnail=False)) == {"figure_2"}
    assert lake.read_bytes(cohort) == png
