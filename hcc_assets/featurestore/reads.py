"""Named reads of the feature store for the assets and the report: every query the
orchestration layer needs, so that no SQL lives outside this package.

History tables keep every model version; the reads here go through their `current_*` views
unless they say otherwise.
"""

from __future__ import annotations

import polars as pl

from hcc_assets.featurestore.store import FeatureStore


def cohort_split(store: FeatureStore) -> pl.DataFrame:
    """patient_id, hcc, split of every labelled cohort patient, sorted."""
    return store.query("SELECT patient_id, hcc, split FROM cohort_split ORDER BY patient_id")


def cohort_patients(store: FeatureStore) -> set[str]:
    return set(cohort_split(store)["patient_id"].to_list())


def validation_patients(store: FeatureStore) -> set[str]:
    return set(store.query("SELECT patient_id FROM cohort_split WHERE split = 'validation'")["patient_id"].to_list())


def ingested_patients(store: FeatureStore) -> set[str]:
    """Patients with a preprocessed volume (ingest succeeded)."""
    return set(store.query("SELECT patient_id FROM volumes WHERE kind = 'preprocessed'")["patient_id"].to_list())


def lossy_t2_patients(store: FeatureStore) -> set[str]:
    """Patients whose chosen T2 series was lossy-compressed (`scans.lossy`)."""
    return set(store.query("SELECT patient_id FROM scans WHERE chosen AND lossy")["patient_id"].to_list())


def excluded_at(store: FeatureStore, stage: str) -> set[str]:
    """Patients with an `exclusions` row of `stage`."""
    return set(store.query("SELECT patient_id FROM exclusions WHERE stage = ?", [stage])["patient_id"].to_list())


def reference_mask_volumes(store: FeatureStore) -> pl.DataFrame:
    """patient_id, path, sha256 of native NIfTI volumes that came with a reference mask."""
    return store.query(
        "SELECT patient_id, path, sha256 FROM volumes WHERE kind = 'nifti' AND has_reference_mask ORDER BY patient_id"
    )


def current_predictions(store: FeatureStore, model: str) -> pl.DataFrame:
    """P(HCC) of the current version of `model` ('radiomic' | 'deep' | 'explainable')."""
    return store.query(
        "SELECT patient_id, split, probability, label, version FROM current_predictions "
        "WHERE model = ? ORDER BY patient_id",
        [model],
    )


def table_1(store: FeatureStore) -> pl.DataFrame:
    return store.query("SELECT * FROM table_1")


def explainable_selection(store: FeatureStore) -> tuple[list[str], str, str]:
    """(kept DL feature names, selection version, embedding version) of the current selection."""
    kept = store.query(
        "SELECT DISTINCT dl_feature, version, embedding_version FROM explainable_correlations "
        "WHERE kept ORDER BY dl_feature"
    )
    if kept.height == 0:
        any_rows = store.query("SELECT version, embedding_version FROM explainable_correlations LIMIT 1")
        if any_rows.height == 0:
            return [], "", ""
        return [], any_rows["version"][0], any_rows["embedding_version"][0]
    return kept["dl_feature"].to_list(), kept["version"][0], kept["embedding_version"][0]


def selection_settings(store: FeatureStore) -> tuple[str | None, float | None, int]:
    """(measure, threshold, number of handcrafted features) of the stored explainable selection."""
    rows = store.query(
        "SELECT any_value(measure) AS measure, any_value(threshold) AS threshold, "
        "count(DISTINCT handcrafted_feature) AS n_hc FROM explainable_correlations"
    )
    return rows["measure"][0], rows["threshold"][0], int(rows["n_hc"][0] or 0)


def radiomic_feature_names(store: FeatureStore, feature_set_version: str) -> list[str]:
    names = store.query(
        "SELECT DISTINCT feature FROM radiomic_features WHERE feature_set_version = ? ORDER BY 1", [feature_set_version]
    )
    return names["feature"].to_list()


def related_handcrafted(store: FeatureStore) -> pl.DataFrame:
    """dl_feature, handcrafted_feature, value of every related pair, strongest first per DL feature."""
    return store.query(
        "SELECT dl_feature, handcrafted_feature, value FROM explainable_correlations "
        "WHERE related ORDER BY dl_feature, abs(value) DESC"
    )


# -- one patient's inputs for hcc_prediction, labelled or not (no join to cohort_split) ----------


def patient_embedding(store: FeatureStore, patient_id: str) -> tuple[str, list[float]] | None:
    """(classifier version that made it, the 128 values) of the patient's deep embedding."""
    rows = store.query("SELECT model_version, embedding FROM deep_embeddings WHERE patient_id = ?", [patient_id])
    return (rows["model_version"][0], list(rows["embedding"][0])) if rows.height else None


def patient_radiomics(store: FeatureStore, patient_id: str, feature_set_version: str | None) -> dict[str, float | None]:
    """feature -> value of the patient's radiomic features of `feature_set_version` (none for None)."""
    rows = store.query(
        "SELECT feature, value FROM radiomic_features WHERE patient_id = ? AND feature_set_version = ?",
        [patient_id, feature_set_version],
    )
    return dict(zip(rows["feature"].to_list(), rows["value"].to_list()))


def exclusion_reason(store: FeatureStore, patient_id: str, stage: str) -> str | None:
    rows = store.query("SELECT reason FROM exclusions WHERE patient_id = ? AND stage = ?", [patient_id, stage])
    return rows["reason"][0] if rows.height else None


def current_versions(store: FeatureStore) -> dict[str, str]:
    """model name -> its current version, for every registered model."""
    return dict(store.query("SELECT model_name, version FROM models WHERE current").rows())


def patient_predictions(store: FeatureStore, patient_id: str | None = None) -> pl.DataFrame:
    """The newest prediction of each model per patient (view current_hcc_predictions)."""
    where, params = ("WHERE patient_id = ?", [patient_id]) if patient_id else ("", [])
    return store.query(
        "SELECT patient_id, model, model_name, model_version, status, probability, threshold, decision, "
        f"input_version, reason, materialized_at FROM current_hcc_predictions {where} "
        "ORDER BY patient_id, CASE model WHEN 'deep' THEN 1 WHEN 'radiomic' THEN 2 ELSE 3 END",
        params,
    )


def patient_status(store: FeatureStore) -> pl.DataFrame:
    """One row per patient seen by ingest: its volumes, mask, radiomics, embedding and newest
    predictions, each with the model version that made it beside the current one, so a caller
    can say what is current, stale or missing and why."""
    return store.query("""
        WITH current AS (SELECT model_name, version FROM models WHERE current),
        preds AS (
            SELECT patient_id,
                   string_agg(model || '=' || CASE WHEN status = 'predicted' THEN printf('%.3f', probability)
                              ELSE 'n/a' END, ' ' ORDER BY model) AS predictions,
                   string_agg(CASE WHEN status <> 'predicted' THEN model || ': ' || reason END, '; '
                              ORDER BY model) AS prediction_gaps,
                   list(model || '@' || coalesce(model_version, '-') ORDER BY model) AS prediction_models
            FROM current_hcc_predictions GROUP BY patient_id)
        SELECT p.patient_id, p.ingest_status, c.split, c.hcc,
               v.patient_id IS NOT NULL AS preprocessed,
               m.model_version AS mask_model, (SELECT version FROM current WHERE model_name = 'liver_segmentation')
                   AS current_mask_model,
               (SELECT count(*) FROM radiomic_features r WHERE r.patient_id = p.patient_id) AS n_radiomic,
               x.reason AS radiomics_excluded,
               e.model_version AS embedding_model, (SELECT version FROM current WHERE model_name = 'hcc_classifier')
                   AS current_classifier,
               preds.predictions, preds.prediction_gaps, preds.prediction_models
        FROM patients p
        LEFT JOIN cohort_split c USING (patient_id)
        LEFT JOIN volumes v ON v.patient_id = p.patient_id AND v.kind = 'preprocessed'
        LEFT JOIN liver_masks m ON m.patient_id = p.patient_id
        LEFT JOIN exclusions x ON x.patient_id = p.patient_id AND x.stage = 'radiomics'
        LEFT JOIN deep_embeddings e ON e.patient_id = p.patient_id
        LEFT JOIN preds ON preds.patient_id = p.patient_id
        ORDER BY p.patient_id""")


def model_comparison(store: FeatureStore, scheme: str = "holdout_bootstrap") -> pl.DataFrame:
    """Each model's metrics from its current version beside its previous version (the one
    registered before it), where there is one: model, metric, current_version, current,
    previous_version, previous. One query over the history tables."""
    return store.query(
        """
        WITH ranked AS (
            SELECT model_name, version, current,
                   row_number() OVER (PARTITION BY model_name ORDER BY current DESC, materialized_at DESC) AS rank
            FROM models),
        pairs AS (
            SELECT c.model_name, c.version AS current_version, p.version AS previous_version
            FROM ranked c LEFT JOIN ranked p ON p.model_name = c.model_name AND p.rank = 2
            WHERE c.rank = 1 AND c.current)
        SELECT m.model, m.metric, pairs.current_version, m.estimate AS current,
               pairs.previous_version, prev.estimate AS previous
        FROM pairs JOIN model_metrics m ON m.version = pairs.current_version AND m.scheme = ?
        LEFT JOIN model_metrics prev ON prev.version = pairs.previous_version AND prev.scheme = m.scheme
             AND prev.model = m.model AND prev.metric = m.metric
        ORDER BY m.model, m.metric""",
        [scheme],
    )


# the paired comparisons in the study's model order (radiomic, deep, explainable)
_MODEL_RANK = "CASE {0} WHEN 'radiomic' THEN 1 WHEN 'deep' THEN 2 WHEN 'explainable' THEN 3 ELSE 4 END, {0}"
_PAIR_ORDER = f"{_MODEL_RANK.format('model_a')}, {_MODEL_RANK.format('model_b')}"


def report_tables(store: FeatureStore) -> dict[str, pl.DataFrame]:
    """Everything the report shows, from the current models."""
    return {
        "masks": store.query("SELECT patient_id, liver_ml, dice_liver FROM liver_masks ORDER BY patient_id"),
        "cohort": store.query("SELECT patient_id, hcc, split, source FROM cohort_split ORDER BY patient_id"),
        "exclusions": store.query("SELECT patient_id, stage, reason FROM exclusions ORDER BY stage, patient_id"),
        "metrics": store.query("SELECT * FROM current_model_metrics ORDER BY scheme, model, metric"),
        "history": store.query(
            "SELECT epoch, train_loss, train_acc, val_loss, val_acc FROM current_training_history "
            "WHERE model_name = 'hcc_classifier' ORDER BY epoch"
        ),
        "predictions": store.query(
            "SELECT model, patient_id, probability, label FROM current_predictions "
            "WHERE split = 'validation' ORDER BY model, patient_id"
        ),
        "coefficients": store.query("SELECT * FROM current_coefficients ORDER BY model, feature"),
        "sweep": store.query(
            "SELECT measure, threshold, n_kept, n_selected, cv_accuracy, val_accuracy, val_roc_auc "
            "FROM explainability_sweep ORDER BY measure, threshold"
        ),
        "models": store.query(
            "SELECT model_name, version, kind, init, params FROM models WHERE current ORDER BY model_name"
        ),
        "comparison": model_comparison(store),
        "model_comparisons": store.query(f"SELECT * FROM current_model_comparisons ORDER BY {_PAIR_ORDER}"),
        "confusion_matrices": store.query("SELECT * FROM current_confusion_matrices ORDER BY model"),
        "calibration": store.query("SELECT * FROM current_calibration ORDER BY model, bin"),
    }
