"""Evaluate a model on labelled images: find the images, score them, compute every metric.

Labels come from the folder layout (DIR/<class name>/..., any depth below the class folder) or
from a CSV of path,label for a flat folder. Unreadable files stay in the totals and in the
result's list of failures; the metrics are computed on the readable images, and the result
says so. The returned `Evaluation` is plain data: `fxscore.report` turns it into text, JSON,
CSV and HTML.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import metrics as M
from .files import find_images, is_candidate
from .scoring import score_items


class EvalDataError(ValueError):
    """The evaluation data cannot be used as given; the message names the file and the fix."""


@dataclass(frozen=True)
class Item:
    path: str  # as written to predictions.csv: relative to the evaluated folder, '/'-separated
    file: Path
    true_label: str


@dataclass
class Evaluation:
    """Scored rows (the scorer's columns plus true_label) and the metrics document."""

    rows: list[dict[str, Any]]
    positive_class: str
    class_names: tuple[str, ...]
    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)  # see `summarise`

    @property
    def readable(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["error"]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["error"]]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_score) of the readable images; y_true is 1 for the positive class."""
        ok = self.readable
        return (np.array([r["true_label"] == self.positive_class for r in ok], dtype=int),
                np.array([r["probability"] for r in ok], dtype=np.float64))


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _expected(class_names: Iterable[str]) -> str:
    return ", ".join(f"'{c}'" for c in class_names)


def items_from_folders(root: Path, class_names: tuple[str, ...],
                       counts: Counter | None = None) -> list[Item]:
    """DIR/<class>/**: one folder per class of the model, named exactly as its classes.

    Inside a class folder, files are found as `fxscore run` finds them (any depth, hidden
    files skipped); `counts["ignored"]` counts the non-image files passed over.
    """
    root = Path(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".") and is_candidate(p))
    hint = (f"expected one folder per class of the model ({_expected(class_names)}), "
            f"or a flat folder with --labels labels.csv (path,label)")
    unknown = [p.name for p in subdirs if p.name not in class_names]
    if unknown:
        raise EvalDataError(f"{root}: folder(s) {_expected(unknown)} are not classes of this "
                            f"model; {hint}")
    missing = [c for c in class_names if not (root / c).is_dir()]
    if missing:
        raise EvalDataError(f"{root}: no folder for class(es) {_expected(missing)}; {hint}")
    if loose:
        raise EvalDataError(f"{root}: {len(loose)} image(s) outside the class folders (e.g. "
                            f"'{loose[0].name}') would have no label; {hint}")
    items = []
    for c in class_names:
        found = [Item(f"{c}/{rel}", path, c) for rel, path in find_images(root / c, counts=counts)]
        if not found:
            raise EvalDataError(f"{root / c}: the folder for class '{c}' holds no image files; "
                                f"every class of the model ({_expected(class_names)}) needs "
                                f"images")
        items += found
    return items


def _read_csv(path: Path, columns: tuple[str, str], what: str) -> list[tuple[int, str, str]]:
    """(line number, first column, second column) for each non-blank row of a 2-column CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: cannot read the {what} CSV ({e})") from e
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    header = [c.strip().lower() for c in rows[0][1]] if rows else []
    if not all(c in header for c in columns):
        raise EvalDataError(f"{path}: the {what} CSV needs a header row with columns "
                            f"{','.join(columns)} (found {','.join(header) or 'nothing'})")
    a, b = (header.index(c) for c in columns)
    out = []
    for line, r in rows[1:]:
        if len(r) <= max(a, b) or not r[a].strip() or not r[b].strip():
            raise EvalDataError(f"{path}, line {line}: expected {','.join(columns)}, got "
                                f"{','.join(r)!r}")
        out.append((line, r[a].strip(), r[b].strip()))
    if not out:
        raise EvalDataError(f"{path}: the {what} CSV lists no files")
    return out


def _key(path_text: str, root: Path) -> str:
    """A CSV path (relative to root, or absolute under it) as a predictions.csv path."""
    p = Path(path_text)
    if p.is_absolute():
        try:
            return _rel(p, root)
        except ValueError:
            return p.as_posix()
    return Path(os.path.normpath(p)).as_posix()


def items_from_labels(root: Path, labels_csv: Path, class_names: tuple[str, ...]) -> list[Item]:
    """A flat (or any) folder plus a CSV of path,label; paths are relative to the folder.

    Listed files that do not exist are kept (they are reported as unreadable, like a truncated
    file): dropping them would silently shrink the test set.
    """
    root, items, seen = Path(root), [], {}
    for line, path_text, label in _read_csv(Path(labels_csv), ("path", "label"), "labels"):
        if label not in class_names:
            raise EvalDataError(f"{labels_csv}, line {line}: label '{label}' is not a class of "
                                f"this model; expected one of {_expected(class_names)}")
        key = _key(path_text, root)
        if key in seen:
            raise EvalDataError(f"{labels_csv}, line {line}: '{path_text}' is listed twice "
                                f"(first on line {seen[key]})")
        seen[key] = line
        items.append(Item(key, root / key, label))  # an absolute key stays absolute
    absent = [c for c in class_names if not any(it.true_label == c for it in items)]
    if absent:
        raise EvalDataError(f"{labels_csv}: no file is labelled {_expected(absent)}; every class "
                            f"of the model ({_expected(class_names)}) needs images")
    return items


def read_groups(groups_csv: Path, root: Path, items: list[Item]) -> list[str]:
    """The group (patient, original radiograph, ...) of every item, from a path,group CSV.

    Rows for files outside this evaluation are ignored (one groups file may cover every split);
    an evaluated file without a group is an error, since guessing would narrow the intervals.
    """
    groups = {_key(p, root): g for _, p, g in _read_csv(Path(groups_csv), ("path", "group"),
                                                          "groups")}
    missing = [it.path for it in items if it.path not in groups]
    if missing:
        raise EvalDataError(f"{groups_csv}: {len(missing)} evaluated file(s) have no group, e.g. "
                            f"'{missing[0]}'; list every file as path,group with paths relative "
                            f"to {root}")
    return [groups[it.path] for it in items]


def evaluate(root: str | os.PathLike, model, *, labels: str | os.PathLike | None = None,
             groups: str | os.PathLike | None = None, target_sensitivity: float | None = None,
             n_bootstrap: int = 1000, seed: int = 0, batch_size: int = 32,
             workers: int | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None) -> Evaluation:
    """Score every labelled image under root with `model` and compute the metrics.

    `model` is a `fxscore.model.Model`; `progress` is called with each scored row.
    """
    root = Path(root)
    meta = model.meta
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a folder; expected a folder of images with one "
                            f"sub-folder per class ({_expected(meta.class_names)})")
    counts: Counter = Counter()
    items = (items_from_labels(root, Path(labels), meta.class_names) if labels
             else items_from_folders(root, meta.class_names, counts))
    group_of = read_groups(Path(groups), root, items) if groups else None
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise EvalDataError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")

    rows = []
    for item, row in zip(items, score_items(model, [(it.path, it.file) for it in items],
                                            batch_size=batch_size, workers=workers)):
        row = {**row, "true_label": item.true_label}
        rows.append(row)
        if progress:
            progress(row)
    if len(rows) != len(items):  # score_items is order-preserving and total; guard the zip
        raise RuntimeError(f"scored {len(rows)} of {len(items)} files")

    ev = Evaluation(rows, meta.positive_class, tuple(meta.class_names), float(meta.threshold))
    ok_groups = ([g for g, r in zip(group_of, rows) if not r["error"]] if group_of else None)
    data = {"root": str(root), "source": "labels" if labels else "folders",
            "labels_csv": str(labels) if labels else None,
            "groups_csv": str(groups) if groups else None, "ignored": counts["ignored"]}
    ev.metrics = summarise(ev, model, data, target_sensitivity=target_sensitivity,
                           n_bootstrap=n_bootstrap, seed=seed, groups=ok_groups)
    return ev


def summarise(ev: Evaluation, model, data: dict[str, Any], *,
              target_sensitivity: float | None = None, n_bootstrap: int = 1000, seed: int = 0,
              groups: list[str] | None = None) -> dict[str, Any]:
    """The metrics document (what metrics.json holds) for scored rows.

    `data` describes where the rows came from (root, source, ...); `groups` has one entry per
    readable row. Raises EvalDataError when no image, or no image of some class, was readable.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    names, pos = list(ev.class_names), ev.positive_class
    per_class = {c: {"files": 0, "readable": 0, "unreadable": 0} for c in names}
    for r in ev.rows:
        per_class[r["true_label"]]["files"] += 1
        per_class[r["true_label"]]["unreadable" if r["error"] else "readable"] += 1
    n_failed = sum(v["unreadable"] for v in per_class.values())
    root = data["root"]
    if not ev.readable:
        raise EvalDataError(f"{root}: none of the {len(ev.rows)} files could be read as an image "
                            f"(first error: {ev.rows[0]['error']}); expected X-ray images of the "
                            f"classes {_expected(names)}")
    short = [c for c in names if per_class[c]["readable"] == 0]
    if short:
        raise EvalDataError(f"{root}: no readable image of class {_expected(short)} "
                            f"({per_class[short[0]]['files']} file(s), all unreadable); "
                            f"sensitivity, specificity and ROC-AUC need both classes")

    y_true, y_score = ev.arrays()
    thresholds = {"model": ev.threshold}
    if target_sensitivity is not None:
        thresholds["target"] = M.threshold_for_sensitivity(y_true, y_score, target_sensitivity)
    points = {name: M.threshold_metrics(y_true, y_score, t) for name, t in thresholds.items()}
    if "target" in points:
        points["target"]["target_sensitivity"] = target_sensitivity

    true_names = [r["true_label"] for r in ev.readable]
    pred_names = [r["label"] for r in ev.readable]  # the scorer's call, as `fxscore run` writes it
    report = classification_report(true_names, pred_names, labels=names, digits=3,
                                   output_dict=True, zero_division=0)
    report_text = classification_report(true_names, pred_names, labels=names, digits=3,
                                         zero_division=0)
    cm = confusion_matrix(true_names, pred_names, labels=names)
    curve = M.reliability_curve(y_true, y_score, bins=10)

    cis = None
    if n_bootstrap > 0:
        cis = M.bootstrap(y_true, y_score, thresholds, n_resamples=n_bootstrap, seed=seed,
                          groups=groups)
        for name in points:
            points[name]["ci"] = cis["operating_points"][name]

    meta = model.meta
    return {
        "model": {"path": str(model.path), "model_id": model.model_id, **meta.to_dict()},
        "data": {**data, "files": len(ev.rows), "readable": len(ev.rows) - n_failed,
                 "unreadable": n_failed, "per_class": per_class,
                 "groups": len(set(groups)) if groups else None,
                 "note": (f"metrics are computed on the {len(ev.rows) - n_failed} readable "
                          f"files; {n_failed} could not be read") if n_failed else ""},
        "positive_class": pos,
        "classification_report": report,
        "classification_report_text": report_text,
        "confusion_matrix": {"labels": names, "rows": "true", "columns": "predicted",
                             "matrix": cm.tolist()},
        "roc_auc": {"value": M.roc_auc(y_true, y_score),
                    "ci": cis["roc_auc"] if cis else None},
        "average_precision": {"value": M.average_precision(y_true, y_score),
                              "ci": cis["average_precision"] if cis else None},
        "operating_points": points,
        "calibration": {"brier": M.brier(y_true, y_score),
                        "expected_calibration_error": M.expected_calibration_error(curve),
                        "reliability_curve": curve},
        "bootstrap": ({k: cis[k] for k in ("n_resamples", "seed", "level", "grouped", "clusters")}
                      if cis else None),
        "unreadable_files": [{"path": r["path"], "true_label": r["true_label"],
                              "error": r["error"]} for r in ev.failed],
    }

