"""Calibration at export, on the run's validation split: temperature scaling, and the threshold
for a stated operating point.

Temperature scaling (Guo et al. 2017) divides the logit by one number T fit on validation,
minimising the negative log-likelihood: p = sigmoid(logit / T). It changes no ranking (ROC-AUC
is unchanged), only how far the probabilities are from 0.5. It is folded into the network's
last layer (its weights and bias divided by T), which is exactly sigmoid(logit / T) with no new
operator: the graph still ends in the Sigmoid and returns the probability, parity is proven on
the calibrated network, and heatmap weights read from the head stay consistent with it. The
metadata records T and the expected calibration error before and after (`training.calibration`).

The operating point (`--threshold-for sensitivity:0.90`, or `specificity:S`) is chosen on the
validation images' probabilities as the scorer computes them from the written file (so `fxscore
eval` on the same images reproduces it), placed in the middle of the gap between neighbouring
scores so that floating-point differences between CPUs cannot move a validation image across
it, then shortened to the fewest decimals inside that middle half. Chosen on validation, it is
checked on test by `fxscore eval`, never chosen there.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fxscore import metrics as M
from fxscore.contract import Preprocess
from fxscore.images import ImageReadError
from fxscore.scoring import model_input, score_items

from .onnx_export import ExportError, ProbabilityModel

METHODS = ("none", "temperature")
KINDS = ("sensitivity", "specificity")
TEMPERATURE_RANGE = (0.05, 20.0)
BINS = 10  # reliability bins, as `fxscore eval` reports them
BATCH = 32

ValFile = tuple[str, Path, int]  # (relative path, path, target: 1 = positive class)


def parse_operating_point(text: str) -> tuple[str, float]:
    """'sensitivity:0.90' -> ('sensitivity', 0.9); ExportError naming the form otherwise."""
    kind, _, value = str(text).partition(":")
    kind = kind.strip().lower()
    try:
        target = float(value)
    except ValueError:
        target = math.nan
    if kind not in KINDS or not 0.0 < target <= 1.0:
        raise ExportError(f"--threshold-for {text!r}: expected sensitivity:S or specificity:S "
                          "with S in (0, 1], e.g. sensitivity:0.90")
    return kind, target


# ---------------------------------------------------------------------------- temperature

def val_logits(model: ProbabilityModel, files: Sequence[ValFile], params: Preprocess,
               progress: Callable[[int, int], None] | None = None,
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The network's logits on the validation files, read by the scorer's reading rule ->
    (logits float64, targets, relative paths that could not be read)."""
    logits, targets, unreadable, xs, ys = [], [], [], [], []

    def flush() -> None:
        if xs:
            with torch.no_grad():
                logits.append(model.logit(torch.from_numpy(np.stack(xs))).double().numpy())
            targets.extend(ys)
            xs.clear()
            ys.clear()

    for k, (rel, path, target) in enumerate(files, 1):
        try:
            xs.append(model_input(path, params))
            ys.append(target)
        except ImageReadError:
            unreadable.append(rel)
        if len(xs) == BATCH:
            flush()
        if progress:
            progress(k, len(files))
    flush()
    return (np.concatenate(logits) if logits else np.zeros(0),
            np.asarray(targets, dtype=int), unreadable)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T), computed without overflow."""
    z = np.asarray(logits, np.float64) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising `nll`.

    The NLL is convex in a = 1/T (logistic regression through the origin on the logit), so its
    derivative, mean((sigmoid(a z) - y) z), rises with a: bisection finds its zero, or the end
    of the range it does not reach (separable data pushes T to the lower end).
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(y, np.float64)
    if len(z) == 0 or len(np.unique(y)) < 2:
        raise ExportError("temperature scaling needs validation images of both classes")

    def slope(a: float) -> float:
        return float(np.mean((1.0 / (1.0 + np.exp(-a * z)) - y) * z))

    lo, hi = 1.0 / TEMPERATURE_RANGE[1], 1.0 / TEMPERATURE_RANGE[0]
    if slope(lo) >= 0:
        return TEMPERATURE_RANGE[1]
    if slope(hi) <= 0:
        return TEMPERATURE_RANGE[0]
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return float(1.0 / (0.5 * (lo + hi)))


def calibration_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ECE (10 equal-width bins, as `fxscore eval` computes it), Brier score."""
    curve = M.reliability_curve(y, p, bins=BINS)
    return {"ece": M.expected_calibration_error(curve), "brier": M.brier(y, p)}


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))  # no overflow warnings


def fold_temperature(model: ProbabilityModel, temperature: float) -> None:
    """Divide the last layer's weights and bias by T: the network then outputs logit / T."""
    fc = model.net.fc
    with torch.no_grad():
        fc.weight.div_(temperature)
        if fc.bias is not None:
            fc.bias.div_(temperature)


def temperature_scale(model: ProbabilityModel, files: Sequence[ValFile], params: Preprocess,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fit T on the validation files, fold it into `model` (in place) -> what was done."""
    z, y, unreadable = val_logits(model, files, params, progress)
    t = fit_temperature(z, y)
    before = calibration_metrics(y, sigmoid(z))
    after = calibration_metrics(y, sigmoid(z / t))
    fold_temperature(model, t)
    return {"method": "temperature", "temperature": t, "fit_on": "val", "images": int(len(y)),
            "unreadable": len(unreadable), "at_range_limit": t in TEMPERATURE_RANGE,
            "ece_before": before["ece"], "ece_after": after["ece"],
            "brier_before": before["brier"], "brier_after": after["brier"],
            "nll_before": nll(z, y), "nll_after": nll(z, y, t), "bins": BINS}


# ---------------------------------------------------------------------------- threshold

def _short_decimal(lo: float, hi: float, max_digits: int = 8) -> float:
    """The decimal with the fewest digits in [lo, hi] (lo <= hi), else their midpoint."""
    for digits in range(0, max_digits + 1):
        scale = 10 ** digits
        candidate = math.ceil(lo * scale - 1e-12) / scale
        if lo <= candidate <= hi:
            return float(round(candidate, digits))
    return 0.5 * (lo + hi)


def choose_threshold(y: np.ndarray, p: np.ndarray, kind: str, target: float) -> float:
    """The threshold reaching `target` sensitivity (the highest such) or specificity (the
    lowest) on (y, p), moved into the middle half of the gap below the deciding score."""
    y = np.asarray(y, int)
    p = np.asarray(p, np.float64)
    try:
        t = (M.threshold_for_sensitivity if kind == "sensitivity"
             else M.threshold_for_specificity)(y, p, target)
    except ValueError as e:  # a class without images
        raise ExportError(f"--threshold-for {kind}:{target:g}: {e} on the validation images") \
            from None
    below = p[p < t]
    lo = float(below.max()) if below.size else max(0.0, t - 1e-3)
    gap = t - lo
    return min(1.0, max(0.0, _short_decimal(lo + gap / 4, t - gap / 4)))


def val_probabilities(scorer, files: Sequence[ValFile], threads: int | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The scorer's probabilities (its complete path, on the written file) -> (y, p) of the
    readable validation files."""
    rows = list(score_items(scorer, [(rel, path) for rel, path, _ in files], workers=threads))
    keep = [(target, r["probability"]) for (_, _, target), r in zip(files, rows)
            if not r["error"]]
    return (np.array([k[0] for k in keep], dtype=int),
            np.array([k[1] for k in keep], dtype=np.float64))


def operating_point(scorer, files: Sequence[ValFile], kind: str, target: float,
                    threads: int | None = None) -> dict[str, Any]:
    """The threshold for the operating point on the validation files, and what it gives there."""
    y, p = val_probabilities(scorer, files, threads)
    t = choose_threshold(y, p, kind, target)
    at = M.threshold_metrics(y, p, t)
    return {"operating_point": f"{kind}:{target:g}", "chosen_on": "val", "images": int(len(y)),
            "unreadable": len(files) - int(len(y)), "threshold": t,
            "sensitivity": at["sensitivity"], "specificity": at["specificity"],
            "val_ece": calibration_metrics(y, p)["ece"], "val_roc_auc": M.roc_auc(y, p)}
