"""Mode (a): a user-supplied nnU-Net v2 model folder is checked before anything unpickles it."""

import hashlib
import json

import pytest

from hcc_assets.segmentation import ModelFolderError, validate_model_folder


def make_folder(
    root,
    name="nnUNetTrainer__nnUNetPlans__3d_fullres",
    labels=None,
    channels=None,
    reader="SimpleITKIO",
    checkpoints=(("0", "checkpoint_final.pth"),),
):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(
        json.dumps({"configurations": {"3d_fullres": {}, "2d": {}}, "image_reader_writer": reader})
    )
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "labels": labels if labels is not None else {"background": 0, "Liver": 1},
                "channel_names": channels if channels is not None else {"0": "MRI"},
                "file_ending": ".nii.gz",
            }
        )
    )
    for fold, checkpoint in checkpoints:
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        (folder / f"fold_{fold}" / checkpoint).write_bytes(f"weights {fold}".encode())
    return folder


def test_accepts_a_foreign_model_and_reports_what_it_found(tmp_path):
    folder = make_folder(
        tmp_path,
        checkpoints=[
            ("0", "checkpoint_final.pth"),
            ("1", "checkpoint_final.pth"),
            ("1", "checkpoint_best.pth"),
            ("all", "checkpoint_final.pth"),
        ],
    )
    info = validate_model_folder(folder)
    assert (info.trainer_name, info.configuration) == ("nnUNetTrainer", "3d_fullres")
    assert info.folds == (0, 1), "numbered folds form the ensemble; fold_all is ignored next to them"
    assert info.checkpoint_name == "checkpoint_final.pth" and not info.reorient_to_ras
    assert info.checkpoint_sha256 == hashlib.sha256(b"weights 0weights 1").hexdigest()


def test_falls_back_to_the_best_checkpoint(tmp_path):
    info = validate_model_folder(make_folder(tmp_path, checkpoints=[("all", "checkpoint_best.pth")]))
    assert info.folds == ("all",) and info.checkpoint_name == "checkpoint_best.pth"


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: (f / "plans.json").unlink(), "plans.json is missing"),
        (lambda f: (f / "dataset.json").write_text("{oops"), "dataset.json (dataset) is not valid JSON"),
        (lambda f: (f / "fold_0" / "checkpoint_final.pth").unlink(), "no fold_<n>/ or fold_all/ folder with"),
    ],
)
def test_rejects_broken_folders(tmp_path, breakage, message):
    folder = make_folder(tmp_path)
    breakage(folder)
    with pytest.raises(ModelFolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_model_folder(folder)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels={"background": 0, "kidney": 1}), "have no 'liver' label"),
        (dict(labels={"background": 0, "liver": [1, 2]}), "labels are regions"),
        (dict(channels={"0": "T1", "1": "T2"}), "expects 2 input channels"),
        (dict(reader="Tiff3DIO"), "image_reader_writer 'Tiff3DIO' is not one of"),
        (dict(name="my_liver_model"), "is not nnU-Net's"),
        (dict(name="nnUNetTrainer__nnUNetPlans__3d_lowres"), "no configuration '3d_lowres'"),
        (dict(checkpoints=[("0", "checkpoint_final.pth"), ("1", "checkpoint_best.pth")]), "common to all folds"),
    ],
)
def test_rejects_models_we_cannot_use(tmp_path, kwargs, message):
    with pytest.raises(ModelFolderError, match=message):
        validate_model_folder(make_folder(tmp_path, **kwargs))


def test_rejects_a_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        validate_model_folder(tmp_path / "nowhere")
