"""The storage layer: the DuckLake feature store (schema, transactional writers, named reads,
training-set queries, the model registry, maintenance, migration).

Rule: all SQL of the project lives here. It may use the domain packages and core, never dagster
or the orchestration and steps above it.
"""

from hcc_assets.featurestore.store import FeatureStore, FeatureStoreError

__all__ = ["FeatureStore", "FeatureStoreError"]
