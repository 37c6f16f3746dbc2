"""Orchestration: the Dagster wiring, and the only package (with definitions.py, dask_definitions.py,
runner.py and cli.py above it) that imports dagster.

Rule: assets, checks, sensors, schedules, automation conditions, resources and the run launcher;
an asset reads its config and resources, calls one use case (hcc_assets.steps) or domain function,
and turns the result into outputs and metadata. No SQL here (hcc_assets.featurestore holds it).
"""
