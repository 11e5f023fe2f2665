"""A leak-free split: every group of copies lands in one split, each class in proportion.

    audit = run_audit("./data")
    plan = plan_split(audit, SplitConfig(val=0.1, test=0.2, seed=0))
    write_split(plan, "./data", "./clean")   # clean/{train,val,test}/<class>/<file>

All input splits are pooled: the old split is what leaked. Groups (exact and near copies, from
the audit) are the units; per class they are shuffled with the seed, placed largest first into
whichever split is furthest below its share of that class, so the proportions hold per class
even when some groups are large.

What is left out, and why (listed in excluded.csv):
- unreadable files: nothing can be learned from them;
- groups whose copies carry different labels: at least one label is wrong, and we cannot tell
  which; training on both teaches noise, testing on either scores a guess;
- byte-identical copies inside a group, unless keep_duplicates: an exact copy adds no
  information, only weight (train) or repeated votes (val/test, which then overstate how many
  independent images the number rests on). One copy per distinct content is kept. Near copies
  (rotated, re-encoded, ...) are kept: within one split they do no harm to the estimate that a
  cross-split copy would, and in train they act as augmentation.

Files are hard-linked (no extra disk), copied where linking fails (another file system).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import csvsafe
from . import fingerprint as fp
from .audit import Audit, FileRecord, Progress, default_workers, split_rank

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "split", "class", "group", "sha256", "source")


class SplitError(ValueError):
    """The split cannot be made as asked; the message says why and what to change."""


@dataclass(frozen=True)
class SplitConfig:
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    keep_duplicates: bool = False

    def __post_init__(self) -> None:
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise SplitError(f"--val {self.val} and --test {self.test} must be fractions in "
                             "[0, 1) that leave something for train (val + test < 1)")


@dataclass
class Placement:
    source: str  # relative to the data root
    split: str
    label: str
    group: int
    sha256: str
    path: str = ""  # relative to the output folder, set by plan_split


@dataclass
class SplitPlan:
    config: SplitConfig
    placed: list[Placement]
    excluded: list[dict[str, Any]]  # source, reason, group, sha256
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> files


def plan_split(audit: Audit, config: SplitConfig, *, workers: int | None = None,
               progress: Progress | None = None) -> SplitPlan:
    """Decide where every file goes (or why it does not), deterministically for a seed.

    Then check the plan the way `fxscore audit` will check the written tree: the audit of the
    whole data set found copies among each image's closest images in the whole set; in the
    smaller split tree the closest ones differ, and a copy the first grouping missed would
    surface as a leak. Groups joined by such a pair are merged and the split is planned again,
    until no pair across splits verifies.
    """
    excluded: list[dict[str, Any]] = []
    conflicted = {g["group"]: g["labels"] for g in audit.conflicts}
    members: dict[int, list[FileRecord]] = defaultdict(list)
    for f in audit.files:
        if f.error:
            excluded.append(_excluded(f, f"unreadable: {f.error}"))
        elif f.group in conflicted:
            excluded.append(_excluded(f, f"label conflict in group {f.group}: "
                                         + _labels(conflicted[f.group])))
        else:
            members[f.group].append(f)
    if not members:
        raise SplitError(f"{audit.root}: no readable image without a label conflict to split")
    for gid, fs in members.items():
        fs.sort(key=lambda f: (split_rank(f.split), f.path))  # the copy kept: earliest split
        if not config.keep_duplicates:
            kept: dict[str, str] = {}
            for f in fs:
                if f.sha256 in kept:
                    excluded.append(_excluded(f, f"exact copy of {kept[f.sha256]}"))
                else:
                    kept[f.sha256] = f.path
            members[gid] = [f for f in fs if kept[f.sha256] == f.path]

    checker = _LeakCheck(audit, workers, progress)
    with checker:
        while True:
            placements = _assign(members, config)
            links = checker.links(placements)
            if not links:
                break
            _merge(members, links, excluded)
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for p in placements:
        counts[p.split][p.label] = counts[p.split].get(p.label, 0) + 1
    excluded.sort(key=lambda e: e["source"])
    return SplitPlan(config, placements, excluded, counts)


def _labels(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))


def _assign(members: dict[int, list[FileRecord]], config: SplitConfig) -> list[Placement]:
    """Per class: groups shuffled by the seed, largest first, each into the split furthest
    below its share of that class's files."""
    rng = np.random.default_rng(config.seed)
    share = {"train": 1 - config.val - config.test, "val": config.val, "test": config.test}
    split_of: dict[int, str] = {}
    by_label: dict[str, list[int]] = defaultdict(list)
    for gid in sorted(members):
        by_label[members[gid][0].label].append(gid)
    for label in sorted(by_label):
        gids = [by_label[label][k] for k in rng.permutation(len(by_label[label]))]
        gids.sort(key=lambda g: -len(members[g]))  # stable: ties keep the shuffled order
        total = sum(len(members[g]) for g in gids)
        placed = dict.fromkeys(SPLITS, 0)
        for g in gids:
            # furthest below its target; a split with share 0 never is
            target = max(SPLITS, key=lambda s: (share[s] * total - placed[s], -SPLITS.index(s))
                         if share[s] > 0 else (-np.inf, 0))
            split_of[g] = target
            placed[target] += len(members[g])
    placements = [Placement(f.path, split_of[gid], f.label, gid, f.sha256)
                  for gid in sorted(members) for f in members[gid]]
    _name(placements)
    return placements


def _merge(members: dict[int, list[FileRecord]], links: list[tuple[int, int]],
           excluded: list[dict[str, Any]]) -> None:
    """Join linked groups (under the smaller id); a joined group with two labels is a
    conflict and leaves the split."""
    parent = {g: g for g in members}

    def find(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for gid in sorted(members):
        root = find(gid)
        if root != gid:
            members[root].extend(members.pop(gid))
    for gid in [g for g, fs in members.items() if len({f.label for f in fs}) > 1]:
        fs = members.pop(gid)
        labels = _labels(Counter(f.label for f in fs))
        excluded.extend(_excluded(f, f"label conflict in group {gid} (joined by the split's "
                                     f"leak check): {labels}") for f in fs)


class _LeakCheck:
    """Verifies, for a planned split, the candidate pairs across splits that `fxscore audit`
    of the written tree will verify: the same contents in the same order give the same
    descriptors and candidates, so a pair that fails here fails there. Remembers every score,
    so planning again only verifies new pairs."""

    def __init__(self, audit: Audit, workers: int | None, progress: Progress | None) -> None:
        self.thumbs = audit.thumbs
        self.aspect = {f.sha256: f.height / f.width for f in audit.files
                       if f.sha256 in audit.thumbs and f.width}
        self.desc: dict[str, np.ndarray] = {}
        self.scores: dict[tuple[str, str], float] = {}
        self.workers = workers or default_workers()
        self.progress = progress
        self.pool = None

    def __enter__(self) -> "_LeakCheck":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def links(self, placements: list[Placement]) -> list[tuple[int, int]]:
        # contents in the order the audit of the written tree will meet them (sorted paths),
        # so that each pair is verified the same way round as that audit will
        group_of, split_of, order = {}, {}, []
        for p in sorted(placements, key=lambda p: p.path):
            if p.sha256 not in group_of:
                order.append(p.sha256)
                group_of[p.sha256], split_of[p.sha256] = p.group, SPLITS.index(p.split)
        for sha in order:
            if sha not in self.desc:
                self.desc[sha] = fp.descriptors(self.thumbs[sha])
        desc = np.stack([self.desc[s] for s in order])
        # exactly the pairs that audit will consider, of those the ones across splits
        pairs = fp.candidate_pairs(desc)
        part = np.array([split_of[s] for s in order])
        pairs = pairs[part[pairs["i"]] != part[pairs["j"]]]
        key = [(order[i], order[j]) for i, j in zip(pairs["i"].tolist(), pairs["j"].tolist())]
        todo = [k for k, pair in enumerate(key) if pair not in self.scores]
        if self.pool is None and self.workers > 1 and len(todo) >= 64:  # worth starting
            self.pool = ProcessPoolExecutor(self.workers)
        for start in range(0, len(todo), 512):
            chosen = pairs[todo[start:start + 512]]
            idx = np.unique(np.concatenate([chosen["i"], chosen["j"]]))
            local = {int(g): k for k, g in enumerate(idx)}
            batch = chosen.copy()
            batch["i"] = [local[int(i)] for i in chosen["i"]]
            batch["j"] = [local[int(j)] for j in chosen["j"]]
            scores = fp.verify_pairs(np.stack([self.thumbs[order[g]] for g in idx]),
                                     np.array([self.aspect[order[g]] for g in idx]),
                                     desc[idx], batch, self.pool)
            for k, score in zip(todo[start:start + 512], scores.tolist()):
                self.scores[key[k]] = score
            if self.progress:
                self.progress("leak check", min(start + 512, len(todo)), len(todo))
        return [(group_of[a], group_of[b]) for a, b in key if self.scores[a, b] >= fp.MATCH_SCORE]


def _excluded(f: FileRecord, reason: str) -> dict[str, Any]:
    return {"source": f.path, "reason": reason, "group": f.group, "sha256": f.sha256}


def _name(placements: list[Placement]) -> None:
    """split/class/file name; a name already taken in that folder (two source folders, one
    class) gets the content's hash prefix, then a counter. Case-insensitive, so the folder
    also works on macOS and Windows."""
    taken: set[str] = set()
    for p in sorted(placements, key=lambda p: p.source):
        folder = "/".join(x for x in (p.split, p.label) if x)
        name = p.source.rsplit("/", 1)[-1]
        stem, dot, suffix = name.rpartition(".")
        if not dot or not stem:
            stem, suffix = name, ""
        suffix = "." + suffix if suffix else ""
        tagged = f"{stem}__{p.sha256[:8]}"
        candidates = itertools.chain([name, tagged + suffix],
                                     (f"{tagged}_{k}{suffix}" for k in itertools.count(2)))
        for candidate in candidates:
            path = f"{folder}/{candidate}"
            if path.lower() not in taken:
                taken.add(path.lower())
                p.path = path
                break


def write_split(plan: SplitPlan, data: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Lay the plan out under out/ (which must be new or empty) -> summary written to split.json.

    Writes out/{train,val,test}/<class>/<file>, out/manifest.csv (path, split, class, group,
    sha256, source), out/excluded.csv and out/split.json (settings, counts, where from).
    """
    data, out = Path(data).resolve(), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SplitError(f"{out}: exists and is not an empty folder; give a new folder for the "
                         "split (nothing is overwritten)")
    if out.resolve() == data or data in out.resolve().parents:
        raise SplitError(f"{out}: is inside the data folder {data}; put the split elsewhere, or "
                         "auditing the data again would count it as more copies")
    out.mkdir(parents=True, exist_ok=True)
    how = Counter()
    for p in plan.placed:
        dst = out / p.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        how[_link_or_copy(data / p.source, dst)] += 1
    # through fxscore.csvsafe like every CSV fxscore writes; `read_manifest` undoes it
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        csvsafe.write_rows(fh, MANIFEST_COLUMNS,
                           ([p.path, p.split, p.label, p.group, p.sha256, p.source]
                            for p in sorted(plan.placed, key=lambda p: p.path)))
    excluded_columns = ("source", "reason", "group", "sha256")
    with open(out / "excluded.csv", "w", newline="", encoding="utf-8") as fh:
        csvsafe.write_rows(fh, excluded_columns,
                           ([e.get(k) for k in excluded_columns] for e in plan.excluded))
    from . import __version__

    summary = {
        "data": str(data), "config": asdict(plan.config), "fxscore": __version__,
        "files": len(plan.placed), "groups": len({p.group for p in plan.placed}),
        "counts": plan.counts, "excluded": dict(Counter(_kind(e["reason"]) for e in plan.excluded)),
        "hard_linked": how["link"], "copied": how["copy"],
    }
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a split's manifest.csv (or excluded.csv), cells as they were before writing.

    Paths come back exactly (csvsafe undoes formula neutralising and \\xHH escapes), so they
    name the laid-out files and match `fxscore eval`'s predictions.csv.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csvsafe.read_dicts(fh))


def _kind(reason: str) -> str:
    for kind in ("unreadable", "label conflict", "exact copy"):
        if reason.startswith(kind):
            return kind
    return reason


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "link"
    except OSError:  # another file system, no permission to link, FAT, ...
        shutil.copy2(src, dst)
        return "copy"
