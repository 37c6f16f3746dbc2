"""The analysis: split, feature filter, association, LASSO, bootstrap / CV metrics, paired model
comparison, calibration, Logit refit, and the report's rendering.

Rule: frames and arrays in, results out. Never imports dagster, the feature store, the lake or the
other domain packages; the report renders what it is given and runs no SQL.
"""
