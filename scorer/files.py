"""Which files `fxscore run` scores: a streaming, sorted, loop-safe walk of a folder tree.

Order: the sort order of the relative POSIX paths (code points), produced without holding the
whole list. Each folder's entries are sorted with sub-folders keyed as "name/", which is exactly
where their contents fall among the relative paths ("a-b.jpg" < "a/x.jpg" < "a0.jpg"). Memory is
one folder listing per level of depth, whatever the size of the tree.

Candidates: an image extension (case-insensitive, `IMAGE_EXTENSIONS`), or a DICOM file without an
extension or with a numeric one (PACS exports are often named by UID, "1.2.840.113619.2.55.3")
that carries the DICM marker. Other files are counted as ignored, with a reason (their
extension, "not a regular file", "broken link"). Hidden files and folders (name starts with
".") are skipped and not counted: a .git folder is not an X-ray.

Symlinks, like `find`: a link that resolves inside the input root is followed (a file link is
scored under the link's path; a folder link is entered), one that resolves outside it is not,
unless `follow_links=True`: a link to "../.." would otherwise walk the whole parent tree, and a
link to /etc/shadow named x.png would be read. Links not followed are counted by what they
point to (PACS exports are often symlink farms: nothing may vanish silently). Every real folder
(device, inode) is entered at most once, so a link to a parent cannot loop and a folder linked
twice is not scored twice; the first path in sort order wins. FIFOs, sockets and devices are
ignored without being opened (reading a FIFO would block forever).

Sharding: `Shard(k, n)` keeps a file when a stable hash (BLAKE2b) of its relative path falls in
part k of n, 1-based. The decision depends on the path alone, not on which other files exist, so
N array tasks cover every file exactly once even if files arrive while they start. Ignored
files and links not followed are counted in the shard their path falls in, so the counts of N
tasks add up to those of one run.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .images import IMAGE_EXTENSIONS, ImageReadError, open_regular

NOT_REGULAR = "not a regular file"
BROKEN_LINK = "broken link"
LINK_OUTSIDE = "link outside INPUT"  # reasons passed to on_ignored start with this
LINK_KINDS = ("folder", "file", "other")  # what a link not followed points to


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based: the first of N parts is 1/N
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """'K/N' with 1 <= K <= N -> Shard; ValueError with a message otherwise."""
        try:
            k, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like K/N (e.g. 1/4), got {text!r}") from None
        if not 1 <= k <= n:
            raise ValueError(f"shard K/N needs 1 <= K <= N (K is 1-based), got {text!r}")
        return cls(k, n)

    def __contains__(self, rel: str) -> bool:
        digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1


def is_candidate(path: Path) -> bool:
    """Would `fxscore run` try to read this file? (extension, or DICM marker for DICOM)"""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return True
    return (suffix == "" or suffix[1:].isdigit()) and _has_dicom_marker(path)


def _has_dicom_marker(path: Path) -> bool:
    # open_regular: a file swapped for a FIFO after the listing must not block the walk.
    try:
        with open_regular(path) as f:
            return f.read(132)[128:132] == b"DICM"
    except (OSError, ImageReadError):
        return False


def ignored_reason(path: Path) -> str:
    """How a non-candidate regular file is reported: its extension, lower case."""
    return path.suffix.lower() or "no extension"


def find_images(root: Path, *, shard: Shard | None = None, counts: Counter | None = None,
                onerror: Callable[[Path, OSError], None] | None = None,
                follow_links: bool = False,
                on_ignored: Callable[[str, str], None] | None = None,
                ) -> Iterator[tuple[str, Path]]:
    """Yield (relative POSIX path, path) for every candidate under `root`, sorted, lazily.

    `counts["ignored"]` counts non-candidates (in this shard), `counts["links_outside"]` the
    links not followed, and `counts["links_outside:<kind>"]` those by kind (folder, file,
    other). `on_ignored(rel, reason)` hears of each of them: reason is the extension (".txt",
    "no extension"), NOT_REGULAR, BROKEN_LINK, or "link outside INPUT (<kind>)".
    `onerror(folder, error)` hears of folders that cannot be listed (default: skip silently).
    """
    counts = Counter() if counts is None else counts
    root = Path(root)
    real_root = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()  # real folders entered: grows with folders, not files

    def skip(rel: str, reason: str) -> None:
        if on_ignored:
            on_ignored(rel, reason)

    stack = [iter(_listing(root, "", seen, onerror))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        rel, dir_entry, is_dir = entry
        path = Path(dir_entry.path)
        outside = (not follow_links and _is_link(dir_entry)
                   and not _within(os.path.realpath(path), real_root))
        if is_dir and not outside:
            stack.append(iter(_listing(path, rel, seen, onerror)))
            continue
        if shard is not None and rel.rstrip("/") not in shard:
            continue
        if outside:
            kind = "folder" if is_dir else "file" if _is_regular(dir_entry) else "other"
            counts["links_outside"] += 1
            counts[f"links_outside:{kind}"] += 1
            skip(rel, f"{LINK_OUTSIDE} ({kind})")
        elif _is_regular(dir_entry) and is_candidate(path):
            yield rel, path
        else:
            counts["ignored"] += 1
            skip(rel, ignored_reason(path) if _is_regular(dir_entry)
                 else BROKEN_LINK if not os.path.exists(path) else NOT_REGULAR)


def _within(target: str, real_root: str) -> bool:
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


def _listing(folder: Path, prefix: str, seen: set[tuple[int, int]],
             onerror: Callable[[Path, OSError], None] | None) -> list[tuple[str, os.DirEntry, bool]]:
    """One folder's non-hidden entries as (relative path, entry, is_dir), in global sort order."""
    try:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            return []
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = [(e, _is_dir(e)) for e in it if not e.name.startswith(".")]
    except OSError as e:
        if onerror:
            onerror(folder, e)
        return []
    entries.sort(key=lambda x: x[0].name + "/" if x[1] else x[0].name)
    return [(prefix + e.name + ("/" if d else ""), e, d) for e, d in entries]


def _is_link(entry: os.DirEntry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; the `seen` set stops loops
    except OSError:
        return False


def _is_regular(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # follows links; False for FIFOs, sockets, broken links
    except OSError:
        return False
