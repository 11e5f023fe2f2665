"""The whole export: checkpoint -> verified model file(s) and a report, or nothing at all.

Every output is built as a hidden temporary beside its destination and renamed into place only
after it passed every check, so a failed or interrupted export leaves no model behind (and an
older model at the same path untouched). Order: export, validate the contract and load the file
with the scorer, prove parity, (quantise and compare), then publish.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fxscore import explain_graph, membership
from fxscore.contract import ModelMeta, Preprocess
from fxscore.evaluate import EvalDataError, items_from_folders
from fxscore.files import find_images
from fxscore.modelfile import embed_bytes, read_props, with_entry

from . import calibrate, parity, quantize, rundata
from .io import publish, staged, write_json
from .onnx_export import (IR_VERSION, OPSET, ExportError, build_meta, load_checkpoint, to_onnx,
                          verify_file)


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    verify: Path | None = None  # images for the file parity check (recursive)
    int8: bool = False
    calibration: Path | None = None  # images for int8 calibration (recursive)
    calibration_images: int = quantize.CALIBRATION_IMAGES  # at most this many are drawn
    int8_eval: Path | None = None  # labelled DIR/<class>/ for the int8 check; default: verify
    threshold: float | None = None  # default 0.5
    model_name: str | None = None
    model_version: str | None = None
    opset: int = OPSET
    force: bool = False  # write the int8 model even when its ROC-AUC drops too much
    tolerance: float = parity.TOLERANCE
    auc_drop_limit: float = quantize.AUC_DROP_LIMIT
    threads: int | None = None  # torch and onnxruntime threads for the checks
    # The training-data table (fxscore.membership): hashes of every train/val image and their
    # near-copy descriptors, read from the run's data (verified by its fingerprint).
    training_hashes: bool = True
    training_data: Path | None = None  # where the run's data lies now [default: as recorded]
    calibrate: str = "none"  # "temperature": fit on validation, folded into the head
    threshold_for: str | None = None  # e.g. "sensitivity:0.90", chosen on validation
    val: Path | None = None  # labelled DIR/<class>/ for both [default: the run's val/]
    # OOD statistics (fxscore.ood): threshold at this false-flag rate on the --verify images
    # (validation images the model did not train on), mean and covariance from --calibration
    # (training images) when given; colour images left out; no --verify, no OOD statistics.
    ood: bool = True
    false_flag_rate: float = 0.01


class ExportFailed(RuntimeError):
    """A check failed; `report` says which and is also saved beside the model path."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def int8_path(out: Path) -> Path:
    """model.onnx -> model.int8.onnx"""
    return Path(out).with_suffix(".int8.onnx")


def report_path(out: Path) -> Path:
    """model.onnx -> model.export.json"""
    return Path(out).with_suffix(".export.json")


Stages = Callable[[str, int, int], None]  # stages(stage, done, total): per-file progress


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a `fxscore train` run folder -> its best.pt."""
    path = Path(path)
    if path.is_dir():
        best = path / "best.pt"
        if not best.is_file():
            raise ExportError(f"{path} is a folder without best.pt; give a `fxscore train` run "
                              "folder (it holds best.pt) or the checkpoint file itself")
        return best
    return path


def export(checkpoint: str | os.PathLike, opts: ExportOptions,
           progress: Callable[[str], None] = lambda message: None,
           stages: Stages | None = None) -> dict[str, Any]:
    """Export, verify and write; return the report. Raises ExportFailed when a check fails.

    `checkpoint` is a best.pt or the run folder holding it. `progress` hears one message per
    step; `stages(stage, done, total)` the files done within the long steps.
    """
    previous = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return _export(resolve_checkpoint(checkpoint), opts, progress, stages)
    finally:
        torch.set_num_threads(previous)


def _export(checkpoint: str | os.PathLike, opts: ExportOptions,
            progress: Callable[[str], None], stages: Stages | None = None) -> dict[str, Any]:
    out = Path(opts.out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"--out {out}: name the model file *.onnx (e.g. model.onnx)")
    verify_items = _verify_items(opts.verify)
    calibration = _calibration_files(opts) if opts.int8 else []

    point = _check_calibration_options(opts)

    progress(f"reading checkpoint {checkpoint}")
    model, ckpt = load_checkpoint(checkpoint)
    extras = _prepare(model, ckpt, opts, point, progress, stages)  # may fold T into the head
    meta = _with_extras(build_meta(ckpt, threshold=opts.threshold, model_name=opts.model_name,
                                   model_version=opts.model_version, opset=opts.opset), extras)
    eval_items = _int8_eval_items(opts, meta.class_names) if opts.int8 else []

    progress(f"exporting to ONNX (opset {opts.opset}, IR {IR_VERSION})")
    proto = to_onnx(model, meta, opset=opts.opset)
    report: dict[str, Any] = {
        "ok": False, "checkpoint": str(checkpoint), "model": str(out), "opset": opts.opset,
        "ir_version": IR_VERSION, "tolerance": opts.tolerance, "metadata": meta.to_dict(),
        "written": [], **extras.report}
    with ExitStack() as stack:
        tmp = stack.enter_context(staged(out))
        tmp.write_bytes(_with_table(proto.SerializeToString(), extras))
        scorer = verify_file(tmp, meta, threads=opts.threads)
        if extras.point:
            meta, scorer, report["operating_point"] = _operating_point(
                tmp, meta, scorer, extras, opts, progress)
            report["metadata"] = meta.to_dict()
        logits = parity.logit_session(proto, opts.threads)

        progress("parity on random tensors (batch 1 and 5)")
        checks: dict[str, Any] = {"random": parity.random_parity(model, scorer, logits)}
        if verify_items is not None:
            progress(f"parity on {len(verify_items)} files of {opts.verify}")
            checks["files"] = parity.file_parity(
                model, scorer, logits, verify_items,
                progress=stages and (lambda done, total: stages("parity", done, total)))
            checks["files"]["folder"] = str(opts.verify)
        report["parity"] = checks
        bad = parity.problems(checks, opts.tolerance)
        if bad:
            report["errors"] = bad
            write_json(report_path(out), report)
            raise ExportFailed("the ONNX model does not compute what the checkpoint computes: "
                               + "; ".join(bad) + f". No model written; see {report_path(out)}",
                               report)
        report["size_bytes"] = tmp.stat().st_size

        refusal = None
        if opts.int8:
            tmp8 = stack.enter_context(staged(int8_path(out)))
            report["int8"] = _int8(tmp, tmp8, scorer, meta, calibration, eval_items, opts,
                                   progress, extras)
            refusal = report["int8"]["problem"]

        # Heatmap outputs and OOD statistics (fxscore.explain_graph, fxscore.ood), added last
        # so that neither the parity check nor the quantiser sees them; the probability path
        # is unchanged (bit-identical, tests/test_explain_graph.py).
        # OOD: mean and covariance of the training images (--calibration, when given) with
        # the threshold on the validation images (--verify); else out of fold on --verify.
        val_files = ([f for _, f in verify_items] if verify_items is not None and opts.ood
                     else None)
        train_files = ([f for _, f in find_images(opts.calibration)]
                       if val_files and opts.calibration is not None else None)
        ood_files, ood_holdout = (train_files, val_files) if train_files else (val_files, None)
        progress("adding heatmap outputs" + (f" and OOD statistics fit on {len(ood_files)} "
                                             "files" if ood_files else ""))
        meta, report["explain"] = explain_graph.augment_in_place(
            tmp, ood_files=ood_files, ood_holdout=ood_holdout,
            false_flag_rate=opts.false_flag_rate, threads=opts.threads)
        verify_file(tmp, meta, threads=opts.threads)
        report["metadata"], report["size_bytes"] = meta.to_dict(), tmp.stat().st_size
        if opts.int8 and report["int8"]["written"]:
            meta8, report["int8"]["explain"] = explain_graph.augment_in_place(
                tmp8, ood_files=ood_files, ood_holdout=ood_holdout,
                false_flag_rate=opts.false_flag_rate,
                threads=opts.threads)  # its own features: statistics fit on them
            verify_file(tmp8, meta8, threads=opts.threads)
            report["int8"]["size_bytes"] = tmp8.stat().st_size

        publish(tmp, out)
        report["written"].append(str(out))
        if opts.int8 and report["int8"]["written"]:
            publish(tmp8, int8_path(out))
            report["written"].append(str(int8_path(out)))
        elif int8_path(out).exists():
            # Made from the model.onnx just replaced: beside the new one it would be a lie.
            int8_path(out).unlink()
            report["removed"] = [str(int8_path(out))]
        report["ok"] = refusal is None or opts.force
        report["written"].append(str(report_path(out)))
        write_json(report_path(out), report)
    if not report["ok"]:
        raise ExportFailed(f"int8 model refused: {refusal}. Wrote the verified fp32 model {out} "
                           f"but not {int8_path(out)}; --force writes it anyway. "
                           f"See {report_path(out)}", report)
    return report


def _int8(fp32: Path, dest: Path, scorer, meta, calibration: list[Path], eval_items,
          opts: ExportOptions, progress: Callable[[str], None],
          extras: "_Extras | None" = None) -> dict[str, Any]:
    meta8 = dataclasses.replace(
        meta, model_version=f"{meta.model_version}-int8",
        training={**meta.training, "quantization": {**quantize.SETTINGS,
                                                    "calibration_files": len(calibration)}})
    progress(f"quantising to int8, calibrating on {len(calibration)} images of "
             f"{opts.calibration}")
    done = quantize.quantize(fp32, dest, calibration, meta8)
    if extras is not None and extras.table_text:
        dest.write_bytes(_with_table(dest.read_bytes(), extras))  # whatever the quantiser kept
    int8_model = verify_file(dest, meta8, threads=opts.threads)
    if extras is not None and extras.point:  # its own probabilities decide its threshold
        meta8, int8_model, done["operating_point"] = _operating_point(
            dest, meta8, int8_model, extras, opts, progress)
    eval_root = opts.int8_eval or opts.verify
    progress(f"comparing int8 with fp32 on {len(eval_items)} labelled images of {eval_root}")
    result = quantize.compare(scorer, int8_model, eval_items)
    why = quantize.problem(result, opts.auc_drop_limit)
    return {**done, **result, "path": str(int8_path(opts.out)), "eval_folder": str(eval_root),
            "auc_drop_limit": opts.auc_drop_limit, "size_bytes": dest.stat().st_size,
            "problem": why, "forced": bool(why and opts.force),
            "written": why is None or opts.force}


def _verify_items(folder: Path | None) -> list | None:
    if folder is None:
        return None
    if not Path(folder).is_dir():
        raise ExportError(f"--verify {folder}: not a folder; give a folder of X-rays")
    items = list(find_images(Path(folder)))
    if not items:
        raise ExportError(f"--verify {folder}: no image files found below it")
    return items


def _calibration_files(opts: ExportOptions) -> list[Path]:
    if opts.calibration is None:
        raise ExportError("--int8 needs --calibration DIR: a folder of X-rays (e.g. the training "
                          "images) to measure activation ranges on")
    if not opts.calibration.is_dir():
        raise ExportError(f"--calibration {opts.calibration}: not a folder; give a folder of "
                          "X-rays")
    files = [f for _, f in find_images(opts.calibration)]
    if not files:
        raise ExportError(f"--calibration {opts.calibration}: no image files found below it")
    return quantize.pick_calibration(files, opts.calibration_images)


def _int8_eval_items(opts: ExportOptions, class_names: tuple[str, ...]) -> list:
    root = opts.int8_eval or opts.verify
    if root is None:
        raise ExportError("--int8 needs labelled images to compare int8 with fp32: --verify DIR "
                          "or --int8-eval DIR with one folder per class")
    flag = "--int8-eval" if opts.int8_eval else "--verify"
    if not Path(root).is_dir():
        raise ExportError(f"{flag} {root}: not a folder")
    try:
        return items_from_folders(Path(root), class_names)
    except EvalDataError as e:
        raise ExportError(f"{flag}: {e}") from e


# ---------------------------------------------------------------------------- training data

@dataclass
class _Extras:
    """What the run's data adds to the model: calibration, the training-data table, and the
    validation files the operating point is chosen on."""

    val: list = dataclasses.field(default_factory=list)  # calibrate.ValFile
    point: tuple[str, float] | None = None
    calibration: dict[str, Any] | None = None
    table_summary: dict[str, Any] | None = None
    table_text: str = ""
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


def _check_calibration_options(opts: ExportOptions) -> tuple[str, float] | None:
    """Refuse contradictory options before anything is read."""
    if opts.calibrate not in calibrate.METHODS:
        raise ExportError(f"--calibrate {opts.calibrate}: choose one of "
                          f"{', '.join(calibrate.METHODS)}")
    if opts.threshold_for and opts.threshold is not None:
        raise ExportError("--threshold and --threshold-for both set the threshold; give one")
    if opts.val is not None and not Path(opts.val).is_dir():
        raise ExportError(f"--val {opts.val}: not a folder; give a labelled folder with one "
                          "sub-folder per class")
    return calibrate.parse_operating_point(opts.threshold_for) if opts.threshold_for else None


def _prepare(model, ckpt: dict[str, Any], opts: ExportOptions, point,
             progress: Callable[[str], None], stages: Stages | None) -> _Extras:
    extras = _Extras(point=point)
    needs_val = opts.calibrate != "none" or point is not None
    run = None
    if opts.training_hashes or (needs_val and opts.val is None):
        run = rundata.locate(ckpt, opts.training_data)
        if run is not None:
            progress(f"training data {run.root}: fingerprint matches the checkpoint")
    if needs_val:
        extras.val = _val_files(opts, run, ckpt)
    if opts.calibrate == "temperature":
        progress(f"temperature scaling on {len(extras.val)} validation images")
        tick = stages and (lambda done, total: stages("calibrate", done, total))
        extras.calibration = calibrate.temperature_scale(
            model, extras.val, Preprocess.from_dict(ckpt["preprocess"]), tick)
        extras.report["calibration"] = extras.calibration
    if not opts.training_hashes:
        extras.report["training_data"] = {"embedded": False, "reason": "--no-training-hashes"}
    elif run is None:
        extras.report["training_data"] = {
            "embedded": False, "reason": "the checkpoint names no training data (its config has "
            "no data folder); give --training-data DIR to embed the table"}
    else:
        progress(f"training-data table: hashing and describing the train and val images of "
                 f"{run.root}")
        extras.table_summary, extras.table_text = rundata.training_table(run,
                                                                         threads=opts.threads)
        extras.report["training_data"] = {"embedded": True, **extras.table_summary}
    return extras


def _val_files(opts: ExportOptions, run, ckpt: dict[str, Any]) -> list:
    positive = ckpt["positive_class"]
    if opts.val is not None:
        try:
            items = items_from_folders(Path(opts.val), tuple(ckpt["class_names"]))
        except EvalDataError as e:
            raise ExportError(f"--val: {e}") from e
        return [(it.path, it.file, int(it.true_label == positive)) for it in items]
    if run is None:
        raise ExportError("--calibrate and --threshold-for need validation images: the "
                          "checkpoint names no training data, so give --val DIR (one folder "
                          "per class) or --training-data DIR")
    return run.files("val")


def _with_extras(meta: ModelMeta, extras: _Extras) -> ModelMeta:
    training = dict(meta.training)
    if extras.calibration:
        training["calibration"] = extras.calibration
    meta = dataclasses.replace(meta, training=training,
                               training_data=extras.table_summary or {})
    try:
        return ModelMeta.from_props(meta.to_props(), "exported metadata")
    except ValueError as e:
        raise ExportError(f"the metadata is not valid: {e}") from e


def _with_table(data: bytes, extras: _Extras) -> bytes:
    """The model bytes with the training-data table entry (when there is one)."""
    if not extras.table_text:
        return data
    if read_props(data).get(membership.ENTRY) == extras.table_text:
        return data
    return with_entry(data, membership.ENTRY, extras.table_text)


def _operating_point(path: Path, meta: ModelMeta, scorer, extras: _Extras, opts: ExportOptions,
                     progress: Callable[[str], None]):
    """Choose the threshold on the validation files with the written model's own
    probabilities; rewrite its metadata -> (meta, the reloaded scorer, what was chosen)."""
    kind, target = extras.point
    progress(f"choosing the threshold for {kind} {target:g} on {len(extras.val)} validation "
             "images, with the written model's probabilities")
    chosen = calibrate.operating_point(scorer, extras.val, kind, target, opts.threads)
    meta = dataclasses.replace(meta, threshold=chosen["threshold"],
                               training={**meta.training, "operating_point": chosen})
    path.write_bytes(embed_bytes(path.read_bytes(), meta))
    return meta, verify_file(path, meta, threads=opts.threads), chosen
