"""Shared set-up for tests that materialize real Dagster assets."""

from __future__ import annotations

import base64
import io
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg

from hcc_assets.defs import ingest
from hcc_assets.defs.cohort import cohort
from hcc_assets.defs.resources import LakeResource

PATIENT_ASSETS = [ingest.raw_scan, ingest.nifti_volume, ingest.preprocessed_volume]


TEST_PSEUDONYM_KEY = "hcc-assets-tests"


def make_lake(tmp_path: Path, incoming: Path) -> LakeResource:
    """A lake at tmp_path/lake with a fixed pseudonym key: the same cohort gets the same pseudonyms,
    hence the same seeded split and the same training patients, in every run (a new lake otherwise
    draws a random key)."""
    key_file = tmp_path / "lake" / "private" / "pseudonym.key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(TEST_PSEUDONYM_KEY)
    return LakeResource(root=str(tmp_path / "lake"), incoming=str(incoming), quiet_seconds=3600)


def register_all(instance: dg.DagsterInstance, lake: LakeResource) -> list[str]:
    pids = sorted(lake.ready_patients())
    instance.add_dynamic_partitions("patients", pids)
    return pids


def in_memory_instance() -> dg.DagsterInstance:
    """A Dagster instance with its run and event storage in memory, for modules that read nothing
    back from Dagster's own files (test_phi scans an on-disk instance). The runs are as real; the
    on-disk SQLite instance of dg.instance_for_test costs about 0.4 s more per run (each run gets
    its own event-log database, created with its schema): a minute over the 40-patient study."""
    return dg.DagsterInstance.ephemeral()


@contextmanager
def module_platform(
    tmp_path_factory, name: str, cohort_source: Path
) -> Iterator[tuple[Path, LakeResource, dg.DagsterInstance, list[str]]]:
    """A module's platform: the cohort copied into a scratch folder's incoming/, a lake there (test
    key), a Dagster instance in memory (in_memory_instance) with every patient registered. Yields
    (root, lake, instance, patient ids); the folder is removed when the module is done."""
    from hcc_assets_tests.scratch import module_scratch

    with module_scratch(tmp_path_factory, name) as root, in_memory_instance() as instance:
        incoming = root / "incoming"
        shutil.copytree(cohort_source, incoming)
        lake = make_lake(root, incoming)
        yield root, lake, instance, register_all(instance, lake)


def ingest_patient(instance, lake, pid, raise_on_error=True) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        PATIENT_ASSETS, partition_key=pid, instance=instance, resources={"lake": lake}, raise_on_error=raise_on_error
    )


# every per-patient asset, in pipeline order (asset names)
PER_PATIENT_ASSET_NAMES = [
    "raw_scan",
    "nifti_volume",
    "preprocessed_volume",
    "liver_mask",
    "radiomic_features",
    "deep_embedding",
    "hcc_prediction",
]


def materialize_cohort(instance, lake, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [cohort, *PATIENT_ASSETS],
        selection=[cohort],
        instance=instance,
        resources={"lake": lake},
        raise_on_error=raise_on_error,
    )


def sensor_tick(instance, lake, cursor):
    """One evaluation of the drop-zone sensor through Dagster's build context; the partitions it
    asks for are added, as the daemon would."""
    from hcc_assets.defs.sensors import incoming_scans_sensor

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"lake": lake})
    result = incoming_scans_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure:
            return event.step_failure_data.error.message
    return ""


def check_figure(metadata: dict, key: str, data_lake, path: str, alt: str) -> bytes:
    """A figure linked from asset metadata (hcc_assets.defs.metadata.figure_metadata): `key` is the
    path of the full PNG in the lake, `key`_thumbnail Markdown with a smaller inline image of at most
    16 KB. `metadata` holds MetadataValues or their values. Returns the PNG."""
    from PIL import Image

    def value(name):
        return getattr(metadata[name], "value", metadata[name])

    assert value(key) == path, (value(key), path)
    png = data_lake.read_bytes(path)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    thumbnail = value(key + "_thumbnail")
    assert len(thumbnail.encode()) <= 16 * 1024, len(thumbnail.encode())
    found = re.fullmatch(rf"!\[{re.escape(alt)}\]\(data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)\)", thumbnail)
    assert found, thumbnail[:120]
    with Image.open(io.BytesIO(base64.b64decode(found.group(2)))) as small, Image.open(io.BytesIO(png)) as full:
        assert small.format.lower() == found.group(1) and 32 <= max(small.size) <= max(full.size)
    return png
