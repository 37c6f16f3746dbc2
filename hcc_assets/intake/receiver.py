"""A DICOM network receiver (C-STORE SCP) that writes studies into the drop zone atomically.

`hcc-assets receive --port 11112 --ae-title HCC_ASSETS --allowed-callers SCANNER1,PACS` listens
for associations from the configured calling AE titles only (others are rejected) and accepts
MR Image Storage, Enhanced MR Image Storage (one multi-frame file per series), Legacy Converted
Enhanced MR Image Storage and Verification (C-ECHO).

Writing, so that the folder sensor never sees half a study:
  1. each received file goes to `<incoming>/.receiving/<process>-<association>/` (hidden: the
     drop-zone scan skips it);
  2. when the association is released, every study is moved into place as
        <incoming>/<patient key>/study_<k>/series_<SeriesNumber>/<SOPInstanceUID>.dcm
     a new patient folder is renamed into place whole, marker included; a new study of a
     known patient is renamed into place as one folder (the patient's `.complete` marker is
     removed first and written again afterwards); files of a study that was already received
     are merged into it;
  3. an association that aborts, or whose connection drops before release, is discarded:
     nothing of it reaches the drop zone.
The patient key is the PatientID when it is a plain folder name (letters, digits, `._-`), else
a hash of it; the platform pseudonymizes it. Hidden `.study` / `.series` files hold hashes of
the study and series UIDs so that later deliveries find their folders.

The receiver de-identifies nothing (ingest does) and never logs PHI: its log lines carry
association numbers, counts and AE titles only. It imports neither dagster nor the imaging
code (of hcc_assets only `hcc_assets.core.files`, which is standard library only): it can run on a
gateway machine with only pydicom and pynetdicom.

Pointing a scanner or PACS at it: add a DICOM node (a "remote AE", "storage destination" or
"send target") with AE title = the receiver's `--ae-title`, host = the machine running it,
port = `--port`; give the sending device's own AE title to `--allowed-callers`; verify with
the device's "echo" / "test connection" button (C-ECHO), then send a study. To run it as a
service, use e.g. a systemd unit:

    [Service]
    ExecStart=/opt/hcc-assets/.venv/bin/hcc-assets --lake /data/lake receive --bind 0.0.0.0 \\
        --port 11112 --ae-title HCC_ASSETS --allowed-callers SCANNER1,PACS
    Restart=on-failure
    User=hcc

SIGTERM stops it cleanly; a partial association left by a crash is removed at the next start.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
import signal
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom generates its SOP class names at import
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    Verification,
)

# standard library only, like everything this gateway process imports besides pydicom and pynetdicom
from hcc_assets.core.files import COMPLETE_MARKER, publish_folder

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

# The uncompressed syntaxes, the lossless compressed ones and the common lossy ones (JPEG baseline and
# extended, JPEG-LS near-lossless, JPEG 2000), all decoded at ingest by the pylibjpeg / pyjpegls
# plugins through pydicom. Lossy series are accepted because ingest flags them (`scans.lossy`) and the
# T2 choice prefers a lossless series; a sender that offers both forms gets the one it lists first.
# A file is stored in the syntax it arrived in (its bytes are not re-encoded).
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
]
# the images, and DICOM SEG and RT Structure Set objects drawn on them: a reference mask as an
# annotation or contouring tool saves it (imaging/dicom_seg.py, imaging/dicom_rtstruct.py)
STORAGE_SOP_CLASSES = [
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    SegmentationStorage,
    RTStructureSetStorage,
]

log = logging.getLogger("hcc_assets.intake.receiver")

RECEIVING = ".receiving"
STUDY_MARKER = ".study"
SERIES_MARKER = ".series"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UID = re.compile(r"^[0-9][0-9.]{0,63}$")
_HEADER_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SOPInstanceUID"]

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_OUT_OF_RESOURCES = 0xA700


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def patient_key(patient_id: str, study_uid: str) -> str:
    """A safe folder name for a patient: the PatientID itself when harmless, else a hash."""
    patient_id = patient_id.strip()
    if not patient_id:
        return f"unknown-{_hash(study_uid)}"
    return patient_id if _SAFE_NAME.match(patient_id) else f"pid-{_hash(patient_id)}"


@dataclass(frozen=True)
class _Stored:
    path: Path
    patient_key: str
    study_hash: str
    series_hash: str
    series_number: int | None
    file_name: str


@dataclass
class _Association:
    number: int
    folder: Path
    files: list[_Stored] = field(default_factory=list)
    failed: int = 0


class Receiver:
    """The C-STORE SCP. `start()` returns once it listens; `stop()` shuts it down."""

    def __init__(
        self,
        incoming: Path,
        ae_title: str = "HCC_ASSETS",
        allowed_callers: list[str] | tuple = (),
        bind: str = "127.0.0.1",
        port: int = 11112,
    ):
        self.incoming = Path(incoming)
        self.ae_title = ae_title
        self.allowed_callers = [c.strip() for c in allowed_callers if c.strip()]
        self.address = (bind, port)
        self._associations: dict[object, _Association] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()  # guards _associations and every move into the drop zone
        self._server: ThreadedAssociationServer | None = None

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()
        ae = AE(ae_title=self.ae_title)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = self.allowed_callers
        ae.maximum_pdu_size = 0  # no limit
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server = ae.start_server(self.address, block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        self._server = server
        host, port = server.server_address[:2]
        callers = (
            f"{len(self.allowed_callers)} allowed calling AE title(s)"
            if self.allowed_callers
            else "ANY calling AE title (set --allowed-callers to restrict)"
        )
        log.info(
            "receiver listening on %s:%d as AE %r; accepting (Enhanced) MR Image Storage and Verification from %s",
            host,
            port,
            self.ae_title,
            callers,
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("receiver stopped")

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM."""
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        self.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()

    def _remove_stale_staging(self) -> None:
        staging = self.incoming / RECEIVING
        if not staging.is_dir():
            return
        removed = 0
        for entry in staging.iterdir():
            pid = entry.name.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another receiver on the same drop zone is still using it
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        if removed:
            log.warning("removed %d partial association(s) left by an earlier run", removed)

    # ------------------------------------------------------------------------ event handlers

    def _state(self, assoc) -> _Association:
        with self._lock:
            state = self._associations.get(assoc)
            if state is None:
                number = next(self._counter)
                folder = self.incoming / RECEIVING / f"{os.getpid()}-{number}"
                folder.mkdir(parents=True, exist_ok=True)
                state = self._associations[assoc] = _Association(number, folder)
            return state

    def _pop(self, assoc) -> _Association | None:
        with self._lock:
            return self._associations.pop(assoc, None)

    def _on_accepted(self, event) -> None:
        state = self._state(event.assoc)
        log.info("association %d accepted", state.number)

    def _on_rejected(self, event) -> None:
        try:
            caller = event.assoc.requestor.ae_title
        except Exception:
            caller = "?"
        log.warning("association request rejected (calling AE title %r is not allowed, or no usable context)", caller)

    def _on_store(self, event) -> int:
        state = self._state(event.assoc)
        index = len(state.files) + state.failed
        path = state.folder / f"{index:06d}.dcm"
        try:
            path.write_bytes(event.encoded_dataset(include_meta=True))
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            study_uid = str(header.get("StudyInstanceUID", "") or "").strip()
            series_uid = str(header.get("SeriesInstanceUID", "") or "").strip()
            sop_uid = str(header.get("SOPInstanceUID", "") or "").strip()
            if not (study_uid and series_uid and sop_uid):
                path.unlink(missing_ok=True)
                state.failed += 1
                log.warning("association %d: a file lacks a study, series or instance UID; refused", state.number)
                return STATUS_CANNOT_UNDERSTAND
            try:
                number = int(header.get("SeriesNumber"))
            except (TypeError, ValueError):
                number = None
            name = f"{sop_uid}.dcm" if _UID.match(sop_uid) else f"{_hash(sop_uid)}.dcm"
            state.files.append(
                _Stored(
                    path,
                    patient_key(str(header.get("PatientID", "") or ""), study_uid),
                    _hash(study_uid),
                    _hash(series_uid),
                    number,
                    name,
                )
            )
            return STATUS_SUCCESS
        except Exception as error:  # never let a message (which may hold PHI) reach the log
            path.unlink(missing_ok=True)
            state.failed += 1
            log.error("association %d: could not store a file (%s)", state.number, type(error).__name__)
            return STATUS_OUT_OF_RESOURCES

    def _on_released(self, event) -> None:
        state = self._pop(event.assoc)
        if state is None:
            return
        try:
            with self._lock:
                patients, studies = self._place(state)
            if state.files:
                log.info(
                    "association %d released: stored %d file(s) in %d study(ies) of %d patient(s)%s",
                    state.number,
                    len(state.files),
                    studies,
                    patients,
                    f"; {state.failed} file(s) refused" if state.failed else "",
                )
            else:
                log.info("association %d released: no files", state.number)
        except Exception as error:
            log.error(
                "association %d: could not move its %d file(s) into the drop zone (%s); discarded",
                state.number,
                len(state.files),
                type(error).__name__,
            )
        finally:
            shutil.rmtree(state.folder, ignore_errors=True)

    def _on_aborted(self, event) -> None:
        self._discard(event.assoc, "aborted")

    def _on_closed(self, event) -> None:
        # The connection also closes right after a normal release, possibly before the
        # association thread has run EVT_RELEASED: decide only once that thread has finished.
        assoc = event.assoc
        with self._lock:
            if assoc not in self._associations:
                return
        threading.Thread(target=self._after_close, args=(assoc,), daemon=True).start()

    def _after_close(self, assoc) -> None:
        assoc.join(timeout=120)
        if assoc.is_alive() and assoc.is_released:
            return  # still moving a released association into place: EVT_RELEASED handles it
        self._discard(assoc, "ended without release (aborted or connection lost)")  # no-op once placed

    def _discard(self, assoc, why: str) -> None:
        state = self._pop(assoc)
        if state is None:
            return
        shutil.rmtree(state.folder, ignore_errors=True)
        log.warning(
            "association %d %s: discarded %d received file(s); nothing was added to the drop zone",
            state.number,
            why,
            len(state.files),
        )

    # ------------------------------------------------------------------------ placing studies

    def _place(self, state: _Association) -> tuple[int, int]:
        """Move an association's files into the drop zone; returns (patients, studies)."""
        grouped: dict[str, dict[str, list[_Stored]]] = defaultdict(lambda: defaultdict(list))
        for stored in state.files:
            grouped[stored.patient_key][stored.study_hash].append(stored)
        build = state.folder / "place"
        n_studies = 0
        for key, studies in sorted(grouped.items()):
            final = self.incoming / key
            n_studies += len(studies)
            if final.is_dir():  # a known patient: incomplete until every new file is in
                (final / COMPLETE_MARKER).unlink(missing_ok=True)
                _add_studies(final, studies, aside=build / "studies" / key)
                (final / COMPLETE_MARKER).write_bytes(b"")
            else:  # a new patient: built aside, renamed into place whole, marker included
                with publish_folder(final, staging=build / key, replace=False) as patient_dir:
                    _add_studies(patient_dir, studies, aside=None)
        return len(grouped), n_studies


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marker_of(folder: Path, marker: str) -> str:
    try:
        return (folder / marker).read_text().strip()
    except OSError:
        return ""


def _find_marked(parent: Path, prefix: str, marker: str, value: str) -> Path | None:
    if not parent.is_dir():
        return None
    for entry in sorted(parent.iterdir()):
        if entry.is_dir() and entry.name.startswith(prefix) and _marker_of(entry, marker) == value:
            return entry
    return None


def _next_index(parent: Path, prefix: str) -> int:
    taken = (
        {
            int(e.name[len(prefix) :])
            for e in parent.iterdir()
            if e.name.startswith(prefix) and e.name[len(prefix) :].isdigit()
        }
        if parent.is_dir()
        else set()
    )
    return max(taken, default=0) + 1


def _add_studies(patient_dir: Path, studies: dict[str, list[_Stored]], aside: Path | None) -> None:
    """Put each study (study hash -> files) into `patient_dir`: merged into the study folder that
    already has its hash, else a new `study_<k>`, built in `aside / <study hash>` and renamed into
    place whole (`aside` None: written in place, for a patient folder that is itself being built)."""
    for study_hash, files in studies.items():
        existing = _find_marked(patient_dir, "study_", STUDY_MARKER, study_hash)
        if existing is not None:
            _fill_study(existing, files)
            continue
        target = patient_dir / f"study_{_next_index(patient_dir, 'study_')}"
        if aside is None:
            _fill_study(_new_marked(target, STUDY_MARKER, study_hash), files)
            continue
        with publish_folder(target, marker=None, staging=aside / study_hash, replace=False) as staged:
            (staged / STUDY_MARKER).write_text(study_hash + "\n")
            _fill_study(staged, files)


def _new_marked(folder: Path, marker: str, value: str) -> Path:
    folder.mkdir(parents=True)
    (folder / marker).write_text(value + "\n")
    return folder


def _fill_study(study_dir: Path, files: list[_Stored]) -> None:
    """Move files into series_<SeriesNumber> folders of `study_dir` (merging with what is there)."""
    by_series: dict[str, list[_Stored]] = defaultdict(list)
    for stored in files:
        by_series[stored.series_hash].append(stored)
    for series_hash, series_files in by_series.items():
        folder = _find_marked(study_dir, "series_", SERIES_MARKER, series_hash)
        if folder is None:
            number = series_files[0].series_number
            base = f"series_{number}" if number is not None and number >= 0 else "series_x"
            folder = study_dir / base
            if folder.exists():  # same number, another series: keep both apart
                folder = study_dir / f"{base}_{series_hash[:8]}"
            _new_marked(folder, SERIES_MARKER, series_hash)
        for stored in series_files:
            os.replace(stored.path, folder / stored.file_name)


def configure_logging() -> None:
    """Our PHI-free lines on stderr; pynetdicom's own (which may echo dataset content) muted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
