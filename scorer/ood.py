"""The out-of-distribution flag: how unlike the images the model was made for an input is.

    stats = fit_ood(model, train_files, holdout=val_files)   # torch-free; an augmented model
    data, meta = explain_graph.augment(model_bytes, model.meta, ood=stats)   # embed
    ... each scored row then gets ood_score (a distance) and ood (true/false)

Features: on a ResNet-like graph, the per-channel spatial mean and standard deviation of
three tensors, concatenated (the graph's `ood_features` output, `explain_graph.find_stages`):
the stem (the first MaxPool's output), the end of the second residual stage and the last
feature map; ResNet18: 2 (64 + 128 + 512) = 1408 numbers. Early layers see the texture and
contrast that tell a radiograph from a phantom, a gradient or a figure, which the pooled
features of the last layer, made to tell fractures apart, mostly average away (measured on
`benchmarks/bench_ood.py`: ROC-AUC 0.937 against 0.911 for the pooled features alone). A graph
without that structure, and every model fit before, uses the pooled features (the 512 numbers
ResNet18's head reads); the contract's `ood.feature` says which ("pooled" or
`graph_outputs.STATS_FEATURE`), and the fit reads them through the graph itself, so fit and
scorer measure the same numbers.

Score: the Mahalanobis distance of those features to the mean of the fit images' features,
under a Ledoit-Wolf shrunk covariance (a few hundred or thousand images estimate a 1408 x 1408
covariance poorly; shrinking towards a scaled identity keeps it invertible and well
conditioned, with the amount chosen from the data). The distance is computed inside the graph
(`explain_graph.add_ood_output`), so the statistics are weights covered by the model's digest,
and `mahalanobis` here is its numpy reference.

The colour rule: a scored image that shows real colour (`images.read_with_colour`: the same
test, from the same decode, that leaves colour images out of the fit) is flagged `ood`
whatever its distance; its `ood_score` stays the distance. The model reads luma only, so a
coloured figure can sit close to the fit images in feature space, yet no radiograph is in
colour: the fit excluded them, and nothing says the model was validated on one. `fxscore run`
and `eval` apply it (`scoring.score_batches` checks colour only for a model with OOD
statistics, and only files stored in colour, on the pixels decoded for scoring); error rows
keep empty OOD cells and a model without statistics is unchanged.

Fit: the mean and covariance on the training images and the threshold on the validation
images (held out from the fit, unseen in training, like the images the model will score), at
a stated false-flag rate (default 1%), as `fxscore export` does when it has both. Given one
folder only (`fxscore augment --ood-fit VAL`), the threshold is chosen out of fold: the images
are split into `folds` folds by content hash (byte-identical copies stay in one fold); each
fold's distances are measured under statistics fit on the other folds, and the threshold is
the ceil((1 - rate) (n + 1))-th smallest of these n out-of-fold distances (the conformal rule:
a new image from the same distribution is flagged with probability at most `rate`). The
embedded mean and covariance are then fit on all the images. Near-duplicates that are not
byte-identical (rotated or cropped copies) can sit in different folds, which makes the
threshold somewhat low (more false flags), never high.

Left out of the fit: colour images (`images.image_info(decode=True)["has_colour"]`: annotated
figures, photos; the audit's shortcut flag), so the flag does not learn them as normal, and
files that cannot be read. What is excluded is counted in the stats.

What a flag means: the input is in colour, or its features are further from the fit images'
than all but `rate` of the held-out images. It does not say the probability is wrong, only that
the model was not validated on anything like it; rows keep their probability and label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .model import Model

FALSE_FLAG_RATE = 0.01
FOLDS = 5
MIN_IMAGES = 20  # fewer validation images cannot say anything about a 1% tail
METHOD = "mahalanobis-ledoit-wolf"


class OodError(ValueError):
    """OOD statistics cannot be fit (too few readable images, features degenerate)."""


@dataclass
class OodStats:
    mean: np.ndarray  # float64 [K]
    eigenvalues: np.ndarray  # float64 [K], of the shrunk covariance, ascending
    eigenvectors: np.ndarray  # float64 [K, K], columns
    shrinkage: float
    threshold: float
    false_flag_rate: float
    fit_images: int
    holdout_images: int  # out-of-fold distances the threshold was chosen from
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> images left out
    holdout_flagged: float = 0.0  # share of the held-out distances above the threshold
    threshold_from: str = "out of fold"  # or "held-out images"
    feature: str = "pooled"  # the features measured: graph_outputs.STATS_FEATURE or "pooled"

    def whitening(self) -> np.ndarray:
        """W with ||(x - mean) @ W|| = Mahalanobis distance: V diag(1 / sqrt(lambda))."""
        return self.eigenvectors / np.sqrt(self.eigenvalues)[None, :]

    def distance(self, features: np.ndarray) -> np.ndarray:
        return mahalanobis(features, self.mean, self.whitening())

    def contract(self) -> dict[str, Any]:
        """The contract's `ood` key: threshold and how it was chosen (the matrices are graph
        initializers)."""
        return {"method": METHOD, "feature": self.feature, "dim": int(len(self.mean)),
                "threshold": float(self.threshold), "false_flag_rate": float(self.false_flag_rate),
                "fit_images": int(self.fit_images), "holdout_images": int(self.holdout_images),
                "holdout_flagged": round(float(self.holdout_flagged), 6),
                "threshold_from": self.threshold_from,
                "shrinkage": round(float(self.shrinkage), 6),
                "excluded": {k: int(v) for k, v in sorted(self.excluded.items())}}


# ---------------------------------------------------------------------------- statistics


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, shrunk covariance, shrinkage) of the rows of x, Ledoit & Wolf (2004).

    cov = (1 - s) S + s mu I, S the maximum-likelihood covariance, mu = trace(S) / p, and s
    the estimate of the optimal shrinkage (the same estimator as scikit-learn's LedoitWolf,
    written out here so fitting needs only numpy).
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    emp = xc.T @ xc / n
    mu = np.trace(emp) / p
    if n < 2 or mu <= 0:
        raise OodError(f"cannot fit a covariance to {n} image(s) with constant features")
    x2 = xc ** 2
    beta_sum = float(np.sum(x2.T @ x2))
    delta_sum = float(np.sum(emp ** 2))  # sum((xc.T xc)^2) / n^2
    beta = (beta_sum / n - delta_sum) / (p * n)
    delta = (delta_sum - 2 * mu * np.trace(emp) + p * mu ** 2) / p
    beta = min(beta, delta)
    s = 0.0 if beta <= 0 or delta <= 0 else beta / delta
    cov = (1 - s) * emp
    cov[np.diag_indices(p)] += s * mu
    return mean, cov, float(s)


def mahalanobis(features: np.ndarray, mean: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """Distances of the rows of `features` to `mean` under the metric W W^T (float64)."""
    z = (np.asarray(features, dtype=np.float64) - mean) @ whitening
    return np.sqrt(np.einsum("ij,ij->i", z, z))


def _eigen(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(cov)
    floor = max(float(values.max()), 1e-30) * 1e-12  # rounding: never divide by ~0
    return np.maximum(values, floor), vectors


def conformal_threshold(distances: np.ndarray, rate: float) -> float:
    """The ceil((1 - rate)(n + 1))-th smallest distance (the largest when n is too small)."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    k = math.ceil((1 - rate) * (len(d) + 1))
    return float(d[min(k, len(d)) - 1])


def fold_of(key: str, folds: int) -> int:
    """The fold of an image, from its content hash: identical files share a fold."""
    return int(key[:8], 16) % folds if key else 0


def fit_features(features: np.ndarray, keys: Sequence[str] | None = None, *,
                 false_flag_rate: float = FALSE_FLAG_RATE, folds: int = FOLDS,
                 excluded: dict[str, int] | None = None,
                 holdout: np.ndarray | None = None, feature: str = "pooled") -> OodStats:
    """OOD statistics from features [n, K] (keys: content hashes, for the folds); `feature`
    names them for the contract (`graph_outputs.STATS_FEATURE` or "pooled").

    With `holdout` (features of other images, e.g. validation images when `features` are the
    training images') the threshold is chosen on the holdout's distances; otherwise out of
    fold.
    """
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if not 0 < false_flag_rate < 1:
        raise OodError(f"the false-flag rate must lie in (0, 1), got {false_flag_rate}")
    if n < MIN_IMAGES:
        raise OodError(f"OOD statistics need at least {MIN_IMAGES} readable grey images, "
                       f"got {n}")
    if not np.isfinite(x).all():
        raise OodError("the model's OOD features hold NaN or infinite values")
    if holdout is not None:
        h = np.asarray(holdout, dtype=np.float64)
        if len(h) < MIN_IMAGES or not np.isfinite(h).all():
            raise OodError(f"the threshold needs at least {MIN_IMAGES} readable grey held-out "
                           f"images with finite features, got {len(h)}")
        mean, cov, shrinkage = ledoit_wolf(x)
        values, vectors = _eigen(cov)
        d = mahalanobis(h, mean, vectors / np.sqrt(values)[None, :])
        threshold = conformal_threshold(d, false_flag_rate)
        return OodStats(mean=mean, eigenvalues=values, eigenvectors=vectors,
                        shrinkage=shrinkage, threshold=threshold,
                        false_flag_rate=false_flag_rate, fit_images=n, holdout_images=len(h),
                        excluded=dict(excluded or {}),
                        holdout_flagged=float(np.mean(d > threshold)),
                        threshold_from="held-out images", feature=feature)
    keys = list(keys) if keys is not None else [f"{i:08x}" for i in range(n)]
    fold = np.array([fold_of(k, folds) for k in keys])
    if len(set(fold.tolist())) < 2:  # all in one fold: fall back to positions
        fold = np.arange(n) % folds
    out_of_fold = np.empty(n)
    for f in sorted(set(fold.tolist())):
        test = fold == f
        mean, cov, _ = ledoit_wolf(x[~test])
        values, vectors = _eigen(cov)
        out_of_fold[test] = mahalanobis(x[test], mean, vectors / np.sqrt(values)[None, :])
    threshold = conformal_threshold(out_of_fold, false_flag_rate)
    mean, cov, shrinkage = ledoit_wolf(x)
    values, vectors = _eigen(cov)
    return OodStats(mean=mean, eigenvalues=values, eigenvectors=vectors, shrinkage=shrinkage,
                    threshold=threshold, false_flag_rate=false_flag_rate, fit_images=n,
                    holdout_images=n, excluded=dict(excluded or {}),
                    holdout_flagged=float(np.mean(out_of_fold > threshold)), feature=feature)


# ---------------------------------------------------------------------------- from files


def pooled_features(model: "Model", files: Iterable[Path], *, exclude_colour: bool = True,
                    batch_size: int = 32,
                    progress: Callable[[int], None] | None = None,
                    ) -> tuple[np.ndarray, list[str], list[Path], dict[str, int]]:
    """(features [n, K], sha256 of each, the files used, reason -> files left out).

    The features are the graph's own `ood_features` output where it has one, else its pooled
    features (`feature_role`): the statistics are fit on exactly what the graph computes.
    Each file is read once, hashed, and fed through the scorer's reading rule
    (`scoring.model_input`); colour images are left out when `exclude_colour`, by the test
    `fxscore run` flags them with (`scoring.model_input_with_colour`).
    """
    import hashlib
    import io

    from .images import ImageReadError
    from .scoring import model_input, model_input_with_colour

    excluded: dict[str, int] = {}
    feats: list[np.ndarray] = []
    keys: list[str] = []
    used: list[Path] = []
    batch: list[np.ndarray] = []
    params = model.meta.preprocess
    role, _ = feature_role(model)

    def flush() -> None:
        if batch:
            feats.append(model.predict_with(np.stack(batch), (role,))[role])
            batch.clear()

    for i, f in enumerate(files):
        f = Path(f)
        try:
            data = f.read_bytes()
            if exclude_colour:
                x, colour = model_input_with_colour(io.BytesIO(data), params, name=str(f))
                if colour:
                    excluded["colour"] = excluded.get("colour", 0) + 1
                    continue
            else:
                x = model_input(io.BytesIO(data), params, name=str(f))
        except (ImageReadError, OSError):
            excluded["unreadable"] = excluded.get("unreadable", 0) + 1
            continue
        batch.append(x)
        keys.append(hashlib.sha256(data).hexdigest())
        used.append(f)
        if len(batch) >= batch_size:
            flush()
        if progress:
            progress(i + 1)
    flush()
    x = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return x, keys, used, excluded


def feature_role(model: "Model") -> tuple[str, str]:
    """(graph output role, contract ood.feature) OOD statistics of `model` are fit on."""
    from .graph_outputs import OOD_FEATURES, POOLED, STATS_FEATURE, has_roles

    return (OOD_FEATURES, STATS_FEATURE) if has_roles(model, (OOD_FEATURES,)) else (
        POOLED, "pooled")


def fit_ood(model: "Model", files: Iterable[Path], *, false_flag_rate: float = FALSE_FLAG_RATE,
            folds: int = FOLDS, exclude_colour: bool = True,
            holdout: Iterable[Path] | None = None,
            progress: Callable[[int], None] | None = None) -> OodStats:
    """Fit OOD statistics with `model` (which needs a pooled output: `explain_graph.augment`
    it first) on `files`, torch-free.

    With `holdout`: mean and covariance from `files` (the training images: more of them,
    a better covariance), the threshold from the held-out `holdout` (validation images, which
    the model was not trained on, like the images it will score). Without: `files` are
    validation images, and the threshold is chosen out of fold. Colour images are left out of
    both (`exclude_colour`).
    """
    x, keys, _, excluded = pooled_features(model, files, exclude_colour=exclude_colour,
                                           progress=progress)
    h = None
    if holdout is not None:
        h, _, _, left_out = pooled_features(model, holdout, exclude_colour=exclude_colour)
        excluded = {k: excluded.get(k, 0) + left_out.get(k, 0)
                    for k in {*excluded, *left_out}}
    return fit_features(x, keys, false_flag_rate=false_flag_rate, folds=folds,
                        excluded=excluded, holdout=h, feature=feature_role(model)[1])


# ---------------------------------------------------------------------------- in rows


def ood_cells(score: float | None, threshold: float, colour: bool = False
              ) -> tuple[float | None, bool | None]:
    """(ood_score, ood) for a row: flagged when the distance exceeds the threshold, or when
    the image is in colour (`images.read_with_colour`; the score stays the distance)."""
    if score is None:
        return None, None
    return float(score), bool(colour or score > threshold)


# ---------------------------------------------------------------------------- embedding


def embed_ood_bytes(data: bytes, meta: Any, files: Sequence[Path], *,
                    false_flag_rate: float | None = None, threads: int | None = None,
                    holdout: Sequence[Path] | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fit OOD statistics with the serialised model `data` (metadata `meta`, which must have a
    pooled output) on `files` and embed them -> {"_result": (bytes, meta), **stats summary}."""
    import onnxruntime as ort

    from . import explain_graph
    from .model import Model, session_options

    session = ort.InferenceSession(data, session_options(threads),
                                   providers=["CPUExecutionProvider"])
    model = Model(session=session, meta=meta, model_id="fitting", path=Path("<model>"))
    stats = fit_ood(model, files, progress=progress, holdout=holdout,
                    false_flag_rate=FALSE_FLAG_RATE if false_flag_rate is None else false_flag_rate)
    new = explain_graph.augment(data, meta, ood=stats)
    return {**stats.contract(), "_result": new}


def embed_ood(path: str | Path, files: Sequence[Path], *, false_flag_rate: float | None = None,
              threads: int | None = None, holdout: Sequence[Path] | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Fit OOD statistics with the model file at `path` on `files` and rewrite it in place
    (atomically) with them -> (its new ModelMeta, the stats summary). For `fxscore export`:
    call it after int8 quantisation (the quantiser must not see the OOD branch)."""
    from .atomicfile import write_files
    from .contract import ModelMeta
    from .modelfile import read_props

    path = Path(path)
    data = path.read_bytes()
    meta = ModelMeta.from_props(read_props(data), str(path))
    if "pooled" not in meta.outputs:
        from . import explain_graph

        data, meta = explain_graph.augment(data, meta)
    summary = embed_ood_bytes(data, meta, files, false_flag_rate=false_flag_rate,
                              threads=threads, holdout=holdout, progress=progress)
    new_data, new_meta = summary.pop("_result")
    write_files({path: new_data})
    return new_meta, summary


# ---------------------------------------------------------------------------- in eval


def ood_summary(rows: Sequence[dict[str, Any]], positive_class: str,
                threshold: float) -> dict[str, Any] | None:
    """Metrics of an evaluation's readable rows, in distribution and flagged apart.

    None when the rows carry no OOD flag (a model without OOD statistics). For `fxscore
    eval`: a flagged image keeps its probability and label, so the headline metrics include
    it; these say how the model does on the images it was made for and on the others.
    """
    from . import metrics

    ok = [r for r in rows if not r.get("error") and r.get("ood") is not None]
    if not ok:
        return None

    def part(subset: list[dict[str, Any]]) -> dict[str, Any]:
        y = np.array([r["true_label"] == positive_class for r in subset], dtype=int)
        p = np.array([r["probability"] for r in subset], dtype=np.float64)
        out: dict[str, Any] = {"images": len(subset), "positives": int(y.sum())}
        if not subset:
            return out
        out.update(metrics.threshold_metrics(y, p, threshold))
        out["roc_auc"] = metrics.roc_auc(y, p) if 0 < y.sum() < len(y) else None
        return out

    flagged = [r for r in ok if r["ood"]]
    inside = [r for r in ok if not r["ood"]]
    return {"flagged": len(flagged), "flagged_share": len(flagged) / len(ok),
            "in_distribution": part(inside), "out_of_distribution": part(flagged)}
