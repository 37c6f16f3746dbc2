"""The whole asset graph on a 40-patient synthetic cohort, through real Dagster materializations:
ingest, split, the suite's shared nnU-Net liver model (registered as a user's trained model: the
training asset has its own tests in test_segmentation_assets), masks, pyradiomics, a depth-10
classifier on 32x32x16 volumes, embeddings, the analysis group, then a few patients' predictions
(every patient's are test_prediction_assets'). `relabel_without_signal` then turns the same study
into a null one. Shared by the analysis tests."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from hcc_assets.defs import analysis, cohort, deep, ingest, predictions, segmentation
from hcc_assets.defs.resources import LakeResource
from hcc_assets.featurestore import FeatureStore
from hcc_assets.synthetic.cohort import LABELS_FILE, SynthConfig, synthesize_cohort
from hcc_assets_tests.defs.helpers import in_memory_instance
from hcc_assets_tests.model_configs import (
    STUDY_CLASSIFIER_TRAINING,
    TEST_GRID,
    UNTRAINED_CLASSIFIER,
    suite_compute,
)

ALL_ASSETS = dg.load_assets_from_modules([ingest, cohort, segmentation, deep, analysis, predictions])
STUDY_COHORT = dict(patients=40, matrix=64, slices_min=12, slices_max=16, oblique_fraction=0.3)
RUN_CONFIG = {
    "ops": {
        "preprocessed_volume": {"config": {"target_shape": TEST_GRID}},
        "hcc_classifier": {"config": STUDY_CLASSIFIER_TRAINING},
        "explainability_sweep": {
            "config": {"thresholds": [0.3, 0.5, 0.7], "measures": ["pearson", "spearman", "distance"]}
        },
        "model_metrics": {"config": {"n_bootstrap": 1000, "cv_splits": 5, "cv_repeats": 2}},
    }
}
PREDICTED_PATIENTS = 4


@dataclass
class Study:
    root: Path
    lake: LakeResource
    pids: list[str]
    analysis: dg.ExecuteInProcessResult
    phi: set[str]  # every fake PHI string the synthetic DICOM carried

    @property
    def store(self) -> FeatureStore:
        return self.lake.store


GROUPS = {
    "ingest": ["raw_scan", "nifti_volume", "preprocessed_volume"],
    "cohort_and_classifier": ["cohort", "hcc_classifier"],
    "segmentation_model": ["liver_segmentation_model"],
    "features": ["liver_mask", "radiomic_features", "deep_embedding"],
    "embedding": ["deep_embedding"],
    "analysis": [
        "explainable_features",
        "explainability_sweep",
        "radiomic_model",
        "explainable_model",
        "model_metrics",
        "coefficients",
        "report",
    ],
    "predictions": ["hcc_prediction"],
    "radiomic_model": ["radiomic_model"],  # the LASSO on radiomics alone: its fit writes its predictions
}


def _run(instance, lake, group: str, partition_key=None, **config) -> dg.ExecuteInProcessResult:
    names = GROUPS[group]
    ops = {name: op for name, op in {**RUN_CONFIG["ops"], **config}.items() if name in names}
    return dg.materialize(
        ALL_ASSETS,
        selection=names,
        partition_key=partition_key,
        instance=instance,
        resources={"lake": lake, "compute": suite_compute()},
        run_config={"ops": ops},
        raise_on_error=False,
    )


def _must(result: dg.ExecuteInProcessResult, what: str) -> None:
    if not result.success:
        failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        raise AssertionError(f"{what} failed: {failures[:2]}")


def run_study(root: Path, seed: int, lesion_contrast: float, liver_model: Callable[[], Path]) -> Study:
    """The graph on a new cohort, with `liver_model()` (an nnU-Net folder, asked for once the cohort
    is ingested and the classifier trained) as the segmentation model."""
    incoming = root / "incoming"
    patients = synthesize_cohort(incoming, SynthConfig(seed=seed, lesion_contrast=lesion_contrast, **STUDY_COHORT))
    (root / "lake" / "private").mkdir(parents=True)
    (root / "lake" / "private" / "pseudonym.key").write_text(f"study-test-{seed}")
    lake = LakeResource(root=str(root / "lake"), incoming=str(incoming), quiet_seconds=3600)
    with in_memory_instance() as instance:
        pids = sorted(lake.ready_patients())
        instance.add_dynamic_partitions("patients", pids)
        for pid in pids:
            _must(_run(instance, lake, "ingest", pid), f"ingest {pid}")
        # the classifier first: it needs no liver model, and its training overlaps the suite's
        # shared nnU-Net training (liver_model() waits for it) instead of following it
        _must(_run(instance, lake, "cohort_and_classifier"), "cohort and classifier")
        segmentation = {"liver_segmentation_model": {"config": {"model_folder": str(liver_model())}}}
        _must(_run(instance, lake, "segmentation_model", **segmentation), "segmentation model")
        for pid in pids:
            _must(_run(instance, lake, "features", pid), f"features {pid}")
        result = _run(instance, lake, "analysis")
        _must(result, "analysis")
        for pid in pids[:PREDICTED_PATIENTS]:
            _must(_run(instance, lake, "predictions", pid), f"hcc_prediction {pid}")
    return Study(
        root, lake, pids, result, {text for patient in patients for text in (*patient.phi, patient.patient_key)}
    )


def relabel_without_signal(study: Study, seed: int) -> dg.ExecuteInProcessResult:
    """Make the study a null one, the way a user corrects labels: rewrite the drop zone's manifest
    so that the labels carry no image signal, then materialize the cohort, the classifier, every
    embedding and the analysis again. Within each true class a seeded half of the patients swap
    class, so the new labels agree with the truth for exactly half of each: no image feature, lesion
    or not, can predict them.

    The classifier does not learn (UNTRAINED_CLASSIFIER): a CNN fitted to such labels memorizes its
    training patients, and their embeddings then carry those labels into the cross-validation on
    training patients, rightly (the study's known optimism of an embedding on its own training set).
    The guard is on the analysis group, so every feature it gets must carry no label information.
    The study goes on with a classifier below chance, as a user would (accept_below_chance,
    allow_model_below_chance). Returns the analysis run."""
    manifest = Path(study.lake.incoming) / LABELS_FILE
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(seed)
    for label in ("0", "1"):
        members = [row for row in rows if row["hcc"] == label]
        for row in rng.sample(members, len(members) // 2):
            row["hcc"] = "1" if label == "0" else "0"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    accept = {"hcc_classifier": {"config": {**UNTRAINED_CLASSIFIER, "accept_below_chance": True}}}
    with in_memory_instance() as instance:
        instance.add_dynamic_partitions("patients", study.pids)
        models = _run(instance, study.lake, "cohort_and_classifier", **accept)
        if not models.success:
            failures = [e.step_failure_data.error.message for e in models.all_events if e.is_step_failure]
            assert all("beats_chance_on_training" in f for f in failures), failures
        embed = {"deep_embedding": {"config": {"allow_model_below_chance": True}}}
        for pid in study.pids:
            _must(_run(instance, study.lake, "embedding", pid, **embed), f"deep_embedding {pid}")
        # the cross-validated interval is the spread of the fold values (stats.metrics): over 5x5 folds,
        # the asset's default, not this test study's 5x2, so that its ends are not two folds' chance results
        metrics = {"config": {**RUN_CONFIG["ops"]["model_metrics"]["config"], "cv_repeats": 5}}
        result = _run(instance, study.lake, "analysis", model_metrics=metrics)
        _must(result, "analysis on relabelled patients")
    return result
