"""Enhanced MR (one multi-frame file per series, per-frame functional groups) on the hand-written
studies of test_dicom_series: the same volume as the classic files and as highdicom reads it, the
same T2 choice, and clear refusals of files that hold more than one volume. Lossy series are
flagged and come second."""

from __future__ import annotations

from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from hcc_assets.core.errors import PatientInputError
from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
from hcc_assets.synthetic.enhanced import enhanced_mr_file
from hcc_assets_tests.imaging.test_dicom_series import (
    AXIAL,
    STUDY_FOLDER,
    T2_FOLDER,
    assert_no_phi,
    ingest,
    make_study,
    truth_volume,
    write_series,
    write_t2_in_parts,
)
from hcc_assets_tests.imaging.test_nifti import oblique_orientation

LEGACY_CONVERTED_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"


def to_enhanced(folder: Path) -> Path:
    """Replace the classic files of `folder` (one series) by one Enhanced MR file, frames in file-name
    order (not the spatial order: the reader must sort them by their PlanePositionSequence)."""
    files = sorted(folder.iterdir())
    target = folder / "enhanced.dcm"
    target.write_bytes(enhanced_mr_file([f.read_bytes() for f in files], generate_uid(), generate_uid()))
    for f in files:
        f.unlink()
    return target


def edit_frames(path: Path, edit) -> None:
    dataset = pydicom.dcmread(path)
    for index, frame in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        edit(index, frame)
    dataset.save_as(path)


def test_an_enhanced_series_gives_the_classic_volume(tmp_path):
    classic = make_study(tmp_path / "classic", with_others=False)
    enhanced = make_study(tmp_path / "enhanced", with_others=False)
    path = to_enhanced(enhanced / STUDY_FOLDER / T2_FOLDER)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    # the geometry and timing live in the functional groups only, as a scanner writes them
    assert header.SOPClassUID == pydicom.uid.EnhancedMRImageStorage and int(header.NumberOfFrames) == 12
    assert not {"EchoTime", "ImagePositionPatient", "PixelSpacing", "RescaleSlope"} & set(header.dir())
    assert "PlanePositionSequence" in header.PerFrameFunctionalGroupsSequence[0]

    _, classic_choice, classic_image = ingest(classic)
    inventory, choice, image = ingest(enhanced)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(classic_image.dataobj))
    assert np.array_equal(image.affine, classic_image.affine) and image.shape == (16, 12, 12)
    series = choice.series
    assert (series.n_files, series.n_slices, series.echo_time_ms, series.repetition_time_ms) == (1, 12, 85.0, 1800.0)
    assert series.pixel_spacing_mm == (1.5, 1.25) and series.slice_spacing_mm == pytest.approx(5.0)
    assert choice.t2_score == classic_choice.t2_score
    assert "12 slices, one multi-frame (enhanced) file" in choice.reason
    assert inventory.n_files == 1


@pytest.mark.parametrize(
    "orientation", [AXIAL, (1.0, 0.0, 0.0, 0.0, 0.0, -1.0), oblique_orientation()], ids=["axial", "coronal", "oblique"]
)
def test_an_enhanced_file_gives_the_volume_highdicom_reads(tmp_path, orientation):
    """Our functional-group reading (dicom_series.frame_views) against highdicom's own
    (Image.get_volume: frames sorted by PlanePositionSequence, rescale from
    PixelValueTransformationSequence, geometry from the shared and per-frame groups): the same
    voxels on the same grid, compared in the closest canonical orientation."""
    patient = make_study(tmp_path, with_others=False, t2={"orientation": orientation})
    path = to_enhanced(patient / STUDY_FOLDER / T2_FOLDER)
    # the study writes a deliberately wrong SpacingBetweenSlices (we measure the spacing from the
    # positions); highdicom takes it as a hint and refuses the volume, so it goes
    dataset = pydicom.dcmread(path)
    del dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices
    dataset.save_as(path)

    ours = nib.as_closest_canonical(ingest(patient)[2])
    volume = highdicom.Image.from_dataset(pydicom.dcmread(path), copy=False).get_volume(dtype=np.float32)
    theirs = nib.as_closest_canonical(volume.to_nibabel())

    assert ours.shape == theirs.shape == (16, 12, 12)
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    # highdicom normalises direction cosines written to 6 decimals; ours keeps them as written
    assert np.allclose(ours.affine, theirs.affine, atol=1e-2)


def test_a_legacy_converted_enhanced_file_is_read_too(tmp_path):
    classic = make_study(tmp_path / "classic", with_others=False)
    legacy = make_study(tmp_path / "legacy", with_others=False)
    path = to_enhanced(legacy / STUDY_FOLDER / T2_FOLDER)
    dataset = pydicom.dcmread(path)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = LEGACY_CONVERTED_ENHANCED_MR
    dataset.save_as(path)
    assert np.array_equal(np.asarray(ingest(legacy)[2].dataobj), np.asarray(ingest(classic)[2].dataobj))


def test_the_t2_series_is_chosen_from_an_enhanced_study_by_its_frame_tags(tmp_path):
    patient = make_study(tmp_path)
    for folder in (patient / STUDY_FOLDER).iterdir():
        to_enhanced(folder)
    choice = choose_t2_series(inventory_study(patient))
    assert choice.series.series_number == 3 and choice.series.n_files == 1
    by_number = {c["series_number"]: c for c in choice.candidates}
    assert by_number[1]["why"] == "TE 4.6 ms < 60, TR 200 ms < 800"  # from MREchoSequence, MRTiming...
    assert "diffusion (b = 800)" in by_number[7]["why"]  # from MRDiffusionSequence
    assert choice.reason.startswith('series #3 "T2_SPIR": TE 85 ms >= 60, TR 1800 ms >= 800, spin echo, 12 slices')


def _two_stacks(index, frame):
    frame.FrameContentSequence[0].StackID = "1" if index < 6 else "2"


def _repeated_index(index, frame):
    frame.FrameContentSequence[0].DimensionIndexValues = [1, min(index + 1, 11)]


def _two_dimensions(index, frame):
    frame.FrameContentSequence[0].DimensionIndexValues = [1 + index % 2, index + 1]


def _two_echo_times(index, frame):
    echo = pydicom.Dataset()
    echo.EffectiveEchoTime = 85.0 if index % 2 else 170.0
    frame.MREchoSequence = pydicom.Sequence([echo])


def _tilted_frame(index, frame):
    if index == 4:
        frame.PlaneOrientationSequence = pydicom.Sequence([pydicom.Dataset()])
        frame.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


NOT_ONE_VOLUME = {
    "two_stacks": (_two_stacks, "holds 2 stacks (StackID 1, 2); one file must hold one volume"),
    "repeated_index": (_repeated_index, "dimension indices do not form a volume: frames repeat"),
    "two_dimensions": (_two_dimensions, "dimension indices do not form a volume: they vary along 2 dimensions"),
    # frames of two echoes whose in-stack positions run over the whole file, not per echo
    "two_echo_times": (_two_echo_times, "InStackPositionNumber is not 1 to 6, once each"),
    "tilted_frame": (_tilted_frame, "inconsistent ImageOrientationPatient: frame 5 of 12 differs from frame 1"),
}


@pytest.mark.parametrize("case", sorted(NOT_ONE_VOLUME))
def test_a_multi_frame_file_that_is_not_one_volume_is_refused(tmp_path, case):
    edit, reason = NOT_ONE_VOLUME[case]
    patient = make_study(tmp_path)
    edit_frames(to_enhanced(patient / STUDY_FOLDER / T2_FOLDER), edit)
    with pytest.raises(PatientInputError) as raised:
        ingest(patient)
    message = str(raised.value)
    assert reason in message, message
    assert 'series #3 "T2_SPIR' in message and "unusable" in message
    assert_no_phi(message)


def test_a_lossless_t2_is_preferred_to_a_lossy_one_and_a_lossy_one_is_flagged(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    lossy = {"LossyImageCompression": "01", "LossyImageCompressionRatio": ["4", "2.5"]}
    # the lossy series would score higher (more slices, "T2" in its description)
    write_series(patient / "9", truth_volume(slices=14, seed=3), number=9, description="T2_TSE_AX", extra=lossy)
    inventory = inventory_study(patient)
    flagged = next(s for s in inventory.series if s.series_number == 9)
    assert flagged.lossy and flagged.lossy_ratio == pytest.approx(10.0)
    assert flagged.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    choice = choose_t2_series(inventory)
    assert choice.series.series_number == 3 and not choice.series.lossy
    assert '#9 "T2_TSE_AX" T2-weighted but lossy-compressed; a lossless series is preferred' in choice.reason

    for path in (patient / STUDY_FOLDER / T2_FOLDER).iterdir():
        path.unlink()
    (patient / STUDY_FOLDER / T2_FOLDER).rmdir()
    only_lossy = choose_t2_series(inventory_study(patient))
    assert only_lossy.series.series_number == 9
    assert "lossy-compressed (Explicit VR Little Endian, ratio 10): flagged" in only_lossy.reason


def test_a_multi_frame_file_without_functional_groups_is_refused(tmp_path):
    patient = make_study(tmp_path, with_others=False)
    path = to_enhanced(patient / STUDY_FOLDER / T2_FOLDER)
    dataset = pydicom.dcmread(path)
    del dataset.PerFrameFunctionalGroupsSequence
    dataset.save_as(path)
    with pytest.raises(PatientInputError, match=r"has 12 frames but no per-frame functional groups"):
        ingest(patient)


def test_a_two_echo_enhanced_file_gives_one_volume_per_echo_and_the_t2_echo_is_chosen(tmp_path):
    """PD (TE 20) and T2 (TE 85) frames in one Enhanced MR file, in-stack positions and dimension
    indices per echo (stack, position, echo): split by the frames' own MREchoSequence like the
    classic dual-echo series, voxel for voxel."""
    patient = make_study(tmp_path, with_others=False)
    folder = patient / STUDY_FOLDER / T2_FOLDER
    uid = str(pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID)
    write_series(folder, truth_volume(slices=12, seed=5), echo_time=20.0, series_uid=uid, name_prefix="PD")
    classic_inventory, classic_choice, classic_image = ingest(patient)
    path = to_enhanced(folder)
    dataset = pydicom.dcmread(path)
    frames = dataset.PerFrameFunctionalGroupsSequence
    echo_of = [float(frame.MREchoSequence[0].EffectiveEchoTime) for frame in frames]
    z_of = [float(frame.PlanePositionSequence[0].ImagePositionPatient[2]) for frame in frames]
    for index, frame in enumerate(frames):
        same_echo = sorted(z for z, te in zip(z_of, echo_of, strict=True) if te == echo_of[index])
        position = same_echo.index(z_of[index]) + 1
        frame.FrameContentSequence[0].InStackPositionNumber = position
        frame.FrameContentSequence[0].DimensionIndexValues = [1, position, 1 + (echo_of[index] == 85.0)]
    dataset.save_as(path)

    inventory, choice, image = ingest(patient)

    described = sorted((s.echo_time_ms, s.description, s.n_files, s.n_slices) for s in inventory.series)
    assert described == [(20.0, "T2_SPIR (echo 1 of 2)", 1, 12), (85.0, "T2_SPIR (echo 2 of 2)", 1, 12)]
    assert [s.series_key for s in inventory.series] == [s.series_key for s in classic_inventory.series]
    assert choice.series.series_key == classic_choice.series.series_key and choice.series.echo_time_ms == 85.0
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(classic_image.dataobj))
    assert np.array_equal(image.affine, classic_image.affine)


def with_phase_frames(folder: Path, phase_type: list[str]) -> tuple[Path, list[list[str]]]:
    """Add phase images at the positions of the magnitude series in `folder`, then make the whole
    series one Enhanced MR file; returns it and the ImageType of each frame (file-name order)."""
    uid = str(pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID)
    write_series(folder, truth_volume(seed=7), series_uid=uid, name_prefix="PH", extra={"ImageType": phase_type})
    frame_types = [list(pydicom.dcmread(f, stop_before_pixels=True).ImageType) for f in sorted(folder.iterdir())]
    return to_enhanced(folder), frame_types


def test_magnitude_and_phase_frames_of_one_enhanced_file_are_split_and_the_magnitude_chosen(tmp_path):
    """Magnitude and phase frames at every position of one Enhanced MR file, told apart only by their
    own MRImageFrameTypeSequence (FrameType, ComplexImageComponent) while the file's ImageType says
    MIXED: one volume per frame type, the phase volume rejected, and the magnitude volume voxel for
    voxel the one a file of magnitude frames alone gives."""
    magnitude_type = ["ORIGINAL", "PRIMARY", "M_SE", "M"]
    patient = make_study(tmp_path, with_others=False, t2={"extra": {"ImageType": magnitude_type}})
    folder = patient / STUDY_FOLDER / T2_FOLDER
    single_inventory, _, single = ingest(patient)
    path, frame_types = with_phase_frames(folder, ["ORIGINAL", "PRIMARY", "P_SE", "P"])
    dataset = pydicom.dcmread(path)
    dataset.ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "MIXED"]
    del dataset.SharedFunctionalGroupsSequence[0].MRImageFrameTypeSequence
    frames = dataset.PerFrameFunctionalGroupsSequence
    z_of = [float(frame.PlanePositionSequence[0].ImagePositionPatient[2]) for frame in frames]
    for index, frame in enumerate(frames):
        frame_type = pydicom.Dataset()
        frame_type.FrameType = frame_types[index]
        frame_type.ComplexImageComponent = "PHASE" if "P" in frame_types[index] else "MAGNITUDE"
        frame.MRImageFrameTypeSequence = pydicom.Sequence([frame_type])
        same_type = sorted(z for z, kind in zip(z_of, frame_types, strict=True) if kind == frame_types[index])
        position = same_type.index(z_of[index]) + 1
        frame.FrameContentSequence[0].InStackPositionNumber = position
        frame.FrameContentSequence[0].DimensionIndexValues = [1, position, 1 + ("P" in frame_types[index])]
    dataset.save_as(path)

    inventory, choice, image = ingest(patient)

    described = sorted((s.description, s.image_type, s.n_files, s.n_slices) for s in inventory.series)
    assert described == [
        ("T2_SPIR (magnitude)", "ORIGINAL\\PRIMARY\\M_SE\\M\\MAGNITUDE", 1, 12),
        ("T2_SPIR (phase)", "ORIGINAL\\PRIMARY\\P_SE\\P\\PHASE", 1, 12),
    ]
    assert {s.uid_key for s in inventory.series} == {single_inventory.series[0].uid_key}
    assert choice.series.description == "T2_SPIR (magnitude)"
    assert '"T2_SPIR (phase)" phase image (ImageType ORIGINAL\\PRIMARY\\P_SE\\P\\PHASE)' in choice.reason
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(single.dataobj))
    assert np.array_equal(image.affine, single.affine)


def test_frames_of_two_types_whose_positions_run_over_the_whole_file_are_refused(tmp_path):
    """The same file with in-stack positions numbered over all 24 frames, not per frame type: each
    type's frames are not one volume's, and the patient fails with the reason."""
    patient = make_study(tmp_path, with_others=False, t2={"extra": {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}})
    path, frame_types = with_phase_frames(patient / STUDY_FOLDER / T2_FOLDER, ["ORIGINAL", "PRIMARY", "P", "ND"])

    def per_frame_type(index, frame):
        frame_type = pydicom.Dataset()
        frame_type.FrameType = frame_types[index]
        frame.MRImageFrameTypeSequence = pydicom.Sequence([frame_type])

    edit_frames(path, per_frame_type)
    with pytest.raises(PatientInputError) as raised:
        ingest(patient)
    message = str(raised.value)
    assert "InStackPositionNumber is not 1 to 12, once each" in message and "T2_SPIR (magnitude)" in message, message
    assert_no_phi(message)


def test_a_t2_sent_as_two_enhanced_files_one_per_breath_hold_is_joined(tmp_path):
    """Each part of the acquisition one Enhanced MR file of its own series: joined frame by frame into
    the volume the acquisition written as one series of classic files gives."""
    patient = make_study(tmp_path, with_others=False, slices=24)
    single = ingest(patient)[2]
    write_t2_in_parts(patient, [range(0, 12), range(12, 24)])
    for part in ("3 T2 part", "4 T2 part"):
        to_enhanced(patient / STUDY_FOLDER / part)

    _inventory, choice, image = ingest(patient)

    assert (choice.series.n_files, choice.series.n_slices, len(choice.series.part_keys)) == (2, 24, 2)
    assert "joined from 2 series" in choice.reason
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(single.dataobj))
    assert np.allclose(image.affine, single.affine, atol=1e-5)
