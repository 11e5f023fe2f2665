"""Scoring a stream of files: decode in a small thread pool while onnxruntime runs the model.

Decoding and resizing (Pillow, numpy) release the GIL for their heavy parts, so threads overlap
them with inference without the pickling cost of processes. At most `prefetch` batches are
decoded ahead of the one the model is running, so memory stays flat however many files stream
in, and rows come out in input order.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .contract import Preprocess
from .images import ImageReadError, read_image
from .model import Model, available_cpus
from .preprocess import preprocess

Row = dict[str, Any]  # path, probability (float | None), label, threshold, model_id, error


def score_items(model: Model, items: Iterable[tuple[str, Path]], *, batch_size: int = 32,
                workers: int | None = None, prefetch: int = 2) -> Iterator[Row]:
    """(name, path) pairs -> one row per pair, in order. Unreadable files become error rows."""
    return chain.from_iterable(score_batches(model, items, batch_size=batch_size,
                                             workers=workers, prefetch=prefetch))


def score_batches(model: Model, items: Iterable[tuple[str, Path]], *, batch_size: int = 32,
                  workers: int | None = None, prefetch: int = 2) -> Iterator[list[Row]]:
    """Like `score_items`, one list of rows per model batch, so a writer can flush per batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = iter(items)
    capacity = batch_size * (prefetch + 1)
    pending: deque[tuple[str, Future]] = deque()
    params = model.meta.preprocess
    with ThreadPoolExecutor(workers or available_cpus(), thread_name_prefix="fxscore-decode") as pool:
        def fill() -> None:
            while len(pending) < capacity:
                item = next(items, None)
                if item is None:
                    return
                name, path = item
                pending.append((name, pool.submit(_load, path, params)))

        try:
            fill()
            while pending:
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                fill()  # keep the decoders busy while this batch waits and runs
                yield _score(model, [(name, fut.result()) for name, fut in batch])
        finally:
            for _, fut in pending:  # an abandoned or failed run should not decode on
                fut.cancel()


def _load(path: Path, params: Preprocess) -> np.ndarray | str:
    """Decode + preprocess one file in a worker; a failure comes back as its message."""
    try:
        return preprocess(read_image(path), params)
    except ImageReadError as e:
        message = str(e)
    except Exception as e:  # noqa: BLE001 - one bad file must not end a night's batch job
        message = f"{path}: {type(e).__name__}: {e}"
    return " ".join(message.split())  # one line: it goes into a CSV cell and log lines


def _score(model: Model, loaded: list[tuple[str, np.ndarray | str]]) -> list[Row]:
    good = [x for _, x in loaded if not isinstance(x, str)]
    probs = iter(model.predict(np.stack(good)) if good else ())
    threshold = model.meta.threshold
    rows = []
    for name, x in loaded:
        row: Row = {"path": name, "probability": None, "label": "", "threshold": threshold,
                    "model_id": model.model_id, "error": ""}
        if isinstance(x, str):
            row["error"] = x
        else:
            p = float(next(probs))
            row["probability"], row["label"] = p, model.label(p)
        rows.append(row)
    return rows
