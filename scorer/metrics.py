"""Binary classification metrics, operating points, calibration and bootstrap intervals.

Pure functions on numpy arrays: `y_true` holds 1 for the positive class and 0 for the other,
`y_score` the model's probability of the positive class. An image is called positive when its
probability is >= the threshold (the same rule as the scorer's label column).

The bootstrap is vectorised: every resample is a row of integer weights (how often each
prediction was drawn), so one matrix product gives every resample's confusion matrix and one
cumulative sum over the score-sorted predictions gives every resample's ROC-AUC and average
precision. 1000 resamples of a few thousand predictions take well under a second.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

CI_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv")
RANK_METRICS = ("roc_auc", "average_precision")


def _arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if t.shape != s.shape:
        raise ValueError(f"y_true has {t.size} values but y_score has {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("y_score contains NaN or infinite values")
    return t, s


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def confusion(y_true, y_pred) -> dict[str, int]:
    """Counts of true/false positives/negatives."""
    t = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(y_pred).astype(bool).ravel()
    return {"tp": int(np.sum(t & p)), "fp": int(np.sum(~t & p)),
            "tn": int(np.sum(~t & ~p)), "fn": int(np.sum(t & ~p))}


def threshold_metrics(y_true, y_score, threshold: float) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, precision (PPV), NPV and F1 at one threshold."""
    t, s = _arrays(y_true, y_score)
    c = confusion(t, s >= threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    sens, prec = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {"threshold": float(threshold), **c,
            "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
            "sensitivity": sens, "specificity": _ratio(tn, tn + fp),
            "precision": prec, "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def _tie_blocks(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order that sorts scores ascending, and the start index of each block of equal scores."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    return order, starts


def _rank_metrics(w: np.ndarray, t: np.ndarray, order: np.ndarray,
                  starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC and average precision for each row of weights w (R, N); NaN where undefined.

    AUC is the Mann-Whitney statistic (ties count one half), AP is scikit-learn's step-wise
    sum of precision times recall increase over distinct thresholds; both equal scikit-learn's
    values when all weights are one.
    """
    ws = w[:, order].astype(np.float64)
    ts = t[order]
    pos = np.add.reduceat(ws * ts, starts, axis=1)  # (R, K) positive weight per distinct score
    neg = np.add.reduceat(ws * ~ts, starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        # descending thresholds: everything at or above each distinct score is called positive
        tp_at = np.cumsum(pos[:, ::-1], axis=1)
        fp_at = np.cumsum(neg[:, ::-1], axis=1)
        precision = np.where(tp_at > 0, tp_at / (tp_at + fp_at), 0.0)
        ap = (pos[:, ::-1] * precision).sum(axis=1) / n_pos
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    ap[n_pos == 0] = np.nan
    return auc, ap


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (NaN when only one class is present)."""
    t, s = _arrays(y_true, y_score)
    order, starts = _tie_blocks(s)
    return float(_rank_metrics(np.ones((1, t.size)), t, order, starts)[0][0])


def average_precision(y_true, y_score) -> float:
    """Average precision, as scikit-learn defines it (NaN without positives)."""
    t, s = _arrays(y_true, y_score)
    order, starts = _tie_blocks(s)
    return float(_rank_metrics(np.ones((1, t.size)), t, order, starts)[1][0])


def brier(y_true, y_score) -> float:
    """Mean squared difference between probability and outcome (0 is perfect)."""
    t, s = _arrays(y_true, y_score)
    return float(np.mean((s - t) ** 2))


def reliability_curve(y_true, y_score, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width probability bins: count, mean predicted probability, observed positive rate.

    A well-calibrated model has mean_predicted close to fraction_positive in every bin. Empty
    bins are kept (count 0, NaN rates) so the table always has `bins` rows.
    """
    t, s = _arrays(y_true, y_score)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bins are (lower, upper], the first also holding 0: scikit-learn's calibration_curve rule
    idx = np.searchsorted(edges[1:-1], s, side="left")
    rows = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        rows.append({"lower": round(float(edges[b]), 12), "upper": round(float(edges[b + 1]), 12),
                     "count": n,
                     "mean_predicted": float(s[m].mean()) if n else float("nan"),
                     "fraction_positive": float(t[m].mean()) if n else float("nan")})
    return rows


def expected_calibration_error(curve: list[dict[str, Any]]) -> float:
    """Count-weighted mean |observed - predicted| over the bins of a reliability curve."""
    n = sum(r["count"] for r in curve)
    return float(sum(r["count"] * abs(r["fraction_positive"] - r["mean_predicted"])
                     for r in curve if r["count"]) / n) if n else float("nan")


def threshold_for_sensitivity(y_true, y_score, target: float) -> float:
    """The highest threshold whose sensitivity on this data is >= target.

    With positives' scores sorted high to low, the threshold must let through the first
    ceil(target * P) of them, so it is the score of the last one; any higher threshold loses it.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    t, s = _arrays(y_true, y_score)
    pos = np.sort(s[t])[::-1]
    if pos.size == 0:
        raise ValueError("no positive examples: sensitivity is undefined")
    k = max(1, math.ceil(target * pos.size - 1e-9))  # tolerance: 0.95 * 20 must need 19, not 20
    return float(pos[k - 1])


def threshold_for_specificity(y_true, y_score, target: float) -> float:
    """The lowest threshold whose specificity on this data is >= target.

    At least k = ceil(target * N) negatives must score below the threshold, so it must lie
    above the k-th lowest negative score; the lowest such threshold that is a score on this
    data is the next distinct score above it (any class). When none is above, the threshold
    is just above the highest score (every image is called negative).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target specificity must be in (0, 1], got {target}")
    t, s = _arrays(y_true, y_score)
    neg = np.sort(s[~t])
    if neg.size == 0:
        raise ValueError("no negative examples: specificity is undefined")
    k = max(1, math.ceil(target * neg.size - 1e-9))  # same tolerance as for sensitivity
    above = s[s > neg[k - 1]]
    return float(above.min()) if above.size else float(np.nextafter(neg[k - 1], np.inf))


def shortest_threshold(y_score, threshold: float, max_digits: int = 6) -> float:
    """The decimal with the fewest digits that makes the same calls as `threshold` on y_score.

    Every threshold in (highest score below it, lowest score at or above it] calls the same
    images positive; a user types 0.37 more readily than 0.3712345678. Returns `threshold`
    itself when no decimal of at most max_digits digits lies in that interval.
    """
    s = np.asarray(y_score, dtype=np.float64).ravel()
    below, at_or_above = s[s < threshold], s[s >= threshold]
    lo = float(below.max()) if below.size else 0.0
    hi = float(at_or_above.min()) if at_or_above.size else 1.0
    if threshold > hi or threshold <= lo:  # outside the scores' range: keep it as given
        return float(threshold)
    for digits in range(0, max_digits + 1):
        scale = 10 ** digits
        candidate = math.floor(lo * scale) / scale
        while candidate <= lo:  # the first decimal of this length above lo
            candidate = round(candidate + 1 / scale, digits)
        if lo < candidate <= hi:
            return float(candidate)
    return float(threshold)


def _clusters(groups, n: int) -> tuple[np.ndarray, int]:
    """(each prediction's cluster index, the number of clusters): its group's, or its own."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups).ravel()
    if g.size != n:
        raise ValueError(f"{g.size} group labels for {n} predictions")
    _, cluster = np.unique(g, return_inverse=True)
    return cluster, int(cluster.max()) + 1


def _resample_weights(rng: np.random.Generator, n_rows: int, cluster: np.ndarray,
                      n_clusters: int) -> np.ndarray:
    """(n_rows, N) draw counts: n_clusters clusters drawn with replacement, per row.

    Plain bootstrap is the special case where every prediction is its own cluster.
    """
    draws = rng.integers(0, n_clusters, size=(n_rows, n_clusters))
    flat = (draws + np.arange(n_rows)[:, None] * n_clusters).ravel()
    counts = np.bincount(flat, minlength=n_rows * n_clusters).reshape(n_rows, n_clusters)
    return counts[:, cluster]


def _weight_chunks(groups, n: int, n_resamples: int, seed: int, chunk_elements: int
                   ) -> tuple[int, Iterator[np.ndarray]]:
    """(the number of clusters, the resamples as float weight matrices (rows, n) with
    n_resamples rows in all): drawn in chunks of about chunk_elements numbers, which bounds
    memory on large sets. Bad `groups` raise here, before anything is drawn."""
    cluster, n_clusters = _clusters(groups, n)

    def chunks() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        rows, done = max(1, chunk_elements // max(n, n_clusters)), 0
        while done < n_resamples:
            r = min(rows, n_resamples - done)
            yield _resample_weights(rng, r, cluster, n_clusters).astype(np.float64)
            done += r

    return n_clusters, chunks()


def _interval(values: np.ndarray, level: float) -> dict[str, Any]:
    """The percentile interval of a statistic's resampled values, over those where it was
    defined (`valid` counts them)."""
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return {"low": float("nan"), "high": float("nan"), "valid": 0}
    lo, hi = np.percentile(ok, [50 * (1 - level), 50 * (1 + level)])
    return {"low": float(lo), "high": float(hi), "valid": int(ok.size)}


def bootstrap(y_true, y_score, thresholds: dict[str, float], *, n_resamples: int = 1000,
              seed: int = 0, groups=None, level: float = 0.95,
              chunk_elements: int = 4_000_000) -> dict[str, Any]:
    """Percentile bootstrap confidence intervals.

    Returns {"roc_auc": ci, "average_precision": ci, "operating_points": {name: {metric: ci}}}
    with ci = {"low", "high", "valid"}; `valid` counts the resamples where the metric was defined
    (a resample may hold no positive or no negative example). `groups` (one label per prediction)
    resamples whole groups, e.g. all images of one patient, so that near-duplicate images do not
    make the intervals too narrow. Thresholds are held fixed: the intervals do not include the
    uncertainty of choosing a threshold on this same data.
    """
    t, s = _arrays(y_true, y_score)
    n_clusters, resamples = _weight_chunks(groups, t.size, n_resamples, seed, chunk_elements)
    order, starts = _tie_blocks(s)
    tf = t.astype(np.float64)
    calls = {name: (s >= thr).astype(np.float64) for name, thr in thresholds.items()}
    stats: dict[str, list[np.ndarray]] = {"roc_auc": [], "average_precision": []}
    stats.update({f"{name}/{m}": [] for name in thresholds for m in CI_METRICS})
    for w in resamples:
        auc, ap = _rank_metrics(w, t, order, starts)
        stats["roc_auc"].append(auc)
        stats["average_precision"].append(ap)
        total, n_pos = w.sum(axis=1), w @ tf
        for name, p in calls.items():
            tp, called = w @ (tf * p), w @ p
            tn = total - n_pos - (called - tp)
            with np.errstate(invalid="ignore", divide="ignore"):
                values = {"accuracy": (tp + tn) / total, "sensitivity": tp / n_pos,
                          "specificity": tn / (total - n_pos), "precision": tp / called,
                          "npv": tn / (total - called)}
            for m, v in values.items():
                stats[f"{name}/{m}"].append(v)
    cis = {k: _interval(np.concatenate(v), level) for k, v in stats.items()}
    return {"n_resamples": n_resamples, "seed": seed, "level": level,
            "clusters": n_clusters, "grouped": groups is not None,
            "roc_auc": cis["roc_auc"], "average_precision": cis["average_precision"],
            "operating_points": {name: {m: cis[f"{name}/{m}"] for m in CI_METRICS}
                                 for name in thresholds}}


def paired_auc_difference(y_true, score_a, score_b, *, n_resamples: int = 1000, seed: int = 0,
                          groups=None, level: float = 0.95,
                          chunk_elements: int = 4_000_000) -> dict[str, Any]:
    """ROC-AUC of score_b minus that of score_a on the same images, with a paired percentile
    bootstrap interval: both scores are measured on each same resample (of whole `groups`,
    as in `bootstrap`), so that what the images have in common cancels out of the difference.

    Returns {"difference", "low", "high", "valid", "n_resamples", "seed", "level", "clusters",
    "grouped"}; `valid` counts the resamples holding both classes.
    """
    t, a = _arrays(y_true, score_a)
    _, b = _arrays(y_true, score_b)  # the same length as y_true, so as score_a
    n_clusters, resamples = _weight_chunks(groups, t.size, n_resamples, seed, chunk_elements)
    blocks_a, blocks_b = _tie_blocks(a), _tie_blocks(b)
    diffs = [_rank_metrics(w, t, *blocks_b)[0] - _rank_metrics(w, t, *blocks_a)[0]
             for w in resamples]
    return {"difference": roc_auc(t, b) - roc_auc(t, a),
            **_interval(np.concatenate(diffs), level), "n_resamples": n_resamples,
            "seed": seed, "level": level, "clusters": n_clusters, "grouped": groups is not None}
