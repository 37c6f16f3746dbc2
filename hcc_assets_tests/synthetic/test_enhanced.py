"""`synth --enhanced` and `synth --transfer-syntax jpeg2000-lossy`, ingested by the raw_scan and
nifti_volume steps: an Enhanced MR patient gives the classic patient's volume voxel for voxel, on
the same affine; a lossy patient is ingested, flagged lossy in `scans` with its ratio."""

import numpy as np
import pydicom
import pytest

from hcc_assets.featurestore import FeatureStore
from hcc_assets.lake import DataLake
from hcc_assets.steps import ingest
from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
from hcc_assets.synthetic.transfer_syntax import TRANSFER_SYNTAXES

ONE_PATIENT = dict(patients=1, seed=3, matrix=48, slices_min=10, slices_max=12, oblique_fraction=1.0)
LIMITS = dict(min_slices=10, min_echo_time_ms=60.0, min_repetition_time_ms=800.0, max_voxels=100_000_000)
PATIENT_ID = "pt-synthetic"


def _ingest(tmp_path, config: SynthConfig):
    """Write the patient, then the raw_scan and nifti_volume steps on it; (study, image, store)."""
    incoming = tmp_path / "incoming"
    folder = incoming / synthesize_cohort(incoming, config)[0].patient_key
    store, data_lake = FeatureStore(tmp_path / "fs.sqlite"), DataLake(tmp_path / "lake")
    study = ingest.read_study(folder, **LIMITS)
    ingest.record_raw_scan(store, data_lake, PATIENT_ID, study, incoming, "run-1")
    image, _reference = ingest.read_native_volume(data_lake, PATIENT_ID, folder)
    return study, image, store


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    return _ingest(tmp_path_factory.mktemp("classic"), SynthConfig(**ONE_PATIENT))


@pytest.mark.parametrize("syntax", ["explicit", "jpeg2000", "rle"])
def test_an_enhanced_patient_gives_the_classic_volume(classic, tmp_path, syntax):
    study, image, store = _ingest(tmp_path, SynthConfig(**ONE_PATIENT, enhanced=True, transfer_syntax=syntax))
    _, classic_image, _ = classic
    volume, reference = np.asarray(image.dataobj), np.asarray(classic_image.dataobj)
    assert volume.dtype == reference.dtype and np.array_equal(volume, reference)
    assert np.array_equal(image.affine, classic_image.affine)
    assert study.choice.series.series_number == classic[0].choice.series.series_number
    for series in study.inventory.series:  # one Enhanced MR file per series, in the asked syntax
        assert series.n_files == 1 and series.n_slices == classic_image.shape[2]
        header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        assert header.SOPClassUID == pydicom.uid.EnhancedMRImageStorage and "EchoTime" not in header
        assert header.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    scans = store.query("SELECT n_files, lossy FROM scans WHERE chosen")
    assert scans.rows() == [(1, False)]


def test_a_lossy_patient_is_ingested_and_flagged(classic, tmp_path):
    _, image, store = _ingest(tmp_path, SynthConfig(**ONE_PATIENT, transfer_syntax="jpeg2000-lossy"))
    rows = store.query("SELECT transfer_syntax, lossy, lossy_ratio, choice_reason FROM scans WHERE chosen")
    syntax, lossy, ratio, reason = rows.row(0)
    assert syntax == pydicom.uid.JPEG2000 and lossy and ratio > 2
    assert "lossy-compressed (JPEG 2000 Image Compression" in reason and "flagged" in reason
    # decoded, on the classic grid, but not the same pixels
    _, classic_image, classic_store = classic
    assert image.shape == classic_image.shape and np.array_equal(image.affine, classic_image.affine)
    assert not np.array_equal(np.asarray(image.dataobj), np.asarray(classic_image.dataobj))
    assert classic_store.query("SELECT bool_or(lossy), max(lossy_ratio) FROM scans").row(0) == (False, None)


def test_the_chaos_layout_cannot_be_enhanced(tmp_path):
    with pytest.raises(ValueError, match="CHAOS layout"):
        synthesize_cohort(tmp_path, SynthConfig(**ONE_PATIENT, enhanced=True), layout="chaos")
