"""Study-level results from row files: one row per study (`fxscore studies`).

Fracture reading is per study (MURA's headline metric is per study), and `--shard` spreads a
study's images over several output files, so studies are a step after scoring: read every row
file (shards, resumed runs; CSV or JSON lines, as `fxscore run` writes them), group the rows by
StudyInstanceUID (the column `--dicom-columns` adds), or, for rows without one (non-DICOM input,
or a run without `--dicom-columns`), by the folder holding the file, and summarise:

    study, key, images, failed, max_probability, mean_probability, label, threshold, model_id

- key: "StudyInstanceUID" or "folder", saying what `study` is.
- images: rows scored; failed: rows with an error (a study with failed images is incomplete:
  its maximum may be missing the fractured image).
- label: the label at the threshold the rows were scored with, applied to the maximum: a study
  is positive when any of its images is. It is the label of the study's highest-scoring row,
  which is exactly that, whatever the class names are.
- All rows must come from one model and threshold (the rows say which); mixing is refused, as
  is one path appearing in two files with different results.

Output CSV text goes through `fxscore.csvsafe` (formula cells neutralised), input CSV through
its reader, so folder names round-trip.

`write_study_srs` writes one DICOM SR per study (`fxscore studies --sr-out`): for the studies
keyed by StudyInstanceUID, from the scored images' own headers, read again under the folder the
run scored (each file must still hash to its row's sha256: the SR references what was scored).
"""
from __future__ import annotations

import io
import json
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import csvsafe

STUDY_KEY = "StudyInstanceUID"
COLUMNS = ("study", "key", "images", "failed", "max_probability", "mean_probability", "label",
           "threshold", "model_id")
_NEEDED = ("path", "probability", "label", "threshold", "model_id", "error")


class StudiesError(Exception):
    """The row files cannot be combined into studies; the message names the file and why."""


@dataclass
class Study:
    study: str
    key: str  # "StudyInstanceUID" or "folder"
    images: int = 0
    failed: int = 0
    max_probability: float | None = None
    sum_probability: float = 0.0
    label: str = ""
    threshold: float | None = None
    model_id: str = ""

    @property
    def mean_probability(self) -> float | None:
        return self.sum_probability / self.images if self.images else None

    def as_row(self) -> dict[str, Any]:
        return {"study": self.study, "key": self.key, "images": self.images,
                "failed": self.failed,
                "max_probability": _rounded(self.max_probability),
                "mean_probability": _rounded(self.mean_probability), "label": self.label,
                "threshold": self.threshold, "model_id": self.model_id}


def _rounded(p: float | None) -> float | None:
    return None if p is None else round(p, 6)


def read_rows(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The rows of one `fxscore run` output (CSV or JSON lines, told apart by content), with
    probability and threshold as floats (None when empty). A half-written last line (a run
    killed mid-write) is skipped, as resume would cut it."""
    name = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            first = f.read(1)
            f.seek(0)
            records = _json_rows(f, name) if first == "{" else _csv_rows(f, name)
            for number, row in records:
                yield _typed(row, name, number)
    except FileNotFoundError:
        raise StudiesError(f"{name}: no such file") from None
    except UnicodeDecodeError:
        raise StudiesError(f"{name}: not a text file written by fxscore run (not UTF-8)") from None
    except OSError as e:
        raise StudiesError(f"{name}: cannot read ({e.strerror or e})") from None


def _csv_rows(f: io.TextIOBase, name: str) -> Iterator[tuple[int, dict[str, str]]]:
    text = f.read()
    complete = text if text.endswith("\n") else text[:text.rfind("\n") + 1]
    rows = csvsafe.read_rows(io.StringIO(complete, newline=""))
    header = next(rows, None)
    if header is None:
        raise StudiesError(f"{name}: empty file (no header); expected the output of fxscore run")
    missing = [c for c in _NEEDED if c not in header]
    if missing:
        raise StudiesError(f"{name}: not an fxscore run output: no column(s) "
                           f"{', '.join(missing)} in its header")
    for number, cells in enumerate(rows, start=2):
        if len(cells) != len(header):
            raise StudiesError(f"{name}: line {number} has {len(cells)} cells, the header "
                               f"{len(header)}")
        yield number, dict(zip(header, cells))


def _json_rows(f: io.TextIOBase, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(f, start=1):
        if not line.endswith("\n"):
            return  # half-written last record
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise StudiesError(f"{name}: line {number} is not a JSON record") from None
        if not isinstance(rec, dict) or any(c not in rec for c in _NEEDED):
            raise StudiesError(f"{name}: line {number} is not an fxscore run row (needs "
                               f"{', '.join(_NEEDED)})")
        yield number, {k: csvsafe.unescape_bytes(v) if isinstance(v, str) else v
                       for k, v in rec.items()}


def _number(value: Any, what: str, name: str, number: int) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise StudiesError(f"{name}: line {number}: {what} is not a number") from None
    if not math.isfinite(v):
        raise StudiesError(f"{name}: line {number}: {what} is not finite")
    return v


def _typed(row: dict[str, Any], name: str, number: int) -> dict[str, Any]:
    row = dict(row)
    row["probability"] = _number(row.get("probability"), "probability", name, number)
    row["threshold"] = _number(row.get("threshold"), "threshold", name, number)
    row["error"] = row.get("error") or ""
    row["_where"] = f"{name}:{number}"
    return row


def study_of(row: dict[str, Any]) -> tuple[str, str]:
    """(study, key) for a row: its StudyInstanceUID when it has one, else its folder."""
    uid = str(row.get(STUDY_KEY) or "").strip()
    if uid:
        return uid, STUDY_KEY
    folder = posixpath.dirname(str(row["path"]).replace(os.sep, "/"))
    return folder or ".", "folder"


def summarise(rows: Iterable[dict[str, Any]]) -> list[Study]:
    """Rows (from read_rows) -> one Study per study, sorted by key then study."""
    studies: dict[tuple[str, str], Study] = {}
    seen: dict[str, tuple[Any, ...]] = {}
    model: tuple[str, float] | None = None
    for row in rows:
        result = (row["probability"], row["label"], row["error"], row.get("sha256", ""))
        earlier = seen.get(row["path"])
        if earlier is not None:
            if earlier[:-1] != result:
                raise StudiesError(f"{row['_where']}: {csvsafe.text(row['path'])} was already "
                                   f"read with another result from {earlier[-1]}; combine "
                                   "outputs of one run (its shards and resumes) only")
            continue  # the same row twice (a file given twice): count it once
        seen[row["path"]] = result + (row["_where"],)
        if row["threshold"] is not None:
            this = (str(row["model_id"]), row["threshold"])
            if model is None:
                model = this
            elif this != model:
                raise StudiesError(f"{row['_where']}: scored by model {this[0]} at threshold "
                                   f"{this[1]:g}, other rows by {model[0]} at {model[1]:g}; a "
                                   "study summary needs one model and threshold")
        study, key = study_of(row)
        s = studies.get((key, study))
        if s is None:
            s = studies[(key, study)] = Study(study, key)
        if row["error"] or row["probability"] is None:
            s.failed += 1
            continue
        p = row["probability"]
        s.images += 1
        s.sum_probability += p
        if s.max_probability is None or p > s.max_probability:
            s.max_probability, s.label = p, row["label"]
    for s in studies.values():
        if model is not None:
            s.model_id, s.threshold = model
    return [studies[k] for k in sorted(studies)]


def summarise_files(paths: Iterable[str | os.PathLike]) -> list[Study]:
    """read_rows over every file, then summarise."""
    def rows() -> Iterator[dict[str, Any]]:
        for path in paths:
            yield from read_rows(path)
    return summarise(rows())


def studies_csv(studies: Iterable[Study]) -> str:
    """The studies as CSV text: a COLUMNS header, then one line per study."""
    buffer = io.StringIO(newline="")
    csvsafe.write_rows(buffer, COLUMNS, ([row[c] for c in COLUMNS]
                                         for row in (s.as_row() for s in studies)))
    return buffer.getvalue()


def write_studies(studies: Iterable[Study], out: str | os.PathLike) -> None:
    """Write `studies_csv` to the file `out` atomically (the old file, or the complete new
    one; never half of it). An existing `out` that is not a regular file is refused: the
    atomic rename would replace a device such as /dev/null."""
    import stat

    from .atomicfile import write_files

    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise StudiesError(f"{os.fspath(out)}: not a regular file; --out must be a file "
                           "(or '-' for stdout)")
    write_files({out: studies_csv(studies)})


@dataclass
class StudySRs:
    """What `write_study_srs` did: SR files written, and the studies it could not write."""
    written: list[str]
    failed: list[str]  # one message per study
    without_uid: int  # studies keyed by folder: no StudyInstanceUID to file an SR in


def write_study_srs(rows: Iterable[dict[str, Any]], root: str | os.PathLike, model_info:
                    dict[str, Any], out_dir: str | os.PathLike) -> StudySRs:
    """One study SR (`fxscore.sr.write_study_sr`) per StudyInstanceUID among the rows, over its
    scored images. `root` is the folder the rows' paths are relative to (the run's INPUT);
    `model_info` names the model (name, version, model_id, positive_class), which must be the
    one that scored the rows. A study whose files are missing, changed since scoring, or lack
    what an SR needs is reported in `failed` and written for none of its images."""
    import hashlib
    import io as _io

    from . import dicom, sr
    from .images import ImageReadError, open_regular

    images: dict[str, list[dict[str, Any]]] = {}
    folders: set[str] = set()
    seen: set[str] = set()
    for row in rows:
        if row["path"] in seen:
            continue
        seen.add(row["path"])
        study, key = study_of(row)
        if key != STUDY_KEY:
            folders.add(study)
            continue
        images.setdefault(study, [])
        if row["model_id"] and str(row["model_id"]) != str(model_info["model_id"]):
            raise StudiesError(f"{row['_where']}: scored by model {row['model_id']}, not by "
                               f"the model given ({model_info['model_id']}); an SR must name "
                               "the model that scored it")
        if not row["error"] and row["probability"] is not None:
            images[study].append(row)
    result = StudySRs([], [], len(folders))
    for study, scored in sorted(images.items()):
        if not scored:
            result.failed.append(f"study {study}: none of its images was scored; no SR")
            continue
        try:
            sources = []
            for row in scored:
                path = Path(root) / row["path"]
                with open_regular(path) as f:
                    data = f.read()
                if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
                    raise sr.SRError(f"{path} has changed since it was scored (its sha256 "
                                     "differs from the row's); score it again")
                ds = dicom.read_header(_io.BytesIO(data), str(path)).ds
                if str(ds.get(STUDY_KEY) or "").strip() != study:
                    raise sr.SRError(f"{path}: its StudyInstanceUID is not {study}, as its "
                                     "row says; score it again")
                sources.append(ds)
            out = sr.write_study_sr(sources, [r["probability"] for r in scored],
                                    [r["label"] for r in scored], scored[0]["threshold"],
                                    model_info, out_dir)
            result.written.append(str(out))
        except (sr.SRError, ImageReadError) as e:
            result.failed.append(f"study {study}: {e}")
        except OSError as e:
            result.failed.append(f"study {study}: {e.filename or ''} {e.strerror or e}".strip())
        except Exception as e:  # noqa: BLE001 - highdicom's messages can quote PHI: kind only
            result.failed.append(f"study {study}: {type(e).__name__} while building its SR "
                                 "from the images' headers")
    return result
