"""`synth --reference seg`: the reference mask written as a DICOM SEG drawn on the T2 series, read
back by the nifti_volume step as the same mask the NIfTI reference gives; the images are the NIfTI
cohort's, byte for byte, and a rerun writes the same bytes."""

import hashlib

import nibabel as nib
import numpy as np
import pytest

from hcc_assets.featurestore import FeatureStore
from hcc_assets.lake import DataLake
from hcc_assets.steps import ingest
from hcc_assets.synthetic.cohort import MASK_PATH, SEG_SERIES_FOLDER, SynthConfig, synthesize_cohort

COHORT = dict(patients=2, seed=11, matrix=48, slices_min=10, slices_max=12, oblique_fraction=0.5)
LIMITS = dict(min_slices=10, min_echo_time_ms=60.0, min_repetition_time_ms=800.0, max_voxels=100_000_000)


def _files(root) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_a_seg_reference_is_read_as_the_nifti_reference(tmp_path, enhanced):
    nifti = synthesize_cohort(tmp_path / "nifti", SynthConfig(**COHORT, enhanced=enhanced))
    seg = synthesize_cohort(tmp_path / "seg", SynthConfig(**COHORT, enhanced=enhanced, reference="seg"))
    again = synthesize_cohort(tmp_path / "again", SynthConfig(**COHORT, enhanced=enhanced, reference="seg"))
    assert [p.patient_key for p in seg] == [p.patient_key for p in nifti] == [p.patient_key for p in again]
    assert _files(tmp_path / "seg") == _files(tmp_path / "again")  # reproducible, SEG included
    images = {name: h for name, h in _files(tmp_path / "seg").items() if SEG_SERIES_FOLDER not in name}
    assert images == {name: h for name, h in _files(tmp_path / "nifti").items() if "reference" not in name}
    for patient in seg:
        folder = tmp_path / "seg" / patient.patient_key
        assert not (folder / MASK_PATH).exists()
        assert [p.name for p in (patient.t2_series_dir.parent / SEG_SERIES_FOLDER).iterdir()] == ["seg.dcm"]
        study = ingest.read_study(folder, **LIMITS)
        data_lake = DataLake(tmp_path / "lake")
        ingest.record_raw_scan(FeatureStore(tmp_path / "fs.sqlite"), data_lake, "pt-x", study, tmp_path / "seg", "r")
        _image, reference = ingest.read_native_volume(data_lake, "pt-x", folder)
        expected = nib.load(tmp_path / "nifti" / patient.patient_key / MASK_PATH)
        assert reference is not None
        assert np.array_equal(np.asarray(reference.dataobj), np.asarray(expected.dataobj).astype(np.uint8))
        assert np.allclose(reference.affine, expected.affine, atol=1e-3)
        assert set(np.unique(np.asarray(reference.dataobj))) == {0, 1, 2}
