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
              help="CSV of path,group (paths as in predictions.csv, e.g. fractured/a.png; "
                   "group e.g. a patient id): the bootstrap resamples whole groups")
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
    except (EvalDataError, ModelError, OSError) as e:
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

@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="the model file to write, *.onnx (fp32; --int8 adds *.int8.onnx beside it)")
@click.option("--verify", type=click.Path(file_okay=False), default=None,
              help="folder of X-rays (searched recursively): prove parity on every file")
@click.option("--int8", is_flag=True, help="also write a static int8 model (QDQ, per-channel)")
@click.option("--calibration", type=click.Path(file_okay=False), default=None,
              help="folder of X-rays to calibrate int8 on (up to 200 are drawn)")
@click.option("--int8-eval", type=click.Path(file_okay=False), default=None,
              help="labelled folder (one sub-folder per class) to compare int8 with fp32 on "
                   "[default: --verify]")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="probability at or above which the label is the positive class [default: 0.5]")
@click.option("--model-name", default=None, help="[default: fxscore-resnet18]")
@click.option("--model-version", default=None,
              help="[default: ckpt-<sha256 prefix of CHECKPOINT>]")
# 18..20: what the exporter reaches and IR 9 allows (fxscore.export.onnx_export.OPSETS).
@click.option("--opset", type=click.IntRange(18, 20), default=18, show_default=True,
              help="ONNX opset (18 runs on onnxruntime >= 1.17)")
@click.option("--force", is_flag=True,
              help="write the int8 model even if its ROC-AUC drops by more than 0.01")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="onnxruntime threads for the checks [default: the CPUs this process may use]")
@click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")
def export(checkpoint: str, out: str, verify: str | None, int8: bool, calibration: str | None,
           int8_eval: str | None, threshold: float | None, model_name: str | None,
           model_version: str | None, opset: int, force: bool, threads: int | None,
           quiet: bool) -> None:
    """Turn a training checkpoint into an fxscore ONNX model, proven equal to it.

    The model takes float32 NCHW images (dynamic batch) and returns the probability of the
    positive class; the class names, preprocessing and threshold travel inside it, with a
    training summary. Before anything is written the file is checked with the scorer's own
    contract validator and loader, and compared with the checkpoint on random tensors (batch
    1 and 5) and, with --verify, on every image file through the scorer's complete path:
    max |d logit| and max |d probability| must stay within 1e-4.

    \b
    Files written (only when every check passes; an interrupted or failed export leaves no
    model file behind and an older one untouched):
      OUT                   the fp32 model (ONNX opset 18, IR 9: onnxruntime >= 1.17)
      OUT.int8.onnx         with --int8, e.g. model.int8.onnx for --out model.onnx
      OUT.export.json       the parity (and int8) report, e.g. model.export.json;
                            also written when a check fails

    With --int8 the fp32 model is quantised statically (weights int8 per channel, activations
    uint8) on --calibration images, then both are scored on labelled images (--int8-eval, or
    --verify if it has one folder per class). The int8 model is refused when its ROC-AUC is
    more than 0.01 below fp32's; --force writes it anyway and says so in the report.

    \b
    Examples:
      fxscore export runs/r18/best.pt --out model.onnx --verify data/val
      fxscore export runs/r18/best.pt --out model.onnx --verify data/val \\
          --int8 --calibration data/train

    Exit codes: 0 written; 1 a check failed or the input is unusable (nothing written, or
    with a refused int8 model only the fp32 model); 2 usage error.
    """
    import signal
    import sys
    from pathlib import Path

    pipeline = require_torch_stage("export.pipeline")
    from .export.onnx_export import ExportError
    from .export.parity import ParityError
    from .export.quantize import QuantizeError

    opts = pipeline.ExportOptions(
        out=Path(out), verify=Path(verify) if verify else None, int8=int8,
        calibration=Path(calibration) if calibration else None,
        int8_eval=Path(int8_eval) if int8_eval else None, threshold=threshold,
        model_name=model_name, model_version=model_version, opset=opset, force=force,
        threads=threads)

    def progress(message: str) -> None:
        if not quiet:
            click.echo(f"export: {message}", err=True)

    # A plain SIGTERM (batch-system timeout, `kill`) would end the process without unwinding;
    # as SystemExit it runs the clean-up that deletes the half-made files.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = pipeline.export(checkpoint, opts, progress)
    except pipeline.ExportFailed as e:
        _echo_export_report(e.report)
        raise click.ClickException(str(e)) from None
    except (ExportError, ParityError, QuantizeError, OSError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    _echo_export_report(report)


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
        click.echo(f"int8 vs fp32 on {q['images']} labelled images: ROC-AUC {q['auc_fp32']:.4f} "
                   f"-> {q['auc_int8']:.4f} (drop {q['auc_drop']:.4f}, limit "
                   f"{q['auc_drop_limit']:g}), labels agree {100 * q['label_agreement']:.1f}%, "
                   f"size {q['size_bytes'] / 1e6:.1f} MB vs {report['size_bytes'] / 1e6:.1f} MB")
        if q["forced"]:
            click.echo(f"WARNING: --force: wrote {q['path']} although {q['problem']}. It ranks "
                       "X-rays worse than the fp32 model; the report records that it was "
                       "forced.", err=True)
    for path in report.get("written", []):
        click.echo(f"wrote {path}")


if __name__ == "__main__":  # python -m fxscore.cli (used by tests that kill a real run)
    cli()
