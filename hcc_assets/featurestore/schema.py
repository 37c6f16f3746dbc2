"""Feature-store tables and views. docs/feature_store.md documents every column; keep the two in step.

Every row carries patient_id (a pseudonym), a version (the code/config version of what wrote
it), run_id (the Dagster run) and materialized_at (UTC). Per-patient tables are replaced per
patient: re-materializing a partition deletes that patient's rows and inserts the new ones in a
new DuckLake snapshot, so the old rows stay readable by time travel. The history tables
(HISTORY_KEYS) keep the rows of every model version side by side; their `current_*` views show
the rows of the current models only.

DuckLake has no fixed-size ARRAY type and takes only literal column defaults, hence FLOAT[] for
embeddings and no defaults.
"""

from __future__ import annotations

from collections.abc import Callable

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
    "studies": f"""
        patient_id VARCHAR NOT NULL,
        patient VARCHAR NOT NULL,
        study_index INTEGER NOT NULL,
        days_since_first INTEGER,
        study_key VARCHAR NOT NULL,
        n_series INTEGER NOT NULL,
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
        transfer_syntax VARCHAR,
        lossy BOOLEAN,
        lossy_ratio DOUBLE,
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
        liver_at_edge_fraction DOUBLE,
        liver_at_edge VARCHAR,
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
        current BOOLEAN NOT NULL,
        data_snapshot BIGINT,
        training_set VARCHAR,
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
        embedding FLOAT[] NOT NULL,
        {PROVENANCE}""",
    # -- per-patient P(HCC) from every current model, labelled or not (hcc_prediction) --------
    # One row per patient, model and model version; status 'predicted' or 'unavailable' (then
    # probability, decision and model_version may be NULL and `reason` says why).
    "hcc_predictions": f"""
        patient_id VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        model_name VARCHAR NOT NULL,
        model_version VARCHAR,
        status VARCHAR NOT NULL,
        probability DOUBLE,
        threshold DOUBLE NOT NULL,
        decision BOOLEAN,
        input_kind VARCHAR NOT NULL,
        input_version VARCHAR,
        reason VARCHAR,
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
    # paired comparison of two models on the validation patients both scored; `version` is
    # '<version_a>|<version_b>'; difference = auc_a - auc_b
    "model_comparisons": f"""
        model_a VARCHAR NOT NULL,
        model_b VARCHAR NOT NULL,
        version_a VARCHAR NOT NULL,
        version_b VARCHAR NOT NULL,
        n INTEGER NOT NULL,
        n_positive INTEGER NOT NULL,
        auc_a DOUBLE,
        auc_b DOUBLE,
        auc_difference DOUBLE,
        bootstrap_mean DOUBLE,
        ci_low DOUBLE,
        ci_high DOUBLE,
        n_resamples INTEGER,
        n_degenerate INTEGER,
        seed INTEGER,
        delong_se DOUBLE,
        delong_z DOUBLE,
        delong_p DOUBLE,
        delong_ci_low DOUBLE,
        delong_ci_high DOUBLE,
        {PROVENANCE}""",
    "confusion_matrices": f"""
        model VARCHAR NOT NULL,
        threshold DOUBLE NOT NULL,
        n INTEGER NOT NULL,
        tp INTEGER NOT NULL,
        fp INTEGER NOT NULL,
        tn INTEGER NOT NULL,
        fn INTEGER NOT NULL,
        {PROVENANCE}""",
    # one row per non-empty bin of predicted P(HCC); brier_score is the model's, on every row
    "calibration": f"""
        model VARCHAR NOT NULL,
        n_bins INTEGER NOT NULL,
        bin INTEGER NOT NULL,
        bin_low DOUBLE NOT NULL,
        bin_high DOUBLE NOT NULL,
        n INTEGER NOT NULL,
        mean_predicted DOUBLE,
        observed_rate DOUBLE,
        brier_score DOUBLE,
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

# History tables: rows of every model version are kept; a write replaces only the rows of the
# (key columns..., version) it writes.
HISTORY_KEYS: dict[str, list[str]] = {
    "predictions": ["model", "version"],
    "training_history": ["model_name", "version"],
    "model_metrics": ["model", "version"],
    "model_comparisons": ["model_a", "version_a", "model_b", "version_b"],
    "confusion_matrices": ["model", "version"],
    "calibration": ["model", "version"],
    "coefficients": ["model", "version"],
}

# Per-patient history tables: a patient's write replaces only its rows of the same key values
# (NULL matches NULL) and keeps the rows of other model versions.
PATIENT_HISTORY_KEYS: dict[str, list[str]] = {
    "hcc_predictions": ["model", "model_version"],
}


# -- derived tables ------------------------------------------------------------------------
# Kept by the store in the same transaction as every write to their source table; never
# written directly. `radiomic_features` (long: one row per patient and feature) stays the
# source of truth for SQL users; at 100k patients x 250 features (25M rows) a pivot of it takes
# tens of seconds, so the training-set query reads one DOUBLE[] per patient instead
# (docs/feature_store.md, "Layout at scale").
DERIVED_TABLES: dict[str, str] = {
    "radiomic_vectors": f"""
        patient_id VARCHAR NOT NULL,
        feature_set_version VARCHAR NOT NULL,
        feature_names_id VARCHAR NOT NULL,
        feature_values DOUBLE[] NOT NULL,
        {PROVENANCE}""",
    # feature_names_id = md5 of the sorted names joined by newlines; a patient's vector holds
    # the values in this order (NULL where the long row's value is NULL).
    "radiomic_feature_names": """
        feature_names_id VARCHAR NOT NULL,
        features VARCHAR[] NOT NULL,
        n_features INTEGER NOT NULL""",
}


# DuckLake options per table: (table, option, value). The vectors are random-looking doubles that
# snappy hardly shrinks (411 vs 419 MB at 100k x 250) while decompressing them costs the
# training-set query ~0.07 s of its 0.5 s budget.
TABLE_OPTIONS: list[tuple[str, str, str]] = [
    ("radiomic_vectors", "parquet_compression", "uncompressed"),
]


def _refresh_radiomic_vectors(con, scope: str) -> None:
    """Recompute `radiomic_vectors` for the patients selected by `scope` (a predicate on
    patient_id) from `radiomic_features`, and keep `radiomic_feature_names` to the name lists
    in use. One row per patient and feature-set version, values ordered by feature name."""
    con.execute(f"DELETE FROM radiomic_vectors WHERE {scope}")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE refreshed_vectors AS
        SELECT *, hash(features) AS names_key FROM (
            SELECT patient_id, feature_set_version,
                   list(feature ORDER BY feature) AS features, list(value ORDER BY feature) AS feature_values,
                   max(version) AS version, max(run_id) AS run_id, max(materialized_at) AS materialized_at
            FROM radiomic_features WHERE {scope} GROUP BY patient_id, feature_set_version)""")
    # hashing every row's 250 names into an md5 string costs seconds at scale; group on the
    # cheap 64-bit hash within this write, and spell the stored id out for the few distinct lists
    con.execute("""
        CREATE OR REPLACE TEMP TABLE refreshed_names AS
        SELECT names_key, features, md5(array_to_string(features, chr(10))) AS feature_names_id
        FROM (SELECT names_key, any_value(features) AS features FROM refreshed_vectors GROUP BY names_key)""")
    con.execute("""
        INSERT INTO radiomic_feature_names
        SELECT feature_names_id, features, len(features) FROM refreshed_names
        WHERE feature_names_id NOT IN (SELECT feature_names_id FROM radiomic_feature_names)""")
    con.execute("""
        INSERT INTO radiomic_vectors BY NAME
        SELECT v.patient_id, v.feature_set_version, n.feature_names_id, v.feature_values,
               v.version, v.run_id, v.materialized_at
        FROM refreshed_vectors v JOIN refreshed_names n USING (names_key)""")
    con.execute("""
        DELETE FROM radiomic_feature_names
        WHERE feature_names_id NOT IN (SELECT DISTINCT feature_names_id FROM radiomic_vectors)""")
    con.execute("DROP TABLE refreshed_vectors")
    con.execute("DROP TABLE refreshed_names")


# source table -> functions that, given a connection inside the writing transaction and a
# predicate on patient_id ("TRUE": every patient), bring the derived tables up to date.
DERIVED_REFRESHERS: dict[str, list[Callable]] = {
    "radiomic_features": [_refresh_radiomic_vectors],
}


# table -> functions that, given a connection inside the writing transaction, return the
# (view name, SELECT) of views whose definition follows that table's data.
def _radiomics_view(con) -> list[tuple[str, str]]:
    """`radiomics`: one row per patient and feature set, one column per feature, read from
    `radiomic_vectors` (each column picks its element by the row's name list)."""
    name_lists = con.execute("SELECT feature_names_id, features FROM radiomic_feature_names ORDER BY 1").fetchall()
    positions = {names_id: {name: i + 1 for i, name in enumerate(features)} for names_id, features in name_lists}
    features = sorted({name for _, names in name_lists for name in names if "'" not in name and '"' not in name})
    columns = ""
    for name in features:
        cases = " ".join(
            f"WHEN '{names_id}' THEN feature_values[{where[name]}]"
            for names_id, where in positions.items()
            if name in where
        )
        columns += f', CASE feature_names_id {cases} END AS "{name}"'
    return [("radiomics", f"SELECT patient_id, feature_set_version{columns} FROM radiomic_vectors")]


VIEW_BUILDERS: dict[str, list[Callable]] = {
    "radiomic_features": [_radiomics_view],
}

TABLE_1_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "specificity", "npv")


def static_view_statements() -> list[tuple[str, str]]:
    """(name, CREATE VIEW) of the views whose definition never changes."""
    dl_columns = ", ".join(f"embedding[{i + 1}] AS dl_{i:03d}" for i in range(128))
    cells = ", ".join(
        f"max(printf('%.3f [%.3f, %.3f]', estimate, ci_low, ci_high)) FILTER (WHERE metric = '{m}') AS {m}"
        for m in TABLE_1_METRICS
    )
    order = "CASE model WHEN 'radiomic' THEN 1 WHEN 'deep' THEN 2 WHEN 'explainable' THEN 3 ELSE 4 END"
    current = "version IN (SELECT version FROM models WHERE current)"
    views = {
        # the 128-d embedding as columns dl_000..dl_127
        "deep_features": f"SELECT patient_id, model_version, {dl_columns} FROM deep_embeddings",
        "current_models": "SELECT * FROM models WHERE current",
        **{f"current_{table}": f"SELECT * FROM {table} WHERE {current}" for table in HISTORY_KEYS},
        # (replaces the entry above) a comparison is current when both its models are
        "current_model_comparisons": "SELECT * FROM model_comparisons WHERE "
        + " AND ".join(f"{side} IN (SELECT version FROM models WHERE current)" for side in ("version_a", "version_b")),
        # each patient's newest prediction per model: what the models current at its last
        # hcc_prediction run said (or why they could not)
        "current_hcc_predictions": "SELECT * EXCLUDE (rank) FROM (SELECT *, row_number() OVER (PARTITION BY "
        "patient_id, model ORDER BY materialized_at DESC) AS rank FROM hcc_predictions) "
        "WHERE rank = 1",
        # the study's Table 1 for the current models: 'estimate [ci_low, ci_high]' (95% CI)
        "table_1": f"SELECT model, scheme, max(n) AS n, {cells} FROM current_model_metrics "
        f"GROUP BY model, scheme ORDER BY scheme, {order}",
    }
    return [(name, f"CREATE VIEW {name} AS {select}") for name, select in views.items()]


def table_columns(table: str) -> list[tuple[str, str]]:
    """(name, type) of each column of `table` as TABLES / DERIVED_TABLES declare it, NOT NULL left off."""
    body = {**TABLES, **DERIVED_TABLES}[table]
    columns, depth, start = [], 0, 0
    for index, char in enumerate(body + ","):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            definition = " ".join(body[start:index].split())
            start = index + 1
            if definition:
                name, column_type = definition.split(" ", 1)
                columns.append((name, column_type.replace(" NOT NULL", "")))
    return columns


def add_column_statements(table: str, existing: set[str]) -> list[str]:
    """ALTER TABLE statements adding the declared columns a table made by an older version lacks.
    Added columns are nullable (the old rows read NULL), even where a new table has NOT NULL."""
    return [
        f"ALTER TABLE {table} ADD COLUMN {name} {column_type}"
        for name, column_type in table_columns(table)
        if name not in existing
    ]


def create_statements() -> list[str]:
    tables = {**TABLES, **DERIVED_TABLES}
    return [f"CREATE TABLE IF NOT EXISTS {name} ({columns})" for name, columns in tables.items()]
