"""Evaluate a model on labelled images: find the images, score them, compute every metric.

Labels come from the folder layout (DIR/<class name>/..., any depth below the class folder) or
from a CSV of path,label for a flat folder. Unreadable files stay in the totals and in the
result's list of failures; the metrics are computed on the readable images, and the result
says so. With `study_level`, the unit of the metrics is the study (`by_study`): the rows are
grouped as `fxscore studies` groups them, and the images stay in `Evaluation.images`. The returned `Evaluation` is plain data: `fxscore.report` turns it into text, JSON,
CSV and HTML.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import csvsafe
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
    images: list[dict[str, Any]] | None = None  # study level: the image rows behind `rows`

    @property
    def image_rows(self) -> list[dict[str, Any]]:
        """The scored images (the rows themselves, unless the rows are studies)."""
        return self.rows if self.images is None else self.images

    def image_level(self) -> "Evaluation":
        """This evaluation with the images as its rows (the report's gallery shows images)."""
        return Evaluation(self.image_rows, self.positive_class, self.class_names,
                          self.threshold, self.metrics)

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


def folders_with_classes(root: Path, class_names: Iterable[str], depth: int = 2) -> list[Path]:
    """Folders below root (at most `depth` levels down) holding a folder named as a class.

    What `fxscore eval data` suggests when data/ holds train/ val/ test/ instead of classes.
    """
    names, found = set(class_names), []

    def walk(folder: Path, level: int) -> None:
        try:
            subdirs = sorted(p for p in folder.iterdir()
                             if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        if level and any(p.name in names for p in subdirs):
            found.append(folder)
            return
        if level < depth:
            for p in subdirs:
                walk(p, level + 1)

    walk(Path(root), 0)
    # test/ first: evaluating means the held-out split
    return sorted(found, key=lambda p: (p.name.lower() not in ("test", "testing"), str(p)))


def _suggestion(root: Path, class_names: tuple[str, ...]) -> str:
    found = folders_with_classes(root, class_names)
    if not found:
        return ""
    listed = ", ".join(str(p) for p in found[:5]) + (f" and {len(found) - 5} more"
                                                     if len(found) > 5 else "")
    return (f"; these sub-folders hold class folders: {listed} (e.g. `fxscore eval "
            f"{found[0]}`)")


def items_from_folders(root: Path, class_names: tuple[str, ...],
                       counts: Counter | None = None, *,
                       one_class_ok: bool = False) -> list[Item]:
    """DIR/<class>/**: one folder per class of the model, named exactly as its classes.

    Inside a class folder, files are found as `fxscore run` finds them (any depth, hidden
    files skipped); `counts["ignored"]` counts the non-image files passed over.
    one_class_ok: a folder (or images) for one class only is accepted (a fractures-only set
    still gives sensitivity); the other class's folder may be missing or empty.
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
                            f"model; {hint}{_suggestion(root, class_names)}")
    missing = [c for c in class_names if not (root / c).is_dir()]
    if missing and (not one_class_ok or len(missing) == len(class_names)):
        raise EvalDataError(f"{root}: no folder for class(es) {_expected(missing)}; {hint}"
                            f"{_suggestion(root, class_names)}")
    if loose:
        raise EvalDataError(f"{root}: {len(loose)} image(s) outside the class folders (e.g. "
                            f"'{loose[0].name}') would have no label; {hint}")
    items, empty = [], []
    for c in class_names:
        if c in missing:
            continue
        found = [Item(f"{c}/{rel}", path, c) for rel, path in find_images(root / c, counts=counts)]
        if not found:
            empty.append(c)
        items += found
    if empty and (not one_class_ok or not items):
        c = empty[0]
        raise EvalDataError(f"{root / c}: the folder for class '{c}' holds no image files; "
                            + ("every class of the model" if not one_class_ok else
                               "at least one class of the model")
                            + f" ({_expected(class_names)}) needs images")
    return items


def _read_csv(path: Path, columns: tuple[str, str], what: str) -> list[tuple[int, str, str]]:
    """(line number, first column, second column) for each non-blank row of a 2-column CSV."""
    # Cells go through csvsafe.untext, so paths copied from fxscore's own CSVs (predictions.csv,
    # a split's manifest.csv) match exactly: neutralised formulas and \xHH escapes are undone.
    # The path cell is taken as it is (a name may begin or end with spaces); labels and groups
    # are stripped.
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, [csvsafe.untext(c) for c in r]) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EvalDataError(f"{path}: cannot read the {what} CSV ({e})") from e
    rows = [(line, r) for line, r in rows if any(c.strip() for c in r)]
    header = [c.strip().lower() for c in rows[0][1]] if rows else []
    if not all(c in header for c in columns):
        raise EvalDataError(f"{path}: the {what} CSV needs a header row with columns "
                            f"{','.join(columns)} (found {','.join(header) or 'nothing'})")
    a, b = (header.index(c) for c in columns)
    out = []
    for line, r in rows[1:]:
        if len(r) <= max(a, b) or not r[a] or not r[b].strip():
            raise EvalDataError(f"{path}, line {line}: expected {','.join(columns)}, got "
                                f"{','.join(r)!r}")
        out.append((line, r[a], r[b].strip()))
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


def items_from_labels(root: Path, labels_csv: Path, class_names: tuple[str, ...], *,
                      one_class_ok: bool = False) -> list[Item]:
    """A flat (or any) folder plus a CSV of path,label; paths are relative to the folder.

    Listed files that do not exist are kept (they are reported as unreadable, like a truncated
    file): dropping them would silently shrink the test set. one_class_ok: every row may carry
    the same label. Image files under the folder without a row: see `unlabelled_files`.
    """
    root, items, seen = Path(root), [], {}
    for line, path_text, label in _read_csv(Path(labels_csv), ("path", "label"), "labels"):
        if label not in class_names:
            raise EvalDataError(f"{labels_csv}, line {line}: label '{label}' is not a class of "
                                f"this model; expected one of {_expected(class_names)}")
        key = _key(path_text, root)
        if path_text != path_text.strip() and not os.path.lexists(root / key):
            # a hand-written "a.png , fractured": the padded name is not there, the plain one is
            plain = _key(path_text.strip(), root)
            key = plain if os.path.lexists(root / plain) else key
        if key in seen:
            raise EvalDataError(f"{labels_csv}, line {line}: '{path_text}' is listed twice "
                                f"(first on line {seen[key]})")
        seen[key] = line
        items.append(Item(key, root / key, label))  # an absolute key stays absolute
    absent = [c for c in class_names if not any(it.true_label == c for it in items)]
    if absent and not one_class_ok:
        raise EvalDataError(f"{labels_csv}: no file is labelled {_expected(absent)}; every class "
                            f"of the model ({_expected(class_names)}) needs images")
    return items


def unlabelled_files(root: Path, items: list[Item]) -> list[str]:
    """Image files under root (found as `fxscore run` finds them) that no item covers.

    With --labels these are the files the CSV has no row for: not evaluated, and said so.
    """
    listed = {it.path for it in items}
    return [rel for rel, _ in find_images(Path(root)) if rel not in listed]


def read_groups(groups_csv: Path, root: Path, items: list[Item]) -> list[str]:
    """The group (patient, original radiograph, ...) of every item, from a path,group CSV.

    Rows for files outside this evaluation are ignored (one groups file may cover every split);
    an evaluated file without a group is an error, since guessing would narrow the intervals.
    """
    rows = _read_csv(Path(groups_csv), ("path", "group"), "groups")
    groups = {_key(p, root): g for _, p, g in rows}
    for _, p, g in rows:  # a hand-padded path also matches its plain name, the exact one first
        groups.setdefault(_key(p.strip(), root), g)
    missing = [it.path for it in items if it.path not in groups]
    if missing:
        raise EvalDataError(f"{groups_csv}: {len(missing)} evaluated file(s) have no group, e.g. "
                            f"'{missing[0]}'; list every file as path,group with paths relative "
                            f"to {root}")
    return [groups[it.path] for it in items]


def study_uid(path: Path) -> str:
    """A DICOM file's StudyInstanceUID, read from its header; "" for other files and for
    headers that cannot be read (such a file's study is then its folder)."""
    from . import dicom
    from .images import ImageReadError, open_regular, sniff_format

    if sniff_format(path) != "dicom":
        return ""
    try:
        with open_regular(path) as f:
            return str(dicom.read_header(f, str(path)).ds.get("StudyInstanceUID") or "").strip()
    except (ImageReadError, OSError):
        return ""


def by_study(rows: list[dict[str, Any]], uids: list[str], positive: str, negative: str,
             groups: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Image rows -> one row per study, and each study's group (None without groups).

    Studies are formed as `fxscore studies` forms them (`studies.study_of`: StudyInstanceUID,
    `uids` holding each row's file's `study_uid`, else the folder holding the file). A study's score is its
    highest image probability and its label that image's label (positive when any image is
    called positive); it is truly positive when any of its images is labelled so, whether or
    not that image could be read. A study none of whose images could be read is an
    unreadable row; one with some unreadable images counts as incomplete. With `groups`
    (one per image), all images of a study must share a group.
    """
    from .studies import STUDY_KEY, StudiesError, study_of, summarise

    tagged = [{**r, STUDY_KEY: uid, "_where": r["path"]} for r, uid in zip(rows, uids)]
    truth: dict[tuple[str, str], bool] = {}
    group: dict[tuple[str, str], str] = {}
    for i, r in enumerate(tagged):
        k = study_of(r)
        truth[k] = truth.get(k, False) or r["true_label"] == positive
        if groups is not None:
            if group.setdefault(k, groups[i]) != groups[i]:
                raise EvalDataError(f"study {k[0]} has images in two groups ('{group[k]}' and "
                                    f"'{groups[i]}', e.g. {r['path']}); with --study-level, "
                                    "--groups must give every image of a study the same group")
    try:
        studies = summarise(tagged)
    except StudiesError as e:
        raise EvalDataError(str(e)) from None
    out = []
    for s in studies:
        k = (s.study, s.key)
        out.append({
            "path": s.study, "study_key": s.key, "probability": s.max_probability,
            "label": s.label, "threshold": s.threshold, "model_id": s.model_id, "sha256": "",
            "error": "" if s.images else (f"{s.study}: none of its {s.failed} image(s) could "
                                          "be read"),
            "true_label": positive if truth[k] else negative, "images": s.images,
            "failed": s.failed, "mean_probability": s.mean_probability})
    return out, ([group[(s.study, s.key)] for s in studies] if groups is not None else None)


def at_threshold(model, threshold: float | None):
    """`model` with another threshold in effect (labels, threshold column), file untouched."""
    if threshold is None:
        return model
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise EvalDataError(f"threshold must be in [0, 1], got {threshold}")
    return replace(model, meta=replace(model.meta, threshold=threshold))


def evaluate(root: str | os.PathLike, model, *, labels: str | os.PathLike | None = None,
             groups: str | os.PathLike | None = None, target_sensitivity: float | None = None,
             target_specificity: float | None = None, threshold: float | None = None,
             n_bootstrap: int = 1000, seed: int = 0, batch_size: int = 32,
             workers: int | None = None, exclude_training_copies: bool = False,
             study_level: bool = False,
             progress: Callable[[dict[str, Any]], None] | None = None,
             on_start: Callable[[int], None] | None = None) -> Evaluation:
    """Score every labelled image under root with `model` and compute the metrics.

    `model` is a `fxscore.model.Model`; `threshold` replaces its threshold for every output
    (labels, the threshold column, the confusion matrix, the report). `on_start` is called
    once with the number of files to score, `progress` with each scored row.
    A folder (or labels CSV) with images of one class only is evaluated as far as one class
    allows (sensitivity on a fractures-only set); the metrics document says which are undefined.

    Every row gets `training_copy` ('exact:train', 'near:val', ...: `fxscore.membership`) when
    the model carries its training-data table; metrics["training_copies"] counts them. With
    `exclude_training_copies` the copies leave the rows and the metrics, and
    metrics["including_training_copies"] gives the headline metrics with them.

    `study_level`: the metrics are per study (`by_study`), the bootstrap resamples studies (or,
    with `groups`, groups of studies); `Evaluation.images` keeps the image rows.
    """
    root = Path(root)
    meta = model.meta
    if not root.is_dir():
        raise EvalDataError(f"{root}: not a folder; expected a folder of images with one "
                            f"sub-folder per class ({_expected(meta.class_names)})")
    for name, target in (("sensitivity", target_sensitivity),
                         ("specificity", target_specificity)):
        if target is not None and not 0.0 < target <= 1.0:
            raise EvalDataError(f"target {name} must be in (0, 1], got {target}")
    scorer = at_threshold(model, threshold)
    counts: Counter = Counter()
    items = (items_from_labels(root, Path(labels), meta.class_names, one_class_ok=True)
             if labels else items_from_folders(root, meta.class_names, counts,
                                               one_class_ok=True))
    unlabelled = unlabelled_files(root, items) if labels else []
    group_of = read_groups(Path(groups), root, items) if groups else None
    if on_start:
        on_start(len(items))

    rows = []
    for item, row in zip(items, score_items(scorer, [(it.path, it.file) for it in items],
                                            batch_size=batch_size, workers=workers)):
        row = {**row, "true_label": item.true_label}
        rows.append(row)
        if progress:
            progress(row)
    if len(rows) != len(items):  # score_items is order-preserving and total; guard the zip
        raise RuntimeError(f"scored {len(rows)} of {len(items)} files")
    copies = _training_copies(model, rows, items, workers)
    keep = [not (exclude_training_copies and r["training_copy"]) for r in rows]
    if (any(not r["error"] for r in rows)
            and not any(k and not r["error"] for k, r in zip(keep, rows))):
        raise EvalDataError(f"{root}: every readable image is a copy of the model's own "
                            "training or validation images; --exclude-training-copies leaves "
                            "nothing to evaluate")
    negative = next(c for c in meta.class_names if c != meta.positive_class)

    # Each file's study, read once: the evaluation with training copies left out and the one
    # with them both need it.
    uid_of = {it.file: study_uid(it.file) for it in items} if study_level else {}

    def unit(rows: list[dict[str, Any]], files: list[Path],
             groups: list[str] | None) -> tuple[Evaluation, list[str] | None]:
        """The evaluation of these rows at the requested level, and its readable rows' groups."""
        images = None
        if study_level:
            images, (rows, groups) = rows, by_study(rows, [uid_of[f] for f in files],
                                                    meta.positive_class, negative, groups)
        ev = Evaluation(rows, meta.positive_class, tuple(meta.class_names),
                        float(scorer.meta.threshold), images=images)
        return ev, ([g for g, r in zip(groups, rows) if not r["error"]] if groups else None)

    files = [it.file for it in items]
    all_rows, all_files, all_groups = rows, files, group_of
    rows = [r for r, k in zip(rows, keep) if k]
    files = [f for f, k in zip(files, keep) if k]
    group_of = [g for g, k in zip(group_of, keep) if k] if group_of else None

    ev, ok_groups = unit(rows, files, group_of)
    data = {"root": str(root), "source": "labels" if labels else "folders",
            "labels_csv": str(labels) if labels else None,
            "groups_csv": str(groups) if groups else None, "ignored": counts["ignored"],
            "unlabelled": len(unlabelled), "unlabelled_examples": unlabelled[:5],
            "level": "study" if study_level else "image"}
    if study_level:
        data["images"] = len(rows)
        data["unreadable_images"] = sum(1 for r in rows if r["error"])
        data["incomplete_studies"] = sum(1 for r in ev.rows if r["failed"] and r["images"])
        data["study_keys"] = dict(Counter(r["study_key"] for r in ev.rows))
    ev.metrics = summarise(ev, model, data, target_sensitivity=target_sensitivity,
                           target_specificity=target_specificity,
                           n_bootstrap=n_bootstrap, seed=seed, groups=ok_groups)
    from .ood import ood_summary  # None for a model without OOD statistics

    ev.metrics["ood"] = ood_summary(ev.image_rows, meta.positive_class, ev.threshold)
    copies["excluded"] = len(all_rows) - len(rows)
    ev.metrics["training_copies"] = copies
    if copies["excluded"]:
        every, ok_all = unit(all_rows, all_files, all_groups)
        ev.metrics["including_training_copies"] = headline(summarise(
            every, model, data, n_bootstrap=n_bootstrap, seed=seed, groups=ok_all))
    return ev


def _training_copies(model, rows: list[dict[str, Any]], items: list[Item],
                     workers: int | None) -> dict[str, Any]:
    """Mark each row's `training_copy` (`fxscore.membership.mark_rows`); a damaged table is
    an EvalDataError naming the fix."""
    from . import membership

    try:
        return membership.mark_rows(model, rows, [it.file for it in items], workers=workers)
    except membership.MembershipError as e:
        raise EvalDataError(str(e)) from None


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a metrics document that compare two evaluations."""
    at = m["operating_points"]["model"]
    return {"files": m["data"]["files"], "readable": m["data"]["readable"],
            "roc_auc": m["roc_auc"], "average_precision": m["average_precision"],
            "threshold": at["threshold"], "sensitivity": at["sensitivity"],
            "specificity": at["specificity"], "accuracy": at["accuracy"],
            "expected_calibration_error": m["calibration"]["expected_calibration_error"]}


def summarise(ev: Evaluation, model, data: dict[str, Any], *,
              target_sensitivity: float | None = None,
              target_specificity: float | None = None, n_bootstrap: int = 1000, seed: int = 0,
              groups: list[str] | None = None) -> dict[str, Any]:
    """The metrics document (what metrics.json holds) for scored rows.

    `data` describes where the rows came from (root, source, ...); `groups` has one entry per
    readable row. `ev.threshold` is the threshold in effect; `model.meta.threshold` the one the
    model file carries. Raises EvalDataError when no image was readable, or when a target
    needs a class that has no readable image. With one class only, the metrics that need both
    are NaN (null in metrics.json) and `data["one_class"]` names the class present.
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
    present = [c for c in names if c not in short]
    neg = next(c for c in names if c != pos)
    for flag, target, needs, what in (("--target-sensitivity", target_sensitivity, pos,
                                       "sensitivity"),
                                      ("--target-specificity", target_specificity, neg,
                                       "specificity")):
        if target is not None and needs in short:
            raise EvalDataError(f"{root}: {flag} needs readable '{needs}' images, and there "
                                f"are none ({per_class[needs]['files']} file(s)); {what} is "
                                f"undefined without them")

    y_true, y_score = ev.arrays()
    thresholds = {"model": ev.threshold}
    if target_sensitivity is not None:
        thresholds["target"] = M.threshold_for_sensitivity(y_true, y_score, target_sensitivity)
    if target_specificity is not None:
        thresholds["target_specificity"] = M.threshold_for_specificity(y_true, y_score,
                                                                       target_specificity)
    points = {name: M.threshold_metrics(y_true, y_score, t) for name, t in thresholds.items()}
    model_threshold = float(model.meta.threshold)
    points["model"]["source"] = ("model" if ev.threshold == model_threshold else "--threshold")
    if "target" in points:
        points["target"]["target_sensitivity"] = target_sensitivity
    if "target_specificity" in points:
        points["target_specificity"]["target_specificity"] = target_specificity
    for name in points:
        if name != "model":  # chosen here: the shortest number that makes the same calls
            points[name]["apply_threshold"] = M.shortest_threshold(y_score,
                                                                   points[name]["threshold"])

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
        "threshold": {"value": ev.threshold, "model": model_threshold,
                      "source": points["model"]["source"]},
        "data": {**data, "files": len(ev.rows), "readable": len(ev.rows) - n_failed,
                 "unreadable": n_failed, "per_class": per_class,
                 "one_class": present[0] if len(present) == 1 else None,
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

