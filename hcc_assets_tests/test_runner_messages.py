"""What the CLI prints about a run's asset checks, from the events Dagster records for them."""

import dagster as dg

from hcc_assets import runner


def _evaluation(check: str, passed: bool, severity: dg.AssetCheckSeverity, **metadata) -> dg.DagsterEvent:
    evaluation = dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey("liver_mask"), check_name=check, passed=passed, metadata=metadata, severity=severity
    )
    return dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.ASSET_CHECK_EVALUATION.value,
        job_name="patient_pipeline",
        event_specific_data=evaluation,
    )


def test_failed_warning_checks_are_listed_with_their_numbers_and_nothing_else():
    events = [
        _evaluation("mask_not_empty", True, dg.AssetCheckSeverity.ERROR, liver_voxels=9000),
        _evaluation(
            "liver_within_field_of_view",
            False,
            dg.AssetCheckSeverity.WARN,
            liver_at_edge_fraction=1.0,
            edge="slice 13 of 13",
            threshold=0.05,
        ),
        _evaluation("single_main_component", True, dg.AssetCheckSeverity.WARN, largest_component_fraction=0.99),
        _evaluation("liver_volume_plausible", False, dg.AssetCheckSeverity.ERROR, liver_ml=3.8),
    ]
    assert runner.check_warnings(events) == [
        "liver_mask: check liver_within_field_of_view failed "
        "(edge slice 13 of 13, liver_at_edge_fraction 1.0, threshold 0.05)"
    ]
    assert runner.check_warnings(events[:1]) == []
