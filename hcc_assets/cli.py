"""The `hcc-assets` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import cast


def _lake_root(args) -> str:
    from hcc_assets.lake import default_lake_root, is_local_url

    root = getattr(args, "lake", None)
    if root:
        # the Definitions (here and in every worker process) read the lake root from the environment
        os.environ["HCC_ASSETS_LAKE"] = str(Path(root).resolve()) if is_local_url(root) else root
    return root or default_lake_root()


def _incoming(args) -> Path:
    """--out, else the lake's drop zone ($HCC_ASSETS_INCOMING, or <lake>/incoming for a local lake)."""
    from hcc_assets.lake import LakeSettings

    if getattr(args, "out", None):
        return Path(args.out)
    _lake_root(args)
    return LakeSettings.from_environment().incoming_dir


def cmd_synth(args) -> int:
    from hcc_assets.synthetic.cohort import Layout, SynthConfig, synthesize_cohort
    from hcc_assets.synthetic.transfer_syntax import DEFAULT_TRANSFER_SYNTAX

    config = SynthConfig(
        patients=args.patients,
        seed=args.seed,
        lesion_contrast=args.lesion_contrast,
        matrix=args.matrix,
        transfer_syntax=getattr(args, "transfer_syntax", None) or DEFAULT_TRANSFER_SYNTAX,
        enhanced=bool(getattr(args, "enhanced", False)),
        follow_up_fraction=getattr(args, "follow_up_fraction", 0.0) or 0.0,
        lungs=bool(getattr(args, "lungs", False)),
        reference=getattr(args, "reference", None) or "nifti",
    )
    start = time.perf_counter()
    layout = cast(Layout, getattr(args, "layout", "drop") or "drop")  # argparse's choices are the Layout values
    if config.follow_up_fraction and layout != "drop":
        print("synth: --follow-up-fraction is available with the drop layout only", file=sys.stderr)
        return 2
    if config.reference == "seg" and layout != "drop":
        print("synth: --reference seg is available with the drop layout only", file=sys.stderr)
        return 2
    if config.enhanced and layout == "chaos":
        print("synth: --enhanced is not available with --layout chaos (one Ground PNG per slice file)", file=sys.stderr)
        return 2
    patients = synthesize_cohort(Path(args.out), config, layout=layout, workers=getattr(args, "workers", 1) or 1)
    n_hcc = sum(p.hcc for p in patients)
    print(
        f"synthesized {len(patients)} patients ({n_hcc} HCC, {len(patients) - n_hcc} healthy) "
        f"in {time.perf_counter() - start:.1f}s -> {args.out}" + (f" ({layout} layout)" if layout != "drop" else "")
    )
    return 0


def _print_imports(source: str, results, elapsed: float) -> int:
    for result in results:
        line = f"  {result.status:9s} {result.patient}"
        if result.ok and result.message:
            line += f": {result.message}"
        elif not result.ok:
            line = f"  FAILED    {result.message}"
        print(line, file=sys.stdout if result.ok else sys.stderr)
    failed = sum(not r.ok for r in results)
    imported = sum(r.status == "imported" for r in results)
    print(
        f"{source}: {imported} imported, {len(results) - imported - failed} unchanged, {failed} failed "
        f"in {elapsed:.1f}s"
    )
    return 1 if failed else 0


def cmd_import_chaos(args) -> int:
    from hcc_assets.core.errors import PatientInputError
    from hcc_assets.intake.sources import import_chaos

    start = time.perf_counter()
    try:
        results = import_chaos(Path(args.root), _incoming(args))
    except PatientInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _print_imports("CHAOS", results, time.perf_counter() - start)


def cmd_import_tcia(args) -> int:
    from hcc_assets.core.errors import PatientInputError
    from hcc_assets.intake.sources import import_tcia

    start = time.perf_counter()
    try:
        results = import_tcia(Path(args.root), _incoming(args), metadata=Path(args.metadata) if args.metadata else None)
    except PatientInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _print_imports("TCGA-LIHC", results, time.perf_counter() - start)


def cmd_receive(args) -> int:
    from hcc_assets.intake.receiver import Receiver, configure_logging

    configure_logging()
    callers = [c.strip() for c in (args.allowed_callers or "").split(",") if c.strip()]
    if not callers:
        print(
            "error: name the calling AE titles allowed to send with --allowed-callers A,B ('*' accepts any caller)",
            file=sys.stderr,
        )
        return 2
    if callers == ["*"]:
        callers = []
    incoming = _incoming(args)
    Receiver(incoming, ae_title=args.ae_title, allowed_callers=callers, bind=args.bind, port=args.port).serve_forever()
    return 0


def _store(args):
    """The feature store the settings name, or --catalog/--data, at --snapshot/--as-of if given."""
    from hcc_assets.featurestore import FeatureStore
    from hcc_assets.lake import LakeSettings

    _lake_root(args)
    settings = LakeSettings.from_environment()
    # --catalog/--data first: a catalog named on the command line needs no lake root's default
    store = FeatureStore(
        args.catalog or settings.feature_store_catalog, args.data or settings.feature_store_data or None
    )
    if getattr(args, "snapshot", None) is not None or getattr(args, "as_of", None):
        store = store.at(snapshot=args.snapshot, time=args.as_of)
    return store


def cmd_sql(args) -> int:
    from hcc_assets.featurestore.catalog import ALIAS
    from hcc_assets.featurestore.sql import check_read_only, format_frame

    try:
        store = _store(args)
        check_read_only(args.query)
        frame = store.query(args.query, alias=ALIAS)
    except Exception as error:  # a bad query is the user's to fix: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_frame(frame, args.format, max_rows=args.max_rows))
    return 0


def cmd_training_set(args) -> int:
    from hcc_assets.featurestore.registry import training_set, write_frame

    try:
        frame = training_set(_store(args), args.model, model_name=args.model_name)
        if args.out:
            write_frame(frame, args.out)
            print(f"{frame.height} patients x {frame.width - 3} features of model {args.model} -> {args.out}")
        else:
            sys.stdout.write(frame.write_csv())
    except Exception as error:  # an unknown version or an expired snapshot: one clear line
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def cmd_migrate_store(args) -> int:
    from hcc_assets.featurestore.migrate import migrate_duckdb_file

    try:
        counts = migrate_duckdb_file(Path(args.source), _store(args))
    except Exception as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for table, n in counts.items():
        print(f"  {table:26s} {n:>10d} rows")
    print(
        f"migrated {sum(counts.values())} rows of {len(counts)} tables into the DuckLake feature store; "
        f"{args.source} is left as it was (remove it when satisfied)"
    )
    return 0


def cmd_materialize(args, stages: list[tuple[str, float]] | None = None) -> int:
    """Ingest every ready patient; with `args.cohort`, then the cohort models, the per-patient
    features, the analysis and the predictions. `stages` (label, seconds) gets one entry per stage
    run, and the breakdown is printed at the end."""
    from hcc_assets.instance import ensure_dagster_home

    stages = [] if stages is None else stages
    begun = time.perf_counter()
    ensure_dagster_home(_lake_root(args))
    import dagster as dg

    from hcc_assets import runner

    instance = dg.DagsterInstance.get()
    unreadable: dict[str, str] = {}
    ready = runner.register_ready_patients(instance, skipped=unreadable)
    for pid, reason in sorted(unreadable.items()):
        print(f"patient {pid}: {reason}; skipped", flush=True)
    stages.append(("start-up (definitions, partitions)", time.perf_counter() - begun))
    with runner.worker_pool(args.workers) as pool:  # one set of worker processes for every per-patient stage
        ok = _materialize_stages(args, ready, stages, pool)
    _print_stages(stages)
    return 0 if ok else 1


def _materialize_stages(args, ready: list[str], stages: list[tuple[str, float]], pool) -> bool:
    """The stages of `cmd_materialize` after start-up; True when every stage that ran succeeded."""
    from hcc_assets import runner

    start = time.perf_counter()
    # --dask-address: each run's steps go to that Dask scheduler (hcc_assets.dask_definitions)
    on_dask = {"executor": "dask", "dask_address": args.dask_address} if getattr(args, "dask_address", None) else {}
    results = runner.materialize_patients(
        ready, workers=args.workers, progress=_progress_line("ingest"), pool=pool, **on_dask
    )
    _report("ingested", results, _stage_done(stages, "ingest (one run per patient)", start), args.workers)
    if not args.cohort:
        return True
    ingested = [pid for pid, ok, _ in results if ok]
    start = time.perf_counter()
    print("cohort assets (split, segmentation model, classifier): running; progress in the log lines", flush=True)
    cohort_steps: list[tuple[str, float]] = []
    cohort_ok = runner.materialize_cohort(steps=cohort_steps)
    cohort_seconds = _stage_done(stages, "cohort split, segmentation model, classifier", start)
    stages += [(f"{DETAIL}{step}", seconds) for step, seconds in cohort_steps]
    classifier = _classifier_state()
    refused = classifier["refused"]
    print(
        f"cohort assets (split, models): {'ok' if cohort_ok else 'FAILED (see the run in the UI)' if not refused else 'done'}"
        f" in {cohort_seconds:.1f}s"
    )
    if refused:  # a quality gate said no: a result to report, not a crash
        print(
            f"hcc_classifier retrain {refused} REFUSED: {classifier['why']}; "
            + (
                f"version {classifier['current']} stays in use"
                if classifier["current"]
                else "no usable classifier: no deep embeddings, no deep or explainable predictions"
            ),
            flush=True,
        )
    usable = classifier["current"] is not None
    features_ok = True
    if runner.has_assets("patient_features"):
        # per-patient features run even after a failed model: those that need it fail clearly
        assets = None if usable else tuple(a for a in runner.asset_names("patient_features") if a != "deep_embedding")
        start = time.perf_counter()
        features = runner.materialize_patients(
            ingested,
            workers=args.workers,
            job="patient_features",
            **on_dask,
            progress=_progress_line("features"),
            assets=assets,
            pool=pool,
        )
        elapsed = _stage_done(stages, "liver masks, radiomics, deep embeddings", start)
        _report("model-derived features for", features, elapsed, args.workers)
        features_ok = all(ok for _, ok, _ in features)
    analysis_ok = True
    if runner.has_assets("analysis_refresh"):
        start = time.perf_counter()
        deep_only = {"explainable_features", "explainability_sweep", "explainable_model"}
        analysis = None if usable else [a for a in runner.asset_names("analysis_refresh") if a not in deep_only]
        analysis_ok = runner.materialize_cohort("analysis_refresh", assets=analysis)
        elapsed = _stage_done(stages, "analysis (LASSO models, metrics, report)", start)
        print(
            f"analysis (explainable features, LASSO models, metrics, coefficients, report): "
            f"{'ok' if analysis_ok else 'FAILED (see the run in the UI)'} in {elapsed:.1f}s"
            + ("" if usable else " (explainable arm skipped: no usable classifier)")
        )
    predictions_ok = True
    if runner.has_assets("patient_predictions"):
        start = time.perf_counter()
        predicted = runner.materialize_patients(
            ingested,
            workers=args.workers,
            job="patient_predictions",
            **on_dask,
            progress=_progress_line("predictions"),
            pool=pool,
        )
        _report("predictions for", predicted, _stage_done(stages, "predictions", start), args.workers)
        predictions_ok = all(ok for _, ok, _ in predicted)
        _print_prediction_summary()
    return bool((cohort_ok or refused) and features_ok and analysis_ok and predictions_ok)


def _stage_done(stages: list[tuple[str, float]], label: str, start: float) -> float:
    """Record a stage that began at `start` (time.perf_counter) in `stages`; its wall seconds."""
    elapsed = time.perf_counter() - start
    stages.append((label, elapsed))
    return elapsed


DETAIL = "  of which "  # a stage label starting so is a part of the stage above it, not added to the total


def _print_stages(stages: list[tuple[str, float]]) -> None:
    total = sum(seconds for label, seconds in stages if not label.startswith(DETAIL))
    print("stage breakdown (wall seconds):")
    for label, seconds in stages:
        print(f"  {label:46s} {seconds:7.1f}  {seconds / max(total, 1e-9):6.1%}")
    print(f"  {'total':46s} {total:7.1f}")


def _classifier_state() -> dict:
    """The current hcc_classifier version, and the newest retrain refused after it (with why)."""
    import json

    from hcc_assets.defs.resources import default_lake_resource
    from hcc_assets.featurestore import registry

    store = default_lake_resource().store
    current = registry.current_version(store, "hcc_classifier")
    refused = registry.refused_retrain(store, "hcc_classifier")
    why = ""
    if refused:
        metrics = json.loads(refused["metrics"] or "{}")
        why = (
            f"training accuracy {metrics.get('train_acc', float('nan')):.3f} is not above the majority-class "
            f"rate {metrics.get('majority_rate', float('nan')):.3f} (beats_chance_on_training)"
        )
    return {"current": current, "refused": refused["version"] if refused else None, "why": why}


def _print_prediction_summary() -> None:
    from hcc_assets.defs.resources import default_lake_resource
    from hcc_assets.featurestore import reads

    frame = reads.patient_predictions(default_lake_resource().store)
    if frame.height == 0:
        return
    for model in ("deep", "radiomic", "explainable"):
        rows = frame.filter(frame["model"] == model)
        made = rows.filter(rows["status"] == "predicted")
        reasons = sorted(set(rows.filter(rows["status"] != "predicted")["reason"].to_list()))
        line = f"  {model:11s} P(HCC) for {made.height}/{rows.height} patients"
        if made.height:
            line += f", version {', '.join(sorted(set(made['model_version'].to_list())))}"
        if reasons:
            line += f"; unavailable: {reasons[0]}" + (
                f" (+{len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
            )
        print(line)


def cmd_status(args) -> int:
    """Per patient: current, stale or failed, and why (pseudonyms only)."""
    from hcc_assets.instance import ensure_dagster_home

    ensure_dagster_home(_lake_root(args))
    import dagster as dg

    from hcc_assets.featurestore import reads
    from hcc_assets.steps.status import format_states, patient_states

    try:
        store = _store(args)
        frame = reads.patient_status(store)
    except Exception as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from hcc_assets import runner

    instance = dg.DagsterInstance.get()
    patients = [p for p in frame["patient_id"].to_list() if not args.patient or p in set(args.patient)]
    states = patient_states(
        frame.filter(frame["patient_id"].is_in(patients)),
        _last_failures(instance, patients),
        runner.latest_check_warnings(instance, patients),
    )
    print(format_states(states))
    classifier = _classifier_state()
    if classifier["current"] is None:
        print(
            "no usable hcc_classifier: "
            + (
                f"retrain {classifier['refused']} refused, {classifier['why']}"
                if classifier["refused"]
                else "none trained yet"
            )
        )
    elif classifier["refused"]:
        print(
            f"hcc_classifier {classifier['current']} in use; retrain {classifier['refused']} refused: {classifier['why']}"
        )
    return 0


def _newest_run(instance, partition: str):
    """The newest run of a partition (any job), or None."""
    import dagster as dg

    records = instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": partition}), limit=1)
    return records[0].dagster_run if records else None


def _run_events(instance, run_id: str, kinds: set) -> list:
    """The run's Dagster events of these types."""
    return [e.dagster_event for e in instance.all_logs(run_id, of_type=kinds) if e.dagster_event]


def _check_warnings(instance, partition: str) -> list[str]:
    """The failed warning checks of the partition's newest run (see runner.check_warnings)."""
    import dagster as dg

    from hcc_assets import runner

    run = _newest_run(instance, partition)
    if run is None:
        return []
    return runner.check_warnings(_run_events(instance, run.run_id, {dg.DagsterEventType.ASSET_CHECK_EVALUATION}))


def _last_failures(instance, patients: list[str]) -> dict[str, str]:
    """patient -> first error line of its newest run, where that run failed."""
    import dagster as dg

    from hcc_assets import runner

    failures = {}
    for pid in patients:
        run = _newest_run(instance, pid)
        if run is None or run.status != dg.DagsterRunStatus.FAILURE:
            continue
        kinds = {dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.ASSET_CHECK_EVALUATION}
        events = _run_events(instance, run.run_id, kinds)
        steps_failed = any(e.is_step_failure for e in events)
        failures[pid] = (runner.failure_line(events) or "step failed") if steps_failed else "run failed"
    return failures


def cmd_predict(args) -> int:
    """Publish one study folder into the drop zone, run its pipeline through Dagster, print P(HCC)."""
    from hcc_assets.instance import ensure_dagster_home

    ensure_dagster_home(_lake_root(args))
    import dagster as dg

    from hcc_assets import runner
    from hcc_assets.defs.resources import default_lake_resource
    from hcc_assets.featurestore import reads
    from hcc_assets.intake.dropzone import ArchiveError, archive_stem, drop_archive, drop_copy, is_archive

    source = Path(args.folder).resolve()
    archive = is_archive(source)
    if not source.is_dir() and not archive:
        print(f"error: {args.folder} is neither a folder nor a ZIP or TAR archive", file=sys.stderr)
        return 2
    lake = default_lake_resource()
    incoming = lake.incoming_dir.resolve()
    pid = lake.pseudonym((archive_stem(source) or source.stem) if archive else source.name)
    if source.parent != incoming or archive:
        try:
            (drop_archive if archive else drop_copy)(source, incoming)
        except ArchiveError as error:
            print(f"error: {error} (patient {pid})", file=sys.stderr)
            return 2
        except FileExistsError as error:
            print(
                f"error: {error} (patient {pid}); predict that one with its path in the drop zone, or rename "
                "the folder",
                file=sys.stderr,
            )
            return 2
    instance = dg.DagsterInstance.get()
    keys = sorted(lake.study_partitions(pid))  # one per study: a follow-up scan is `<pid>.s2`
    existing = set(instance.get_dynamic_partitions("patients"))
    if new := [key for key in keys if key not in existing]:
        instance.add_dynamic_partitions("patients", new)
    started = time.perf_counter()
    results = runner.materialize_patients(keys, workers=1, job="patient_pipeline")
    code = 0
    for key, ok, failure in results:
        print(
            f"patient {key}: patient_pipeline {'ok' if ok else 'FAILED: ' + failure} "
            f"in {time.perf_counter() - started:.1f}s"
        )
        for warning in _check_warnings(instance, key):
            print(f"  warning: {warning}")
        predictions = reads.patient_predictions(lake.store, key)
        if predictions.height == 0:
            print(f"patient {key}: no prediction was made (see `hcc-assets status --patient {key}`)")
            code = 1
            continue
        for row in predictions.iter_rows(named=True):
            if row["status"] == "predicted":
                call = "HCC" if row["decision"] else "no HCC"
                print(
                    f"  {row['model']:11s} P(HCC) = {row['probability']:.3f} -> {call} at {row['threshold']:g} "
                    f"({row['model_name']} {row['model_version']})" + (f"; {row['reason']}" if row["reason"] else "")
                )
            else:
                print(f"  {row['model']:11s} unavailable: {row['reason']}")
        code = code if ok else 1
    return code


def _progress_line(stage: str):
    """One line per finished patient run: count, outcome, elapsed and a linear ETA."""

    def show(done: int, total: int, result: tuple[str, bool, str], elapsed: float) -> None:
        pid, ok, error = result
        eta = elapsed / done * (total - done)
        outcome = "ok" if ok else f"FAILED: {error}"
        print(f"  {stage} [{done}/{total}] {pid} {outcome} ({elapsed:.0f} s elapsed, ETA {eta:.0f} s)", flush=True)

    return show


def _report(what: str, results: list[tuple[str, bool, str]], elapsed: float, workers: int) -> None:
    failed = [(pid, error) for pid, ok, error in results if not ok]
    print(
        f"{what} {len(results) - len(failed)}/{len(results)} patients in {elapsed:.1f}s "
        f"({elapsed / max(len(results), 1):.2f}s per patient, {workers} workers)"
    )
    for pid, error in failed:
        print(f"  FAILED {pid}: {error}")


# Between the synthesizer's subtle lesions (1: T2 lesion/liver 1.5-2x) and clearly visible ones
# (2: 2-3x, which the deep arm separates perfectly): at 1.25 (1.6-2.25x) the arms of Table 1 differ,
# and the study's classifier, without MedicalNet weights, still beats chance on independent cohorts
# (README, "What the demo's Table 1 shows").
DEMO_LESION_CONTRAST = 1.25
# The demo's settings (README, "The demo: under 5 minutes"): nnU-Net at 4 mm in-plane and the
# classifier for 20 epochs, so that the whole demo takes under 5 minutes on 2 cores; --full runs the
# study's.
DEMO_SETTINGS = "deploy/fast_demo.yaml"
# The demo's cohort. With 8 validation patients, whether an arm's holdout row comes out perfect is
# largely chance: with the demo's settings, seed 0's radiomic row did (1.000 in every column) and
# seed 2's arms differ with none perfect (README, "What the demo's Table 1 shows").
DEMO_SEED = 2


def _demo_settings(lake: str, args) -> str | None:
    """Put the demo's settings into the lake (<lake>/deployment.yaml, which every later command on
    the lake reads) or, with --full, take them out; returns an error line, or None."""
    from hcc_assets.defs.deployment import lake_settings_path
    from hcc_assets.lake import PROJECT_ROOT

    target = lake_settings_path(lake)
    assert target is not None  # a local lake: checked by the caller
    if args.full:
        target.unlink(missing_ok=True)
        return None
    source = Path(args.settings) if args.settings else PROJECT_ROOT / DEMO_SETTINGS
    if not source.is_file():
        return f"error: --settings {source}: no such file"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = source.read_text()
    if not target.is_file() or target.read_text() != text:
        target.write_text(text)
    return None


def cmd_demo(args) -> int:
    from hcc_assets.lake import is_local_url

    lake = _lake_root(args)
    if args.source == "studylike" and args.reference != "nifti":
        print("error: --reference seg is available with --source synthetic only", file=sys.stderr)
        return 2
    if not is_local_url(lake):  # the demo synthesizes its drop zone and instance under the lake folder
        print(f"error: the demo needs a local lake folder, not {lake}; see docs/scaling.md", file=sys.stderr)
        return 2
    if error := _demo_settings(lake, args):
        print(error, file=sys.stderr)
        return 2
    incoming = Path(lake) / "incoming"
    stages: list[tuple[str, float]] = []
    if not any(incoming.glob("labels*.csv")):
        begun = time.perf_counter()
        from hcc_assets.intake.pseudonym import KEY_FILE_PARTS, write_demo_key

        # a new demo lake of synthetic patients: pseudonyms from the seed, so the same seed gives the
        # same split and the same Table 1 (a random key would draw another split each time)
        if write_demo_key(Path(lake).joinpath(*KEY_FILE_PARTS), args.seed):
            print(
                f"demo lake: pseudonym key derived from seed {args.seed} (synthetic patients only; never add real scans)"
            )
        if args.source == "studylike":
            _prepare_studylike(Path(lake), incoming, args.patients, args.seed, args.lesion_contrast, args.lungs)
        else:
            cmd_synth(
                argparse.Namespace(
                    patients=args.patients,
                    seed=args.seed,
                    lesion_contrast=args.lesion_contrast,
                    matrix=256,
                    out=str(incoming),
                    layout="drop",
                    workers=args.workers,
                    lungs=args.lungs,
                    reference=args.reference,
                )
            )
        stages.append((f"{args.source} cohort written", time.perf_counter() - begun))
    return cmd_materialize(argparse.Namespace(lake=lake, workers=args.workers, cohort=True), stages)


def _prepare_studylike(
    lake: Path, incoming: Path, patients: int, seed: int, lesion_contrast: float, lungs: bool = False
) -> None:
    """The study's mix: CHAOS-layout healthy and TCGA-LIHC-layout HCC patients, written as
    the downloads would be and brought in through the importers (what a real user runs)."""
    from hcc_assets.intake.sources import import_chaos, import_tcia

    sources = lake / "sources"
    half = patients // 2
    cmd_synth(
        argparse.Namespace(
            patients=half,
            seed=seed,
            lesion_contrast=1.0,
            matrix=256,
            out=str(sources / "CHAOS" / "MR"),
            layout="chaos",
            lungs=lungs,
        )
    )
    cmd_synth(
        argparse.Namespace(
            patients=patients - half,
            seed=seed + 1,
            lesion_contrast=lesion_contrast,
            matrix=256,
            out=str(sources / "TCIA"),
            layout="tcia",
            lungs=lungs,
        )
    )
    start = time.perf_counter()
    _print_imports("CHAOS", import_chaos(sources / "CHAOS" / "MR", incoming), time.perf_counter() - start)
    start = time.perf_counter()
    tcia = import_tcia(sources / "TCIA" / "TCGA-LIHC", incoming, metadata=sources / "TCIA" / "metadata.csv")
    _print_imports("TCGA-LIHC", tcia, time.perf_counter() - start)


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {'not set' if action.default is None else '%(default)s'})"


def build_parser() -> argparse.ArgumentParser:
    from hcc_assets.synthetic.transfer_syntax import (
        DEFAULT_TRANSFER_SYNTAX,
        LOSSY_TRANSFER_SYNTAXES,
        TRANSFER_SYNTAXES,
    )

    parser = argparse.ArgumentParser(prog="hcc-assets", description=__doc__, formatter_class=_HelpWithDefaults)
    parser.add_argument("--lake", help="data lake root (default: $HCC_ASSETS_LAKE or ./data_lake)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, formatter_class=_HelpWithDefaults, **k)  # type: ignore[method-assign]

    synth = sub.add_parser("synth", help="write a synthetic DICOM cohort with known truth")
    synth.add_argument("--patients", type=int, default=40, help="number of patients")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same cohort)")
    synth.add_argument("--out", required=True, help="folder to write the cohort into")
    synth.add_argument("--lesion-contrast", type=float, default=1.0, help="0 = labels carry no image signal")
    synth.add_argument("--matrix", type=int, default=256, help="in-plane size (smaller for quick tests)")
    synth.add_argument("--workers", type=int, default=1, help="patients written at once (same bytes with any number)")
    synth.add_argument(
        "--transfer-syntax",
        choices=[*TRANSFER_SYNTAXES, *LOSSY_TRANSFER_SYNTAXES],
        default=DEFAULT_TRANSFER_SYNTAX,
        help="how the DICOM files are encoded: explicit VR little endian, JPEG Lossless SV1, JPEG-LS lossless, "
        "JPEG 2000 lossless, RLE lossless or deflated (same pixels in each); or JPEG 2000 lossy (ingest flags it)",
    )
    synth.add_argument(
        "--enhanced",
        action="store_true",
        help="write each series as one multi-frame Enhanced MR file instead of one file per slice "
        "(drop and tcia layouts; combines with --transfer-syntax)",
    )
    synth.add_argument(
        "--lungs",
        action="store_true",
        help="add the lung bases above the diaphragm (dark on T2); default: soft tissue above the liver dome",
    )
    synth.add_argument(
        "--reference",
        choices=["nifti", "seg"],
        default="nifti",
        help="the drop layout's reference liver/spleen mask: reference/liver_spleen_mask.nii.gz, or a DICOM SEG "
        "drawn on the T2 series (as annotation tools save it)",
    )
    synth.add_argument(
        "--follow-up-fraction",
        type=float,
        default=0.0,
        help="this fraction of patients (seeded) also gets a follow-up study 90-400 days later (drop layout): "
        "ingested as partition <pseudonym>.s2",
    )
    synth.add_argument(
        "--layout",
        choices=["drop", "chaos", "tcia"],
        default="drop",
        help="drop zone (default), CHAOS Train_Sets/MR (all healthy) or TCIA/NBIA TCGA-LIHC (all HCC)",
    )
    synth.set_defaults(func=cmd_synth)

    importer = sub.add_parser("import", help="import a CHAOS or TCGA-LIHC download into the drop zone")
    sources = importer.add_subparsers(dest="source", required=True)
    add_source = sources.add_parser
    sources.add_parser = lambda *a, **k: add_source(*a, formatter_class=_HelpWithDefaults, **k)  # type: ignore[method-assign]
    chaos = sources.add_parser("chaos", help="CHAOS MR (healthy): T2SPIR DICOM and Ground PNG masks")
    chaos.add_argument("--root", required=True, help="the CHAOS .../Train_Sets/MR folder")
    chaos.add_argument("--out", help="drop zone (default: <lake>/incoming)")
    chaos.set_defaults(func=cmd_import_chaos)
    tcia = sources.add_parser("tcia", help="TCGA-LIHC (HCC) as saved by the NBIA Data Retriever")
    tcia.add_argument(
        "--root",
        required=True,
        help="the TCGA-LIHC folder (one folder per PatientID), or the NBIA download folder that holds it and metadata.csv",
    )
    tcia.add_argument("--metadata", help="NBIA metadata.csv: import exactly the series it lists")
    tcia.add_argument("--out", help="drop zone (default: <lake>/incoming)")
    tcia.set_defaults(func=cmd_import_tcia)

    receive = sub.add_parser("receive", help="DICOM C-STORE receiver that writes studies into the drop zone")
    receive.add_argument("--port", type=int, default=11112, help="TCP port to listen on")
    receive.add_argument("--ae-title", default="HCC_ASSETS", help="this receiver's AE title")
    receive.add_argument("--bind", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    receive.add_argument("--out", help="drop zone (default: <lake>/incoming)")
    receive.add_argument(
        "--allowed-callers", default="", help="comma-separated calling AE titles allowed to send (required; '*': any)"
    )
    receive.set_defaults(func=cmd_receive)

    def store_options(command, time_travel: bool = True) -> None:
        command.add_argument(
            "--catalog",
            "--db",
            dest="catalog",
            help="DuckLake catalog: a SQLite file or postgres:<libpq settings> "
            "(default: $HCC_ASSETS_FEATURE_STORE or <lake>/feature_store.sqlite)",
        )
        command.add_argument(
            "--data",
            help="the store's data path (default: $HCC_ASSETS_FEATURE_STORE_DATA or the one recorded in the catalog)",
        )
        if time_travel:
            command.add_argument(
                "--snapshot", type=int, help="read the store as it was at this snapshot id (default: the newest)"
            )
            command.add_argument(
                "--as-of", help="read the store as it was at this time, e.g. '2026-11-30 12:00:00+00' (default: now)"
            )

    sql = sub.add_parser("sql", help="run a read-only SQL query on the feature store (attached as `fs`)")
    sql.add_argument("query", help="one read-only SQL statement")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    sql.add_argument("--max-rows", type=int, default=100, help="rows shown in table format")
    store_options(sql)
    sql.set_defaults(func=cmd_sql)

    training = sub.add_parser(
        "training-set",
        help="the exact matrix a registered model was trained on "
        "(patients, features, labels), read at the snapshot the model recorded",
    )
    training.add_argument("--model", required=True, help="model version (models.version)")
    training.add_argument("--model-name", help="model name, when a version string is shared")
    training.add_argument("--out", help="write CSV (.csv) or Parquet (.parquet) here instead of CSV to stdout")
    store_options(training, time_travel=False)
    training.set_defaults(func=cmd_training_set)

    migrate = sub.add_parser(
        "migrate-store", help="copy an old single-file feature_store.duckdb into the DuckLake feature store"
    )
    migrate.add_argument("--from", dest="source", required=True, help="the old feature_store.duckdb")
    store_options(migrate, time_travel=False)
    migrate.set_defaults(func=cmd_migrate_store)

    materialize = sub.add_parser("materialize", help="ingest every complete drop folder, then the cohort")
    materialize.add_argument("--workers", type=int, default=2, help="patient runs at once (one core each)")
    materialize.add_argument(
        "--no-cohort",
        dest="cohort",
        action="store_false",
        help="ingest only: no cohort models, features, analysis or predictions",
    )
    materialize.add_argument(
        "--dask-address",
        help="run the per-patient steps on this Dask scheduler (e.g. tcp://127.0.0.1:8786; see docs/scaling.md)",
    )
    materialize.set_defaults(func=cmd_materialize)

    status = sub.add_parser("status", help="per patient (pseudonyms): what is current, stale or failed, and why")
    status.add_argument("--patient", action="append", help="only this patient (repeatable; default: all)")
    store_options(status, time_travel=False)
    status.set_defaults(func=cmd_status)

    predict = sub.add_parser(
        "predict",
        help="ingest one study folder through Dagster (a run recorded in the "
        "instance) and print its P(HCC) from every current model",
    )
    predict.add_argument(
        "folder",
        help="the patient's study folder (DICOM files, any layout), or a ZIP or TAR archive of it (a PACS, "
        "viewer or research-archive export; .tar.gz, .tgz, .tar.bz2, .tar.xz too); copied (unpacked) into the "
        "drop zone unless it is already there",
    )
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="synthesize the 40-patient cohort and materialize everything")
    demo.add_argument("--patients", type=int, default=40, help="patients in the synthetic cohort")
    demo.add_argument(
        "--seed", type=int, default=DEMO_SEED, help="seed of the synthetic cohort (README: why this default)"
    )
    demo.add_argument("--workers", type=int, default=2, help="patient runs at once (one core each)")
    demo.add_argument(
        "--lesion-contrast",
        type=float,
        default=DEMO_LESION_CONTRAST,
        help="lesion signal of the synthetic cohort: T2 lesion/liver 1 + contrast x (0.5-1); 1 = 1.5-2x (subtle), "
        f"{DEMO_LESION_CONTRAST:g} = 1.6-2.25x (default: the arms of Table 1 differ), 2 = 2-3x (the deep arm "
        "separates it perfectly), 0 = a null cohort (labels without signal); see benchmarks/classifier_separation.py",
    )
    demo.add_argument(
        "--lungs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the cohort's anatomy has lung bases above the diaphragm, dark on T2 as on a real scan; "
        "--no-lungs: soft tissue above the liver dome (the synthesizer's default, which the tests use)",
    )
    demo.add_argument(
        "--source",
        choices=["synthetic", "studylike"],
        default="synthetic",
        help="synthetic: drop-zone cohort; studylike: CHAOS + TCGA-LIHC layouts through the importers",
    )
    demo.add_argument(
        "--reference",
        choices=["nifti", "seg"],
        default="nifti",
        help="the synthetic source's reference masks: NIfTI files, or DICOM SEG objects drawn on the T2 series "
        "(the same masks: the same models and Table 1)",
    )
    settings = demo.add_mutually_exclusive_group()
    settings.add_argument(
        "--settings",
        help=f"deployment settings (`ops:` YAML) the demo lake is made and kept with, copied to "
        f"<lake>/deployment.yaml (default: {DEMO_SETTINGS}, nnU-Net at 4 mm and the classifier for 20 epochs: "
        "the 5-minute demo)",
    )
    settings.add_argument(
        "--full",
        action="store_true",
        help="the study's settings (the assets' defaults: nnU-Net at 3.2 mm, the classifier for 50 or more "
        "epochs; about 6.5 minutes); removes <lake>/deployment.yaml",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
