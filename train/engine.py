"""The training loop: train_one_epoch, evaluate, and fit (run folder, checkpoints, resume).

`fit` returns data and reports through callbacks (`log` for lines, `progress` for bars); only the
CLI prints. A run folder holds config.json, data.csv (the file list behind the fingerprint),
history.csv, train.log, best.pt, last.pt and, when DATA has test/, metrics.json.

Every random choice of an epoch is derived from (seed, epoch) -- the shuffle, the augmentation
of each image, the cached view picked -- and the model, optimizer, scheduler, early-stopping and
global RNG states are all in last.pt, so `--resume` after an interruption reproduces the
uninterrupted run exactly (on CPU).
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fxscore import csvsafe
from fxscore.contract import Preprocess
from fxscore.cpus import available_cpus

from .config import TrainConfig, resumed_config, versions, write_config
from .data import (Decoded, DataError, EpochBatches, TrainViews, decode, discover,
                   fingerprint, tensor_batches)
from .features import backbone, cached_batches, extract, view_cache
from .model import build_model
from .presets import EvalPreset, TrainPreset, shrink_for_augmentation

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_auc", "lr", "seconds")
Progress = Callable[[str, int, int], None]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class RunError(RuntimeError):
    """The run folder or device cannot be used as asked; the message says what to do instead."""


@dataclass
class FitResult:
    out: Path
    last_epoch: int
    best_epoch: int
    best_metrics: dict[str, float]
    stop_reason: str
    history: list[dict[str, float]]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    test_metrics: Optional[dict[str, float]] = None


def train_one_epoch(net: nn.Module, batches: Batches, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device, *,
                    scaler: Optional[torch.amp.GradScaler] = None, channels_last: bool = False,
                    progress: Optional[Callable[[int], None]] = None,
                    after_step: Optional[Callable[[], None]] = None) -> float:
    """One pass over `batches`; returns the mean training loss. The caller sets train/eval mode;
    after_step() runs after every optimizer step (the weight average)."""
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=scaler is not None):
            logits = net(x).squeeze(1)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step:
            after_step()
        total += loss.item() * len(y)
        count += len(y)
        if progress:
            progress(count)
    return total / max(count, 1)


@torch.inference_mode()
def evaluate(net: nn.Module, batches: Batches, criterion: nn.Module, device: torch.device, *,
             amp: bool = False, channels_last: bool = False) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy at 0.5 and ROC-AUC (nan with one class) -> (metrics, probabilities)."""
    net.eval()
    losses, probs, targets = [], [], []
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=amp):
            logits = net(x).squeeze(1).float()
        losses.append(criterion(logits, y).item() * len(y))
        probs.append(torch.sigmoid(logits).cpu())
        targets.append(y.cpu())
    p, t = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    auc = float(roc_auc_score(t, p)) if len(np.unique(t)) == 2 else float("nan")
    return {"loss": sum(losses) / len(t), "accuracy": float(((p >= 0.5) == (t == 1)).mean()),
            "auc": auc}, p


class WeightAverage:
    """An exponential moving average of a network's weights and batch-norm statistics.

    From random init the weights of one epoch score very differently from the next (validation
    ROC-AUC swings by 0.1); the average over the last few hundred steps is steadier. The decay
    warms up as (1 + t) / (10 + t), so the random initial weights are forgotten within the first
    epoch instead of lingering for 1 / (1 - decay) steps.
    """

    def __init__(self, model: nn.Module, decay: float, steps: int = 0):
        self.net = copy.deepcopy(model).eval()
        self.net.requires_grad_(False)
        self.decay, self.steps = decay, steps
        pairs = list(zip(self.net.state_dict().values(), model.state_dict().values()))
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._current = [b for a, b in pairs if a.is_floating_point()]
        self._counters = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        w = 1 - min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self._averaged, self._current, w)
        for a, b in self._counters:  # batch-norm batch counters
            a.copy_(b)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    return torch.device(name)


def make_criterion(pos_weight: str, targets: torch.Tensor) -> tuple[nn.Module, Optional[float]]:
    """BCEWithLogitsLoss; pos_weight "auto" = negatives / positives in the training set."""
    if pos_weight == "none":
        return nn.BCEWithLogitsLoss(), None
    w = (float((targets == 0).sum() / (targets == 1).sum()) if pos_weight == "auto"
         else float(pos_weight))
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([w])), w


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    # Drop the LR after half the early-stopping patience, so a lower LR gets its chance first.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=max(1, cfg.patience // 2))


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors/lists, so checkpoints load with weights_only=True."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(py_state), "gauss": gauss}}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().contiguous()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_cpu(v) for v in obj]
    return obj


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """Atomic: an interruption leaves the previous file intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _same_file(src: Path, dest: Path) -> None:
    """dest = src's content, atomically; a hard link when the file system allows (no copy).

    Safe because last.pt is always replaced by a new file, never rewritten in place.
    """
    tmp = dest.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class RunLog:
    """Lines to train.log (timestamped) and to the caller's log function."""

    def __init__(self, path: Path, echo: Optional[Callable[[str], None]]):
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"{datetime.now().isoformat(timespec='seconds')} {line}\n")
        if self.echo:
            self.echo(line)


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, HISTORY_FIELDS)
        w.writeheader()
        w.writerows(history)


def _json_safe(d: dict[str, float]) -> dict[str, Optional[float]]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _open_run(cfg: TrainConfig, resume: bool) -> Optional[dict[str, Any]]:
    """Check the run folder; with `resume`, load last.pt and check the recipe did not change."""
    out, last = Path(cfg.out), Path(cfg.out) / "last.pt"
    if not resume:
        if last.exists() or (out / "best.pt").exists():
            raise RunError(f"{out} already holds a run; continue it with --resume, or choose "
                           "another --out")
        return None
    if not last.is_file():
        raise RunError(f"{last}: nothing to resume; start the run without --resume")
    state = load_checkpoint(last)
    try:
        resumed_config(TrainConfig.from_dict(state["config"]), cfg.to_dict())
    except ValueError as e:
        raise RunError(f"{last}: {e}") from None
    return state


@dataclass
class _Run:
    """What every epoch's checkpoint repeats about the run."""

    cfg: TrainConfig
    class_names: list[str]
    params: Preprocess
    digest: str

    def checkpoint(self, model, optimizer, scheduler, scaler, epoch: int, best_epoch: int,
                   metrics: dict, best_metrics: dict, history: list[dict],
                   average: Optional[WeightAverage] = None) -> dict[str, Any]:
        """The shared checkpoint format (see the notes for `fxscore export`), plus what resume
        needs: history, global RNG states, the AMP scaler. With a weight average, "model" is
        the average (what the metrics describe and export takes) and "train_model" the weights
        the optimizer steps."""
        extra = ({"train_model": model.state_dict(), "average_steps": average.steps}
                 if average else {})
        return _cpu({"model": (average.net if average else model).state_dict(), **extra,
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler else {},
                     "epoch": epoch, "best_epoch": best_epoch, "config": self.cfg.to_dict(),
                     "class_names": self.class_names, "positive_class": self.cfg.positive_class,
                     "preprocess": self.params.to_dict(), "metrics": metrics,
                     "best_metrics": best_metrics, "data_fingerprint": self.digest,
                     "versions": versions(), "history": history, "rng": rng_state()})


def _decode_splits(cfg: TrainConfig, layout, params: Preprocess, threads: int,
                   progress: Optional[Progress], say: RunLog) -> tuple[Decoded, Decoded, list]:
    """Decode train/ (shrunk, for augmentation) and val/ (the scorer's preprocessing) once."""
    # Read as the scorer reads (min_size: reduced-scale decoding of large files), so that the
    # network never sees an image the scorer would not give it: no train/serve skew.
    train = decode(layout.splits["train"], lambda im: shrink_for_augmentation(
        im, params.input_size, params.resize), threads, progress, "decode train",
        min_size=params.input_size)
    val = decode(layout.splits["val"], EvalPreset(params), threads, progress, "decode val",
                 min_size=params.input_size)
    unreadable = [(str(p), e) for p, e in train.failures + val.failures]
    for _, reason in unreadable:
        say(f"skipped unreadable file: {reason}")
    for split, d in (("train", train), ("val", val)):
        if len(torch.unique(d.targets)) < 2:
            raise DataError(f"{layout.root / split}: after skipping {len(d.failures)} unreadable "
                            f"files, not every class has a readable image")
    say(f"train {len(train.samples)} images ({int(train.targets.sum())} {cfg.positive_class}), "
        f"val {len(val.samples)} ({int(val.targets.sum())} {cfg.positive_class}); "
        f"{len(unreadable)} unreadable skipped")
    return train, val, unreadable


def fit(cfg: TrainConfig, *, resume: bool = False, log: Optional[Callable[[str], None]] = None,
        progress: Optional[Progress] = None,
        on_epoch: Optional[Callable[[dict[str, float]], None]] = None) -> FitResult:
    """Train as `cfg` says, writing the run folder; `resume` continues from last.pt.

    log(line) hears every line of train.log; progress(stage, done, total) drives progress bars;
    on_epoch(row) gets each history row (raising there interrupts the run, as Ctrl-C does).
    """
    t_start = time.perf_counter()
    # Everything that can refuse the run (folder, device, data layout, weights) comes before
    # anything is written, so a refused run leaves no half-made folder behind.
    state = _open_run(cfg, resume)
    out = Path(cfg.out)
    torch.set_num_threads(cfg.threads or available_cpus())
    device = resolve_device(cfg.device)
    amp = channels_last = device.type == "cuda"  # channels_last is slower on CPU for ResNet18
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    params = Preprocess(input_size=(cfg.image_size, cfg.image_size), resize=cfg.resize,
                        fit=cfg.fit)
    layout = discover(cfg.data, cfg.positive_class, cfg.limit_per_class, cfg.seed)
    digest, files = fingerprint(layout)
    if state is not None and state["data_fingerprint"] != digest:
        raise RunError(f"{cfg.data} differs from the data {out} was trained on (fingerprint "
                       f"{digest[:12]} != {state['data_fingerprint'][:12]}); resume with the same "
                       "data, or start a new run")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model("none" if state else cfg.pretrained, cfg.freeze)
    if state is not None:
        model.load_state_dict(state.get("train_model", state["model"]))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    average = None
    if cfg.ema:
        average = WeightAverage(model, cfg.ema, state["average_steps"] if state else 0)
        if state is not None:
            average.net.load_state_dict(state["model"])

    out.mkdir(parents=True, exist_ok=True)
    say = RunLog(out / "train.log", log)
    # Through csvsafe like every CSV fxscore writes: a file name that is not UTF-8, or one
    # that starts like a spreadsheet formula, must not crash the run or run in a spreadsheet.
    columns = ("split", "file", "target", "bytes", "sha256")
    with (out / "data.csv").open("w", newline="", encoding="utf-8") as f:
        csvsafe.write_rows(f, columns, ([row[c] for c in columns] for row in files))
    write_config(cfg, out / "config.json", data_fingerprint=digest,
                 class_names=list(layout.class_names), positive_class=cfg.positive_class,
                 preprocess=params.to_dict(), device=str(device),
                 files={s: len(v) for s, v in layout.splits.items()})
    say(f"{'resuming' if state else 'starting'} run {out} on {device} "
        f"({torch.get_num_threads()} threads); data {layout.root} fingerprint {digest[:12]}")
    if layout.ignored:
        say(f"{layout.ignored} non-image files in the class folders ignored")
    for w in caught if state is None else []:
        say(f"warning: {w.message}")
    threads = max(cfg.workers, available_cpus())
    train, val, unreadable = _decode_splits(cfg, layout, params, threads, progress, say)

    criterion, pos_weight = make_criterion(cfg.pos_weight, train.targets)
    criterion.to(device)
    if pos_weight is not None:
        say(f"pos_weight {pos_weight:.4g}")
    # fused: one kernel for all parameters; 4-8x faster than the per-tensor loop on a CPU.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = make_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    history: list[dict[str, float]] = []
    best_epoch, best_metrics, start = 0, {"val_loss": math.inf}, 1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best_epoch = list(state["history"]), state["best_epoch"]
        best_metrics, start = dict(state["best_metrics"]), state["epoch"] + 1
    _write_history(out / "history.csv", history)

    views = TrainViews(train.arrays, train.targets, TrainPreset(params, (cfg.crop_scale, 1.0)),
                       cfg.seed)
    val_x, val_y = torch.from_numpy(np.stack(val.arrays)), val.targets
    if cfg.uses_feature_cache:
        t0 = time.perf_counter()
        feats = view_cache(model, views, cfg.cache_views, cfg.batch_size, device, cfg.workers,
                           amp, channels_last,
                           progress and (lambda d, n: progress("feature cache", d, n)))
        val_x = extract(backbone(model), tensor_batches(val_x, val_y, cfg.batch_size), device,
                        amp, channels_last)  # the head sees val features, not images
        say(f"feature cache: {cfg.cache_views} views x {len(views)} train images + "
            f"{len(val_y)} val images in {time.perf_counter() - t0:.1f}s")
        net = model.fc
        scored = average.net.fc if average else net
    else:
        sampler = EpochBatches(len(views), cfg.batch_size, cfg.seed)
        loader = torch.utils.data.DataLoader(views, batch_sampler=sampler,
                                             num_workers=cfg.workers,
                                             persistent_workers=cfg.workers > 0,
                                             pin_memory=device.type == "cuda")
        net = model
        scored = average.net if average else net
    if state is not None:
        set_rng_state(state["rng"])  # after the cache, exactly where the interrupted run stood
        say(f"resumed after epoch {state['epoch']} (best epoch {best_epoch})")

    run = _Run(cfg, list(layout.class_names), params, digest)
    bad = (start - 1) - best_epoch  # epochs since the best one
    stop = f"reached --epochs {cfg.epochs}"
    if cfg.patience and history and bad >= cfg.patience:
        stop = f"early stopping: val loss has not improved for {cfg.patience} epochs"
        start = cfg.epochs + 1  # the run had already stopped; nothing left to do
    epoch_walls: list[float] = []
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        label = f"epoch {epoch}/{cfg.epochs}"
        tick = progress and (lambda done, label=label: progress(label, done, len(views)))
        if cfg.uses_feature_cache:
            batches: Batches = cached_batches(feats, train.targets, cfg.seed, epoch, cfg.batch_size)
        else:
            sampler.set_epoch(epoch)
            batches = loader
        # A frozen backbone keeps BatchNorm in eval mode, so its features never change.
        model.train(not cfg.frozen)
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(net, batches, criterion, optimizer, device, scaler=scaler,
                                     channels_last=channels_last, progress=tick,
                                     after_step=average and average.update)
        m, _ = evaluate(scored, tensor_batches(val_x, val_y, 2 * cfg.batch_size), criterion, device,
                        amp=amp, channels_last=channels_last)
        if cfg.scheduler == "plateau":
            scheduler.step(m["loss"])
        else:
            scheduler.step()
        metrics = {"train_loss": train_loss, "val_loss": m["loss"], "val_accuracy": m["accuracy"],
                   "val_auc": m["auc"]}
        row = {"epoch": epoch, **metrics, "lr": lr, "seconds": time.perf_counter() - t0}
        history.append(row)
        improved = m["loss"] < best_metrics["val_loss"]
        if improved:
            best_epoch, best_metrics, bad = epoch, metrics, 0
        else:
            bad += 1
        save_checkpoint(run.checkpoint(model, optimizer, scheduler, scaler, epoch, best_epoch,
                                       metrics, best_metrics, history, average),
                        out / "last.pt")
        if improved:
            _same_file(out / "last.pt", out / "best.pt")
        _write_history(out / "history.csv", history)
        say(f"{label}  train_loss {train_loss:.4f}  val_loss {m['loss']:.4f}  "
            f"val_acc {m['accuracy']:.3f}  val_auc {m['auc']:.3f}  lr {lr:.2e}  "
            f"{row['seconds']:.1f}s{'  *best' if improved else ''}")
        if on_epoch:
            on_epoch(row)
        epoch_walls.append(time.perf_counter() - t0)
        if cfg.patience and bad >= cfg.patience:
            stop = f"early stopping: val loss has not improved for {cfg.patience} epochs"
            break
        # The budget covers the whole command (decoding and the feature cache included).
        next_end = time.perf_counter() - t_start + sum(epoch_walls) / len(epoch_walls)
        if cfg.max_minutes and epoch < cfg.epochs and next_end > 60 * cfg.max_minutes:
            stop = (f"time budget: another epoch would overrun --max-minutes {cfg.max_minutes:g}"
                    "; continue with --resume")
            break
    last_epoch = history[-1]["epoch"] if history else 0
    say(f"stopped after epoch {last_epoch}: {stop}. Best epoch {best_epoch}: val_loss "
        f"{best_metrics['val_loss']:.4f}, val_auc {best_metrics.get('val_auc', math.nan):.3f}")

    result = FitResult(out, last_epoch, best_epoch, best_metrics, stop, history, unreadable)
    if "test" in layout.splits and best_epoch:
        result.test_metrics = _test(model, layout.splits["test"], out / "best.pt", params,
                                    criterion, cfg.batch_size, device, amp, channels_last,
                                    threads, progress, say, result)
    (out / "metrics.json").write_text(json.dumps(
        {"best_epoch": best_epoch, "stop_reason": stop, "val": _json_safe(best_metrics),
         "test": _json_safe(result.test_metrics) if result.test_metrics else None,
         "unreadable": [_in_data(p, layout.root) for p, _ in result.unreadable]}, indent=2)
        + "\n")
    return result


def _in_data(path: str, root: Path) -> str:
    """A file of the data as metrics.json names it: relative to the data root (run folders
    travel; the build machine's folders are nobody's business)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def _test(model: nn.Module, samples, best_path: Path, params: Preprocess, criterion: nn.Module,
          batch_size: int, device: torch.device, amp: bool, channels_last: bool, threads: int,
          progress: Optional[Progress], say: RunLog, result: FitResult) -> dict[str, float]:
    """The best checkpoint on test/, through the scorer's own preprocessing."""
    model.load_state_dict(load_checkpoint(best_path)["model"])
    test = decode(samples, EvalPreset(params), threads, progress, "decode test",
                  min_size=params.input_size)
    for _, reason in test.failures:
        say(f"skipped unreadable file: {reason}")
    result.unreadable += [(str(p), e) for p, e in test.failures]
    if not test.samples:
        return {}
    m, _ = evaluate(model, tensor_batches(torch.from_numpy(np.stack(test.arrays)), test.targets,
                                          2 * batch_size),
                    criterion, device, amp=amp, channels_last=channels_last)
    say(f"best epoch on test ({len(test.samples)} images): loss {m['loss']:.4f}  "
        f"accuracy {m['accuracy']:.3f}  auc {m['auc']:.3f}")
    return {"test_loss": m["loss"], "test_accuracy": m["accuracy"], "test_auc": m["auc"]}
