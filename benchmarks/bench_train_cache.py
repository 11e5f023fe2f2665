"""Frozen-backbone training: the naive loop vs the feature cache, on the same data and epochs.

Prints the wall time of a naive frozen run (the backbone runs on every image every epoch) and of
a cached run (backbone features of --cache-views augmented views computed once, then only the
head trains), building the cache included, and the per-epoch ratio once the cache exists.
Goals on 2 CPU cores: per-epoch >= 50x, whole 30-epoch run >= 5x.

The naive side is expensive (a ResNet18 forward per image per epoch at 224 px), so by default it
runs --naive-epochs epochs and its 30-epoch time is EXTRAPOLATED (setup + epochs x measured mean
epoch time) and printed as such; --naive-epochs 0 runs it in full. The cached side always runs
every epoch.

    python benchmarks/bench_train_cache.py                       # real X-rays, 150 per class
    python benchmarks/bench_train_cache.py --data sample_data --limit-per-class 0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL = Path(os.environ.get("FXSCORE_REAL_DATA", REPO.parent / "shared" / "data" /
                           "fracture-multi-region"))


def train_val_only(src: Path, dest: Path) -> Path:
    """DATA without test/: the benchmark times training, not the final test scoring."""
    dest.mkdir()
    for split in ("train", "val"):
        (dest / split).symlink_to((src / split).resolve(), target_is_directory=True)
    return dest


def timed_fit(cfg):
    from fxscore.train.engine import fit

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random frozen backbone's warning
        result = fit(cfg)
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="DATA with train/ and val/ [default: the real X-rays in ../shared/data]")
    ap.add_argument("--limit-per-class", type=int, default=150,
                    help="files per class and split (0: all)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--naive-epochs", type=int, default=2,
                    help="epochs the naive loop really runs (0: all of --epochs)")
    ap.add_argument("--cache-views", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from fxscore.train.config import TrainConfig
    from fxscore.model import available_cpus

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = args.data
        if src is None:
            subprocess.run([sys.executable, str(REAL / "materialize"), str(tmp / "real")],
                           check=True, capture_output=True)
            src = tmp / "real"
        data = train_val_only(src, tmp / "data")

        def config(name: str, epochs: int, views: int) -> TrainConfig:
            return TrainConfig(data=str(data), out=str(tmp / name), pretrained="none",
                               freeze="backbone", epochs=epochs, batch_size=args.batch_size,
                               patience=0, image_size=args.image_size, cache_views=views,
                               limit_per_class=args.limit_per_class or None,
                               threads=args.threads)

        naive_epochs = args.naive_epochs or args.epochs
        naive_wall, naive = timed_fit(config("naive", naive_epochs, 0))
        cached_wall, cached = timed_fit(config("cached", args.epochs, args.cache_views))
        files = json.loads((cached.out / "config.json").read_text())["files"]

    naive_epoch = sum(h["seconds"] for h in naive.history) / len(naive.history)
    naive_setup = naive_wall - sum(h["seconds"] for h in naive.history)
    cached_epoch = sum(h["seconds"] for h in cached.history) / len(cached.history)
    cached_setup = cached_wall - sum(h["seconds"] for h in cached.history)
    extrapolated = naive_epochs < args.epochs
    naive_total = naive_setup + args.epochs * naive_epoch
    print(f"data: {src}: {files['train']} train + {files['val']} val files (limit "
          f"{args.limit_per_class or 'none'} per class), {len(cached.unreadable)} unreadable")
    print(f"image size {args.image_size}, batch {args.batch_size}, {args.epochs} epochs, "
          f"{args.threads or available_cpus()} threads, {os.cpu_count()} CPUs visible")
    print(f"naive frozen loop : setup {naive_setup:7.1f} s, epoch {naive_epoch:8.2f} s "
          f"(mean of {len(naive.history)} measured)")
    label = (f"EXTRAPOLATED from {naive_epochs} measured epochs: setup + {args.epochs} x epoch"
             if extrapolated else "measured")
    print(f"naive {args.epochs}-epoch run: {naive_total:8.1f} s  ({label})")
    print(f"cached loop       : setup {cached_setup:7.1f} s (decode + {args.cache_views}-view "
          f"feature cache), epoch {cached_epoch:8.4f} s (mean of {len(cached.history)})")
    print(f"cached {args.epochs}-epoch run: {cached_wall:8.1f} s  (measured, cache included)")
    print(f"per-epoch speedup once cached: {naive_epoch / cached_epoch:8.0f}x   (goal >= 50x)")
    print(f"whole-run speedup            : {naive_total / cached_wall:8.1f}x   (goal >= 5x"
          f"{'; naive side extrapolated' if extrapolated else ''})")


if __name__ == "__main__":
    main()
