"""fxscore.cpus: the CPUs and memory this process may use, as affinity, cgroups and rlimits say."""
from __future__ import annotations

import os
import resource

import pytest

from fxscore import cpus
from fxscore.cpus import available_cpus, available_memory, cgroup_cpu_quota

GiB = 1 << 30


def test_available_cpus_honours_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: None)
    assert available_cpus() == 6
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 2.5)
    assert available_cpus() == 3  # a 2.5-CPU quota can keep 3 threads partly busy
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 0.2)
    assert available_cpus() == 1


def _tree(tmp_path, files: dict[str, str], self_line: str = "0::/job/step\n"):
    root = tmp_path / "cgroup"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "self").write_text(self_line)
    return root, tmp_path / "self"


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    # a batch job deep in the host's hierarchy: its own and its parents' limits count
    ({"cpu.max": "max 100000\n", "job/cpu.max": "400000 100000\n",
      "job/step/cpu.max": "max 100000\n"}, 4.0),
    ({"job/cpu.max": "800000 100000\n", "job/step/cpu.max": "200000 100000\n"}, 2.0),
    ({"other/cpu.max": "100000 100000\n"}, None),  # a sibling's limit is not ours
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(tmp_path, files, expected):
    assert cgroup_cpu_quota(*_tree(tmp_path, files)) == expected


@pytest.fixture
def host(monkeypatch):
    """A 64 GiB host without an address-space limit."""
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096,
                                                     "SC_PHYS_PAGES": 64 * GiB // 4096}[name])
    monkeypatch.setattr(resource, "getrlimit",
                        lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


@pytest.mark.parametrize("files, self_line, expected", [
    ({}, "0::/job/step\n", 64 * GiB),  # no cgroup limit: the machine's RAM
    ({"memory.max": "max\n", "job/step/memory.max": f"{4 * GiB}\n"}, "0::/job/step\n", 4 * GiB),
    # a parent's limit binds its children; memory.high throttles, so it counts too
    ({"job/memory.max": f"{8 * GiB}\n", "job/step/memory.max": "max\n"}, "0::/job/step\n",
     8 * GiB),
    ({"job/step/memory.high": f"{3 * GiB}\n", "job/step/memory.max": f"{6 * GiB}\n"},
     "0::/job/step\n", 3 * GiB),
    ({"other/memory.max": f"{1 * GiB}\n"}, "0::/job/step\n", 64 * GiB),  # a sibling's
    # cgroup v1, in a container (its cgroup at the root) and on a host (its own folder)
    ({"memory/memory.limit_in_bytes": f"{2 * GiB}\n"}, "5:memory:/\n", 2 * GiB),
    ({"memory/slurm/job1/memory.limit_in_bytes": f"{5 * GiB}\n"},
     "5:memory:/slurm/job1\n", 5 * GiB),
    # v1 "unlimited" is a huge number, not a limit
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, "5:memory:/\n", 64 * GiB),
    ({"job/step/memory.max": "garbage\n"}, "0::/job/step\n", 64 * GiB),
])
def test_available_memory_is_the_tightest_limit(tmp_path, host, files, self_line, expected):
    assert available_memory(*_tree(tmp_path, files, self_line)) == expected


def test_available_memory_honours_ulimit_v(tmp_path, host, monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (3 * GiB, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (-1, -1))
    assert available_memory(*_tree(tmp_path, {})) == 3 * GiB


def test_available_memory_unknown(tmp_path, monkeypatch):
    def unknown(name):
        raise ValueError(name)
    monkeypatch.setattr(os, "sysconf", unknown)
    monkeypatch.setattr(resource, "getrlimit",
                        lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert available_memory(*_tree(tmp_path, {})) is None


def test_available_memory_on_this_machine():
    got = available_memory()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert got is not None and 0 < got <= ram
