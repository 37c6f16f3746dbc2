"""Calibration bins and Brier score against scikit-learn, and by hand."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from hcc_assets.stats.calibration import brier_score, calibration_bins


def test_bins_by_hand():
    y = [0, 0, 1, 1, 1, 0]
    p = [0.05, 0.1, 0.15, 0.55, 0.95, 1.0]
    # 5 bins of width 0.2: [0, 0.2] holds 0.05, 0.1, 0.15 (1 HCC of 3); (0.4, 0.6] holds 0.55 (1 of 1);
    # (0.8, 1.0] holds 0.95 and 1.0 (1 of 2)
    bins = calibration_bins(y, p, n_bins=5)
    assert [b.bin for b in bins] == [0, 2, 4]
    assert [b.n for b in bins] == [3, 1, 2]
    assert [b.observed_rate for b in bins] == pytest.approx([1 / 3, 1.0, 1 / 2])
    assert [b.mean_predicted for b in bins] == pytest.approx([0.1, 0.55, 0.975])
    assert [edge for b in bins for edge in (b.low, b.high)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # a probability on an inner edge belongs to the lower bin
    assert [b.bin for b in calibration_bins([0, 1], [0.2, 0.2000001], n_bins=5)] == [0, 1]
    # Brier: mean of (p - y)^2
    expected = np.mean((np.array(p) - np.array(y)) ** 2)
    assert brier_score(y, p) == pytest.approx(expected)


def test_bins_agree_with_sklearn_calibration_curve():
    rng = np.random.default_rng(7)
    for n_bins in (3, 5, 10):
        y = rng.integers(0, 2, 80)
        p = np.round(np.clip(0.3 * y + rng.random(80) * 0.7, 0, 1), 2)  # rounding puts some on bin edges
        bins = calibration_bins(y, p, n_bins=n_bins)
        observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
        assert [b.observed_rate for b in bins] == pytest.approx(observed.tolist())
        assert [b.mean_predicted for b in bins] == pytest.approx(predicted.tolist())
        assert sum(b.n for b in bins) == 80
        assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p))


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        calibration_bins([0, 1], [0.2, 1.2])
    with pytest.raises(ValueError):
        calibration_bins([0, 1], [0.2, 0.4], n_bins=0)
    with pytest.raises(ValueError):
        brier_score([0, 1], [0.2])
