import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from hcc_assets.stats.metrics import (
    METRICS,
    bootstrap_metrics,
    classification_metrics,
    confusion_matrix,
    repeated_cv_metrics,
)


def by_metric(estimates):
    return {estimate.metric: estimate for estimate in estimates}


def test_metrics_match_hand_arithmetic():
    y = [1, 1, 0, 0, 1]
    p = [0.9, 0.4, 0.2, 0.6, 0.8]
    # predicted HCC (p > 0.5): [1, 0, 0, 1, 1]
    # TP = 2 (0.9, 0.8), FP = 1 (0.6), FN = 1 (0.4), TN = 1 (0.2)
    # accuracy = (2 + 1) / 5; precision = 2 / (2 + 1); recall = 2 / (2 + 1); F1 = 2*2 / (2*2 + 1 + 1)
    # AUC: positives {0.9, 0.4, 0.8} vs negatives {0.2, 0.6}: 0.9 beats both (2), 0.4 beats 0.2 (1),
    # 0.8 beats both (2) -> 5 of 6 pairs
    metrics = classification_metrics(y, p)
    assert list(metrics) == list(METRICS)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(4 / 6)
    assert metrics["roc_auc"] == pytest.approx(5 / 6)
    # specificity = TN / (TN + FP) = 1 / 2; NPV = TN / (TN + FN) = 1 / 2
    assert metrics["specificity"] == pytest.approx(1 / 2)
    assert metrics["npv"] == pytest.approx(1 / 2)
    counts = confusion_matrix(y, p)
    assert (counts.tp, counts.fp, counts.tn, counts.fn, counts.n, counts.threshold) == (2, 1, 1, 1, 5, 0.5)


def test_specificity_and_npv_by_hand():
    y = [0, 0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.9]
    # predicted (p > 0.5): [0, 0, 0, 1, 0, 1, 1]: TN = 3, FP = 1, FN = 1 (0.4), TP = 2
    metrics = classification_metrics(y, p)
    assert metrics["specificity"] == pytest.approx(3 / 4)
    assert metrics["npv"] == pytest.approx(3 / 4)
    counts = confusion_matrix(y, p)
    assert (counts.tp, counts.fp, counts.tn, counts.fn) == (2, 1, 3, 1)
    # at 0.35 the 0.4 patient turns positive: TN = 3, FP = 1, FN = 0 -> NPV = 3 / 3
    low = classification_metrics(y, p, threshold=0.35)
    assert low["specificity"] == pytest.approx(3 / 4) and low["npv"] == 1.0
    assert confusion_matrix(y, p, threshold=0.35).fn == 0
    # zero_division=0: no actual negatives -> specificity 0; no predicted negatives -> NPV 0
    assert classification_metrics([1, 1], [0.2, 0.9])["specificity"] == 0.0
    assert classification_metrics([1, 0], [0.7, 0.9])["npv"] == 0.0


def test_ties_and_threshold_boundary():
    y = [1, 0, 1, 0]
    p = [0.5, 0.5, 0.7, 0.1]
    # 0.5 is not above 0.5, so predicted = [0, 0, 1, 0]: TP = 1, FP = 0, FN = 1, TN = 2
    # AUC pairs: (0.5 vs 0.5) tie = 1/2, (0.5 vs 0.1) 1, (0.7 vs 0.5) 1, (0.7 vs 0.1) 1 -> 3.5 / 4
    metrics = classification_metrics(y, p)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["precision"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(1 / 2)
    assert metrics["f1"] == pytest.approx(2 / 3)  # 2*1 / (2*1 + 0 + 1)
    assert metrics["roc_auc"] == pytest.approx(0.875)
    # a lower threshold changes the threshold metrics only
    low = classification_metrics(y, p, threshold=0.3)  # predicted = [1, 1, 1, 0]
    assert low["precision"] == pytest.approx(2 / 3) and low["recall"] == 1.0
    assert low["roc_auc"] == metrics["roc_auc"]


def test_zero_division_and_single_class():
    # no predicted positives: precision, recall and F1 are 0 by policy (zero_division=0)
    metrics = classification_metrics([1, 0, 1], [0.1, 0.2, 0.3])
    assert metrics["precision"] == 0.0 and metrics["recall"] == 0.0 and metrics["f1"] == 0.0
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["roc_auc"] == pytest.approx(1 / 2)  # 0.1 < 0.2 (0), 0.3 > 0.2 (1)
    single = classification_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert math.isnan(single["roc_auc"])
    assert single["accuracy"] == pytest.approx(2 / 3) and single["precision"] == 1.0


def test_metrics_agree_with_sklearn_on_random_inputs():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 15)
        if y.min() == y.max():
            continue
        p = np.round(rng.random(15), 1)  # rounding makes ties
        predicted = (p > 0.5).astype(int)
        metrics = classification_metrics(y, p)
        assert metrics["accuracy"] == pytest.approx(accuracy_score(y, predicted))
        assert metrics["precision"] == pytest.approx(precision_score(y, predicted, zero_division=0))
        assert metrics["recall"] == pytest.approx(recall_score(y, predicted, zero_division=0))
        assert metrics["f1"] == pytest.approx(f1_score(y, predicted, zero_division=0))
        assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y, p))
        # specificity is the negatives' recall, NPV the negatives' precision
        assert metrics["specificity"] == pytest.approx(recall_score(y, predicted, pos_label=0, zero_division=0))
        assert metrics["npv"] == pytest.approx(precision_score(y, predicted, pos_label=0, zero_division=0))
        tn, fp, fn, tp = sk_confusion_matrix(y, predicted, labels=[0, 1]).ravel()
        counts = confusion_matrix(y, p)
        assert (counts.tp, counts.fp, counts.tn, counts.fn) == (tp, fp, tn, fn)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        classification_metrics([1, 0], [0.5])
    with pytest.raises(ValueError):
        classification_metrics([1, 2], [0.5, 0.5])
    with pytest.raises(ValueError):
        classification_metrics([1, 0], [np.nan, 0.5])


def test_bootstrap_follows_the_documented_draws():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 20)
    p = rng.random(20)
    estimates = by_metric(bootstrap_metrics(y, p, n_resamples=200, seed=9))
    draws = np.random.default_rng(9).integers(0, 20, size=(200, 20))
    accuracy = [accuracy_score(y[i], (p[i] > 0.5).astype(int)) for i in draws]
    auc = [roc_auc_score(y[i], p[i]) for i in draws if y[i].min() != y[i].max()]
    assert estimates["accuracy"].mean == pytest.approx(np.mean(accuracy))
    assert estimates["accuracy"].ci_low == pytest.approx(np.percentile(accuracy, 2.5))
    assert estimates["accuracy"].ci_high == pytest.approx(np.percentile(accuracy, 97.5))
    assert estimates["roc_auc"].mean == pytest.approx(np.mean(auc))
    assert estimates["accuracy"].estimate == pytest.approx(accuracy_score(y, (p > 0.5).astype(int)))
    assert estimates["accuracy"].n == 20
    specificity = [recall_score(y[i], (p[i] > 0.5).astype(int), pos_label=0, zero_division=0) for i in draws]
    npv = [precision_score(y[i], (p[i] > 0.5).astype(int), pos_label=0, zero_division=0) for i in draws]
    assert estimates["specificity"].mean == pytest.approx(np.mean(specificity))
    assert estimates["specificity"].ci_low == pytest.approx(np.percentile(specificity, 2.5))
    assert estimates["npv"].mean == pytest.approx(np.mean(npv))
    assert estimates["npv"].ci_high == pytest.approx(np.percentile(npv, 97.5))
    assert estimates["npv"].n_resamples_used == 200


def test_bootstrap_is_reproducible_per_seed():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 30)
    p = rng.random(30)
    first = bootstrap_metrics(y, p, seed=4)
    assert first == bootstrap_metrics(y, p, seed=4)
    other = bootstrap_metrics(y, p, seed=5)
    assert [e.mean for e in first] != [e.mean for e in other]
    assert [e.estimate for e in first] == [e.estimate for e in other]  # the point estimate has no randomness


def test_bootstrap_counts_degenerate_resamples_without_crashing():
    # 3 patients, one HCC: a resample holds one class with probability (1/3)^3 + (2/3)^3 = 1/3
    estimates = by_metric(bootstrap_metrics([1, 0, 0], [0.8, 0.3, 0.6], n_resamples=1000, seed=0))
    degenerate = estimates["roc_auc"].n_degenerate
    assert 250 < degenerate < 420
    assert estimates["roc_auc"].n_resamples_used == 1000 - degenerate
    assert estimates["accuracy"].n_resamples_used == 1000
    assert estimates["accuracy"].n_degenerate == degenerate
    assert all(np.isfinite([e.mean, e.ci_low, e.ci_high]).all() for e in estimates.values())
    # 0.8 always outranks 0.3 and 0.6, so every usable resample has AUC 1
    assert estimates["roc_auc"].ci_low == 1.0 == estimates["roc_auc"].estimate


def test_bootstrap_all_degenerate_gives_nan_auc():
    estimates = by_metric(bootstrap_metrics([1, 1], [0.7, 0.4], n_resamples=50, seed=0))
    auc = estimates["roc_auc"]
    assert auc.n_resamples_used == 0 and auc.n_degenerate == 50
    assert math.isnan(auc.estimate) and math.isnan(auc.mean) and math.isnan(auc.ci_low)
    assert estimates["recall"].n_resamples_used == 50 and np.isfinite(estimates["recall"].mean)


def test_repeated_cv_keeps_folds_apart_and_summarises_fold_values():
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(12), np.zeros(18)].astype(int)
    # column 0 carries the label, column 1 a patient id to check the folds
    X = np.c_[y + 0.1 * rng.random(30), np.arange(30)]
    seen_tests = []

    def fit_predict(X_train, y_train, X_test):
        assert not set(X_train[:, 1]) & set(X_test[:, 1])
        seen_tests.append(X_test[:, 1].copy())
        return np.clip(X_test[:, 0], 0, 1)

    lines: list[str] = []
    estimates = by_metric(
        repeated_cv_metrics(fit_predict, X, y, n_splits=5, n_repeats=3, seed=0, progress=lines.append)
    )
    assert len(seen_tests) == 15
    assert [line.split(" in ")[0] for line in lines] == [f"repeat {r}/3 ({5 * r}/15 folds)" for r in (1, 2, 3)]
    for repeat in range(3):  # every patient is tested once per repeat
        assert sorted(np.concatenate(seen_tests[5 * repeat : 5 * repeat + 5])) == list(range(30))
    accuracy = estimates["accuracy"]
    assert accuracy.estimate == 1.0 and accuracy.ci_low == 1.0 and accuracy.ci_high == 1.0
    assert accuracy.n == 30 and accuracy.n_resamples_used == 15 and accuracy.n_degenerate == 0


def test_repeated_cv_lowers_n_splits_for_a_small_minority():
    y = np.r_[np.ones(3), np.zeros(10)].astype(int)
    X = np.c_[y.astype(float)]
    calls = []

    def fit_predict(X_train, y_train, X_test):
        calls.append(len(X_test))
        return np.full(len(X_test), 0.2)

    estimates = by_metric(repeated_cv_metrics(fit_predict, X, y, n_splits=5, n_repeats=2, seed=1))
    assert len(calls) == 6  # 3 splits x 2 repeats
    assert estimates["precision"].estimate == 0.0  # nothing predicted HCC
    with pytest.raises(ValueError, match="minority"):
        repeated_cv_metrics(fit_predict, X[:11], np.r_[1, np.zeros(10)].astype(int))
