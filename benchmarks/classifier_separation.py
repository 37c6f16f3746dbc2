"""Does the deep classifier separate HCC from healthy on validation, and only when there is signal?

For each cohort (a synthetic 40-patient drop-layout cohort: `--seeds` with `--lesion-contrast`,
`--null-seeds` with lesion contrast 0), the pipeline's own steps without Dagster: T2 series choice,
DICOM -> NIfTI, preprocessing to 128x128x64, the cohort's stratified 80:20 split (seed 20230601),
then `train_classifier` with the study's defaults (ClassifierConfig). Printed per cohort: training
and validation accuracy, validation ROC AUC of the classifier, and validation ROC AUC of a logistic
regression on the 128-d embeddings (z-scored, fit on the training patients, scored on validation).
A validation split holds 8 patients (4 per class), so one seed's validation AUC is coarse (steps of
1/16; a chance-level score has a standard deviation of about 0.22 there): each model is also scored
on all patients of the next cohort of its kind ("independent": seeds 7 8 9 -> 8 9 7), which was
never seen in training or early stopping.
Preprocessed cohorts are kept under `--cache` (keyed by seed, contrast, patients and the lesion
radius range), so a rerun skips synthesis.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/classifier_separation.py \\
        --seeds 7 8 --lesion-contrast 1 --null-seeds 7 [--lungs] [--threads 1] [--cache /tmp/sep_cache] [--amp]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: busy-waiting OpenMP is ~10x slower here

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hcc_assets.deep import ClassifierConfig, cpu_bf16_active, train_classifier
from hcc_assets.deep.train import _run
from hcc_assets.imaging import dicom_series, nifti, preprocess
from hcc_assets.stats.split import stratified_split
from hcc_assets.synthetic import cohort as synth
from hcc_assets.synthetic import phantom

COHORT_SPLIT_SEED = 20230601  # hcc_assets.defs.cohort.CohortConfig.seed
VALIDATION_FRACTION = 0.2


def preprocessed_cohort(
    seed: int, contrast: float, patients: int, cache: Path, lungs: bool = False
) -> dict[str, np.ndarray]:
    """Volumes (N, 128, 128, 64), labels, validation flags and lesion voxel counts of one cohort."""
    lo, hi = phantom.LESION_RADIUS
    path = cache / f"cohort_s{seed}_c{contrast:g}_n{patients}_r{lo:g}-{hi:g}{'_lungs' if lungs else ''}.npz"
    if path.exists():
        with np.load(path) as stored:
            return dict(stored)
    config = synth.SynthConfig(patients=patients, seed=seed, lesion_contrast=contrast, lungs=lungs)
    settings = preprocess.PreprocessConfig()
    volumes, labels, ids, lesion_voxels = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for patient in synth.synthesize_cohort(Path(folder), config):
            study = dicom_series.inventory_study(patient.t2_series_dir.parents[1])
            series = dicom_series.choose_t2_series(study).series
            image = preprocess.preprocess_volume(nifti.series_to_nifti(series), settings)
            volume = np.asarray(image.dataobj, dtype=np.float32)
            # lesion voxels on the model grid, from the phantom (RAS voxel centres -> LPS)
            ijk = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"), -1).reshape(-1, 3)
            lps = (ijk @ image.affine[:3, :3].T + image.affine[:3, 3]) * np.array([-1.0, -1.0, 1.0])
            _, lesion_ids = synth.phantom_labels(config, patient.patient_key, lps)
            volumes.append(volume)
            labels.append(patient.hcc)
            ids.append(patient.patient_key)
            lesion_voxels.append(int(np.count_nonzero(lesion_ids)))
    split = stratified_split(ids, labels, VALIDATION_FRACTION, COHORT_SPLIT_SEED)
    cohort = dict(
        volumes=np.stack(volumes),
        labels=np.array(labels),
        lesion_voxels=np.array(lesion_voxels),
        validation=np.array([split[p] == "validation" for p in ids]),
    )
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **cohort)
    return cohort


def evaluate(
    name: str, cohort: dict[str, np.ndarray], config: ClassifierConfig, independent: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    volumes, labels, validation = cohort["volumes"], cohort["labels"].astype(int), cohort["validation"]
    train, val = ~validation, validation
    started = time.perf_counter()
    result = train_classifier(volumes[train], labels[train], volumes[val], labels[val], config)
    logits, embeddings = _run(result.model, volumes, batch_size=config.batch_size, device="cpu")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=10000))
    probe.fit(embeddings[train], labels[train])
    row = dict(
        train_acc=result.final_metrics["train_acc"],
        val_acc=result.final_metrics["val_acc"],
        val_auc=roc_auc_score(labels[val], logits[val]),
        embedding_lr_val_auc=roc_auc_score(labels[val], probe.predict_proba(embeddings[val])[:, 1]),
        best_epoch=result.best_epoch,
        epochs=len(result.history),
    )
    independent_text = ""
    if independent is not None:
        other_logits, other_embeddings = _run(result.model, independent["volumes"], config.batch_size, "cpu")
        other_labels = independent["labels"].astype(int)
        row["independent_auc"] = roc_auc_score(other_labels, other_logits)
        other_probabilities = probe.predict_proba(other_embeddings)[:, 1]
        row["independent_embedding_lr_auc"] = roc_auc_score(other_labels, other_probabilities)
        independent_text = (
            f"  | independent cohort ({len(other_labels)}): AUC {row['independent_auc']:.2f}, "
            f"embedding-LR {row['independent_embedding_lr_auc']:.2f}"
        )
    row["seconds"] = time.perf_counter() - started
    hcc = cohort["lesion_voxels"][labels == 1]
    print(
        f"{name:28s} train acc {row['train_acc']:.2f}  val acc {row['val_acc']:.2f}  val AUC {row['val_auc']:.2f}  "
        f"embedding-LR val AUC {row['embedding_lr_val_auc']:.2f}{independent_text}  "
        f"(best epoch {row['best_epoch']}/{row['epochs']}, "
        f"{row['seconds']:.0f} s; lesion voxels per HCC patient median {np.median(hcc):.0f}, "
        f"range {hcc.min()}-{hcc.max()} of {volumes[0].size})",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[7, 8], help="signal cohorts")
    parser.add_argument("--lesion-contrast", type=float, default=1.0, help="of the signal cohorts")
    parser.add_argument("--null-seeds", type=int, nargs="*", default=[7], help="null cohorts (lesion contrast 0)")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--lungs", action="store_true", help="cohorts with lung bases (SynthConfig.lungs; make demo's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "hcc_classifier_separation"))
    parser.add_argument("--min-epochs", type=int, help="override the study's (quick looks only)")
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument(
        "--amp",
        action="store_true",
        help="the frozen trunk in bfloat16 where the CPU has it (the platform's default there: compute.mixed_precision)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("min_epochs", args.min_epochs), ("max_epochs", args.max_epochs)) if v}
    config = ClassifierConfig(**overrides, amp=args.amp)
    print(f"ClassifierConfig: {config.model_dump(exclude={'medicalnet_checkpoint', 'device'})}")
    print(f"frozen trunk in bfloat16: {cpu_bf16_active('cpu', config.amp)}")
    print(f"lesion radius {phantom.LESION_RADIUS} mm, torch threads {torch.get_num_threads()}", flush=True)
    cache = Path(args.cache)
    cohorts = [(f"signal seed {s} contrast {args.lesion_contrast:g}", s, args.lesion_contrast) for s in args.seeds]
    cohorts += [(f"null   seed {s} contrast 0", s, 0.0) for s in args.null_seeds]
    data = {}
    for name, seed, contrast in cohorts:
        started = time.perf_counter()
        data[name] = preprocessed_cohort(seed, contrast, args.patients, cache, args.lungs)
        prepared = time.perf_counter() - started
        if prepared > 1:
            print(f"  ({name}: synthesized and preprocessed in {prepared:.0f} s)", flush=True)
    rows = {}
    for kind in ("signal", "null"):
        names = [name for name in data if name.startswith(kind)]
        for index, name in enumerate(names):
            other = names[(index + 1) % len(names)] if len(names) > 1 else None
            rows[name] = evaluate(name, data[name], config, data[other] if other else None)
        chosen = [rows[name] for name in names]
        if chosen:
            summary = {key: np.mean([r[key] for r in chosen]) for key in chosen[0] if "auc" in key}
            print(
                f"{kind}: means over {len(chosen)} cohort(s): "
                + ", ".join(f"{key} {value:.2f}" for key, value in summary.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
