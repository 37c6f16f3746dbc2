"""Feature-store tables. docs/feature_store.md documents every column; keep the two in step.

Every row carries patient_id (a pseudonym), a version (the code/config version of what wrote
it), run_id (the Dagster run) and materialized_at (UTC). Per-patient tables are replaced per
patient: re-materializing a partition deletes that patient's rows and inserts the new ones.
"""

from __future__ import annotations

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
}


def create_statements() -> list[str]:
    return [f"CREATE TABLE IF NOT EXISTS {name} ({columns})" for name, columns in TABLES.items()]
