"""fxscore.metrics against scikit-learn, and the bootstrap's determinism and coverage."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from fxscore import metrics as M


def _case(name: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(CASES.index(name))
    if name == "hand":
        return (np.array([1, 1, 1, 1, 1, 0, 0, 0]),
                np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.85, 0.5, 0.1]))
    if name == "ties":  # coarse scores: many ties, including across classes and at 0.5
        t = rng.integers(0, 2, 300)
        return t, np.round(np.clip(0.3 * t + 0.7 * rng.random(300), 0, 1), 1)
    if name == "imbalanced":  # 5% positives, as in screening data
        t = (rng.random(2000) < 0.05).astype(int)
        return t, np.clip(rng.normal(0.3 + 0.3 * t, 0.15), 0, 1)
    if name == "inverted":  # worse than chance
        t = rng.integers(0, 2, 100)
        return t, np.clip(0.8 - 0.5 * t + 0.2 * rng.random(100), 0, 1)
    if name == "perfect":
        t = np.r_[np.zeros(40, int), np.ones(60, int)]
        return t, np.r_[rng.uniform(0, 0.4, 40), rng.uniform(0.6, 1, 60)]
    raise KeyError(name)


CASES = ["hand", "ties", "imbalanced", "inverted", "perfect"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_threshold_metrics_equal_sklearn(name, threshold):
    t, s = _case(name)
    p = (s >= threshold).astype(int)
    got = M.threshold_metrics(t, s, threshold)
    tn, fp, fn, tp = skm.confusion_matrix(t, p, labels=[0, 1]).ravel()
    assert (got["tn"], got["fp"], got["fn"], got["tp"]) == (tn, fp, fn, tp)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(t, p))
    assert got["sensitivity"] == pytest.approx(skm.recall_score(t, p))
    assert got["specificity"] == pytest.approx(skm.recall_score(t, p, pos_label=0))
    assert got["npv"] == pytest.approx(skm.precision_score(t, p, pos_label=0, zero_division=np.nan),
                                       nan_ok=True)
    assert got["precision"] == pytest.approx(skm.precision_score(t, p, zero_division=np.nan),
                                             nan_ok=True)
    assert got["f1"] == pytest.approx(skm.f1_score(t, p))


@pytest.mark.parametrize("name", CASES)
def test_ranking_and_calibration_equal_sklearn(name):
    t, s = _case(name)
    assert M.roc_auc(t, s) == pytest.approx(skm.roc_auc_score(t, s), abs=1e-12)
    assert M.average_precision(t, s) == pytest.approx(skm.average_precision_score(t, s), abs=1e-12)
    assert M.brier(t, s) == pytest.approx(skm.brier_score_loss(t, s))
    curve = M.reliability_curve(t, s, bins=10)
    assert len(curve) == 10 and sum(r["count"] for r in curve) == len(t)
    filled = [r for r in curve if r["count"]]
    frac, pred = calibration_curve(t, s, n_bins=10)
    np.testing.assert_allclose([r["fraction_positive"] for r in filled], frac)
    np.testing.assert_allclose([r["mean_predicted"] for r in filled], pred)


def test_one_class_gives_nan_not_an_error():
    assert np.isnan(M.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert np.isnan(M.average_precision([0, 0], [0.2, 0.5]))
    assert np.isnan(M.threshold_metrics([1, 1], [0.2, 0.9], 0.5)["specificity"])


@pytest.mark.parametrize("target, expected", [(1.0, 0.2), (0.95, 0.2), (0.8, 0.6),
                                              (0.6, 0.7), (0.5, 0.7), (0.2, 0.9)])
def test_threshold_for_sensitivity_hand_made(target, expected):
    # positives score 0.9 0.8 0.7 0.6 0.2; 0.8 needs 4 of 5 positives -> 0.6 is the highest cut
    t, s = _case("hand")
    thr = M.threshold_for_sensitivity(t, s, target)
    assert thr == expected
    assert M.threshold_metrics(t, s, thr)["sensitivity"] >= target
    assert M.threshold_metrics(t, s, np.nextafter(thr, 1))["sensitivity"] < target


@pytest.mark.parametrize("name", ["ties", "imbalanced", "inverted"])
@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_threshold_for_sensitivity_is_the_highest(name, target):
    t, s = _case(name)
    thr = M.threshold_for_sensitivity(t, s, target)
    assert M.threshold_metrics(t, s, thr)["sensitivity"] >= target
    higher = s[s > thr]
    if higher.size:  # the next distinct score up already misses the target
        assert M.threshold_metrics(t, s, higher.min())["sensitivity"] < target


@pytest.mark.parametrize("target", [0.0, 1.5])
def test_threshold_for_sensitivity_rejects_bad_targets(target):
    with pytest.raises(ValueError, match="target sensitivity"):
        M.threshold_for_sensitivity([0, 1], [0.1, 0.9], target)


@pytest.mark.parametrize("name", ["hand", "ties", "imbalanced", "inverted"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_threshold_for_specificity_is_the_lowest(name, target):
    t, s = _case(name)
    thr = M.threshold_for_specificity(t, s, target)
    assert M.threshold_metrics(t, s, thr)["specificity"] >= target
    lower = s[s < thr]
    if lower.size:  # the next distinct score down already misses the target
        assert M.threshold_metrics(t, s, lower.max())["specificity"] < target


def test_threshold_for_specificity_above_every_score_and_without_negatives():
    assert M.threshold_for_specificity([1, 0], [0.2, 0.9], 1.0) > 0.9
    with pytest.raises(ValueError, match="no negative"):
        M.threshold_for_specificity([1, 1], [0.2, 0.9], 0.9)
    with pytest.raises(ValueError, match="target specificity"):
        M.threshold_for_specificity([0, 1], [0.1, 0.9], 0.0)


@pytest.mark.parametrize("scores, threshold, expected", [
    ([0.1, 0.2, 0.3712345, 0.5, 0.9], 0.3712345, 0.3),  # (0.2, 0.3712345]: 0.3 calls the same
    ([0.1, 0.2, 0.3712345, 0.5, 0.9], 0.5, 0.4),
    ([0.36, 0.3712345], 0.3712345, 0.37),
    ([0.37, 0.370001], 0.370001, 0.370001),  # nothing shorter lies between
    ([0.1, 0.9], 0.05, 0.1),
    ([0.1, 0.9], 0.95, 1.0),
])
def test_shortest_threshold_makes_the_same_calls(scores, threshold, expected):
    got = M.shortest_threshold(scores, threshold)
    assert got == expected
    s = np.array(scores)
    assert np.array_equal(s >= got, s >= threshold)


def test_weighted_rank_metrics_equal_sklearn_on_materialised_resamples():
    # the vectorised bootstrap evaluates weights; drawing the same rows explicitly must agree
    t, s = _case("ties")
    rng = np.random.default_rng(3)
    w = M._resample_weights(rng, 25, np.arange(t.size), t.size)
    order, starts = M._tie_blocks(s)
    auc, ap = M._rank_metrics(w, t.astype(bool), order, starts)
    for i in range(25):
        idx = np.repeat(np.arange(t.size), w[i])
        assert len(idx) == t.size
        assert auc[i] == pytest.approx(skm.roc_auc_score(t[idx], s[idx]), abs=1e-12)
        assert ap[i] == pytest.approx(skm.average_precision_score(t[idx], s[idx]), abs=1e-12)


def test_bootstrap_is_seeded_and_contains_the_estimate():
    t, s = _case("imbalanced")
    thresholds = {"model": 0.5, "target": M.threshold_for_sensitivity(t, s, 0.9)}
    a = M.bootstrap(t, s, thresholds, n_resamples=400, seed=7)
    assert a == M.bootstrap(t, s, thresholds, n_resamples=400, seed=7)
    assert a != M.bootstrap(t, s, thresholds, n_resamples=400, seed=8)
    # resamples drawn in memory-bounded chunks estimate the same intervals
    chunked = M.bootstrap(t, s, thresholds, n_resamples=400, seed=7, chunk_elements=10**5)
    for k in ("low", "high"):
        assert chunked["roc_auc"][k] == pytest.approx(a["roc_auc"][k], abs=0.02)
    auc = M.roc_auc(t, s)
    assert a["roc_auc"]["low"] < auc < a["roc_auc"]["high"] and a["roc_auc"]["valid"] == 400
    assert a["roc_auc"]["high"] - a["roc_auc"]["low"] < 0.2
    for name, thr in thresholds.items():
        point = M.threshold_metrics(t, s, thr)
        for m in M.CI_METRICS:
            ci = a["operating_points"][name][m]
            assert ci["low"] <= point[m] <= ci["high"], (name, m, ci, point[m])


def test_bootstrap_counts_resamples_without_one_class():
    t = np.array([1, 0, 0, 0, 0, 0, 0, 0])  # one positive: ~34% of resamples miss it
    s = np.linspace(0.9, 0.1, 8)
    b = M.bootstrap(t, s, {"model": 0.5}, n_resamples=1000, seed=0)
    valid = b["roc_auc"]["valid"]
    assert 550 < valid < 780  # expected 1000 * (1 - (7/8)**8) = 656
    assert b["operating_points"]["model"]["sensitivity"]["valid"] == valid
    assert b["operating_points"]["model"]["accuracy"]["valid"] == 1000
    assert b["roc_auc"]["low"] == b["roc_auc"]["high"] == 1.0


def test_group_bootstrap_with_singleton_groups_is_the_plain_bootstrap():
    t, s = _case("ties")
    plain = M.bootstrap(t, s, {"model": 0.5}, n_resamples=200, seed=1)
    single = M.bootstrap(t, s, {"model": 0.5}, n_resamples=200, seed=1, groups=np.arange(t.size))
    assert single["roc_auc"] == plain["roc_auc"]
    assert single["operating_points"] == plain["operating_points"]
    assert single["grouped"] and not plain["grouped"]


def test_group_bootstrap_is_wider_when_groups_are_large():
    # 20 patients x 30 near-identical images: the information is in 20 patients, not 600 images
    rng = np.random.default_rng(0)
    patient_label = rng.integers(0, 2, 20)
    patient_score = np.clip(0.5 + 0.25 * (2 * patient_label - 1) + rng.normal(0, 0.25, 20), 0, 1)
    groups = np.repeat(np.arange(20), 30)
    t = patient_label[groups]
    s = np.clip(patient_score[groups] + rng.normal(0, 0.01, 600), 0, 1)
    plain = M.bootstrap(t, s, {"model": 0.5}, n_resamples=500, seed=0)
    grouped = M.bootstrap(t, s, {"model": 0.5}, n_resamples=500, seed=0, groups=groups)
    assert grouped["clusters"] == 20 and plain["clusters"] == 600

    def width(ci):
        return ci["high"] - ci["low"]

    assert width(grouped["roc_auc"]) > 2 * width(plain["roc_auc"])
    acc_g, acc_p = (b["operating_points"]["model"]["accuracy"] for b in (grouped, plain))
    assert width(acc_g) > 2 * width(acc_p)


def test_paired_auc_difference_is_the_difference_on_each_same_resample():
    t, a = _case("ties")
    b = np.clip(a + np.random.default_rng(5).normal(0, 0.1, a.size), 0, 1)
    got = M.paired_auc_difference(t, a, b, n_resamples=300, seed=4)
    w = M._resample_weights(np.random.default_rng(4), 300, np.arange(t.size), t.size)
    diffs = []
    for row in w:
        idx = np.repeat(np.arange(t.size), row)
        if 0 < t[idx].sum() < idx.size:
            diffs.append(skm.roc_auc_score(t[idx], b[idx]) - skm.roc_auc_score(t[idx], a[idx]))
    assert got["valid"] == len(diffs)
    assert got["low"] == pytest.approx(np.percentile(diffs, 2.5), abs=1e-12)
    assert got["high"] == pytest.approx(np.percentile(diffs, 97.5), abs=1e-12)
    assert got["difference"] == pytest.approx(
        skm.roc_auc_score(t, b) - skm.roc_auc_score(t, a), abs=1e-12)


def test_paired_auc_difference_is_narrower_than_either_score_alone():
    # two scores sharing most of their noise: pairing cancels what the images have in common
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 300)
    a = np.clip(0.5 + 0.15 * (2 * t - 1) + rng.normal(0, 0.25, 300), 0, 1)
    b = np.clip(a + 0.03 * (2 * t - 1) + rng.normal(0, 0.02, 300), 0, 1)  # slightly better
    d = M.paired_auc_difference(t, a, b, n_resamples=500, seed=0)
    alone = M.bootstrap(t, a, {}, n_resamples=500, seed=0)["roc_auc"]
    assert d["low"] > 0 and d["high"] - d["low"] < (alone["high"] - alone["low"]) / 3
    same = M.paired_auc_difference(t, a, a, n_resamples=100, seed=0)
    assert same["difference"] == same["low"] == same["high"] == 0.0
    groups = np.arange(300) // 3
    grouped = M.paired_auc_difference(t, a, b, n_resamples=100, seed=0, groups=groups)
    assert grouped["grouped"] and grouped["clusters"] == 100
    with pytest.raises(ValueError, match="300 values but y_score has 299"):
        M.paired_auc_difference(t, a, b[:-1])


@pytest.mark.parametrize("kwargs, match", [
    ({"groups": [1, 2]}, "group labels"),
])
def test_bootstrap_rejects_bad_groups(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.bootstrap([0, 1, 1], [0.1, 0.5, 0.9], {"model": 0.5}, **kwargs)


@pytest.mark.parametrize("y_true, y_score, match", [
    ([0, 1], [0.5], "has 2 values"),
    ([0, 1], [0.5, np.nan], "NaN"),
])
def test_bad_inputs_are_named(y_true, y_score, match):
    with pytest.raises(ValueError, match=match):
        M.roc_auc(y_true, y_score)
