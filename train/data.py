"""Labelled X-ray folders: discovery, the data fingerprint, one decode pass, the training views.

DATA/{train,val[,test]}/<class>/... holds the images (sub-folders allowed). Every file is read
through the scorer's one reading rule (`fxscore.images.read_image` with the model's input size
as `min_size`, as `fxscore.scoring.model_input` reads), so DICOM, 16-bit, misnamed and large
files (decoded at reduced scale) give the network exactly what scoring gives it; files it cannot
read are listed and skipped, never fatal.

Datasets hold decoded arrays (decoded once, see `presets.SHRINK_FACTOR`) and plain numbers, so
they pickle to DataLoader workers; augmentation randomness is keyed by (view, index), never by
process state.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from fxscore.files import find_images
from fxscore.hashing import sha256_file
from fxscore.images import ImageReadError, read_image

from .presets import TrainPreset

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")
Progress = Callable[[str, int, int], None]


class DataError(ValueError):
    """The data folder does not have the layout training needs; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int  # 1 = positive class


@dataclass
class Layout:
    root: Path
    class_names: tuple[str, str]  # folder names, sorted (torchvision ImageFolder order)
    positive_class: str
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    ignored: int = 0  # non-image files in the class folders, passed over as `fxscore run` does


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover(root: str | Path, positive_class: str = "fractured",
             limit_per_class: Optional[int] = None, seed: int = 0) -> Layout:
    """Find the labelled files; raise DataError naming what was expected when the layout is off."""
    root = Path(root)
    expect = (f"expected {root}/train/ and {root}/val/ (optionally test/), each with one folder "
              f"per class, e.g. '{positive_class}/' and 'not {positive_class}/'")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {expect}")
    missing = [s for s in REQUIRED_SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{root}: missing {', '.join(s + '/' for s in missing)}; {expect}")
    classes = _class_dirs(root / "train")
    if len(classes) != 2:
        raise DataError(f"{root / 'train'}: found {len(classes)} class folders {classes}, "
                        f"need exactly 2; {expect}")
    if positive_class not in classes:
        raise DataError(f"{root / 'train'}: positive class '{positive_class}' is not one of the "
                        f"class folders {classes}; pass --positive-class with one of them")
    layout = Layout(root, (classes[0], classes[1]), positive_class)
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        missing = [c for c in classes if not (split_dir / c).is_dir()]
        extra = [c for c in _class_dirs(split_dir) if c not in classes]
        if missing or extra:
            raise DataError(f"{split_dir}: class folders must be {classes} as in train/; "
                            f"missing {missing}, unexpected {extra}")
        samples = []
        for cls in classes:
            counts: Counter = Counter()
            # The files `fxscore run` would score: same extensions, DICOM sniffing, hidden skipped.
            files = [path for _, path in find_images(split_dir / cls, counts=counts)]
            layout.ignored += counts["ignored"]
            if not files:
                raise DataError(f"{split_dir / cls}: no files; every class needs images in "
                                f"{split}/")
            if limit_per_class is not None and len(files) > limit_per_class:
                pick = np.random.default_rng([seed, len(files)]).permutation(len(files))
                files = [files[i] for i in sorted(pick[:limit_per_class])]
            samples += [Sample(p, int(cls == positive_class)) for p in files]
        layout.splits[split] = samples
    return layout


def fingerprint(layout: Layout) -> tuple[str, list[dict]]:
    """sha256 over every file's (split/class/name, size, content sha256), plus the rows."""
    rows = []
    for split, samples in layout.splits.items():
        for s in samples:
            rows.append({"file": s.path.relative_to(layout.root).as_posix(), "split": split,
                         "target": s.target, "bytes": s.path.stat().st_size,
                         "sha256": sha256_file(s.path)})
    digest = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["file"]):
        # surrogateescape: a name that is not UTF-8 hashes as its bytes instead of crashing
        digest.update(f"{r['file']}\t{r['bytes']}\t{r['sha256']}\n".encode("utf-8",
                                                                           "surrogateescape"))
    return digest.hexdigest(), rows


@dataclass
class Decoded:
    """The readable part of a split, decoded and transformed once."""

    samples: list[Sample]
    arrays: list[np.ndarray]
    failures: list[tuple[Path, str]]

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor([s.target for s in self.samples], dtype=torch.float32)


def decode(samples: Sequence[Sample], transform: Callable[[np.ndarray], np.ndarray],
           threads: int = 1, progress: Optional[Progress] = None,
           label: str = "decode", *, min_size: Optional[tuple[int, int]] = None) -> Decoded:
    """read_image + transform every file (threads overlap the I/O); unreadable files are skipped.

    min_size: the model's input size (h, w), so that files are read as the scorer reads them
    (reduced-scale decoding of large files, never below what that size needs): with
    `EvalPreset(params)` as transform this is `fxscore.scoring.model_input` exactly. Pass it
    for anything the network sees; None decodes every file in full.
    """
    def one(s: Sample):
        try:
            return transform(read_image(s.path, min_size=min_size)), None
        except ImageReadError as e:
            return None, str(e)

    out = Decoded([], [], [])
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = zip(samples, pool.map(one, samples), strict=True)
        for i, (s, (array, error)) in enumerate(results, 1):
            if error is None:
                out.samples.append(s)
                out.arrays.append(array)
            else:
                out.failures.append((s.path, error))
            if progress:
                progress(label, i, len(samples))
    return out


def seed_for(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, epoch, stream...)."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`; the cached and the naive loop share it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch, 0)))


def chunks(order: Sequence, batch_size: int, training: bool = True) -> list[list]:
    """Batches of `order`. In training a trailing batch of one is dropped: BatchNorm cannot
    train on a single sample, and the cached loop drops it too, so both see the same batches."""
    out = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    if training and len(out) > 1 and len(out[-1]) == 1:
        out.pop()
    return out


class TrainViews(torch.utils.data.Dataset):
    """Augmented views of decoded training images, indexed by (view, image index).

    View v of image i is TrainPreset applied with a Generator seeded by (seed, v, i). The naive
    loop uses view = epoch - 1; the feature cache stores views 0..V-1, so cached view v is
    exactly what the naive loop sees in epoch v + 1.
    """

    def __init__(self, images: Sequence[np.ndarray], targets: torch.Tensor,
                 preset: TrainPreset, seed: int):
        self.images, self.targets, self.preset, self.seed = list(images), targets, preset, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        view, i = key
        rng = np.random.default_rng([self.seed, view, i])
        x = self.preset(self.images[i].astype(np.float32), rng)
        return torch.from_numpy(x), self.targets[i]


def view_batches(order: Sequence[int], batch_size: int, view: int, training: bool = True
                 ) -> list[list[tuple[int, int]]]:
    """Batch keys (view, index) for one view of the images in `order`."""
    return chunks([(view, int(i)) for i in order], batch_size, training)


class EpochBatches:
    """Batch sampler of the naive loop: epoch e's shuffled order, keys (view = e - 1, index).

    The epoch is set from outside (`set_epoch`), so persistent DataLoader workers keep working.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.n, self.seed, self.epoch)
        return iter(view_batches(order.tolist(), self.batch_size, self.epoch - 1))

    def __len__(self) -> int:
        return len(chunks(range(self.n), self.batch_size))


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches from preprocessed tensors, in order, nothing dropped."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]
