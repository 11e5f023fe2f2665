"""fxscore.progress: a tqdm bar on a terminal, plain timed lines in a log, nothing with --quiet."""
from __future__ import annotations

import io

import pytest

from fxscore import progress as P


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_done_total_rate_and_eta():
    log = io.StringIO()
    with P.progress_bar("scoring", 4, file=log, interval=0) as bar:
        bar.update(1)
        bar.set_note("1 failed")
        bar.update(3)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("scoring: 1/4 files (25%), ") and "ETA" in lines[0]
    assert "files/s" in lines[0] and "elapsed 00:00" in lines[0]
    assert lines[-1].startswith("scoring: 4/4 files (100%)") and lines[-1].endswith("; 1 failed")
    assert "ETA" not in lines[-1]
    assert len(lines) == 2  # the closing line is not the last update written twice


def test_a_log_gets_at_most_one_line_per_interval_and_always_a_last_one():
    log = io.StringIO()
    with P.progress_bar("eval", 1000, file=log, interval=3600) as bar:
        for _ in range(1000):
            bar.update()
    assert log.getvalue().splitlines() == [
        line for line in log.getvalue().splitlines() if line.startswith("eval: 1000/1000 files")]
    assert len(log.getvalue().splitlines()) == 1


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(P.INTERVAL_ENV, "0")
    log = io.StringIO()
    with P.progress_bar("x", 3, file=log) as bar:
        bar.update()
        bar.update()
    assert len(log.getvalue().splitlines()) == 2
    for bad, want in (("soon", P.DEFAULT_INTERVAL), ("-1", P.DEFAULT_INTERVAL), ("5", 5.0)):
        monkeypatch.setenv(P.INTERVAL_ENV, bad)
        assert P.plain_interval() == want


def test_a_terminal_gets_a_tqdm_bar():
    tty = Terminal()
    with P.progress_bar("scoring", 10, file=tty) as bar:
        bar.update(10)
    out = tty.getvalue()
    assert "\r" in out and "scoring: 100%" in out and "10/10" in out and "file/s" in out


def test_write_keeps_messages_apart_from_the_bar():
    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        with P.progress_bar("scoring", 2, file=stream, interval=3600) as bar:
            bar.update()
            bar.write("warning: cannot list x")
    assert "warning: cannot list x\n" in tty.getvalue()
    assert log.getvalue().splitlines()[0] == "warning: cannot list x"


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()])
def test_disabled_writes_nothing(stream):
    with P.progress_bar("scoring", 2, file=stream, enabled=False, interval=0) as bar:
        bar.update(2)
    with P.stage_progress(file=stream, enabled=False, interval=0) as progress:
        progress("hash", 1, 2)
    assert stream.getvalue() == ""


def test_unknown_total_then_set():
    log = io.StringIO()
    bar = P.progress_bar("listing", None, file=log, interval=0)
    bar.update(5)
    bar.total = 10
    bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("listing: 5 files, ")
    assert lines[1].startswith("listing: 6/10 files (60%)")


def test_stages_each_get_their_own_bar():
    log = io.StringIO()
    with P.stage_progress(file=log, interval=3600, units={"verify": "pair"}) as progress:
        progress("hash", 1, 3)
        progress("hash", 3, 3)  # done: closed with its last line
        progress("read", 1, 2)  # left unfinished: closed by the with block
        progress("verify", 4, 8)
    lines = log.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["hash", "read", "verify"]
    assert lines[0].startswith("hash: 3/3 files (100%)")
    assert lines[1].startswith("read: 1/2 files (50%)")
    assert lines[2].startswith("verify: 4/8 pairs (50%)")


def test_stage_labels_have_a_prefix_and_units_match_stage_families():
    log = io.StringIO()
    with P.stage_progress(file=log, interval=3600, prefix="train",
                          units={"epoch": "image"}) as progress:
        progress("epoch 1/2", 4, 8)
        progress("decode val", 2, 2)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("train epoch 1/2: 4/8 images (50%)")
    assert lines[1].startswith("train decode val: 2/2 files (100%)")


@pytest.mark.parametrize("done, total, elapsed, want", [
    (1, 1, 2.0, "x: 1/1 file (100%), 0.5 files/s, elapsed 00:02"),
    (0, 10, 0.0, "x: 0/10 files (0%), elapsed 00:00"),
    (30, 90, 60.0, "x: 30/90 files (33%), 0.5 files/s, elapsed 01:00, ETA 02:00"),
    (7, None, 1.0, "x: 7 files, 7.0 files/s, elapsed 00:01"),
])
def test_format_line(done, total, elapsed, want):
    assert P.format_line("x", done, total, elapsed) == want


@pytest.mark.parametrize("seconds", [0, 0.9, 59, 61, 3599.5, 3600, 86399, 90061])
def test_format_interval_reads_as_the_bar_does(seconds):
    from tqdm import tqdm

    assert P.format_interval(seconds) == tqdm.format_interval(seconds)


def test_a_log_or_quiet_run_does_not_import_tqdm():
    # tqdm's import costs ~30 ms of every start (importlib.metadata); only a terminal's bar
    # needs it. A child interpreter, since this one has imported tqdm for the tests above.
    import subprocess
    import sys

    code = ("import io, sys; from fxscore import progress as P\n"
            "with P.progress_bar('x', 2, file=io.StringIO(), interval=0) as bar: bar.update(2)\n"
            "with P.progress_bar('x', 2, enabled=False) as bar: bar.update(2)\n"
            "print('tqdm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
