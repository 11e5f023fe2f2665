"""The `fxscore run` job as a library function: list -> resume plan -> score -> write -> summary.

    summary = Summary()
    run_job(model, "xrays", "preds.csv", fmt="csv", summary=summary)   # -> summary, filled in
    summary.exit_code()

The steps are separate functions so that another driver (a cluster scheduler) can reuse the
listing, the resume plan and the writing with its own scoring loop (`score=`):

1. `list_inputs`: the sorted, link-safe walk of `fxscore.files` (or the one file given).
2. `plan_resume`: a first, cheap walk counts the files (progress shows done/total) and checks
   the rows an earlier run left in --out: a path whose content hash differs from its row's
   sha256 is rescored, and with `retry_errors` so is every error row. Only the files that
   already have a row are read (hashed) here; a fresh run only lists.
3. the stale rows are dropped from --out (rewritten atomically) before anything is appended,
   so every path appears exactly once in the finished file;
4. a second walk feeds the files without a row to the scorer (`scoring.score_batches` under a
   memory budget), and the writer appends and fsyncs each batch. DICOM files the selection
   (`dicom=`, `scoring.DicomOptions`: --modality, --for-processing) excludes get no row and are
   counted by reason; compressed DICOM is decoded in worker processes made once per job.

`Summary` carries the counts and timings; it is filled in as the job goes, so a caller that
catches an interrupt or a failure still has what happened up to then (for --summary-json).
"""
from __future__ import annotations

import hashlib
import re
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import exitcodes, scorable
from .cpus import available_cpus, available_memory
from .files import Shard, find_images
from .graph_outputs import MissingOutput, ood_columns, roles_for
from .images import ImageReadError, open_regular
from .model import Model
from .output import Existing, RowWriter, RunIdentity, open_output
from .scoring import (EXCLUDED, SR_ERROR, SR_PATH, DicomOptions, MemoryBudget, Row,
                      make_isolated, score_batches)

MEMORY_FRACTION = 0.5  # default --max-memory: this share of the memory the process may use
FALLBACK_MEMORY = 2 << 30  # when that is unknown
OUT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SR_WARNINGS = 5  # SR failures shown one by one; the rest are counted

Progress = Callable[[str, int, "int | None"], None]  # (stage, done, total)
ScoreFn = Callable[[Iterable[tuple[str, Path]]], Iterator[list[Row]]]


class RunError(Exception):
    """The job cannot start (bad --out name, input missing); the message says what to do."""


# ---- options ---------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2G', '512M', '1.5g', '800MiB', '4096' (bytes) -> bytes; K/M/G/T are powers of 1024."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"expected a size such as 2G, 512M or 800MiB, got {text!r}")
    number, unit = float(m.group(1)), m.group(2).lower()
    value = int(number * 1024 ** " kmgt".index(unit or " "))
    if value < 1:
        raise ValueError(f"the size must be positive, got {text!r}")
    return value


def default_max_memory() -> int:
    """MEMORY_FRACTION of what this process may use (cgroup limit or available RAM)."""
    limit = available_memory()
    return int(limit * MEMORY_FRACTION) if limit else FALLBACK_MEMORY


def format_size(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n}B"


def output_format(out: str, fmt: str | None) -> str:
    """The format for --out: its extension (.csv, .jsonl, .ndjson) or, without one (and for
    stdout '-'), `fmt`, default csv. An unknown extension, or one contradicting `fmt`, raises
    RunError: a .parquet or .tsv must never be written as CSV behind the user's back."""
    if out == "-":
        return fmt or "csv"
    suffix = Path(out).suffix.lower()
    if not suffix:
        return fmt or "csv"
    known = OUT_SUFFIXES.get(suffix)
    if known is None:
        raise RunError(f"--out {out}: fxscore writes CSV (.csv) or JSON lines (.jsonl, .ndjson), "
                       f"not '{suffix}'; choose one of those extensions (or none, with --format)")
    if fmt and fmt != known:
        raise RunError(f"--out {out} ends in '{suffix}' but --format is {fmt}; drop --format or "
                       f"use a matching extension")
    return known


# ---- the summary -----------------------------------------------------------------------------

@dataclass
class Summary:
    """What a run did; `to_dict()` is what --summary-json writes."""

    input: str = ""
    out: str = ""
    format: str = ""
    model_id: str = ""
    model_path: str = ""
    model_integrity: str = ""  # verified (digest, pinned) or why not (fxscore.model)
    positive_class: str = ""
    threshold: float | None = None
    shard: str | None = None
    max_memory: int | None = None
    candidates: int = 0  # files listed this run (in this shard)
    scored: int = 0
    failed: int = 0  # error rows written by this run
    already_done: int = 0  # rows kept from --out (content unchanged)
    changed: int = 0  # rows dropped and rescored: content changed since
    retried: int = 0  # error rows dropped and rescored (--retry-errors)
    earlier_failed: int = 0  # error rows from earlier runs still in --out
    cut_bytes: int = 0  # half-written last record removed from --out
    ignored: Counter = field(default_factory=Counter)  # reason (".txt", ...) -> files
    excluded: Counter = field(default_factory=Counter)  # scorable reason ("CT", ...) -> files
    sr_out: str | None = None
    sr_written: int = 0  # DICOM SRs written (--sr-out)
    sr_failed: int = 0  # SRs that could not be written (their rows are error rows)
    ood_flagged: int = 0  # rows of this run flagged out of distribution (ood = true)
    heatmaps: str | None = None  # --heatmaps folder
    heatmaps_written: int = 0
    heatmaps_skipped: int = 0  # the file changed, or could not be read again, after scoring
    links_not_followed: Counter = field(default_factory=Counter)  # kind -> links
    unlisted_folders: int = 0
    peak_budget_bytes: int = 0  # the most decoded bytes the budget held at once
    started_at: str = ""
    listing_s: float = 0.0
    scoring_s: float = 0.0
    total_s: float = 0.0
    code: int | None = None  # set by the caller when the run is interrupted or fails
    reason: str = ""
    _t0: float = field(default=0.0, repr=False)

    def start(self) -> None:
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._t0 = time.monotonic()

    def stop(self) -> None:
        if self._t0:
            self.total_s = round(time.monotonic() - self._t0, 3)

    @property
    def failed_total(self) -> int:
        """Error rows in --out once the run is over."""
        return self.failed + self.earlier_failed

    @property
    def excluded_total(self) -> int:
        return sum(self.excluded.values())

    @property
    def all_excluded(self) -> bool:
        """Files were found, and every one this run looked at was excluded (none in --out)."""
        return bool(self.excluded_total) and not (self.scored or self.failed
                                                   or self.already_done)

    def exit_code(self) -> int:
        if self.code is not None:
            return self.code
        return exitcodes.worst(
            exitcodes.SOME_FAILED if self.failed_total or self.unlisted_folders else 0,
            exitcodes.NOTHING_TO_SCORE if self.candidates == 0 or self.all_excluded else 0)

    def exit_reason(self) -> str:
        if self.reason:
            return self.reason
        code = self.exit_code()
        if code == exitcodes.SOME_FAILED:
            parts = []
            if self.failed_total:
                parts.append(f"{self.failed_total} file(s) could not be read")
            if self.unlisted_folders:
                parts.append(f"{self.unlisted_folders} folder(s) could not be listed")
            return "; ".join(parts)
        if code == exitcodes.NOTHING_TO_SCORE:
            if self.candidates and self.all_excluded:
                return ("nothing to score: every file was excluded "
                        f"({scorable.describe(self.excluded)})")
            return "nothing to score: no candidate files"
        return "ok"

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d.pop("code"), d.pop("reason")
        timings = {k: d.pop(k) for k in ("started_at", "listing_s", "scoring_s", "total_s")}
        done = self.scored + self.failed
        timings["files_per_s"] = round(done / self.scoring_s, 2) if self.scoring_s else None
        d["ignored"] = dict(sorted(self.ignored.items()))
        d["ignored_total"] = sum(self.ignored.values())
        d["excluded"] = dict(sorted(self.excluded.items()))
        d["excluded_total"] = self.excluded_total
        d["links_not_followed"] = dict(sorted(self.links_not_followed.items()))
        d["failed_total"] = self.failed_total
        return {"command": "run", **d, "timings": timings, "exit_code": self.exit_code(),
                "reason": self.exit_reason()}


# ---- the steps -------------------------------------------------------------------------------

def list_inputs(root: Path, *, shard: Shard | None = None, follow_links: bool = False,
                counts: Counter | None = None,
                onerror: Callable[[Path, OSError], None] | None = None,
                on_ignored: Callable[[str, str], None] | None = None,
                ) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every file to score under `root`; a file root is itself."""
    root = Path(root)
    if root.is_dir():
        return find_images(root, shard=shard, counts=counts, onerror=onerror,
                           follow_links=follow_links, on_ignored=on_ignored)
    # A file named on the command line is scored whatever its name (and an error row says
    # why when it is no image); open_regular keeps a FIFO from blocking.
    return iter([(root.name, root)] if shard is None or root.name in shard else [])


def sha256_regular(path: Path) -> str | None:
    """sha256 of a regular file's bytes, or None if it cannot be read now (never blocks)."""
    try:
        with open_regular(path) as f:
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
    except (OSError, ImageReadError):
        return None


@dataclass
class ResumePlan:
    candidates: int = 0  # files listed
    kept: int = 0  # listed, with a row in --out that stays
    changed: set[str] = field(default_factory=set)  # rows to drop: content changed since
    retried: set[str] = field(default_factory=set)  # error rows to drop (--retry-errors)

    @property
    def stale(self) -> set[str]:
        return self.changed | self.retried

    @property
    def todo(self) -> int:
        """Files this run will score (as far as the listing knows)."""
        return self.candidates - self.kept


def plan_resume(found: Iterable[tuple[str, Path]], existing: Existing, *,
                retry_errors: bool = False, workers: int = 1,
                progress: Progress | None = None) -> ResumePlan:
    """Walk `found` once: count it, and decide for each path with a row in --out whether the row
    stays (same content) or is rescored (content changed, or an error row with retry_errors).

    A row without a sha256 (the file could not be read at all) stays unless retry_errors; a
    file that cannot be read now keeps its row too: nothing says its content changed.
    """
    plan = ResumePlan()
    rows = existing.rows
    window: deque[tuple[str, str, Future]] = deque()

    def settle(rel: str, expected: str, fut: Future) -> None:
        current = fut.result()
        if current is not None and current != expected:
            plan.changed.add(rel)
        else:
            plan.kept += 1

    if progress:
        progress("listing", 0, None)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fxscore-hash") as pool:
        try:
            for rel, path in found:
                plan.candidates += 1
                if progress and plan.candidates % 256 == 0:
                    progress("listing", plan.candidates, None)
                done = rows.get(rel)
                if done is None:
                    continue
                if retry_errors and done.error:
                    plan.retried.add(rel)
                elif not done.sha256:
                    plan.kept += 1
                else:
                    window.append((rel, done.sha256, pool.submit(sha256_regular, path)))
                    while len(window) > 4 * max(1, workers):
                        settle(*window.popleft())
            while window:
                settle(*window.popleft())
        finally:
            for *_, fut in window:
                fut.cancel()
    if progress:
        progress("listing", plan.candidates, plan.candidates)
    return plan


def write_rows(writer: RowWriter, batches: Iterable[list[Row]], summary: Summary,
               progress: Progress | None = None, total: int | None = None,
               on_excluded: Callable[[str, str], None] | None = None,
               warn: Callable[[str], None] | None = None, heatmaps=None) -> None:
    """Append each batch (fsynced by the writer) and count it. Excluded files' rows
    (`scoring.EXCLUDED`) are counted by reason, not written; the first SR_WARNINGS SRs that
    could not be written are warned about (all are counted, and are error rows).
    `heatmaps` (a `cam.HeatmapWriter`) writes each batch's heatmaps before its rows, so a row in
    --out always has its heatmap and a resumed run leaves none missing."""
    for rows in batches:
        kept = []
        for r in rows:
            why = r.get(EXCLUDED)
            if why:
                summary.excluded[why] += 1
                if on_excluded:
                    on_excluded(r["path"], why)
            else:
                kept.append(r)
        if kept and heatmaps is not None:
            heatmaps.write(kept)
            summary.heatmaps_written, summary.heatmaps_skipped = heatmaps.written, heatmaps.skipped
        if kept:
            writer.write_batch(kept)
        summary.ood_flagged += sum(1 for r in kept if r.get("ood"))
        failed = sum(1 for r in kept if r["error"])
        summary.failed += failed
        summary.scored += len(kept) - failed
        summary.sr_written += sum(1 for r in kept if r.get(SR_PATH))
        for r in kept:
            if r.get(SR_ERROR):
                summary.sr_failed += 1
                if warn and summary.sr_failed <= SR_WARNINGS:
                    warn(f"warning: {r['error']}"
                         + (" (further SR failures are counted, not shown)"
                            if summary.sr_failed == SR_WARNINGS else ""))
        if progress:
            progress("scoring", summary.scored + summary.failed + summary.excluded_total, total)


def run_job(model: Model, root: str | Path, out: str, *, fmt: str = "csv",
            overwrite: bool = False, batch_size: int = 32, workers: int | None = None,
            shard: Shard | None = None, threshold: float | None = None,
            max_memory: int | None = None, follow_links: bool = False,
            retry_errors: bool = False, summary: Summary | None = None,
            progress: Progress | None = None, warn: Callable[[str], None] | None = None,
            on_ignored: Callable[[str, str], None] | None = None,
            score: ScoreFn | None = None,
            dicom: DicomOptions | None = DicomOptions(),
            heatmaps: str | Path | None = None, heatmaps_for: str = "positive",
            mark_training_copies: bool = False) -> Summary:
    """Score every file under `root` into `out` ("-": stdout), resuming what `out` holds.

    Raises RunError / output.OutputError / model.ModelError before anything is scored when the
    job cannot run, and OutputError when writing fails (what was written stays resumable).
    `score` replaces the local scoring loop (default: `score_batches` with a memory budget of
    `max_memory` bytes, default `default_max_memory()`); it should pass `dicom` on to it.
    `dicom`: the DICOM selection, columns and SRs [default: projection radiographs, no
    columns, no SRs]; None scores every file. Excluded files are counted, and also reported
    to `on_ignored` as "excluded: <reason>".
    `heatmaps`: a folder for one heatmap PNG per scored row (`heatmaps_for` "positive": rows
    labelled the positive class; "all"); the model needs heatmap outputs (RunError otherwise).
    A model with OOD statistics adds the columns ood_score and ood.
    """
    summary = Summary() if summary is None else summary
    summary.start()
    root = Path(root)
    threshold = model.meta.threshold if threshold is None else float(threshold)
    workers = workers or available_cpus()
    max_memory = max_memory or default_max_memory()
    summary.input, summary.out, summary.format = str(root), out, fmt
    summary.model_id, summary.model_path = model.model_id, str(model.path)
    summary.model_integrity = getattr(model, "integrity", "")
    summary.sr_out = str(dicom.sr_out) if dicom and dicom.sr_out else None
    summary.positive_class, summary.threshold = model.meta.positive_class, threshold
    summary.shard = f"{shard.index}/{shard.count}" if shard else None
    summary.max_memory = max_memory
    say = warn or (lambda message: None)
    if not root.exists():
        raise RunError(f"input {root} does not exist")
    marks = None  # --mark-training-copies: the model's training-data table (exact hashes)
    if mark_training_copies:
        from .membership import MembershipError, run_table

        try:
            marks = run_table(model)
        except MembershipError as e:
            raise RunError(str(e)) from None

    if out != "-":
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create the folder of --out {out}: {e.strerror or e}") from None
    heatmap_writer = None
    if heatmaps is not None:
        from .cam import HeatmapWriter

        try:
            heatmap_writer = HeatmapWriter(heatmaps, model, heatmaps_for, workers=workers,
                                           warn=say)
        except MissingOutput as e:
            raise RunError(str(e)) from None
        except OSError as e:
            raise RunError(f"cannot create --heatmaps {heatmaps}: {e.strerror or e}") from None
        summary.heatmaps = str(heatmaps)
    columns = (dicom.columns if dicom else ()) + ood_columns(model)
    if marks is not None:
        from .membership import IN_TRAINING

        columns += (IN_TRAINING,)
    writer, existing = open_output(out, fmt, RunIdentity(model.model_id, threshold, root,
                                                         extra_columns=columns),
                                   overwrite=overwrite)
    isolated = None
    try:
        if existing.cut:
            summary.cut_bytes = existing.cut
            say(f"resuming {out}: removed a half-written last row ({existing.cut} bytes)")

        counts: Counter = Counter()

        def ignored(rel: str, reason: str) -> None:
            if reason.startswith("link outside"):
                summary.links_not_followed[reason[reason.rfind("(") + 1:-1]] += 1
            else:
                summary.ignored[reason] += 1
            if on_ignored:
                on_ignored(rel, reason)

        def unlisted(folder: Path, error: OSError) -> None:
            summary.unlisted_folders += 1
            say(f"warning: cannot list {folder} ({error.strerror or error}); its files are not "
                "scored")

        t = time.monotonic()
        plan = plan_resume(list_inputs(root, shard=shard, follow_links=follow_links,
                                       counts=counts, onerror=unlisted, on_ignored=ignored),
                           existing, retry_errors=retry_errors, workers=workers,
                           progress=progress)
        summary.candidates = plan.candidates
        summary.changed, summary.retried = len(plan.changed), len(plan.retried)
        summary.already_done = plan.kept
        writer.drop(plan.stale)  # atomically, before the first new row
        summary.earlier_failed = existing.failed
        summary.listing_s = round(time.monotonic() - t, 3)

        # The second walk: what was listed may have changed since, which is fine: a file
        # without a row is scored, one with a row is not.
        todo = ((rel, path) for rel, path in
                list_inputs(root, shard=shard, follow_links=follow_links)
                if rel not in existing.rows)
        t = time.monotonic()
        if score is None:
            budget = MemoryBudget(max_memory)
            # one pool of decoder processes for the job (none starts without compressed DICOM)
            isolated = make_isolated(workers, dicom.decode_timeout if dicom else None)
            batches = score_batches(model, todo, batch_size=batch_size, workers=workers,
                                    memory=budget, threshold=threshold, dicom=dicom,
                                    isolated=isolated,
                                    roles=roles_for(model, heatmaps=heatmap_writer is not None))
        else:
            budget, batches = None, score(todo)
        if marks is not None:
            from .membership import MarkedBatches

            batches = MarkedBatches(batches, marks)  # its close() closes the scorer's

        def excluded(rel: str, reason: str) -> None:
            if on_ignored:
                on_ignored(rel, f"excluded: {reason}")

        try:
            if progress:
                progress("scoring", 0, plan.todo)
            write_rows(writer, batches, summary, progress, plan.todo, on_excluded=excluded,
                       warn=say, heatmaps=heatmap_writer)
        finally:
            close = getattr(batches, "close", None)
            if close:
                close()  # stop decoding now, also when writing failed
            summary.scoring_s = round(time.monotonic() - t, 3)
            if budget is not None:
                summary.peak_budget_bytes = budget.peak
    finally:
        if isolated is not None:
            isolated.close()
        summary.stop()
        writer.close()
    return summary
