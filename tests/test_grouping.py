"""fxscore.grouping: confirmed, witnessed merges; the same groups whatever the order."""
from __future__ import annotations

import numpy as np
import pytest

from fxscore import fingerprint as fp
from fxscore import grouping as G
from test_fingerprint import COPIES, from_pil, phantom, texture, to_pil


def scripted(monkeypatch, n: int, copies: set[tuple[int, int]], order: list[tuple[int, int]],
             residual: float = 0.04):
    """n pictures whose candidate pairs (`order`, most similar first) and verdicts are given:
    a pair is a copy iff it is in `copies`, confirmed with `residual` (by default a weak
    confirmation, above STRONG_RESIDUAL). Returns the thumbnails, keys and a call log."""
    thumbs = np.stack([fp.thumbnail(texture(s, size=64)) for s in range(n)])
    keys = [f"k{k}" for k in range(n)]  # sorted as given: canonical order = index order
    calls: list[tuple[int, int]] = []

    def candidates(desc, *args, **kwargs):
        pairs = np.zeros(len(order), fp.PAIR)
        pairs["i"], pairs["j"] = zip(*[(min(p), max(p)) for p in order])
        pairs["sim"] = np.linspace(0.99, 0.9, len(order))
        return pairs

    def verify(thumbs, aspects, desc, batch, executor=None):
        out = np.zeros(len(batch), fp.VERDICT)
        for k, (i, j) in enumerate(zip(batch["i"].tolist(), batch["j"].tolist())):
            calls.append((i, j))
            copy = (i, j) in copies or (j, i) in copies
            out[k] = (0.99, residual) if copy else (0.97, 0.2)  # aligned alike, confirmed or not
        return out

    monkeypatch.setattr(fp, "candidate_pairs", candidates)
    monkeypatch.setattr(fp, "verify_pairs", verify)
    return thumbs, keys, calls


def partition(labels) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for k, g in enumerate(np.asarray(labels).tolist()):
        out.setdefault(g, set()).add(k)
    return {frozenset(s) for s in out.values()}


def test_a_chain_of_look_alikes_is_not_joined_through_single_links(monkeypatch):
    # 0~1, 1~2, 2~3 verify; 0~2 and 1~3 do not: 2 joining {0, 1} needs a second member
    thumbs, keys, _ = scripted(monkeypatch, 4, {(0, 1), (1, 2), (2, 3)},
                               [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)])
    near = G.near_duplicate_groups(thumbs, keys=keys)
    assert partition(near.labels) == {frozenset({0, 1}), frozenset({2, 3})}
    assert (1, 2) in near.refused and len(near.links) == 2


def test_a_strong_confirmation_joins_without_a_witness(monkeypatch):
    # copies of one film edited in opposite directions: 0~1 and 1~2 confirm strongly, 0~2
    # cannot be verified at all; they are one group
    thumbs, keys, _ = scripted(monkeypatch, 3, {(0, 1), (1, 2)}, [(0, 1), (1, 2), (0, 2)],
                               residual=G.STRONG_RESIDUAL / 2)
    near = G.near_duplicate_groups(thumbs, keys=keys)
    assert partition(near.labels) == {frozenset(range(3))} and near.refused == []


def test_copies_of_one_picture_all_join(monkeypatch):
    everyone = {(i, j) for i in range(5) for j in range(i + 1, 5)}
    thumbs, keys, _ = scripted(monkeypatch, 5, everyone, sorted(everyone))
    near = G.near_duplicate_groups(thumbs, keys=keys)
    assert partition(near.labels) == {frozenset(range(5))} and near.refused == []


def test_two_groups_merge_only_when_a_member_of_each_agrees(monkeypatch):
    # {0, 1} and {2, 3} form first; 1~2 links them, but the witnesses 0~2 and 1~3 fail ...
    pairs = [(0, 1), (2, 3), (1, 2), (0, 3)]
    thumbs, keys, _ = scripted(monkeypatch, 4, {(0, 1), (2, 3), (1, 2)}, pairs)
    assert len(partition(G.near_duplicate_groups(thumbs, keys=keys).labels)) == 2
    # ... and with 0~2 and 1~3 copies as well, the groups are one
    thumbs, keys, _ = scripted(monkeypatch, 4, {(0, 1), (2, 3), (1, 2), (0, 2), (1, 3)}, pairs)
    assert partition(G.near_duplicate_groups(thumbs, keys=keys).labels) == {frozenset(range(4))}


def test_verdicts_are_kept_per_pair_of_keys_and_not_verified_again(monkeypatch):
    thumbs, keys, calls = scripted(monkeypatch, 4, {(0, 1), (1, 2), (2, 3)},
                                   [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)])
    verdicts: dict = {}
    first = G.near_duplicate_groups(thumbs, keys=keys, verdicts=verdicts)
    assert first.checked == len(calls) > 0 and ("k0", "k1") in verdicts
    again = G.near_duplicate_groups(thumbs, keys=keys, verdicts=verdicts)
    assert again.checked == 0 and len(calls) == first.checked
    np.testing.assert_array_equal(again.labels, first.labels)


def planted_set(seeds=range(8), copies=(("rotate90", 0), ("crop_5pc", 1), ("flip", 1),
                                        ("jpeg_q70", 5), ("brighter_flatter", 6))):
    """Independently drawn phantoms (look-alikes by construction) and planted copies."""
    pictures = [phantom(s) for s in seeds]
    thumbs = [fp.thumbnail(p) for p in pictures]
    aspects = [p.shape[0] / p.shape[1] for p in pictures]
    truth = list(range(len(pictures)))
    for kind, k in copies:
        c = from_pil(COPIES[kind](to_pil(pictures[k])))
        thumbs.append(fp.thumbnail(c))
        aspects.append(c.shape[0] / c.shape[1])
        truth.append(k)
    return np.stack(thumbs), np.array(aspects), np.array(truth)


@pytest.fixture(scope="module")
def planted():
    return planted_set()


def test_phantoms_join_their_copies_and_nothing_else(planted):
    thumbs, aspects, truth = planted
    near = G.near_duplicate_groups(thumbs, aspects)
    same = near.labels[:, None] == near.labels[None, :]
    np.testing.assert_array_equal(same, truth[:, None] == truth[None, :])


def test_the_groups_do_not_depend_on_the_order_of_the_contents(planted):
    thumbs, aspects, truth = planted
    keys = [f"{k:03d}" for k in range(len(thumbs))]
    first = G.near_duplicate_groups(thumbs, aspects, keys=keys)
    perm = np.random.default_rng(0).permutation(len(thumbs))
    second = G.near_duplicate_groups(thumbs[perm], aspects[perm], keys=[keys[p] for p in perm])
    by_key = lambda near, order: {frozenset(keys[order[k]] for k in g)  # noqa: E731
                                  for g in partition(near.labels)}
    assert by_key(first, np.arange(len(keys))) == by_key(second, perm)


def test_groups_of_nothing_and_of_one():
    assert len(G.near_duplicate_groups(np.zeros((0, fp.THUMB, fp.THUMB), np.uint8)).labels) == 0
    one = G.near_duplicate_groups(fp.thumbnail(texture(0))[None])
    assert one.labels.tolist() == [0] and one.links == []
