"""fxscore.proctree: stat fields and process trees from /proc, on real processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fxscore import proctree

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")


def test_stat_reads_this_process_even_with_an_odd_command_name(tmp_path):
    fields = proctree.stat(os.getpid())
    assert int(fields[proctree.PPID]) == os.getppid() and fields[proctree.STATE] in "RS"
    # a command name with spaces and ')' must not shift the fields
    odd = tmp_path / "a b) c"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(30)"])
    try:
        assert int(proctree.stat(child.pid)[proctree.PPID]) == os.getpid()
    finally:
        child.kill()
        child.wait()
    assert proctree.stat(child.pid) is None  # gone (reaped)


def test_descendants_finds_grandchildren_and_nothing_else():
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
              "print(p.pid, flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert set(proctree.descendants(child.pid)) == {grandchild}
        mine = proctree.descendants(os.getpid())
        assert child.pid in mine and grandchild in mine
        stats = proctree.all_stats()
        assert proctree.descendants(child.pid, stats) == [grandchild]
        assert proctree.descendants(grandchild, stats) == []
    finally:
        child.kill()
        child.wait()
        os.kill(grandchild, 9)  # orphaned by the kill above: init reaps it
