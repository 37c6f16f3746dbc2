"""Feature-store tables. docs/feature_store.md documents every column; keep the two in step.

Every row carries patient_id (a pseudonym), a version (the code/config version of what wrote
it), run_id (the Dagster run) and materialized_at (UTC). Per-patient tables are replaced per
patient: re-materializing a partition deletes that patient's rows and inserts the new ones.
"""

from __future__ import annotations

from typing import Callable

PROVENANCE = """
    version VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    materialized_at TIMESTAMPTZ NOT NULL
"""

TABLES: dict[str, str] = {
    "patients": f"""
        patient_id VARCHAR NOT NULL,
        source VARCHAR,
        n_series INTEGER NOT NULL,
        n_files INTEGER NOT NULL,
        t2_series_key VARCHAR NOT NULL,
        ingest_status VARCHAR NOT NULL,
        {PROVENANCE}""",
    "scans": f"""
        patient_id VARCHAR NOT NULL,
        series_key VARCHAR NOT NULL,
        series_number INTEGER,
        description VARCHAR,
        modality VARCHAR,
        echo_time_ms DOUBLE,
        repetition_time_ms DOUBLE,
        sequence_name VARCHAR,
        scanning_sequence VARCHAR,
        n_files INTEGER,
        rows_px INTEGER,
        columns_px INTEGER,
        pixel_spacing_mm DOUBLE[],
        slice_thickness_mm DOUBLE,
        spacing_between_slices_mm DOUBLE,
        oblique BOOLEAN,
        chosen BOOLEAN NOT NULL,
        t2_score DOUBLE,
        choice_reason VARCHAR,
        checksum VARCHAR NOT NULL,
        {PROVENANCE}""",
    "volumes": f"""
        patient_id VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        sha256 VARCHAR NOT NULL,
        shape INTEGER[] NOT NULL,
        spacing_mm DOUBLE[] NOT NULL,
        orientation VARCHAR NOT NULL,
        intensity_mean DOUBLE,
        intensity_std DOUBLE,
        has_reference_mask BOOLEAN,
        {PROVENANCE}""",
    "cohort_split": f"""
        patient_id VARCHAR NOT NULL,
        hcc BOOLEAN NOT NULL,
        source VARCHAR,
        split VARCHAR NOT NULL,
        seed INTEGER NOT NULL,
        {PROVENANCE}""",
    # -- segmentation and radiomics ----------------------------------------------------
    "liver_masks": f"""
        patient_id VARCHAR NOT NULL,
        model_version VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        sha256 VARCHAR NOT NULL,
        liver_voxels BIGINT,
        liver_ml DOUBLE,
        spleen_ml DOUBLE,
        liver_components INTEGER,
        largest_component_fraction DOUBLE,
        dice_liver DOUBLE,
        dice_spleen DOUBLE,
        {PROVENANCE}""",
    "radiomic_features": f"""
        patient_id VARCHAR NOT NULL,
        feature_set_version VARCHAR NOT NULL,
        feature VARCHAR NOT NULL,
        value DOUBLE,
        {PROVENANCE}""",
    "exclusions": f"""
        patient_id VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        {PROVENANCE}""",
    # -- models (cohort level: no patient_id; `version` is the model version) -----------
    "models": f"""
        model_name VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        init VARCHAR,
        params VARCHAR,
        training_patients VARCHAR[],
        metrics VARCHAR,
        current BOOLEAN NOT NULL DEFAULT true,
        {PROVENANCE}""",
    "training_history": f"""
        model_name VARCHAR NOT NULL,
        epoch INTEGER NOT NULL,
        train_loss DOUBLE,
        train_acc DOUBLE,
        val_loss DOUBLE,
        val_acc DOUBLE,
        {PROVENANCE}""",
    "predictions": f"""
        model VARCHAR NOT NULL,
        patient_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        probability DOUBLE NOT NULL,
        label BOOLEAN,
        {PROVENANCE}""",
    "deep_embeddings": f"""
        patient_id VARCHAR NOT NULL,
        model_version VARCHAR NOT NULL,
        embedding FLOAT[128] NOT NULL,
        {PROVENANCE}""",
    # -- analysis (cohort level; `version` is the version of the model or selection) ---------
    "explainable_correlations": f"""
        dl_feature VARCHAR NOT NULL,
        handcrafted_feature VARCHAR NOT NULL,
        measure VARCHAR NOT NULL,
        value DOUBLE,
        threshold DOUBLE NOT NULL,
        related BOOLEAN NOT NULL,
        kept BOOLEAN NOT NULL,
        embedding_version VARCHAR NOT NULL,
        feature_set_version VARCHAR NOT NULL,
        n_patients INTEGER NOT NULL,
        {PROVENANCE}""",
    "explainability_sweep": f"""
        measure VARCHAR NOT NULL,
        threshold DOUBLE NOT NULL,
        n_kept INTEGER NOT NULL,
        n_selected INTEGER,
        cv_accuracy DOUBLE,
        val_accuracy DOUBLE,
        val_roc_auc DOUBLE,
        {PROVENANCE}""",
    "model_metrics": f"""
        model VARCHAR NOT NULL,
        scheme VARCHAR NOT NULL,
        metric VARCHAR NOT NULL,
        estimate DOUBLE,
        mean DOUBLE,
        ci_low DOUBLE,
        ci_high DOUBLE,
        n INTEGER NOT NULL,
        n_resamples INTEGER,
        n_degenerate INTEGER,
        {PROVENANCE}""",
    "coefficients": f"""
        model VARCHAR NOT NULL,
        feature VARCHAR NOT NULL,
        beta DOUBLE,
        std_error DOUBLE,
        z DOUBLE,
        p_value DOUBLE,
        odds_change_pct DOUBLE,
        lasso_beta DOUBLE,
        related_handcrafted VARCHAR,
        status VARCHAR NOT NULL,
        {PROVENANCE}""",
}


# table -> functions that, given a connection inside the writing transaction, return the SQL
# statements (CREATE OR REPLACE VIEW ...) of views derived from that table.
def _radiomics_view(con) -> list[str]:
    """`radiomics`: one row per patient and feature set, one column per feature."""
    features = [row[0] for row in con.execute("SELECT DISTINCT feature FROM radiomic_features ORDER BY 1").fetchall()]
    columns = "".join(
        f", max(value) FILTER (WHERE feature = '{name}') AS \"{name}\"" for name in features if "'" not in name
    )
    return [
        "CREATE OR REPLACE VIEW radiomics AS SELECT patient_id, feature_set_version"
        f"{columns} FROM radiomic_features GROUP BY patient_id, feature_set_version"
    ]


def _deep_features_view(con) -> list[str]:
    """`deep_features`: the 128-d embedding as columns dl_000..dl_127."""
    columns = ", ".join(f"embedding[{i + 1}] AS dl_{i:03d}" for i in range(128))
    return [f"CREATE OR REPLACE VIEW deep_features AS SELECT patient_id, model_version, {columns} FROM deep_embeddings"]


TABLE_1_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")


def _table_1_view(con) -> list[str]:
    """`table_1`: the study's Table 1, one row per model and evaluation scheme, each metric shown
    as 'estimate [ci_low, ci_high]' (95% CI)."""
    cells = ", ".join(
        f"max(printf('%.3f [%.3f, %.3f]', estimate, ci_low, ci_high)) FILTER (WHERE metric = '{m}') AS {m}"
        for m in TABLE_1_METRICS
    )
    order = "CASE model WHEN 'radiomic' THEN 1 WHEN 'deep' THEN 2 WHEN 'explainable' THEN 3 ELSE 4 END"
    return [
        f"CREATE OR REPLACE VIEW table_1 AS SELECT model, scheme, max(n) AS n, {cells} FROM model_metrics "
        f"GROUP BY model, scheme ORDER BY scheme, {order}"
    ]


VIEW_BUILDERS: dict[str, list[Callable]] = {
    "radiomic_features": [_radiomics_view],
    "deep_embeddings": [_deep_features_view],
    "model_metrics": [_table_1_view],
}


# Columns added after a table first shipped: stores written by an older version gain them.
MIGRATIONS = [
    "ALTER TABLE models ADD COLUMN IF NOT EXISTS current BOOLEAN DEFAULT true",
]


def create_statements() -> list[str]:
    return [f"CREATE TABLE IF NOT EXISTS {name} ({columns})" for name, columns in TABLES.items()] + MIGRATIONS
