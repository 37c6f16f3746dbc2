"""Use cases, one per asset that needs more than a few lines: plain Python over the feature store
and the lake, no Dagster. The assets in hcc_assets.defs call them and turn their results into
materializations and metadata; tests call them directly.

Rule: may use the storage layer (featurestore, lake), the domain packages and core; never dagster.
"""
