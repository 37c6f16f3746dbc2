"""The one Definitions object loads and shows the lineage (the layers: test_architecture.py)."""

import dagster as dg

from hcc_assets.definitions import defs


def test_definitions_load_with_lineage_jobs_sensor_and_schedule():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey
    assert graph.get(key("nifti_volume")).parent_keys == {key("raw_scan")}
    assert graph.get(key("preprocessed_volume")).parent_keys == {key("nifti_volume")}
    assert key("preprocessed_volume") in graph.get(key("cohort")).parent_keys
    for name in ("raw_scan", "nifti_volume", "preprocessed_volume", "cohort"):
        node = graph.get(key(name))
        assert node.code_version, name
    assert graph.get(key("raw_scan")).partitions_def.name == "patients"
    assert defs.resolve_job_def("patient_ingest") and defs.resolve_job_def("cohort_refresh")
    for sensor in ("incoming_scans_sensor", "hcc_automation"):
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_sensor_def("incoming_scans_sensor").minimum_interval_seconds <= 10
    # refreshes are declarative automation: the weekly cron on the models, reactions downstream
    assert "0 2 * * 0" in graph.get(key("hcc_classifier")).automation_condition.get_label()  # weekly
    for name in (
        "liver_mask",
        "radiomic_features",
        "deep_embedding",
        "hcc_prediction",
        "explainable_features",
        "model_metrics",
        "report",
    ):
        assert graph.get(key(name)).automation_condition is not None, name
    for name in ("raw_scan", "nifti_volume", "preprocessed_volume"):  # new scans: the drop-zone sensor's
        assert graph.get(key(name)).automation_condition is None, name
    assert graph.get(key("hcc_prediction")).partitions_def.name == "patients"
    assert {"deep_embedding", "radiomic_features", "radiomic_model", "explainable_model", "hcc_classifier"} <= {
        k.to_user_string() for k in graph.get(key("hcc_prediction")).parent_keys
    }
    # every run without run config of its own (sensor, automation, UI) runs its steps in one process
    job = defs.resolve_job_def("patient_pipeline")
    assert key("hcc_prediction") in job.asset_layer.executable_asset_keys
    assert job.executor_def.name == "in_process_first"
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == "in_process_first"


def test_instance_yaml_uses_sqlite_and_a_gpu_pool_of_one(tmp_path, monkeypatch):
    import yaml

    from hcc_assets.instance import ensure_dagster_home

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = ensure_dagster_home(tmp_path / "lake")
    assert home == (tmp_path / "lake" / "dagster_home").resolve()
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    assert "sqlite" in settings["storage"]
    assert settings["concurrency"]["pools"]["default_limit"] == 1
    assert settings["run_queue"]["dequeue_interval_seconds"] <= 2  # a new scan's run leaves the queue promptly
    instance = dg.DagsterInstance.from_config(str(home))
    assert "Sqlite" in type(instance.run_storage).__name__
