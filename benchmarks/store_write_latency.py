"""Per-write latency of the feature store, as per-patient runs write it: one small transaction per
patient and table, on a new DuckLake (SQLite catalog) in a temporary folder.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/store_write_latency.py [--writes 240] [--patients 120]

Writes one `liver_masks` row per call (`FeatureStore.replace_partition`), first writes of
--patients patients then rewrites of the same ones, and prints the mean milliseconds of each block
of 40 writes and the Parquet files left. A Dagster step writes 1-3 such transactions per patient;
the mean times the number of writes is what the store adds to a per-patient run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from hcc_assets.featurestore import FeatureStore

BLOCK = 40


def mask_row(patient_id: str) -> pl.DataFrame:
    row = pl.DataFrame(
        {
            "patient_id": [patient_id],
            "model_version": ["v1"],
            "path": ["patients/mask.nii.gz"],
            "sha256": ["0" * 64],
            "liver_voxels": [1000],
            "liver_ml": [1500.0],
            "spleen_ml": [200.0],
            "liver_components": [1],
            "largest_component_fraction": [1.0],
            "dice_liver": [0.9],
            "dice_spleen": [0.9],
        }
    )
    return FeatureStore.with_provenance(row, version="v1", run_id="benchmark")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=240)
    parser.add_argument("--patients", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hcc-store-writes-") as folder:
        store = FeatureStore(Path(folder) / "fs.sqlite")
        store.ensure_schema()
        seconds = []
        for i in range(args.writes):
            patient_id = f"pt-{i % args.patients:06d}"
            rows = mask_row(patient_id)
            started = time.perf_counter()
            store.replace_partition("liver_masks", patient_id, rows)
            seconds.append(time.perf_counter() - started)
        print(f"{args.writes} single-row writes of liver_masks, {args.patients} patients (first writes, then rewrites)")
        for start in range(0, args.writes, BLOCK):
            block = seconds[start : start + BLOCK]
            print(f"writes {start + 1:4d}-{start + len(block):4d}: mean {1000 * statistics.mean(block):6.1f} ms")
        print(f"all: mean {1000 * statistics.mean(seconds):.1f} ms, median {1000 * statistics.median(seconds):.1f} ms")
        print(f"Parquet files: {len(list(Path(folder).rglob('*.parquet')))}")


if __name__ == "__main__":
    main()
