"""Real nnU-Net v2: raw dataset -> plans with 2d_cpu -> short training -> predictor."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from hcc_assets.segmentation import TRAINING_SUMMARY, LiverSegmenter, mask_quality, validate_model_folder
from hcc_assets_tests.segmentation.conftest import TRAINING
from hcc_assets_tests.segmentation.synthetic import synthetic_case


def test_raw_dataset_follows_nnunet_layout(trained_model):
    folder = trained_model.raw_dir / "Dataset501_HccLiver"
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    assert dataset["channel_names"] == {"0": "T2"} and dataset["numTraining"] == 6
    assert sorted(p.name for p in (folder / "imagesTr").iterdir())[0] == "case000_0000.nii.gz"
    assert sorted(p.name for p in (folder / "labelsTr").iterdir())[0] == "case000.nii.gz"


def test_plans_hold_the_reduced_2d_configuration(trained_model):
    plans = json.loads(trained_model.plans_file.read_text())
    reduced = plans["configurations"]["2d_cpu"]
    assert reduced["inherits_from"] == "2d" and reduced["batch_size"] == 8
    kwargs = reduced["architecture"]["arch_kwargs"]
    assert kwargs["features_per_stage"] == [min(16 * 2**i, 256) for i in range(kwargs["n_stages"])]
    assert (trained_model.preprocessed_dir / "Dataset501_HccLiver" / "nnUNetPlans_2d").is_dir()


def test_model_folder_is_nnunets_layout_with_a_summary(trained_model):
    folder = trained_model.folder
    assert folder.name == "HccCpuTrainer__nnUNetPlans__2d_cpu"
    for name in ("plans.json", "dataset.json", "fold_all/checkpoint_final.pth"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("fold_all/validation")), "the mirrored final validation is skipped on CPU"
    summary = json.loads((folder / TRAINING_SUMMARY).read_text())
    assert len(summary["seconds_per_epoch"]) == TRAINING["epochs"]
    assert summary["train_loss"][-1] < summary["train_loss"][0]


def test_validate_model_folder_accepts_the_trained_model(trained_model):
    info = validate_model_folder(trained_model.folder)
    assert (info.trainer_name, info.plans_name, info.configuration) == ("HccCpuTrainer", "nnUNetPlans", "2d_cpu")
    assert info.folds == ("all",) and info.checkpoint_name == "checkpoint_final.pth"
    assert info.labels == {"background": 0, "liver": 1, "spleen": 2} and info.reorient_to_ras
    checkpoint = trained_model.folder / "fold_all" / "checkpoint_final.pth"
    assert info.checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_augmentation_stays_in_the_anatomical_frame(trained_model, tmp_path):
    """Volumes reach the network reoriented to RAS: rotations up to 15 degrees, no mirroring in
    training, and the model tells the predictor not to mirror either."""
    import torch

    from hcc_assets.segmentation.nnunet_env import nnunet_environment
    from hcc_assets.segmentation.training import trainer_plans

    checkpoint = torch.load(
        trained_model.folder / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    assert checkpoint["inference_allowed_mirroring_axes"] is None
    with nnunet_environment(preprocessed=trained_model.preprocessed_dir, results=tmp_path):
        from hcc_assets.segmentation.nnunet_trainers.hcc_cpu_trainer import HccCpuTrainer

        trainer = HccCpuTrainer(
            plans=trainer_plans(trained_model.plans_file),
            configuration="2d_cpu",
            fold="all",
            dataset_json=json.loads((trained_model.folder / "dataset.json").read_text()),
            device=torch.device("cpu"),
        )
        rotation, _, initial_patch, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None
    assert rotation == pytest.approx((-np.deg2rad(15), np.deg2rad(15)))
    assert all(side >= patch for side, patch in zip(initial_patch, trainer.configuration_manager.patch_size))


@pytest.fixture(scope="module")
def segmenter(trained_model):
    return LiverSegmenter(trained_model.folder, device="cpu")


@pytest.mark.parametrize(
    "storage", [dict(), dict(lps_storage=True), dict(oblique_deg=8.0)], ids=["ras", "lps", "oblique"]
)
def test_prediction_is_on_the_image_grid_and_finds_the_liver(segmenter, storage):
    image, reference = synthetic_case(seed=100 + len(storage), **storage)  # not a training case
    mask = segmenter.predict(image)
    assert mask.shape == image.shape and np.array_equal(mask.affine, image.affine)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    quality = mask_quality(mask, reference)
    # Short training on tiny cases suffices for this contrast (see conftest.TRAINING).
    assert quality["dice_liver"] > 0.8, quality
    assert quality["dice_spleen"] > 0.7, quality


@pytest.mark.parametrize(
    "ornt",
    [[[1, 1], [0, 1], [2, 1]], [[0, -1], [1, 1], [2, 1]], [[1, -1], [0, -1], [2, -1]]],
    ids=["transposed", "mirrored", "transposed-rotated-descending"],
)
def test_the_same_anatomy_stored_in_another_voxel_order_gets_the_same_mask(segmenter, ornt):
    """Readout and phase swapped, a feet-first or prone position, descending slices: the voxels the
    model sees are the same, and so is the mask, voxel for voxel, once put back in one order."""
    image, _ = synthetic_case(seed=112, shape=(52, 44, 16), lps_storage=True)
    stored = image.as_reoriented(np.array(ornt))
    assert not np.array_equal(np.asarray(stored.dataobj), np.asarray(image.dataobj))
    standard, other = segmenter.predict(image), segmenter.predict(stored)
    assert np.array_equal(other.affine, stored.affine)
    assert np.array_equal(
        np.asarray(nib.as_closest_canonical(other).dataobj), np.asarray(nib.as_closest_canonical(standard).dataobj)
    )


def test_prediction_survives_a_save_and_load(segmenter, tmp_path):
    image, _ = synthetic_case(seed=110)
    mask = segmenter.predict(image)
    nib.save(mask, tmp_path / "mask.nii.gz")
    loaded = nib.load(tmp_path / "mask.nii.gz")
    assert np.array_equal(np.asarray(loaded.dataobj), np.asarray(mask.dataobj))
    assert np.allclose(loaded.affine, image.affine, atol=1e-5)


def test_batched_windows_give_nnunets_own_logits(segmenter, monkeypatch):
    """batched_windows changes only how many windows go through the network at once: nnU-Net's own
    one-window loop gives the same logits and mask. Small batches force several passes, the last one
    partial, so the batching's edges are crossed."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from hcc_assets.segmentation import batched_windows

    predictor = segmenter._predictor
    image, _ = synthetic_case(seed=111)
    data = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)[None].copy())
    slicers = predictor._internal_get_sliding_window_slicers(data.shape[1:])
    assert len(slicers) > 3
    patch_voxels = int(np.prod(predictor.configuration_manager.patch_size))
    monkeypatch.setattr(batched_windows, "WINDOW_BATCH_VOXELS", 3 * patch_voxels)
    batched = predictor._internal_predict_sliding_window_return_logits(data, slicers, False)
    one_by_one = nnUNetPredictor._internal_predict_sliding_window_return_logits(predictor, data, slicers, False)
    assert batched.shape == one_by_one.shape
    assert torch.allclose(batched.float(), one_by_one.float(), atol=1e-2), (batched - one_by_one).abs().max()
    assert torch.equal(batched.argmax(0), one_by_one.argmax(0))


def test_cpu_bf16_runs_the_forward_pass_in_bfloat16_keeps_float32_weights_and_is_repeatable(planned_dataset, tmp_path):
    """SegmentationTrainingConfig.cpu_bf16: one training step from the same weights and batch, in
    float32 and in bfloat16 (twice): the network's first convolution computes in bfloat16 only when
    asked, the parameters stay float32, the loss agrees with float32's to bfloat16's precision, and
    the same step gives the same weights."""
    import torch

    from hcc_assets.segmentation.nnunet_env import nnunet_environment
    from hcc_assets.segmentation.training import trainer_plans

    dataset_json = json.loads((planned_dataset.preprocessed_dir / "Dataset501_HccLiver" / "dataset.json").read_text())

    def one_step(cpu_bf16: bool):
        torch.manual_seed(0)  # the same initial weights for every trainer
        with nnunet_environment(preprocessed=planned_dataset.preprocessed_dir, results=tmp_path):
            from hcc_assets.segmentation.nnunet_trainers.hcc_cpu_trainer import HccCpuTrainer

            trainer = HccCpuTrainer(
                plans=trainer_plans(planned_dataset.plans_file),
                configuration="2d_cpu",
                fold="all",
                dataset_json=dataset_json,
                device=torch.device("cpu"),
            )
            trainer.initialize()
        trainer.cpu_bf16 = cpu_bf16
        patch = list(trainer.configuration_manager.patch_size)
        data = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(1))
        label = (data > 0.5).float()
        targets = [
            torch.nn.functional.interpolate(label, size=[max(1, round(p * s)) for p, s in zip(patch, scale)])
            for scale in trainer._get_deep_supervision_scales()
        ]
        computed_in = []
        first_conv = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda module, inputs, output: computed_in.append(output.dtype))
        loss = float(trainer.train_step({"data": data, "target": targets})["loss"])
        return computed_in, loss, {name: p.detach().clone() for name, p in trainer.network.named_parameters()}

    fp32_dtypes, fp32_loss, fp32_weights = one_step(False)
    bf16_dtypes, bf16_loss, bf16_weights = one_step(True)
    _, again_loss, again_weights = one_step(True)
    assert fp32_dtypes == [torch.float32] and bf16_dtypes == [torch.bfloat16]
    assert all(w.dtype == torch.float32 for w in [*fp32_weights.values(), *bf16_weights.values()])
    assert np.isfinite(bf16_loss) and bf16_loss == pytest.approx(fp32_loss, rel=0.02)
    assert any(not torch.equal(bf16_weights[n], fp32_weights[n]) for n in fp32_weights)  # bfloat16 did compute
    assert again_loss == bf16_loss and all(torch.equal(again_weights[n], bf16_weights[n]) for n in bf16_weights)


def test_a_model_trained_in_bfloat16_predicts_in_bfloat16_where_the_cpu_has_it(trained_model, tmp_path, monkeypatch):
    """The training summary says how the model trained; a model trained with cpu_bf16 predicts under
    bfloat16 autocast where the CPU has bfloat16 instructions (the same mask up to edge voxels), and
    in float32 where it has not; a user's folder without our summary stays float32."""
    import shutil

    from hcc_assets.segmentation import inference

    copy = tmp_path / trained_model.folder.name
    shutil.copytree(trained_model.folder, copy)
    summary = json.loads((copy / TRAINING_SUMMARY).read_text())
    summary["config"]["cpu_bf16"] = True
    (copy / TRAINING_SUMMARY).write_text(json.dumps(summary))
    assert inference.trained_in_cpu_bf16(copy) and not inference.trained_in_cpu_bf16(trained_model.folder)
    (tmp_path / "user").mkdir()
    assert not inference.trained_in_cpu_bf16(tmp_path / "user")

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert not LiverSegmenter(copy, device="cpu").cpu_bf16
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    in_bf16 = LiverSegmenter(copy, device="cpu")
    assert in_bf16.cpu_bf16 and in_bf16._predictor.cpu_bf16
    image, reference = synthetic_case(seed=112)
    masks = [
        np.asarray(s.predict(image).dataobj) for s in (in_bf16, LiverSegmenter(trained_model.folder, device="cpu"))
    ]
    assert np.array_equal(masks[0], np.asarray(in_bf16.predict(image).dataobj))  # repeatable
    assert np.mean(masks[0] != masks[1]) < 0.01  # bfloat16 moves a few edge voxels at most
    assert mask_quality(in_bf16.predict(image), reference)["dice_liver"] > 0.8
