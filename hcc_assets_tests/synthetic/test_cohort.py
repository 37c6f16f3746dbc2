"""The synthetic cohort: valid DICOM, CHAOS-like tags and geometry, known truth, determinism."""

from __future__ import annotations

import csv
import datetime
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from scipy import ndimage

from hcc_assets.imaging import geometry
from hcc_assets.synthetic.cohort import SynthConfig, patient_phantom, phantom_labels, synthesize_cohort
from hcc_assets.synthetic.phantom import Tissue

SMALL = SynthConfig(patients=4, seed=3, matrix=64, slices_min=8, slices_max=12)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize_cohort(out, SMALL)


def read_series(series_dir: Path) -> tuple[list[pydicom.Dataset], np.ndarray, np.ndarray]:
    """Slices sorted along the normal, volume [k, j, i] in real units, LPS affine from the tags."""
    slices = [pydicom.dcmread(path, force=False) for path in series_dir.glob("*.dcm")]
    normal = geometry.slice_normal(slices[0].ImageOrientationPatient)
    slices.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    affine = geometry.affine_lps(
        slices[0].ImageOrientationPatient,
        slices[0].ImagePositionPatient,
        slices[0].PixelSpacing,
        float(slices[0].SpacingBetweenSlices),
    )
    return slices, volume, affine


def voxel_centers(affine: np.ndarray, shape_kji: tuple[int, ...]) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape_kji), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk1 @ affine.T)[..., :3]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_files_are_part10_mr_with_realistic_tags(cohort):
    out, patients = cohort
    for patient in patients:
        series_dirs = sorted((out / patient.patient_key / "study_1").iterdir())
        assert [d.name for d in series_dirs] == ["series_3", "series_4", "series_5"]
        series_uids, study_uids, frames, sop_uids = set(), set(), set(), set()
        for series_dir in series_dirs:
            slices, _, _ = read_series(series_dir)
            first = slices[0]
            series_uids.add(first.SeriesInstanceUID)
            for ds in slices:  # read with force=False: a Part-10 preamble and meta are required
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
                assert ds.SeriesInstanceUID == first.SeriesInstanceUID
                study_uids.add(ds.StudyInstanceUID)
                frames.add(ds.FrameOfReferenceUID)
                sop_uids.add(ds.SOPInstanceUID)
                assert ds.pixel_array.max() <= 4095 and ds.pixel_array.dtype == np.uint16
            assert (first.Rows, first.Columns) == (SMALL.matrix, SMALL.matrix)
            assert (first.BitsAllocated, first.PixelRepresentation, first.SamplesPerPixel) == (16, 0, 1)
            assert first.BitsStored in (12, 16) and first.PhotometricInterpretation == "MONOCHROME2"
            assert first.Manufacturer == "Philips" and float(first.MagneticFieldStrength) == 1.5
            assert (float(first.RescaleSlope), float(first.RescaleIntercept)) != (1.0, 0.0)
            assert 1.5 <= float(first.RescaleSlope) <= 2.5 and -100 <= float(first.RescaleIntercept) <= 0
            pixel = float(first.PixelSpacing[0])
            assert first.PixelSpacing[0] == first.PixelSpacing[1] and 355 <= pixel * SMALL.matrix <= 490
            spacing = float(first.SpacingBetweenSlices)
            assert 5.5 <= spacing <= 9.0 and float(first.SliceThickness) != spacing
            positions = [
                np.dot(ds.ImagePositionPatient, geometry.slice_normal(ds.ImageOrientationPatient)) for ds in slices
            ]
            assert np.allclose(np.diff(positions), spacing, atol=1e-3)
            assert np.allclose([ds.SliceLocation for ds in slices], positions, atol=1e-3)
            echo, repetition = float(first.EchoTime), float(first.RepetitionTime)
            if first.SeriesDescription == "T2_SPIR":
                assert SMALL.slices_min <= len(slices) <= SMALL.slices_max
                assert 70 <= echo <= 100 and 1500 <= repetition <= 2000
                assert first.ScanningSequence == "SE" and "tse" in first.SequenceName
            else:
                expected_echo = {"T1_DUAL_IN_PHASE": 4.6, "T1_DUAL_OPP_PHASE": 2.3}[first.SeriesDescription]
                assert echo == expected_echo and 150 <= repetition <= 200
                assert first.ScanningSequence == "GR"
        assert len(series_uids) == 3 and len(study_uids) == 1 and len(frames) == 1
        assert len(sop_uids) == sum(len(list(d.glob("*.dcm"))) for d in series_dirs)
        first_bytes = next(patient.t2_series_dir.glob("*.dcm")).read_bytes()
        assert patient.t2_series_dir == out / patient.patient_key / "study_1" / "series_5"
        assert all(value.encode() in first_bytes for value in patient.phi)


def test_phi_is_distinctive_and_kept_out_of_folder_and_file_names(cohort):
    out, patients = cohort
    for patient in patients:
        assert patient.phi[0] == patient.patient_key and len(set(patient.phi)) == len(patient.phi)
        assert all(len(value) >= 6 for value in patient.phi)
        for path in (out / patient.patient_key).rglob("*"):
            relative = str(path.relative_to(out / patient.patient_key))
            assert not any(value in relative for value in patient.phi)


def test_neither_file_name_nor_instance_number_follows_position(cohort):
    _, patients = cohort
    for patient in patients:
        slices, _, _ = read_series(patient.t2_series_dir)  # spatial order
        spatial = [Path(ds.filename).name for ds in slices]
        assert sorted(spatial) != spatial
        by_instance = sorted(slices, key=lambda ds: int(ds.InstanceNumber))
        assert [Path(ds.filename).name for ds in by_instance] not in (spatial, spatial[::-1])
        assert sorted(int(ds.InstanceNumber) for ds in slices) == list(range(1, len(slices) + 1))


def test_same_config_gives_identical_bytes(cohort, tmp_path):
    out, _ = cohort
    again = tmp_path / "again"
    synthesize_cohort(again, SMALL)
    assert tree_digest(again) == tree_digest(out)
    assert not list(out.glob(".*partial"))


def test_patients_written_in_two_processes_are_the_same_bytes(cohort, tmp_path):
    out, patients = cohort
    parallel = tmp_path / "parallel"
    described = synthesize_cohort(parallel, SMALL, workers=2)
    assert [p.patient_key for p in described] == [p.patient_key for p in patients]
    assert [p.hcc for p in described] == [p.hcc for p in patients]
    assert tree_digest(parallel) == tree_digest(out)


def test_reference_mask_overlays_t2_volume(cohort):
    out, patients = cohort
    for patient in patients:
        slices, volume, affine = read_series(patient.t2_series_dir)
        mask_image = nib.load(out / patient.patient_key / "reference" / "liver_spleen_mask.nii.gz")
        mask = np.asarray(mask_image.dataobj)
        assert mask.dtype == np.uint8 and mask.shape == (slices[0].Columns, slices[0].Rows, len(slices))
        assert np.allclose(mask_image.affine, geometry.LPS_TO_RAS @ affine, atol=1e-4)
        assert set(np.unique(mask)) == {0, 1, 2}
        labels, lesions = phantom_labels(SMALL, patient.patient_key, voxel_centers(affine, volume.shape))
        assert np.array_equal(labels.transpose(2, 1, 0), mask)
        liver = volume[(labels == 1) & (lesions == 0)].mean()
        spleen = volume[labels == 2].mean()
        assert 150 < liver < 600 and spleen > 1.5 * liver  # T2: liver darker than spleen


def test_hcc_counts_and_labels_csv(cohort):
    out, patients = cohort
    assert sum(p.hcc for p in patients) == round(SMALL.patients * SMALL.hcc_fraction)
    assert all((p.n_lesions > 0) == p.hcc and p.n_lesions <= 3 for p in patients)
    assert all((out / p.patient_key / ".complete").read_bytes() == b"" for p in patients)
    with (out / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["patient_key", "hcc", "source"]
    assert rows == [
        {"patient_key": p.patient_key, "hcc": str(int(p.hcc)), "source": "synthetic"}
        for p in sorted(patients, key=lambda p: p.patient_key)
    ]


def test_labels_csv_merges_by_patient_key(tmp_path):
    config = SynthConfig(patients=2, seed=5, matrix=16, slices_min=3, slices_max=4)
    first = synthesize_cohort(tmp_path, config)
    stale = first[0].patient_key
    (tmp_path / "labels.csv").write_text(
        f"patient_key,hcc,source\nZZZ-EXTERNAL,1,tcga\n{stale},{1 - int(first[0].hcc)},old\n"
    )
    synthesize_cohort(tmp_path, config)
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    expected = sorted([f"{p.patient_key},{int(p.hcc)},synthetic" for p in first] + ["ZZZ-EXTERNAL,1,tcga"])
    assert rows == ["patient_key,hcc,source", *expected]


def test_oblique_patients_have_tilted_orientation_and_matching_mask(tmp_path):
    config = SynthConfig(patients=2, seed=1, matrix=32, slices_min=6, slices_max=8, oblique_fraction=1.0)
    for patient in synthesize_cohort(tmp_path, config):
        slices, volume, affine = read_series(patient.t2_series_dir)
        orientation = np.asarray(slices[0].ImageOrientationPatient, float)
        assert not np.allclose(np.abs(orientation), [1, 0, 0, 0, 1, 0], atol=0.05)
        mask = np.asarray(nib.load(tmp_path / patient.patient_key / "reference" / "liver_spleen_mask.nii.gz").dataobj)
        labels, _ = phantom_labels(config, patient.patient_key, voxel_centers(affine, volume.shape))
        assert np.array_equal(labels.transpose(2, 1, 0), mask)


def lesion_and_rim_t2(config: SynthConfig, out: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per HCC patient with lesions in view: T2 volume, lesion mask, liver rim within 12 mm."""
    result = []
    for patient in synthesize_cohort(out, config):
        slices, volume, affine = read_series(patient.t2_series_dir)
        labels, lesions = phantom_labels(config, patient.patient_key, voxel_centers(affine, volume.shape))
        if not lesions.any():
            continue
        steps = (float(slices[0].SpacingBetweenSlices), *map(float, slices[0].PixelSpacing))
        distance = ndimage.distance_transform_edt(lesions == 0, sampling=steps)
        rim = (distance < 12) & (labels == 1) & (lesions == 0)
        result.append((volume, lesions > 0, rim))
    return result


def test_lesion_contrast_controls_lesion_signal(tmp_path):
    base = dict(patients=2, seed=2, hcc_fraction=1.0, matrix=96, slices_min=20, slices_max=22, oblique_fraction=0.5)
    null = lesion_and_rim_t2(SynthConfig(lesion_contrast=0.0, **base), tmp_path / "null")
    full = lesion_and_rim_t2(SynthConfig(lesion_contrast=1.0, **base), tmp_path / "full")
    assert null and len(null) == len(full)
    for (volume0, lesion, rim), (volume1, lesion1, _) in zip(null, full):
        assert np.array_equal(lesion, lesion1)
        # Null cohort: lesion voxels look like the liver around them.
        assert abs(volume0[lesion].mean() / volume0[rim].mean() - 1) < 0.06
        assert abs(volume0[lesion].std() - volume0[rim].std()) < 0.5 * volume0[rim].std() + 10
        # Full contrast: T2-hyperintense, and nothing but the lesion voxels changed.
        assert volume1[lesion].mean() / volume1[rim].mean() > 1.3
        assert np.array_equal(volume0[~lesion], volume1[~lesion])


def test_a_follow_up_study_is_the_same_patient_later_and_leaves_the_first_study_unchanged(cohort, tmp_path):
    out, patients = cohort
    with_follow_ups = synthesize_cohort(tmp_path, SMALL.model_copy(update={"follow_up_fraction": 0.5}))
    followed = [p for p in with_follow_ups if p.follow_up_days is not None]
    assert len(followed) == 2 and all(90 <= p.follow_up_days <= 400 for p in followed)
    assert all(p.follow_up_days is None for p in patients)
    for plain, patient in zip(patients, with_follow_ups, strict=True):
        assert plain.patient_key == patient.patient_key
        first = sorted((tmp_path / patient.patient_key / "study_1").rglob("*"))
        assert [f.relative_to(tmp_path) for f in first] == [
            f.relative_to(out) for f in sorted((out / plain.patient_key / "study_1").rglob("*"))
        ]
        for path in (p for p in first if p.is_file()):  # the first study's bytes are those of the plain cohort
            assert path.read_bytes() == (out / path.relative_to(tmp_path)).read_bytes()
        second = tmp_path / patient.patient_key / "study_2"
        assert second.is_dir() == (patient.follow_up_days is not None)
    patient = followed[0]
    name = sorted((tmp_path / patient.patient_key / "study_1" / "series_5").iterdir())[0].name  # the T2
    one = pydicom.dcmread(tmp_path / patient.patient_key / "study_1" / "series_5" / name)
    two = pydicom.dcmread(tmp_path / patient.patient_key / "study_2" / "series_5" / name)  # same slice, later
    for tag in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
        assert one.get(tag) == two.get(tag), tag
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "AccessionNumber", "SOPInstanceUID"):
        assert one.get(tag) != two.get(tag), tag
    days = (
        datetime.datetime.strptime(two.StudyDate, "%Y%m%d") - datetime.datetime.strptime(one.StudyDate, "%Y%m%d")
    ).days
    assert days == patient.follow_up_days
    assert two.StudyDate in patient.phi and two.AccessionNumber in patient.phi  # the PHI greps cover it
    assert one.ImagePositionPatient == two.ImagePositionPatient
    assert not np.array_equal(one.pixel_array, two.pixel_array)  # new noise
    with pytest.raises(ValueError, match="drop layout only"):
        synthesize_cohort(tmp_path / "chaos", SMALL.model_copy(update={"follow_up_fraction": 0.5}), layout="chaos")


def test_lungs_darken_soft_tissue_above_the_diaphragm_and_change_nothing_else(tmp_path):
    """`lungs`: the lung bases replace soft tissue above the liver and spleen domes, dark on T2 as on
    a real scan; every organ, lesion, reference label and the other signals stay as without them."""
    base = dict(patients=3, seed=4, hcc_fraction=0.5, matrix=64, slices_min=40, slices_max=44)
    plain, lungs = SynthConfig(**base), SynthConfig(lungs=True, **base)
    for before, after in zip(
        synthesize_cohort(tmp_path / "plain", plain), synthesize_cohort(tmp_path / "lungs", lungs)
    ):
        _, volume0, affine = read_series(before.t2_series_dir)
        _, volume1, affine1 = read_series(after.t2_series_dir)
        assert np.array_equal(affine, affine1)
        points = voxel_centers(affine, volume0.shape)
        tissue0, lesion0 = patient_phantom(plain, before.patient_key).tissue_at(points)
        tissue1, lesion1 = patient_phantom(lungs, after.patient_key).tissue_at(points)
        lung = tissue0 != tissue1
        assert lung.sum() > 0.02 * lung.size  # the slab reaches above the dome
        assert np.all(tissue0[lung] == Tissue.SOFT) and np.all(tissue1[lung] == Tissue.AIR)
        assert np.array_equal(lesion0, lesion1)
        assert np.array_equal(
            phantom_labels(plain, before.patient_key, points), phantom_labels(lungs, after.patient_key, points)
        )
        # above the liver: each lung voxel lies higher (LPS z: head) than the liver's lowest point
        liver_z = points[..., 2][tissue1 == Tissue.LIVER]
        assert np.percentile(points[..., 2][lung], 5) > np.percentile(liver_z, 50)
        liver = volume1[tissue1 == Tissue.LIVER].mean()
        assert volume1[lung].mean() < 0.2 * liver  # a signal void on T2
        assert np.array_equal(volume0[~lung], volume1[~lung])  # no other voxel moved
