"""The fxscore command line: a thin click layer over the library modules.

Command docstrings are the help. Library functions return data; only this module prints.
Exit codes (all commands): 0 success; 1 fatal error (missing model, bad input folder, ...);
2 usage error; 3 the job finished but some files could not be read (see the error column).
"""
from __future__ import annotations

import click

from . import __version__

EXIT_SOME_FAILED = 3
TRAIN_HINT = 'this command needs PyTorch: pip install "fxscore[train]"'


def require_torch_stage(stage: str):
    """Import fxscore.<stage> lazily; without torch, tell the user how to get it."""
    import importlib

    try:
        return importlib.import_module(f"fxscore.{stage}")
    except ImportError as e:
        if getattr(e, "name", "") in ("torch", "torchvision", "onnx") or "torch" in str(e):
            raise click.ClickException(f"{TRAIN_HINT} ({e})") from e
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fxscore")
def cli() -> None:
    """Bone-fracture classification of X-rays.

    \b
    fxscore run ./xrays --out preds.csv      score a folder tree (no PyTorch needed)
    fxscore eval ./test --report out/        evaluate on labelled folders
    fxscore audit ./data                     find train/test leakage and shortcuts
    fxscore split ./data --out ./clean       make a leak-free split
    fxscore train ./data --out runs/r18      train ResNet18  (needs fxscore[train])
    fxscore export runs/r18/best.pt --out model.onnx          (needs fxscore[train])
    """


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


@cli.command("run")
@click.argument("input_path", metavar="INPUT", type=click.Path())
@model_option
@click.option("--out", "-o", default="-", show_default=True,
              help="output file; '-' writes to stdout (no resume)")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="[default: jsonl if --out ends in .jsonl, else csv]")
@click.option("--overwrite", is_flag=True, help="start --out afresh instead of resuming it")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="images per model call")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="onnxruntime threads [default: the CPUs this process may use, "
                   "affinity and cgroup quota included]")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="image decoding threads, overlapped with the model [default: as --threads]")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="onnxruntime execution provider (cuda needs "
                                      "onnxruntime-gpu)")
@click.option("--shard", callback=_parse_shard, metavar="K/N",
              help="score only part K of N, K counted from 1; N runs with K = 1..N cover "
                   "every file exactly once")
@click.option("--quiet", "-q", is_flag=True, help="no progress or summary on stderr")
def run(input_path: str, model_path: str | None, out: str, fmt: str | None, overwrite: bool,
        batch_size: int, threads: int | None, workers: int | None, provider: str, shard,
        quiet: bool) -> None:
    """Score every X-ray under INPUT (a folder, or one file); write one row per file.

    Folders are searched recursively in sorted order; hidden files and folders are skipped.
    Files are taken by extension (.jpg .jpeg .png .bmp .tif .tiff .gif .webp .dcm; any case)
    or, without one, by the DICOM marker. The format is read from the content, not the name.

    Columns: path (relative to INPUT), probability (of the model's positive class, e.g.
    "fractured"), label (the positive class if probability >= threshold, else the other),
    threshold, model_id (sha256 prefix of the model file), error (why the file could not be
    read; empty when scored).

    Resume: rerunning with the same --out skips the files already in it and appends the rest,
    also after a crash or kill; --overwrite starts afresh.

    \b
    Examples:
      fxscore run ./xrays --model model.onnx --out preds.csv
      fxscore run ./xrays -m model.onnx --format jsonl --out - > preds.jsonl
      fxscore run ./xrays -m model.onnx --out preds.csv      # again: resumes
      # a Slurm job array (sbatch --array=1-8); each task writes its own file:
      fxscore run /pacs/export -m model.onnx --shard $SLURM_ARRAY_TASK_ID/8 \\
          --out preds-$SLURM_ARRAY_TASK_ID.csv

    Exit codes: 0 every file scored; 3 finished, but some files could not be read (rows with
    an error); 1 fatal error (model, input or output unusable); 2 usage error.
    """
    import sys
    import time
    from collections import Counter
    from pathlib import Path

    from .files import find_images
    from .model import ModelError, load_model
    from .output import OutputError, format_for, open_output
    from .scoring import score_batches

    root = Path(input_path)
    if not root.exists():
        raise click.ClickException(f"input {root} does not exist")
    fmt = format_for(out, fmt)
    try:
        model = load_model(model_path, providers=(provider,), threads=threads)
        writer, existing = open_output(out, fmt, model.model_id, overwrite=overwrite)
    except (ModelError, OutputError) as e:
        raise click.ClickException(str(e)) from None
    if existing.cut and not quiet:
        click.echo(f"resuming {out}: removed a half-written last row ({existing.cut} bytes)",
                   err=True)

    counts: Counter = Counter()

    def unlisted(folder: Path, error: OSError) -> None:
        counts["unlisted"] += 1
        click.echo(f"warning: cannot list {folder} ({error.strerror or error}); "
                   "its files are not scored", err=True)

    def todo():
        if root.is_dir():
            found = find_images(root, shard=shard, counts=counts, onerror=unlisted)
        else:
            found = [(root.name, root)] if shard is None or root.name in shard else []
        for rel, path in found:
            if rel in existing.done:
                counts["skipped"] += 1
            else:
                yield rel, path

    show = not quiet and sys.stderr.isatty()
    start = last = time.monotonic()
    try:
        for rows in score_batches(model, todo(), batch_size=batch_size, workers=workers):
            writer.write_batch(rows)
            failed = sum(1 for r in rows if r["error"])
            counts["failed"] += failed
            counts["scored"] += len(rows) - failed
            if show and time.monotonic() - last > 0.2:
                last = time.monotonic()
                done = counts["scored"] + counts["failed"]
                click.echo(f"\r{done} files  {done / (last - start):.1f}/s  "
                           f"{counts['failed']} failed ", err=True, nl=False)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; rerun the same command to resume {out}", err=True)
        raise
    except (ModelError, OSError) as e:
        raise click.ClickException(f"{e}; rerun the same command to resume") from None
    finally:
        writer.close()
        if show:
            click.echo("", err=True)

    failed_total = counts["failed"] + existing.failed
    if not quiet:
        earlier = f", {counts['skipped']} already in {out}" if counts["skipped"] else ""
        click.echo(f"{counts['scored']} scored, {counts['failed']} failed, {counts['ignored']} "
                   f"ignored (not X-ray files){earlier}; model {model.model_id}, probability "
                   f"of '{model.meta.positive_class}'" + ("" if out == "-" else f" -> {out}"),
                   err=True)
        if failed_total:
            click.echo(f"{failed_total} file(s) could not be read; see the error column",
                       err=True)
    if failed_total:
        click.get_current_context().exit(EXIT_SOME_FAILED)

# ---- eval ---------------------------------------------------------------------------------

@cli.command("eval")
@click.argument("data_dir", metavar="DIR", type=click.Path(file_okay=False))
@model_option
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="write predictions.csv, metrics.json and report.html into this folder")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None,
              metavar="S", help="also report the highest threshold reaching sensitivity S on "
                                "this data (e.g. 0.95), and the metrics there")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None,
              help="CSV of path,label (paths relative to DIR) instead of class folders")
@click.option("--groups", "groups_csv", type=click.Path(dir_okay=False), default=None,
              help="CSV of path,group (e.g. patient id): the bootstrap resamples whole groups")
@click.option("--bootstrap", "n_bootstrap", default=1000, show_default=True,
              type=click.IntRange(0), help="bootstrap resamples for the 95% intervals; 0: none")
@click.option("--seed", default=0, show_default=True, help="bootstrap random seed")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="images per model call")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="onnxruntime and decoding threads [default: the CPUs this process may use]")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu",
              show_default=True, help="onnxruntime execution provider")
@click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")
def eval_(data_dir: str, model_path: str | None, report_dir: str | None,
          target_sensitivity: float | None, labels_csv: str | None, groups_csv: str | None,
          n_bootstrap: int, seed: int, batch_size: int, threads: int | None, provider: str,
          quiet: bool) -> None:
    """Evaluate a model on labelled X-rays: metrics with confidence intervals, and a report.

    DIR holds one folder per class, named as the model's classes (e.g. "fractured" and
    "not fractured"), with images at any depth inside; or any folder plus --labels, a CSV of
    path,label. Prints scikit-learn's classification report, the confusion matrix,
    sensitivity, specificity, ROC-AUC, average precision, Brier score and a reliability table,
    with percentile-bootstrap 95% intervals (thresholds held fixed). --groups resamples whole
    groups (patients, or copies of one radiograph), which widens the intervals honestly when
    images are not independent.

    --report writes predictions.csv (the columns of `fxscore run` plus true_label),
    metrics.json and a self-contained report.html (figures inline, no external files).

    \b
    Examples:
      fxscore eval ./test --model model.onnx
      fxscore eval ./test -m model.onnx --target-sensitivity 0.95 --report out/
      fxscore eval ./flat -m model.onnx --labels labels.csv --groups patients.csv

    \b
    Exit codes: 0 done; 3 done, but some files could not be read (they are listed and the
    metrics use the readable ones); 1 fatal error (model, folders or CSVs unusable); 2 usage.
    """
    import sys
    import time

    from .evaluate import EvalDataError, evaluate
    from .model import ModelError, load_model
    from .report import format_text, write_report

    try:
        model = load_model(model_path, providers=(provider,), threads=threads)
    except ModelError as e:
        raise click.ClickException(str(e)) from None

    show = not quiet and sys.stderr.isatty()
    seen = {"n": 0, "failed": 0, "last": time.monotonic()}

    def progress(row: dict) -> None:
        seen["n"] += 1
        seen["failed"] += bool(row["error"])
        if show and time.monotonic() - seen["last"] > 0.2:
            seen["last"] = time.monotonic()
            click.echo(f"\rscored {seen['n']} files, {seen['failed']} unreadable ", err=True,
                       nl=False)

    try:
        ev = evaluate(data_dir, model, labels=labels_csv, groups=groups_csv,
                      target_sensitivity=target_sensitivity, n_bootstrap=n_bootstrap, seed=seed,
                      batch_size=batch_size, workers=threads, progress=progress)
    except (EvalDataError, ModelError, FileNotFoundError, NotADirectoryError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        if show and seen["n"]:
            click.echo("", err=True)

    click.echo(format_text(ev), nl=False)
    if report_dir:
        try:
            paths = write_report(ev, report_dir)
        except OSError as e:
            raise click.ClickException(f"cannot write the report to {report_dir}: {e}") from None
        if not quiet:
            click.echo(f"report: {paths['report']} (+ predictions.csv, metrics.json)", err=True)
    failed = ev.metrics["data"]["unreadable"]
    if failed:
        click.echo(f"warning: {failed} file(s) could not be read; the metrics use the "
                   f"{ev.metrics['data']['readable']} readable ones", err=True)
        click.get_current_context().exit(EXIT_SOME_FAILED)


# ---- audit / split ------------------------------------------------------------------------

# ---- train --------------------------------------------------------------------------------

# ---- export -------------------------------------------------------------------------------


if __name__ == "__main__":  # python -m fxscore.cli (used by tests that kill a real run)
    cli()
