"""The same synthetic patient written in every transfer syntax `synth --transfer-syntax` offers
(compressed ones decoded by the pylibjpeg plugins, through pydicom): each T2 volume is voxel-identical
to the uncompressed one, on the same affine, and each file says which syntax it is in."""

import numpy as np
import pydicom
import pytest

from hcc_assets.imaging.dicom_series import choose_t2_series, inventory_study
from hcc_assets.imaging.nifti import series_to_nifti
from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
from hcc_assets.synthetic.transfer_syntax import DEFAULT_TRANSFER_SYNTAX, TRANSFER_SYNTAXES

ONE_PATIENT = dict(patients=1, seed=3, matrix=48, slices_min=10, slices_max=12, oblique_fraction=1.0)


def _t2_volume(folder):
    inventory = inventory_study(folder)
    image = series_to_nifti(choose_t2_series(inventory).series)
    return inventory, np.asarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("explicit")
    patient = synthesize_cohort(out, SynthConfig(**ONE_PATIENT))[0]
    return _t2_volume(out / patient.patient_key)


@pytest.mark.parametrize("name", [n for n in TRANSFER_SYNTAXES if n != DEFAULT_TRANSFER_SYNTAX])
def test_every_transfer_syntax_gives_the_same_volume(uncompressed, tmp_path, name):
    patient = synthesize_cohort(tmp_path, SynthConfig(**ONE_PATIENT, transfer_syntax=name))[0]
    inventory, volume, affine = _t2_volume(tmp_path / patient.patient_key)
    reference_inventory, reference_volume, reference_affine = uncompressed
    assert volume.dtype == reference_volume.dtype and np.array_equal(volume, reference_volume)
    assert np.array_equal(affine, reference_affine)
    assert [s.series_number for s in inventory.series] == [s.series_number for s in reference_inventory.series]
    for series in inventory.series:
        header = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        assert header.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]


def test_an_unknown_transfer_syntax_is_refused():
    with pytest.raises(ValueError, match="transfer_syntax must be one of"):
        SynthConfig(transfer_syntax="jpeg-lossy")
