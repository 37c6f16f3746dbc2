"""Small helpers that render domain results as Dagster metadata."""

from __future__ import annotations

import dagster as dg

from hcc_assets.core.figures import THUMBNAIL_MAX_BYTES, thumbnail_data_uri
from hcc_assets.lake import DataLake
from hcc_assets.steps.tables import markdown_table as markdown_text

THUMBNAIL_SUFFIX = "_thumbnail"


def figure_metadata(
    data_lake: DataLake, key: str, path: str, png: bytes, alt: str, thumbnail: bool = True
) -> dict[str, dg.MetadataValue]:
    """Write the figure `png` to `path` in the lake (atomically) and link it from metadata, so the
    image itself stays out of Dagster's event log (which keeps every metadata value of every run):

    - `key`: the full PNG's path (a local path, or a URL on a remote lake);
    - `key + "_thumbnail"` (unless `thumbnail` is False): Markdown with a downscaled inline copy,
      at most THUMBNAIL_MAX_BYTES (16 KB) in all.

    Paths come from `DataLake.patient_figure` / `cohort_figure`: pseudonyms and asset names only."""
    data_lake.write_bytes(path, png)
    metadata: dict[str, dg.MetadataValue] = {key: dg.MetadataValue.path(path)}
    if thumbnail:
        alt = alt.replace("[", "(").replace("]", ")").replace("\n", " ")
        budget = THUMBNAIL_MAX_BYTES - len(f"![{alt}]()".encode())
        markdown = f"![{alt}]({thumbnail_data_uri(png, max_bytes=budget)})"
        if len(markdown.encode()) > THUMBNAIL_MAX_BYTES:
            raise AssertionError(
                f"{key}: inline thumbnail of {len(markdown.encode())} bytes, over {THUMBNAIL_MAX_BYTES}"
            )
        metadata[key + THUMBNAIL_SUFFIX] = dg.MetadataValue.md(markdown)
    return metadata


def markdown_table(rows: list[dict], columns: list[str]) -> dg.MetadataValue:
    return dg.MetadataValue.md(markdown_text(rows, columns))
