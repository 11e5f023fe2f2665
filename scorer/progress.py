"""Progress on stderr that reads well on a terminal and in a batch system's log file.

    from fxscore.progress import progress_bar, stage_progress

    with progress_bar("scoring", total=len(todo), unit="file", enabled=not quiet) as bar:
        for rows in batches:
            bar.update(len(rows))
            bar.set_note(f"{failed} failed")          # shown after the counts
            bar.write("warning: ...")                 # a message that does not break the bar

    # the library's (stage, done, total) callbacks (audit, split, train): one bar per stage
    with stage_progress(enabled=not quiet) as progress:
        run_audit(data, progress=progress)

On a terminal, a tqdm bar: done/total, percentage, elapsed, ETA and rate. When stderr is not a
terminal (Slurm or cron logs, a pipe), no carriage returns: one plain line at most every
`interval` seconds, and a last line when the bar closes, e.g.

    scoring: 1200/5000 files (24%), 41.2 files/s, elapsed 0:29, ETA 1:32
    scoring: 5000/5000 files (100%), 40.8 files/s, elapsed 2:03

The interval defaults to 30 s; $FXSCORE_PROGRESS_INTERVAL (seconds) overrides it. With
enabled=False (--quiet) nothing is written. Library modules never import this: only the CLI
draws progress, the libraries report through callbacks.
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Callable

INTERVAL_ENV = "FXSCORE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0  # seconds between plain lines in a log: readable, not flooding
TERMINAL_REFRESH = 0.2  # seconds between bar redraws on a terminal


def plain_interval() -> float:
    """Seconds between plain progress lines: $FXSCORE_PROGRESS_INTERVAL, else 30."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def format_interval(seconds: float) -> str:
    """Elapsed time as tqdm shows it ('01:32', '1:02:03'): plain lines read like the bar.

    Written here, not taken from tqdm, because importing tqdm costs about 30 ms of start-up
    (its package imports importlib.metadata), which a batch job that never draws a bar should
    not pay: tqdm is imported only for a terminal's bar.
    """
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _plural(n: int | float, unit: str) -> str:
    return unit if n == 1 else f"{unit}s"


def format_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "file",
                note: str = "", final: bool = False) -> str:
    """One plain progress line (what a log file gets), e.g.

    'scoring: 1200/5000 files (24%), 41.2 files/s, elapsed 00:29, ETA 01:32; 3 failed'
    """
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        counts = f"{done}/{total} {_plural(total, unit)} ({100 * done / total:.0f}%)"
    else:
        counts = f"{done} {_plural(done, unit)}"
    parts = [counts]
    if done and elapsed > 0:
        parts.append(f"{rate:.1f} {unit}s/s")
    parts.append(f"elapsed {format_interval(elapsed)}")
    if total and done and rate > 0 and done < total and not final:
        parts.append(f"ETA {format_interval((total - done) / rate)}")
    return f"{desc}: " + ", ".join(parts) + (f"; {note}" if note else "")


class Progress:
    """One progress display: a tqdm bar on a terminal, plain lines otherwise, or nothing.

    Use `progress_bar(...)` to make one. `update(n)` adds n done items; `total` may be set
    later (e.g. once the files are counted); `close()` (or leaving the `with` block) writes the
    last line.
    """

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "file",
                 enabled: bool = True, file: IO[str] | None = None,
                 interval: float | None = None, terminal: bool | None = None,
                 transient: bool = False) -> None:
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.file = file if file is not None else sys.stderr
        self.interval = plain_interval() if interval is None else interval
        if terminal is None:
            isatty = getattr(self.file, "isatty", None)
            terminal = bool(isatty and isatty())
        self.terminal = terminal
        self.n, self._total, self.note = 0, total, ""
        self.start = self._last = time.monotonic()
        self.closed = False
        self._emitted: int | None = None  # the count of the last plain line written
        self._bar = None
        if enabled and terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file,
                             mininterval=TERMINAL_REFRESH, dynamic_ncols=True,
                             leave=not transient)

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, n: int = 1) -> None:
        """n more items done."""
        self.n += n
        if not self.enabled or self.closed:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit(final=False)

    def set_note(self, text: str) -> None:
        """A short status shown after the counts (e.g. '3 failed'); '' removes it."""
        self.note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, message: str) -> None:
        """Print a message line on the same stream without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def _emit(self, final: bool) -> None:
        self._emitted = self.n
        print(format_line(self.desc, self.n, self._total, self.elapsed, self.unit, self.note,
                          final), file=self.file, flush=True)

    def close(self) -> None:
        """Finish: the bar stays on screen; in a log, one last plain line."""
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._emitted != self.n or self.n == 0:  # not the line just written again
            self._emit(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(desc: str, total: int | None = None, *, unit: str = "file",
                 enabled: bool = True, file: IO[str] | None = None,
                 interval: float | None = None, transient: bool = False) -> Progress:
    """A progress display for `total` items (None: unknown yet) on `file` (default stderr).

    A tqdm bar when `file` is a terminal (transient: erased when it closes), plain lines every
    `interval` seconds (default `plain_interval()`) and at close otherwise; nothing when
    enabled is False.
    """
    return Progress(desc, total, unit=unit, enabled=enabled, file=file, interval=interval,
                    transient=transient)


class StageProgress:
    """A (stage, done, total) callback, as fxscore's libraries report, drawing one bar per stage.

    A new stage name closes the previous stage's bar; reaching done >= total closes it too.
    Use `stage_progress(...)` to make one, and close it (or use `with`) so a stage that ended
    early still gets its last line.
    """

    def __init__(self, *, enabled: bool = True, file: IO[str] | None = None,
                 interval: float | None = None, unit: str = "file",
                 units: dict[str, str] | None = None, prefix: str = "",
                 transient: bool = False) -> None:
        self.enabled, self.file, self.interval, self.transient = enabled, file, interval, transient
        self.unit, self.units, self.prefix = unit, dict(units or {}), prefix
        self.stage: str | None = None
        self.bar: Progress | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            desc = f"{self.prefix} {stage}" if self.prefix else stage
            unit = self.units.get(stage, self.unit)
            for key, value in self.units.items():  # "epoch" matches "epoch 3/30"
                if stage.startswith(key + " "):
                    unit = value
            self.bar = progress_bar(desc, total, unit=unit, file=self.file,
                                    interval=self.interval, transient=self.transient)
        bar = self.bar
        if bar.total != total:
            bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage_progress(*, enabled: bool = True, file: IO[str] | None = None,
                   interval: float | None = None, unit: str = "file",
                   units: dict[str, str] | None = None, prefix: str = "",
                   transient: bool = False) -> StageProgress:
    """A callable progress(stage, done, total) for audit, split and train; see StageProgress.

    `units` names the unit per stage (e.g. {"verify": "pair"}; a key also matches stages that
    start with it and a space, so "epoch" matches "epoch 3/30"); other stages use `unit`.
    `prefix` starts every bar's label, e.g. "audit" -> "audit hash: 120/5000 files".
    transient: terminal bars vanish when their stage ends (train's epochs log a line anyway).
    """
    return StageProgress(enabled=enabled, file=file, interval=interval, unit=unit, units=units,
                         prefix=prefix, transient=transient)


ProgressCallback = Callable[[str, int, int], None]
