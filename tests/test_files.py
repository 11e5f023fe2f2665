"""fxscore.files: which files `fxscore run` scores, in which order, and how shards split them."""
from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from fxscore.files import Shard, find_images, is_candidate

from conftest import SAMPLE_DATA

DICOM = SAMPLE_DATA / "extras" / "IM0001"  # a real DICOM file without a suffix


def touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "in"
    # Names chosen so that sorting folder by folder by plain name would be wrong:
    # '-' < '/' < '0', so "a-b.jpg" < "a/x.jpg" < "a0.jpg" as relative paths.
    for rel in ("a-b.jpg", "a/x.jpg", "a0.jpg", "B.PNG", "c.JpEg", "d/e/f.tif", "d/e/g.dcm",
                "Z.bmp", "notes.txt", "d/readme", ".hidden.jpg", ".git/objects/x.jpg",
                "d/.cache/y.png"):
        touch(root, rel)
    dicom = DICOM.read_bytes()
    touch(root, "d/IM0001", dicom)
    touch(root, "d/1.2.840.113619.2.55", dicom)  # PACS-style UID name, numeric "suffix"
    touch(root, "d/1.2.840.99.dcm.bak", dicom)  # a DICOM with a non-numeric, non-image suffix
    return root


EXPECTED = ["B.PNG", "Z.bmp", "a-b.jpg", "a/x.jpg", "a0.jpg", "c.JpEg", "d/1.2.840.113619.2.55",
            "d/IM0001", "d/e/f.tif", "d/e/g.dcm"]


def rels(root: Path, **kw) -> list[str]:
    return [rel for rel, _ in find_images(root, **kw)]


def test_sorted_by_relative_path_with_hidden_and_non_images_left_out(tree):
    counts = Counter()
    found = list(find_images(tree, counts=counts))
    assert [r for r, _ in found] == EXPECTED
    assert EXPECTED == sorted(EXPECTED)  # the global order, not per-folder name order
    assert all(p == tree / r for r, p in found)
    # notes.txt, d/readme and the .bak; hidden entries are neither scored nor counted.
    assert counts["ignored"] == 3


@pytest.mark.parametrize("name, data, expected", [
    ("x.JPG", b"", True), ("x.tiff", b"", True), ("x.Dcm", b"", True), ("x.webp", b"", True),
    ("x.txt", b"", False), ("x.pdf", b"%PDF", False), ("IM0001", b"not dicom", False),
    ("IM0001", None, True), ("1.2.3.4", None, True), ("1.2.3.4", b"\0" * 200, False),
])
def test_is_candidate(tmp_path, name, data, expected):
    path = touch(tmp_path, name, DICOM.read_bytes() if data is None else data)
    assert is_candidate(path) is expected


def test_symlink_loops_terminate_and_linked_folders_are_walked_once(tree):
    (tree / "d" / "e" / "up").symlink_to("../..")  # a loop back to the root
    (tree / "d" / "self").symlink_to(".")
    (tree / "a_link").symlink_to("a")  # 'a/' sorts first, so a/x.jpg keeps its own name
    (tree / "q.png").symlink_to("Z.bmp")  # file links are scored under the link's name
    (tree / "dangling.jpg").symlink_to("nowhere.jpg")
    result: list[str] = []
    walker = threading.Thread(target=lambda: result.extend(rels(tree)), daemon=True)
    walker.start()
    walker.join(timeout=20)
    assert not walker.is_alive(), "discovery hangs on a symlink loop"
    assert result == sorted(EXPECTED + ["q.png"])


def test_fifo_is_ignored_not_opened(tmp_path):
    touch(tmp_path, "a.png")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it to sniff or decode would block forever
    counts = Counter()
    assert rels(tmp_path, counts=counts) == ["a.png"]
    assert counts["ignored"] == 1


def test_discovery_streams_folder_by_folder(tmp_path):
    """The walk lists a folder only when it gets there: nothing holds the whole tree."""
    touch(tmp_path, "a/1.png")
    touch(tmp_path, "b/1.png")
    walk = find_images(tmp_path)
    assert next(walk)[0] == "a/1.png"
    touch(tmp_path, "b/0.png")  # appears after the walk started; b/ is not listed yet
    assert [r for r, _ in walk] == ["b/0.png", "b/1.png"]


def test_flat_folder_of_many_files(tmp_path):
    names = [f"{i:04d}.png" for i in range(1000)]
    for n in names[::-1]:
        (tmp_path / n).touch()
    assert rels(tmp_path) == names


def test_unlistable_folder_is_reported_and_skipped(tree, monkeypatch):
    locked = tree / "d" / "e"
    scandir = os.scandir

    def refuse(path):  # chmod 000 would not stop root, so refuse the listing itself
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    seen = []
    found = rels(tree, onerror=lambda folder, e: seen.append((folder, e.errno)))
    assert seen == [(locked, 13)]
    assert found == [r for r in EXPECTED if not r.startswith("d/e/")]


@pytest.mark.parametrize("text, expected", [("1/1", Shard(1, 1)), ("3/4", Shard(3, 4)),
                                            (" 2/ 8", Shard(2, 8))])
def test_shard_parse(text, expected):
    assert Shard.parse(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "-1/3", "1", "a/b", "1/2/3", ""])
def test_shard_parse_rejects(text):
    with pytest.raises(ValueError, match="K/N"):
        Shard.parse(text)


def test_shards_cover_every_file_exactly_once(tmp_path):
    for i in range(300):
        touch(tmp_path, f"p{i % 7}/img{i:03d}.png")
    touch(tmp_path, "notes.txt")
    everything = rels(tmp_path)
    for n in (1, 2, 5):
        parts, ignored = [], 0
        for k in range(1, n + 1):
            counts = Counter()
            part = rels(tmp_path, shard=Shard(k, n), counts=counts)
            assert part == sorted(part)
            assert len(part) > 300 / n / 2  # roughly balanced
            parts.extend(part)
            ignored += counts["ignored"]
        assert sorted(parts) == everything  # union is everything, no file twice
        assert ignored == 1


def test_shard_membership_is_stable():
    """Changing the hash would reshuffle running job arrays: pin it."""
    paths = [f"case{i}/image.png" for i in range(12)]
    assert [next(k for k in range(1, 4) if p in Shard(k, 3)) for p in paths] == \
        [1, 3, 2, 2, 1, 3, 2, 1, 2, 2, 1, 2]


def test_sample_data_extras():
    found = rels(SAMPLE_DATA / "extras")
    assert "IM0001" in found
    assert found == sorted(found)
    on_disk = {p.relative_to(SAMPLE_DATA / "extras").as_posix()
               for p in (SAMPLE_DATA / "extras").rglob("*") if p.is_file()}
    assert set(found) == on_disk  # every extra is an X-ray candidate, broken ones included


# ---- links outside the input root, ignored reasons, FIFOs met while sniffing ----------------

def _walk(root: Path, **kw) -> tuple[list[str], Counter, list[tuple[str, str]]]:
    counts, skipped = Counter(), []
    found = []
    walker = threading.Thread(target=lambda: found.extend(rels(
        root, counts=counts, on_ignored=lambda rel, why: skipped.append((rel, why)), **kw)),
        daemon=True)
    walker.start()
    walker.join(timeout=20)
    assert not walker.is_alive(), "discovery hangs"
    return found, counts, skipped


@pytest.fixture
def farm(tmp_path) -> Path:
    """An input root inside a bigger tree, with links leading out of it in every way."""
    touch(tmp_path, "outside/secret.png")
    touch(tmp_path, "outside/deep/more.png")
    touch(tmp_path, "sibling.png")
    root = tmp_path / "export" / "in"
    touch(root, "a/1.png")
    touch(root, "b/2.png")
    (root / "a" / "up").symlink_to("../..")  # the parent of the root: would walk everything
    (root / "outdir").symlink_to(tmp_path / "outside")  # a folder outside
    (root / "shadow.png").symlink_to(tmp_path / "sibling.png")  # a file outside
    (root / "inside.png").symlink_to("a/1.png")  # inside: followed, scored under its name
    (root / "b" / "again").symlink_to("../a")  # inside, and already walked
    return root


def test_links_outside_the_root_are_counted_not_followed(farm):
    found, counts, skipped = _walk(farm)
    assert found == ["a/1.png", "b/2.png", "inside.png"]
    assert counts["links_outside"] == 3
    assert (counts["links_outside:folder"], counts["links_outside:file"]) == (2, 1)
    assert sorted(skipped) == [("a/up/", "link outside INPUT (folder)"),
                               ("outdir/", "link outside INPUT (folder)"),
                               ("shadow.png", "link outside INPUT (file)")]
    assert counts["ignored"] == 0  # links not followed are not "ignored" files


def test_follow_links_walks_them_like_find_L_and_still_cannot_loop(farm):
    found, counts, _ = _walk(farm, follow_links=True)
    # a/up -> the parent: everything under export/ once (the root itself is entered already)
    assert found == ["a/1.png", "b/2.png", "inside.png", "outdir/deep/more.png",
                     "outdir/secret.png", "shadow.png"]
    assert counts["links_outside"] == 0


def test_a_root_given_through_a_link_is_still_the_root(farm, tmp_path):
    (tmp_path / "via").symlink_to(farm)
    found, counts, _ = _walk(tmp_path / "via")
    assert found == ["a/1.png", "b/2.png", "inside.png"] and counts["links_outside"] == 3


def test_ignored_files_come_with_their_reason(tmp_path):
    for rel in ("a.png", "x.py", "y.PY", "notes.txt", "README", "data.2024-01"):
        touch(tmp_path, rel)
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    found, counts, skipped = _walk(tmp_path)
    assert found == ["a.png"]
    assert dict(skipped) == {"x.py": ".py", "y.PY": ".py", "notes.txt": ".txt",
                             "README": "no extension", "data.2024-01": ".2024-01",
                             "pipe.jpg": "not a regular file", "gone.png": "broken link"}
    assert counts["ignored"] == 7


def test_ignored_and_links_are_counted_in_their_shard_only(farm):
    touch(farm, "notes.txt")
    total = Counter()
    for k in (1, 2, 3):
        _, counts, _ = _walk(farm, shard=Shard(k, 3))
        total.update(counts)
    assert total["links_outside"] == 3 and total["ignored"] == 1


def test_dicom_sniffing_never_blocks_on_a_fifo(tmp_path):
    """A file replaced by a FIFO between listing and sniffing must not hang the walk."""
    os.mkfifo(tmp_path / "IM0001")  # no suffix: the walk would open it to look for DICM
    result = []
    t = threading.Thread(target=lambda: result.append(is_candidate(tmp_path / "IM0001")),
                         daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "is_candidate blocks on a FIFO"
    assert result == [False]
