"""Each kind of bad study fails its own partition with a clear, PHI-free message."""

import io
import re
import shutil

import pydicom
import pytest
from pydicom.uid import generate_uid

from hcc_assets.imaging.dicom_series import inventory_study
from hcc_assets.lake import DataLake
from hcc_assets.synthetic.enhanced import enhanced_mr_file
from hcc_assets_tests.defs.helpers import failure_message, in_memory_instance, ingest_patient, make_lake, register_all


def _t2_files(folder):
    t2 = next(s for s in inventory_study(folder).series if (s.echo_time_ms or 0) > 60)
    return sorted(t2.files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation))


def _truncate(folder):
    victim = _t2_files(folder)[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _non_dicom(folder):
    (_t2_files(folder)[0].parent / "notes.txt").write_text("radiologist notes, not an image\n")


def _no_position(folder):
    victim = _t2_files(folder)[4]
    ds = pydicom.dcmread(victim)
    del ds.ImagePositionPatient
    ds.save_as(victim)


def _missing_middle_slice(folder):
    files = _t2_files(folder)
    files[len(files) // 2].unlink()


def _no_t2(folder):
    shutil.rmtree(_t2_files(folder)[0].parent)


def _one_slice(folder):
    for f in _t2_files(folder)[1:]:
        f.unlink()


def _mixed_studies(folder):
    """Files of another study of this patient in the T2 folder (a flat folder of one study is fine)."""
    t2_dir = _t2_files(folder)[0].parent
    t1 = next(s for s in inventory_study(folder).series if (s.echo_time_ms or 99) < 10)
    for i, f in enumerate(t1.files):
        dataset = pydicom.dcmread(f)
        dataset.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77"
        dataset.save_as(t2_dir / f"mixed_{i}.dcm")


def _two_patients(folder):
    """Another patient's study copied into this drop folder (the two differ in PatientID)."""
    other = next(
        d for d in sorted(folder.parent.iterdir()) if d.is_dir() and d != folder and not d.name.startswith("BADCASE")
    )
    shutil.copytree(other / "study_1", folder / "study_2")


def _enhanced_t2(folder, edit):
    """The T2 series as one Enhanced MR file, then `edit(index, frame item)` on each frame."""
    files = _t2_files(folder)
    data = enhanced_mr_file([f.read_bytes() for f in files], generate_uid(), generate_uid())
    for f in files:
        f.unlink()
    dataset = pydicom.dcmread(io.BytesIO(data))
    for index, frame in enumerate(dataset.PerFrameFunctionalGroupsSequence):
        edit(index, frame.FrameContentSequence[0])
    dataset.save_as(files[0].parent / "enhanced.dcm")


def _two_stacks(folder):
    _enhanced_t2(folder, lambda index, content: setattr(content, "StackID", "1" if index % 2 else "2"))


def _repeated_dimension_index(folder):
    _enhanced_t2(folder, lambda index, content: setattr(content, "DimensionIndexValues", [1, 1 + index // 2]))


def _empty(folder):
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / ".complete").touch()


CASES = {
    "truncated": (_truncate, r"truncat"),
    "non_dicom": (_non_dicom, r"not (a )?DICOM"),
    "no_position": (_no_position, r"ImagePositionPatient"),
    "missing_slice": (_missing_middle_slice, r"missing|gap"),
    "no_t2": (_no_t2, r"T2"),
    "one_slice": (_one_slice, r"1 slice|slices"),
    "mixed_studies": (_mixed_studies, r"one folder mixes 2 studies"),
    "empty": (_empty, r"no DICOM"),
    "two_patients": (_two_patients, r"2 different patients \(PatientID differs"),
    "enhanced_two_stacks": (_two_stacks, r"multi-frame\) holds 2 stacks"),
    "enhanced_bad_dimension_index": (_repeated_dimension_index, r"dimension indices do not form a volume"),
}


def test_bad_inputs_fail_alone_with_clear_phi_free_errors(incoming_copy, tmp_path):
    incoming, patients = incoming_copy
    good = patients[0]
    bad_keys = {}
    for i, (name, (corrupt, _)) in enumerate(CASES.items()):
        source = patients[1 + i % (len(patients) - 1)]
        target = incoming / f"BADCASE{i}"
        shutil.copytree(incoming / source.patient_key, target)
        corrupt(target)
        bad_keys[name] = target.name
    lake = make_lake(tmp_path, incoming)
    data_lake = DataLake(lake.root)
    phi = {s for p in patients for s in p.phi} | {p.patient_key for p in patients} | set(bad_keys.values())
    with in_memory_instance() as instance:
        register_all(instance, lake)
        for name, (_, cause) in CASES.items():
            pid = lake.pseudonym(bad_keys[name])
            result = ingest_patient(instance, lake, pid, raise_on_error=False)
            assert not result.success, name
            message = failure_message(result)
            assert pid in message, (name, message)
            assert re.search(cause, message, re.IGNORECASE), (name, message)
            assert not [s for s in phi if s in message], (name, message)
            # nothing left under an output name, no rows claiming this patient
            assert not data_lake.exists(data_lake.patient_file(pid, "nifti_volume.nii.gz")), name
            assert not data_lake.exists(data_lake.patient_file(pid, "preprocessed_volume.nii.gz")), name
            assert lake.store.query("SELECT count(*) FROM volumes WHERE patient_id = ?", [pid]).item() == 0, name
        # other patients carry on
        assert ingest_patient(instance, lake, lake.pseudonym(good.patient_key)).success


@pytest.mark.parametrize("name", ["truncated", "missing_slice"])
def test_a_study_that_breaks_after_ingest_is_forgotten(incoming_copy, tmp_path, name):
    incoming, patients = incoming_copy
    lake = make_lake(tmp_path, incoming)
    key = patients[2].patient_key
    with in_memory_instance() as instance:
        register_all(instance, lake)
        pid = lake.pseudonym(key)
        assert ingest_patient(instance, lake, pid).success
        data_lake = DataLake(lake.root)
        figures = [
            data_lake.patient_figure(pid, asset, "mid_slice") for asset in ("nifti_volume", "preprocessed_volume")
        ]
        assert all(data_lake.exists(figure) for figure in figures)
        CASES[name][0](incoming / key)
        assert not ingest_patient(instance, lake, pid, raise_on_error=False).success
        assert lake.store.query("SELECT count(*) FROM volumes WHERE patient_id = ?", [pid]).item() == 0
        assert not data_lake.exists(data_lake.patient_file(pid, "nifti_volume.nii.gz"))
        assert not any(data_lake.exists(figure) for figure in figures)  # no preview of a volume that is gone
