"""The `hcc-assets` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _lake_root(args) -> str:
    from hcc_assets.defs.resources import default_lake_root

    return getattr(args, "lake", None) or default_lake_root()


def cmd_synth(args) -> int:
    from hcc_assets.imaging.synth import SynthConfig, synthesize_cohort

    config = SynthConfig(
        patients=args.patients, seed=args.seed, lesion_contrast=args.lesion_contrast, matrix=args.matrix
    )
    start = time.perf_counter()
    patients = synthesize_cohort(Path(args.out), config)
    n_hcc = sum(p.hcc for p in patients)
    print(
        f"synthesized {len(patients)} patients ({n_hcc} HCC, {len(patients) - n_hcc} healthy) "
        f"in {time.perf_counter() - start:.1f}s -> {args.out}"
    )
    return 0


def cmd_sql(args) -> int:
    from hcc_assets.featurestore.sql import format_frame
    from hcc_assets.featurestore import FeatureStore

    db = args.db or os.path.join(_lake_root(args), "feature_store.duckdb")
    try:
        frame = FeatureStore(db).query(args.query)
    except Exception as error:  # a bad query is the user's to fix: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_frame(frame, args.format, max_rows=args.max_rows))
    return 0


def cmd_materialize(args) -> int:
    from hcc_assets.instance import ensure_dagster_home

    ensure_dagster_home(_lake_root(args))
    import dagster as dg

    from hcc_assets import runner

    instance = dg.DagsterInstance.get()
    ready = runner.register_ready_patients(instance)
    start = time.perf_counter()
    results = runner.materialize_patients(ready, workers=args.workers)
    _report("ingested", results, time.perf_counter() - start, args.workers)
    if not args.cohort:
        return 0
    start = time.perf_counter()
    ok = runner.materialize_cohort()
    print(f"cohort assets (split, models): {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s")
    if not ok:
        return 1
    if runner.has_assets("patient_features"):
        ingested = [pid for pid, ok, _ in results if ok]
        start = time.perf_counter()
        features = runner.materialize_patients(ingested, workers=args.workers, job="patient_features")
        _report("model-derived features for", features, time.perf_counter() - start, args.workers)
    return 0


def _report(what: str, results: list[tuple[str, bool, str]], elapsed: float, workers: int) -> None:
    failed = [(pid, error) for pid, ok, error in results if not ok]
    print(f"{what} {len(results) - len(failed)}/{len(results)} patients in {elapsed:.1f}s "
          f"({elapsed / max(len(results), 1):.2f}s per patient, {workers} workers)")
    for pid, error in failed:
        print(f"  FAILED {pid}: {error}")


def cmd_demo(args) -> int:
    lake = _lake_root(args)
    incoming = Path(lake) / "incoming"
    if not (incoming / "labels.csv").exists():
        cmd_synth(argparse.Namespace(patients=args.patients, seed=args.seed, lesion_contrast=1.0, matrix=256, out=str(incoming)))
    status = cmd_materialize(argparse.Namespace(lake=lake, workers=args.workers, cohort=True))
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hcc-assets", description=__doc__)
    parser.add_argument("--lake", help="data lake root (default: $HCC_ASSETS_LAKE or ./data_lake)")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic DICOM cohort with known truth")
    synth.add_argument("--patients", type=int, default=40)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True)
    synth.add_argument("--lesion-contrast", type=float, default=1.0, help="0 = labels carry no image signal")
    synth.add_argument("--matrix", type=int, default=256, help="in-plane size (smaller for quick tests)")
    synth.set_defaults(func=cmd_synth)

    sql = sub.add_parser("sql", help="run a read-only SQL query on the feature store")
    sql.add_argument("query")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--db", help="feature store file (default: <lake>/feature_store.duckdb)")
    sql.add_argument("--max-rows", type=int, default=100)
    sql.set_defaults(func=cmd_sql)

    materialize = sub.add_parser("materialize", help="ingest every complete drop folder, then the cohort")
    materialize.add_argument("--workers", type=int, default=2)
    materialize.add_argument("--no-cohort", dest="cohort", action="store_false")
    materialize.set_defaults(func=cmd_materialize)

    demo = sub.add_parser("demo", help="synthesize the 40-patient cohort and materialize everything")
    demo.add_argument("--patients", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=2)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
