import time

import numpy as np
import polars as pl
import pytest
from scipy.stats import spearmanr

from hcc_assets.stats.association import association_long_table, association_matrix, select_explainable


def direct_distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Székely's definition written out with loops, for one pair of samples."""
    n = len(x)
    a = [[abs(x[i] - x[j]) for j in range(n)] for i in range(n)]
    b = [[abs(y[i] - y[j]) for j in range(n)] for i in range(n)]

    def centred(d):
        row = [sum(d[i]) / n for i in range(n)]
        column = [sum(d[i][j] for i in range(n)) / n for j in range(n)]
        grand = sum(row) / n
        return [[d[i][j] - row[i] - column[j] + grand for j in range(n)] for i in range(n)]

    A, B = centred(a), centred(b)

    def mean_product(P, Q):
        return sum(P[i][j] * Q[i][j] for i in range(n) for j in range(n)) / n**2

    return float(np.sqrt(mean_product(A, B) / np.sqrt(mean_product(A, A) * mean_product(B, B))))


def test_pearson_matches_corrcoef():
    rng = np.random.default_rng(0)
    dl, hc = rng.standard_normal((25, 6)), rng.standard_normal((25, 4))
    hc[:, 0] = dl[:, 2] * 2 + 0.1 * rng.standard_normal(25)
    expected = np.corrcoef(dl.T, hc.T)[:6, 6:]
    assert association_matrix(dl, hc, "pearson") == pytest.approx(expected)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    dl = np.round(rng.standard_normal((20, 5)), 0)  # heavy ties
    hc = np.round(rng.standard_normal((20, 3)) + dl[:, :3], 1)
    expected = spearmanr(dl, hc).statistic[:5, 5:]
    assert association_matrix(dl, hc, "spearman") == pytest.approx(expected)


def test_distance_correlation_matches_direct_definition():
    rng = np.random.default_rng(2)
    dl, hc = rng.standard_normal((12, 3)), rng.standard_normal((12, 2))
    hc[:, 1] = dl[:, 0] ** 2
    matrix = association_matrix(dl, hc, "distance")
    for i in range(3):
        for j in range(2):
            assert matrix[i, j] == pytest.approx(direct_distance_correlation(dl[:, i], hc[:, j]))
    assert ((matrix >= 0) & (matrix <= 1)).all()


def test_distance_correlation_independent_and_linear():
    rng = np.random.default_rng(3)
    x, independent = rng.standard_normal((1000, 1)), rng.standard_normal((1000, 1))
    assert association_matrix(x, independent, "distance")[0, 0] < 0.1
    assert association_matrix(x, -3 * x + 2, "distance")[0, 0] == pytest.approx(1.0)
    # a non-monotone dependence Pearson misses
    assert abs(association_matrix(x, x**2, "pearson")[0, 0]) < 0.2
    assert association_matrix(x, x**2, "distance")[0, 0] > 0.4


@pytest.mark.parametrize("measure", ["pearson", "spearman", "distance"])
def test_zero_variance_gives_zero_not_nan(measure):
    rng = np.random.default_rng(4)
    dl = np.c_[np.ones(10), rng.standard_normal(10)]
    hc = np.c_[rng.standard_normal(10), np.full(10, 2.0)]
    matrix = association_matrix(dl, hc, measure)
    assert np.isfinite(matrix).all()
    assert matrix[0, :].tolist() == [0.0, 0.0] and matrix[:, 1].tolist() == [0.0, 0.0]


def test_study_sized_matrix_is_fast():
    rng = np.random.default_rng(5)
    dl, hc = rng.standard_normal((32, 128)), rng.standard_normal((32, 100))
    for measure in ("pearson", "spearman", "distance"):
        start = time.perf_counter()
        matrix = association_matrix(dl, hc, measure)
        assert time.perf_counter() - start < 2.0
        assert matrix.shape == (128, 100)


def test_select_explainable_and_long_table():
    rng = np.random.default_rng(6)
    hc = rng.standard_normal((40, 3))
    dl = rng.standard_normal((40, 4)) * 0.05
    dl[:, 1] += hc[:, 0] + 0.5 * hc[:, 2]  # related to hc0 (strongly) and hc2
    dl[:, 3] -= hc[:, 1]  # negatively related to hc1
    hc_names = ["shape_volume", "firstorder_mean", "glcm_contrast"]
    selection = select_explainable(dl, hc, hc_names, threshold=0.4)
    assert selection.kept == [1, 3]
    assert [name for name, _ in selection.related[1]] == ["shape_volume", "glcm_contrast"]
    assert selection.related[3][0][0] == "firstorder_mean" and selection.related[3][0][1] < -0.9
    assert selection.matrix.shape == (4, 3)

    table = association_long_table(selection, ["d0", "d1", "d2", "d3"], hc_names)
    assert table.columns == ["dl_feature", "handcrafted_feature", "measure", "value", "kept", "related"]
    assert table.height == 12
    row = table.filter((pl.col("dl_feature") == "d3") & (pl.col("handcrafted_feature") == "firstorder_mean"))
    assert row["value"][0] == pytest.approx(selection.matrix[3, 1])
    assert row["kept"][0] and row["related"][0]
    assert table.filter(pl.col("related")).height == 3
    assert set(table.filter(pl.col("kept"))["dl_feature"]) == {"d1", "d3"}
    with pytest.raises(ValueError):
        association_long_table(selection, ["d0"], hc_names)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown measure"):
        association_matrix(np.zeros((5, 2)), np.zeros((5, 2)), "kendall")
    with pytest.raises(ValueError, match="patients"):
        association_matrix(np.zeros((5, 2)), np.zeros((6, 2)))
