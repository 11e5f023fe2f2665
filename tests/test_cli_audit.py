"""`fxscore audit` and `fxscore split` through click's CliRunner."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fxscore.cli import EXIT_LEAK, EXIT_SOME_FAILED, cli
from test_fingerprint import COPIES, texture, to_pil


def save(im, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    """train/val/test with distinct pictures only."""
    root = tmp_path_factory.mktemp("clean")
    for s in range(12):
        split = ["train", "val", "test"][s % 3]
        save(to_pil(texture(s, size=96)), root / split / "ab"[s % 2] / f"{s}.png")
    return root


@pytest.fixture(scope="module")
def leaky_tree(clean_tree, tmp_path_factory) -> Path:
    """The clean tree plus a turned copy of a train picture in test."""
    root = tmp_path_factory.mktemp("leaky") / "data"
    shutil.copytree(clean_tree, root)
    save(COPIES["rotate90"](to_pil(texture(0, size=96))), root / "test" / "a" / "copy.png")
    return root


def invoke(*args: str):
    return CliRunner().invoke(cli, [*args, "--workers", "1", "-q"], catch_exceptions=False)


def words(text: str) -> str:
    return " ".join(text.split())  # the summary aligns columns; compare words


@pytest.mark.parametrize("command", ["audit", "split"])
def test_help_explains_the_command(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "Exit codes:" in result.output


def test_audit_of_a_clean_tree_exits_0_even_with_fail_on_leak(clean_tree):
    result = invoke("audit", str(clean_tree), "--fail-on-leak")
    assert result.exit_code == 0, result.output
    assert "train -> val 0 of 4 (0%)" in words(result.output)
    assert "0 groups span more than one split" in result.output


def test_audit_reports_the_leak_and_writes_the_files(leaky_tree, tmp_path):
    result = invoke("audit", str(leaky_tree), "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    assert "train -> test 1 of 5 (20%): 0 exact, 1 near only" in words(result.output)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "audit.json", "files.csv", "fingerprints.npz", "groups.csv"]
    doc = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert doc["groups"][0]["paths"] == ["test/a/copy.png", "train/a/0.png"]


def test_fail_on_leak_exits_with_its_own_code(leaky_tree):
    result = invoke("audit", str(leaky_tree), "--fail-on-leak")
    assert result.exit_code == EXIT_LEAK == 4
    assert "failing: 1 group of copies spans more than one split" in result.output
    assert "  1 group spans more than one split" in result.output


def test_unreadable_files_exit_3_and_are_named(clean_tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean_tree, root)
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    result = invoke("audit", str(root))
    assert result.exit_code == EXIT_SOME_FAILED
    assert "unreadable: 1 file\n" in result.output and "empty.png" in result.output


def test_every_unreadable_file_is_listed_up_to_a_limit_then_counted(clean_tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean_tree, root)
    names = [f"bad{i:02d}.png" for i in range(23)]
    for name in names:
        (root / "train" / "a" / name).write_bytes(b"not a picture")
    result = invoke("audit", str(root))
    assert result.exit_code == EXIT_SOME_FAILED
    assert "unreadable: 23 files" in result.output
    listed = [n for n in names if n in result.output]
    assert listed == names[:20]  # in order, each named once
    assert "  ... and 3 more (every file, with its error, is in files.csv: --out DIR)" \
        in result.output


def test_counts_in_the_summary_have_the_right_plural(clean_tree, tmp_path):
    root = tmp_path / "one"
    save(to_pil(texture(1, size=96)), root / "a" / "x.png")
    result = invoke("audit", str(root))
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert ": 1 file, 1 distinct content, 1 distinct image after" in first
    assert "duplicates: 0 files (0%) are in 0 groups of copies; 0 files are byte-identical" \
        in result.output


def test_audit_progress_in_a_log(clean_tree, monkeypatch):
    monkeypatch.setenv("FXSCORE_PROGRESS_INTERVAL", "0")
    result = CliRunner().invoke(cli, ["audit", str(clean_tree), "--workers", "1"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("audit ")]
    assert any(ln.startswith("audit hash: 12/12 files (100%)") for ln in lines), lines
    assert any(ln.startswith("audit read: 12/12 files (100%)") for ln in lines), lines
    assert "\r" not in result.stderr


@pytest.mark.parametrize("command", [["audit"], ["split", "--out", "somewhere"]])
def test_a_missing_folder_is_a_fatal_error_that_names_it(tmp_path, command):
    missing = tmp_path / "nope"
    result = CliRunner().invoke(cli, [command[0], str(missing), *command[1:]])
    assert result.exit_code == 1
    assert f"{missing}: not a folder" in result.output


def test_split_makes_a_tree_that_audits_clean(leaky_tree, tmp_path):
    out = tmp_path / "split"
    result = invoke("split", str(leaky_tree), "--out", str(out), "--val", "0.25", "--test",
                    "0.25", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "13 files in 12 groups" in result.output
    assert " hard links, 0 copies)" in result.output
    assert (out / "manifest.csv").exists() and (out / "split.json").exists()
    again = invoke("audit", str(out), "--fail-on-leak")
    assert again.exit_code == 0, again.output


def test_split_reuses_a_written_audit_without_reading_an_image(leaky_tree, tmp_path,
                                                                  monkeypatch):
    assert invoke("audit", str(leaky_tree), "--out", str(tmp_path / "report")).exit_code == 0
    from fxscore import audit as A

    def no_reading(path):
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(A, "analyse_file", no_reading)
    out = tmp_path / "split"
    result = invoke("split", str(leaky_tree), "--audit", str(tmp_path / "report"), "--out",
                    str(out), "--val", "0.25", "--test", "0.25", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "13 files in 12 groups" in result.output


def test_split_with_a_stale_audit_is_refused(leaky_tree, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(leaky_tree, data)
    assert invoke("audit", str(data), "--out", str(tmp_path / "report")).exit_code == 0
    (data / "train" / "a" / "0.png").unlink()
    result = invoke("split", str(data), "--audit", str(tmp_path / "report"), "--out",
                    str(tmp_path / "split"))
    assert result.exit_code == 1
    assert "1 files are gone since the audit" in result.output and "fxscore audit" in result.output


@pytest.fixture(scope="module")
def conflict_tree(tmp_path_factory) -> Path:
    """class a: six pictures; class b: flipped copies of two of them (near-copy conflicts)."""
    root = tmp_path_factory.mktemp("conflict")
    for s in range(6):
        save(to_pil(texture(s, size=96)), root / "a" / f"{s}.png")
    for s in range(2):
        save(COPIES["flip"](to_pil(texture(s, size=96))), root / "b" / f"flipped{s}.png")
    return root


def test_split_keeps_a_conflicting_group_whole_and_lists_it(conflict_tree, tmp_path):
    result = invoke("split", str(conflict_tree), "--out", str(tmp_path / "split"))
    assert result.exit_code == 0, result.output
    assert "label conflicts kept: 2 groups of near copies" in result.output
    assert "a/0.png, b/flipped0.png" in result.output
    doc = json.loads((tmp_path / "split" / "split.json").read_text())
    assert len(doc["conflicts"]) == 2 and doc["files"] == 8


def test_drop_conflicts_leaves_them_out_and_warns_of_an_emptied_class(conflict_tree, tmp_path):
    result = invoke("split", str(conflict_tree), "--out", str(tmp_path / "split"),
                    "--drop-conflicts")
    assert result.exit_code == 0, result.output
    assert "left out 4 files (4 label conflict)" in result.output
    assert "warning: train holds 0 'b' files, under half its share (70% of 2)" in result.output


def test_split_refuses_a_folder_in_use(clean_tree, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    result = invoke("split", str(clean_tree), "--out", str(tmp_path))
    assert result.exit_code == 1 and "not an empty folder" in result.output


def test_split_shares_must_leave_room_for_train(clean_tree, tmp_path):
    result = invoke("split", str(clean_tree), "--out", str(tmp_path / "o"), "--val", "0.5",
                    "--test", "0.5")
    assert result.exit_code == 2 and "val + test < 1" in result.output
