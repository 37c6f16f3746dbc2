"""The pure parts of deep_embedding's use case: which classifier, and what the embedding reports."""

import json

import numpy as np
import pytest

from hcc_assets.steps import embedding
from hcc_assets.steps.embedding import PatientEmbedding, UnusableClassifierError


def _registry(monkeypatch, row):
    monkeypatch.setattr(embedding.registry, "current_model", lambda store, name: row)


def _row(**metrics):
    return {"version": "v1", "path": "/lake/models/classifier/v1", "metrics": json.dumps(metrics), "params": None}


def test_no_current_classifier_is_refused_naming_the_patient(monkeypatch):
    _registry(monkeypatch, None)
    with pytest.raises(
        UnusableClassifierError, match=r"^patient p1: deep_embedding needs a usable hcc_classifier"
    ) as e:
        embedding.usable_classifier(None, "p1", allow_model_below_chance=False)
    assert e.value.metadata == {"patient_id": "p1"}


def test_a_classifier_below_chance_needs_allow_model_below_chance(monkeypatch):
    _registry(monkeypatch, _row(beats_chance_on_training=False))
    with pytest.raises(UnusableClassifierError, match="v1 failed its beats_chance_on_training check") as e:
        embedding.usable_classifier(None, "p1", allow_model_below_chance=False)
    assert e.value.metadata == {"patient_id": "p1", "model_version": "v1"}
    allowed = embedding.usable_classifier(None, "p1", allow_model_below_chance=True)
    assert (allowed.version, allowed.input_shape) == ("v1", None)


def test_a_usable_classifier_brings_its_grid(monkeypatch):
    _registry(monkeypatch, {**_row(beats_chance_on_training=True), "params": json.dumps({"input_shape": [4, 4, 2]})})
    model = embedding.usable_classifier(None, "p1", allow_model_below_chance=False)
    assert model == embedding.UsableClassifier("v1", "/lake/models/classifier/v1", [4, 4, 2])


def test_embedding_values_and_row():
    vector = np.zeros(128, dtype=np.float32)
    vector[:3] = [1.0, 2.0, 2.0]
    result = PatientEmbedding("p1", "v1", "cpu", vector, "ab" * 32)
    assert (result.nonzero, result.l2_norm, result.finite) == (3, 3.0, True)
    assert result.first_values == [1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert len(result.data_version) == 16
    assert result.data_version != PatientEmbedding("p1", "v1", "cpu", vector * 2, "").data_version
    rows = result.rows()
    assert rows["patient_id"].to_list() == ["p1"] and rows["model_version"].to_list() == ["v1"]
    assert rows["embedding"].to_numpy()[0].tolist() == vector.tolist()
    vector[5] = np.nan
    assert not PatientEmbedding("p1", "v1", "cpu", vector, "").finite
