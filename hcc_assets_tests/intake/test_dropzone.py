import os
import time

import pytest

from hcc_assets.intake.dropzone import read_label_manifests, scan_drop_zone
from hcc_assets.intake.pseudonym import load_or_create_key, pseudonymize


def _touch(path, age_s=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_complete_means_marker_or_quiet(tmp_path):
    _touch(tmp_path / "A" / "s" / "1.dcm")
    _touch(tmp_path / "A" / ".complete")
    _touch(tmp_path / "B" / "s" / "1.dcm")  # still being copied
    _touch(tmp_path / "C" / "s" / "1.dcm", age_s=600)
    os.utime(tmp_path / "C", (time.time() - 600, time.time() - 600))
    os.utime(tmp_path / "C" / "s", (time.time() - 600, time.time() - 600))
    ready = {f.source_key: f.complete_by for f in scan_drop_zone(tmp_path, quiet_seconds=60)}
    assert ready == {"A": "marker", "C": "quiet"}


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    _touch(tmp_path / "A" / "s" / "1.dcm")
    _touch(tmp_path / "A" / ".complete")
    before = scan_drop_zone(tmp_path)[0].fingerprint
    assert scan_drop_zone(tmp_path)[0].fingerprint == before
    (tmp_path / "A" / "s" / "2.dcm").write_bytes(b"yy")
    assert scan_drop_zone(tmp_path)[0].fingerprint != before


def test_label_manifests_merge(tmp_path):
    (tmp_path / "labels.csv").write_text("patient_key,hcc,source\nA,1,synthetic\nB,0,synthetic\n")
    (tmp_path / "labels_chaos.csv").write_text("patient_key,hcc,source\nC,0,CHAOS\n")
    rows = {r["patient_key"]: (r["hcc"], r["source"]) for r in read_label_manifests(tmp_path)}
    assert rows == {"A": ("1", "synthetic"), "B": ("0", "synthetic"), "C": ("0", "CHAOS")}


def test_pseudonyms_are_keyed_stable_and_hide_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("HCC_ASSETS_PSEUDONYM_KEY", raising=False)
    key = load_or_create_key(tmp_path / "private" / "k")
    assert load_or_create_key(tmp_path / "private" / "k") == key
    pid = pseudonymize("MRN12345678", key)
    assert pid.startswith("pt-") and len(pid) == 15 and "12345678" not in pid
    assert pseudonymize("MRN12345678", key) == pid
    assert pseudonymize("MRN12345678", b"other") != pid


def test_a_spreadsheet_exported_manifest_reads_like_a_plain_one(tmp_path):
    from hcc_assets.intake.dropzone import validate_labels

    # Excel: a UTF-8 byte-order mark, CRLF line ends, capitalised headers with spaces after the commas
    (tmp_path / "labels_excel.csv").write_bytes(
        "\ufeffPatient_Key, HCC, Source\r\nA,1,TCGA\r\nB, 0 ,CHAOS\r\n".encode()
    )
    labels, problems = validate_labels(tmp_path)
    assert problems == []
    assert labels == {"A": (True, "TCGA"), "B": (False, "CHAOS")}
    assert {r["patient_key"]: r["hcc"] for r in read_label_manifests(tmp_path)} == {"A": "1", "B": "0"}


def test_a_symlink_loop_and_odd_names_do_not_upset_the_scan(tmp_path):
    folder = tmp_path / "Müller, Hans (1)"
    _touch(folder / "study_1" / "series_3" / "IM_1.dcm")
    _touch(folder / "study_1" / "series_3" / "odd\nname.dcm")
    _touch(folder / ".complete")
    os.symlink("..", folder / "study_1" / "loop")  # not followed: no endless walk
    ready = scan_drop_zone(tmp_path, quiet_seconds=60)
    assert [(f.source_key, f.complete_by) for f in ready] == [("Müller, Hans (1)", "marker")]


def test_drop_copy_publishes_a_whole_study_once(tmp_path):
    from hcc_assets.intake.dropzone import COMPLETE_MARKER, drop_copy, scan_drop_zone

    source = tmp_path / "outside" / "MRN12345"
    source.mkdir(parents=True)
    (source / "a.dcm").write_bytes(b"x" * 10)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    target = drop_copy(source, incoming)
    assert target == incoming / "MRN12345" and (target / COMPLETE_MARKER).exists()
    assert (target / "a.dcm").read_bytes() == b"x" * 10
    assert sorted(p.name for p in incoming.iterdir()) == ["MRN12345"]  # no staging folder left
    assert [f.complete_by for f in scan_drop_zone(incoming, quiet_seconds=1e9)] == ["marker"]
    with pytest.raises(FileExistsError) as refused:
        drop_copy(source, incoming)
    assert "MRN12345" not in str(refused.value)  # folder names can be record numbers


def _zip_folder(folder, archive, extra=()):
    """`folder` zipped as a PACS web export does (one top folder), plus `extra` (ZipInfo, bytes)."""
    import zipfile

    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, f"EXPORT/{path.relative_to(folder)}")
        for info, data in extra:
            bundle.writestr(info, data)
    return archive


def test_a_zip_export_unpacks_into_the_drop_zone_as_the_folder_would_arrive(tmp_path):
    """A zipped study (with a macOS resource fork, a symbolic link and a member that climbs out
    with '..') ingests as the folder it was made from: same series, same checksums."""
    import stat
    import zipfile

    from hcc_assets.imaging.dicom_series import inventory_study
    from hcc_assets.intake.dropzone import COMPLETE_MARKER, drop_archive
    from hcc_assets_tests.imaging.test_dicom_series import make_study

    patient = make_study(tmp_path / "export")
    link = zipfile.ZipInfo("EXPORT/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    extra = [
        (zipfile.ZipInfo("__MACOSX/EXPORT/._IM0001"), b"\0\5\26\7 resource fork"),
        (link, b"/etc/passwd"),
        (zipfile.ZipInfo("../../escaped.txt"), b"outside?"),
    ]
    archive = _zip_folder(patient, tmp_path / "MRN4711.zip", extra)
    incoming = tmp_path / "incoming"

    target = drop_archive(archive, incoming)

    assert target == incoming / "MRN4711" and (target / COMPLETE_MARKER).exists()
    assert not (target / "EXPORT" / "link").exists()  # a link's target path is no file of the study
    assert (target / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in incoming.iterdir()) == ["MRN4711"]  # no staging folder left
    unpacked, original = inventory_study(target), inventory_study(patient)
    assert [(s.series_key, s.checksum) for s in unpacked.series] == [
        (s.series_key, s.checksum) for s in original.series
    ]
    with pytest.raises(FileExistsError):
        drop_archive(archive, incoming)


def test_a_zip_saved_into_the_drop_zone_is_unpacked_by_the_scan_once_quiet(tmp_path):
    """What the sensor sees: a ZIP export saved into incoming/ becomes a complete folder of its name
    once nothing has written to it for the quiet period; a damaged one is reported, not half-read."""
    from hcc_assets.intake.dropzone import UNPACKED_ARCHIVES, SkippedFolder

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    (source / "IM0001").write_bytes(b"x" * 4096)
    archive = _zip_folder(source, incoming / "MRN77.zip")
    skipped: list[SkippedFolder] = []
    assert scan_drop_zone(incoming, quiet_seconds=60, skipped=skipped) == [] and skipped == []  # still arriving
    assert archive.exists()

    ready = scan_drop_zone(incoming, quiet_seconds=60, now=time.time() + 61, skipped=skipped)

    assert [(f.source_key, f.complete_by) for f in ready] == [("MRN77", "marker")] and skipped == []
    assert (incoming / "MRN77" / "EXPORT" / "IM0001").read_bytes() == b"x" * 4096
    assert not archive.exists() and (incoming / UNPACKED_ARCHIVES / "MRN77.zip").exists()
    broken = incoming / "MRN78.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    later = scan_drop_zone(incoming, quiet_seconds=60, now=time.time() + 61, skipped=skipped)
    assert [f.source_key for f in later] == ["MRN77"]
    assert [(s.source_key, s.reason) for s in skipped] == [
        ("MRN78", "ZIP archive not unpacked: the archive is damaged (BadZipFile)")
    ]
    assert broken.exists()


def test_a_damaged_or_password_protected_zip_is_refused_before_anything_is_written(tmp_path):
    import zipfile

    from hcc_assets.intake.dropzone import ArchiveError, drop_archive

    incoming = tmp_path / "incoming"
    good = tmp_path / "source"
    good.mkdir()
    (good / "IM0001").write_bytes(b"x" * 4096)
    damaged = _zip_folder(good, tmp_path / "MRN1.zip")
    damaged.write_bytes(damaged.read_bytes()[:-30])  # cut short: the central directory is gone
    with pytest.raises(ArchiveError, match="damaged"):
        drop_archive(damaged, incoming)
    locked = _zip_folder(good, tmp_path / "MRN2.zip")
    data = bytearray(locked.read_bytes())  # set the "encrypted" flag as an encrypting tool writes it
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + offset] |= 0x1
    locked.write_bytes(bytes(data))
    assert zipfile.ZipFile(locked).infolist()[0].flag_bits & 0x1
    with pytest.raises(ArchiveError, match="password-protected") as refused:
        drop_archive(locked, incoming)
    assert "MRN2" not in str(refused.value) and "IM0001" not in str(refused.value)
    assert not incoming.exists() or not any(incoming.iterdir())


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".tar.xz"])
def test_a_tar_export_unpacks_into_the_drop_zone_as_the_folder_would_arrive(tmp_path, suffix):
    """A research archive's TAR download (plain or compressed), with a symbolic link and a device
    member beside the study: ingests as the folder it was made from; the scan unpacks it too."""
    import tarfile

    from hcc_assets.imaging.dicom_series import inventory_study
    from hcc_assets.intake.dropzone import COMPLETE_MARKER, UNPACKED_ARCHIVES, drop_archive
    from hcc_assets_tests.imaging.test_dicom_series import make_study

    patient = make_study(tmp_path / "export")
    mode = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.xz": "w:xz"}[suffix]
    archive = tmp_path / f"MRN4711{suffix}"
    with tarfile.open(archive, mode) as bundle:
        bundle.add(patient, arcname="EXPORT")
        link = tarfile.TarInfo("EXPORT/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        device = tarfile.TarInfo("EXPORT/device")
        device.type = tarfile.CHRTYPE
        bundle.addfile(link)
        bundle.addfile(device)
    incoming = tmp_path / "incoming"

    target = drop_archive(archive, incoming)

    assert target == incoming / "MRN4711" and (target / COMPLETE_MARKER).exists()
    assert not (target / "EXPORT" / "link").exists() and not (target / "EXPORT" / "device").exists()
    unpacked, original = inventory_study(target), inventory_study(patient)
    assert [(s.series_key, s.checksum) for s in unpacked.series] == [
        (s.series_key, s.checksum) for s in original.series
    ]
    # saved into the drop zone instead: the scan unpacks it once quiet, as a ZIP
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    (dropped / archive.name).write_bytes(archive.read_bytes())
    ready = scan_drop_zone(dropped, quiet_seconds=60, now=time.time() + 61)
    assert [f.source_key for f in ready] == ["MRN4711"]
    assert (dropped / UNPACKED_ARCHIVES / archive.name).exists()


def test_a_tar_whose_members_climb_out_of_its_folder_is_refused_whole(tmp_path):
    import io
    import tarfile

    from hcc_assets.intake.dropzone import ArchiveError, drop_archive

    archive = tmp_path / "MRN9.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        for name in ("EXPORT/IM0001", "../../escaped.dcm"):
            member = tarfile.TarInfo(name)
            member.size = 4
            bundle.addfile(member, io.BytesIO(b"DICM"))
    incoming = tmp_path / "incoming"
    with pytest.raises(ArchiveError, match="members that would land outside its folder") as refused:
        drop_archive(archive, incoming)
    assert "escaped" not in str(refused.value) and "MRN9" not in str(refused.value)
    assert not (tmp_path / "escaped.dcm").exists() and not any(
        p for p in incoming.iterdir() if not p.name.startswith(".")
    )
    damaged = tmp_path / "MRN10.tar.gz"
    damaged.write_bytes(archive.read_bytes()[:40])
    with pytest.raises(ArchiveError, match="damaged"):
        drop_archive(damaged, incoming)


def test_study_partition_keys_round_trip_and_leave_the_first_study_bare():
    from hcc_assets.intake.pseudonym import split_partition_key, study_partition_key

    assert study_partition_key("pt-0123456789ab", 1) == "pt-0123456789ab"
    assert study_partition_key("pt-0123456789ab", 3) == "pt-0123456789ab.s3"
    assert split_partition_key("pt-0123456789ab.s3") == ("pt-0123456789ab", 3)
    assert split_partition_key("pt-0123456789ab") == ("pt-0123456789ab", 1)
    # anything else is a key of its own (a study index is 2 or more)
    assert split_partition_key("pt-0123456789ab.s1") == ("pt-0123456789ab.s1", 1)
    assert split_partition_key("other.s2") == ("other.s2", 1)
    with pytest.raises(ValueError):
        study_partition_key("pt-0123456789ab", 0)


def test_the_study_column_of_the_manifests(tmp_path):
    from hcc_assets.intake.dropzone import label_studies

    (tmp_path / "labels.csv").write_text("patient_key,hcc,source\nA,1,x\nB,0,x\n")
    assert label_studies(tmp_path) == ({}, [])  # no column: every patient's earliest study
    (tmp_path / "labels_more.csv").write_text("patient_key,hcc,study\nA,1,2\nB,0,two\nC,1,1\nC,1,3\nD,0,\n")
    studies, problems = label_studies(tmp_path)
    assert studies == {"A": 2}
    assert {p.patient_key: p.problem for p in problems} == {
        "B": "study 'two' at labels_more.csv:3 is not a study index (1, 2, ...)",
        "C": "names different studies (1 at labels_more.csv:4, 3 at labels_more.csv:5)",
    }
