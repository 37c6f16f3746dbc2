import os
from pathlib import Path

import dagster as dg
import yaml

from hcc_assets.defs import analysis, cohort, deep, ingest, maintenance, segmentation

ALL_ASSETS = dg.load_assets_from_modules([ingest, cohort, segmentation, deep, analysis, maintenance])  # once: definitions.py uses these
COHORT_GROUPS = ("cohort", "models")  # what cohort_refresh runs
ANALYSIS_GROUPS = ("analysis",)  # what analysis_refresh runs
# asset name -> group, for cutting run config down to the assets a run executes
_GROUP_OF = {key.to_user_string(): group for a in ALL_ASSETS for key, group in a.group_names_by_key.items()}


def asset_names_in_groups(*groups: str) -> tuple[str, ...]:
    """The assets an asset job on `groups` executes."""
    return tuple(sorted(name for name, group in _GROUP_OF.items() if group in groups))


# Per-patient runs execute their steps in the run's own process: one start-up (importing dagster,
# torch, nnU-Net, pyradiomics: ~5-10 s on 2 cores) per run instead of one per step, which is most
# of a new scan's latency. Parallelism comes from several runs at once (`concurrency.runs` in
# dagster.yaml).
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
# A deployment's run config for per-patient runs (ops/resources sections, YAML), e.g. another
# preprocessing grid: `ops: {preprocessed_volume: {config: {target_shape: [96, 96, 48]}}}`.
PATIENT_RUN_CONFIG_ENV = "HCC_ASSETS_PATIENT_RUN_CONFIG"
# The same for cohort-level runs that the schedule and sensors launch (cohort_refresh,
# analysis_refresh), e.g. `ops: {hcc_classifier: {config: {medicalnet_checkpoint: /models/r50.pth}}}`.
COHORT_RUN_CONFIG_ENV = "HCC_ASSETS_COHORT_RUN_CONFIG"

# Dagster refuses run config for an op that a run does not execute, so each job (and each subset
# run) gets only its own assets' sections of a run-config file.


def _run_config_file(env: str) -> dict:
    path = os.environ.get(env, "").strip()
    extra = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
    if not isinstance(extra, dict):
        raise ValueError(f"{env}={path}: expected a mapping of run config, got {type(extra).__name__}")
    return extra


def _only_ops_of(config: dict, asset_names) -> dict:
    if "ops" not in config or asset_names is None:
        return config
    names = set(asset_names)
    return {**config, "ops": {name: section for name, section in config["ops"].items() if name in names}}


def patient_run_config(asset_names=None) -> dict:
    """The run config of a per-patient run that brings none of its own (sensor run requests, the
    UI's partition launch): the in-process executor, plus the file at $HCC_ASSETS_PATIENT_RUN_CONFIG
    when set (read when the definitions load; its own `execution` section wins), its `ops` limited
    to `asset_names` (the assets the run executes). A run that brings its own run config replaces
    all of this (the CLI's runner picks its executor itself)."""
    return _only_ops_of({**IN_PROCESS, **_run_config_file(PATIENT_RUN_CONFIG_ENV)}, asset_names)


def cohort_run_config(asset_names=None) -> dict:
    """Run config for a scheduled or sensor-launched cohort-level run: the file at
    $HCC_ASSETS_COHORT_RUN_CONFIG, read at each request (an edit applies to the next run without a
    restart), its `ops` limited to `asset_names`. Empty when unset: the assets' defaults."""
    return _only_ops_of(_run_config_file(COHORT_RUN_CONFIG_ENV), asset_names)


# Per patient: ingest, then the features that need a trained model (mask, radiomics, embedding).
patient_ingest_job = dg.define_asset_job(
    name="patient_ingest",
    selection=dg.AssetSelection.groups("ingest"),
    config=patient_run_config(asset_names_in_groups("ingest")),
    description="Ingest one patient partition: raw_scan -> nifti_volume -> preprocessed_volume.",
)

patient_features_job = dg.define_asset_job(
    name="patient_features",
    selection=dg.AssetSelection.groups("features"),
    config=patient_run_config(asset_names_in_groups("features")),
    description="Model-derived features of one patient partition from the current models; what the "
    "refresh chain runs for every patient whose mask or embedding is not from the current model.",
)

patient_pipeline_job = dg.define_asset_job(
    name="patient_pipeline",
    selection=dg.AssetSelection.groups("ingest", "features"),
    config=patient_run_config(asset_names_in_groups("ingest", "features")),
    description="Everything per patient; what the drop-zone sensor runs for a new study.",
)

cohort_job = dg.define_asset_job(
    name="cohort_refresh",
    selection=dg.AssetSelection.groups(*COHORT_GROUPS),
    description="Cohort-level assets over all ingested patients: split and model training.",
)

analysis_job = dg.define_asset_job(
    name="analysis_refresh",
    selection=dg.AssetSelection.groups(*ANALYSIS_GROUPS),
    description="The study's analysis over every patient's features: explainable DL features, LASSO models, "
    "metrics with bootstrap CIs, coefficients and the report.",
)
