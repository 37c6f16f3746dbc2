"""No fake PHI from the synthetic DICOM may appear in any output: files, tables, Dagster storage."""

import gzip
import re
from pathlib import Path

import dagster as dg

from hcc_assets_tests.defs.helpers import ingest_patient, make_lake, materialize_cohort, register_all


def _readable_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # look inside gzip (NIfTI headers)
        data += gzip.decompress(data)
    return data


def test_no_phi_in_any_output(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    lake = make_lake(tmp_path, incoming)
    with dg.instance_for_test() as instance:
        for pid in register_all(instance, lake):
            assert ingest_patient(instance, lake, pid).success
        assert materialize_cohort(instance, lake).success
        instance_root = Path(instance.root_directory)
        # the store's text, as SQL returns it (DuckDB compresses strings on disk)
        dump = "\n".join(
            str(lake.store.query(f"SELECT * FROM {table}").rows())
            for table in ("patients", "studies", "scans", "volumes", "cohort_split")
        ).encode()
        outputs = [p for root in (Path(lake.root), instance_root) for p in root.rglob("*") if p.is_file()]
        assert any(p.name == "nifti_volume.nii.gz" for p in outputs)
        assert any(p.parent.name == "figures" and p.suffix == ".png" for p in outputs)
        blobs = {str(p): _readable_bytes(p) for p in outputs}
        # file and folder names too (figures are named by pseudonym and asset only)
        blobs["file names"] = "\n".join(
            str(p.relative_to(root)) for root in (Path(lake.root), instance_root) for p in root.rglob("*")
        ).encode()
        blobs["feature store dump"] = dump
        phi = {s for p in patients for s in p.phi} | {p.patient_key for p in patients}
        assert len(phi) >= 5 * len(patients)
        # numeric PHI (dates, record numbers) counts only where no digit touches it, so a
        # float such as 0.31219650312 in a log is not taken for the date 19650312
        patterns = {s: re.compile(rb"(?<![0-9])" + re.escape(s.encode()) + rb"(?![0-9])") for s in phi}
        # `in` first (a fast substring scan); the regex (digit boundaries) only where the string occurs
        leaks = [
            (name, s)
            for name, blob in blobs.items()
            for s, pattern in patterns.items()
            if s.encode() in blob and pattern.search(blob)
        ]
        assert leaks == []
