"""fxscore.split: group-aware stratified splits, laid out by hard links, that audit finds clean."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import require_real_data
from fxscore import audit as A
from fxscore import split as S
from test_audit import REAL_CACHE
from test_fingerprint import COPIES, texture, to_pil


def save(im, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 pictures per class spread over train/val/test, with copies across the splits:
    pictures 0..3 also appear turned in val or test, picture 4 twice byte for byte, picture 5
    flipped under the other label (a near-copy conflict), picture 7 byte for byte under the
    other label (an exact conflict), plus one broken file and a file name used twice."""
    root = tmp_path_factory.mktemp("data")
    splits = ["train"] * 6 + ["val", "test"]
    for s in range(80):
        label = "a" if s % 2 == 0 else "b"
        save(to_pil(texture(s, size=96)), root / splits[s % 8] / label / f"p{s}.png")
    for s in range(4):
        label = "a" if s % 2 == 0 else "b"
        save(COPIES["rotate90"](to_pil(texture(s, size=96))),
             root / ("val" if s < 2 else "test") / label / f"copy{s}.png")
    shutil.copyfile(root / "train/a/p4.png", root / "test/a/p4_again.png")
    save(COPIES["flip"](to_pil(texture(5, size=96))), root / "val" / "a" / "p5_as_a.png")
    shutil.copyfile(root / "test/b/p7.png", root / "test/a/p7_as_a.png")
    (root / "val" / "b" / "broken.png").write_bytes((root / "train/a/p0.png").read_bytes()[:300])
    save(to_pil(texture(100, size=96)), root / "test" / "b" / "p1.png")  # same name as train/b/p1
    return root


@pytest.fixture(scope="module")
def data_audit(data) -> A.Audit:
    return A.run_audit(data, workers=1)


def group_splits(placed) -> dict[int, set[str]]:
    out = defaultdict(set)
    for p in placed:
        out[p.group].add(p.split)
    return out


def test_no_group_straddles_two_splits_and_classes_keep_their_shares(data_audit):
    plan = S.plan_split(data_audit, S.SplitConfig(val=0.2, test=0.2, seed=0))
    assert all(len(s) == 1 for s in group_splits(plan.placed).values())
    for label in ("a", "b"):
        n = Counter(p.split for p in plan.placed if p.label == label)
        total = sum(n.values())
        assert abs(n["val"] - 0.2 * total) <= 2 and abs(n["test"] - 0.2 * total) <= 2, n


def test_what_is_left_out_and_why(data_audit):
    plan = S.plan_split(data_audit, S.SplitConfig())
    reasons = {e["source"]: e["reason"] for e in plan.excluded}
    assert reasons["val/b/broken.png"].startswith("unreadable: ")
    assert reasons["test/a/p4_again.png"] == "exact copy of train/a/p4.png"
    for path in ("test/b/p7.png", "test/a/p7_as_a.png"):  # the same bytes, two labels
        assert reasons[path] == "label conflict: the same bytes are filed as a (1), b (1)"
    assert len(reasons) == 4
    placed = {p.source for p in plan.placed}
    assert len(placed) == len(data_audit.files) - 4 and not placed & set(reasons)


def test_a_near_copy_group_with_two_labels_stays_whole_and_is_reported(data_audit):
    plan = S.plan_split(data_audit, S.SplitConfig())
    where = {p.source: (p.split, p.path.split("/")[1]) for p in plan.placed}
    (conflict,) = plan.conflicts
    assert conflict["paths"] == ["train/b/p5.png", "val/a/p5_as_a.png"]
    assert conflict["labels"] == {"a": 1, "b": 1}
    # one split, each file in the folder of its own label
    assert where["train/b/p5.png"] == (conflict["split"], "b")
    assert where["val/a/p5_as_a.png"] == (conflict["split"], "a")


def test_drop_conflicts_leaves_the_group_out(data_audit):
    plan = S.plan_split(data_audit, S.SplitConfig(drop_conflicts=True))
    reasons = {e["source"]: e["reason"] for e in plan.excluded}
    for path in ("train/b/p5.png", "val/a/p5_as_a.png"):
        assert reasons[path].startswith("label conflict in group")
        assert "(--drop-conflicts): a (1), b (1)" in reasons[path]
    assert [c["split"] for c in plan.conflicts] == ["excluded"] and len(reasons) == 6


def test_a_class_left_with_under_half_its_share_warns(data_audit):
    assert S.plan_split(data_audit, S.SplitConfig()).warnings == []
    # every 'b' picture of train also filed as 'a', byte for byte: they are all set aside
    extra = [dataclasses.replace(f, path="more/" + f.path, label="a") for f in data_audit.files
             if f.label == "b" and f.split == "train" and not f.error]
    plan = S.plan_split(dataclasses.replace(data_audit, files=data_audit.files + extra),
                        S.SplitConfig())
    assert any(re.fullmatch(r"train holds \d+ 'b' files, under half its share \(70% of \d+\)", w)
               for w in plan.warnings), plan.warnings


def test_split_and_audit_share_one_grouping(data_audit):
    plan = S.plan_split(data_audit, S.SplitConfig())
    assert plan.joined == []
    group_of = {f.path: f.group for f in data_audit.files}
    assert all(p.group == group_of[p.source] for p in plan.placed)
    audit_conflicts = [g["paths"] for g in data_audit.conflicts if not g["exact_conflict"]]
    assert audit_conflicts == [c["paths"] for c in plan.conflicts]


def test_a_written_audit_is_reused_and_checked_against_the_data(data, data_audit, tmp_path):
    A.write_report(data_audit, tmp_path / "report")
    again = S.audit_from_report(tmp_path / "report", data, workers=1)
    assert again.verdicts == data_audit.verdicts
    assert again.thumbs.keys() == data_audit.thumbs.keys() == again.described.keys()
    for sha, (desc, queries) in again.described.items():  # the very numbers grouped with
        assert np.array_equal(desc, data_audit.described[sha][0])
        assert np.array_equal(queries, data_audit.described[sha][1])
    plans = [S.plan_split(a, S.SplitConfig(seed=2)) for a in (data_audit, again)]
    assert [(p.source, p.split, p.group) for p in plans[0].placed] == [
        (p.source, p.split, p.group) for p in plans[1].placed]
    assert plans[0].excluded == plans[1].excluded and plans[0].conflicts == plans[1].conflicts


@pytest.mark.parametrize("change, message", [
    ("edit", "1 files changed since the audit"),
    ("add", "1 files are new since the audit"),
    ("report", "no fingerprints.npz here"),
])
def test_a_stale_or_partial_report_is_refused(data, data_audit, tmp_path, change, message):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    A.write_report(data_audit, tmp_path / "report")
    if change == "edit":
        with open(root / "train/a/p0.png", "ab") as f:
            f.write(b"\0")
    elif change == "add":
        shutil.copyfile(root / "train/a/p0.png", root / "train/a/new.png")
    else:
        (tmp_path / "report" / "fingerprints.npz").unlink()
    with pytest.raises(S.SplitError, match=message):
        S.audit_from_report(tmp_path / "report", root, workers=1)


def test_keep_duplicates_keeps_exact_copies_in_their_group(data_audit):
    plan = S.plan_split(data_audit, S.SplitConfig(keep_duplicates=True))
    split_of = {p.source: p.split for p in plan.placed}
    assert split_of["test/a/p4_again.png"] == split_of["train/a/p4.png"]
    assert len(plan.excluded) == 3  # the broken file and the exact conflict's two files


def test_the_same_seed_gives_the_same_split_and_another_seed_another(data_audit):
    def assignment(seed):
        plan = S.plan_split(data_audit, S.SplitConfig(seed=seed))
        return {p.source: p.split for p in plan.placed}

    assert assignment(0) == assignment(0)
    assert assignment(0) != assignment(1)


def test_colliding_names_in_one_class_folder_get_the_hash(data_audit):
    plan = S.plan_split(data_audit, S.SplitConfig(val=0.0, test=0.0))
    paths = [p.path for p in plan.placed]
    assert len(set(p.lower() for p in paths)) == len(paths)
    p1 = sorted(p.path for p in plan.placed if p.source.endswith("/p1.png"))
    assert p1[0] == "train/b/p1.png" and p1[1].startswith("train/b/p1__")


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (-0.1, 0.2), (0.2, 1.0)])
def test_shares_that_leave_no_train_are_refused(val, test):
    with pytest.raises(S.SplitError, match="val"):
        S.SplitConfig(val=val, test=test)


def test_write_split_hard_links_and_writes_the_manifest(data, data_audit, tmp_path):
    plan = S.plan_split(data_audit, S.SplitConfig(seed=3))
    summary = S.write_split(plan, data, tmp_path / "clean")
    clean = tmp_path / "clean"
    rows = list(csv.DictReader((clean / "manifest.csv").open()))
    assert list(rows[0]) == list(S.MANIFEST_COLUMNS) and len(rows) == len(plan.placed)
    for r in rows:
        assert os.path.samefile(clean / r["path"], data / r["source"])  # a hard link
        assert r["path"].split("/")[:2] == [r["split"], r["class"]]
    assert summary["hard_linked"] == len(rows) and summary["copied"] == 0
    assert len(list(csv.DictReader((clean / "excluded.csv").open()))) == 4
    doc = json.loads((clean / "split.json").read_text())
    assert [c["paths"] for c in doc["conflicts"]] == [["train/b/p5.png", "val/a/p5_as_a.png"]]
    assert doc["warnings"] == [] and doc["joined_by_leak_check"] == []
    assert (clean / "split.json").exists()


def test_write_split_copies_where_it_cannot_link(data, data_audit, tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    summary = S.write_split(S.plan_split(data_audit, S.SplitConfig()), data, tmp_path / "c")
    assert summary["copied"] == summary["files"] and summary["hard_linked"] == 0
    some = next((tmp_path / "c" / "train" / "a").iterdir())
    assert some.stat().st_nlink == 1


@pytest.mark.parametrize("where", ["not empty", "inside the data"])
def test_write_split_refuses_a_used_or_nested_folder(data, data_audit, tmp_path, where):
    out = tmp_path / "used" if where == "not empty" else data / "clean"
    if where == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    with pytest.raises(S.SplitError, match="not an empty folder|inside the data"):
        S.write_split(S.plan_split(data_audit, S.SplitConfig()), data, out)
    assert where == "inside the data" or (out / "keep.txt").read_text() == "mine"


def test_the_split_passes_its_own_audit(data, data_audit, tmp_path):
    before = {(lk["earlier"], lk["later"]): lk["leaked"] for lk in data_audit.leaks}
    assert before["train", "val"] > 0 and before["train", "test"] > 0
    S.write_split(S.plan_split(data_audit, S.SplitConfig()), data, tmp_path / "clean")
    plan = S.plan_split(data_audit, S.SplitConfig())
    after = A.run_audit(tmp_path / "clean", workers=1)
    assert after.leaked_groups == [] and all(lk["leaked"] == 0 for lk in after.leaks)
    assert after.unreadable == []
    # the same groups: the kept conflict is the tree's one conflict, every group is whole
    assert after.stats["groups"] == len({p.group for p in plan.placed})
    assert [g["files"] for g in after.conflicts] == [2] and len(plan.conflicts) == 1


@pytest.mark.realdata
@pytest.mark.slow
def test_real_split_passes_audit_with_zero_cross_split_groups(tmp_path):
    # val + test of the real set: 827 files with copies between them and within each
    src = require_real_data()
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, str(src / "materialize"), str(raw), "--split", "val,test"],
                   check=True, capture_output=True)
    cache = REAL_CACHE  # filled if test_audit's real-data audit ran first; else filled here
    before = A.run_audit(raw, cache=cache)
    assert before.leaks[0]["leaked"] > 0  # val -> test leaks as published
    plan = S.plan_split(before, S.SplitConfig(val=0.1, test=0.2, seed=0))
    S.write_split(plan, raw, tmp_path / "clean")
    after = A.run_audit(tmp_path / "clean", cache=cache)
    assert len(after.files) == len(plan.placed)
    assert after.leaked_groups == []
    assert [lk["leaked"] for lk in after.leaks] == [0, 0, 0]


AWKWARD_NAMES = ["=HYPERLINK(\"evil.example\",\"y\").png", "@SUM(1).png", "-600.png", "+1.png",
                 "with,comma.png", "with\nnewline.png", "with\rcr.png", " spaced .png",
                 "'quoted.png", os.fsdecode(b"caf\xe9.png"), "back\\xslash.png"]


def test_manifest_round_trips_awkward_names_and_neutralises_formulas(tmp_path):
    """Built without images: a plan whose file names hold formulas, CR/LF and undecodable
    bytes is laid out, and read_manifest gives back names that open the laid-out files."""
    data = tmp_path / "data"
    placed = []
    for i, name in enumerate(AWKWARD_NAMES):
        (data / "a").mkdir(parents=True, exist_ok=True)
        (data / "a" / name).write_bytes(b"x%d" % i)
        placed.append(S.Placement(f"a/{name}", "train" if i % 2 else "test", "a", i + 1,
                                  f"{i:064x}", f"{'train' if i % 2 else 'test'}/a/{name}"))
    excluded = [{"source": f"a/{AWKWARD_NAMES[0]}", "reason": "=exact copy", "group": 1,
                 "sha256": ""}]
    plan = S.SplitPlan(S.SplitConfig(seed=0), placed, excluded)
    S.write_split(plan, data, tmp_path / "clean")
    raw = (tmp_path / "clean" / "manifest.csv").read_bytes()
    raw.decode("utf-8")  # valid UTF-8 with undecodable names in it
    for name in ("manifest.csv", "excluded.csv"):  # no cell a spreadsheet would run
        with open(tmp_path / "clean" / name, newline="", encoding="utf-8") as f:
            cells = [c for r in csv.reader(f) for c in r]
        assert not [c for c in cells if c.startswith(("=", "@", "+", "-", "\t", "\r"))]
    assert "'=exact copy" in cells
    rows = S.read_manifest(tmp_path / "clean" / "manifest.csv")
    assert sorted(r["path"] for r in rows) == sorted(p.path for p in placed)
    for r in rows:
        assert (tmp_path / "clean" / r["path"]).exists() and (data / r["source"]).exists()
    ex = S.read_manifest(tmp_path / "clean" / "excluded.csv")
    assert ex == [{"source": f"a/{AWKWARD_NAMES[0]}", "reason": "=exact copy", "group": "1",
                   "sha256": ""}]


def test_split_groups_script_reads_and_writes_through_csvsafe(tmp_path):
    from fxscore import csvsafe

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    placed = []
    for i, name in enumerate(AWKWARD_NAMES):
        (data / "a" / name).write_bytes(b"y%d" % i)
        placed.append(S.Placement(f"a/{name}", "test", "a", i + 1, f"{i:064x}", f"test/a/{name}"))
    S.write_split(S.SplitPlan(S.SplitConfig(seed=0), placed, []), data, tmp_path / "clean")
    script = Path(__file__).resolve().parent.parent / "scripts" / "split_groups.py"
    r = subprocess.run(["timeout", "60", sys.executable, str(script), str(tmp_path / "clean"),
                        "test"], capture_output=True, check=True)
    import io
    rows = list(csvsafe.read_rows(io.StringIO(r.stdout.decode("utf-8"), newline="")))
    assert rows[0] == ["path", "group"]
    assert sorted(rows[1:]) == sorted([f"a/{n}", str(i + 1)] for i, n in enumerate(AWKWARD_NAMES))
