"""The DICOM receiver, run as `hcc-assets receive` in a subprocess and fed by pynetdicom's SCU."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from hcc_assets.intake.dropzone import scan_drop_zone
from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort

PROJECT = Path(__file__).resolve().parents[2]
CONFIG = SynthConfig(patients=2, seed=17, matrix=32, slices_min=5, slices_max=6)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    out = tmp_path_factory.mktemp("sent")
    patients = synthesize_cohort(out, CONFIG)
    return [(p, sorted((out / p.patient_key / "study_1").rglob("*.dcm"))) for p in patients]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def receiver(tmp_path: Path, incoming: Path):
    """Start the receiver; yields (port, log path). The log is complete after the block."""
    port, log_path = free_port(), tmp_path / "receiver.log"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hcc_assets.cli",
                "receive",
                "--port",
                str(port),
                "--ae-title",
                "HCC_ASSETS",
                "--out",
                str(incoming),
                "--allowed-callers",
                "TESTSCU",
            ],
            cwd=PROJECT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "receiver did not start listening"
            time.sleep(0.2)
        yield port, log_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def associate(port: int, calling: str = "TESTSCU"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="HCC_ASSETS")


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def assert_no_phi(log_path: Path, patients) -> None:
    text = log_path.read_text()
    for patient in patients:
        for value in patient.phi:
            assert value not in text, "the receiver logged PHI"


def test_received_study_lands_whole_and_the_sensor_picks_it_up(studies, tmp_path):
    import dagster as dg

    from hcc_assets.defs.resources import LakeResource
    from hcc_assets.defs.sensors import incoming_scans_sensor

    patient, files = studies[0]
    incoming = tmp_path / "incoming"
    with receiver(tmp_path, incoming) as (port, log_path):
        assoc = associate(port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        assoc.release()
        folder = incoming / patient.patient_key
        assert wait_for(lambda: (folder / ".complete").exists()), log_path.read_text()
    received = sorted(folder.rglob("*.dcm"))
    assert len(received) == len(files)
    assert sorted(p.name for p in folder.glob("study_1/series_*")) == ["series_3", "series_4", "series_5"]
    for path in received:
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm" and path.parent.name == f"series_{ds.SeriesNumber}"
        assert path.relative_to(folder).parts[0] == "study_1"
    assert not any((incoming / ".receiving").iterdir())
    [ready] = scan_drop_zone(incoming)
    assert ready.source_key == patient.patient_key and ready.complete_by == "marker"
    assert f"stored {len(files)} file(s) in 1 study(ies) of 1 patient(s)" in log_path.read_text()
    assert_no_phi(log_path, [patient])

    lake = LakeResource(root=str(tmp_path / "lake"), incoming=str(incoming), quiet_seconds=3600)
    with dg.instance_for_test() as instance:
        result = incoming_scans_sensor(dg.build_sensor_context(instance=instance, resources={"lake": lake}))
        assert [r.partition_key for r in result.run_requests] == [lake.pseudonym(patient.patient_key)]
        assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [
            [lake.pseudonym(patient.patient_key)]
        ]


def test_unknown_caller_is_refused_and_an_aborted_association_leaves_nothing(studies, tmp_path):
    (first, _), (second, files) = studies
    incoming = tmp_path / "incoming"
    with receiver(tmp_path, incoming) as (port, log_path):
        intruder = associate(port, calling="INTRUDER")
        assert intruder.is_rejected and not intruder.is_established

        assoc = associate(port)
        assert assoc.is_established
        for path in files[:4]:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
        assert wait_for(lambda: len(list((incoming / ".receiving").rglob("*.dcm"))) == 4)
        assoc.abort()
        assert wait_for(lambda: "discarded 4 received file(s)" in log_path.read_text()), log_path.read_text()
        assert not any((incoming / ".receiving").iterdir())
        assert [p.name for p in incoming.iterdir() if not p.name.startswith(".")] == []
        assert scan_drop_zone(incoming, quiet_seconds=0) == []
    text = log_path.read_text()
    assert "rejected" in text and "receiver stopped" in text
    assert_no_phi(log_path, [first, second])


def test_a_later_study_of_the_same_patient_becomes_study_2_and_a_resend_merges(studies, tmp_path):
    """In-process receiver: a second delivery for a known patient goes next to the first."""
    from pydicom.uid import generate_uid

    from hcc_assets.intake.receiver import Receiver

    patient, files = studies[1]
    incoming = tmp_path / "incoming"
    server = Receiver(incoming, allowed_callers=["TESTSCU"], port=0)
    server.start()
    try:

        def send(datasets) -> None:
            assoc = associate(server.port)
            assert assoc.is_established
            for ds in datasets:
                assert assoc.send_c_store(ds).Status == 0
            assoc.release()

        folder = incoming / patient.patient_key
        send([pydicom.dcmread(p) for p in files[:3]])
        assert wait_for(lambda: (folder / ".complete").exists())
        send([pydicom.dcmread(p) for p in files])  # a resend of the whole study, merged
        later = []
        study, series = generate_uid(), {}
        for path in files[:2]:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
            ds.SOPInstanceUID = generate_uid()
            later.append(ds)
        send(later)
        assert wait_for(lambda: len(list(folder.glob("study_2/*/*.dcm"))) == 2 and (folder / ".complete").exists())
    finally:
        server.stop()
    assert len(list(folder.glob("study_1/*/*.dcm"))) == len(files)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["study_1", "study_2"]
    assert not any((incoming / ".receiving").iterdir())


LOSSLESS_COMPRESSED = ["jpeg-lossless", "jpeg-ls", "jpeg2000", "rle", "deflated"]


def test_compressed_transfer_syntaxes_are_received_as_sent_and_decode_to_the_same_volume(tmp_path):
    """One patient per lossless compressed syntax (synth --transfer-syntax), each sent by a storage
    SCU that offers only that syntax: the receiver negotiates it, stores the bytes as they came, and
    each received T2 series decodes to the volume of the same patient written uncompressed."""
    import numpy as np

    from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
    from hcc_assets.imaging.nifti import series_to_nifti
    from hcc_assets.synthetic.transfer_syntax import TRANSFER_SYNTAXES

    def t2(folder):
        image = series_to_nifti(choose_t2_series(inventory_study(folder)).series)
        return np.asarray(image.dataobj), image.affine

    incoming, patients = tmp_path / "incoming", []
    one = CONFIG.model_copy(update={"patients": 1, "slices_min": 10, "slices_max": 11})  # a usable T2
    with receiver(tmp_path, incoming) as (port, log_path):
        for seed, name in enumerate(LOSSLESS_COMPRESSED, start=40):
            settings = one.model_copy(update={"seed": seed})
            plain = synthesize_cohort(tmp_path / f"plain_{name}", settings)[0]
            patients.append(plain)
            synthesize_cohort(tmp_path / f"sent_{name}", settings.model_copy(update={"transfer_syntax": name}))
            sent = sorted((tmp_path / f"sent_{name}" / plain.patient_key / "study_1").rglob("*.dcm"))
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(MRImageStorage, [TRANSFER_SYNTAXES[name]])
            assoc = ae.associate("127.0.0.1", port, ae_title="HCC_ASSETS")
            assert assoc.is_established, name
            accepted = {context.transfer_syntax[0] for context in assoc.accepted_contexts}
            assert accepted == {TRANSFER_SYNTAXES[name]}, name
            for path in sent:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0, (name, path.name)
            assoc.release()
            folder = incoming / plain.patient_key
            assert wait_for(lambda folder=folder: (folder / ".complete").exists()), log_path.read_text()
            received = sorted(folder.rglob("*.dcm"))
            assert len(received) == len(sent), name
            assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in received} == {
                TRANSFER_SYNTAXES[name]
            }
            volume, affine = t2(folder)
            plain_volume, plain_affine = t2(tmp_path / f"plain_{name}" / plain.patient_key)
            assert np.array_equal(volume, plain_volume) and np.array_equal(affine, plain_affine), name
    assert_no_phi(log_path, patients)


def test_enhanced_and_lossy_studies_are_received_and_the_lossy_one_is_flagged(tmp_path):
    """An Enhanced MR patient (one multi-frame file per series) and a JPEG 2000 (lossy) patient, each
    sent by a storage SCU that proposes only its SOP class and syntax: both are negotiated and land;
    the enhanced T2 decodes to the classic patient's volume, the lossy T2 is flagged lossy. A DICOM
    SEG and an RT Structure Set drawn on the enhanced T2, sent afterwards, land beside it and name
    that series."""
    import numpy as np
    from pydicom.uid import JPEG2000, ExplicitVRLittleEndian
    from pynetdicom.sop_class import EnhancedMRImageStorage, RTStructureSetStorage, SegmentationStorage

    from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
    from hcc_assets.imaging.nifti import series_to_nifti, series_to_volume
    from hcc_assets_tests.imaging.test_dicom_rtstruct import write_rtstruct
    from hcc_assets_tests.imaging.test_dicom_seg import write_seg

    def sent_t2_folder(sent: list[Path]) -> Path:
        return next(
            path.parent
            for path in sent
            if "T2" in str(pydicom.dcmread(path, stop_before_pixels=True).SeriesDescription)
        )

    incoming = tmp_path / "incoming"
    one = CONFIG.model_copy(update={"patients": 1, "slices_min": 10, "slices_max": 11, "seed": 60})
    plain = synthesize_cohort(tmp_path / "plain", one)[0]
    cases = {
        "enhanced": (one.model_copy(update={"enhanced": True}), EnhancedMRImageStorage, ExplicitVRLittleEndian),
        "lossy": (one.model_copy(update={"transfer_syntax": "jpeg2000-lossy", "seed": 61}), MRImageStorage, JPEG2000),
    }
    with receiver(tmp_path, incoming) as (port, log_path):
        for name, (settings, sop_class, syntax) in cases.items():
            patient = synthesize_cohort(tmp_path / name, settings)[0]
            sent = sorted((tmp_path / name / patient.patient_key / "study_1").rglob("*.dcm"))
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(sop_class, [syntax])
            assoc = ae.associate("127.0.0.1", port, ae_title="HCC_ASSETS")
            assert assoc.is_established, name
            assert [(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts] == [(sop_class, syntax)]
            for path in sent:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0, (name, path.name)
            assoc.release()
            folder = incoming / patient.patient_key
            assert wait_for(lambda folder=folder: (folder / ".complete").exists()), log_path.read_text()
            assert len(sorted(folder.rglob("*.dcm"))) == len(sent), name
            choice = choose_t2_series(inventory_study(folder))
            if name == "enhanced":
                # then a reference mask drawn on its T2 as a viewer saves it: a DICOM SEG, sent alone
                seg = write_seg(
                    tmp_path / "seg", sent_t2_folder(sent), np.ones(series_to_volume(choice.series)[0].shape, np.uint8)
                )
                ae = AE(ae_title="TESTSCU")
                ae.add_requested_context(SegmentationStorage, [ExplicitVRLittleEndian])
                assoc = ae.associate("127.0.0.1", port, ae_title="HCC_ASSETS")
                assert assoc.is_established and assoc.send_c_store(pydicom.dcmread(seg)).Status == 0
                assoc.release()
                # and contours of it as a contouring tool saves them: an RT Structure Set
                rtstruct = write_rtstruct(tmp_path / "rtstruct", tmp_path / name / patient.patient_key)
                ae = AE(ae_title="TESTSCU")
                ae.add_requested_context(RTStructureSetStorage, [ExplicitVRLittleEndian])
                assoc = ae.associate("127.0.0.1", port, ae_title="HCC_ASSETS")
                assert assoc.is_established and assoc.send_c_store(pydicom.dcmread(rtstruct)).Status == 0
                assoc.release()
                assert wait_for(lambda folder=folder: len(inventory_study(folder).annotations) == 2)
                landed = inventory_study(folder).annotations
                assert sorted(a.kind for a in landed) == ["rtstruct", "seg"]
                assert all(a.referenced_series_keys == {choice.series.uid_key} for a in landed)
                assert choice.series.n_files == 1 and len(sent) == 3  # one file per series
                image = series_to_nifti(choice.series)
                reference = series_to_nifti(
                    choose_t2_series(inventory_study(tmp_path / "plain" / plain.patient_key)).series
                )
                assert np.array_equal(np.asarray(image.dataobj), np.asarray(reference.dataobj))
                assert np.array_equal(image.affine, reference.affine)
            else:
                assert choice.series.lossy and choice.series.transfer_syntax == JPEG2000
                assert "lossy-compressed" in choice.reason
    assert_no_phi(log_path, [plain])
