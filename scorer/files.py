"""Which files `fxscore run` scores: a streaming, sorted, loop-safe walk of a folder tree.

Order: the sort order of the relative POSIX paths (code points), produced without holding the
whole list. Each folder's entries are sorted with sub-folders keyed as "name/", which is exactly
where their contents fall among the relative paths ("a-b.jpg" < "a/x.jpg" < "a0.jpg"). Memory is
one folder listing per level of depth, whatever the size of the tree.

Candidates: an image extension (case-insensitive, `IMAGE_EXTENSIONS`), or a DICOM file without an
extension or with a numeric one (PACS exports are often named by UID, "1.2.840.113619.2.55.3")
that carries the DICM marker. Other files are counted as ignored. Hidden files and folders (name
starts with ".") are skipped and not counted: a .git folder is not an X-ray.

Symlinks: a file link is scored under the link's path. A folder link is followed, but every real
folder (device, inode) is entered at most once, so a link to a parent cannot loop and a folder
linked twice is not scored twice; the first path in sort order wins. FIFOs, sockets and broken
links are ignored (reading a FIFO would block forever).

Sharding: `Shard(k, n)` keeps a file when a stable hash (BLAKE2b) of its relative path falls in
part k of n, 1-based. The decision depends on the path alone, not on which other files exist, so
N array tasks cover every file exactly once even if files arrive while they start.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .images import IMAGE_EXTENSIONS, is_dicom_file


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
    return (suffix == "" or suffix[1:].isdigit()) and is_dicom_file(path)


def find_images(root: Path, *, shard: Shard | None = None, counts: Counter | None = None,
                onerror: Callable[[Path, OSError], None] | None = None,
                ) -> Iterator[tuple[str, Path]]:
    """Yield (relative POSIX path, path) for every candidate under `root`, sorted, lazily.

    `counts["ignored"]` counts non-candidates (in this shard); `onerror(folder, error)` hears of
    folders that cannot be listed (default: skip them silently).
    """
    counts = Counter() if counts is None else counts
    root = Path(root)
    seen: set[tuple[int, int]] = set()  # real folders entered: grows with folders, not files
    stack = [iter(_listing(root, "", seen, onerror))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        rel, dir_entry, is_dir = entry
        if is_dir:
            stack.append(iter(_listing(Path(dir_entry.path), rel, seen, onerror)))
            continue
        if shard is not None and rel not in shard:
            continue
        path = Path(dir_entry.path)
        if _is_regular(dir_entry) and is_candidate(path):
            yield rel, path
        else:
            counts["ignored"] += 1


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
