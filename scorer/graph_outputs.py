"""The optional outputs of an fxscore graph (heatmaps, OOD flag) and the contract keys naming them.

An fxscore graph always returns the probability of the positive class as its first output.
`fxscore export` (and `fxscore augment` for an existing model, `fxscore.explain_graph`) add:

- `feature_map`: the last convolutional feature map, the input of the global average pooling
  in front of the linear head, float32 [N, K, h, w] (ResNet18: K = 512, h = w = input size / 32);
- `pooled`: the pooled features the head reads, float32 [N, K];
- `ood_features` (ResNet-like graphs, `explain_graph.find_stages`): what OOD statistics are
  fit on, the per-channel spatial mean and std of the stem, the second stage's output and the
  feature map, concatenated, float32 [N, D] (ResNet18: D = 2 (64 + 128 + 512) = 1408);
- `ood_score` (when OOD statistics were fit): the Mahalanobis distance of `ood_features` (or,
  for graphs without them and older models, of `pooled`: the contract's `ood.feature` says
  which) to the training images' features, float32 [N] (`fxscore.ood`).

Three optional keys of contract version 2 describe them; a model without them scores as before:

    "outputs": {"probability": "probability", "feature_map": "feature_map",
                "pooled": "pooled", "ood_features": "ood_features",
                "ood_score": "ood_score"}                            # role -> graph output name
    "cam": {"weights": [K numbers], "bias": number, "cells": [h, w]} # the head: logit = w.pooled + b
    "ood": {"threshold": number > 0, "false_flag_rate": number in (0, 1), "fit_images": int,
            "holdout_images": int, "feature": "pooled" | STATS_FEATURE, ...}  # fxscore.ood

Scoring asks onnxruntime only for the outputs a run needs (`run_outputs`), so a run without
heatmaps or OOD flag fetches what it fetched before. (onnxruntime still executes the nodes of
an unrequested output; the OOD branch is a few reductions and one D x D product per image.)
This module imports neither onnx nor torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .model import Model

PROBABILITY, FEATURE_MAP, POOLED, OOD_SCORE = "probability", "feature_map", "pooled", "ood_score"
OOD_FEATURES = "ood_features"
ROLES = (PROBABILITY, FEATURE_MAP, POOLED, OOD_SCORE, OOD_FEATURES)
# The contract's ood.feature for statistics fit on `ood_features` (ResNet-like graphs:
# per-channel spatial mean and std of the stem, the second stage and the feature map);
# "pooled" for statistics fit on the pooled features (other graphs, and older models).
STATS_FEATURE = "mean,std:stem,stage2,final"
OPTIONAL_KEYS = ("outputs", "cam", "ood")  # contract keys this module defines
MAX_FEATURES = 1 << 16  # a head reading more features than this is not an fxscore CNN
# What to do when a model lacks an output: named in every error.
AUGMENT_HINT = ("re-export it with `fxscore export` (which adds heatmap outputs and OOD "
                "statistics) or add them to this file without PyTorch: `fxscore augment {path} "
                "--out NEW.onnx`")


class OutputsError(ValueError):
    """The optional-output keys of a model's metadata are malformed."""


class MissingOutput(Exception):
    """A run asked a model for an output it does not have; the message names the fix."""


def _number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(float(x)))


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_optional(d: dict[str, Any]) -> None:
    """Raise OutputsError naming the first problem in the optional keys of a metadata dict.

    Called by `fxscore.contract.validate`; absent keys are fine (a model without them).
    """
    outputs = d.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise OutputsError(f"outputs must be a JSON object (role -> graph output name), "
                               f"got {type(outputs).__name__}")
        unknown = [r for r in outputs if r not in ROLES]
        if unknown:
            raise OutputsError(f"outputs names unknown roles {unknown}; known: {list(ROLES)}")
        names = list(outputs.values())
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise OutputsError(f"outputs must map roles to distinct non-empty graph output "
                               f"names, got {outputs!r}")
    outputs = outputs or {}
    cam = d.get("cam")
    if cam is not None:
        if not isinstance(cam, dict):
            raise OutputsError("cam must be a JSON object")
        w = cam.get("weights")
        if (not isinstance(w, list) or not 1 <= len(w) <= MAX_FEATURES
                or not all(_number(x) for x in w)):
            raise OutputsError(f"cam.weights must be 1..{MAX_FEATURES} finite numbers")
        if not _number(cam.get("bias")):
            raise OutputsError(f"cam.bias must be a finite number, got {cam.get('bias')!r}")
        cells = cam.get("cells")
        if cells is not None and not (isinstance(cells, list) and len(cells) == 2
                                      and all(_count(c) and c >= 1 for c in cells)):
            raise OutputsError(f"cam.cells must be [height, width] positive integers, got "
                               f"{cells!r}")
        if FEATURE_MAP not in outputs:
            raise OutputsError("cam is given but outputs names no feature_map")
    ood = d.get("ood")
    if ood is not None:
        if not isinstance(ood, dict):
            raise OutputsError("ood must be a JSON object")
        t = ood.get("threshold")
        if not _number(t) or not float(t) > 0:
            raise OutputsError(f"ood.threshold must be a positive finite number, got {t!r}")
        rate = ood.get("false_flag_rate")
        if not _number(rate) or not 0 < float(rate) < 1:
            raise OutputsError(f"ood.false_flag_rate must be a number in (0, 1), got {rate!r}")
        for key in ("fit_images", "holdout_images"):
            if not _count(ood.get(key)):
                raise OutputsError(f"ood.{key} must be a non-negative integer, got "
                                   f"{ood.get(key)!r}")
        if OOD_SCORE not in outputs:
            raise OutputsError("ood is given but outputs names no ood_score")


def output_names(meta_outputs: dict[str, str], first_output: str) -> dict[str, str]:
    """role -> graph output name; the probability defaults to the graph's first output."""
    names = dict(meta_outputs)
    names.setdefault(PROBABILITY, first_output)
    return names


def check_session_outputs(graph_outputs: Iterable[str], meta_outputs: dict[str, str],
                          source: str) -> None:
    """The graph must have every output its metadata names (checked at load)."""
    have = set(graph_outputs)
    missing = {role: name for role, name in meta_outputs.items() if name not in have}
    if missing:
        raise OutputsError(f"model {source}: its metadata names outputs the graph lacks "
                           f"({', '.join(f'{r}: {n!r}' for r, n in missing.items())}); "
                           "re-export the model")


def has_roles(model: "Model", roles: Iterable[str]) -> bool:
    names = output_names(model.meta.outputs, model.session.get_outputs()[0].name)
    return all(r in names for r in roles)


def require(model: "Model", roles: Iterable[str], why: str) -> None:
    """Raise MissingOutput naming the fix when `model` lacks any of `roles`."""
    names = output_names(model.meta.outputs, model.session.get_outputs()[0].name)
    missing = [r for r in roles if r not in names]
    if missing:
        what = ("OOD statistics" if missing == [OOD_SCORE] else "heatmap outputs")
        raise MissingOutput(f"model {model.path} has no {what} ({', '.join(missing)}), which "
                            f"{why} needs; " + AUGMENT_HINT.format(path=model.path))


def run_outputs(model: "Model", batch: np.ndarray, roles: Sequence[str]) -> dict[str, np.ndarray]:
    """Run `model` on an NCHW float32 batch, fetching only `roles` -> {role: array}.

    The probability is checked exactly as `Model.predict` checks it (shape [N], in [0, 1]);
    a feature map must be [N, K, h, w] and finite, pooled or OOD features [N, K], an OOD score
    [N] and non-negative: anything else is a `ModelError`, as a broken probability is.
    """
    from .model import ModelError

    roles = list(dict.fromkeys(roles))
    require(model, roles, "this run")
    names = output_names(model.meta.outputs, model.session.get_outputs()[0].name)
    fetched = model.session.run([names[r] for r in roles], {model.meta.input_name: batch})
    n = len(batch)
    out: dict[str, np.ndarray] = {}
    for role, value in zip(roles, fetched):
        value = np.asarray(value, dtype=np.float32)
        if role == PROBABILITY:
            out[role] = model.check_probabilities(value, n)
            continue
        want = {FEATURE_MAP: 4, POOLED: 2, OOD_FEATURES: 2, OOD_SCORE: 1}[role]
        if role == OOD_SCORE and value.ndim == 2 and value.shape[1:] == (1,):
            value = value.reshape(n)
        if value.ndim != want or value.shape[0] != n:
            raise ModelError(f"model {model.path}: output {names[role]!r} ({role}) has shape "
                             f"{value.shape} for a batch of {n}; expected {want} dimensions; "
                             "re-export the model")
        if not np.isfinite(value).all() or (role == OOD_SCORE and (value < 0).any()):
            raise ModelError(f"model {model.path}: output {names[role]!r} ({role}) holds NaN, "
                             "infinite or negative values: the graph's arithmetic is broken; "
                             "re-export the model")
        out[role] = value
    return out


def roles_for(model: "Model", *, heatmaps: bool = False, ood: bool | None = None) -> tuple[str, ...]:
    """The outputs a run fetches: the probability, the feature map for heatmaps, and the OOD
    score when the model has OOD statistics (`ood=None`) or when asked (`ood=True`)."""
    roles = [PROBABILITY]
    if heatmaps:
        roles.append(FEATURE_MAP)
    if ood or (ood is None and model.meta.ood):
        roles.append(OOD_SCORE)
    return tuple(roles)


def annotate_rows(model: "Model", rows: list[dict[str, Any]], outputs: dict[str, np.ndarray],
                  scored: list[int], files: list[Any] | None = None) -> None:
    """Add what `outputs` (from `run_outputs` on the scored rows) holds to the rows.

    `scored[j]` is the index in `rows` of the batch's j-th image. With an OOD score every row
    gets `ood_score` and `ood` (None for error rows: empty cells); with a feature map the
    scored rows get "_feature_map" and, given `files`, "_file" (for `cam.HeatmapWriter`;
    keys starting with "_" are not written to --out).
    """
    if OOD_SCORE in outputs:
        from .ood import ood_cells

        threshold = float(model.meta.ood["threshold"])
        for row in rows:
            row["ood_score"], row["ood"] = None, None
        for j, i in enumerate(scored):
            rows[i]["ood_score"], rows[i]["ood"] = ood_cells(float(outputs[OOD_SCORE][j]),
                                                             threshold)
    if FEATURE_MAP in outputs:
        for j, i in enumerate(scored):
            rows[i]["_feature_map"] = outputs[FEATURE_MAP][j]
            if files is not None:
                rows[i]["_file"] = files[i]


OOD_COLUMNS = ("ood_score", "ood")


def ood_columns(model: "Model") -> tuple[str, ...]:
    """The optional output columns a run with this model writes: ("ood_score", "ood") when
    the model carries OOD statistics, else none."""
    return OOD_COLUMNS if model.meta.ood else ()
