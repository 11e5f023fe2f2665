"""Groups of near copies: the one grouping `fxscore audit` reports and `fxscore split` keeps.

    near = near_duplicate_groups(thumbs, aspects, keys=sha256s)

Pairs come from `fingerprint.candidate_pairs` (each image's closest others by descriptor) and
are verified by `fingerprint.match`, most similar first. Two rules keep look-alikes apart:

- a verified pair is a copy only when confirmed pixel by pixel (`fingerprint.Match.same`);
- no chaining through single weak links: a pair confirmed with a residual above
  STRONG_RESIDUAL joins an image to a group of two or more only when the image is also a copy
  of another member (the most similar one by descriptor, or the next), and two groups only
  when a second pair across them agrees. A chain of look-alikes (A like B, B like C, A unlike
  C) therefore stays apart. A strong pair joins at once: no look-alike has come near such a
  residual (phantoms of one shape >= 0.06, other films of one wrist >= 0.07), and copies of
  one film edited in opposite directions (turned +20 and -20 degrees) are often not
  verifiable against each other, only against the original.

The result depends only on the set of contents, not on their order or their names: contents
are processed in order of their keys (sha256), so the audit of a split tree, which holds the
same contents under other paths, finds the same groups. Verdicts are kept per pair of keys
(`Verdicts`), so a split, or a second audit of the same contents, verifies nothing twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import fingerprint as fp

MAX_TRIES = 3  # verified pairs between two groups before they are taken to be distinct
STRONG_RESIDUAL = 0.025  # a confirmed pair this close joins without a witness
WITNESSES = 2  # other members a newcomer is compared with before it is refused
MAX_DEFERRALS = 3  # rounds a link may wait for its witnesses' verdicts

Progress = Callable[[str, int, int], None]
Verdicts = dict  # (key_a, key_b) with key_a < key_b -> (score, residual)


@dataclass
class NearGroups:
    """Result of `near_duplicate_groups` over N thumbnails (indices in the caller's order)."""

    labels: np.ndarray  # (N,) group id = smallest member index
    links: list[tuple[int, int, float, float]]  # joins made: (i, j, score, residual)
    checked: int  # pairs verified here (not found in the verdicts given)
    refused: list[tuple[int, int]] = field(default_factory=list)  # copies whose groups'
    #                                         other members disagreed: kept apart


def near_duplicate_groups(thumbs: np.ndarray, aspects: Sequence[float] | None = None, *,
                          keys: Sequence[str] | None = None, verdicts: Verdicts | None = None,
                          described: dict | None = None, executor=None,
                          progress: Progress | None = None, chunk: int = 256) -> NearGroups:
    """Group (N, THUMB, THUMB) thumbnails into groups of near copies.

    keys: one id per thumbnail (the content's sha256); they fix the processing order and
    name the pairs in `verdicts`, which is read and extended in place. Without keys the
    order given is used. `described` (key -> (descriptors, turned queries)) is read and
    extended the same way. Candidates are verified most similar first; a pair already joined
    is skipped, which keeps verification near-linear in a heavily duplicated set. Each round
    verifies up to `chunk` pairs, in parallel when an `executor` is given.
    """
    n = len(thumbs)
    aspects = np.ones(n) if aspects is None else np.asarray(aspects, np.float64)
    keys = [f"{k:09d}" for k in range(n)] if keys is None else [str(k) for k in keys]
    verdicts = {} if verdicts is None else verdicts
    if n == 0:
        return NearGroups(np.zeros(0, int), [], 0)
    # canonical order: the grouping is a function of the contents, not of the caller's order
    perm = np.argsort(np.array(keys), kind="stable")
    thumbs_c = thumbs[perm]
    keys_c = [keys[p] for p in perm]
    described = {} if described is None else described
    for k, t in zip(keys_c, thumbs_c):
        if k not in described:
            described[k] = (fp.descriptors(t), fp.turned_queries(t))
    desc = np.stack([described[k][0] for k in keys_c])
    queries = np.stack([described[k][1] for k in keys_c])
    run = _Grouping(thumbs_c, aspects[perm], desc, keys_c, verdicts, executor)
    run.go(fp.candidate_pairs(desc, queries=queries), chunk, progress)
    # back to the caller's order; group id = smallest member index there
    root = np.array([run.find(k) for k in range(n)])
    labels_c = np.empty(n, int)
    for r in np.unique(root):
        members = np.flatnonzero(root == r)
        labels_c[members] = perm[members].min()
    labels = np.empty(n, int)
    labels[perm] = labels_c
    links = [(int(perm[i]), int(perm[j]), s, r) for i, j, s, r in run.links]
    refused = [(int(perm[i]), int(perm[j])) for i, j in run.refused]
    return NearGroups(labels, links, run.checked, refused)


class _Grouping:
    """Union-find over contents with verdict-checked, witnessed merges."""

    def __init__(self, thumbs, aspects, desc, keys, verdicts, executor) -> None:
        self.thumbs, self.aspects, self.desc, self.keys = thumbs, aspects, desc, keys
        self.verdicts, self.executor = verdicts, executor
        self.parent = np.arange(len(thumbs))
        self.members: dict[int, list[int]] = {k: [k] for k in range(len(thumbs))}
        self.links: list[tuple[int, int, float, float]] = []
        self.refused: list[tuple[int, int]] = []
        self.checked = 0

    # -------------------------------------------------------------- union-find
    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
            self.members[lo].extend(self.members.pop(hi))

    # -------------------------------------------------------------- verdicts
    def key(self, i: int, j: int) -> tuple[str, str]:
        a, b = self.keys[i], self.keys[j]
        return (a, b) if a < b else (b, a)

    def verdict(self, i: int, j: int) -> tuple[float, float] | None:
        return self.verdicts.get(self.key(i, j))

    def is_same(self, i: int, j: int) -> bool | None:
        v = self.verdict(i, j)
        return None if v is None else (v[0] >= fp.MATCH_SCORE and v[1] <= fp.MAX_RESIDUAL)

    def verify(self, pairs: list[tuple[int, int]]) -> None:
        """Verdicts for the pairs that have none yet (in parallel with an executor)."""
        todo = sorted({(min(i, j), max(i, j)) for i, j in pairs if self.verdict(i, j) is None})
        if not todo:
            return
        batch = np.zeros(len(todo), fp.PAIR)
        batch["i"], batch["j"] = zip(*todo)
        out = fp.verify_pairs(self.thumbs, self.aspects, self.desc, batch, self.executor)
        for (i, j), v in zip(todo, out.tolist()):
            self.verdicts[self.key(i, j)] = (float(v[0]), float(v[1]))
        self.checked += len(todo)

    # -------------------------------------------------------------- merging
    def witnesses(self, newcomer: int, member: int) -> list[int]:
        """The other members of member's group most like newcomer (descriptor), best first."""
        others = [m for m in self.members[self.find(member)] if m != member]
        if not others:
            return []
        sims = (self.desc[others] @ self.desc[newcomer, 0]).max(axis=1)
        return [others[k] for k in np.argsort(-sims, kind="stable")[:WITNESSES]]

    def decide(self, i: int, j: int) -> tuple[str, list[tuple[int, int]]]:
        """A verified copy (i, j) whose groups differ: "join", "refuse", or "wait" for the
        witness pairs returned. A strong pair joins; otherwise each side with other members
        must have one witness that is a copy of the other side's image."""
        if self.verdict(i, j)[1] <= STRONG_RESIDUAL:
            return "join", []
        need: list[tuple[int, int]] = []
        for newcomer, member in ((j, i), (i, j)):
            pairs = [(w, newcomer) for w in self.witnesses(newcomer, member)]
            if not pairs:
                continue  # a group of one: the pair itself is the evidence
            known = [self.is_same(w, x) for w, x in pairs]
            if any(known):
                continue
            if all(k is False for k in known):
                return "refuse", []
            need += [p for p, k in zip(pairs, known) if k is None]
        return ("wait", need) if need else ("join", [])

    def go(self, pairs: np.ndarray, chunk: int, progress: Progress | None) -> None:
        tries: dict[tuple[int, int], int] = {}
        waiting: list[tuple[int, int, int]] = []  # (i, j, rounds waited)
        witness_pairs: list[tuple[int, int]] = []
        pos = 0
        while pos < len(pairs) or waiting:
            batch: list[tuple[int, int]] = []
            while pos < len(pairs) and len(batch) < chunk:
                i, j = int(pairs["i"][pos]), int(pairs["j"][pos])
                ri, rj = self.find(i), self.find(j)
                group_pair = (min(ri, rj), max(ri, rj))
                # two groups that failed MAX_TRIES times on their most similar members will
                # not match on less similar ones: a large group of augmented copies would
                # otherwise be compared with its look-alike neighbours member by member
                if ri != rj and tries.get(group_pair, 0) < MAX_TRIES:
                    tries[group_pair] = tries.get(group_pair, 0) + 1
                    batch.append((i, j))
                pos += 1
            self.verify(batch + witness_pairs)
            witness_pairs = []
            # links waiting for witnesses first (they are the more similar pairs), then the
            # new ones, in candidate order: the order, hence the result, is deterministic
            todo = [(i, j, w) for i, j, w in waiting] + [(i, j, 0) for i, j in batch
                                                          if self.is_same(i, j)]
            waiting = []
            for i, j, waited in todo:
                if self.find(i) == self.find(j):
                    continue
                action, need = self.decide(i, j)
                if action == "wait" and waited >= MAX_DEFERRALS:
                    action = "refuse"
                if action == "join":
                    self.union(i, j)
                    score, residual = self.verdict(i, j)
                    self.links.append((i, j, score, residual))
                elif action == "refuse":
                    self.refused.append((i, j))
                else:
                    waiting.append((i, j, waited + 1))
                    witness_pairs += need
            if progress:
                progress("verify", pos, len(pairs))


# ---------------------------------------------------------------------------- saved

FINGERPRINTS = "fingerprints.npz"


def save_fingerprints(path, thumbs: dict[str, np.ndarray], verdicts: Verdicts,
                      described: dict | None = None):
    """What grouping needs to run again without reading an image: thumbnails by sha256,
    every pair verdict and the descriptors (compressed numpy arrays, no pickles) -> path."""
    keys = sorted(thumbs)
    pairs = sorted(verdicts)
    described = {} if described is None else described
    for k in keys:  # the same numbers the grouping used: recomputed, they are bit-identical
        if k not in described:
            described[k] = (fp.descriptors(thumbs[k]), fp.turned_queries(thumbs[k]))
    np.savez_compressed(
        path, sha256=np.array(keys, dtype="U64"),
        thumbs=(np.stack([thumbs[k] for k in keys]) if keys
                else np.zeros((0, fp.THUMB, fp.THUMB), np.uint8)),
        descriptors=np.array([described[k][0] for k in keys], np.float32),
        queries=np.array([described[k][1] for k in keys], np.float32),
        pair_sha256=np.array(pairs, dtype="U64").reshape(-1, 2),
        pair_verdict=np.array([verdicts[p] for p in pairs], np.float32).reshape(-1, 2),
        version=np.array([FORMAT_VERSION]))
    return path


FORMAT_VERSION = 1


def load_fingerprints(path) -> tuple[dict[str, np.ndarray], Verdicts, dict]:
    """`save_fingerprints`' file -> (thumbnails by sha256, verdicts, descriptors by sha256).
    ValueError names the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"][0]) != FORMAT_VERSION:
                raise ValueError(f"{path}: fingerprints format {int(z['version'][0])}, this "
                                 f"fxscore reads {FORMAT_VERSION}; run the audit again")
            keys = z["sha256"].tolist()
            thumbs = dict(zip(keys, z["thumbs"]))
            described = dict(zip(keys, zip(z["descriptors"], z["queries"])))
            verdicts = {tuple(p): (float(v[0]), float(v[1]))
                        for p, v in zip(z["pair_sha256"].tolist(), z["pair_verdict"])}
    except (OSError, KeyError, ValueError, EOFError) as e:
        if isinstance(e, ValueError) and str(e).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: not an fxscore fingerprints file ({e}); run "
                         "`fxscore audit DATA --out DIR` to write one") from None
    return thumbs, verdicts, described
