"""The fxscore command line: a thin click layer over the library modules.

Command docstrings are the help. Library functions return data; only this module prints.
Exit codes (all commands, `fxscore.exitcodes`): 0 success; 1 fatal error (missing model, bad
input folder, full disk, ...); 2 usage error; 3 the job finished but some files could not be
read (see the error column); 4 leak found (audit --fail-on-leak); 5 nothing to score;
130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Signals are handled once, for every
command, in `_invoke_interruptibly`.
"""
from __future__ import annotations

import click

from . import __version__

from . import exitcodes
from .rayoptions import check_options as check_ray_options, ray_options

EXIT_SOME_FAILED = exitcodes.SOME_FAILED
# The same command as the README's: fxscore is installed from its source folder.
TRAIN_HINT = 'this command needs PyTorch: pip install ".[train]" (in the fxscore source folder)'


def _plural(n: int, word: str, plural: str | None = None) -> str:
    """'1 file', '2 files' (plural: the word's plural when it is not word + 's')."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def require_torch_stage(stage: str):
    """Import fxscore.<stage> lazily; without torch, tell the user how to get it."""
    import importlib

    try:
        return importlib.import_module(f"fxscore.{stage}")
    except ImportError as e:
        if getattr(e, "name", "") in ("torch", "torchvision", "onnx") or "torch" in str(e):
            raise click.ClickException(f"{TRAIN_HINT} ({e})") from e
        raise


INTERRUPT_HINT = "fxscore.interrupt_hint"  # key in click's ctx.meta


def set_interrupt_hint(text: str) -> None:
    """What the one line an interrupted command prints goes on to say, e.g. how to resume."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[INTERRUPT_HINT] = text


def _invoke_interruptibly(ctx: click.Context, invoke):
    """Run a command so that Ctrl-C exits 130 and SIGTERM 143, each with ONE line on stderr.

    The first SIGINT raises KeyboardInterrupt in the main thread (SIGTERM raises
    exitcodes.Terminated, a KeyboardInterrupt), so every command's clean-up (finally blocks,
    flushing, removing half-made files) runs the same way for both. From then on both signals
    are ignored: pressing Ctrl-C again cannot cut the clean-up short with a second traceback
    (from a thread join, say). Click's "Aborted!" never appears. The line is
    "interrupted (Ctrl-C); <hint>", the hint set by the command with `set_interrupt_hint`.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return invoke()  # signal handlers can only be set from the main thread
    fired = []

    def handler(signum, frame):
        fired.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise exitcodes.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return invoke()
    except KeyboardInterrupt as e:
        code = exitcodes.interrupt_code(e)
        what = "terminated (SIGTERM)" if code == exitcodes.TERMINATED else "interrupted (Ctrl-C)"
        hint = ctx.meta.get(INTERRUPT_HINT)
        click.echo(f"{what}; {hint}" if hint else what, err=True)
        ctx.exit(code)
    finally:
        if not fired:  # after a signal the process is on its way out: stay deaf to more
            for s, h in previous.items():
                signal.signal(s, h)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        return _invoke_interruptibly(ctx, lambda: super(_Group, self).invoke(ctx))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="fxscore")
def cli() -> None:
    """Bone-fracture classification of X-rays.

    \b
    fxscore run ./xrays --out preds.csv      score a folder tree (no PyTorch needed)
    fxscore eval ./test --report out/        evaluate on labelled folders
    fxscore info model.onnx                  what a model carries (classes, threshold, ...)
    fxscore explain knee.png --out h.png     score one X-ray and show where the model looked
    fxscore augment m.onnx --out m2.onnx     add heatmap outputs / OOD statistics to a model
    fxscore wrap their.onnx --out fx.onnx ...  bring an ONNX classifier from elsewhere
    fxscore audit ./data                     find train/test leakage and shortcuts
    fxscore split ./data --out ./clean       make a leak-free split
    fxscore train ./data --out runs/r18      train ResNet18  (needs the [train] extra)
    fxscore export runs/r18 --out model.onnx                  (needs the [train] extra)

    \b
    Shell completion (bash; zsh and fish likewise, see the README):
      eval "$(_FXSCORE_COMPLETE=bash_source fxscore)"
    """
    _quiet_pydicom()


def _quiet_pydicom() -> None:
    """pydicom's warnings and log lines quote raw element values (a patient's name, an ID):
    logs of a batch job must not carry them, so they are silenced process-wide; the error rows
    say what was wrong with a file without quoting it."""
    import logging
    import warnings

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


# ---- run ----------------------------------------------------------------------------------

model_option = click.option(
    "--model", "-m", "model_path", type=click.Path(dir_okay=False), default=None,
    help="fxscore ONNX model (made by `fxscore export`) [default: $FXSCORE_MODEL, else the "
         "model packaged with fxscore]")


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from .files import Shard

    try:
        return Shard.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _parse_modality(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]):
    from .scorable import parse_modalities

    try:
        return parse_modalities(value or None)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _parse_dicom_columns(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return ()
    from .identifiers import ColumnError, parse_names

    try:
        return parse_names(value)
    except ColumnError as e:
        hint = ("; a bare --dicom-columns must not be followed by INPUT: put INPUT first, or "
                "write --dicom-columns default" if "/" in value or "." in value else "")
        raise click.BadParameter(f"{e}{hint}") from None


DECODE_TIMEOUT = 60.0  # seconds; fxscore.isolate.DEFAULT_TIMEOUT (checked by the tests)


def _parse_max_memory(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from .runner import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@cli.command("run")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@model_option
@click.option("--out", "-o", default="-", show_default=True,
              help="output file, .csv or .jsonl/.ndjson (missing folders are created); '-' "
                   "writes to stdout (no resume)")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="[default: from the --out extension; csv for '-' or no extension]")
@click.option("--overwrite", is_flag=True, help="start --out afresh instead of resuming it")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, metavar="T",
              help="label as the positive class when probability >= T (your operating point, "
                   "chosen on your own validation data) [default: the model's]")
@click.option("--retry-errors", is_flag=True,
              help="when resuming, rescore the files whose rows are errors (e.g. after "
                   "installing a decoder or fixing permissions)")
@click.option("--follow-links", is_flag=True,
              help="follow symlinks that lead outside INPUT (like find -L); by default they "
                   "are counted and not followed")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="images per model call")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="onnxruntime threads [default: the CPUs this process may use, "
                   "affinity and cgroup quota included]")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="image decoding threads, overlapped with the model [default: as --threads]")
@click.option("--max-memory", callback=_parse_max_memory, metavar="SIZE",
              help="bytes of images being decoded at once, e.g. 2G or 512M; a larger image is "
                   "decoded alone [default: half of the memory this process may use, cgroup "
                   "limit included]")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="onnxruntime execution provider (cuda needs "
                                      "onnxruntime-gpu)")
@click.option("--shard", callback=_parse_shard, metavar="K/N",
              help="score only part K of N, K counted from 1; N runs with K = 1..N cover "
                   "every file exactly once")
@click.option("--list-ignored", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="write the files not scored (not X-ray files, links not followed, DICOM "
                   "files excluded) to FILE, a CSV of path,reason")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="write counts, timings, model id, exit code and reason to FILE (also when "
                   "the run is interrupted or fails)")
@click.option("--quiet", "-q", is_flag=True, help="no progress or summary on stderr")
@click.option("--modality", "modalities", multiple=True, callback=_parse_modality,
              metavar="CODES|all",
              help="DICOM modalities to score, e.g. CR,DX,RG, or all; other DICOM images are "
                   "excluded (no row; counted by reason). Non-DICOM images are always scored "
                   "[default: CR,DX,RG, projection radiography]")
@click.option("--for-processing", is_flag=True,
              help="also score For Processing DICOM images (raw detector data), with a "
                   "warning: the model was validated on For Presentation images [default: "
                   "excluded]")
@click.option("--dicom-columns", is_flag=False, flag_value="default", default=None,
              callback=_parse_dicom_columns, metavar="[NAMES]",
              help="add DICOM attributes as columns after the fixed ones (empty for "
                   "non-DICOM files). Alone: StudyInstanceUID, SeriesInstanceUID, "
                   "SOPInstanceUID, Modality, BodyPartExamined, ViewPosition; or DICOM "
                   "keywords, with 'default' for that set (default,PatientID). Attributes "
                   "that identify a person or a visit (PatientID, PatientName, dates, "
                   "AccessionNumber, ...) only when named, with a warning")
@click.option("--sr-out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="write one DICOM Structured Report per scored DICOM image to DIR "
                   "(DIR/<SR SOP Instance UID>.dcm, in the image's study), before its row; "
                   "a rerun rewrites the same files")
@click.option("--decode-timeout", type=click.FloatRange(min=0, min_open=True),
              default=DECODE_TIMEOUT, show_default=True, metavar="SECONDS",
              help="time limit for decoding one compressed DICOM file, which runs in a worker "
                   "process: an overrun or a decoder crash makes that file an error row")
@click.option("--heatmaps", type=click.Path(file_okay=False), default=None,
              metavar="DIR",
              help="write one heatmap PNG per scored image to DIR (where the model found "
                   "evidence for the positive class), named after the row's path, %-escaped; "
                   "the model needs heatmap outputs (fxscore augment). Derived patient images: "
                   "store them like the inputs")
@click.option("--heatmaps-for", type=click.Choice(["positive", "all"]), default="positive",
              show_default=True,
              help="which scored images get a heatmap: those labelled the positive class, or all")
@click.option("--mark-training-copies", is_flag=True,
              help="add a column in_training: train, val or train+val when the file's content "
                   "(sha256) was among the model's training or validation images, else empty. "
                   "Exact copies only; `fxscore eval` also finds near copies")
@ray_options
def run(input_path: str, model_path: str | None, out: str, fmt: str | None, overwrite: bool,
        threshold: float | None, retry_errors: bool, follow_links: bool, batch_size: int,
        threads: int | None, workers: int | None, max_memory: int | None, provider: str,
        shard, list_ignored: str | None, summary_json: str | None, quiet: bool,
        modalities, for_processing: bool, dicom_columns: tuple[str, ...], sr_out: str | None,
        decode_timeout: float, heatmaps: str | None, heatmaps_for: str,
        mark_training_copies: bool, **ray_settings) -> None:
    """Score every X-ray under INPUT (a folder, or one file); write one row per file.

    Folders are searched recursively in sorted order; hidden files and folders are skipped.
    Files are taken by extension (.jpg .jpeg .png .bmp .tif .tiff .gif .webp .dcm; any case)
    or, without one, by the DICOM marker. The format is read from the content, not the name.
    Symlinks leading outside INPUT are not followed unless --follow-links; they are counted.

    Columns: path (relative to INPUT), probability (of the model's positive class, e.g.
    "fractured"), label (the positive class if probability >= threshold, else the other),
    threshold, model_id (sha256 prefix of the model file), sha256 (of the file's bytes as
    scored; empty if it could not be read), error (why the file could not be read; empty
    when scored); with a model that carries OOD statistics also ood_score (distance to the
    images the model was made for) and ood (1: unlike them, do not rely on the score).

    Resume: rerunning with the same --out appends the files not yet in it, also after a
    crash, kill or Ctrl-C. A file whose content changed since its row was written is
    rescored (its old row dropped), --retry-errors rescores error rows, and each path appears
    once. An --out written for another INPUT folder, model or --threshold is refused;
    --overwrite starts afresh.

    Memory: images are decoded under one budget (--max-memory), at reduced scale where the
    format allows but never below the model's input size.

    DICOM: only projection radiographs (CR, DX, RG) are scored by default (--modality);
    structured reports, key objects, presentation states, RT objects, DICOMDIRs, files without
    pixel data, other modalities and For Processing images are excluded: no row, counted by
    reason in the summary, and the exit code is not changed. Compressed pixel data is decoded
    in worker processes (--decode-timeout). --dicom-columns adds identifiers to match rows
    back to studies (`fxscore studies` then gives one row per study); --sr-out writes a DICOM
    SR per scored image for the PACS.

    Heatmaps: --heatmaps DIR writes, before each row, DIR/<the row's path, %-escaped>.png:
    the radiograph with its class activation map (coarse: one cell per 32 x 32 input
    pixels); a resumed run writes those of the rows it adds.

    \b
    Examples:
      fxscore run ./xrays --model model.onnx --out preds.csv
      fxscore run ./xrays -m model.onnx --format jsonl --out - > preds.jsonl
      fxscore run ./xrays -m model.onnx --out preds.csv      # again: resumes
      fxscore run ./xrays -m model.onnx --out preds.csv --threshold 0.3 --overwrite
      # a Slurm job array (sbatch --array=1-8); each task writes its own file:
      fxscore run /pacs/export -m model.onnx --shard $SLURM_ARRAY_TASK_ID/8 \\
          --out preds-$SLURM_ARRAY_TASK_ID.csv --summary-json run-$SLURM_ARRAY_TASK_ID.json
      # a PACS export: study identifiers in the rows, an SR per image, then per study:
      fxscore run /pacs/export -m model.onnx --dicom-columns --sr-out sr/ --out rows.csv
      fxscore studies rows.csv --out studies.csv

    \b
    Exit codes: 0 every file scored; 3 finished, but some files could not be read (rows with
    an error in --out, from this run or an earlier one) or some folders not listed; 5 nothing
    to score (no candidate files under INPUT, in this shard, or every one excluded);
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM): rerun to resume; 1 fatal error (model,
    input or output unusable, disk full); 2 usage error.
    """
    from pathlib import Path

    from .model import ModelError, load_model
    from .output import OutputError
    from .runner import RunError, Summary, output_format, run_job
    from .scoring import DicomOptions

    ctx = click.get_current_context()
    check_ray_options(ctx)  # --ray with an option it cannot serve: exit 2 before any work
    summary = Summary(input=input_path, out=out)
    dicom = DicomOptions(modalities=modalities, for_processing=for_processing,
                         columns=dicom_columns, sr_out=Path(sr_out) if sr_out else None,
                         decode_timeout=decode_timeout)
    _warn_dicom_options(dicom)
    resume = (f"the rows written so far are kept: rerun the same command to resume {out}"
              if out != "-" else "the rows on stdout are complete (stdout cannot be resumed; "
                                 "use --out FILE)")
    try:
        fmt = output_format(out, fmt)
    except RunError as e:
        raise click.BadParameter(str(e), param_hint="'--out'") from None
    listing, started = None, False
    try:
        try:
            if list_ignored:
                Path(list_ignored).parent.mkdir(parents=True, exist_ok=True)
                listing = open(list_ignored, "w", encoding="utf-8", newline="")
                listing.write("path,reason\n")
            model = load_model(model_path, providers=(provider,), threads=threads)
        except OSError as e:
            raise RunError(f"cannot write {list_ignored}: {e.strerror or e}") from None
        set_interrupt_hint(resume)
        started = True
        with _RunProgress(summary, enabled=not quiet) as progress:
            if ray_settings["ray"]:
                from .rayrun import ray_job  # only --ray pays for its imports

                job = ray_job(threads=threads, workers=workers, **ray_settings)
            else:
                job = run_job
            # (with --ray, check_ray_options above has refused --heatmaps)
            heatmap_kw = ({"heatmaps": heatmaps, "heatmaps_for": heatmaps_for}
                          if heatmaps else {})
            if mark_training_copies:
                heatmap_kw["mark_training_copies"] = True
            job(model, input_path, out, fmt=fmt, overwrite=overwrite, batch_size=batch_size,
                    workers=workers or threads, shard=shard, threshold=threshold,
                    max_memory=max_memory, follow_links=follow_links,
                    retry_errors=retry_errors, summary=summary, progress=progress,
                    warn=progress.write, on_ignored=_ignored_writer(listing), dicom=dicom,
                    **heatmap_kw)
    except KeyboardInterrupt as e:
        summary.code = exitcodes.interrupt_code(e)
        summary.reason = ("terminated (SIGTERM)" if summary.code == exitcodes.TERMINATED
                          else "interrupted (Ctrl-C)")
        _write_summary(summary_json, summary)
        raise
    except (RunError, ModelError, OutputError) as e:
        message = str(e)
        if started and isinstance(e, ModelError) and out != "-" and summary.scored + summary.failed:
            message += f"; the rows written so far are kept in {out}"
        summary.code, summary.reason = exitcodes.FATAL, message
        _write_summary(summary_json, summary)
        raise click.ClickException(message) from None
    finally:
        if listing is not None:
            listing.close()
    _write_summary(summary_json, summary)
    if not quiet:
        for line in _run_report(summary):
            click.echo(line, err=True)
    code = summary.exit_code()
    if code == exitcodes.NOTHING_TO_SCORE and summary.all_excluded:
        click.echo(f"warning: nothing to score: every file under {input_path}"
                   + (f" in shard {summary.shard}" if summary.shard else "")
                   + " was excluded (see --modality and --for-processing)", err=True)
    elif code == exitcodes.NOTHING_TO_SCORE:
        click.echo(f"warning: nothing to score: no X-ray files under {input_path}"
                   + (f" in shard {summary.shard}" if summary.shard else "")
                   + (" (see the ignored files above)" if summary.ignored and not quiet else ""),
                   err=True)
    if code:
        ctx.exit(code)


def _warn_dicom_options(dicom) -> None:
    """The warnings some DICOM options call for, before anything runs (also with --quiet)."""
    from .identifiers import phi_named
    from .scorable import FOR_PROCESSING_WARNING

    phi = phi_named(dicom.columns)
    if phi:
        click.echo(f"warning: --dicom-columns {', '.join(phi)} identify a person or a visit "
                   "(HIPAA identifiers): the output holds PHI; keep it where PHI may be",
                   err=True)
    if dicom.for_processing:
        click.echo(f"warning: {FOR_PROCESSING_WARNING}", err=True)


def _ignored_writer(stream):
    """on_ignored callback writing path,reason CSV lines (neutralised like every fxscore CSV)."""
    if stream is None:
        return None
    from . import csvsafe

    def write(rel: str, reason: str) -> None:
        stream.write(csvsafe.format_row([csvsafe.text(rel), csvsafe.text(reason)]))

    return write


class _RunProgress:
    """The run's (stage, done, total) callback: a bar for listing, then one for scoring."""

    def __init__(self, summary, *, enabled: bool) -> None:
        self.summary, self.enabled, self.bar, self.stage = summary, enabled, None, None

    def __enter__(self):
        return self

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from .progress import progress_bar

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = progress_bar(stage, total, enabled=self.enabled)
        bar = self.bar
        if total is not None and bar.total != total:
            bar.total = total
        if stage == "scoring" and self.summary.failed:
            bar.set_note(f"{self.summary.failed} failed")
        if done > bar.n:
            bar.update(done - bar.n)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            click.echo(message, err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    def __exit__(self, *exc) -> None:
        self.close()


def _write_summary(path: str | None, summary) -> None:
    """--summary-json, written atomically; a failure to write it is reported, not raised."""
    if not path:
        return
    import json
    from pathlib import Path

    from .atomicfile import write_files

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_files({path: json.dumps(summary.to_dict(), indent=2) + "\n"})
    except OSError as e:
        click.echo(f"warning: cannot write --summary-json {path}: {e.strerror or e}", err=True)


def _counted(counter, limit: int = 6) -> str:
    """Counter -> '.py 12, .txt 5, other 3' (largest first)."""
    items = counter.most_common()
    shown = [f"{k} {n}" for k, n in items[:limit]]
    rest = sum(n for _, n in items[limit:])
    return ", ".join(shown + ([f"other {rest}"] if rest else []))


def _integrity_short(text: str) -> str:
    """'verified', or what the model's integrity line says is missing (fxscore.model)."""
    if text.startswith("verified"):
        return "verified"
    return text.split(" (")[0] or "unverified"


def _run_report(s) -> list[str]:
    """The summary lines on stderr after a run."""
    ignored = sum(s.ignored.values())
    parts = [f"{s.scored} scored", f"{s.failed} failed",
             f"{ignored} ignored" + (f" ({_counted(s.ignored)})" if ignored else "")]
    if s.already_done:
        parts.append(f"{s.already_done} already in {s.out}")
    if s.changed:
        parts.append(f"{s.changed} rescored (content changed since scored)")
    if s.retried:
        parts.append(f"{s.retried} error rows retried")
    if s.excluded_total:
        parts.append(f"{s.excluded_total} excluded")
    lines = [", ".join(parts) + f"; model {s.model_id} ({_integrity_short(s.model_integrity)}), "
             f"probability of '{s.positive_class}', threshold {s.threshold:g}"
             + ("" if s.out == "-" else f" -> {s.out}")]
    if s.excluded_total:
        from .scorable import describe

        lines.append(f"excluded: {describe(s.excluded)} (no rows; --modality and "
                     "--for-processing choose what is scored)")
    if s.ood_flagged:
        lines.append(f"{s.ood_flagged} scored image(s) flagged out of distribution (ood = 1: "
                     "unlike the images the model was made for; do not rely on their scores)")
    if s.heatmaps:
        lines.append(f"{_plural(s.heatmaps_written, 'heatmap')} written to {s.heatmaps}"
                     + (f"; {s.heatmaps_skipped} not (the file changed or could not be read "
                        "again, see warnings)" if s.heatmaps_skipped else ""))
    if s.sr_out and (s.sr_written or s.sr_failed):
        lines.append(f"{_plural(s.sr_written, 'DICOM SR')} written to {s.sr_out}"
                     + (f"; {s.sr_failed} could not be written (error rows: rerun with "
                        "--retry-errors)" if s.sr_failed else ""))
    links = sum(s.links_not_followed.values())
    if links:
        kinds = ", ".join(f"{n} to {'a ' if n == 1 else ''}{k}{'' if n == 1 else 's'}"
                          for k, n in s.links_not_followed.most_common())
        lines.append(f"{links} link{'' if links == 1 else 's'} outside INPUT not followed "
                     f"({kinds}; use --follow-links)")
    if s.failed_total:
        lines.append(f"{s.failed_total} file(s) could not be read; see the error column")
    if s.unlisted_folders:
        lines.append(f"{s.unlisted_folders} folder(s) could not be listed (see warnings)")
    return lines

# ---- eval ---------------------------------------------------------------------------------

@cli.command("eval")
@click.argument("data_dir", metavar="DIR", type=click.Path(file_okay=False))
@model_option
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="write predictions.csv, metrics.json and report.html into this folder")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, metavar="T",
              help="probability at or above which an image is called the positive class, "
                   "instead of the model's own threshold; every output uses it (rows, "
                   "confusion matrix, report)")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None,
              metavar="S", help="also report the highest threshold reaching sensitivity S on "
                                "this data (e.g. 0.95), the metrics there, and the command "
                                "that applies it")
@click.option("--target-specificity", type=click.FloatRange(0, 1, min_open=True), default=None,
              metavar="S", help="also report the lowest threshold reaching specificity S on "
                                "this data (e.g. 0.90), the metrics there, and the command "
                                "that applies it")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None,
              help="CSV of path,label (paths relative to DIR) instead of class folders")
@click.option("--groups", "groups_csv", type=click.Path(dir_okay=False), default=None,
              help="CSV of path,group (paths as in predictions.csv, e.g. fractured/a.png; "
                   "group e.g. a patient id): the bootstrap resamples whole groups")
@click.option("--study-level", is_flag=True,
              help="metrics per study (StudyInstanceUID, else the image's folder): a study is "
                   "positive when any image is labelled so, its score is its highest image "
                   "probability; the bootstrap resamples studies (--groups: groups of them)")
@click.option("--bootstrap", "n_bootstrap", default=1000, show_default=True,
              type=click.IntRange(0), help="bootstrap resamples for the 95% intervals; 0: none")
@click.option("--seed", default=0, show_default=True, help="bootstrap random seed")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="images per model call")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="onnxruntime and decoding threads [default: the CPUs this process may use]")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="onnxruntime execution provider")
@click.option("--exclude-training-copies", is_flag=True,
              help="leave out the images that are exact or near copies of the model's own "
                   "training or validation images (the metrics with them are reported too)")
@click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")
def eval_(data_dir: str, model_path: str | None, report_dir: str | None,
          threshold: float | None, target_sensitivity: float | None,
          target_specificity: float | None, labels_csv: str | None, groups_csv: str | None,
          study_level: bool, n_bootstrap: int, seed: int, batch_size: int,
          threads: int | None, provider: str, exclude_training_copies: bool,
          quiet: bool) -> None:
    """Evaluate a model on labelled X-rays: metrics with confidence intervals, and a report.

    DIR holds one folder per class, named as the model's classes (e.g. "fractured" and
    "not fractured"), with images at any depth inside; or any folder plus --labels, a CSV of
    path,label. A folder with one class only is evaluated as far as one class allows (on a
    fractures-only set: sensitivity). Prints scikit-learn's classification report, the
    confusion matrix, sensitivity, specificity, ROC-AUC, average precision, Brier score and
    a reliability table, with percentile-bootstrap 95% intervals (thresholds held fixed).
    --groups resamples whole groups (patients, or copies of one radiograph), which widens the
    intervals honestly when images are not independent.

    Operating point: --threshold T evaluates at T instead of the model's threshold.
    --target-sensitivity / --target-specificity find the threshold that reaches the target
    on this data and print the `fxscore run ... --threshold T` command that applies it. A
    threshold picked on the evaluation data is optimistic there: confirm it on other data.

    --report writes predictions.csv (the columns of `fxscore run` plus true_label),
    metrics.json and a self-contained report.html (figures inline, no external files).

    Study level: fracture reading is per study (MURA's headline metric is). --study-level
    groups the images as `fxscore studies` does (DICOM StudyInstanceUID, else the folder
    holding the image) and computes every metric per study; --report then also writes
    studies.csv, and predictions.csv keeps the images.

    Training copies: a model exported by fxscore knows the sha256 and near-copy descriptors of
    its training and validation images. eval counts the evaluated images that are exact copies
    (same bytes) or near copies (resized, re-encoded, flipped, lightly cropped: descriptor
    similarity >= 0.98) of them and warns, since a model scores its own training images better
    than new ones; --exclude-training-copies leaves them out and reports both.

    \b
    Examples:
      fxscore eval ./test --model model.onnx
      fxscore eval ./test -m model.onnx --target-sensitivity 0.95 --report out/
      fxscore eval ./val -m model.onnx --target-specificity 0.9   # pick a threshold on val
      fxscore eval ./test -m model.onnx --threshold 0.37          # ... and check it on test
      fxscore eval ./flat -m model.onnx --labels labels.csv --groups patients.csv
      fxscore eval ./pacs-export -m model.onnx --study-level --groups patients.csv

    \b
    Exit codes: 0 done; 3 done, but some files could not be read (they are listed and the
    metrics use the readable ones); 1 fatal error (model, folders or CSVs unusable); 2 usage.
    """
    from .evaluate import EvalDataError, evaluate
    from .model import ModelError, load_model
    from .progress import progress_bar
    from .report import format_text, write_report

    try:
        model = load_model(model_path, providers=(provider,), threads=threads)
    except ModelError as e:
        raise click.ClickException(str(e)) from None

    bar = progress_bar("eval", None, unit="file", enabled=not quiet)
    failed_so_far = [0]

    def start(total: int) -> None:
        bar.total = total

    def progress(row: dict) -> None:
        if row["error"]:
            failed_so_far[0] += 1
            bar.set_note(f"{_plural(failed_so_far[0], 'unreadable file')}")
        bar.update(1)

    try:
        ev = evaluate(data_dir, model, labels=labels_csv, groups=groups_csv,
                      threshold=threshold, target_sensitivity=target_sensitivity,
                      target_specificity=target_specificity, n_bootstrap=n_bootstrap,
                      seed=seed, batch_size=batch_size, workers=threads, progress=progress,
                      on_start=start, exclude_training_copies=exclude_training_copies,
                      study_level=study_level)
    except (EvalDataError, ModelError, OSError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if bar.n:
            bar.close()

    click.echo(format_text(ev).rstrip("\n"))
    _echo_operating_points(ev.metrics, data_dir, model_path, model)
    _echo_training_copies(ev.metrics)
    if report_dir:
        try:
            from .gallery import gallery_html

            # fxscore.gallery: mistaken images + heatmaps (images, also at study level)
            ev.gallery_html = gallery_html(model, ev.image_level())
            paths = write_report(ev, report_dir)
        except OSError as e:
            raise click.ClickException(f"cannot write the report to {report_dir}: {e}") from None
        if not quiet:
            click.echo(f"report: {paths['report']} (+ predictions.csv, metrics.json"
                       f"{', studies.csv' if 'studies' in paths else ''})", err=True)
    data = ev.metrics["data"]
    if data.get("unlabelled"):
        examples = ", ".join(f"'{p}'" for p in data["unlabelled_examples"][:3])
        click.echo(f"warning: {_plural(data['unlabelled'], 'image file')} under {data_dir} "
                   f"{'has' if data['unlabelled'] == 1 else 'have'} no row in {labels_csv} "
                   f"and {'was' if data['unlabelled'] == 1 else 'were'} not evaluated (e.g. "
                   f"{examples})", err=True)
    if data.get("one_class"):
        lacking = "specificity" if data["one_class"] == ev.positive_class else "sensitivity"
        click.echo(f"warning: only '{data['one_class']}' images could be evaluated in "
                   f"{data_dir}: {lacking}, ROC-AUC and average precision need both classes "
                   "and are n/a", err=True)
    failed = data.get("unreadable_images", data["unreadable"])
    if failed:
        used = (f"the {data['readable']} studies with a readable image" if study_level
                else f"the {data['readable']} readable ones")
        click.echo(f"warning: {_plural(failed, 'file')} could not be read; the metrics use "
                   f"{used}", err=True)
        click.get_current_context().exit(EXIT_SOME_FAILED)


def _echo_training_copies(m: dict) -> None:
    """How many evaluated images the model was trained or validated on: loud, on stderr."""
    c = m.get("training_copies")
    if not c:
        return
    if not c["available"]:  # metrics.json says why (training_copies.why)
        return
    n = c["exact"] + c["near"]
    if not n:
        return
    splits = ", ".join(f"{k} {v}" for k, v in c["by_split"].items())
    what = (f"{n} of {c['checked']} evaluated images are copies of the model's own training or "
            f"validation images ({c['exact']} exact, {c['near']} near; {splits})")
    if c.get("excluded"):
        w = m["including_training_copies"]
        auc = w["roc_auc"]["value"]
        click.echo(f"\nExcluded {what}. The metrics above are on the other "
                   f"{m['data']['files']} files; with the copies: ROC-AUC "
                   f"{auc:.3f}, sensitivity {w['sensitivity']:.3f}, specificity "
                   f"{w['specificity']:.3f} on {w['files']} files." if auc == auc else
                   f"\nExcluded {what}; the metrics above are on the other "
                   f"{m['data']['files']} files.")
        return
    near = (" Near copies are found by a compact descriptor (the model cannot carry the "
            "pictures): on smooth synthetic images a look-alike can pass, `fxscore audit` "
            "confirms pixel by pixel." if c["near"] else "")
    click.echo(f"WARNING: {what}. A model scores its own training images better than new "
               "ones, so these metrics are optimistic; --exclude-training-copies leaves them "
               f"out (--report's metrics.json lists them).{near}", err=True)


def _echo_operating_points(m: dict, data_dir: str, model_path: str | None, model) -> None:
    """For each threshold found for a target: the command line that applies it, and why it
    is optimistic here."""
    import shlex
    from pathlib import Path

    targets = [(name, p) for name, p in m["operating_points"].items() if name != "model"]
    for name, p in targets:
        what = "sensitivity" if name == "target" else "specificity"
        target = p[f"target_{what}"]
        t = p.get("apply_threshold", p["threshold"])
        t_text = f"{t:.10g}"
        model_arg = f" --model {shlex.quote(model_path)}" if model_path else ""
        src = shlex.quote(model_path) if model_path else shlex.quote(str(model.path))
        out = shlex.quote(f"{Path(src).stem}-t{t_text}.onnx")
        click.echo("")
        sens, spec = (f"{p[k]:.3f}" if p[k] == p[k] else "n/a"  # NaN: one class only
                      for k in ("sensitivity", "specificity"))
        click.echo(f"Operating point for {what} >= {target:g} on {data_dir}: threshold "
                   f"{t_text} (sensitivity {sens}, specificity {spec} here). To apply it:")
        click.echo(f"  fxscore run INPUT{model_arg} --threshold {t_text} --out preds.csv")
        click.echo(f"  fxscore wrap {src} --out {out} --threshold {t_text}   # or keep it in "
                   "a copy of the model")
        click.echo(f"warning: the threshold {t_text} was picked on the evaluation data "
                   f"itself, so its {what} and the other metrics at it are optimistic there; "
                   f"confirm them on images not used to pick it (fxscore eval OTHER"
                   f"{model_arg} --threshold {t_text})", err=True)


# ---- info / wrap --------------------------------------------------------------------------

@cli.command("info")
@click.argument("model_path", metavar="[MODEL]", required=False,
                type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print one JSON document instead")
def info(model_path: str | None, as_json: bool) -> None:
    """Show what an fxscore model carries: classes, threshold, preprocessing, training.

    MODEL defaults to $FXSCORE_MODEL, else the model packaged with fxscore. Prints its name,
    version and id (the sha256 prefix every output row carries), classes and positive class,
    threshold, input size and preprocessing, ONNX opset, precision (fp32 or int8, from the
    graph's operators), integrity (digest verified, or unverified for format-version-1
    files) and the training summary (data fingerprint, best epoch, validation metrics).
    The model is loaded and checked exactly as `fxscore run` would.

    \b
    Examples:
      fxscore info                      # the default model
      fxscore info model.onnx
      fxscore info model.onnx --json | jq .threshold

    Exit codes: 0 shown; 1 the model cannot be loaded (the message says why); 2 usage error.
    """
    import json

    from .info import describe, format_info
    from .model import ModelError, load_model

    try:
        doc = describe(load_model(model_path, threads=1))
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        click.echo(format_info(doc).rstrip("\n"))


def _csv_floats(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from None
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise click.BadParameter(f"expected finite numbers, got {value!r}")
    return values


def _input_size(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    parts = value.replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"expected H or H,W in pixels, got {value!r}") from None
    if len(size) not in (1, 2) or not all(8 <= v <= 4096 for v in size):
        raise click.BadParameter(f"expected H or H,W with each side in 8..4096, got {value!r}")
    return size * 2 if len(size) == 1 else size


THIRD_PARTY_OPTIONS = ("classes", "positive", "input_size", "mean", "std", "output", "layout",
                       "input_range", "resize", "output_name", "check")


@cli.command("wrap")
@click.argument("source", metavar="MODEL", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="the fxscore model to write, *.onnx (written only if every check passes)")
@click.option("--classes", default=None, metavar="A,B",
              help='the two class names, e.g. "fractured,not fractured"')
@click.option("--positive", default=None, metavar="NAME",
              help="the class whose probability the model returns (one of --classes)")
@click.option("--input-size", callback=_input_size, default=None, metavar="H[,W]",
              help="the image size the graph is fed, e.g. 224 or 256,192")
@click.option("--mean", callback=_csv_floats, default=None, metavar="M[,M,M]",
              help="normalisation mean, per channel (one value for 1-channel models), in the "
                   "units of --input-range, e.g. 0.485,0.456,0.406")
@click.option("--std", callback=_csv_floats, default=None, metavar="S[,S,S]",
              help="normalisation std, like --mean")
@click.option("--output", default=None, metavar="logit|probability|softmax:INDEX|probability:INDEX",
              help="what the graph's output is: one logit, one probability, class logits "
                   "(softmax, then column INDEX) or class probabilities (column INDEX)")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw",
              show_default=True, help="the graph's input layout (nhwc: Keras, TensorFlow)")
@click.option("--input-range", type=click.Choice(["1", "255"]), default="1", show_default=True,
              help="the units of the graph's input and of --mean/--std: intensities in [0, 1] "
                   "or 0-255")
@click.option("--resize", type=click.Choice(["bilinear", "bicubic", "lanczos"]),
              default="bilinear", show_default=True, help="resize method (antialiased)")
@click.option("--output-name", default=None, metavar="NAME",
              help="the graph output holding the class scores, when it has several")
@click.option("--check", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="also compare wrapped and original model on up to 16 images of DIR")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, metavar="T",
              help="the threshold to embed [default: 0.5, or the fxscore model's own]")
@click.option("--model-name", default=None, help="[default: the file name, or the model's own]")
@click.option("--model-version", default=None,
              help="stored and shown as given [default: 1, or the fxscore model's own]")
def wrap(source: str, out: str, classes: str | None, positive: str | None,
         input_size: tuple[int, int] | None, mean: tuple[float, ...] | None,
         std: tuple[float, ...] | None, output: str | None, layout: str, input_range: str,
         resize: str, output_name: str | None, check: str | None, threshold: float | None,
         model_name: str | None, model_version: str | None) -> None:
    """Bring a model to fxscore: wrap an ONNX classifier, or re-stamp an fxscore model.

    A third-party ONNX classifier (MONAI, timm, Keras via tf2onnx, ...): say what it takes and
    what it returns, nothing is guessed. wrap checks the input and output shapes, adapts the
    graph to what the scorer feeds (float32 NCHW, 3 grey channels, normalised with --mean and
    --std): a Transpose for NHWC, the first channel for 1-channel models, mean/std divided by
    255 for 0-255 inputs, a dynamic batch axis; and turns the output into the positive class's
    probability inside the graph (a Sigmoid for a logit, Softmax and the INDEX column for class
    logits). Before writing, the result is loaded with the scorer's loader and compared with
    the original graph on generated images (and --check DIR): equal within 1e-5. The file
    carries the fxscore contract with its digest (format version 2).

    An fxscore model: writes a copy with a new --threshold and/or --model-version (or
    --model-name), weights untouched and digest updated; e.g. to keep the operating point
    `fxscore eval` found. No PyTorch needed for either.

    \b
    Examples:
      fxscore wrap densenet.onnx --out fx.onnx --classes "fractured,not fractured" \\
          --positive fractured --input-size 224 --mean 0.485,0.456,0.406 \\
          --std 0.229,0.224,0.225 --output softmax:0
      fxscore wrap keras.onnx --out fx.onnx --classes "fractured,not fractured" \\
          --positive fractured --input-size 256 --layout nhwc --input-range 255 \\
          --mean 0 --std 1 --output logit          # 1-channel, 0-255 input, sigmoid added
      fxscore wrap model.onnx --out model-t0.37.onnx --threshold 0.37 --model-version 1.1
      fxscore info fx.onnx

    Exit codes: 0 written; 1 the model cannot be wrapped as given (the message says what to
    change; nothing is written); 2 usage error.
    """
    from pathlib import Path

    from .files import find_images
    from .wrap import WrapError, WrapSpec, is_fxscore_model, rewrap, wrap_onnx

    ctx = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in THIRD_PARTY_OPTIONS
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    try:
        if is_fxscore_model(source):
            if given:
                raise click.UsageError(
                    f"{source} is already an fxscore model: only --threshold, --model-version "
                    f"and --model-name can change (not {', '.join(given)})")
            report = rewrap(source, out, threshold=threshold, model_version=model_version,
                            model_name=model_name)
            changes = "; ".join(f"{k.replace('_', ' ')} {a} -> {b}"
                                for k, (a, b) in report["changes"].items()) or "nothing changed"
            click.echo(f"wrote {out} (model {report['model_id']}): {changes}; weights and "
                       "graph copied unchanged, digest updated")
            click.echo(f"source: {report['source_integrity']}")
            return
        missing = [flag for flag, value in (("--classes", classes), ("--positive", positive),
                                            ("--input-size", input_size), ("--mean", mean),
                                            ("--std", std), ("--output", output))
                   if value is None]
        if missing:
            raise click.UsageError(f"{source} is not an fxscore model; to wrap it, say what it "
                                   f"is: {', '.join(missing)} missing (see --help)")
        names = tuple(c.strip() for c in classes.split(","))
        if len(names) != 2 or not all(names) or names[0] == names[1]:
            raise click.BadParameter(f"expected two different class names separated by a "
                                     f"comma, got {classes!r}", param_hint="--classes")
        spec = WrapSpec(class_names=names, positive_class=positive.strip(),
                        input_size=input_size, mean=mean, std=std, output=output,
                        layout=layout, input_range=float(input_range), resize=resize,
                        threshold=0.5 if threshold is None else threshold,
                        model_name=model_name, model_version=model_version or "1",
                        output_name=output_name)
        images = [p for _, p in find_images(Path(check))][:16] if check else []
        report = wrap_onnx(source, out, spec, check_images=images)
    except WrapError as e:
        raise click.ClickException(str(e)) from None
    for note in report["adaptations"]:
        click.echo(f"adapted: {note}")
    c = report["check"]
    click.echo(f"checked on {_plural(c['images'], 'image')} ({len(images)} from {check}): "
               if check else f"checked on {_plural(c['images'], 'generated image')}: ", nl=False)
    click.echo(f"max |d probability| vs the original {c['max_abs_prob']:.2g}, in one batch and "
               "image by image; loaded by the scorer's loader")
    click.echo(f"wrote {out} (model {report['model_id']}); see it with: fxscore info {out}")


# ---- audit / split ------------------------------------------------------------------------

EXIT_LEAK = 4  # audit --fail-on-leak: a group of copies spans two splits


def _audit_options(f):
    f = click.option("--workers", type=click.IntRange(1), default=None,
                     help="processes reading images [default: the CPUs this job may use]")(f)
    f = click.option("--no-labels", is_flag=True,
                     help="folders below the data (or split) folder are not classes")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")(f)
    return f


AUDIT_UNITS = {"verify": "pair", "leak check": "pair"}  # the other stages count files


def _run_audit(data: str, no_labels: bool, workers: int | None, quiet: bool,
               prefix: str = "audit"):
    from .audit import AuditError, run_audit
    from .progress import stage_progress

    try:
        with stage_progress(enabled=not quiet, prefix=prefix, units=AUDIT_UNITS) as progress:
            return run_audit(data, labels=not no_labels, workers=workers, progress=progress)
    except AuditError as e:
        raise click.ClickException(str(e)) from None


@cli.command("audit")
@click.argument("data", metavar="DATA", type=click.Path(file_okay=False))
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write audit.json, groups.csv and files.csv into this folder")
@click.option("--fail-on-leak", is_flag=True,
              help=f"exit with {EXIT_LEAK} if any group of copies spans two splits")
@_audit_options
def audit(data: str, out_dir: str | None, fail_on_leak: bool, no_labels: bool,
          workers: int | None, quiet: bool) -> None:
    """Find copies across splits, label conflicts and shortcuts in an image data set.

    DATA is either a folder with split folders (train/ val/ test/, also training/ valid/
    validation/ dev/ testing/), each holding one folder per class, or one folder tree (one
    folder per class, or just images). Every file is hashed (exact copies) and every distinct
    content read once and fingerprinted: near copies (re-encoded, resized, flipped, turned by
    90 degrees, rotated up to ~10 degrees, cropped up to ~10 %, brighter or darker) join one
    group. A group in two splits is a leak: the later split (train < val < test) holds images
    the earlier one trained on, so its numbers are too good.

    The shortcut check warns when one property of the file alone (image size, colour vs grey,
    format, bit depth) predicts the class: a model learns that before fractures.

    \b
    Examples:
      fxscore audit ./data
      fxscore audit ./data --out audit/            # audit.json, groups.csv, files.csv
      fxscore audit ./data_clean --fail-on-leak    # in a pipeline: stop on a leak

    \b
    Exit codes: 0 done; 4 --fail-on-leak and a leak was found (takes precedence);
    3 done, but some files could not be read (listed); 1 fatal error; 2 usage error.
    """
    from .audit import format_summary, write_report

    result = _run_audit(data, no_labels, workers, quiet)
    click.echo(format_summary(result))
    if out_dir:
        for path in write_report(result, out_dir):
            click.echo(f"wrote {path}", err=True)
    if fail_on_leak and result.leaked_groups:
        n = len(result.leaked_groups)
        click.echo(f"failing: {_plural(n, 'group')} of copies {'spans' if n == 1 else 'span'} "
                   "more than one split (--fail-on-leak)", err=True)
        click.get_current_context().exit(EXIT_LEAK)
    if result.unreadable:
        click.get_current_context().exit(EXIT_SOME_FAILED)


@cli.command("split")
@click.argument("data", metavar="DATA", type=click.Path(file_okay=False))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="new (or empty) folder for the split")
@click.option("--val", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="share of each class for validation")
@click.option("--test", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="share of each class for test")
@click.option("--seed", default=0, show_default=True, type=int, help="shuffles the groups")
@click.option("--keep-duplicates", is_flag=True,
              help="keep every byte-identical copy (default: one per distinct content)")
@click.option("--drop-conflicts", is_flag=True,
              help="leave out groups of near copies whose files carry different labels "
                   "(default: keep each such group whole, in one split, and list it)")
@click.option("--audit", "audit_dir", type=click.Path(file_okay=False), default=None,
              help="reuse the report of `fxscore audit DATA --out DIR` instead of reading "
                   "every image again (DATA is hashed to check it is unchanged)")
@_audit_options
def split(data: str, out_dir: str, val: float, test: float, seed: int, keep_duplicates: bool,
          drop_conflicts: bool, audit_dir: str | None, no_labels: bool, workers: int | None,
          quiet: bool) -> None:
    """Make a leak-free split of DATA: no group of copies straddles two splits.

    Runs the audit's grouping (exact and near copies) on all of DATA, pooling its present
    splits, then places whole groups so that each class gets --val and --test shares (in
    files), the same for every --seed. The output is the usual tree,
    OUT/{train,val,test}/<class>/<file>, made of hard links (copies where linking fails), with
    OUT/manifest.csv (path, split, class, group, sha256, source), OUT/excluded.csv and
    OUT/split.json.

    Left out, with the reason in excluded.csv: unreadable files; the same bytes filed under
    two labels (one of them is wrong, and which is unknown); byte-identical copies beyond the
    first per group (they add weight, not information; --keep-duplicates keeps them). A group
    of near copies whose files carry different labels stays whole, in one split, each file
    under its own label, and is listed (split.json "conflicts"); --drop-conflicts leaves such
    groups out. A class left with under half its share of a split is warned about. Near
    copies stay, within their one split. Names that collide in a class folder get the
    content's hash prefix. --audit DIR reuses an audit written with --out DIR: the same
    groups, without reading the images again.

    \b
    Examples:
      fxscore split ./data --out ./data_clean --val 0.1 --test 0.2 --seed 0
      fxscore audit ./data_clean --fail-on-leak    # finds no cross-split group
      fxscore audit ./data --out audit/ && fxscore split ./data --audit audit/ --out ./clean

    \b
    Exit codes: 0 done; 3 done, but some files could not be read (left out, listed);
    1 fatal error (e.g. OUT not empty); 2 usage error.
    """
    import os

    from .progress import stage_progress
    from .split import SplitConfig, SplitError, audit_from_report, plan_split, write_split

    try:
        config = SplitConfig(val=val, test=test, seed=seed, keep_duplicates=keep_duplicates,
                             drop_conflicts=drop_conflicts)
    except SplitError as e:
        raise click.UsageError(str(e)) from None
    if audit_dir:
        try:
            result = audit_from_report(audit_dir, data, workers=workers, labels=not no_labels)
        except SplitError as e:
            raise click.ClickException(str(e)) from None
    else:
        result = _run_audit(data, no_labels, workers, quiet, prefix="split")
    try:
        with stage_progress(enabled=not quiet, prefix="split", units=AUDIT_UNITS) as progress:
            plan = plan_split(result, config, workers=workers, progress=progress)
        summary = write_split(plan, data, out_dir)
    except (SplitError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{_plural(summary['files'], 'file')} in {_plural(summary['groups'], 'group')} "
               f"-> {out_dir} ({_plural(summary['hard_linked'], 'hard link')}, "
               f"{_plural(summary['copied'], 'copy', 'copies')})")
    for name in ("train", "val", "test"):
        per_class = summary["counts"].get(name, {})
        click.echo(f"  {name:<5} {sum(per_class.values()):>5}  " + ", ".join(
            f"{label or '(unlabelled)'} {n}" for label, n in sorted(per_class.items())))
    if plan.excluded:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["excluded"].items())
        click.echo(f"left out {_plural(len(plan.excluded), 'file')} ({reasons}); see "
                   f"{os.path.join(out_dir, 'excluded.csv')}")
    kept = [c for c in plan.conflicts if c["split"] != "excluded"]
    if kept:
        click.echo(f"label conflicts kept: {_plural(len(kept), 'group')} of near copies whose "
                   "files carry different labels, each whole in one split (--drop-conflicts "
                   f"leaves them out; all in {os.path.join(out_dir, 'split.json')}):")
        for c in kept[:5]:
            labels = ", ".join(f"{k} {v}" for k, v in c["labels"].items())
            click.echo(f"  group {c['group']} in {c['split']} ({labels}): "
                       + ", ".join(c["paths"][:3]) + (" ..." if len(c["paths"]) > 3 else ""))
        if len(kept) > 5:
            click.echo(f"  ... and {len(kept) - 5} more")
    if plan.joined:
        click.echo(f"the leak check joined {_plural(len(plan.joined), 'set')} of groups that "
                   "would have met across splits once other files were left out")
    for w in plan.warnings:
        click.echo(f"warning: {w}", err=True)
    if result.unreadable:
        click.get_current_context().exit(EXIT_SOME_FAILED)


# ---- train --------------------------------------------------------------------------------

def _pos_weight(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in ("none", "auto"):
        return value
    try:
        if float(value) > 0:
            return value
    except ValueError:
        pass
    raise click.BadParameter(f"expected none, auto or a positive number, got {value!r}")


# fit's stages: "decode train", "decode val", "feature cache", "epoch 3/30", ...
TRAIN_UNITS = {"epoch": "image", "feature cache": "view"}


# Defaults equal TrainConfig's (a test checks); written here so --help works without torch.
@cli.command("train")
@click.argument("data_dir", metavar="DATA", type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="run folder: config.json, history.csv, train.log, best.pt, last.pt")
@click.option("--pretrained", default="imagenet", show_default=True, metavar="imagenet|none|PATH",
              help="backbone initialisation: torchvision's ImageNet weights (internet or a "
                   "filled torch cache), random, or a local resnet18 state dict (.pth)")
@click.option("--freeze", type=click.Choice(["backbone", "none"]), default="backbone",
              show_default=True, help="backbone: only the new head trains; none: fine-tune all")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(2, 4096))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Adam learning rate")
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--scheduler", type=click.Choice(["plateau", "cosine"]), default="plateau",
              show_default=True, help="plateau: LR x0.1 when val loss stalls for half the "
                                      "patience; cosine: anneal to 0 over --epochs")
@click.option("--patience", default=5, show_default=True, type=click.IntRange(0),
              help="stop after this many epochs without a lower val loss (0: never)")
@click.option("--pos-weight", default="none", show_default=True, callback=_pos_weight,
              metavar="none|auto|FLOAT",
              help="BCE weight of positives; auto = negatives/positives in train/")
@click.option("--seed", default=0, show_default=True, type=int,
              help="same data + seed -> same history on CPU")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto: CUDA (mixed precision, channels_last) if present")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="DataLoader processes for augmentation (0: in the main process)")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch CPU threads [default: the CPUs this process may use]")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32, 4096),
              help="network input side in pixels; saved with the model")
@click.option("--fit", type=click.Choice(["pad", "stretch"]), default="pad", show_default=True,
              help="how an image reaches the square input: pad keeps its aspect ratio (black "
                   "borders), stretch resizes it; saved in the model, so scoring does the same")
@click.option("--positive-class", default="fractured", show_default=True,
              help="the class folder whose probability the model outputs")
@click.option("--cache-views", default=5, show_default=True, type=click.IntRange(0),
              help="with --freeze backbone: augmented views per image whose features are "
                   "computed once (0: run the backbone every epoch)")
@click.option("--crop-scale", default=0.08, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="smallest area fraction RandomResizedCrop keeps (torchvision's 0.08 can cut "
                   "the fracture out of the view; 0.3-0.5 is gentler)")
@click.option("--ema", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="keep an exponential moving average of the weights with this decay per "
                   "step (e.g. 0.998) and validate, keep and export the average (0: off)")
@click.option("--limit-per-class", type=click.IntRange(1), default=None,
              help="use at most N files per class and split (quick trials)")
@click.option("--max-minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="stop after the epoch that would overrun this budget (best.pt is kept; "
                   "--resume continues)")
@click.option("--resume", is_flag=True, help="continue the interrupted run in --out")
@click.option("--quiet", "-q", is_flag=True, help="no progress or epoch lines on stderr")
def train(data_dir: str, out: str, resume: bool, quiet: bool, **options) -> None:
    """Train ResNet18 (one logit) on DATA/{train,val}/<class>/ and keep the best epoch.

    DATA holds train/ and val/ (and optionally test/, scored once with the best epoch), each
    with one folder per class, e.g. 'fractured/' and 'not fractured/'. Files are found and read
    exactly as `fxscore run` does; unreadable ones are skipped and listed in RUN/train.log.
    Validation uses the scorer's own preprocessing; training adds RandomResizedCrop,
    horizontal flip and rotation (+-10 degrees).

    Adam, BCEWithLogitsLoss, early stopping on val loss; RUN/best.pt is the epoch with the
    lowest val loss (export it with `fxscore export`). --resume continues RUN from last.pt
    with its saved recipe (only --epochs, --max-minutes, --device, --workers, --threads may
    change, and --patience unless the scheduler is plateau) and gives the same result as an
    uninterrupted run; a run that stopped early continues when given more --patience.

    \b
    Examples:
      # the seed recipe: ImageNet backbone frozen, head trained on cached features
      fxscore train ./data --out runs/r18
      # air-gapped: a local copy of torchvision's resnet18 weights
      fxscore train ./data --out runs/r18 --pretrained resnet18-f37072fd.pth
      # full fine-tuning from scratch within half an hour
      fxscore train ./data --out runs/ft --pretrained none --freeze none --max-minutes 30
      fxscore train ./data --out runs/ft --resume --epochs 60     # carry on

    Exit codes: 0 trained; 3 trained, but some files could not be read (skipped; see
    RUN/train.log); 1 fatal error (data layout, weights, run folder); 2 usage error.
    """
    from pathlib import Path

    require_torch_stage("train.engine")  # the torch-needing part: a friendly error without it
    from .train.config import TrainConfig, read_config, resumed_config
    from .train.data import DataError
    from .train.engine import RunError, fit
    from .train.model import WeightsError

    ctx = click.get_current_context()
    try:
        cfg = TrainConfig(data=data_dir, out=out, **options)
        if resume and (Path(out) / "config.json").is_file():
            # Options not given on this command line come from the saved recipe.
            given = {k: v for k, v in options.items()
                     if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE}
            cfg = resumed_config(read_config(Path(out) / "config.json"),
                                 {"data": data_dir, "out": out, **given})
    except ValueError as e:
        raise click.ClickException(str(e)) from None

    import shlex

    from .progress import stage_progress

    set_interrupt_hint(f"continue with: fxscore train {shlex.quote(data_dir)} --out "
                       f"{shlex.quote(out)} --resume")
    echo = None if quiet else (lambda line: click.echo(line, err=True))
    try:
        with stage_progress(enabled=not quiet, prefix="train", units=TRAIN_UNITS,
                            transient=True) as progress:
            result = fit(cfg, resume=resume, log=echo, progress=progress)
    except (DataError, RunError, WeightsError) as e:
        raise click.ClickException(str(e)) from None
    if not quiet:
        click.echo(f"best epoch {result.best_epoch} -> {Path(out) / 'best.pt'} (export it with "
                   f"`fxscore export`)", err=True)
    if result.unreadable:
        n = len(result.unreadable)
        click.echo(f"{_plural(n, 'file')} could not be read and {'was' if n == 1 else 'were'} "
                   f"skipped; listed in {Path(out) / 'train.log'}", err=True)
        ctx.exit(EXIT_SOME_FAILED)


# ---- export -------------------------------------------------------------------------------

@cli.command("export")
@click.argument("checkpoint", metavar="CHECKPOINT|RUN", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="the model file to write, *.onnx (fp32; --int8 adds *.int8.onnx beside it)")
@click.option("--verify", type=click.Path(file_okay=False), default=None,
              help="folder of X-rays (searched recursively): prove parity on every file")
@click.option("--int8", is_flag=True, help="also write a static int8 model (QDQ, per-channel)")
@click.option("--calibration", type=click.Path(file_okay=False), default=None,
              help="folder of training X-rays (searched recursively): int8 calibrates on it, "
                   "and the OOD statistics are fit on it")
@click.option("--calibration-images", type=click.IntRange(1), default=200, show_default=True,
              help="calibrate on at most this many images, drawn at random (seed 0)")
@click.option("--int8-eval", type=click.Path(file_okay=False), default=None,
              help="labelled folder (one sub-folder per class) to compare int8 with fp32 on "
                   "[default: --verify]")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="probability at or above which the label is the positive class [default: 0.5]")
@click.option("--model-name", default=None, help="[default: fxscore-resnet18]")
@click.option("--model-version", default=None,
              help="stored and shown as given, e.g. 2.1 [default: ckpt-<sha256 prefix of "
                   "CHECKPOINT>]")
# 18..20: what the exporter reaches and IR 9 allows (fxscore.export.onnx_export.OPSETS).
@click.option("--opset", type=click.IntRange(18, 20), default=18, show_default=True,
              help="ONNX opset (each runs on onnxruntime >= 1.17)")
@click.option("--force", is_flag=True,
              help="write the int8 model even if its ROC-AUC drops by more than 0.01")
@click.option("--no-training-hashes", "no_training_hashes", is_flag=True,
              help="leave out the table of the training and validation images' sha256 and "
                   "near-copy descriptors (it discloses whether an image was trained on)")
@click.option("--training-data", type=click.Path(file_okay=False), default=None,
              help="where the run's data (train/, val/) lies now [default: the folder the "
                   "checkpoint records]; checked against its fingerprint")
@click.option("--calibrate", "calibrate_method", type=click.Choice(["none", "temperature"]),
              default="none", show_default=True,
              help="temperature: fit temperature scaling on the validation images and fold it "
                   "into the model (its ECE before and after go into the report)")
@click.option("--threshold-for", default=None, metavar="KIND:S",
              help="choose the threshold on the validation images for an operating point, "
                   "e.g. sensitivity:0.90 or specificity:0.95 (instead of --threshold)")
@click.option("--val", type=click.Path(file_okay=False), default=None,
              help="labelled folder (one sub-folder per class) for --calibrate and "
                   "--threshold-for [default: the run's val/]")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch and onnxruntime threads [default: the CPUs this process may use]")
@click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")
def export(checkpoint: str, out: str, verify: str | None, int8: bool, calibration: str | None,
           calibration_images: int, int8_eval: str | None, threshold: float | None, model_name: str | None,
           model_version: str | None, opset: int, force: bool, no_training_hashes: bool,
           training_data: str | None, calibrate_method: str, threshold_for: str | None,
           val: str | None, threads: int | None, quiet: bool) -> None:
    """Turn a training checkpoint (or a run folder: its best.pt) into an fxscore ONNX model,
    proven equal to it.

    The model takes float32 NCHW images (dynamic batch) and returns the probability of the
    positive class; the class names, preprocessing and threshold travel inside it, with a
    training summary. Before anything is written the file is checked with the scorer's own
    contract validator and loader, and compared with the checkpoint on random tensors (batch
    1 and 5) and, with --verify, on every image file through the scorer's complete path:
    max |d logit| and max |d probability| must stay within 1e-4.

    \b
    Files written, e.g. for --out model.onnx (only when every check passes; a failed or
    interrupted export leaves no model file behind, and an older one untouched):
      model.onnx          the fp32 model (ONNX opset 18, IR 9: onnxruntime >= 1.17)
      model.int8.onnx     with --int8, if it passes the ROC-AUC check (or with --force);
                          an older one is removed, as it was made from the old model.onnx
      model.export.json   the parity and int8 report; written also when a check fails

    With --int8 the fp32 model is quantised statically (weights int8 per channel, activations
    uint8) on --calibration images, then both are scored on labelled images (--int8-eval, or
    --verify if it has one folder per class). The int8 model is refused when its ROC-AUC is
    more than 0.01 below fp32's; --force writes it anyway and says so in the report.

    The model carries the sha256 of every training and validation image, and their near-copy
    descriptors (about 100 bytes per distinct image), read from the run's data and checked
    against its fingerprint: `fxscore eval` then reports evaluated images that are copies of
    them, and `fxscore run --mark-training-copies` marks them. Anyone holding the model can
    then tell whether an image was trained on; --no-training-hashes leaves the table out.

    --calibrate temperature fits temperature scaling on the validation images (the run's val/,
    or --val DIR) and folds it into the last layer; --threshold-for sensitivity:0.90 stores
    the threshold that reaches it on the validation images, chosen with the written model's
    own probabilities (the int8 model's with --int8).

    \b
    Examples:
      fxscore export runs/r18 --out model.onnx --verify data/val    # runs/r18/best.pt
      fxscore export runs/r18 --out model.onnx --calibrate temperature \\
          --threshold-for sensitivity:0.90
      fxscore export runs/r18/best.pt --out model.onnx --verify data/val \\
          --int8 --calibration data/train --model-version 2.1

    Exit codes: 0 written; 1 a check failed or the input is unusable (nothing written, or
    with a refused int8 model only the fp32 model); 2 usage error; 143 terminated (SIGTERM),
    130 interrupted (Ctrl-C): nothing half-made is left.
    """
    from pathlib import Path

    pipeline = require_torch_stage("export.pipeline")
    from .export.onnx_export import ExportError
    from .export.parity import ParityError
    from .export.quantize import QuantizeError

    opts = pipeline.ExportOptions(
        out=Path(out), verify=Path(verify) if verify else None, int8=int8,
        calibration=Path(calibration) if calibration else None,
        calibration_images=calibration_images, int8_eval=Path(int8_eval) if int8_eval else None, threshold=threshold,
        model_name=model_name, model_version=model_version, opset=opset, force=force,
        training_hashes=not no_training_hashes,
        training_data=Path(training_data) if training_data else None,
        calibrate=calibrate_method, threshold_for=threshold_for, val=Path(val) if val else None,
        threads=threads)

    from .progress import stage_progress

    bars = stage_progress(enabled=not quiet, prefix="export")

    def progress(message: str) -> None:
        if not quiet:
            bars.close()  # a step's message after the previous step's bar
            click.echo(f"export: {message}", err=True)

    # Ctrl-C and SIGTERM unwind (the group's handler): the clean-up deletes half-made files.
    set_interrupt_hint(f"no model written to {out} (an older one there is untouched)")
    try:
        with bars:
            report = pipeline.export(checkpoint, opts, progress, stages=bars)
    except pipeline.ExportFailed as e:
        _echo_export_report(e.report)
        raise click.ClickException(str(e)) from None
    except (ExportError, ParityError, QuantizeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    _echo_export_report(report)


def _echo_training_extras(report: dict) -> None:
    """Calibration, operating point and the training-data table of an export report."""
    c = report.get("calibration")
    if c:
        click.echo(f"temperature scaling on {c['images']} validation images: T {c['temperature']:.3f}"
                   f", ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}, Brier "
                   f"{c['brier_before']:.3f} -> {c['brier_after']:.3f}")
        if c.get("at_range_limit"):
            click.echo(f"warning: the temperature stopped at the end of its range (T "
                       f"{c['temperature']:g}): on the validation images the model separates "
                       "the classes perfectly, or hardly at all; check it with `fxscore eval`",
                       err=True)
    points = [("", report.get("operating_point"))]
    points.append((" (int8)", (report.get("int8") or {}).get("operating_point")))
    for which, p in points:
        if p:
            click.echo(f"threshold{which} for {p['operating_point']} on {p['images']} validation "
                       f"images: {p['threshold']:g} (sensitivity {p['sensitivity']:.3f}, "
                       f"specificity {p['specificity']:.3f} there)")
    t = report.get("training_data")
    if t and t.get("embedded"):
        near = (f", near-copy descriptors of {t['described']}" if "described" in t else "")
        click.echo(f"training-data table: sha256 of {t['contents']} distinct images (train "
                   f"{t['train']}, val {t['val']}){near}, {t['bytes'] / 1e3:.0f} kB; it "
                   "discloses whether an image was trained on (--no-training-hashes leaves it out)")
    elif t and t.get("reason") != "--no-training-hashes":
        click.echo(f"warning: no training-data table embedded: {t['reason']}; `fxscore eval` "
                   "cannot tell which evaluated images the model was trained on", err=True)


def _echo_export_report(report: dict) -> None:
    """Parity and int8 results: a few lines on stdout; warnings on stderr."""
    for r in report.get("parity", {}).get("random", []):
        click.echo(f"parity, random batch {r['batch']}: max |d logit| {r['max_abs_logit']:.2g}, "
                   f"max |d prob| {r['max_abs_prob']:.2g}, labels agree "
                   f"{100 * r['label_agreement']:.1f}%")
    files = report.get("parity", {}).get("files")
    if files:
        click.echo(f"parity, {files['n']} files ({len(files['unreadable'])} unreadable): max |d "
                   f"logit| {files['max_abs_logit']:.2g}, max |d prob| {files['max_abs_prob']:.2g}"
                   f", labels agree {100 * files['label_agreement']:.1f}%")
    q = report.get("int8")
    if q:
        # A change, signed: +0.018 means int8 ranks better here; refused below -limit.
        change = q["auc_int8"] - q["auc_fp32"]
        click.echo(f"int8 vs fp32 on {q['images']} labelled images: ROC-AUC {q['auc_fp32']:.3f} "
                   f"-> {q['auc_int8']:.3f} (AUC change {change:+.3f}; refused below "
                   f"{-q['auc_drop_limit']:+g}), labels agree {100 * q['label_agreement']:.1f}%, "
                   f"size {q['size_bytes'] / 1e6:.1f} MB vs {report['size_bytes'] / 1e6:.1f} MB")
        if q["forced"]:
            click.echo(f"WARNING: --force: wrote {q['path']} although {q['problem']}. It ranks "
                       "X-rays worse than the fp32 model; the report records that it was "
                       "forced.", err=True)
    _echo_training_extras(report)
    for path in report.get("written", []):
        click.echo(f"wrote {path}")
    for path in report.get("removed", []):
        click.echo(f"removed {path}: it was made from the model just replaced", err=True)


# ---- studies ------------------------------------------------------------------------------

@cli.command("studies")
@click.argument("rows", metavar="ROWS...", nargs=-1, required=True,
                type=click.Path(dir_okay=False))
@click.option("--out", "-o", default="-", show_default=True,
              help="studies CSV (written atomically); '-' writes to stdout")
@click.option("--sr-out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="also write one DICOM SR per study (StudyInstanceUID) into DIR, from the "
                   "scored images' headers; needs --input and the model that scored the rows")
@click.option("--input", "input_dir", type=click.Path(file_okay=False, exists=True),
              default=None, metavar="INPUT",
              help="with --sr-out: the folder the run scored (the rows' paths are relative "
                   "to it)")
@model_option
@click.option("--quiet", "-q", is_flag=True, help="no summary on stderr")
def studies(rows: tuple[str, ...], out: str, sr_out: str | None, input_dir: str | None,
            model_path: str | None, quiet: bool) -> None:
    """One row per study from the rows `fxscore run` wrote (CSV or JSON lines).

    ROWS are one or more output files of one run: its --shard files, resumed runs. Rows are
    grouped by their StudyInstanceUID column (`fxscore run --dicom-columns`); rows without one
    (non-DICOM files, or a run without that option) by the folder holding the file.

    Columns: study (the UID or the folder), key (StudyInstanceUID or folder), images (rows
    scored), failed (rows with an error), max_probability, mean_probability, label (at the
    threshold the rows were scored with, applied to the maximum: a study is positive when any
    of its images is), threshold, model_id.

    \b
    Examples:
      fxscore run /pacs/export --dicom-columns --out rows.csv
      fxscore studies rows.csv --out studies.csv
      fxscore studies preds-*.csv --out studies.csv      # the shards of a job array
      fxscore studies rows.csv --out studies.csv --sr-out sr/ --input /pacs/export -m model.onnx

    Study SRs (--sr-out): one TID 1500 report per study, with a measurement group per scored
    image and one for the study (its maximum probability and the finding at the rows'
    threshold), filed in the source study. Only studies keyed by StudyInstanceUID get one (run
    with --dicom-columns). The images are read again under --input and must still hash to
    their rows' sha256. UIDs derive from the StudyInstanceUID and the model id, so a rerun
    rewrites the same SR; `fxscore run --sr-out` writes one per image instead.

    Exit codes: 0 done; 3 done, but some studies have images that could not be read (their
    maximum may miss the fractured one), or an SR could not be written; 1 the files cannot be
    read or combined (several models or thresholds, one path with two results); 2 usage error.
    """
    from .studies import (StudiesError, read_rows, studies_csv, summarise, write_studies,
                          write_study_srs)

    if sr_out and not input_dir:
        raise click.UsageError("--sr-out needs --input, the folder the rows were scored from")
    try:
        all_rows = [row for path in rows for row in read_rows(path)]
        result = summarise(all_rows)
        if out == "-":
            click.echo(studies_csv(result), nl=False)
        else:
            write_studies(result, out)
    except StudiesError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
    incomplete = [s for s in result if s.failed]
    if not quiet:
        by_uid = sum(1 for s in result if s.key == "StudyInstanceUID")
        images = sum(s.images for s in result)
        positive = sum(1 for s in result if s.label and s.max_probability is not None
                       and s.threshold is not None and s.max_probability >= s.threshold)
        click.echo(f"{_plural(len(result), 'study', 'studies')} ({by_uid} by StudyInstanceUID, "
                   f"{len(result) - by_uid} by folder) from {_plural(images, 'scored image')} in "
                   f"{_plural(len(rows), 'file')}; {positive} at or above the threshold"
                   + ("" if out == "-" else f" -> {out}"), err=True)
        if incomplete:
            click.echo(f"warning: {_plural(len(incomplete), 'study', 'studies')} with images "
                       "that could not be read (see the failed column)", err=True)
    sr_failed = False
    if sr_out:
        from .model import ModelError, load_model

        try:
            model = load_model(model_path, threads=1)
        except ModelError as e:
            raise click.ClickException(str(e)) from None
        meta = model.meta
        info = {"model_id": model.model_id, "name": meta.model_name,
                "version": meta.model_version, "positive_class": meta.positive_class}
        try:
            done = write_study_srs(all_rows, input_dir, info, sr_out)
        except StudiesError as e:
            raise click.ClickException(str(e)) from None
        for message in done.failed:
            click.echo(f"error: {message}", err=True)
        if not quiet:
            click.echo(f"{_plural(len(done.written), 'study SR')} written to {sr_out}"
                       + (f"; {_plural(len(done.failed), 'study', 'studies')} failed"
                          if done.failed else "")
                       + (f"; {_plural(done.without_uid, 'study', 'studies')} by folder have "
                          "no StudyInstanceUID and get none (score with --dicom-columns)"
                          if done.without_uid else ""), err=True)
        sr_failed = bool(done.failed)
    if incomplete or sr_failed:
        click.get_current_context().exit(EXIT_SOME_FAILED)


@cli.command("explain")
@click.argument("image", metavar="IMAGE", type=click.Path(dir_okay=False))
@model_option
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="overlay PNG to write (the radiograph with the heatmap over it)")
@click.option("--max-side", default=1024, show_default=True, type=click.IntRange(32, 8192),
              help="the overlay's longest side in pixels (the image is never enlarged)")
@click.option("--json", "as_json", is_flag=True,
              help="print the result as one JSON document (with the raw map's cells)")
def explain(image: str, model_path: str | None, out: str, max_side: int, as_json: bool) -> None:
    """Score one X-ray and write a heatmap of where the model found evidence for its class.

    The score is the one `fxscore run` gives the file. The heatmap is a class activation map:
    for each cell of the network's last feature map, how much it adds to the positive class's
    logit, computed from the model's outputs in numpy (no PyTorch). It is coarse: one cell per
    32 x 32 input pixels (7 x 7 cells at 224 px, 4 x 4 at 128 px), so it points at a region,
    not a fracture line. Only evidence *for* the positive class is shown, scaled to its
    maximum. With OOD statistics in the model it also says whether the image is unlike the
    images the model was made for (ood). The PNG is a derived patient image: store it like the
    input.

    The model needs heatmap outputs: models from this fxscore's `fxscore export` have them;
    add them to another fxscore model with `fxscore augment MODEL --out NEW.onnx`.

    \b
    Examples:
      fxscore explain knee.png --model model.onnx --out knee.heatmap.png
      fxscore explain scan.dcm -m model.onnx -o scan.png --json | jq .probability

    Exit codes: 0 written; 1 the model has no heatmap outputs, or the image cannot be read or
    the PNG written (the message says why); 2 usage error.
    """
    import json

    from .cam import explain_file, write_png
    from .graph_outputs import MissingOutput
    from .images import ImageReadError
    from .model import ModelError, load_model

    try:
        model = load_model(model_path)
        ex = explain_file(model, image, max_side=max_side)
        write_png(out, ex.overlay, row_path=image)
    except (ModelError, MissingOutput, ImageReadError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot read {image} or write {out}: "
                                   f"{e.strerror or e}") from None
    meta = model.meta
    doc = {"path": image, "probability": round(ex.probability, 6), "label": ex.label,
           "threshold": meta.threshold, "model_id": model.model_id, "sha256": ex.sha256,
           "ood_score": None if ex.ood_score is None else round(ex.ood_score, 4),
           "ood": ex.ood, "heatmap": out, "cells": [[round(float(v), 4) for v in row]
                                                    for row in ex.cells],
           "peak_cell": list(ex.peak_cell)}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    flag = ""
    if ex.ood is not None:
        flag = (f"; OOD: unlike the images the model was made for (score {ex.ood_score:.1f} > "
                f"{meta.ood['threshold']:.1f}), do not rely on this score" if ex.ood else
                f"; in distribution (OOD score {ex.ood_score:.1f} <= {meta.ood['threshold']:.1f})")
    h, w = ex.cells.shape
    click.echo(f"{image}: {meta.positive_class} probability {ex.probability:.4f} -> "
               f"{ex.label} (threshold {meta.threshold:g}){flag}")
    click.echo(f"heatmap ({h} x {w} cells, hottest at row {ex.peak_cell[0] + 1}, column "
               f"{ex.peak_cell[1] + 1}) -> {out}")


@cli.command("augment")
@click.argument("source", metavar="MODEL", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="the new model file (.onnx), written atomically")
@click.option("--ood-fit", "ood_dir", type=click.Path(file_okay=False, exists=True),
              default=None, metavar="DIR",
              help="also fit OOD statistics on the images below DIR: the model's training "
                   "images with --ood-threshold-on, else validation images (colour images are "
                   "left out)")
@click.option("--ood-threshold-on", "ood_holdout", type=click.Path(file_okay=False, exists=True),
              default=None, metavar="DIR",
              help="choose the OOD threshold on the images below DIR (validation images, not "
                   "trained on) [default: out of fold on --ood-fit's images]")
@click.option("--false-flag-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.01, show_default=True,
              help="share of DIR's kind of images the OOD flag may flag (chosen out of fold)")
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime threads")
@click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")
def augment(source: str, out: str, ood_dir: str | None, ood_holdout: str | None,
            false_flag_rate: float, threads: int | None, quiet: bool) -> None:
    """Add heatmap outputs (and OOD statistics) to an fxscore model, without PyTorch.

    Writes a copy of MODEL whose graph also returns its last feature map and pooled features
    (what `fxscore explain` and `fxscore run --heatmaps` need), with the head's weights in its
    metadata and a fresh digest. The probability is computed exactly as before. MODEL is
    loaded and checked first (digest, or the packaged model's pin), so a damaged file is
    refused rather than given a new digest. With --ood-fit DIR, the copy also returns an OOD
    score (Mahalanobis distance of the pooled features to DIR's images) and flags images
    beyond a threshold chosen at --false-flag-rate on --ood-threshold-on's images
    (or out of fold).

    \b
    Examples:
      fxscore augment model.onnx --out model.explain.onnx
      fxscore augment model.onnx --out model.ood.onnx --ood-fit ./clean/val
      fxscore augment model.onnx --out m.ood.onnx --ood-fit ./clean/train \\
          --ood-threshold-on ./clean/val       # as `fxscore export` does

    Exit codes: 0 written; 1 the model cannot be loaded or has no fxscore CNN head (global
    pooling, one linear layer, sigmoid), or too few images to fit; 2 usage error.
    """
    from pathlib import Path

    from .explain_graph import ExplainGraphError, augment_file
    from .files import find_images
    from .model import ModelError
    from .ood import OodError

    files = holdout = None
    if ood_holdout is not None and ood_dir is None:
        raise click.BadParameter("needs --ood-fit", param_hint="'--ood-threshold-on'")
    if ood_dir is not None:
        files = [p for _, p in find_images(Path(ood_dir))]
        if not files:
            raise click.ClickException(f"--ood-fit {ood_dir}: no image files found below it")
    if ood_holdout is not None:
        holdout = [p for _, p in find_images(Path(ood_holdout))]
        if not holdout:
            raise click.ClickException(f"--ood-threshold-on {ood_holdout}: no image files "
                                       "found below it")
    if Path(out).suffix.lower() != ".onnx":
        raise click.BadParameter(f"{out}: name the model file *.onnx", param_hint="'--out'")

    def progress(done: int) -> None:
        if not quiet and (done % 100 == 0 or done == len(files or ())):
            click.echo(f"\rOOD fit: {done}/{len(files or ())} images", err=True,
                       nl=done == len(files or ()))

    try:
        report = augment_file(source, out, ood_files=files, ood_holdout=holdout,
                              false_flag_rate=false_flag_rate, threads=threads,
                              progress=progress)
    except (ModelError, ExplainGraphError, OodError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
    if quiet:
        return
    cells = report.get("cells")
    click.echo(f"{out}: heatmap outputs added"
               + (f" ({cells[0]} x {cells[1]} cells)" if cells else "")
               + f"; model id {report['model_id']}, {report['integrity']}", err=True)
    ood = report.get("ood")
    if ood:
        left = ", ".join(f"{v} {k}" for k, v in ood["excluded"].items()) or "none"
        where = (f"{ood['holdout_images']} held-out images" if holdout else "them, out of fold")
        click.echo(f"OOD statistics: fit on {ood['fit_images']} images (left out: {left}); "
                   f"threshold {ood['threshold']:.2f} flags "
                   f"{100 * ood['holdout_flagged']:.1f}% of {where} "
                   f"(target {100 * ood['false_flag_rate']:g}%)", err=True)


if __name__ == "__main__":  # python -m fxscore.cli (used by tests that kill a real run)
    cli()
