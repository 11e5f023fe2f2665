"""Every option of a training run, saved with the run as config.json."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from fxscore.contract import FIT_METHODS

SCHEDULERS = ("plateau", "cosine")
# Options that may change when a run is resumed: they do not change what an epoch computes
# (the data itself is checked by its fingerprint, so DATA may have moved).
RESUMABLE = ("data", "out", "epochs", "max_minutes", "device", "workers", "threads")


@dataclass
class TrainConfig:
    data: str
    out: str
    pretrained: str = "imagenet"  # "imagenet" | "none" | path of a resnet18 state dict
    freeze: str = "backbone"  # "backbone" (only the head trains) | "none" (full fine-tuning)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "plateau"  # ReduceLROnPlateau on val loss, or cosine annealing over epochs
    patience: int = 5  # early stopping: epochs without a lower val loss
    pos_weight: str = "none"  # "none" | "auto" (negatives/positives in train) | a number
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    workers: int = 0  # DataLoader worker processes (0 = augment in the main process)
    threads: Optional[int] = None  # torch CPU threads; None = every core this process may use
    image_size: int = 224
    resize: str = "bilinear"
    fit: str = "pad"  # "pad": keep the aspect ratio, black borders; or "stretch" (fxscore.contract)
    crop_scale: float = 0.08  # RandomResizedCrop's smallest area fraction (torchvision's default)
    positive_class: str = "fractured"
    cache_views: int = 5  # frozen backbone: augmented views per image in the feature cache; 0 = off
    limit_per_class: Optional[int] = None  # use at most N files per class and split (quick trials)
    max_minutes: Optional[float] = None  # stop after the epoch that would overrun this budget
    ema: float = 0.0  # decay of an exponential moving average of the weights per step; 0 = off

    def __post_init__(self) -> None:
        problems = []
        if self.freeze not in ("backbone", "none"):
            problems.append(f"freeze must be 'backbone' or 'none', not {self.freeze!r}")
        if self.fit not in FIT_METHODS:
            problems.append(f"fit must be one of {FIT_METHODS}, not {self.fit!r}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {SCHEDULERS}, not {self.scheduler!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.pos_weight not in ("none", "auto"):
            try:
                if float(self.pos_weight) <= 0:
                    raise ValueError
            except ValueError:
                problems.append(f"pos_weight must be none, auto or a positive number, "
                                f"not {self.pos_weight!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.image_size < 32:
            problems.append("image_size must be at least 32 (ResNet18 downsamples 32x)")
        for name in ("patience", "cache_views", "workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if not 0 < self.crop_scale <= 1:
            problems.append("crop_scale must be in (0, 1]")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            problems.append("limit_per_class must be at least 1")
        if not 0 <= self.ema < 1:
            problems.append("ema must be in [0, 1) (0 turns it off)")
        if self.max_minutes is not None and self.max_minutes <= 0:
            problems.append("max_minutes must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def frozen(self) -> bool:
        return self.freeze == "backbone"

    @property
    def uses_feature_cache(self) -> bool:
        return self.frozen and self.cache_views > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        # Runs saved before `fit` existed stretched; they resume (and export) as they trained.
        return cls(**{"fit": "stretch", **{k: v for k, v in d.items() if k in known}})


def resumable(saved: TrainConfig) -> tuple[str, ...]:
    """The options a resume of `saved` may change. Early-stopping patience only decides when to
    stop, except under the plateau scheduler, whose LR drops are timed by it."""
    return RESUMABLE + (("patience",) if saved.scheduler != "plateau" else ())


def resumed_config(saved: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """The saved recipe with `changes`; ValueError if a change would alter the training itself."""
    allowed = resumable(saved)
    fixed = {k: v for k, v in changes.items() if k not in allowed and v != getattr(saved, k)}
    if fixed:
        listed = ", ".join(f"--{k.replace('_', '-')} {getattr(saved, k)} -> {v}"
                           for k, v in fixed.items())
        raise ValueError(f"a resumed run keeps its recipe; cannot change {listed}. Only "
                         f"{', '.join('--' + k.replace('_', '-') for k in allowed[2:])} may "
                         "change; start a new run for anything else")
    return TrainConfig.from_dict({**saved.to_dict(), **changes})


PATH_OPTIONS = ("data", "out", "pretrained")  # options that may name a place on this machine
DATA_ROOT = "."  # how a portable config names the data root itself


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without the places of the machine that ran it, for a shipped model.

    Paths are written relative to the data root: the root itself is ".", a place inside it
    its relative path, any other place its last component only (a run folder "run", a
    weights file "resnet18.pth"). The data itself is identified by its fingerprint, which
    travels beside the config. Names that are not paths ("imagenet", "none") stay as they are.
    """
    out = dict(config)
    root = config.get("data")
    root = Path(os.path.abspath(root)) if isinstance(root, str) and root else None
    for key in PATH_OPTIONS:
        value = out.get(key)
        if not isinstance(value, str) or not value:
            continue
        if key == "pretrained" and value in ("imagenet", "none"):
            continue
        path = Path(os.path.abspath(value))
        if root is not None and (path == root or root in path.parents):
            out[key] = path.relative_to(root).as_posix() if path != root else DATA_ROOT
        else:
            out[key] = path.name
    return out


def versions() -> dict[str, str]:
    """Package versions that decide what a run computes."""
    import numpy
    import PIL
    import torch
    import torchvision

    from fxscore import __version__

    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    return {"fxscore": __version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": numpy.__version__,
            "pillow": PIL.__version__, "python": platform.python_version()}


def write_config(cfg: TrainConfig, path: Path, **extra: Any) -> None:
    """config.json: every option, package versions, and whatever the run adds (data fingerprint)."""
    doc = {"config": cfg.to_dict(), "versions": versions(), **extra}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_config(path: Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads(path.read_text())["config"])
