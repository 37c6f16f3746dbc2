"""The model registry in the feature store: register, current, load, and the training set a
model saw.

Every model version is a `models` row, kept for good; one per name has current = true. Each row
records `data_snapshot`, the DuckLake snapshot its training data was read at, and
`training_set`, what it read (a JSON spec: kind, feature-set or embedding version, feature names,
patients), so `training_set(store, version)` can read the same matrix again, byte for byte, after
features were recomputed and patients added.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from hcc_assets.featurestore.queries import FeatureMatrix, embedding_matrix, radiomics_matrix
from hcc_assets.featurestore.store import FeatureStore, FeatureStoreError

RADIOMICS = "radiomics"
EMBEDDINGS = "embeddings"
VOLUMES = "volumes"
REFERENCE_MASKS = "reference_masks"


def model_row(
    name: str,
    kind: str,
    path: str,
    *,
    init: str | None,
    params: dict,
    metrics: dict,
    training_patients: list[str],
    training_set: dict | None,
    version: str,
    run_id: str,
) -> pl.DataFrame:
    """One `models` row with provenance, ready for FeatureStore.register_model."""
    return FeatureStore.with_provenance(
        pl.DataFrame(
            [
                {
                    "model_name": name,
                    "kind": kind,
                    "path": path,
                    "init": init,
                    "params": json.dumps(params, sort_keys=True),
                    "training_patients": list(training_patients),
                    "metrics": json.dumps(metrics, sort_keys=True),
                    "training_set": json.dumps(training_set, sort_keys=True) if training_set is not None else None,
                }
            ],
            schema={
                "model_name": pl.String,
                "kind": pl.String,
                "path": pl.String,
                "init": pl.String,
                "params": pl.String,
                "training_patients": pl.List(pl.String),
                "metrics": pl.String,
                "training_set": pl.String,
            },
        ),
        version=version,
        run_id=run_id,
    )


def matrix_spec(kind: str, matrix: FeatureMatrix) -> dict:
    """What a model fitted on `matrix` (its training rows) read, for training_set()."""
    return {
        "kind": kind,
        "version": matrix.version,
        "features": list(matrix.feature_names),
        "patients": list(matrix.patient_ids),
    }


def volumes_spec(patients: list[str]) -> dict:
    """What a model trained on preprocessed volumes read: those patients' volume rows and labels."""
    return {"kind": VOLUMES, "version": None, "features": ["path", "sha256"], "patients": sorted(patients)}


def reference_masks_spec(patients: list[str]) -> dict:
    """What a segmentation model trained on native volumes with reference masks read."""
    return {"kind": REFERENCE_MASKS, "version": None, "features": ["path", "sha256"], "patients": sorted(patients)}


def current_model(store: FeatureStore, model_name: str) -> dict | None:
    """The current `models` row of `model_name` as a dict, or None when none is registered."""
    rows = store.query(
        "SELECT * FROM models WHERE model_name = ? AND current ORDER BY materialized_at DESC LIMIT 1", [model_name]
    )
    return rows.row(0, named=True) if rows.height else None


def refused_retrain(store: FeatureStore, model_name: str, gate: str = "beats_chance_on_training") -> dict | None:
    """The newest version of `model_name` registered after the current one (any, when none is
    current) whose `gate` in its metrics failed: a retrain that was refused, with current = false.
    None when the newest retrain is the current one or failed for another reason."""
    rows = store.query(
        "SELECT * FROM models WHERE model_name = ? AND NOT current AND materialized_at > coalesce("
        "(SELECT max(materialized_at) FROM models WHERE model_name = ? AND current), "
        "'-infinity'::TIMESTAMPTZ) ORDER BY materialized_at DESC LIMIT 1",
        [model_name, model_name],
    )
    if rows.height == 0:
        return None
    row = rows.row(0, named=True)
    return row if json.loads(row["metrics"] or "{}").get(gate) is False else None


def current_version(store: FeatureStore, model_name: str) -> str | None:
    row = current_model(store, model_name)
    return row["version"] if row else None


def find_model(store: FeatureStore, version: str, model_name: str | None = None) -> dict:
    """The `models` row of `version` (of `model_name`, when given)."""
    sql, params = "SELECT * FROM models WHERE version = ?", [version]
    if model_name:
        sql, params = sql + " AND model_name = ?", [version, model_name]
    rows = store.query(sql + " ORDER BY model_name", params)
    if rows.height == 0:
        known = store.query("SELECT model_name, version FROM models ORDER BY materialized_at DESC LIMIT 10")
        listed = ", ".join(f"{n} {v}" for n, v in known.rows()) or "none registered"
        raise FeatureStoreError(
            f"no model version {version!r}{f' of {model_name}' if model_name else ''}; newest: {listed}"
        )
    if rows.height > 1:
        raise FeatureStoreError(
            f"version {version!r} is registered for {', '.join(rows['model_name'])}: name one with --model-name"
        )
    return rows.row(0, named=True)


def training_set(store: FeatureStore, version: str, model_name: str | None = None) -> pl.DataFrame:
    """The matrix model `version` was trained on, read at the snapshot it recorded: patient_id,
    hcc, split, then one column per feature (for a volume model: the volume's path and sha256)."""
    row = find_model(store, version, model_name)
    if row["data_snapshot"] is None or not row["training_set"]:
        raise FeatureStoreError(
            f"{row['model_name']} {version} was registered without a record of its training "
            "set (a model from before DuckLake, or a user-supplied one)"
        )
    spec = json.loads(row["training_set"])
    then = store.at(snapshot=int(row["data_snapshot"]))
    try:
        frame = _read_spec(then, spec)
    except FeatureStoreError:
        raise
    except Exception as error:  # an expired snapshot, most often
        raise FeatureStoreError(
            f"{row['model_name']} {version}: its training snapshot {row['data_snapshot']} "
            f"cannot be read ({str(error).splitlines()[0]})"
        ) from None
    missing = sorted(set(spec["patients"]) - set(frame["patient_id"].to_list()))
    if missing:
        raise FeatureStoreError(
            f"{row['model_name']} {version}: {len(missing)} training patients are not in "
            f"snapshot {row['data_snapshot']}, e.g. {missing[0]}"
        )
    return frame


def _read_spec(store: FeatureStore, spec: dict) -> pl.DataFrame:
    patients = spec["patients"]
    if spec["kind"] in (VOLUMES, REFERENCE_MASKS):
        # a segmentation case need not be labelled: its hcc and split may be NULL
        kind = "preprocessed" if spec["kind"] == VOLUMES else "nifti"
        return store.query(
            "SELECT v.patient_id, c.hcc, c.split, v.path, v.sha256 FROM volumes v LEFT JOIN cohort_split c "
            "USING (patient_id) WHERE v.kind = ? AND list_contains(?, v.patient_id) ORDER BY 1",
            [kind, patients],
        )
    if spec["kind"] == RADIOMICS:
        matrix = radiomics_matrix(store, spec["version"])
    elif spec["kind"] == EMBEDDINGS:
        matrix = embedding_matrix(store, spec["version"])
    else:
        raise FeatureStoreError(f"unknown training-set kind {spec['kind']!r}")
    missing = [f for f in spec["features"] if f not in matrix.feature_names]
    if missing:
        raise FeatureStoreError(f"feature {missing[0]} is not in the snapshot")
    matrix = matrix.columns(spec["features"]).subset(patients)
    return pl.DataFrame(
        {
            "patient_id": matrix.patient_ids,
            "hcc": matrix.hcc.astype(bool),
            "split": matrix.split,
            **{name: matrix.values[:, i] for i, name in enumerate(matrix.feature_names)},
        }
    )


def write_frame(frame: pl.DataFrame, path: str | Path) -> None:
    """CSV or Parquet by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
