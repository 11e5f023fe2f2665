"""Processes as Linux's /proc shows them: one process's stat fields, and a process's tree.

For the tests and benchmarks that watch the worker processes fxscore starts (Ray's actors and
raylets, the decode workers of `fxscore.isolate`): who is still running, and what CPU time the
whole tree used. Nothing on the scoring path imports it.
"""
from __future__ import annotations

import os

# Indexes into `stat`'s list (proc(5), counted after the "(comm)" field).
STATE, PPID, SESSION, UTIME, STIME, CUTIME, CSTIME, START = 0, 1, 3, 11, 12, 13, 14, 19
TICKS = os.sysconf("SC_CLK_TCK")  # the unit of the CPU times and the start time


def stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses), or None
    when the process is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def all_stats() -> dict[int, list[str]]:
    """pid -> `stat` for every process now running; empty without /proc."""
    try:
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    return {pid: fields for pid in pids if (fields := stat(pid)) is not None}


def descendants(pid: int, stats: dict[int, list[str]] | None = None) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from `stats` [default: now]."""
    children: dict[int, list[int]] = {}
    for child, fields in (all_stats() if stats is None else stats).items():
        children.setdefault(int(fields[PPID]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
