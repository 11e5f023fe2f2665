"""What a model was trained on: the content hashes (and near-copy descriptors) of its training
and validation images, carried inside the model file, and the lookups `eval` and `run` make.

Why. A model evaluated on its own training images looks better than it is, and public data
sets hold the same radiograph many times, under other names and in other splits. A model that
knows what it saw can say so: `fxscore eval` counts the evaluated images that are exact or near
copies of its training or validation images (and can leave them out), `fxscore run
--mark-training-copies` marks the rows whose file was in its training data.

What is stored, per distinct content of the training and validation splits (byte-identical
files once):
- its sha256 (32 bytes) and which of the two splits held it (1 byte);
- with descriptors (the default when the images are at hand at export), the near-copy
  descriptor of `fxscore.fingerprint` (the 6 x 6 lowest DCT frequencies of the whole 128 px
  grey thumbnail and of its central 75 %, 70 numbers) as 70 int8 (scaled per image, each half
  renormalised when read): 70 bytes.
So 103 bytes per distinct image, 137 as base64 text: about 0.8 MB for 6,000 distinct images
(the public set's 6,464 training and validation files hold 2,497 distinct contents: 0.34 MB),
beside an 11 MB int8 or 45 MB fp32 ResNet18. Hashes alone: 44 characters per image.

Where. The table is one JSON document in its own ONNX metadata entry, `ENTRY`, so the fxscore
metadata (which `eval` copies into metrics.json and `info` prints) stays small. The fxscore
metadata's optional key `training_data` (`check_summary`) records the entry's sha256 and
counts, and the model digest covers that key: a table changed after export is refused here.

Near copies. Low frequencies alone cannot tell two radiographs of one wrist apart (the audit
verifies candidates on 128 px thumbnails, 16 KB per image, too much to embed), so a near copy
here is an image whose descriptor similarity to a training image, in any of the 8 flips and
quarter turns, is at least `NEAR_SIMILARITY`. On 400 random images of the public set, checked
against the audit's pixel-level verification, 0.98 flags the images that have a copy with
precision 99.7% and recall 93.5%: re-encoded, resized, flipped and lightly cropped copies reach
it; heavily cropped or rotated ones may not (`fxscore audit` finds those). Smooth synthetic
images without texture (sample_data's phantoms) reach 0.99 with each other: there a near copy
may be a look-alike.

Membership disclosure. The hashes tell anyone holding the model whether a given file was in
its training data, and the descriptors whether a picture like it was: for public data sets
harmless and useful, for a hospital's own images it may disclose that a patient's radiograph
was used. `fxscore export --no-training-hashes` leaves all of it out. No file names, labels
or paths are stored.

The exact lookups (`exact_split`) need numpy and hashlib only, so `fxscore run`'s scoring path
gains no dependency; descriptors import `fxscore.fingerprint` (scipy) when first needed.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ENTRY = "fxscore.training_data"  # the ONNX metadata_props key holding the table
SUMMARY_KEY = "training_data"  # the fxscore metadata's optional key describing it
FORMAT = 1
TRAIN, VAL = 1, 2  # split flags, one byte per content
NEAR_SIMILARITY = 0.98  # descriptor similarity from which an image counts as a near copy
_HEX = re.compile(r"[0-9a-f]{64}")


class MembershipError(ValueError):
    """A model's training-data table is missing, damaged, or does not match its metadata."""


# ---------------------------------------------------------------------------- descriptors

@functools.lru_cache(maxsize=1)
def descriptor_kind() -> str:
    """Names the descriptor definition; a model built with another one gets exact lookups only.

    Its sizes, and a hash of what it makes of a fixed test picture (rounded to 0.01, far
    coarser than any CPU's rounding), so that a changed `fingerprint.descriptors` cannot be
    compared with descriptors made by the old one.
    """
    from . import fingerprint as fp

    y, x = np.mgrid[:96, :64].astype(np.float32)
    probe = np.sin(x / 7.0) * np.cos(y / 11.0) + x / 64.0
    probe_hash = hashlib.sha256(np.round(describe(probe), 2).astype(np.float32)
                                .tobytes()).hexdigest()[:8]
    return f"fingerprint-dct{fp.DCT_K}-side{fp.DCT_SIDE}-thumb{fp.THUMB}-{probe_hash}/1"


def describe(image: np.ndarray) -> np.ndarray:
    """A decoded grey image (as `read_image` returns it) -> (8, D) unit descriptors, one per
    flip / quarter turn (`fxscore.fingerprint.descriptors`)."""
    from . import fingerprint as fp

    return fp.descriptors(fp.thumbnail(image))


def describe_file(path: str | os.PathLike) -> np.ndarray | None:
    """`describe` of an image file; None when it cannot be read as an image."""
    from .images import ImageReadError, read_image

    try:
        return describe(read_image(path))
    except (ImageReadError, OSError):
        return None


def describe_files(paths: Sequence[str | os.PathLike], workers: int | None = None,
                   ) -> list[np.ndarray | None]:
    """`describe_file` of each path, in order, on `workers` threads."""
    if not paths:
        return []
    from .cpus import available_cpus

    with ThreadPoolExecutor(max(1, workers or available_cpus())) as pool:
        return list(pool.map(describe_file, paths))


def _quantise(desc: np.ndarray) -> np.ndarray:
    """Orientation 0 of a (8, D) descriptor -> D int8, scaled so its largest entry is 127."""
    x = np.asarray(desc, np.float32)[0]
    peak = float(np.abs(x).max())
    return np.zeros(x.shape, np.int8) if peak == 0 else np.round(x * (127 / peak)).astype(np.int8)


def _dequantise(q: np.ndarray) -> np.ndarray:
    """(n, D) int8 -> float32 with each half (whole image, centre) of length 1/sqrt(2), as
    `fingerprint.descriptors` makes them: the scale cancels, and rounding barely turns them."""
    x = q.astype(np.float32).reshape(len(q), 2, -1)
    x /= np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12) * np.sqrt(np.float32(2))
    return x.reshape(len(q), -1)


# ---------------------------------------------------------------------------- the table

@dataclass(frozen=True, eq=False)
class TrainingData:
    """The decoded table: distinct contents sorted by digest."""

    digests: np.ndarray  # (n,) bytes (S32): raw sha256 digests, sorted
    splits: np.ndarray  # (n,) uint8: TRAIN | VAL bits
    descriptors: np.ndarray | None = None  # (n, D) float32, unit rows; zero where not described
    described: np.ndarray | None = None  # (n,) bool
    descriptor_kind: str = ""

    def __len__(self) -> int:
        return len(self.digests)

    def index(self, sha256: str) -> int:
        """Row of a hex sha256, or -1."""
        if not sha256 or not _HEX.fullmatch(sha256):
            return -1
        # As an S32 value, the way the table holds it: numpy drops trailing zero bytes of S
        # items when it hands one out, so a digest ending in 00 only equals its S32 form.
        key = np.array(bytes.fromhex(sha256), dtype="S32")
        i = int(np.searchsorted(self.digests, key))
        return i if i < len(self.digests) and self.digests[i] == key[()] else -1

    def split_of(self, sha256: str) -> str:
        """'train', 'val', 'train+val', or '' when the content is not in the table."""
        i = self.index(sha256)
        return split_name(int(self.splits[i])) if i >= 0 else ""

    @property
    def near_usable(self) -> bool:
        """Whether near copies can be looked up with this fxscore's descriptor definition."""
        return (self.descriptors is not None and bool(self.described.any())
                and self.descriptor_kind == descriptor_kind())


def split_name(flags: int) -> str:
    return "+".join(name for bit, name in ((TRAIN, "train"), (VAL, "val")) if flags & bit)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode(train: Iterable[str], val: Iterable[str],
           descriptors: Mapping[str, np.ndarray | None] | None = None,
           ) -> tuple[dict[str, Any], str]:
    """Hex sha256s of the training and validation files (repeats allowed), and optionally
    {sha256: (8, D) descriptor or None} -> (the metadata summary, the entry's text).

    A content missing from `descriptors` or mapped to None (an unreadable file) is stored
    without one.
    """
    flags: dict[str, int] = {}
    for bit, shas in ((TRAIN, train), (VAL, val)):
        for s in shas:
            if not _HEX.fullmatch(s):
                raise MembershipError(f"not a hex sha256: {s!r}")
            flags[s] = flags.get(s, 0) | bit
    order = sorted(flags)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "sha256": _b64(b"".join(bytes.fromhex(s) for s in order)),
        "splits": _b64(bytes(flags[s] for s in order))}
    summary: dict[str, Any] = {
        "format": FORMAT, "entry": ENTRY, "contents": len(order),
        "train": sum(1 for s in order if flags[s] & TRAIN),
        "val": sum(1 for s in order if flags[s] & VAL)}
    if descriptors is not None:
        kind = descriptor_kind()
        rows = [descriptors.get(s) for s in order]
        dim = next((r.shape[1] for r in rows if r is not None), 0)
        table = np.zeros((len(order), dim), np.int8)
        described = np.zeros(len(order), bool)
        for i, r in enumerate(rows):
            if r is not None:
                table[i] = _quantise(r)
                described[i] = True
        doc.update(descriptor_kind=kind, descriptor_dim=dim,
                   descriptors=_b64(table.tobytes()),
                   described=_b64(np.packbits(described).tobytes()))
        summary.update(descriptor_kind=kind, described=int(described.sum()))
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    data = text.encode("utf-8")
    summary.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    return summary, text


def check_summary(summary: Any) -> None:
    """Raise MembershipError naming the first problem in the metadata's `training_data` key."""
    if not isinstance(summary, dict):
        raise MembershipError(f"{SUMMARY_KEY} must be a JSON object")
    if summary.get("format") != FORMAT:
        raise MembershipError(f"{SUMMARY_KEY}.format {summary.get('format')!r} is not one this "
                              f"fxscore reads ({FORMAT}); upgrade fxscore")
    if summary.get("entry") != ENTRY:
        raise MembershipError(f"{SUMMARY_KEY}.entry must be '{ENTRY}'")
    sha = summary.get("sha256")
    if not isinstance(sha, str) or not _HEX.fullmatch(sha):
        raise MembershipError(f"{SUMMARY_KEY}.sha256 must be 64 lowercase hex digits")
    for key in ("contents", "train", "val", "bytes"):
        v = summary.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise MembershipError(f"{SUMMARY_KEY}.{key} must be a non-negative integer, got {v!r}")


def decode(text: str, summary: dict[str, Any], source: str = "model") -> TrainingData:
    """The entry's text, checked against the (digest-covered) summary -> TrainingData."""
    check_summary(summary)
    data = text.encode("utf-8")
    if hashlib.sha256(data).hexdigest() != summary["sha256"]:
        raise MembershipError(
            f"{source}: its training-data table ('{ENTRY}') does not match the sha256 its "
            "verified metadata records: it was changed after export. Restore the model file "
            "from its source or re-export it")
    try:
        doc = json.loads(text)
        digests = np.frombuffer(base64.b64decode(doc["sha256"], validate=True), "S32")
        splits = np.frombuffer(base64.b64decode(doc["splits"], validate=True), np.uint8)
        if len(digests) != len(splits) or len(digests) != summary["contents"]:
            raise ValueError("counts disagree")
        desc = described = None
        if "descriptors" in doc:
            dim = int(doc["descriptor_dim"])
            raw = np.frombuffer(base64.b64decode(doc["descriptors"], validate=True), np.int8)
            bits = np.frombuffer(base64.b64decode(doc["described"], validate=True), np.uint8)
            described = np.unpackbits(bits)[:len(digests)].astype(bool)
            if dim < 2 or dim % 2 or raw.size != len(digests) * dim:
                raise ValueError("descriptor table has the wrong size")
            desc = _dequantise(raw.reshape(len(digests), dim))
            desc[~described] = 0.0
    except (KeyError, ValueError, TypeError, binascii.Error) as e:
        raise MembershipError(f"{source}: its training-data table is malformed ({e}); "
                              "re-export the model") from e
    return TrainingData(digests, splits, desc, described, str(doc.get("descriptor_kind", "")))


_CACHE: "weakref.WeakKeyDictionary[Any, TrainingData | None]" = weakref.WeakKeyDictionary()


def training_data(model) -> TrainingData | None:
    """The table a loaded `fxscore.model.Model` carries, or None when it carries none.

    Read from the file's metadata as the loader verified it (a session built from the graph
    cache need not keep it), and checked against the metadata's summary. Decoded once per session.
    """
    summary = model.meta.training_data
    if not summary:
        return None
    session = model.session
    if session in _CACHE:
        return _CACHE[session]
    props = (model.props if model.props is not None
             else session.get_modelmeta().custom_metadata_map)
    if ENTRY not in props:
        raise MembershipError(f"model {model.path}: its metadata records a training-data table "
                              f"but the file has no '{ENTRY}' entry (stripped by another tool?); "
                              "restore the file from its source or re-export it")
    table = decode(props[ENTRY], summary, f"model {model.path}")
    _CACHE[session] = table
    return table


def no_table_reason(model) -> str:
    """Why a model cannot tell its training images, for messages."""
    return (f"model {model.path} carries no training-data hashes (exported with "
            "--no-training-hashes, from a checkpoint that names no training data, or by an "
            "older fxscore)")


# ---------------------------------------------------------------------------- lookups

@dataclass(frozen=True)
class Copy:
    """Whether one image is a copy of a training or validation image of the model."""

    kind: str = ""  # "exact" (same bytes), "near" (descriptor similarity), "" (neither)
    split: str = ""  # "train", "val", "train+val" (for near copies: the most similar one's)
    similarity: float | None = None  # near copies: descriptor similarity (exact: 1.0)

    def __bool__(self) -> bool:
        return bool(self.kind)

    @property
    def text(self) -> str:
        """'exact:train', 'near:val', ... or '' (a CSV cell)."""
        return f"{self.kind}:{self.split}" if self.kind else ""


def exact_split(table: TrainingData, sha256s: Iterable[str]) -> list[str]:
    """`TrainingData.split_of` of each hex sha256 ('' for '' and for unknown contents)."""
    return [table.split_of(s) for s in sha256s]


def training_copies(model, sha256s: Sequence[str],
                    images: Sequence[np.ndarray | str | os.PathLike | None] | None = None, *,
                    workers: int | None = None, near_similarity: float = NEAR_SIMILARITY,
                    ) -> list[Copy]:
    """Which of these images are exact or near copies of the model's training/validation images.

    sha256s: the hex sha256 of each file's bytes ('' when unreadable). images, optional and
    aligned with them: a decoded grey image, a path to read, or None; with them, images that
    are not exact copies are looked up by descriptor (when the model carries descriptors).
    Raises MembershipError when the model carries no table (`no_table_reason`).
    """
    table = training_data(model)
    if table is None:
        raise MembershipError(no_table_reason(model))
    out = [Copy("exact", s, 1.0) if s else Copy() for s in exact_split(table, sha256s)]
    if images is None or not table.near_usable:
        return out
    if len(images) != len(out):
        raise ValueError(f"{len(images)} images for {len(out)} hashes")
    todo = [i for i, c in enumerate(out) if not c and images[i] is not None]
    paths = [i for i in todo if not isinstance(images[i], np.ndarray)]
    described = dict(zip(paths, describe_files([images[i] for i in paths], workers)))
    for i in todo:
        if i not in described:
            described[i] = describe(images[i])
    ok = [i for i in todo if described[i] is not None]
    if not ok:
        return out
    ref = table.descriptors
    query = np.stack([described[i] for i in ok])  # (m, 8, D)
    for start in range(0, len(ok), 256):  # bounded memory: 256 x 8 x n similarities at a time
        block = query[start:start + 256]
        sims = (block.reshape(-1, block.shape[2]) @ ref.T).reshape(len(block), 8, -1).max(1)
        best = sims.argmax(1)
        for k, i in enumerate(ok[start:start + 256]):
            s = float(sims[k, best[k]])
            if s >= near_similarity:
                out[i] = Copy("near", split_name(int(table.splits[best[k]])), round(s, 4))
    return out


def copies_summary(copies: Sequence[Copy], table: TrainingData | None) -> dict[str, Any]:
    """Counts for a report: exact / near copies, by split of the training image."""
    by_split: dict[str, int] = {}
    for c in copies:
        if c:
            by_split[c.split] = by_split.get(c.split, 0) + 1
    return {"checked": len(copies),
            "exact": sum(c.kind == "exact" for c in copies),
            "near": sum(c.kind == "near" for c in copies),
            "by_split": dict(sorted(by_split.items())),
            "near_checked": bool(table is not None and table.near_usable),
            "near_similarity": NEAR_SIMILARITY,
            "table_contents": len(table) if table is not None else 0}


# ---------------------------------------------------------------------------- fxscore run

IN_TRAINING = "in_training"  # `fxscore run --mark-training-copies`' optional column


def run_table(model) -> TrainingData:
    """The table `--mark-training-copies` marks rows with; MembershipError when there is none."""
    table = training_data(model)
    if table is None:
        raise MembershipError(f"--mark-training-copies: {no_table_reason(model)}; without it "
                              "no row can be marked")
    return table


class MarkedBatches:
    """Batches of scored rows, each row given IN_TRAINING: the split ('train', 'val',
    'train+val') its file's content was in, by its sha256 column, or '' (not trained on, or
    unreadable). Exact content only: a resized copy of a training image is not marked here
    (`fxscore eval` finds near copies). `close()` closes the batches it wraps."""

    def __init__(self, batches: Iterable[list[dict[str, Any]]], table: TrainingData) -> None:
        self._batches, self._table = batches, table

    def __iter__(self):
        for rows in self._batches:
            for r in rows:
                r[IN_TRAINING] = self._table.split_of(r.get("sha256") or "")
            yield rows

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close:
            close()


# ---------------------------------------------------------------------------- evaluation

def copies_sentence(metrics: dict[str, Any]) -> str:
    """One sentence on an evaluation's training copies (metrics["training_copies"]) for the
    text and HTML reports; '' when there are none to report."""
    c = metrics.get("training_copies")
    if not c:
        return ""
    if not c["available"]:
        return ("Training copies not checked: the model carries no training-data hashes "
                "(exported with --no-training-hashes or by an older fxscore).")
    n = c["exact"] + c["near"]
    if not n:
        return (f"None of the {c['checked']} evaluated images is a copy of the model's "
                f"{c['table_contents']} training and validation images"
                + ("." if c["near_checked"] else " (exact copies checked; the model carries "
                   "no near-copy descriptors)."))
    splits = ", ".join(f"{k} {v}" for k, v in c["by_split"].items())
    what = (f"{n} of {c['checked']} evaluated images are copies of the model's own training or "
            f"validation images ({c['exact']} exact, {c['near']} near; {splits})")
    if c.get("excluded"):
        w = metrics.get("including_training_copies") or {}
        auc = (w.get("roc_auc") or {}).get("value")
        with_them = (f"; with them, ROC-AUC {auc:.3f} on {w['files']} files"
                     if isinstance(auc, float) and auc == auc else "")
        return f"{what}: excluded, the metrics are on the other files{with_them}."
    return (f"{what}: these metrics are optimistic, a model scores its own training images "
            "better than new ones (--exclude-training-copies leaves them out).")


def mark_rows(model, rows: list[dict[str, Any]], files: Sequence[str | os.PathLike] | None,
              *, workers: int | None = None) -> dict[str, Any]:
    """For `fxscore eval`: set row["training_copy"] ('exact:train', 'near:val', '') on every
    scored row and return the summary (`copies_summary`, plus "available", "why" and "files":
    path, copy and similarity of each copy).

    files (aligned with rows) allow near copies; a row with an error can only be an exact
    copy (its bytes were hashed, its pixels not decoded). A model without a table gives
    {"available": False, "why": ...} and sets '' everywhere.
    """
    table = training_data(model)
    if table is None:
        for r in rows:
            r["training_copy"] = ""
        return {"available": False, "why": no_table_reason(model), "checked": len(rows),
                "exact": 0, "near": 0, "by_split": {}, "files": []}
    images = None
    if files is not None:
        images = [None if r.get("error") else f for r, f in zip(rows, files, strict=True)]
    copies = training_copies(model, [r.get("sha256") or "" for r in rows], images,
                             workers=workers)
    for r, c in zip(rows, copies):
        r["training_copy"] = c.text
    return {"available": True, "why": "", **copies_summary(copies, table),
            "files": [{"path": r.get("path", ""), "copy": c.text, "similarity": c.similarity}
                      for r, c in zip(rows, copies) if c]}
