"""Bytes that one patient's run leaves in Dagster's event log, per asset: what 100k patients cost the
instance's event storage (figures used to go there as base64 PNGs; now they are lake files and the
metadata holds a path and a thumbnail of at most 16 KB).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/event_log_size.py [--matrix 256] [--full] \\
        [--keep DIR] [--json FILE]

Default: a temporary lake and DAGSTER_HOME (the project's dagster.yaml: sqlite storage), one synthetic
patient of CHAOS-like geometry (`--matrix` pixels, 26-50 slices), one run of the ingest assets
(raw_scan, nifti_volume, preprocessed_volume) as the drop-zone sensor's run would do it. Seconds.
`--keep DIR` works in DIR (emptied first) and keeps it.

`--full` also prepares a small lake with trained models (as the hands-off test does: 8 patients of
64x64 pixels on a 32x32x16 grid, brief nnU-Net and depth-10 classifier training; about a minute on 2
cores), then runs the per-patient features (liver_mask, radiomic_features, deep_embedding) for one
patient, and reports those runs and the cohort-level model runs (hcc_classifier) too. Its images are
small (a 64x64 mask overlay); `mask_overlay_sizes` prices liver_mask's figure at the ingest patient's
geometry without a trained model.

Reported per run and per asset (step): the events in the instance's event log storage
(`instance.all_logs(run_id)`), as the sum of their serialized lengths (`serialize_value`, what the
storage writes); the metadata of the materialization events alone (the STEP_OUTPUT event before
each holds a second copy of it); and the on-disk size of the sqlite files: the run's shard
`history/runs/<run_id>.db`, and `history/runs/index.db`, which holds a third copy of every
materialization for the asset catalog.

Measured on 2 cores with `--full` (before: figures inline as base64 PNGs, commit 2c65cbe; after:
lake files); serialized events of the run, KiB:

    run                                          before    after
    ingest, one 256x256 patient                   314.4     66.8   (run shard on disk 440 -> 192;
      nifti_volume                                227.9     26.9    index.db grew 312 -> 64)
      preprocessed_volume                          70.7     24.2
    features, one 64x64 patient                    75.4     73.4   (its mask overlay PNG is ~8 KiB)
      liver_mask                                   43.4     41.4
    liver_mask figure_1 at 256x256, per copy       73.3      6.7   (3 copies per run)
    hcc_classifier (depth 10, 5 epochs)           169.3     54.1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# the console logger only; every event still goes to the instance's event log
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _kib(n: int) -> str:
    return f"{n / 1024:8.1f} KiB"


def run_sizes(instance, run_id: str) -> dict[str, dict[str, int]]:
    """Per step (asset) of the run: serialized event bytes, event count, materialization metadata bytes."""
    from dagster._serdes import serialize_value

    sizes: dict[str, dict[str, int]] = defaultdict(lambda: {"events": 0, "bytes": 0, "metadata_bytes": 0})
    for entry in instance.all_logs(run_id):
        step = entry.step_key or "(run)"
        size = len(serialize_value(entry).encode())
        sizes[step]["events"] += 1
        sizes[step]["bytes"] += size
        event = entry.dagster_event
        if event is not None and event.is_step_materialization:
            metadata = event.step_materialization_data.materialization.metadata
            sizes[step]["metadata_bytes"] += len(serialize_value(metadata).encode())
    return dict(sizes)


def report_run(instance, home: Path, run_id: str, title: str) -> dict:
    sizes = run_sizes(instance, run_id)
    shard = home / "history" / "runs" / f"{run_id}.db"
    on_disk = shard.stat().st_size if shard.exists() else 0
    total = sum(s["bytes"] for s in sizes.values())
    print(f"\n{title} (run {run_id[:8]}): {total} B serialized events, {on_disk} B run shard on disk")
    for step, s in sorted(sizes.items()):
        print(
            f"  {step:28s} {s['events']:4d} events {_kib(s['bytes'])}  of which materialization metadata "
            f"{_kib(s['metadata_bytes'])}"
        )
    return {"run_id": run_id, "serialized_bytes": total, "run_shard_bytes": on_disk, "steps": sizes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=256, help="in-plane pixels of the synthetic patient")
    parser.add_argument("--full", action="store_true", help="also train small models and measure the features run")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--json", help="write the numbers to this file too")
    args = parser.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in [n for n in os.environ if n.startswith("HCC_ASSETS_")] + ["DAGSTER_HOME"]:
        os.environ.pop(name, None)  # this benchmark's own lake and instance only
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hcc-eventlog-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    import dagster as dg

    from hcc_assets.defs.resources import LakeResource
    from hcc_assets.instance import ensure_dagster_home
    from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
    from hcc_assets_tests.defs.helpers import PATIENT_ASSETS

    results: dict[str, dict] = {}
    try:
        # -- one ingest run of one CHAOS-like patient ------------------------------------------------
        lake_root = work / "lake"
        home = ensure_dagster_home(lake_root)  # DAGSTER_HOME=<lake>/dagster_home, the project's dagster.yaml
        (lake_root / "private").mkdir(parents=True)
        (lake_root / "private" / "pseudonym.key").write_text("event-log-benchmark")
        synthesize_cohort(lake_root / "incoming", SynthConfig(patients=1, seed=5, matrix=args.matrix))
        lake = LakeResource(root=str(lake_root), quiet_seconds=0)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            (pid,) = sorted(lake.ready_patients())
            instance.add_dynamic_partitions("patients", [pid])
            index = home / "history" / "runs" / "index.db"
            index_before = index.stat().st_size if index.exists() else 0
            run = dg.materialize(
                PATIENT_ASSETS, partition_key=pid, instance=instance, resources={"lake": lake}, run_config=QUIET
            )
            results["ingest"] = report_run(
                instance, home, run.run_id, f"ingest run of one {args.matrix}x{args.matrix} patient"
            )
            results["ingest"]["index_db_bytes"] = [index_before, index.stat().st_size]
            print(
                f"  history/runs/index.db (asset catalog) before/after this run: {index_before} / "
                f"{index.stat().st_size} B"
            )
            figures = sorted(p.relative_to(lake_root).as_posix() for p in lake_root.rglob("*.png"))
            print(f"  PNG files in the lake: {figures}")
            results["mask_overlay"] = mask_overlay_sizes(lake.lake, pid)
        if args.full:
            results.update(full(work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=dict))
    return 0


def mask_overlay_sizes(data_lake, pid: str) -> dict:
    """liver_mask's Figure 1 at this patient's geometry (the reference mask standing in for a predicted
    one; --full measures the real asset, but on 64x64 pixels): the metadata it costs as an inline PNG
    (how it was) and as a path plus thumbnail (figure_metadata), per copy in the event log."""
    import base64

    from hcc_assets.segmentation import overlay_png

    png = overlay_png(
        data_lake.read_nifti(data_lake.patient_file(pid, "nifti_volume.nii.gz")),
        data_lake.read_nifti(data_lake.patient_file(pid, "reference_mask.nii.gz")),
    )
    alt = "mid-liver slice, liver red, spleen blue"
    sizes = {
        "png_bytes": len(png),
        "inline_png_markdown": len(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"),
    }
    try:
        from hcc_assets.core.figures import thumbnail_data_uri
    except ImportError:  # before figures moved to the lake
        pass
    else:
        path = data_lake.patient_figure(pid, "liver_mask", "figure_1")
        sizes["path_plus_thumbnail"] = len(path) + len(f"![{alt}]({thumbnail_data_uri(png)})")
    print(
        f"\nliver_mask figure_1 at this geometry (not materialized; reference mask as the mask), per copy of the "
        f"metadata (3 copies per run: STEP_OUTPUT, ASSET_MATERIALIZATION, index.db): {sizes}"
    )
    return sizes


def full(work: Path) -> dict:
    """A small lake with trained models (in its own instance), then one patient's features run; the
    runs are measured in that instance. See the module docstring."""
    import dagster as dg

    from hcc_assets.defs import cohort, deep, ingest, segmentation
    from hcc_assets.defs.deep import HccClassifierConfig
    from hcc_assets.defs.resources import ComputeResource, LakeResource
    from hcc_assets.synthetic.cohort import SynthConfig, synthesize_cohort
    from hcc_assets_tests.conftest import SMALL_COHORT
    from hcc_assets_tests.defs.hands_off import TEST_PATIENT_CONFIG
    from hcc_assets_tests.model_configs import CLASSIFIER_TRAINING, SEGMENTATION_TRAINING

    root = work / "models_lake"
    home = root / "dagster_home"
    os.environ["DAGSTER_HOME"] = str(home)  # the instance config reads its storage folder from it
    from hcc_assets.instance import ensure_dagster_home

    ensure_dagster_home(root)
    (root / "private").mkdir(parents=True)
    (root / "private" / "pseudonym.key").write_text("event-log-benchmark")
    synthesize_cohort(root / "incoming", SynthConfig(**SMALL_COHORT))
    lake = LakeResource(root=str(root), quiet_seconds=0)
    classifier = dict(CLASSIFIER_TRAINING)
    if "accept_below_chance" in HccClassifierConfig.model_fields:  # a 5-epoch network on 6 patients may be one
        classifier["accept_below_chance"] = True
    ops = {
        **TEST_PATIENT_CONFIG["ops"],
        "liver_segmentation_model": {"config": SEGMENTATION_TRAINING},
        "hcc_classifier": {"config": classifier},
    }
    assets = dg.load_assets_from_modules([ingest, cohort, segmentation, deep])
    resources = {"lake": lake, "compute": ComputeResource(device="cpu", cpu_threads=2)}

    def materialize(instance, selection, partition_key=None):
        result = dg.materialize(
            assets,
            selection=selection,
            partition_key=partition_key,
            instance=instance,
            resources=resources,
            raise_on_error=False,
            run_config={"ops": {k: v for k, v in ops.items() if k in selection}, **QUIET},
        )
        failures = [e.step_failure_data.error.message.strip()[:300] for e in result.all_events if e.is_step_failure]
        if failures:
            print(f"{selection} failed: {failures[:2]}")
        return result

    out: dict[str, dict] = {}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        patients = sorted(lake.ready_patients())
        instance.add_dynamic_partitions("patients", patients)
        for pid in patients:
            materialize(instance, ["raw_scan", "nifti_volume", "preprocessed_volume"], pid)
        materialize(instance, ["cohort"])
        for step in ("liver_segmentation_model", "hcc_classifier"):
            result = materialize(instance, [step])
            out[step] = report_run(instance, home, result.run_id, f"cohort-level run of {step}")
        result = materialize(instance, ["liver_mask", "radiomic_features", "deep_embedding"], patients[0])
        out["features"] = report_run(
            instance, home, result.run_id, "features run of one patient (64x64 pixels, 32x32x16 grid)"
        )
        figures = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
        print(f"  PNG files in the lake: {figures[:12]}{' ...' if len(figures) > 12 else ''} ({len(figures)})")
    return out


if __name__ == "__main__":
    sys.exit(main())
