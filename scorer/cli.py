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
    an error in --out, from this run or an earlier one) or some folders not listed; 1 fatal
    error (model, input or output unusable); 2 usage error.
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
    start, last = time.monotonic(), 0.0
    try:
        for rows in score_batches(model, todo(), batch_size=batch_size,
                                  workers=workers or threads):
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
        if out != "-":
            click.echo(f"\ninterrupted; rerun the same command to resume {out}", err=True)
        raise
    except BrokenPipeError:  # e.g. `fxscore run ... | head`
        raise click.ClickException("output closed by its reader (broken pipe)") from None
    except (ModelError, OSError) as e:
        hint = "" if out == "-" else "; rerun the same command to resume"
        raise click.ClickException(f"{e}{hint}") from None
    finally:
        writer.close()
        if show:
            click.echo("", err=True)

    failed_total = counts["failed"] + existing.failed
    incomplete = failed_total or counts["unlisted"]
    if not quiet:
        earlier = f", {counts['skipped']} already in {out}" if counts["skipped"] else ""
        click.echo(f"{counts['scored']} scored, {counts['failed']} failed, {counts['ignored']} "
                   f"ignored (not X-ray files){earlier}; model {model.model_id}, probability "
                   f"of '{model.meta.positive_class}'" + ("" if out == "-" else f" -> {out}"),
                   err=True)
        if failed_total:
            click.echo(f"{failed_total} file(s) could not be read; see the error column",
                       err=True)
        if counts["unlisted"]:
            click.echo(f"{counts['unlisted']} folder(s) could not be listed (see warnings)",
                       err=True)
    if incomplete:
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

    click.echo(format_text(ev).rstrip("\n"))
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

EXIT_LEAK = 4  # audit --fail-on-leak: a group of copies spans two splits


def _audit_options(f):
    f = click.option("--workers", type=click.IntRange(1), default=None,
                     help="processes reading images [default: the CPUs this job may use]")(f)
    f = click.option("--no-labels", is_flag=True,
                     help="folders below the data (or split) folder are not classes")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")(f)
    return f


def _run_audit(data: str, no_labels: bool, workers: int | None, quiet: bool):
    from .audit import AuditError, run_audit

    try:
        return run_audit(data, labels=not no_labels, workers=workers,
                         progress=None if quiet else _stderr_bars())
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
        click.echo(f"failing: {len(result.leaked_groups)} groups of copies span more than one "
                   "split (--fail-on-leak)", err=True)
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
@_audit_options
def split(data: str, out_dir: str, val: float, test: float, seed: int, keep_duplicates: bool,
          no_labels: bool, workers: int | None, quiet: bool) -> None:
    """Make a leak-free split of DATA: no group of copies straddles two splits.

    Runs the audit's grouping (exact and near copies) on all of DATA, pooling its present
    splits, then places whole groups so that each class gets --val and --test shares (in
    files), the same for every --seed. The output is the usual tree,
    OUT/{train,val,test}/<class>/<file>, made of hard links (copies where linking fails), with
    OUT/manifest.csv (path, split, class, group, sha256, source), OUT/excluded.csv and
    OUT/split.json.

    Left out, with the reason in excluded.csv: unreadable files; groups whose copies carry
    different labels (one of them is wrong, and which is unknown); byte-identical copies
    beyond the first per group (they add weight, not information; --keep-duplicates keeps
    them). Near copies stay, within their one split. Names that collide in a class folder get
    the content's hash prefix.

    \b
    Examples:
      fxscore split ./data --out ./data_clean --val 0.1 --test 0.2 --seed 0
      fxscore audit ./data_clean --fail-on-leak    # finds no cross-split group

    \b
    Exit codes: 0 done; 3 done, but some files could not be read (left out, listed);
    1 fatal error (e.g. OUT not empty); 2 usage error.
    """
    import os

    from .split import SplitConfig, SplitError, plan_split, write_split

    try:
        config = SplitConfig(val=val, test=test, seed=seed, keep_duplicates=keep_duplicates)
    except SplitError as e:
        raise click.UsageError(str(e)) from None
    result = _run_audit(data, no_labels, workers, quiet)
    try:
        plan = plan_split(result, config, workers=workers,
                          progress=None if quiet else _stderr_bars())
        summary = write_split(plan, data, out_dir)
    except (SplitError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{summary['files']} files in {summary['groups']} groups -> {out_dir} "
               f"({summary['hard_linked']} hard links, {summary['copied']} copies)")
    for name in ("train", "val", "test"):
        per_class = summary["counts"].get(name, {})
        click.echo(f"  {name:<5} {sum(per_class.values()):>5}  " + ", ".join(
            f"{label or '(unlabelled)'} {n}" for label, n in sorted(per_class.items())))
    if plan.excluded:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["excluded"].items())
        click.echo(f"left out {len(plan.excluded)} files ({reasons}); see "
                   f"{os.path.join(out_dir, 'excluded.csv')}")
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


def _stderr_bars():
    """progress(stage, done, total) drawing one bar per stage on stderr; None when not a TTY."""
    import sys

    if not sys.stderr.isatty():
        return None
    current: dict = {"stage": None, "bar": None, "done": 0}

    def progress(stage: str, done: int, total: int) -> None:
        if stage != current["stage"]:
            if current["bar"] is not None:
                current["bar"].render_finish()
            current.update(stage=stage, done=0,
                           bar=click.progressbar(length=total, label=stage, file=sys.stderr))
        current["bar"].update(done - current["done"])
        current["done"] = done
        if done >= total:
            current["bar"].render_finish()
            current.update(stage=None, bar=None)

    return progress


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
@click.option("--positive-class", default="fractured", show_default=True,
              help="the class folder whose probability the model outputs")
@click.option("--cache-views", default=5, show_default=True, type=click.IntRange(0),
              help="with --freeze backbone: augmented views per image whose features are "
                   "computed once (0: run the backbone every epoch)")
@click.option("--crop-scale", default=0.08, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="smallest area fraction RandomResizedCrop keeps (torchvision's 0.08 can cut "
                   "the fracture out of the view; 0.3-0.5 is gentler)")
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
    change) and gives the same result as an uninterrupted run.

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

    echo = None if quiet else (lambda line: click.echo(line, err=True))
    try:
        result = fit(cfg, resume=resume, log=echo, progress=None if quiet else _stderr_bars())
    except (DataError, RunError, WeightsError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; continue with: fxscore train {data_dir} --out {out} --resume",
                   err=True)
        raise
    if not quiet:
        click.echo(f"best epoch {result.best_epoch} -> {Path(out) / 'best.pt'} (export it with "
                   f"`fxscore export`)", err=True)
    if result.unreadable:
        click.echo(f"{len(result.unreadable)} file(s) could not be read and were skipped; "
                   f"listed in {Path(out) / 'train.log'}", err=True)
        ctx.exit(EXIT_SOME_FAILED)


# ---- export -------------------------------------------------------------------------------

@cli.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="the model file to write, *.onnx (fp32; --int8 adds *.int8.onnx beside it)")
@click.option("--verify", type=click.Path(file_okay=False), default=None,
              help="folder of X-rays (searched recursively): prove parity on every file")
@click.option("--int8", is_flag=True, help="also write a static int8 model (QDQ, per-channel)")
@click.option("--calibration", type=click.Path(file_okay=False), default=None,
              help="folder of X-rays to calibrate int8 on (searched recursively)")
@click.option("--calibration-images", type=click.IntRange(1), default=200, show_default=True,
              help="calibrate on at most this many images, drawn at random (seed 0)")
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
              help="ONNX opset (each runs on onnxruntime >= 1.17)")
@click.option("--force", is_flag=True,
              help="write the int8 model even if its ROC-AUC drops by more than 0.01")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch and onnxruntime threads [default: the CPUs this process may use]")
@click.option("--quiet", "-q", is_flag=True, help="no progress on stderr")
def export(checkpoint: str, out: str, verify: str | None, int8: bool, calibration: str | None,
           calibration_images: int, int8_eval: str | None, threshold: float | None, model_name: str | None,
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
        calibration_images=calibration_images, int8_eval=Path(int8_eval) if int8_eval else None, threshold=threshold,
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
    for path in report.get("removed", []):
        click.echo(f"removed {path}: it was made from the model just replaced", err=True)


if __name__ == "__main__":  # python -m fxscore.cli (used by tests that kill a real run)
    cli()
