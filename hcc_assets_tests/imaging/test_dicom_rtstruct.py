"""Reference masks from DICOM RT Structure Sets (imaging/dicom_rtstruct.py) on the hand-written
studies of test_dicom_series: closed planar contours around known voxels, in patient coordinates,
filled back onto exactly those voxels (a hole by even-odd); on an oblique T2 too; contours off the
slices, two structure sets of the liver and overlapping ROIs are refused; other ROIs ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_rtstruct import reference_mask_from_rtstruct
from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
from hcc_assets.imaging.geometry import LPS_TO_RAS
from hcc_assets.imaging.nifti import series_to_volume
from hcc_assets_tests.imaging.test_dicom_series import STUDY_FOLDER, assert_no_phi, make_study
from hcc_assets_tests.imaging.test_nifti import oblique_orientation

SHAPE = (16, 12, 12)  # the test study's T2 volume (columns, rows, slices)


def boxes() -> dict[int, list[tuple[int, tuple[int, int, int, int]]]]:
    """label -> contours as (slice k, (i0, i1, j0, j1)): the voxels i0..i1 x j0..j1 of slice k."""
    return {
        1: [(k, (2, 8, 3, 9)) for k in range(2, 8)] + [(4, (4, 5, 5, 6))],  # liver, with a hole on slice 4
        2: [(k, (11, 14, 1, 4)) for k in range(4, 10)],  # spleen
    }


def truth(contours=None, shape=SHAPE) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    for label, items in (contours or boxes()).items():
        for k, (i0, i1, j0, j1) in items:
            labels[i0 : i1 + 1, j0 : j1 + 1, k] ^= label  # the second contour on a slice is a hole
    return labels


def write_rtstruct(
    folder: Path,
    patient: Path,
    contours=None,
    names=("Liver", "Spleen"),
    *,
    shift_mm: float = 0.0,
    name: str = "rs.dcm",
) -> Path:
    """An RT Structure Set on the chosen T2 of `patient` whose ROI n has a closed planar contour
    around each box of `contours[n]`, drawn through the voxel corners (half a voxel outside the
    centres), in LPS millimetres; `shift_mm` moves every point along the slice normal."""
    inventory = inventory_study(patient)
    series = choose_t2_series(inventory).series
    image, _ = series_to_volume(series)
    to_patient = LPS_TO_RAS @ image.affine  # (i, j, k) -> LPS mm (LPS_TO_RAS is its own inverse)
    normal = to_patient[:3, 2] / np.linalg.norm(to_patient[:3, 2])
    t2 = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID = "RTSTRUCT", t2.PatientID, t2.StudyInstanceUID
    ds.SeriesInstanceUID, ds.StructureSetLabel = generate_uid(), "contours"
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = t2.SeriesInstanceUID
    referenced_study = Dataset()
    referenced_study.RTReferencedSeriesSequence = Sequence([referenced_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = t2.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([referenced_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, roi_contours = [], []
    for number, (label, items) in enumerate(sorted((contours or boxes()).items()), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, names[label - 1]
        rois.append(roi)
        sequence = []
        for k, (i0, i1, j0, j1) in items:
            corners = [(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5)]
            points = [to_patient[:3] @ np.array([i, j, k, 1.0]) + shift_mm * normal for i, j in corners]
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.4f}" for point in points for v in point]
            sequence.append(contour)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = Sequence(sequence)
        roi_contours.append(roi_contour)
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(rois), Sequence(roi_contours)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def reference_of(patient: Path) -> np.ndarray | None:
    inventory = inventory_study(patient)
    series = choose_t2_series(inventory).series
    image, _ = series_to_volume(series)
    return reference_mask_from_rtstruct(inventory.annotations, series, image)


@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_contours_are_filled_on_exactly_their_voxels_with_holes(tmp_path, oblique):
    t2 = {"orientation": oblique_orientation()} if oblique else {}
    patient = make_study(tmp_path, t2=t2)
    assert reference_of(patient) is None
    write_rtstruct(patient / STUDY_FOLDER / "98 RS other", patient, names=("Kidney", "Stomach"))
    assert reference_of(patient) is None  # no ROI named liver: not a reference
    write_rtstruct(patient / STUDY_FOLDER / "99 RS", patient)
    found = reference_of(patient)
    assert found is not None and found.dtype == np.uint8
    assert np.array_equal(found, truth())
    assert found[4, 5, 4] == 0 and found[3, 5, 4] == 1  # the hole on slice 4, the ring around it


def test_a_contour_off_the_slices_and_two_liver_structure_sets_are_refused(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    write_rtstruct(patient / STUDY_FOLDER / "99 RS", patient, shift_mm=2.5)  # half the 5 mm spacing
    with pytest.raises(PatientInputError, match="a contour of ROI 1 that lies on no slice of the series") as raised:
        reference_of(patient)
    assert_no_phi(str(raised.value))
    write_rtstruct(patient / STUDY_FOLDER / "99 RS", patient)
    write_rtstruct(patient / STUDY_FOLDER / "99 RS", patient, name="second.dcm")
    with pytest.raises(PatientInputError, match=r'2 RT Structure Sets contour the liver of series #3 "T2_SPIR"'):
        reference_of(patient)


def test_overlapping_liver_and_spleen_are_refused(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    overlapping = {1: [(5, (2, 8, 3, 9))], 2: [(5, (7, 10, 3, 9))]}
    write_rtstruct(patient / STUDY_FOLDER / "99 RS", patient, overlapping)
    with pytest.raises(PatientInputError, match="overlapping ROIs 1, 2"):
        reference_of(patient)
