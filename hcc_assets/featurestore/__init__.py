"""DuckDB feature store: schema, serialized writers, read-only queries. No dagster here."""

from hcc_assets.featurestore.store import FeatureStore, FeatureStoreError

__all__ = ["FeatureStore", "FeatureStoreError"]
