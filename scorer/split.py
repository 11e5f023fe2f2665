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

import csv
import itertools
import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .audit import Audit, FileRecord, split_rank

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


def plan_split(audit: Audit, config: SplitConfig) -> SplitPlan:
    """Decide where every file goes (or why it does not), deterministically for a seed."""
    excluded: list[dict[str, Any]] = []
    conflicted = {g["group"]: g["labels"] for g in audit.conflicts}
    members: dict[int, list[FileRecord]] = defaultdict(list)
    for f in audit.files:
        if f.error:
            excluded.append(_excluded(f, f"unreadable: {f.error}"))
        elif f.group in conflicted:
            labels = ", ".join(f"{k} ({v})" for k, v in conflicted[f.group].items())
            excluded.append(_excluded(f, f"label conflict in group {f.group}: {labels}"))
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
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for p in placements:
        counts[p.split][p.label] = counts[p.split].get(p.label, 0) + 1
    excluded.sort(key=lambda e: e["source"])
    return SplitPlan(config, placements, excluded, counts)


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
        candidates = itertools.chain([name, f"{stem}__{p.sha256[:8]}{suffix}"],
                                     (f"{stem}__{p.sha256[:8]}_{k}{suffix}" for k in itertools.count(2)))
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
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(MANIFEST_COLUMNS)
        for p in sorted(plan.placed, key=lambda p: p.path):
            w.writerow([p.path, p.split, p.label, p.group, p.sha256, p.source])
    with open(out / "excluded.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ("source", "reason", "group", "sha256"))
        w.writeheader()
        w.writerows(plan.excluded)
    from . import __version__

    summary = {
        "data": str(data), "config": asdict(plan.config), "fxscore": __version__,
        "files": len(plan.placed), "groups": len({p.group for p in plan.placed}),
        "counts": plan.counts, "excluded": dict(Counter(e["reason"].split(":")[0].split(" of ")[0]
                                                      for e in plan.excluded)),
        "hard_linked": how["link"], "copied": how["copy"],
    }
    (out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "link"
    except OSError:  # another file system, no permission to link, FAT, ...
        shutil.copy2(src, dst)
        return "copy"
