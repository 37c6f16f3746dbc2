"""The whole asset graph on a small synthetic cohort, through real Dagster materializations: ingest,
split, nnU-Net training (reduced, brief), masks, pyradiomics, a depth-10 classifier on 32x32x16
volumes, embeddings, then the analysis group. Shared by the analysis tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from hcc_assets.defs import analysis, cohort, deep, ingest, predictions, segmentation
from hcc_assets.defs.resources import ComputeResource, LakeResource
from hcc_assets.featurestore import FeatureStore
from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort

ALL_ASSETS = dg.load_assets_from_modules([ingest, cohort, segmentation, deep, analysis, predictions])
STUDY_COHORT = dict(patients=40, matrix=64, slices_min=12, slices_max=16, oblique_fraction=0.3)
RUN_CONFIG = {
    "ops": {
        "preprocessed_volume": {"config": {"target_shape": [32, 32, 16]}},
        # see test_segmentation_assets: native-spacing 2d_cpu, brief
        "liver_segmentation_model": {
            "config": {
                "epochs": 12,
                "iterations_per_epoch": 25,
                "val_iterations_per_epoch": 2,
                "initial_lr": 0.02,
                "spacing": [],
                "seed": 7,
            }
        },
        "hcc_classifier": {
            "config": {
                "depth": 10,
                "lr": 0.05,
                "min_epochs": 20,
                "max_epochs": 40,
                "patience": 10,
                "batch_size": 8,
                "seed": 0,
            }
        },
        "explainability_sweep": {
            "config": {"thresholds": [0.3, 0.5, 0.7], "measures": ["pearson", "spearman", "distance"]}
        },
        "model_metrics": {"config": {"n_bootstrap": 1000, "cv_splits": 5, "cv_repeats": 2}},
    }
}


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
    "models": ["cohort", "liver_segmentation_model", "hcc_classifier"],
    "features": ["liver_mask", "radiomic_features", "deep_embedding"],
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
}


def _run(instance, lake, group: str, partition_key=None, **config) -> dg.ExecuteInProcessResult:
    names = GROUPS[group]
    ops = {name: op for name, op in {**RUN_CONFIG["ops"], **config}.items() if name in names}
    return dg.materialize(
        ALL_ASSETS,
        selection=names,
        partition_key=partition_key,
        instance=instance,
        resources={"lake": lake, "compute": ComputeResource(device="cpu", cpu_threads=1)},
        run_config={"ops": ops},
        raise_on_error=False,
    )


def _must(result: dg.ExecuteInProcessResult, what: str) -> None:
    if not result.success:
        failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
        raise AssertionError(f"{what} failed: {failures[:2]}")


def run_study(root: Path, seed: int, lesion_contrast: float, null_cohort: bool = False) -> Study:
    """The graph, then every patient's hcc_prediction. `null_cohort`: see below."""
    incoming = root / "incoming"
    patients = synthesize_cohort(incoming, SynthConfig(seed=seed, lesion_contrast=lesion_contrast, **STUDY_COHORT))
    (root / "lake" / "private").mkdir(parents=True)
    (root / "lake" / "private" / "pseudonym.key").write_text(f"study-test-{seed}")
    lake = LakeResource(root=str(root / "lake"), incoming=str(incoming), quiet_seconds=3600)
    with dg.instance_for_test() as instance:
        pids = sorted(lake.ready_patients())
        instance.add_dynamic_partitions("patients", pids)
        for pid in pids:
            _must(_run(instance, lake, "ingest", pid), f"ingest {pid}")
        # null cohort: the classifier may (rightly) fail its blocking beats-chance check; the study
        # goes on with it, as a user would with accept_below_chance / allow_model_below_chance
        accept = (
            {
                "hcc_classifier": {
                    "config": {**RUN_CONFIG["ops"]["hcc_classifier"]["config"], "accept_below_chance": True}
                }
            }
            if null_cohort
            else {}
        )
        models = _run(instance, lake, "models", **accept)
        if null_cohort and not models.success:
            failures = [e.step_failure_data.error.message for e in models.all_events if e.is_step_failure]
            assert all("beats_chance_on_training" in f for f in failures), failures
        else:
            _must(models, "cohort and models")
        embed = {"deep_embedding": {"config": {"allow_model_below_chance": null_cohort}}}
        for pid in pids:
            _must(_run(instance, lake, "features", pid, **embed), f"features {pid}")
        result = _run(instance, lake, "analysis")
        _must(result, "analysis")
        for pid in pids:
            _must(_run(instance, lake, "predictions", pid), f"hcc_prediction {pid}")
    return Study(
        root, lake, pids, result, {text for patient in patients for text in (*patient.phi, patient.patient_key)}
    )
