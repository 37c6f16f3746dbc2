"""Study inventory and T2 choice, on tiny hand-written DICOM studies (and the synthetic cohort).

`write_series` and `make_study` are shared with test_nifti.py and test_preprocess.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging import geometry
from hcc_assets.imaging.dicom_series import (
    AnnotationFile,
    choose_t2_series,
    inventory_study,
    list_studies,
    liver_annotation,
    series_key_of,
)
from hcc_assets.imaging.nifti import series_to_nifti

# Fake PHI written into every fixture file and folder name: none of it may reach a message.
PHI = ("DOE^JANE", "DOE", "JANE", "MRN4711", "19610203", "20190312", "ST EXAMPLE HOSPITAL", "ACC99123")
PATIENT_FOLDER = "MRN4711"
STUDY_FOLDER = "20190312 MR ABDOMEN"
T2_FOLDER = "3 T2 SPIR 2019-03-12"  # make_study's T2 series
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_orientation(degrees_x: float = 15.0, degrees_z: float = 10.0) -> tuple[float, ...]:
    ax, az = np.radians(degrees_x), np.radians(degrees_z)
    rot_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rotation = rot_z @ rot_x
    return tuple(round(float(v), 6) for v in np.r_[rotation[:, 0], rotation[:, 1]])


def truth_volume(columns: int = 16, rows: int = 12, slices: int = 12, seed: int = 0) -> np.ndarray:
    """Stored values [i, j, k] (geometry.py convention), distinct per voxel so order errors show."""
    rng = np.random.default_rng(seed)
    return rng.permutation(columns * rows * slices).reshape(columns, rows, slices).astype(np.uint16) + 10


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    number: int = 3,
    description: str = "T2_SPIR",
    echo_time: float = 85.0,
    repetition_time: float = 1800.0,
    orientation: tuple[float, ...] = AXIAL,
    first_position: tuple[float, float, float] = (-100.0, -80.0, 20.0),
    pixel_spacing: tuple[float, float] = (1.5, 1.25),
    slice_spacing: float = 5.0,
    rescale: tuple[float, float] = (2.0, -100.0),
    scanning_sequence: str = "SE",
    sequence_name: str = "*tse2d1_17",
    series_uid: str | None = None,
    extra: dict | None = None,
    drop_slices: tuple[int, ...] = (),
    per_slice: dict[int, dict] | None = None,
    name_prefix: str = "IM",
) -> Path:
    """One MR series, slice k at first_position + k * spacing * normal, stored[:, :, k] == pixels.T.

    File names and InstanceNumbers run against the spatial order, so sorting by either is wrong.
    `per_slice[k]` overrides (or with value None deletes) tags of slice k.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = geometry.slice_normal(orientation)
    n = stored.shape[2]
    for k in range(n):
        if k in drop_slices:
            continue
        position = np.asarray(first_position) + k * slice_spacing * normal
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        values = dict(
            SOPClassUID=MRImageStorage,
            SOPInstanceUID=sop_uid,
            StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
            SeriesInstanceUID=series_uid,
            FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.2",
            PatientName=PHI[0],
            PatientID=PHI[3],
            PatientBirthDate=PHI[4],
            StudyDate=PHI[5],
            SeriesDate=PHI[5],
            InstitutionName=PHI[6],
            AccessionNumber=PHI[7],
            Modality="MR",
            SeriesNumber=number,
            SeriesDescription=description,
            InstanceNumber=(7 * k) % n + 1 if n % 7 else n - k,
            EchoTime=f"{echo_time:g}",
            RepetitionTime=f"{repetition_time:g}",
            ScanningSequence=scanning_sequence,
            SequenceName=sequence_name,
            ImageType=["ORIGINAL", "PRIMARY", "M", "SE"],
            SliceThickness="3",
            SpacingBetweenSlices="99",  # deliberately wrong: spacing comes from positions
            ImagePositionPatient=[f"{v:.6f}" for v in position],
            ImageOrientationPatient=[f"{v:.6f}" for v in orientation],
            PixelSpacing=[f"{v:g}" for v in pixel_spacing],
            Rows=stored.shape[1],
            Columns=stored.shape[0],
            SamplesPerPixel=1,
            PhotometricInterpretation="MONOCHROME2",
            BitsAllocated=16,
            BitsStored=16,
            HighBit=15,
            PixelRepresentation=0,
            RescaleSlope=f"{rescale[0]:g}",
            RescaleIntercept=f"{rescale[1]:g}",
        )
        values.update(extra or {})
        values.update((per_slice or {}).get(k, {}))
        for keyword, value in values.items():
            if value is not None:
                setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
        # names descend while positions ascend; every third file has no extension
        name = f"{name_prefix}{n - k:04d}" + ("" if k % 3 == 0 else ".dcm")
        ds.save_as(folder / name, enforce_file_format=True)
    return folder


def make_study(root: Path, *, t2: dict | None = None, with_others: bool = True, slices: int = 12) -> Path:
    """<root>/MRN4711/<date study>/<series>/..., a T1 and a DWI series next to the T2."""
    patient = root / PATIENT_FOLDER
    study = patient / STUDY_FOLDER
    if with_others:
        write_series(
            study / "1 T1 in phase",
            truth_volume(slices=slices, seed=1),
            number=1,
            description="T1_DUAL_IN_PHASE",
            echo_time=4.6,
            repetition_time=200,
            scanning_sequence="GR",
            sequence_name="*fl2d1",
        )
        write_series(
            study / "7 dwi",
            truth_volume(slices=slices, seed=2),
            number=7,
            description="DWI_b800",
            echo_time=80,
            repetition_time=3000,
            scanning_sequence="EP",
            sequence_name="*ep_b800t",
            extra={"DiffusionBValue": 800},
        )
    write_series(study / T2_FOLDER, truth_volume(slices=slices), **(t2 or {}))
    (patient / ".complete").write_bytes(b"")
    (patient / "reference").mkdir(exist_ok=True)
    (patient / "reference" / "liver_spleen_mask.nii.gz").write_bytes(b"not DICOM, skipped")
    return patient


def ingest(patient: Path, **choice):
    """What the raw_scan and nifti_volume assets do, in one call."""
    inventory = inventory_study(patient)
    choice = choose_t2_series(inventory, **choice)
    return inventory, choice, series_to_nifti(choice.series)


def assert_no_phi(text: str, extra: tuple[str, ...] = ()) -> None:
    upper = text.upper()
    for secret in (*PHI, PATIENT_FOLDER, STUDY_FOLDER, "2019-03-12", "T2 SPIR 2019", *extra):
        assert secret.upper() not in upper, f"PHI {secret!r} leaked into: {text}"


# ---------------------------------------------------------------------------------------------


def test_inventory_describes_each_series_without_phi(tmp_path):
    patient = make_study(tmp_path)
    inventory = inventory_study(patient)
    by_number = {s.series_number: s for s in inventory.series}
    assert sorted(by_number) == [1, 3, 7] and inventory.n_files == 36
    t2 = by_number[3]
    assert len(t2.series_key) == 16 and int(t2.series_key, 16) >= 0
    assert (t2.rows, t2.columns, t2.n_files) == (12, 16, 12)
    assert t2.pixel_spacing_mm == (1.5, 1.25)
    assert t2.slice_spacing_mm == pytest.approx(5.0)  # from positions, not the tags below
    assert (t2.slice_thickness_mm, t2.spacing_between_slices_mm) == (3.0, 99.0)
    assert by_number[7].diffusion_b_value == 800 and t2.geometry_problem is None
    assert len(t2.files) == 12 and not any(".complete" in str(f) for f in t2.files)

    record = inventory.to_record()
    text = json.dumps(record)  # JSON-safe
    assert "files" not in record["series"][0]
    assert_no_phi(text)
    assert inventory_study(patient).to_record() == record  # stable keys and checksums


def test_series_of_two_patients_are_refused_without_naming_either(tmp_path):
    """A drop folder that holds another patient's study (different PatientID) must not become one
    patient with one T2 silently chosen across both; the message names tags and series only."""
    patient = make_study(tmp_path)
    other = {
        "PatientID": "MRN0815",
        "PatientBirthDate": "19700101",
        "StudyInstanceUID": generate_uid(),
        "FrameOfReferenceUID": generate_uid(),
    }
    write_series(patient / "other study" / "5 t2", truth_volume(seed=5), number=5, description="T2_TSE", extra=other)
    with pytest.raises(PatientInputError, match=r"2 different patients \(PatientID differs: ") as refused:
        inventory_study(patient)
    assert "one patient's studies" in str(refused.value)
    assert_no_phi(str(refused.value), extra=("MRN0815", "19700101"))


def test_a_follow_up_study_of_the_same_patient_is_not_an_identity_conflict(tmp_path):
    """Same PatientID, another study (its own StudyInstanceUID and FrameOfReferenceUID); an
    anonymized series without PatientID agrees with anyone."""
    patient = make_study(tmp_path)
    follow_up = {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
    write_series(patient / "follow-up" / "5 t2", truth_volume(seed=5), number=5, description="T2_TSE", extra=follow_up)
    write_series(
        patient / "follow-up" / "6 t2", truth_volume(seed=6), number=6, description="T2_TSE", extra={"PatientID": ""}
    )
    assert sorted(s.series_number for s in inventory_study(patient).series) == [1, 3, 5, 6, 7]


def test_studies_are_ordered_by_date_and_counted_in_days_without_naming_a_date(tmp_path):
    """A follow-up study (written first, in a folder that sorts first) is study 2: the order comes
    from StudyDate, never folder names; each study's inventory holds its own series only."""
    patient = make_study(tmp_path)
    follow_up = {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77", "StudyDate": "20190610", "StudyTime": "0815"}
    write_series(patient / "0 later" / "5 t2", truth_volume(seed=5), number=5, description="T2_TSE", extra=follow_up)
    first, second = list_studies(patient)
    assert (first.index, first.days_since_first, first.n_series) == (1, 0, 3)
    assert (second.index, second.days_since_first, second.n_series) == (2, 90, 1)
    assert second.study_key == series_key_of("1.2.826.0.1.3680043.8.498.77")
    assert [s.series_number for s in inventory_study(patient, second.folders).series] == [5]
    assert [s.series_number for s in inventory_study(patient, first.folders).series] == [1, 3, 7]
    assert "20190" not in repr((first, second))  # the folders (PHI names) are not in the repr either
    assert PATIENT_FOLDER not in repr((first, second))

    # the same day and time: the hash of the StudyInstanceUID decides, the same way every time
    same_day = {**follow_up, "StudyDate": PHI[5], "StudyTime": ""}
    shutil.rmtree(patient / "0 later")
    write_series(patient / "0 later" / "5 t2", truth_volume(seed=5), number=5, description="T2_TSE", extra=same_day)
    studies = list_studies(patient)
    assert [s.days_since_first for s in studies] == [0, 0]
    assert [s.study_key for s in studies] == sorted(s.study_key for s in studies)

    # a study without a date sorts last and has no day offset
    shutil.rmtree(patient / "0 later")
    undated = {**follow_up, "StudyDate": None}
    write_series(patient / "0 later" / "5 t2", truth_volume(seed=5), number=5, description="T2_TSE", extra=undated)
    assert [(s.index, s.n_series, s.days_since_first) for s in list_studies(patient)] == [(1, 3, 0), (2, 1, None)]


def test_one_study_is_the_whole_folder_and_two_patients_are_refused_by_the_study_list(tmp_path):
    patient = make_study(tmp_path)
    (only,) = list_studies(patient)
    assert only.index == 1 and only.n_series == 3 and only.days_since_first == 0
    other = {"PatientID": "MRN0815", "StudyInstanceUID": generate_uid(), "StudyDate": "20200101"}
    write_series(patient / "other" / "5 t2", truth_volume(seed=5), number=5, description="T2_TSE", extra=other)
    with pytest.raises(PatientInputError, match="2 different patients") as refused:
        list_studies(patient)
    assert_no_phi(str(refused.value), extra=("MRN0815", "20200101"))


def test_checksum_changes_with_the_bytes(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    before = inventory_study(patient).series[0]
    path = before.files[4]
    dataset = pydicom.dcmread(path)
    dataset.RescaleIntercept = "-99"
    dataset.save_as(path)
    after = inventory_study(patient).series[0]
    assert after.series_key == before.series_key and after.checksum != before.checksum


def test_choice_picks_t2_by_tags_and_explains(tmp_path):
    patient = make_study(tmp_path)
    # a description that claims T2 does not make a T1 series T2-weighted
    write_series(
        patient / STUDY_FOLDER / "9",
        truth_volume(seed=4),
        number=9,
        description="T2 (mislabelled)",
        echo_time=10,
        repetition_time=500,
    )
    write_series(
        patient / STUDY_FOLDER / "11",
        truth_volume(seed=5),
        number=11,
        description="T2_POST",
        extra={"ContrastBolusAgent": "GADOLINIUM"},
    )
    choice = choose_t2_series(inventory_study(patient))
    assert choice.series.series_number == 3
    assert choice.reason.startswith('series #3 "T2_SPIR": TE 85 ms >= 60, TR 1800 ms >= 800, spin echo, 12 slices')
    assert '#1 "T1_DUAL_IN_PHASE" TE 4.6 ms < 60, TR 200 ms < 800' in choice.reason
    assert "diffusion (b = 800)" in choice.reason and "contrast agent" in choice.reason
    assert '#9 "T2 (mislabelled)" TE 10 ms < 60' in choice.reason
    accepted = {c["series_number"]: c["accepted"] for c in choice.candidates}
    assert accepted == {1: False, 3: True, 7: False, 9: False, 11: False}
    assert choice.t2_score > 0 and all(c["score"] is None for c in choice.candidates if not c["accepted"])
    json.dumps(choice.candidates)


def test_diffusion_is_recognized_by_sequence_name_and_private_b_value(tmp_path):
    patient = tmp_path / "p"
    write_series(patient / "a", truth_volume(), number=1, sequence_name="*ep_b0_1000")
    write_series(patient / "b", truth_volume(seed=1), number=2, sequence_name="ep2d", scanning_sequence="EP")
    for path in (patient / "b").iterdir():  # Philips private DiffusionBFactor
        dataset = pydicom.dcmread(path)
        dataset.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
        dataset.add_new((0x2001, 0x1003), "FL", 600.0)
        dataset.save_as(path)
    with pytest.raises(PatientInputError) as raised:
        choose_t2_series(inventory_study(patient))
    message = str(raised.value)
    assert "no T2-weighted series" in message
    assert "diffusion sequence '*ep_b0_1000'" in message and "diffusion (b = 600)" in message


def test_prefers_the_axial_spin_echo_t2(tmp_path):
    patient = tmp_path / "p"
    write_series(
        patient / "cor",
        truth_volume(),
        number=2,
        description="HASTE_COR",
        orientation=(1, 0, 0, 0, 0, -1),
        scanning_sequence="GR",
        echo_time=200,
    )
    write_series(patient / "ax", truth_volume(seed=1), number=5, description="T2_TSE_AX")
    choice = choose_t2_series(inventory_study(patient))
    assert choice.series.series_number == 5
    assert '#2 "HASTE_COR" T2-weighted but scored' in choice.reason


def test_a_repeated_t2_is_preferred_to_the_first_run_and_fat_suppression_to_none(tmp_path):
    """Between equal candidates the later series wins (a sequence is repeated when the first run
    failed); a fat-suppressed T2 (the study's T2-SPIR) beats one without, whatever their order."""
    patient = tmp_path / "p"
    write_series(patient / "first", truth_volume(), number=4, description="T2_TSE_AX")
    write_series(patient / "repeat", truth_volume(seed=1), number=9, description="T2_TSE_AX")
    choice = choose_t2_series(inventory_study(patient))
    assert choice.series.series_number == 9
    assert '#4 "T2_TSE_AX" T2-weighted and scored' in choice.reason and "the later series is preferred" in choice.reason
    write_series(patient / "fs", truth_volume(seed=2), number=2, description="t2_tse_fs_tra")
    choice = choose_t2_series(inventory_study(patient))
    assert choice.series.series_number == 2
    assert '#9 "T2_TSE_AX" T2-weighted but scored' in choice.reason


def test_no_t2_lists_what_was_found(tmp_path):
    patient = tmp_path / PATIENT_FOLDER
    write_series(
        patient / STUDY_FOLDER / "1",
        truth_volume(),
        number=1,
        description="T1_DUAL_IN_PHASE",
        echo_time=4.6,
        repetition_time=200,
    )
    with pytest.raises(PatientInputError) as raised:
        choose_t2_series(inventory_study(patient))
    message = str(raised.value)
    assert "no T2-weighted series" in message and '#1 "T1_DUAL_IN_PHASE" TE 4.6 ms TR 200 ms' in message
    assert_no_phi(message)


# Each broken study: (how to break it, words the message must contain). All raise PatientInputError.
def _empty(root):
    patient = root / PATIENT_FOLDER
    (patient / STUDY_FOLDER).mkdir(parents=True)
    (patient / ".complete").write_bytes(b"")
    return patient


def _non_dicom_file(root):
    patient = make_study(root)
    (patient / STUDY_FOLDER / T2_FOLDER / "notes MRN4711.txt").write_text("hello")
    return patient


def _cut_pixel_data(root):
    patient = make_study(root)
    path = sorted((patient / STUDY_FOLDER / T2_FOLDER).iterdir())[5]
    path.write_bytes(path.read_bytes()[:-40])
    return patient


def _cut_header(root):
    patient = make_study(root)
    path = sorted((patient / STUDY_FOLDER / "1 T1 in phase").iterdir())[2]  # any series, not only T2
    path.write_bytes(path.read_bytes()[:300])
    return patient


def _cut_inside_meta(root):
    patient = make_study(root)
    path = sorted((patient / STUDY_FOLDER / T2_FOLDER).iterdir())[0]
    path.write_bytes(path.read_bytes()[:150])
    return patient


def _missing_position(root):
    return make_study(root, t2={"per_slice": {4: {"ImagePositionPatient": None}}})


def _missing_orientation(root):
    return make_study(root, t2={"per_slice": {4: {"ImageOrientationPatient": None}}})


def _missing_pixel_spacing(root):
    return make_study(root, t2={"per_slice": {4: {"PixelSpacing": None}}})


def _missing_slice(root):
    return make_study(root, t2={"drop_slices": (6,)})


def _duplicate_position(root):
    return make_study(root, t2={"per_slice": {6: {"ImagePositionPatient": ["-100", "-80", "45"]}}})


def _one_slice(root):
    patient = make_study(root, with_others=False)
    for path in sorted((patient / STUDY_FOLDER / T2_FOLDER).iterdir())[1:]:
        path.unlink()
    return patient


def _mixed_studies_folder(root):
    patient = make_study(root)
    write_series(
        patient / STUDY_FOLDER / T2_FOLDER,
        truth_volume(slices=3),
        number=4,
        description="T2_SPIR_REPEAT",
        name_prefix="REP",
        extra={"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.99"},
    )
    return patient


def _inconsistent_orientation(root):
    return make_study(root, t2={"per_slice": {3: {"ImageOrientationPatient": ["1", "0", "0", "0", "0.9", "0.43589"]}}})


def _inconsistent_spacing(root):
    return make_study(root, t2={"per_slice": {3: {"PixelSpacing": ["1.5", "1.3"]}}})


def _inconsistent_size(root):
    patient = make_study(root)
    path = sorted((patient / STUDY_FOLDER / T2_FOLDER).iterdir())[2]
    dataset = pydicom.dcmread(path)
    dataset.Rows, dataset.Columns = 16, 12  # same byte count, other matrix
    dataset.save_as(path)
    return patient


def _same_instance_other_pixels(root):
    patient = make_study(root)
    folder = patient / STUDY_FOLDER / T2_FOLDER
    dataset = pydicom.dcmread(sorted(folder.iterdir())[4])
    dataset.PixelData = (dataset.pixel_array + 1).astype(dataset.pixel_array.dtype).tobytes()
    dataset.save_as(folder / "ZZ_resent.dcm")
    return patient


BROKEN_STUDIES = {
    "same_instance_other_pixels": (
        _same_instance_other_pixels,
        ["same SOPInstanceUID with different pixel data", "file 13 of 13", "file 5 of 13", 'series #3 "T2_SPIR"'],
    ),
    "empty": (_empty, ["no DICOM image files"]),
    "non_dicom_file": (_non_dicom_file, ["not DICOM", 'series #3 "T2_SPIR"', "file 13 of 13"]),
    "cut_pixel_data": (_cut_pixel_data, ["truncated", "PixelData is cut short", "of 12", 'series #3 "T2_SPIR"']),
    "cut_header": (_cut_header, ["truncated", 'series #1 "T1_DUAL_IN_PHASE"']),
    "cut_inside_meta": (_cut_inside_meta, ["truncated", "file 1 of 12"]),
    "missing_position": (_missing_position, ["ImagePositionPatient", "file 8 of 12", 'series #3 "T2_SPIR"']),
    "missing_orientation": (_missing_orientation, ["ImageOrientationPatient", 'series #3 "T2_SPIR"']),
    "missing_pixel_spacing": (_missing_pixel_spacing, ["PixelSpacing", 'series #3 "T2_SPIR"']),
    "missing_slice": (_missing_slice, ["missing slice", "10.00 mm", "median spacing 5.00 mm"]),
    "duplicate_position": (_duplicate_position, ["duplicate slice position", "files 6 and 7 of 12"]),
    "one_slice": (_one_slice, ["1 slice, need >= 10", 'series #3 "T2_SPIR"']),
    "mixed_studies_folder": (
        _mixed_studies_folder,
        ["mixes 2 studies", 'series #3 "T2_SPIR"', 'series #4 "T2_SPIR_REPEAT"'],
    ),
    "inconsistent_orientation": (_inconsistent_orientation, ["inconsistent ImageOrientationPatient"]),
    "inconsistent_spacing": (_inconsistent_spacing, ["inconsistent PixelSpacing", "1.5x1.3 mm"]),
    "inconsistent_size": (_inconsistent_size, ["inconsistent Rows x Columns", "16x12"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_STUDIES))
def test_broken_study_raises_a_clear_phi_free_error(tmp_path, case):
    make, expected = BROKEN_STUDIES[case]
    patient = make(tmp_path)
    with pytest.raises(PatientInputError) as raised:
        ingest(patient)
    message = str(raised.value)
    for words in expected:
        assert words in message, f"{case}: {words!r} not in {message!r}"
    assert_no_phi(message, extra=("notes", "IM00"))


def test_a_broken_scout_does_not_block_the_study(tmp_path):
    # a three-plane localizer is one series with several orientations: record it, don't fail
    patient = make_study(tmp_path, with_others=False)
    write_series(
        patient / STUDY_FOLDER / "0 loc",
        truth_volume(slices=3, seed=9),
        number=0,
        description="LOC",
        echo_time=2,
        repetition_time=5,
        per_slice={1: {"ImageOrientationPatient": ["1", "0", "0", "0", "0", "-1"]}},
    )
    inventory, choice, image = ingest(patient)
    scout = next(s for s in inventory.series if s.series_number == 0)
    assert "inconsistent ImageOrientationPatient" in scout.geometry_problem
    assert choice.series.series_number == 3 and image.shape == (16, 12, 12)


def test_exported_media_companions_and_second_copies_are_left_out_and_counted(tmp_path):
    """What a CD/PACS export carries besides the series: a README and a viewer's files in folders
    without images, and an instance exported twice. The study reads as without them."""
    patient = make_study(tmp_path)
    plain_inventory, plain_choice, plain = ingest(patient)
    (patient / "README.TXT").write_text("exported by PACS for MRN4711\n")
    (patient / STUDY_FOLDER / "VIEWER").mkdir()
    (patient / STUDY_FOLDER / "VIEWER" / "viewer.exe").write_bytes(b"MZ\x90\x00 not DICOM")
    t2_folder = patient / STUDY_FOLDER / T2_FOLDER
    for path in sorted(t2_folder.iterdir())[:2]:
        shutil.copy(path, t2_folder / f"copy of {path.name}")

    inventory, choice, image = ingest(patient)

    assert (inventory.n_companion_files, inventory.n_duplicate_files) == (2, 2)
    record = inventory.to_record()
    assert (record["n_companion_files"], record["n_duplicate_files"]) == (2, 2)
    assert "n_companion_files" not in plain_inventory.to_record()  # ordinary studies' records unchanged
    assert choice.series.n_files == 12 and choice.series.checksum == plain_choice.series.checksum
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(plain.dataobj))
    assert np.allclose(image.affine, plain.affine)


def _pixel_less_object(path: Path, sop_class: str, like: Path, same_series: bool = False) -> None:
    reference = pydicom.dcmread(like, stop_before_pixels=True)
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = sop_class
    for keyword in ("PatientID", "StudyInstanceUID", *(["SeriesInstanceUID"] if same_series else [])):
        setattr(dataset, keyword, reference.get(keyword))
    dataset.SeriesInstanceUID = dataset.get("SeriesInstanceUID") or generate_uid()
    dataset.Modality, dataset.SeriesNumber, dataset.SeriesDescription = "MR", 99, "PhoenixZIPReport"
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def test_vendor_objects_without_pixels_are_skipped_but_a_cut_mr_slice_is_not(tmp_path):
    """Siemens CSA Non-Image (its own series), Philips private series data (inside the T2 series) and
    an encapsulated PDF: DICOM, but no slices. An MR image without pixels is a truncated slice."""
    patient = make_study(tmp_path, with_others=False)
    t2_folder = patient / STUDY_FOLDER / T2_FOLDER
    plain_inventory, plain_choice, plain = ingest(patient)
    like = next(t2_folder.iterdir())
    _pixel_less_object(patient / STUDY_FOLDER / "99 report" / "csa.dcm", "1.3.12.2.1107.5.9.1", like)
    _pixel_less_object(t2_folder / "XX_private.dcm", "1.3.46.670589.11.0.0.12.1", like, same_series=True)
    _pixel_less_object(patient / STUDY_FOLDER / "pdf" / "doc.dcm", "1.2.840.10008.5.1.4.1.1.104.1", like)

    inventory, choice, image = ingest(patient)

    assert [s.series_key for s in inventory.series] == [s.series_key for s in plain_inventory.series]
    assert choice.series.checksum == plain_choice.series.checksum
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(plain.dataobj))
    _pixel_less_object(t2_folder / "YY_cut.dcm", str(MRImageStorage), like, same_series=True)
    with pytest.raises(PatientInputError, match=r"truncated DICOM file: .* lacks Rows"):
        ingest(patient)


def test_a_non_dicom_file_beside_images_still_fails_the_study(tmp_path):
    # in a series folder it may be a broken transfer of that series: not a companion
    patient = make_study(tmp_path)
    (patient / STUDY_FOLDER / "1 T1 in phase" / "README.TXT").write_text("hello")
    with pytest.raises(PatientInputError, match="not DICOM"):
        ingest(patient)


def test_a_flat_export_with_every_series_in_one_folder_reads_as_the_foldered_study(tmp_path):
    patient = make_study(tmp_path)
    foldered_inventory, foldered_choice, foldered = ingest(patient)
    flat = patient / STUDY_FOLDER / "DICOM"
    flat.mkdir()
    for number, folder in enumerate(sorted(p for p in (patient / STUDY_FOLDER).iterdir() if p != flat)):
        for path in folder.iterdir():
            path.rename(flat / f"S{number}_{path.name}")
        folder.rmdir()

    inventory, choice, image = ingest(patient)

    assert [s.series_key for s in inventory.series] == [s.series_key for s in foldered_inventory.series]
    assert [s.checksum for s in inventory.series] == [s.checksum for s in foldered_inventory.series]
    assert choice.series.series_key == foldered_choice.series.series_key
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(foldered.dataobj))


def test_a_dual_echo_series_is_split_by_echo_and_the_t2_echo_chosen(tmp_path):
    """PD (TE 20) and T2 (TE 100) echoes in one series, at the same positions: one volume per echo,
    the T2 echo chosen by its own TE, and its volume is the one a single-echo series gives."""
    patient = make_study(tmp_path, with_others=False)
    t2_folder = patient / STUDY_FOLDER / T2_FOLDER
    single = ingest(patient)[2]
    uid = str(pydicom.dcmread(next(t2_folder.iterdir())).SeriesInstanceUID)
    write_series(t2_folder, truth_volume(slices=12, seed=5), echo_time=20.0, series_uid=uid, name_prefix="PD")

    inventory, choice, image = ingest(patient)

    echoes = sorted((s.echo_time_ms, s.description, s.n_files) for s in inventory.series)
    assert echoes == [(20.0, "T2_SPIR (echo 1 of 2)", 12), (85.0, "T2_SPIR (echo 2 of 2)", 12)]
    assert len({s.series_key for s in inventory.series}) == 2
    assert {s.uid_key for s in inventory.series} == {series_key_of(uid)}
    assert choice.series.echo_time_ms == 85.0 and "echo 2 of 2" in choice.reason
    assert "TE 20 ms < 60" in choice.reason  # the PD echo, rejected by its own TE
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(single.dataobj))
    assert np.allclose(image.affine, single.affine)


@pytest.mark.parametrize(
    ("second_type", "second_name", "first_type", "first_name"),
    [
        # Philips mDIXON written as one series: water and fat images at every position
        (["DERIVED", "PRIMARY", "F", "FAT"], "fat", ["DERIVED", "PRIMARY", "W", "WATER"], "water"),
        # magnitude and phase of one acquisition in one series (Philips "P_SE", Siemens "P")
        (["ORIGINAL", "PRIMARY", "P_SE", "P", "SE"], "phase", ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"], "magnitude"),
    ],
)
def test_a_series_of_two_image_types_at_the_same_positions_is_split_and_the_anatomy_chosen(
    tmp_path, second_type, second_name, first_type, first_name
):
    """Two kinds of image at every position of one series: one volume per ImageType (as dcm2niix
    splits them), the fat or phase volume rejected by its ImageType whatever its TE, and the chosen
    volume is the one a series of only those images gives."""
    patient = make_study(tmp_path, with_others=False, t2={"extra": {"ImageType": first_type}})
    t2_folder = patient / STUDY_FOLDER / T2_FOLDER
    single = ingest(patient)[2]
    uid = str(pydicom.dcmread(next(t2_folder.iterdir())).SeriesInstanceUID)
    write_series(t2_folder, truth_volume(seed=7), series_uid=uid, name_prefix="X", extra={"ImageType": second_type})
    inventory, choice, image = ingest(patient)

    assert sorted(s.description for s in inventory.series) == sorted(
        [f"T2_SPIR ({first_name})", f"T2_SPIR ({second_name})"]
    )
    assert [s.n_files for s in inventory.series] == [12, 12]
    assert len({s.series_key for s in inventory.series}) == 2 and {s.uid_key for s in inventory.series} == {
        series_key_of(uid)
    }
    assert choice.series.description == f"T2_SPIR ({first_name})"
    second_image_type = "\\".join(second_type)
    assert f'"T2_SPIR ({second_name})" {second_name} image (ImageType {second_image_type})' in choice.reason
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(single.dataobj))
    assert np.allclose(image.affine, single.affine)


def test_each_image_type_of_a_split_series_is_described_by_its_own_header(tmp_path):
    """A diffusion series holding b = 0 images and the b = 800 trace at every position (as Siemens
    writes it): split by ImageType, each part carries its own b-value, and neither is a T2."""
    patient = tmp_path / "p"
    uid = generate_uid()
    for prefix, image_type, b_value, seed in (
        ("B0", ["ORIGINAL", "PRIMARY", "M", "ND"], 0, 1),
        ("TR", ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"], 800, 2),
    ):
        write_series(
            patient / "dwi",
            truth_volume(seed=seed),
            number=7,
            description="ep2d_diff_b0_800",
            echo_time=80,
            repetition_time=4000,
            scanning_sequence="EP",
            sequence_name="*ep_b0_800",
            series_uid=uid,
            name_prefix=prefix,
            extra={"ImageType": image_type, "DiffusionBValue": b_value},
        )
    write_series(patient / "t2", truth_volume(seed=3), number=3)
    inventory = inventory_study(patient)
    parts = {s.description: s.diffusion_b_value for s in inventory.series if s.series_number == 7}
    assert parts == {
        "ep2d_diff_b0_800 (magnitude)": 0.0,
        "ep2d_diff_b0_800 (DERIVED\\PRIMARY\\DIFFUSION\\TRACEW)": 800.0,
    }
    choice = choose_t2_series(inventory)
    assert choice.series.series_number == 3
    assert "diffusion (b = 800)" in choice.reason and "diffusion sequence '*ep_b0_800'" in choice.reason


def test_an_image_type_that_varies_along_one_stack_does_not_split_the_series(tmp_path):
    """Slices at distinct positions whose ImageType differs (a vendor flag on some slices) are one
    volume: a split by ImageType needs images of several types at the same positions."""
    flagged = {k: {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]} for k in (0, 5)}
    patient = make_study(tmp_path, with_others=False, t2={"per_slice": flagged})
    inventory, _choice, image = ingest(patient)
    assert [(s.description, s.n_files) for s in inventory.series] == [("T2_SPIR", 12)]
    assert image.shape[2] == 12


def test_a_phase_series_of_its_own_is_not_taken_for_the_t2(tmp_path):
    """A phase series next to its magnitude series has the same TE, TR, description and slices;
    only ImageType tells them apart. Written first (lower series number), it must still lose."""
    patient = make_study(tmp_path, with_others=False, t2={"extra": {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}})
    write_series(
        patient / STUDY_FOLDER / "2 phase",
        truth_volume(seed=3),
        number=2,
        extra={"ImageType": ["ORIGINAL", "PRIMARY", "P", "ND"]},
    )
    choice = choose_t2_series(inventory_study(patient))
    assert choice.series.series_number == 3
    assert '#2 "T2_SPIR" phase image (ImageType ORIGINAL\\PRIMARY\\P\\ND)' in choice.reason


def write_t2_in_parts(patient: Path, parts: list[range], **tags_per_part: list) -> None:
    """The study's 24-slice T2 acquisition written again as one series per part (series 3, 4, ...):
    part i holds the slices in parts[i]; `tags_per_part[keyword][i]` is part i's value of a
    write_series argument."""
    folder = patient / STUDY_FOLDER / T2_FOLDER
    shutil.rmtree(folder)
    for i, keep in enumerate(parts):
        write_series(
            patient / STUDY_FOLDER / f"{3 + i} T2 part",
            truth_volume(slices=24),
            number=3 + i,
            drop_slices=tuple(k for k in range(24) if k not in keep),
            **{keyword: values[i] for keyword, values in tags_per_part.items()},
        )


def test_a_t2_written_as_two_series_one_after_another_is_joined(tmp_path):
    """A T2 acquired in two breath-holds and sent as two series (upper and lower abdomen): each part
    alone is a regular stack, half the liver. The joined series is chosen, and its volume is the one
    the acquisition written as one series gives, voxel for voxel, with the same affine."""
    patient = make_study(tmp_path, with_others=False, slices=24)
    single = ingest(patient)[2]
    write_t2_in_parts(patient, [range(0, 12), range(12, 24)])

    inventory, choice, image = ingest(patient)

    parts = [s for s in inventory.series if not s.part_keys]
    (joined,) = [s for s in inventory.series if s.part_keys]
    assert [(s.series_number, s.n_slices) for s in parts] == [(3, 12), (4, 12)]
    assert (joined.series_number, joined.description, joined.n_slices) == (3, "T2_SPIR (series #3 and #4 joined)", 24)
    assert joined.part_keys == tuple(s.series_key for s in parts)  # the lower part first
    assert inventory.n_files == 24  # the joined series adds no files
    assert choice.series == joined
    assert "joined from 2 series" in choice.reason and choice.reason.count("a part of the joined series chosen") == 2
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(single.dataobj))
    assert np.allclose(image.affine, single.affine, atol=1e-5)
    assert joined.to_record()["joined_from"] == list(joined.part_keys)
    assert "joined_from" not in parts[0].to_record()
    assert_no_phi(json.dumps(inventory.to_record()) + choice.reason)


def test_of_a_part_acquired_again_the_later_run_is_joined(tmp_path):
    """Upper and lower abdomen as series 3 and 4, the lower part acquired again after motion as
    series 5: #3 and #5 are joined; #4, overlapping #5, is left out."""
    patient = make_study(tmp_path, with_others=False, slices=24)
    single = ingest(patient)[2]
    write_t2_in_parts(patient, [range(0, 12), range(12, 24), range(12, 24)])

    inventory, choice, image = ingest(patient)

    by_number = {s.series_number: s for s in inventory.series if not s.part_keys}
    assert choice.series.part_keys == (by_number[3].series_key, by_number[5].series_key)
    assert choice.series.description == "T2_SPIR (series #3 and #5 joined)"
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(single.dataobj))
    assert len([s for s in inventory.series if s.part_keys]) == 1


def test_an_annotation_of_a_joined_series_must_reference_every_part(tmp_path):
    """A SEG or RT Structure Set drawn on one part covers only that part's stretch of the liver."""
    patient = make_study(tmp_path, with_others=False, slices=24)
    write_t2_in_parts(patient, [range(0, 12), range(12, 24)])
    (joined,) = [s for s in inventory_study(patient).series if s.part_keys]
    lower, upper = joined.part_keys
    annotations = tuple(
        AnnotationFile(Path(name), "seg", frozenset(keys))
        for name, keys in (("lower only", {lower}), ("both parts", {lower, upper}), ("other", {"0" * 16}))
    )
    found = liver_annotation(annotations, "seg", joined, lambda path: path.name, lambda _: {1: 1}, ("SEG", "SEGs of"))
    assert found == ("both parts", {1: 1})


@pytest.mark.parametrize(
    ("parts", "tags", "why"),
    [
        ([range(0, 14), range(12, 24)], {}, "overlapping parts: a repeat, or stations that would need blending"),
        ([range(0, 11), range(12, 24)], {}, "a slice missing between the parts"),
        ([range(0, 24, 2), range(1, 24, 2)], {}, "interleaved parts"),
        ([range(0, 12), range(12, 24)], {"echo_time": [85.0, 100.0]}, "another echo time"),
        (
            [range(0, 12), range(12, 24)],
            {"extra": [{}, {"FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.3"}]},
            "another frame of reference: the patient was positioned again",
        ),
    ],
)
def test_series_that_are_not_one_acquisition_one_after_another_are_not_joined(tmp_path, parts, tags, why):
    patient = make_study(tmp_path, with_others=False, slices=24)
    write_t2_in_parts(patient, parts, **tags)
    inventory, choice, image = ingest(patient)
    assert [s.series_number for s in inventory.series] == [3, 4], why
    assert not choice.series.part_keys and image.shape[2] == choice.series.n_slices < 24, why


def test_raw_dicom_without_preamble_is_read(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    for path in (patient / STUDY_FOLDER / T2_FOLDER).iterdir():
        dataset = pydicom.dcmread(path)
        dataset.file_meta, dataset.preamble = FileMetaDataset(), None
        dataset.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[128:132] != b"DICM"
    _inventory, _choice, image = ingest(patient)
    assert image.shape == (16, 12, 12)


# ---------------------------------------------------------------------------------------------
# The teammate's synthetic cohort (names contain "synth": `-k "not synth"` skips them)


@pytest.fixture(scope="module")
def synth_cohort(tmp_path_factory):
    synth = pytest.importorskip("hcc_assets.synthetic.cohort")
    out = tmp_path_factory.mktemp("synth")
    config = synth.SynthConfig(patients=2, seed=7, matrix=32, slices_min=12, slices_max=14, oblique_fraction=0.5)
    return out, synth.synthesize_cohort(out, config)


def test_synth_cohort_inventory_and_choice(synth_cohort):
    out, patients = synth_cohort
    for patient in patients:
        inventory = inventory_study(out / patient.patient_key)
        choice = choose_t2_series(inventory)
        assert choice.series.description == "T2_SPIR" and "TE" in choice.reason and "TR" in choice.reason
        assert all(s.geometry_problem is None for s in inventory.series)
        text = json.dumps(inventory.to_record()) + choice.reason + json.dumps(choice.candidates)
        for secret in (*patient.phi, patient.patient_key, "study_1"):
            assert secret not in text


def test_synth_broken_series_errors_name_no_phi(synth_cohort, tmp_path):
    out, patients = synth_cohort
    patient = patients[0]
    copy = tmp_path / patient.patient_key
    shutil.copytree(out / patient.patient_key, copy)
    t2_dir = copy / patient.t2_series_dir.relative_to(out / patient.patient_key)
    files = sorted(t2_dir.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    files[len(files) // 2].unlink()  # a slice missing in the middle (axial or oblique: z still orders)
    with pytest.raises(PatientInputError) as raised:
        ingest(copy)
    message = str(raised.value)
    assert "missing slice" in message and 'series #5 "T2_SPIR"' in message
    for secret in (*patient.phi, patient.patient_key, "study_1", "IM_"):
        assert secret not in message
