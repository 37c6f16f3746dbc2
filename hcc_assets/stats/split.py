"""Seeded, stratified train/validation split (the study's random 80:20)."""

from __future__ import annotations

import numpy as np


def stratified_split(
    patient_ids: list[str], labels: list[bool], validation_fraction: float = 0.2, seed: int = 0
) -> dict[str, str]:
    """Map each patient to "train" or "validation", stratified by label.

    Patients are sorted first, so the result depends only on the set of patients and the seed,
    not on the order they arrived in.
    """
    # imported here: scikit-learn (with SciPy's stats) takes a second to import, and every process
    # that loads the Dagster definitions imports this module, most without ever splitting a cohort
    from sklearn.model_selection import train_test_split

    if len(patient_ids) != len(labels):
        raise ValueError("patient_ids and labels differ in length")
    order = np.argsort(patient_ids)
    ids = [patient_ids[i] for i in order]
    y = np.asarray([bool(labels[i]) for i in order])
    n_validation = max(1, round(validation_fraction * len(ids))) if len(ids) > 1 else 0
    if n_validation == 0:
        return dict.fromkeys(ids, "train")
    class_counts = np.bincount(y.astype(int), minlength=2)
    # stratify only where it is possible: each class twice, and room for both in each part
    stratifiable = class_counts.min() >= 2 and 2 <= n_validation <= len(ids) - 2
    stratify = y if stratifiable else None
    train, validation = train_test_split(ids, test_size=n_validation, random_state=seed, stratify=stratify)
    return {**dict.fromkeys(train, "train"), **dict.fromkeys(validation, "validation")}
