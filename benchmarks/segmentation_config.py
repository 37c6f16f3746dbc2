"""How fast does a reduced nnU-Net configuration train, and how well does it segment unseen livers?

Trains one `SegmentationTrainingConfig` on an ingested lake's training patients (those with a
reference mask, the cohort's validation split held out, as `liver_segmentation_model` does),
then predicts every validation patient on its native grid and prints its liver Dice against the
reference mask, with the training and inference seconds. Nothing is written to the lake: the
nnU-Net dataset, plans and model live in a temporary folder.

    make demo LAKE=/tmp/lake    # or any lake with an ingested cohort and cohort_split
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/segmentation_config.py --lake /tmp/lake \\
        --spacing 3.2 3.2 --epochs 8 --iterations 40 [--patch 128 128] [--base-features 16] \\
        [--max-features 256] [--batch 8] [--lr 0.02] [--threads 2] [--cpu-bf16 auto|on|off]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is ~10x slower here

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def weights_digest(model_folder: Path) -> str:
    """sha256 over the network weights of every fold's final checkpoint (the checkpoint file itself
    also holds the training log's timestamps, so its own hash differs between identical runs)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for checkpoint in sorted(Path(model_folder).glob("fold_*/checkpoint_final.pth")):
        weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
        for name in sorted(weights):
            digest.update(name.encode())
            digest.update(weights[name].cpu().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lake", required=True)
    parser.add_argument("--configuration", default="2d_cpu")
    parser.add_argument("--spacing", type=float, nargs="*", default=[3.2, 3.2])
    parser.add_argument("--patch", type=int, nargs="*", default=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--val-iterations", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--base-features", type=int, default=16)
    parser.add_argument("--max-features", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cpu-bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="the forward pass in bfloat16 on the CPU (cpu_bf16; auto: where the CPU has bfloat16 instructions)",
    )
    args = parser.parse_args()
    os.environ["HCC_ASSETS_LAKE"] = args.lake

    import torch

    torch.set_num_threads(args.threads)
    from hcc_assets.defs.resources import default_lake_resource
    from hcc_assets.featurestore import FeatureStore, reads
    from hcc_assets.lake import NIFTI_FILE, REFERENCE_MASK_FILE, DataLake
    from hcc_assets.segmentation import (
        LiverSegmenter,
        SegmentationTrainingConfig,
        build_raw_dataset,
        keep_largest_components,
        mask_quality,
        plan_and_preprocess,
        train,
    )

    resource = default_lake_resource()
    store = FeatureStore(resource.feature_store_catalog, resource.feature_store_data or None)
    lake = DataLake(args.lake)
    with_masks = reads.reference_mask_volumes(store)["patient_id"].to_list()
    validation = sorted(reads.validation_patients(store) & set(with_masks))
    training = sorted(set(with_masks) - set(validation))
    config = SegmentationTrainingConfig(
        configuration=args.configuration,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations,
        val_iterations_per_epoch=args.val_iterations,
        batch_size=args.batch,
        base_features=args.base_features,
        max_features=args.max_features,
        patch_size=tuple(args.patch) if args.patch else None,
        spacing=tuple(args.spacing) or None,
        initial_lr=args.lr,
        seed=args.seed,
        num_threads=args.threads,
        cpu_bf16={"auto": None, "on": True, "off": False}[args.cpu_bf16],
    )
    print(f"{len(training)} training, {len(validation)} validation patients; {config.model_dump(mode='json')}")
    with tempfile.TemporaryDirectory(prefix="seg-bench-") as work:
        work = Path(work)
        sources = [
            (pid, Path(lake.patient_file(pid, NIFTI_FILE)), Path(lake.patient_file(pid, REFERENCE_MASK_FILE)))
            for pid in training
        ]
        started = time.perf_counter()
        build_raw_dataset(sources, work / "raw", config.dataset_id, config.dataset_name)
        plan_and_preprocess(config, work / "raw", work / "preprocessed")
        planned = time.perf_counter()
        folder = train(config, work / "preprocessed", work / "results")
        trained = time.perf_counter()
        segmenter = LiverSegmenter(folder, num_threads=args.threads)
        checkpoint = weights_digest(folder)
        dice = {}
        for pid in validation:
            image = nib.load(lake.patient_file(pid, NIFTI_FILE))
            reference = nib.load(lake.patient_file(pid, REFERENCE_MASK_FILE))
            dice[pid] = mask_quality(keep_largest_components(segmenter.predict(image)), reference)["dice_liver"]
        predicted = time.perf_counter()
    values = np.array(list(dice.values()))
    print("liver Dice per validation patient: " + ", ".join(f"{pid} {d:.3f}" for pid, d in dice.items()))
    print(
        f"RESULT min Dice {values.min():.3f}, mean {values.mean():.3f}; plan+preprocess {planned - started:.1f} s, "
        f"training {trained - planned:.1f} s, inference {(predicted - trained) / len(validation):.2f} s per patient; "
        f"weights sha256 {checkpoint[:16]} (the same config twice gives the same one when training is deterministic)"
    )


if __name__ == "__main__":
    main()
