"""Series -> NIfTI: geometry against dcm2niix, slice order, rescale, de-identified header."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging import geometry
from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
from hcc_assets.imaging.nifti import series_to_nifti
from hcc_assets_tests.imaging.test_dicom_series import (
    AXIAL,
    PHI,
    oblique_orientation,
    truth_volume,
    write_series,
)


def _dcm2niix() -> str:
    found = Path(sys.executable).parent / "dcm2niix"
    if found.exists():
        return str(found)
    on_path = shutil.which("dcm2niix")
    if on_path is None:
        pytest.skip("dcm2niix is not installed")
    return on_path


def convert_with_dcm2niix(series_dir: Path, out_dir: Path) -> nib.Nifti1Image:
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [_dcm2niix(), "-z", "n", "-b", "n", "-o", str(out_dir), "-f", "out", str(series_dir)],
        check=True,
        capture_output=True,
    )
    (converted,) = out_dir.glob("out*.nii")
    return nib.load(converted)


def assert_same_volume(ours: nib.Nifti1Image, theirs: nib.Nifti1Image) -> None:
    ours, theirs = nib.as_closest_canonical(ours), nib.as_closest_canonical(theirs)
    assert ours.shape == theirs.shape[:3]
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    np.testing.assert_allclose(
        ours.get_fdata(dtype=np.float32), theirs.get_fdata(dtype=np.float32).reshape(ours.shape), rtol=1e-5, atol=1e-3
    )


def only_series(patient: Path):
    (series,) = inventory_study(patient).series
    return series


@pytest.mark.parametrize("orientation", [AXIAL, oblique_orientation()], ids=["axial", "oblique"])
def test_geometry_and_voxels_agree_with_dcm2niix(tmp_path, orientation):
    series_dir = write_series(tmp_path / "p" / "study" / "t2", truth_volume(), orientation=orientation)
    ours = series_to_nifti(only_series(tmp_path / "p"))
    assert_same_volume(ours, convert_with_dcm2niix(series_dir, tmp_path / "dcm2niix"))


def test_slices_ordered_by_position_with_rescale_applied(tmp_path):
    # file names and InstanceNumbers both run against the positions (see write_series)
    stored = truth_volume()
    orientation = oblique_orientation(20, -5)
    write_series(
        tmp_path / "p" / "s",
        stored,
        orientation=orientation,
        first_position=(10.0, -20.0, 30.0),
        pixel_spacing=(1.5, 1.25),
        slice_spacing=4.5,
        rescale=(2.0, -100.0),
    )
    series = only_series(tmp_path / "p")
    image = series_to_nifti(series)
    data = np.asarray(image.dataobj)
    assert data.dtype == np.float32 and image.shape == stored.shape
    np.testing.assert_array_equal(data, stored.astype(np.float32) * 2 - 100)
    expected = geometry.affine_ras(orientation, (10.0, -20.0, 30.0), (1.5, 1.25), 4.5)
    np.testing.assert_allclose(image.affine, expected, atol=1e-4)
    assert series.slice_spacing_mm == pytest.approx(4.5, abs=1e-4)  # not SliceThickness 3 / SpacingBetweenSlices 99
    assert np.allclose(image.header.get_zooms(), (1.25, 1.5, 4.5), atol=1e-4)


def test_rescale_is_applied_per_slice(tmp_path):
    stored = truth_volume(slices=4)
    write_series(tmp_path / "p" / "s", stored, per_slice={2: {"RescaleSlope": "0.5", "RescaleIntercept": "7"}})
    data = np.asarray(series_to_nifti(only_series(tmp_path / "p")).dataobj)
    np.testing.assert_allclose(data[:, :, 2], stored[:, :, 2] * 0.5 + 7)
    np.testing.assert_allclose(data[:, :, 1], stored[:, :, 1] * 2.0 - 100)


def test_signed_pixels_and_missing_rescale(tmp_path):
    stored = truth_volume(slices=3).astype(np.int16) - 500
    write_series(
        tmp_path / "p" / "s",
        stored.view(np.uint16),
        rescale=(1.0, 0.0),
        extra={"PixelRepresentation": 1, "RescaleSlope": None, "RescaleIntercept": None},
    )
    data = np.asarray(series_to_nifti(only_series(tmp_path / "p")).dataobj)
    np.testing.assert_array_equal(data, stored.astype(np.float32))


def test_header_is_deidentified_with_codes_set(tmp_path):
    write_series(tmp_path / "p" / "s", truth_volume(slices=3))
    image = series_to_nifti(only_series(tmp_path / "p"))
    header = image.header
    assert header["descrip"].item() == b"" and header["db_name"].item() == b"" and header["aux_file"].item() == b""
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), image.affine, atol=1e-5)
    raw = header.binaryblock.upper()
    assert not any(secret.encode() in raw for secret in PHI)


def test_gap_tolerance_is_configurable(tmp_path):
    # positions 0, 5, 10, 17, 22 ...: a 7 mm step passes at ratio 1.5, fails at 1.2
    write_series(
        tmp_path / "p" / "s",
        truth_volume(slices=6),
        per_slice={k: {"ImagePositionPatient": ["-100", "-80", f"{20 + 5 * k + 2 * (k >= 3)}"]} for k in range(6)},
    )
    series = only_series(tmp_path / "p")
    assert series_to_nifti(series).shape[2] == 6
    with pytest.raises(PatientInputError, match=r"missing slice: a gap of 7\.00 mm"):
        series_to_nifti(series, max_gap_ratio=1.2)


def test_changed_files_are_refused(tmp_path):
    write_series(tmp_path / "p" / "s", truth_volume(slices=4))
    series = only_series(tmp_path / "p")
    path = series.files[1]
    dataset = pydicom.dcmread(path)
    dataset.RescaleSlope = "3"
    dataset.save_as(path)
    with pytest.raises(PatientInputError, match="changed since the inventory"):
        series_to_nifti(series)


# ---------------------------------------------------------------------------------------------
# The synthetic cohort (names contain "synth": `-k "not synth"` skips them)


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    """One axial and one oblique synthetic patient."""
    synth = pytest.importorskip("hcc_assets.synthetic.cohort")
    out = tmp_path_factory.mktemp("synth")
    config = synth.SynthConfig(patients=4, seed=11, matrix=32, slices_min=12, slices_max=14, oblique_fraction=0.5)
    patients = synth.synthesize_cohort(out, config)
    by_kind = {}
    for patient in patients:
        series = choose_t2_series(inventory_study(out / patient.patient_key)).series
        by_kind.setdefault("axial" if np.allclose(series.orientation, AXIAL) else "oblique", (patient, series))
    assert set(by_kind) == {"axial", "oblique"}
    return out, by_kind


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_synth_t2_agrees_with_dcm2niix_and_reference_mask(synth_pair, tmp_path, kind):
    out, by_kind = synth_pair
    patient, series = by_kind[kind]
    ours = series_to_nifti(series)
    assert_same_volume(ours, convert_with_dcm2niix(patient.t2_series_dir, tmp_path / "dcm2niix"))
    mask = nib.load(out / patient.patient_key / "reference" / "liver_spleen_mask.nii.gz")
    assert mask.shape == ours.shape
    np.testing.assert_allclose(mask.affine, ours.affine, atol=1e-3)
    labels = np.asarray(mask.dataobj)
    data = np.asarray(ours.dataobj)
    # an aligned mask covers bright, homogeneous liver; mirrored it straddles other tissue
    assert labels.max() == 2 and data[labels == 1].mean() > 5 * np.median(data[labels == 0])
    assert data[labels == 1].std() < data[np.flip(labels, 0) == 1].std()
    assert not any(secret.encode() in ours.header.binaryblock for secret in patient.phi)


@pytest.mark.parametrize(("bits", "signed"), [(12, False), (16, True)], ids=["unsigned 12-bit", "signed 16-bit"])
def test_a_monochrome1_series_gives_the_signal_of_its_monochrome2_twin(tmp_path, bits, signed):
    """MONOCHROME1 stores the brightest signal lowest: the same acquisition written both ways gives
    the same volume (mirrored within the stored range, then rescaled), and highdicom, which converts
    MONOCHROME1 the same way, reads the same voxels."""
    import highdicom

    truth = truth_volume()
    ours = series_to_nifti(only_series(write_series(tmp_path / "m2" / "s" / "t2", truth).parent.parent))
    # stored = lowest + highest storable value - signal; a signed 16-bit value's bits as uint16
    mirrored = ((-1 - truth.astype(np.int32)) if signed else ((1 << bits) - 1 - truth.astype(np.int32))) & 0xFFFF
    bits_tags = {"BitsStored": bits, "HighBit": bits - 1, "PixelRepresentation": int(signed)}
    folder = write_series(
        tmp_path / "m1" / "s" / "t2",
        mirrored.astype(np.uint16),
        extra={"PhotometricInterpretation": "MONOCHROME1", "SpacingBetweenSlices": None, **bits_tags},
    )
    inverted = series_to_nifti(only_series(folder.parent.parent))
    assert np.array_equal(np.asarray(inverted.dataobj), np.asarray(ours.dataobj))
    assert np.array_equal(inverted.affine, ours.affine)

    theirs = highdicom.get_volume_from_series([pydicom.dcmread(f) for f in folder.iterdir()], dtype=np.float32)
    assert_same_volume(inverted, theirs.to_nibabel())
