"""Seconds from dropping a new patient folder into incoming/ to its rows in the feature store
(liver_masks, radiomic_features, deep_embeddings and its P(HCC) in hcc_predictions), through the
real Dagster daemon, with where the time went (sensor tick, run queue, run start, each step) from
the instance's event log.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/new_scan_latency.py [--mode dev|daemon] \\
        [--drops 2] [--matrix 256] [--depth 50] [--seg-epochs 8] [--sensor-interval 1] [--keep DIR [--reuse]]

What it sets up (a temporary lake, not data_lake/): 8 synthetic patients of the same geometry as the
drops ingested on the default 128x128x64 grid, the default nnU-Net configuration (reduced 2d_cpu,
3.2 mm in-plane, `--seg-epochs` x 40 iterations: by default exactly what `make demo` trains, several
minutes; fewer epochs give a cruder, larger mask, which makes radiomics slower than it would be), and a
`--depth` classifier (default 50, the study's network) trained for 3 epochs, both registered as
current. `--keep DIR --reuse` measures again on a lake kept from an earlier run (new patients). Then it starts the daemon (`--mode dev`: `dagster dev`, what `make ui` runs; `daemon`:
`dagster-daemon run` alone), waits for the drop-zone sensor's first tick, and drops `--drops` new
patients one after the other (CHAOS-like geometry by default: 256x256 pixels, 26-50 slices), each
staged under a hidden name with its `.complete` marker and renamed into place.

The per-patient runs use the default config except one setting in the deployment run config
($HCC_ASSETS_PATIENT_RUN_CONFIG): deep_embedding may use a classifier below chance, because a
network trained for 3 epochs on 6 patients is one, and only the latency is measured here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["dev", "daemon"], default="dev")
    parser.add_argument("--drops", type=int, default=2)
    parser.add_argument("--matrix", type=int, default=256, help="in-plane pixels of the dropped patients")
    parser.add_argument("--depth", type=int, default=50, choices=[10, 18, 34, 50])
    parser.add_argument("--seg-epochs", type=int, default=8)
    parser.add_argument("--sensor-interval", type=int, default=1)
    parser.add_argument("--keep", help="build the lake in this folder and keep it (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: use the lake already there")
    args = parser.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in [n for n in os.environ if n.startswith("HCC_ASSETS_")] + ["DAGSTER_HOME"]:
        os.environ.pop(name, None)  # this lake's own settings, key and dagster_home only
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hcc-latency-"))
    reuse = bool(args.keep and args.reuse and (root / "lake" / "feature_store.sqlite").exists())
    if args.keep and root.exists() and not reuse:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)

    from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
    from hcc_assets_tests.conftest import SMALL_COHORT
    from hcc_assets_tests.defs.hands_off import (
        Daemon,
        PreparedLake,
        drop_patient,
        format_breakdown,
        latency_breakdown,
        prepare_lake,
        wait_for_rows,
        wait_for_sensor,
    )
    from hcc_assets_tests.model_configs import CLASSIFIER_TRAINING

    started = time.perf_counter()
    if reuse:
        prepared = PreparedLake.reopen(root / "lake")
    else:
        synthesize_cohort(
            root / "cohort", SynthConfig(**{**SMALL_COHORT, "matrix": args.matrix, "slices_min": 26, "slices_max": 50})
        )
        classifier = {**CLASSIFIER_TRAINING, "depth": args.depth, "min_epochs": 3, "max_epochs": 3, "patience": 3}
        patient_config = {"ops": {"deep_embedding": {"config": {"allow_model_below_chance": True}}}}
        classifier["accept_below_chance"] = True  # 3 epochs: a latency fixture, not a model
        segmentation = {"epochs": args.seg_epochs}  # otherwise the asset's defaults (what `make demo` trains)
        prepared = prepare_lake(
            root / "lake",
            root / "cohort",
            patient_config=patient_config,
            classifier=classifier,
            segmentation=segmentation,
        )
    print(
        f"lake ready in {time.perf_counter() - started:.0f} s: {len(prepared.patients)} patients, models "
        f"{prepared.versions}, steps { ({k: round(v, 1) for k, v in prepared.seconds.items()}) }",
        flush=True,
    )
    incoming = prepared.root / "incoming"
    for staging in incoming.glob(".drop-*.partial"):  # left by an interrupted earlier run
        shutil.rmtree(staging)
    seed = 4242 + sum(1 for p in incoming.iterdir() if p.is_dir())  # new patients on every run, also with --reuse
    shutil.rmtree(root / "new", ignore_errors=True)
    new = synthesize_cohort(root / "new", SynthConfig(patients=args.drops, seed=seed, matrix=args.matrix))

    totals = []
    try:
        with (
            Daemon(prepared, root / "daemon.log", mode=args.mode, sensor_interval_s=args.sensor_interval) as daemon,
            prepared.instance() as instance,
        ):
            up = time.perf_counter()
            wait_for_sensor(instance, daemon)
            print(f"daemon ({args.mode}) up, first sensor tick after {time.perf_counter() - up:.1f} s", flush=True)
            for patient in new:
                pid = prepared.lake.pseudonym(patient.patient_key)
                dropped = drop_patient(root / "new" / patient.patient_key, prepared.root / "incoming")
                rows = wait_for_rows(prepared, instance, daemon, pid, timeout_s=600)
                time.sleep(2)  # let the run record its end before reading the event log
                totals.append(rows - dropped)
                print(f"\n{pid} ({args.matrix}x{args.matrix} pixels, T2 series of the drop):")
                print(format_breakdown(latency_breakdown(instance, pid, dropped, rows), rows - dropped), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\ndrop -> prediction rows: {', '.join(f'{t:.1f}' for t in totals)} s (goal <= 15 s); "
        f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end"
    )
    if len(totals) > 1:  # the daemon's run launcher starts its warm process with the first launch
        warm = sorted(totals[1:])
        print(
            f"first run after the daemon started (spawned cold): {totals[0]:.1f} s; later runs (forked warm): "
            f"median {warm[len(warm) // 2]:.1f} s, max {warm[-1]:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
