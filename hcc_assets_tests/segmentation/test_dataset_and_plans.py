import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from hcc_assets.segmentation import (
    SegmentationDataError,
    SegmentationTrainingConfig,
    add_cpu_configuration,
    build_raw_dataset,
)
from hcc_assets_tests.segmentation.synthetic import synthetic_case, write_cases


def test_raw_dataset_puts_the_image_affine_on_the_mask(tmp_path):
    cases = write_cases(tmp_path / "cases", 2)
    image = nib.load(cases[0][1])
    mask = nib.load(cases[0][2])
    shifted = image.affine.copy()
    shifted[0, 3] += 1e-5  # float noise from another writer
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj), shifted), cases[0][2])
    folder = build_raw_dataset(cases, tmp_path / "raw", 7, "Tiny")
    assert folder.name == "Dataset007_Tiny"
    written = nib.load(folder / "labelsTr" / "case000.nii.gz")
    assert np.array_equal(written.affine, image.affine) and written.get_data_dtype() == np.uint8
    assert json.loads((folder / "dataset.json").read_text())["overwrite_image_reader_writer"] == "NibabelIOWithReorient"


def _case_with_mask(tmp_path, name, mask_data=None, mask_affine=None):
    image, mask = synthetic_case(0)
    nib.save(image, tmp_path / f"{name}_img.nii.gz")
    data = np.asarray(mask.dataobj) if mask_data is None else mask_data
    nib.save(
        nib.Nifti1Image(data, image.affine if mask_affine is None else mask_affine), tmp_path / f"{name}_mask.nii.gz"
    )
    return name, tmp_path / f"{name}_img.nii.gz", tmp_path / f"{name}_mask.nii.gz"


@pytest.mark.parametrize(
    "mask_kwargs, message",
    [
        (dict(mask_data=np.zeros((48, 48, 15), np.uint8)), "shape"),
        (dict(mask_data=np.full((48, 48, 16), 3, np.uint8)), r"labels \[3\] besides 0, 1, 2"),
        (dict(mask_data=np.full((48, 48, 16), 2, np.uint8)), "no liver voxels"),
        (dict(mask_affine=np.diag([6.0, 6.0, 8.0, 1.0])), "not on the image's grid"),
    ],
)
def test_raw_dataset_rejects_unusable_masks(tmp_path, mask_kwargs, message):
    good = _case_with_mask(tmp_path, "good")
    bad = _case_with_mask(tmp_path, "bad", **mask_kwargs)
    with pytest.raises(SegmentationDataError, match=message):
        build_raw_dataset([good, bad], tmp_path / "raw", 7, "Tiny")


def test_raw_dataset_rejects_bad_case_ids(tmp_path):
    case = _case_with_mask(tmp_path, "a")
    with pytest.raises(SegmentationDataError, match="unique"):
        build_raw_dataset([case, case], tmp_path / "raw", 7, "Tiny")
    with pytest.raises(SegmentationDataError, match="unique"):
        build_raw_dataset([("../x", case[1], case[2])], tmp_path / "raw", 7, "Tiny")


def test_3d_cpu_configuration_builds_a_network_for_its_patch(planned_dataset, tmp_path):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = tmp_path / "plans.json"
    shutil.copy(planned_dataset.plans_file, plans_file)
    config = SegmentationTrainingConfig(configuration="3d_cpu", patch_size=(16, 32, 32), batch_size=2)
    add_cpu_configuration(plans_file, config)
    resolved = PlansManager(json.loads(plans_file.read_text())).get_configuration("3d_cpu")
    assert resolved.patch_size == [16, 32, 32] and resolved.batch_size == 2
    assert resolved.spacing == json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["spacing"]
    kwargs = resolved.network_arch_init_kwargs
    assert len(kwargs["strides"]) == kwargs["n_stages"] == len(kwargs["features_per_stage"])
    network = get_network_from_plans(
        resolved.network_arch_class_name,
        kwargs,
        resolved.network_arch_init_kwargs_req_import,
        1,
        3,
        allow_init=True,
        deep_supervision=False,
    )
    with torch.no_grad():
        assert network(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 3, 16, 32, 32)


def test_a_coarser_spacing_gets_its_own_data_and_a_matching_patch(planned_dataset, tmp_path):
    plans_file = tmp_path / "plans.json"
    shutil.copy(planned_dataset.plans_file, plans_file)
    reduced = add_cpu_configuration(plans_file, SegmentationTrainingConfig(spacing=(12.0, 12.0)))
    # The tiny cases are 48x48 at 6 mm: 24x24 at 12 mm, which nnU-Net's topology keeps.
    assert reduced["spacing"] == [12.0, 12.0] and reduced["patch_size"] == [24, 24]
    assert reduced["data_identifier"] == "nnUNetPlans_2d_cpu"
    assert reduced["architecture"]["arch_kwargs"]["n_stages"] == len(reduced["architecture"]["arch_kwargs"]["strides"])
    with pytest.raises(ValueError, match="needs 2 values"):
        add_cpu_configuration(plans_file, SegmentationTrainingConfig(spacing=(3.0, 3.0, 3.0)))


def test_cpu_bf16_is_used_on_the_cpu_only_and_by_default_where_the_cpu_has_bfloat16(monkeypatch):
    from hcc_assets.segmentation import config as segmentation_config

    uses = segmentation_config.uses_cpu_bf16
    assert not uses(SegmentationTrainingConfig(device="cuda", cpu_bf16=True))  # CUDA: nnU-Net's own AMP
    assert uses(SegmentationTrainingConfig(cpu_bf16=True))
    assert not uses(SegmentationTrainingConfig(cpu_bf16=False))
    for native in (True, False):
        monkeypatch.setattr(segmentation_config, "cpu_has_native_bf16", lambda native=native: native)
        assert uses(SegmentationTrainingConfig()) is native
