"""Audit an image data set for leakage between its splits, label conflicts and shortcuts.

    audit = run_audit("./data")      # train/val/test/<class>/..., or <class>/..., or a flat folder

Every file is hashed (exact copies); every distinct content is read once, through
`fxscore.images.read_image`, and fingerprinted (`fxscore.fingerprint`) to find near copies:
re-encoded, resized, flipped, turned, slightly rotated or cropped, brighter or darker. Files
whose contents are copies (exact or near, transitively) form a group. A group that spans two
splits is a leak: the later split (train < val < test) is scored on images the earlier one
trained on. A group whose files carry different labels is a conflict.

The shortcut check asks whether one property of the file alone predicts the class (image size,
colour vs grey, file format, bit depth): a model learns such a property before it learns
fractures, and then fails on data where it does not hold.

Library functions return data; `format_summary` renders the text the CLI prints, `write_report`
the files (audit.json, groups.csv, files.csv, fingerprints.npz).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import csvsafe
from . import fingerprint as fp
from . import grouping
from .files import find_images
from .images import ImageReadError, image_info, read_image, sniff_format

# Folder names that mark a split, and their canonical names. Order = training order: a copy in
# a later split of an image in an earlier one is the leak that inflates reported numbers.
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")
AUC_WARN = 0.8  # a one-feature classifier above this separates the classes: a shortcut
PURE_SHARE = 0.99  # a feature value this pure in one class ...
PURE_MIN = 10  # ... among at least this many files (and 0.5 % of all) is a shortcut too
RARE = 5  # feature values with fewer files are pooled as "other" before scoring

Progress = Callable[[str, int, int], None]


class AuditError(ValueError):
    """The folder cannot be audited as given; the message names it and the fix."""


@dataclass
class FileRecord:
    path: str  # relative to the audited root, '/'-separated
    split: str  # canonical split ("train", "val", "test"), "" for a single tree
    label: str  # class folder, "" when unlabelled
    sha256: str = ""
    bytes: int = 0
    error: str = ""  # why the file could not be read ("" when it could)
    format: str = ""  # from the content, not the name
    width: int = 0
    height: int = 0
    mode: str = ""
    colour: bool = False  # colour content (a grey picture stored as RGB is grey)
    bit_depth: int = 0
    group: int = 0  # near-duplicate group (1-based; every file has one)


@dataclass
class Audit:
    root: str
    layout: str  # "splits" (train/val/test/...) or "tree" (one folder tree)
    splits: list[str]
    classes: list[str]
    files: list[FileRecord]
    groups: list[dict[str, Any]]  # groups of more than one file, largest first
    leaks: list[dict[str, Any]]  # per (earlier, later) split pair
    conflicts: list[dict[str, Any]]  # groups whose files carry different labels
    shortcuts: list[dict[str, Any]]  # per feature: per-class counts, AUC, warnings
    stats: dict[str, Any] = field(default_factory=dict)
    thumbs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # sha256 -> thumbnail
    # (sha256, sha256) -> (score, residual) of every pair verified: `fxscore.grouping`
    verdicts: dict = field(default_factory=dict, repr=False)
    described: dict = field(default_factory=dict, repr=False)  # sha256 -> descriptors

    @property
    def unreadable(self) -> list[FileRecord]:
        return [f for f in self.files if f.error]

    @property
    def leaked_groups(self) -> list[dict[str, Any]]:
        return [g for g in self.groups if len(g["splits"]) > 1]

    @property
    def warnings(self) -> list[str]:
        return [w for s in self.shortcuts for w in s["warnings"]]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("files", "thumbs", "verdicts", "described")}
        d["unreadable"] = [{"path": f.path, "error": f.error} for f in self.unreadable]
        return d


# ---------------------------------------------------------------------------- layout

def discover(root: str | os.PathLike, *, labels: bool = True) -> tuple[str, list[FileRecord]]:
    """Find the images under root -> (layout, records without content facts).

    "splits": root holds split folders (train/, val/, test/ and their usual aliases), each with
    class folders. "tree": root is one folder tree; its first-level folders are the classes, and
    images directly in root are unlabelled. labels=False: no labels at all (patient folders).
    """
    root = Path(root)
    if not root.is_dir():
        raise AuditError(f"{root}: not a folder. Give the folder that holds the images "
                         "(e.g. ./data with train/ val/ test/ or one folder per class).")
    subdirs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    split_dirs = {d: SPLIT_NAMES[d.lower()] for d in subdirs if d.lower() in SPLIT_NAMES}
    if len(set(split_dirs.values())) != len(split_dirs):
        raise AuditError(f"{root}: two folders name the same split "
                         f"({', '.join(sorted(split_dirs))}); merge or rename them.")
    layout = "splits" if split_dirs else "tree"
    records = []
    for rel, _path in find_images(root):
        parts = rel.split("/")
        split = ""
        if layout == "splits":
            if parts[0] not in split_dirs:
                continue  # not under a split folder: e.g. an extras/ folder beside them
            split = split_dirs[parts[0]]
            parts = parts[1:]
        label = parts[0] if labels and len(parts) > 1 else ""
        records.append(FileRecord(path=rel, split=split, label=label))
    if not records:
        raise AuditError(f"{root}: no image files found (looked for JPEG, PNG, TIFF, BMP, GIF, "
                         "WebP and DICOM files).")
    return layout, records


def split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


# ---------------------------------------------------------------------------- per-file work

def _hash(path: str) -> tuple[str, int, str]:
    try:
        return fp.sha256_file(path), os.path.getsize(path), ""
    except OSError as e:
        return "", 0, f"{path}: cannot read file ({e.strerror or e})"


def _facts(path: str, img: np.ndarray | None) -> dict[str, Any]:
    """What a shortcut can be, as `image_info` defines it: format (from the content), mode,
    bit depth, colour (pixels that really use colour, only judged for decodable files), and
    the size of the image read_image decoded (which the split's aspect ratios use)."""
    try:
        info = image_info(path, decode=img is not None)
        facts: dict[str, Any] = {"format": info["format"], "mode": info["mode"],
                                 "bit_depth": info["bit_depth"],
                                 "colour": info.get("has_colour", False)}
    except ImageReadError:  # no readable header (read_image reported why): the format at most
        facts = {"format": sniff_format(path) or "unknown"}
    if img is not None:
        facts["height"], facts["width"] = img.shape
    return facts


def analyse_file(path: str) -> tuple[np.ndarray | None, dict[str, Any], str]:
    """One distinct content -> (thumbnail or None, facts, why it cannot be read or "").

    The reason leaves out the path: the same content may sit under many names.
    """
    try:
        img = read_image(path)
    except ImageReadError as e:
        reason = str(e)
        if reason.startswith(f"{path}: "):
            reason = reason[len(path) + 2:]
        return None, _facts(path, None), reason
    return fp.thumbnail(img), _facts(path, img), ""


# ---------------------------------------------------------------------------- the audit

def default_workers() -> int:
    """Reader processes: the CPUs this job may use (affinity and cgroup quota)."""
    from .cpus import available_cpus

    return available_cpus()


def run_audit(root: str | os.PathLike, *, labels: bool = True, workers: int | None = None,
              progress: Progress | None = None, cache: dict | None = None,
              verdicts: dict | None = None) -> Audit:
    """Audit the images under root (see `discover` for the layouts).

    `cache` (sha256 -> analysis) lets a caller audit several folders holding the same contents
    (a data set, then its clean split) without decoding anything twice; `verdicts` (pairs of
    sha256 -> near-copy verdict, `fxscore.grouping`) without verifying any pair twice.
    """
    t0 = time.perf_counter()
    root = Path(root)
    layout, files = discover(root, labels=labels)
    workers = workers or default_workers()
    cache = {} if cache is None else cache
    report = progress or (lambda stage, done, total: None)
    paths = [str(root / f.path) for f in files]
    with ProcessPoolExecutor(workers) if workers > 1 else InlinePool() as pool:
        hashed = []
        for k, h in enumerate(pool.map(_hash, paths, chunksize=32)):
            hashed.append(h)
            if k % 256 == 0 or k == len(paths) - 1:
                report("hash", k + 1, len(paths))
        first_path: dict[str, str] = {}
        for f, p, (sha, size, err) in zip(files, paths, hashed):
            f.sha256, f.bytes, f.error = sha, size, err
            if sha and sha not in first_path:
                first_path[sha] = p
        todo = [s for s in first_path if s not in cache]
        results = pool.map(analyse_file, [first_path[s] for s in todo], chunksize=8)
        for k, (sha, res) in enumerate(zip(todo, results)):
            cache[sha] = res
            if k % 64 == 0 or k == len(todo) - 1:
                report("read", k + 1, len(todo))
        t_read = time.perf_counter()
        contents = list(first_path)
        readable = [s for s in contents if cache[s][0] is not None]
        thumbs = (np.stack([cache[s][0] for s in readable]) if readable
                  else np.zeros((0, fp.THUMB, fp.THUMB), np.uint8))
        aspects = [cache[s][1].get("height", 1) / max(1, cache[s][1].get("width", 1))
                   for s in readable]
        verdicts = {} if verdicts is None else verdicts
        described: dict = {}
        near = grouping.near_duplicate_groups(thumbs, aspects, keys=readable, verdicts=verdicts,
                                              described=described,
                                              executor=pool if workers > 1 else None,
                                              progress=progress)
    t_group = time.perf_counter()
    # content -> root content; unreadable contents are groups of their own (exact copies only)
    root_of = {s: s for s in contents}
    for k, s in enumerate(readable):
        root_of[s] = readable[int(near.labels[k])]
    for f, p in zip(files, paths):
        if f.sha256:
            thumb, facts, err = cache[f.sha256]
            f.error = f.error or (f"{p}: {err}" if err else "")
            for key, value in facts.items():
                setattr(f, key, value)
    _number_groups(files, root_of)
    audit = Audit(
        root=str(root), layout=layout,
        splits=sorted({f.split for f in files}, key=lambda s: (split_rank(s), s)),
        classes=sorted({f.label for f in files if f.label}),
        files=files, groups=_groups(files), leaks=_leaks(files), conflicts=[],
        shortcuts=shortcut_check(files), thumbs={s: cache[s][0] for s in readable},
        verdicts=verdicts, described=described)
    audit.conflicts = [g for g in audit.groups if g["conflict"]]
    dup_files = sum(g["files"] for g in audit.groups)
    audit.stats = {
        "files": len(files), "contents": len(contents), "readable_contents": len(readable),
        "unreadable_files": len(audit.unreadable),
        "groups": len({f.group for f in files}), "duplicate_groups": len(audit.groups),
        "files_in_duplicate_groups": dup_files,
        "exact_duplicate_files": len(files) - len(contents) - sum(1 for f in files if not f.sha256),
        "near_links": len(near.links), "pairs_verified": near.checked,
        "near_links_refused": len(near.refused),
        "seconds": {"read": round(t_read - t0, 1), "group": round(t_group - t_read, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
    return audit


class InlinePool:
    """A pool of no processes, for workers=1 (and for debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def _number_groups(files: list[FileRecord], root_of: dict[str, str]) -> None:
    """Group ids 1, 2, ... in order of each group's first file (paths sorted): stable output."""
    ids: dict[str, int] = {}
    for f in sorted(files, key=lambda f: f.path):
        key = root_of[f.sha256] if f.sha256 else "unhashed:" + f.path
        f.group = ids.setdefault(key, len(ids) + 1)


def _groups(files: list[FileRecord]) -> list[dict[str, Any]]:
    members: dict[int, list[FileRecord]] = defaultdict(list)
    for f in files:
        members[f.group].append(f)
    out = []
    for gid, fs in members.items():
        if len(fs) < 2:
            continue
        labels = Counter(f.label for f in fs if f.label)
        by_sha: dict[str, set[str]] = defaultdict(set)
        for f in fs:
            if f.label:
                by_sha[f.sha256].add(f.label)
        out.append({
            "group": gid, "files": len(fs), "contents": len({f.sha256 for f in fs}),
            "splits": dict(sorted(Counter(f.split for f in fs).items(),
                                  key=lambda kv: (split_rank(kv[0]), kv[0]))),
            "labels": dict(sorted(labels.items())),
            "conflict": len(labels) > 1,
            # the same bytes under two labels: certainly a labelling error, not a judgement call
            "exact_conflict": any(len(v) > 1 for v in by_sha.values()),
            "paths": sorted(f.path for f in fs),
        })
    out.sort(key=lambda g: (-g["files"], g["group"]))
    return out


def _leaks(files: list[FileRecord]) -> list[dict[str, Any]]:
    """Per split pair (earlier, later): files of the later split with a copy in the earlier one.

    "exact" = the same bytes are in the earlier split; "near" = only a near copy is.
    """
    splits = sorted({f.split for f in files if f.split}, key=lambda s: (split_rank(s), s))
    shas: dict[str, set[str]] = defaultdict(set)
    groups: dict[str, set[int]] = defaultdict(set)
    for f in files:
        if f.sha256:
            shas[f.split].add(f.sha256)
        groups[f.split].add(f.group)
    out = []
    for i, earlier in enumerate(splits):
        for later in splits[i + 1:]:
            in_later = [f for f in files if f.split == later]
            exact = sum(1 for f in in_later if f.sha256 and f.sha256 in shas[earlier])
            either = sum(1 for f in in_later if f.group in groups[earlier])
            out.append({"earlier": earlier, "later": later, "later_files": len(in_later),
                        "exact": exact, "near": either - exact, "leaked": either,
                        "share": round(either / len(in_later), 4) if in_later else 0.0,
                        "groups": len(groups[later] & groups[earlier])})
    return out


# ---------------------------------------------------------------------------- shortcuts

def _feature_values(f: FileRecord) -> dict[str, str]:
    return {"size": f"{f.width}x{f.height}", "colour": "colour" if f.colour else "grey",
            "format": f.format or "unknown", "bit_depth": str(f.bit_depth or "?")}


def shortcut_check(files: Iterable[FileRecord]) -> list[dict[str, Any]]:
    """Does one property alone predict the class? Per feature: counts per class, the ROC-AUC of
    the best one-feature classifier (the class share of each value, rare values pooled), and
    warnings: AUC > 0.8, or a common value that occurs in one class only (every colour image
    'fractured': a model learns that colour means fracture).
    """
    from sklearn.metrics import roc_auc_score

    rows = [f for f in files if f.label and not f.error]
    classes = sorted({f.label for f in rows})
    if len(classes) < 2:
        return []
    out = []
    labels = np.array([f.label for f in rows])
    for name in ("size", "colour", "format", "bit_depth"):
        values = [_feature_values(f)[name] for f in rows]
        counts = Counter(values)
        pooled = np.array([v if counts[v] >= RARE else "other" for v in values])
        per_class = {c: dict(Counter(v for v, l in zip(values, labels) if l == c).most_common(8))
                     for c in classes}
        auc = 0.5
        for c in classes:  # one class against the rest; for two classes both give the same
            y = labels == c
            share = {v: float(y[pooled == v].mean()) for v in set(pooled)}
            score = np.array([share[v] for v in pooled])
            if 0 < y.sum() < len(y):
                auc = max(auc, float(roc_auc_score(y, score)))
        warnings = []
        if auc > AUC_WARN:
            warnings.append(f"{name} alone predicts the class (one-feature ROC-AUC {auc:.2f})")
        min_n = max(PURE_MIN, int(0.005 * len(rows)))
        for v, n in Counter(pooled.tolist()).most_common():
            if v == "other" or n < min_n:
                continue
            in_class = Counter(labels[pooled == v].tolist())
            c, k = in_class.most_common(1)[0]
            overall = float((labels == c).mean())
            if k / n >= PURE_SHARE and overall < PURE_SHARE:
                warnings.append(f"{name}={v}: {k} of {n} files are '{c}' "
                                f"(vs {overall:.0%} overall)")
        out.append({"feature": name, "auc": round(auc, 3), "per_class": per_class,
                    "warnings": warnings})
    return out


# ---------------------------------------------------------------------------- reporting

def _n(count: int, word: str, plural: str | None = None) -> str:
    """'1 group', '2 groups'."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


def format_summary(audit: Audit, *, max_lines: int = 5, max_unreadable: int = 20) -> str:
    """The text `fxscore audit` prints: readable in ten seconds, details in --out files.

    Unreadable files are listed one per line up to `max_unreadable`, then "... and N more".
    """
    s = audit.stats
    lines = [f"{audit.root}: {_n(s['files'], 'file')}, {_n(s['contents'], 'distinct content')}, "
             f"{_n(s['groups'], 'distinct image')} after near-duplicate grouping "
             f"({audit.layout} layout; classes: {', '.join(audit.classes) or 'none'})"]
    dup = s["files_in_duplicate_groups"]
    exact = s["exact_duplicate_files"]
    lines.append(f"duplicates: {_n(dup, 'file')} ({dup / max(1, s['files']):.0%}) "
                 f"{'is' if dup == 1 else 'are'} in {_n(s['duplicate_groups'], 'group')} of "
                 f"copies; {_n(exact, 'file')} {'is' if exact == 1 else 'are'} byte-identical "
                 "to another")
    if audit.leaks:
        lines.append("leaks (files of the later split with a copy in the earlier one):")
        for lk in audit.leaks:
            lines.append(f"  {lk['earlier']:>5} -> {lk['later']:<5} {lk['leaked']:>5} of "
                         f"{lk['later_files']} ({lk['share']:.0%}): {lk['exact']} exact, "
                         f"{lk['near']} near only")
        n = len(audit.leaked_groups)
        lines.append(f"  {_n(n, 'group')} {'spans' if n == 1 else 'span'} more than one split")
    if audit.conflicts:
        exact = sum(1 for g in audit.conflicts if g["exact_conflict"])
        n = len(audit.conflicts)
        lines.append(f"label conflicts: {_n(n, 'group')} {'carries' if n == 1 else 'carry'} "
                     f"more than one label ({exact} of {'it' if n == 1 else 'them'} the very "
                     "same bytes)")
        for g in audit.conflicts[:max_lines]:
            labels = ", ".join(f"{k} {v}" for k, v in g["labels"].items())
            lines.append(f"  group {g['group']} ({labels}): {', '.join(g['paths'][:3])}"
                         + (" ..." if len(g["paths"]) > 3 else ""))
    warnings = audit.warnings
    if audit.shortcuts:
        lines.append("one-feature ROC-AUC (0.5 = no shortcut): " + ", ".join(
            f"{c['feature']} {c['auc']:.2f}" for c in audit.shortcuts))
    if warnings:
        lines.append(f"shortcuts ({_n(len(warnings), 'warning')}):")
        lines += [f"  {w}" for w in warnings[:max_lines]]
        if len(warnings) > max_lines:
            lines.append(f"  ... and {len(warnings) - max_lines} more in audit.json")
    elif audit.classes:
        lines.append("shortcuts: none found (size, colour, format, bit depth)")
    if audit.unreadable:
        bad = audit.unreadable
        lines.append(f"unreadable: {_n(len(bad), 'file')}")
        lines += [f"  {f.error}" for f in bad[:max_unreadable]]
        if len(bad) > max_unreadable:
            lines.append(f"  ... and {len(bad) - max_unreadable} more (every file, with its "
                         "error, is in files.csv: --out DIR)")
    lines.append(f"time: {s['seconds']['total']}s")
    return "\n".join(lines)


FILE_COLUMNS = ("path", "split", "label", "sha256", "bytes", "group", "group_files",
                "exact_copies", "copy_in_earlier_split", "label_conflict", "format", "width",
                "height", "mode", "colour", "bit_depth", "error")


def write_report(audit: Audit, out: str | os.PathLike) -> list[Path]:
    """audit.json (everything but per-file rows), groups.csv, files.csv, and fingerprints.npz
    (thumbnails and pair verdicts, for `fxscore split --audit`) -> the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "audit.json", out / "groups.csv", out / "files.csv"]
    written[0].write_text(json.dumps(audit.to_dict(), indent=2) + "\n")
    # CSV cells through fxscore.csvsafe: formulas in file names neutralised, undecodable bytes
    # as \xHH, numbers left as numbers; read them back with csvsafe.read_rows
    with open(written[1], "w", newline="", encoding="utf-8") as fh:
        csvsafe.write_row(fh, ["group", "files", "contents", "splits", "labels", "conflict",
                               "paths"])
        for g in audit.groups:
            csvsafe.write_row(fh, [g["group"], g["files"], g["contents"],
                                   ";".join(f"{k}:{v}" for k, v in g["splits"].items()),
                                   ";".join(f"{k}:{v}" for k, v in g["labels"].items()),
                                   int(g["conflict"]), ";".join(g["paths"])])
    size = Counter(f.group for f in audit.files)
    copies = Counter(f.sha256 for f in audit.files if f.sha256)
    conflicted = {g["group"] for g in audit.conflicts}
    first_split: dict[int, int] = {}
    for f in audit.files:
        first_split[f.group] = min(first_split.get(f.group, 99), split_rank(f.split))
    earlier_sha: dict[str, int] = {}
    for f in audit.files:
        if f.sha256:
            earlier_sha[f.sha256] = min(earlier_sha.get(f.sha256, 99), split_rank(f.split))
    with open(written[2], "w", newline="", encoding="utf-8") as fh:
        csvsafe.write_row(fh, FILE_COLUMNS)
        for f in audit.files:
            rank = split_rank(f.split)
            if f.split and f.sha256 and earlier_sha[f.sha256] < rank:
                leak = "exact"
            elif f.split and first_split[f.group] < rank:
                leak = "near"
            else:
                leak = ""
            row = {k: getattr(f, k) for k in FILE_COLUMNS if hasattr(f, k)}
            row.update(group_files=size[f.group], exact_copies=copies.get(f.sha256, 1) - 1,
                       copy_in_earlier_split=leak, label_conflict=int(f.group in conflicted),
                       colour=int(f.colour))
            csvsafe.write_row(fh, [row.get(k) for k in FILE_COLUMNS])
    written.append(grouping.save_fingerprints(out / grouping.FINGERPRINTS, audit.thumbs,
                                              audit.verdicts, audit.described))
    return written
