"""Deep-model assets (hcc_classifier, deep_embedding)."""
