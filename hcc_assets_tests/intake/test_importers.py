"""CHAOS and TCGA-LIHC importers, on the synthetic generator's chaos and tcia layouts."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hcc_assets import cli
from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
from hcc_assets.imaging.nifti import series_to_nifti
from hcc_assets.intake.dropzone import folder_fingerprint, read_label_manifests, scan_drop_zone
from hcc_assets.intake.sources import MASK_PATH, import_chaos, import_tcia
from hcc_assets.synthetic.cohort import SynthConfig, layout_config, phantom_labels, synthesize_cohort

CONFIG = SynthConfig(patients=2, seed=21, matrix=64, slices_min=8, slices_max=11, oblique_fraction=0.5)
CHAOS_GREYS = {0, 63, 126, 189, 252}
DATE = re.compile(r"\d{2}-\d{2}-\d{4}|(19|20)\d{6}")


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    base = tmp_path_factory.mktemp("chaos")
    patients = synthesize_cohort(base / "MR", CONFIG, layout="chaos")
    incoming = base / "incoming"
    results = import_chaos(base / "MR", incoming)
    return base, patients, incoming, results


@pytest.fixture(scope="module")
def tcia(tmp_path_factory):
    base = tmp_path_factory.mktemp("tcia")
    patients = synthesize_cohort(base / "download", CONFIG, layout="tcia")
    incoming = base / "incoming"
    results = import_tcia(base / "download" / "TCGA-LIHC", incoming, metadata=base / "download" / "metadata.csv")
    return base, patients, incoming, results


def load_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def truth_on(affine_ras: np.ndarray, shape: tuple[int, ...], patient, layout: str) -> np.ndarray:
    """Phantom labels at the voxel centres of a RAS grid, indexed [i, j, k] like the mask."""
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    lps = (ijk @ affine_ras[:3, :3].T + affine_ras[:3, 3]) * np.array([-1.0, -1.0, 1.0])
    labels, _ = phantom_labels(layout_config(CONFIG, layout), patient.patient_key, lps)
    return labels


def nothing_half_imported(incoming: Path) -> bool:
    return not any(p.name.startswith(".import-") for p in incoming.iterdir())


# ---------------------------------------------------------------------------------- CHAOS


def test_chaos_layout_has_chaos_ground_grey_values(chaos):
    base, patients, _, _ = chaos
    assert all(not p.hcc and p.n_lesions == 0 for p in patients)
    assert [p.layout_id for p in patients] == ["1", "2"]
    seen = set()
    for patient in patients:
        folder = base / "MR" / patient.layout_id
        for series, ground in (("T2SPIR/DICOM_anon", "T2SPIR/Ground"), ("T1DUAL/DICOM_anon/InPhase", "T1DUAL/Ground")):
            dicoms = sorted(p.stem for p in (folder / series).glob("*.dcm"))
            pngs = sorted((folder / ground).glob("*.png"))
            assert [p.stem for p in pngs] == dicoms  # one PNG per slice, named after it
            for png in pngs:
                grey = np.asarray(Image.open(png))
                assert grey.dtype == np.uint8 and grey.ndim == 2
                seen |= set(np.unique(grey).tolist())
        assert (folder / "T1DUAL" / "DICOM_anon" / "OutPhase").is_dir()
    assert seen <= CHAOS_GREYS and {0, 63, 252} <= seen


def test_chaos_import_gives_the_phantom_truth_in_the_t2_geometry(chaos):
    base, patients, incoming, results = chaos
    assert [r.status for r in results] == ["imported", "imported"], [r.message for r in results]
    for patient in patients:
        folder = incoming / f"CHAOS-{patient.layout_id}"
        assert (folder / ".complete").exists()
        mask, affine = load_mask(folder / MASK_PATH)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2}
        assert np.array_equal(mask, truth_on(affine, mask.shape, patient, "chaos"))
        # exactly the grid the platform builds for the chosen T2 series
        choice = choose_t2_series(inventory_study(folder))
        assert choice.series.series_number == 5
        t2 = series_to_nifti(choice.series)
        assert t2.shape == mask.shape and np.allclose(t2.affine, affine, atol=1e-6)
    # the same phantom written in the drop layout has the same mask
    drop = base / "drop"
    for patient in synthesize_cohort(drop, layout_config(CONFIG, "chaos")):
        chaos_id = next(p.layout_id for p in patients if p.patient_key == patient.patient_key)
        expected, expected_affine = load_mask(drop / patient.patient_key / MASK_PATH)
        mask, affine = load_mask(incoming / f"CHAOS-{chaos_id}" / MASK_PATH)
        assert np.array_equal(mask, expected) and np.allclose(affine, expected_affine, atol=1e-4)


def test_chaos_labels_and_drop_zone(chaos):
    _, _, incoming, _ = chaos
    rows = sorted(read_label_manifests(incoming), key=lambda r: r["patient_key"])
    assert rows == [
        {"patient_key": "CHAOS-1", "hcc": "0", "source": "CHAOS"},
        {"patient_key": "CHAOS-2", "hcc": "0", "source": "CHAOS"},
    ]
    ready = scan_drop_zone(incoming)
    assert [f.source_key for f in ready] == ["CHAOS-1", "CHAOS-2"] and {f.complete_by for f in ready} == {"marker"}
    assert nothing_half_imported(incoming)


def test_chaos_reimport_is_idempotent(chaos):
    base, _, incoming, _ = chaos
    before = {p.name: folder_fingerprint(p)[0] for p in incoming.iterdir() if p.is_dir()}
    again = import_chaos(base / "MR", incoming)
    assert [r.status for r in again] == ["unchanged", "unchanged"]
    assert {p.name: folder_fingerprint(p)[0] for p in incoming.iterdir() if p.is_dir()} == before


@pytest.mark.parametrize("png_names", ["dicom_stems", "name_order"])
def test_chaos_slices_are_matched_by_position_not_name(chaos, tmp_path, png_names):
    """Shuffle the file names: the mask must still follow the slice positions."""
    base, patients, reference_incoming, _ = chaos
    patient = patients[0]
    root = tmp_path / "MR"
    shutil.copytree(base / "MR" / patient.layout_id, root / patient.layout_id)
    t2, ground = root / patient.layout_id / "T2SPIR" / "DICOM_anon", root / patient.layout_id / "T2SPIR" / "Ground"
    stems = sorted(p.stem for p in t2.glob("*.dcm"))
    shuffled = np.random.default_rng(5).permutation(len(stems))
    for stem, new in zip(stems, shuffled):
        (t2 / f"{stem}.dcm").rename(t2 / f"x{new:03d}.dcm")
        (ground / f"{stem}.png").rename(ground / f"x{new:03d}.png")
    if png_names == "name_order":  # PNG names unrelated to the DICOM names, same order
        for number, png in enumerate(sorted(ground.glob("*.png"))):
            png.rename(ground / f"liver_GT_{number:03d}.png")
    incoming = tmp_path / "incoming"
    [result] = import_chaos(root, incoming)
    assert result.ok, result.message
    mask, affine = load_mask(incoming / f"CHAOS-{patient.layout_id}" / MASK_PATH)
    expected, expected_affine = load_mask(reference_incoming / f"CHAOS-{patient.layout_id}" / MASK_PATH)
    assert np.array_equal(mask, expected) and np.allclose(affine, expected_affine, atol=1e-6)


def _chaos_copy(chaos, tmp_path) -> tuple[Path, Path]:
    base, patients, _, _ = chaos
    root = tmp_path / "MR"
    shutil.copytree(base / "MR", root)
    return root, root / patients[0].layout_id / "T2SPIR" / "Ground"


def test_chaos_png_count_mismatch_is_reported_and_nothing_is_left(chaos, tmp_path):
    root, ground = _chaos_copy(chaos, tmp_path)
    sorted(ground.glob("*.png"))[3].unlink()
    incoming = tmp_path / "incoming"
    results = import_chaos(root, incoming)
    assert [r.status for r in results] == ["failed", "imported"]
    assert "CHAOS patient 1" in results[0].message and "Ground PNGs" in results[0].message
    assert not (incoming / "CHAOS-1").exists() and nothing_half_imported(incoming)
    assert [r["patient_key"] for r in read_label_manifests(incoming)] == ["CHAOS-2"]


def test_chaos_unexpected_grey_value_is_reported(chaos, tmp_path):
    root, ground = _chaos_copy(chaos, tmp_path)
    png = sorted(ground.glob("*.png"))[2]
    grey = np.asarray(Image.open(png)).copy()
    grey[10:12, 10:12] = 90
    Image.fromarray(grey).save(png)
    incoming = tmp_path / "incoming"
    results = import_chaos(root, incoming)
    assert results[0].status == "failed" and results[1].ok
    assert "CHAOS patient 1" in results[0].message and "unexpected grey values 90" in results[0].message
    assert not (incoming / "CHAOS-1").exists() and nothing_half_imported(incoming)


def test_cli_import_chaos(chaos, tmp_path, capsys):
    base, _, _, _ = chaos
    assert cli.main(["import", "chaos", "--root", str(base / "MR"), "--out", str(tmp_path / "in")]) == 0
    assert "2 imported, 0 unchanged, 0 failed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- TCIA


def test_tcia_layout_is_nbia_like(tcia):
    base, patients, _, _ = tcia
    assert all(p.hcc and p.n_lesions >= 1 for p in patients)
    with open(base / "download" / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 * len(patients)
    for row in rows:
        assert re.match(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}$", row["Subject ID"])
        study, series = Path(row["File Location"]).parts[-2:]
        assert re.match(r"^\d{2}-\d{2}-\d{4}-.+-\d{5}$", study)  # NBIA: the folder carries the date
        assert re.match(r"^\d+\.000000-.+-\d{5}$", series)
        assert (base / "download" / row["File Location"]).is_dir()


def test_tcia_import_keeps_every_series_and_the_t2_choice_explains_itself(tcia):
    _, patients, incoming, results = tcia
    assert [r.status for r in results] == ["imported", "imported"], [r.message for r in results]
    for patient in patients:
        folder = incoming / patient.layout_id
        inventory = inventory_study(folder)
        assert [s.series_number for s in inventory.series] == [3, 4, 5, 6, 7]
        dwi = next(s for s in inventory.series if s.series_number == 6)
        post = next(s for s in inventory.series if s.series_number == 7)
        assert 60 <= dwi.echo_time_ms <= 70 and dwi.repetition_time_ms > 3000 and dwi.diffusion_b_value == 800
        assert post.contrast_agent
        choice = choose_t2_series(inventory)
        assert choice.series.series_number == 5 and choice.series.description == "T2_SPIR"
        assert "diffusion (b = 800)" in choice.reason and "contrast agent given" in choice.reason
        assert choice.series.n_files == len(list(patient.t2_series_dir.glob("*.dcm")))


def test_tcia_labels_and_no_dates_in_drop_names(tcia):
    _, patients, incoming, _ = tcia
    rows = sorted(read_label_manifests(incoming), key=lambda r: r["patient_key"])
    assert rows == sorted(
        ({"patient_key": p.layout_id, "hcc": "1", "source": "TCGA-LIHC"} for p in patients),
        key=lambda r: r["patient_key"],
    )
    for path in incoming.rglob("*"):
        relative = path.relative_to(incoming)
        assert not DATE.search(str(relative)), relative
        assert "ABDOMEN" not in str(relative)
    assert all(DATE.search(p.name) is None for p in incoming.glob("*/study_*"))
    assert {f.complete_by for f in scan_drop_zone(incoming)} == {"marker"}
    assert nothing_half_imported(incoming)


def test_tcia_without_metadata_and_reimport(tcia, tmp_path):
    base, _, incoming, _ = tcia
    results = import_tcia(base / "download" / "TCGA-LIHC", incoming)  # same files: unchanged
    assert [r.status for r in results] == ["unchanged", "unchanged"]
    fresh = import_tcia(base / "download" / "TCGA-LIHC", tmp_path / "in")
    assert [r.status for r in fresh] == ["imported", "imported"]


def test_tcia_root_one_level_too_high_is_the_nbia_download_and_imports_per_patient(tcia, tmp_path):
    """Pointed at the download folder (TCGA-LIHC/ and metadata.csv inside), not at TCGA-LIHC/: the
    same patients as a correct import, never one patient named after the collection."""
    base, patients, incoming, _ = tcia
    results = import_tcia(base / "download", tmp_path / "in")
    assert sorted(r.key for r in results) == sorted(p.layout_id for p in patients)
    assert [r.status for r in results] == ["imported"] * len(patients), [r.message for r in results]
    for patient in patients:
        assert inventory_study(tmp_path / "in" / patient.layout_id).to_record() == (
            inventory_study(incoming / patient.layout_id).to_record()
        )


def test_tcia_without_t2_series_is_reported(tcia, tmp_path):
    base, patients, _, _ = tcia
    root = tmp_path / "TCGA-LIHC"
    shutil.copytree(base / "download" / "TCGA-LIHC", root)
    victim = patients[0].layout_id
    shutil.rmtree(next((root / victim).glob("*/5.000000-*")))
    incoming = tmp_path / "incoming"
    results = {r.key: r for r in import_tcia(root, incoming)}
    assert results[victim].status == "failed"
    assert f"TCIA patient {victim}" in results[victim].message
    assert "no T2-weighted series" in results[victim].message
    assert not (incoming / victim).exists() and nothing_half_imported(incoming)
    assert all(r.ok for key, r in results.items() if key != victim)


def test_tcia_metadata_row_for_missing_folder_is_reported(tcia, tmp_path):
    base, patients, _, _ = tcia
    download = tmp_path / "download"
    shutil.copytree(base / "download", download)
    victim = patients[1].layout_id
    shutil.rmtree(next((download / "TCGA-LIHC" / victim).glob("*/6.000000-*")))
    incoming = tmp_path / "incoming"
    results = {r.key: r for r in import_tcia(download / "TCGA-LIHC", incoming, metadata=download / "metadata.csv")}
    assert results[victim].status == "failed" and "folder is missing" in results[victim].message
    assert "Ax DWI b800" in results[victim].message and not DATE.search(results[victim].message)
    assert not (incoming / victim).exists() and nothing_half_imported(incoming)
    assert results[patients[0].layout_id].ok
