"""Reference masks from DICOM SEG objects (imaging/dicom_seg.py), written with highdicom on the
hand-written studies of test_dicom_series: the label volume a SEG drawn on the T2 series gives is the
one it was drawn from, on the classic and the enhanced form; SEGs of other series or of other
structures are ignored; ambiguous ones are refused."""

from __future__ import annotations

from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_seg import reference_mask_from_seg
from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
from hcc_assets.imaging.nifti import series_to_volume
from hcc_assets.synthetic.seg import LIVER, SPLEEN, seg_bytes
from hcc_assets_tests.imaging.test_dicom_series import STUDY_FOLDER, T2_FOLDER, assert_no_phi, make_study
from hcc_assets_tests.imaging.test_enhanced_mr import to_enhanced

LESION = (3, "Lesion", codes.SCT.Neoplasm)


def truth_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """liver 1, spleen 2 and a lesion 3 (inside the liver) on the volume's (columns, rows, slices) grid."""
    labels = np.zeros(shape, np.uint8)
    labels[2:9, 3:10, 2:8] = 1
    labels[11:15, 1:5, 4:10] = 2
    labels[4:6, 5:7, 4:6] = 3
    return labels


def write_seg(
    folder: Path,
    source_folder: Path,
    labels: np.ndarray,
    segments=(LIVER, SPLEEN),
    *,
    fractional: bool = False,
    name: str = "seg.dcm",
    masks: dict[int, np.ndarray] | None = None,
) -> Path:
    """A SEG (synthetic.seg) drawn on the one series in `source_folder`, saved as `folder`/`name`."""
    data = seg_bytes(
        source_folder,
        labels,
        series_uid=highdicom.UID(),
        sop_uid=highdicom.UID(),
        segments=segments,
        masks=masks,
        fractional=fractional,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def reference_of(patient: Path) -> np.ndarray | None:
    """What nifti_volume reads: the chosen T2's volume and the label volume of its SEG."""
    inventory = inventory_study(patient)
    series = choose_t2_series(inventory).series
    image, sources = series_to_volume(series)
    labels = reference_mask_from_seg(inventory.annotations, series, image, sources)
    assert labels is None or labels.shape == image.shape
    return labels


def test_a_seg_drawn_on_the_t2_series_gives_its_labels_and_others_are_ignored(tmp_path):
    patient = make_study(tmp_path)
    study = patient / STUDY_FOLDER
    labels = truth_labels((16, 12, 12))
    assert reference_of(patient) is None  # no SEG: no reference
    # drawn on other series or of other structures: not the T2's liver
    write_seg(study / "98 SEG T1", study / "1 T1 in phase", labels)
    write_seg(study / "97 SEG lesion", study / T2_FOLDER, labels, segments=(LESION,))
    assert reference_of(patient) is None
    # the reference: liver and spleen (and a lesion segment, left out), its frames in their own folder
    liver_with_lesion = (labels == 1) | (labels == 3)
    write_seg(
        study / "99 SEG", study / T2_FOLDER, labels, segments=(LIVER, SPLEEN, LESION), masks={1: liver_with_lesion}
    )
    found = reference_of(patient)
    assert found is not None and found.dtype == np.uint8
    # liver 1 (its lesion included, as drawn), spleen 2; the lesion segment itself is not read
    assert np.array_equal(found, np.where(labels == 3, 1, labels))


def test_a_seg_drawn_on_an_enhanced_t2_gives_the_same_labels(tmp_path):
    classic = make_study(tmp_path / "classic", with_others=False)
    enhanced = make_study(tmp_path / "enhanced", with_others=False)
    to_enhanced(enhanced / STUDY_FOLDER / T2_FOLDER)
    labels = truth_labels((16, 12, 12))
    for patient in (classic, enhanced):
        write_seg(patient / STUDY_FOLDER / "99 SEG", patient / STUDY_FOLDER / T2_FOLDER, labels)
    assert np.array_equal(reference_of(enhanced), reference_of(classic))
    assert set(np.unique(reference_of(enhanced))) == {0, 1, 2}


def test_a_fractional_seg_is_read_at_one_half(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    labels = truth_labels((16, 12, 12))
    write_seg(patient / STUDY_FOLDER / "99 SEG", patient / STUDY_FOLDER / T2_FOLDER, labels, fractional=True)
    assert np.array_equal(reference_of(patient), np.where(labels == 3, 0, labels))


def test_two_segs_of_the_liver_are_refused(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    labels = truth_labels((16, 12, 12))
    for name in ("a.dcm", "b.dcm"):
        write_seg(patient / STUDY_FOLDER / "99 SEG", patient / STUDY_FOLDER / T2_FOLDER, labels, name=name)
    with pytest.raises(
        PatientInputError, match=r'2 DICOM SEG objects label the liver of series #3 "T2_SPIR"'
    ) as raised:
        reference_of(patient)
    assert_no_phi(str(raised.value))


def test_a_seg_whose_liver_and_spleen_overlap_is_refused(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    labels = truth_labels((16, 12, 12))
    spleen_over_liver = (labels == 2) | (labels == 1)
    write_seg(
        patient / STUDY_FOLDER / "99 SEG", patient / STUDY_FOLDER / T2_FOLDER, labels, masks={2: spleen_over_liver}
    )
    with pytest.raises(PatientInputError, match="overlapping segments 1, 2"):
        reference_of(patient)


@pytest.mark.parametrize("t2_form", ["classic", "enhanced"])
def test_a_seg_without_source_references_is_placed_by_its_plane_positions(tmp_path, t2_form):
    """Some tools write SEG frames with plane positions but without DerivationImageSequence: the
    mask is placed by the SEG's own geometry, on the same voxels, or refused when they differ."""
    patient = make_study(tmp_path, with_others=False)
    if t2_form == "enhanced":
        to_enhanced(patient / STUDY_FOLDER / T2_FOLDER)
    labels = truth_labels((16, 12, 12))
    path = write_seg(patient / STUDY_FOLDER / "99 SEG", patient / STUDY_FOLDER / T2_FOLDER, labels)
    dataset = pydicom.dcmread(path)
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    # highdicom copied the test study's deliberately wrong SpacingBetweenSlices (99): a hint it trusts
    del dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices
    dataset.save_as(path)
    assert np.array_equal(reference_of(patient), np.where(labels == 3, 0, labels))

    # moved by half a pixel: not on the T2's voxels
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSequence[0]
        position.ImagePositionPatient = [
            float(position.ImagePositionPatient[0]) + 0.6,
            *position.ImagePositionPatient[1:],
        ]
    dataset.save_as(path)
    with pytest.raises(
        PatientInputError, match=r"cannot be placed on its images .*its voxels are not the T2 volume's voxels"
    ):
        reference_of(patient)
