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
- the same bytes filed under two labels: at least one label is wrong, and we cannot tell
  which; training on both teaches noise, testing on either scores a guess;
- near-copy groups whose members carry different labels, only with drop_conflicts: by default
  such a group stays whole, in one split, with each file under its own label, and is reported
  (`SplitPlan.conflicts`): a grouping can be wrong, and a whole group of dozens of files must
  not vanish without a word;
- byte-identical copies inside a group, unless keep_duplicates: an exact copy adds no
  information, only weight (train) or repeated votes (val/test, which then overstate how many
  independent images the number rests on). One copy per distinct content is kept. Near copies
  (rotated, re-encoded, ...) are kept: within one split they do no harm to the estimate that a
  cross-split copy would, and in train they act as augmentation.

A split that leaves a class with under half its share of a split warns (`SplitPlan.warnings`).

The groups are the audit's (`fxscore.grouping`): a function of the set of contents, so the audit
of the written tree, which holds the same contents, finds the same groups. An audit written with
`--out` can be reused (`audit_from_report`) instead of reading every image again.

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
from . import grouping
from .audit import Audit, FileRecord, Progress, InlinePool, default_workers, split_rank

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
    drop_conflicts: bool = False  # leave out near-copy groups whose labels disagree

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
    # near-copy groups whose members carry different labels: group, labels, split (or
    # "excluded" with drop_conflicts), paths
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    joined: list[list[int]] = field(default_factory=list)  # audit groups the leak check joined
    warnings: list[str] = field(default_factory=list)  # classes left under half a share


def plan_split(audit: Audit, config: SplitConfig, *, workers: int | None = None,
               progress: Progress | None = None) -> SplitPlan:
    """Decide where every file goes (or why it does not), deterministically for a seed.

    Then check the plan the way `fxscore audit` will check the written tree: group the tree's
    contents as that audit will (`fxscore.grouping`, with the audit's verdicts, so only pairs
    never verified are). With the same contents the groups are the audit's; when contents
    leave (a label conflict of the same bytes, --drop-conflicts) others may find new
    neighbours, and groups that then join across splits are merged (`SplitPlan.joined`) and
    the split planned again, until the written tree will audit clean.
    """
    excluded: list[dict[str, Any]] = []
    labels_of: dict[str, set[str]] = defaultdict(set)  # sha256 -> the labels its files carry
    for f in audit.files:
        if not f.error and f.label:
            labels_of[f.sha256].add(f.label)
    members: dict[int, list[FileRecord]] = defaultdict(list)
    for f in audit.files:
        if f.error:
            excluded.append(_excluded(f, f"unreadable: {f.error}"))
        elif len(labels_of[f.sha256]) > 1:
            counts = Counter(g.label for g in audit.files if g.sha256 == f.sha256)
            excluded.append(_excluded(f, "label conflict: the same bytes are filed as "
                                         + _labels(counts)))
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
    # what each class would have with no conflict set aside: the base of its shares
    readable = [f for f in audit.files if not f.error]
    wanted = Counter(f.label for f in readable) if config.keep_duplicates else Counter(
        label for _, label in {(f.sha256, f.label) for f in readable})
    conflicts: list[dict[str, Any]] = []
    if config.drop_conflicts:
        _drop_conflicts(members, excluded, conflicts)

    joined: list[list[int]] = []
    with _LeakCheck(audit, workers, progress) as checker:
        while True:
            placements = _assign(members, config)
            links = checker.links(placements)
            if not links:
                break
            joined += _merge(members, links)
            if config.drop_conflicts:
                _drop_conflicts(members, excluded, conflicts)
    if not placements:
        raise SplitError(f"{audit.root}: every image was left out (label conflicts); see "
                         "excluded.csv, or split without --drop-conflicts")
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for p in placements:
        counts[p.split][p.label] = counts[p.split].get(p.label, 0) + 1
    split_of = {p.group: p.split for p in placements}
    for gid in sorted(members):
        labels = Counter(f.label for f in members[gid])
        if len(labels) > 1:
            conflicts.append({"group": gid, "labels": dict(sorted(labels.items())),
                              "split": split_of[gid],
                              "paths": sorted(f.path for f in members[gid])})
    conflicts.sort(key=lambda c: c["group"])
    excluded.sort(key=lambda e: e["source"])
    return SplitPlan(config, placements, excluded, counts, conflicts, joined,
                     _share_warnings(counts, wanted, config))


def _drop_conflicts(members: dict[int, list[FileRecord]], excluded: list[dict[str, Any]],
                    conflicts: list[dict[str, Any]]) -> None:
    """--drop-conflicts: near-copy groups whose members carry different labels leave."""
    for gid in [g for g, fs in members.items() if len({f.label for f in fs}) > 1]:
        fs = members.pop(gid)
        labels = Counter(f.label for f in fs)
        conflicts.append({"group": gid, "labels": dict(sorted(labels.items())),
                          "split": "excluded", "paths": sorted(f.path for f in fs)})
        excluded.extend(_excluded(f, f"label conflict in group {gid} (--drop-conflicts): "
                                     + _labels(labels)) for f in fs)


def _share_warnings(counts: dict[str, dict[str, int]], wanted: Counter,
                    config: SplitConfig) -> list[str]:
    """A class with under half of its share in a split: the split's numbers for that class
    rest on too few images, or the class was mostly left out (conflicts)."""
    share = {"train": 1 - config.val - config.test, "val": config.val, "test": config.test}
    out = []
    for label in sorted(wanted):
        for s in SPLITS:
            expected = share[s] * wanted[label]
            have = counts[s].get(label, 0)
            if expected >= 1 and have < 0.5 * expected:
                name = f"'{label}'" if label else "unlabelled"
                out.append(f"{s} holds {have} {name} file{'s' if have != 1 else ''}, under "
                           f"half its share ({share[s]:.0%} of {wanted[label]})")
    return out


REPORT_FILES = ("audit.json", "files.csv", grouping.FINGERPRINTS)


def audit_from_report(report: str | os.PathLike, data: str | os.PathLike, *,
                      workers: int | None = None, labels: bool = True) -> Audit:
    """The audit `fxscore audit DATA --out REPORT` wrote (audit.json, files.csv,
    fingerprints.npz), for `plan_split`, checked against DATA: the same image files, each
    hashed again to the same sha256 (seconds, where reading every image took minutes).
    SplitError names what differs and the fix."""
    from .audit import AuditError, discover

    report, data = Path(report), Path(data)
    again = f"run `fxscore audit {data} --out {report}` again, or split without --audit"
    missing = [name for name in REPORT_FILES if not (report / name).is_file()]
    if missing:
        raise SplitError(f"{report}: no {', '.join(missing)} here; {again}")
    try:
        doc = json.loads((report / "audit.json").read_text(encoding="utf-8"))
        with open(report / "files.csv", newline="", encoding="utf-8") as fh:
            rows = list(csvsafe.read_dicts(fh))
        thumbs, verdicts, described = grouping.load_fingerprints(report / grouping.FINGERPRINTS)
        files = [FileRecord(path=r["path"], split=r["split"], label=r["label"],
                            sha256=r["sha256"], bytes=int(r["bytes"] or 0), error=r["error"],
                            format=r["format"], width=int(r["width"] or 0),
                            height=int(r["height"] or 0), mode=r["mode"],
                            colour=r["colour"] == "1", bit_depth=int(r["bit_depth"] or 0),
                            group=int(r["group"])) for r in rows]
        layout = doc["layout"]
    except (ValueError, KeyError, TypeError) as e:
        raise SplitError(f"{report}: not an fxscore audit report ({e}); {again}") from None
    try:
        _, now = discover(data, labels=labels)
    except AuditError as e:
        raise SplitError(str(e)) from None
    then = {f.path: f for f in files}
    gone = sorted(set(then) - {f.path for f in now})
    new = sorted({f.path for f in now} - set(then))
    relabelled = sorted(f.path for f in now if f.path in then
                        and (f.split, f.label) != (then[f.path].split, then[f.path].label))
    for what, paths in (("are gone", gone), ("are new", new), ("moved split or class", relabelled)):
        if paths:
            raise SplitError(f"{data}: {len(paths)} files {what} since the audit in {report} "
                             f"(e.g. {paths[0]}); {again}")
    workers = workers or default_workers()
    paths = [str(data / f.path) for f in files]
    with ProcessPoolExecutor(workers) if workers > 1 and len(paths) > 256 else InlinePool() as pool:
        hashes = list(pool.map(_sha_or_none, paths, chunksize=64))
    changed = [f.path for f, h in zip(files, hashes) if f.sha256 and h != f.sha256]
    if changed:
        raise SplitError(f"{data}: {len(changed)} files changed since the audit in {report} "
                         f"(e.g. {changed[0]}); {again}")
    shas = {f.sha256 for f in files if f.sha256 and not f.error}
    if shas - set(thumbs):
        raise SplitError(f"{report}/{grouping.FINGERPRINTS}: thumbnails missing for "
                         f"{len(shas - set(thumbs))} contents; {again}")
    return Audit(root=str(data), layout=layout, splits=doc.get("splits", []),
                 classes=doc.get("classes", []), files=files, groups=doc.get("groups", []),
                 leaks=doc.get("leaks", []), conflicts=doc.get("conflicts", []),
                 shortcuts=doc.get("shortcuts", []), stats=doc.get("stats", {}),
                 thumbs={s: thumbs[s] for s in shas}, verdicts=verdicts,
                 described={s: described[s] for s in shas})


def _sha_or_none(path: str) -> str | None:
    from .hashing import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


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
        # a group of mixed labels (a kept conflict) is balanced as its most common label
        labels = Counter(f.label for f in members[gid])
        by_label[min(labels, key=lambda k: (-labels[k], k))].append(gid)
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


def _merge(members: dict[int, list[FileRecord]], links: list[tuple[int, int]]) -> list[list[int]]:
    """Join linked groups (under the smaller id) -> the sets of groups joined."""
    parent = {g: g for g in members}

    def find(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    joined: dict[int, list[int]] = defaultdict(list)
    for gid in sorted(members):
        joined[find(gid)].append(gid)
    for root, gids in joined.items():
        for gid in gids[1:]:
            members[root].extend(members.pop(gid))
    return [gids for gids in joined.values() if len(gids) > 1]


class _LeakCheck:
    """Groups, for a planned split, the contents of the tree it will write, exactly as
    `fxscore audit` of that tree will (`fxscore.grouping`: same contents, same groups), and
    returns the planned groups that would end up joined across two splits. Verdicts are the
    audit's and are kept, so planning again only verifies new pairs."""

    def __init__(self, audit: Audit, workers: int | None, progress: Progress | None) -> None:
        self.thumbs = audit.thumbs
        # the aspect ratio the audit grouped with: that of the decoded image
        self.aspect = {f.sha256: f.height / max(1, f.width) for f in audit.files
                       if f.sha256 in audit.thumbs}
        self.verdicts = audit.verdicts
        self.described = audit.described
        self.workers = workers or default_workers()
        self.progress = progress
        self.pool = None

    def __enter__(self) -> "_LeakCheck":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def links(self, placements: list[Placement]) -> list[tuple[int, int]]:
        group_of: dict[str, int] = {}
        split_of: dict[str, str] = {}
        for p in placements:
            group_of.setdefault(p.sha256, p.group)
            split_of.setdefault(p.sha256, p.split)
        keys = sorted(group_of)
        if not keys:
            return []
        if self.pool is None and self.workers > 1 and len(keys) >= 256:  # worth starting
            self.pool = ProcessPoolExecutor(self.workers)
        near = grouping.near_duplicate_groups(
            np.stack([self.thumbs[k] for k in keys]), [self.aspect[k] for k in keys],
            keys=keys, verdicts=self.verdicts, described=self.described, executor=self.pool,
            progress=(lambda stage, done, total: self.progress("leak check", done, total))
            if self.progress else None)
        tree_groups: dict[int, set[str]] = defaultdict(set)
        for k, label in zip(keys, near.labels.tolist()):
            tree_groups[label].add(k)
        links = []
        for contents in tree_groups.values():
            if len({split_of[k] for k in contents}) > 1:  # would be a leak in the tree
                gids = sorted({group_of[k] for k in contents})
                links += [(gids[0], g) for g in gids[1:]]
        return links


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
        "conflicts": plan.conflicts, "joined_by_leak_check": plan.joined,
        "warnings": plan.warnings,
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
