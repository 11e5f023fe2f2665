"""What this process may really use: CPUs and memory, as the kernel limits them.

os.cpu_count() and the machine's RAM describe the host. A container limited to 2 CPUs and 4 GB
on a 64-core, 512 GB node sees the host's numbers, and a job that sizes itself by them runs 64
threads on 2 CPUs or is killed by the kernel's OOM killer. Training, audit, scoring threads and
the scorer's memory budget all size themselves with these functions.
"""
from __future__ import annotations

import math
import os
import resource
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    os.cpu_count() reports the host's cores; in a container limited to 2 CPUs on a 64-core node,
    64 onnxruntime threads would fight over 2 CPUs and run several times slower.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup; None if unlimited or unknown.

    cgroup v2: `cpu.max` of this process's cgroup and of every ancestor (a container sees its
    own cgroup at the root; a batch job on a host sits deeper). cgroup v1: the cfs files.
    """
    quotas = []
    for folder in _own_and_ancestors(root, self_cgroup):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            quotas.append(quota / period)
    except (OSError, ValueError):
        pass
    return min(quotas, default=None)


def available_memory(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int | None:
    """Bytes this process may use: the tightest of the machine's RAM, its cgroup's memory limit
    and its address-space limit (`ulimit -v`); None if none of them can be read.

    cgroup v2: `memory.max` and `memory.high` (above `high` the kernel throttles and reclaims
    hard) of this process's cgroup and every ancestor. cgroup v1: `memory.limit_in_bytes` (an
    unlimited v1 cgroup reports a huge number, which the RAM bound then replaces). This is a
    ceiling, not what is free right now: other processes in the same cgroup share it.
    """
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX, or the value is unknown
        pass
    for folder in _own_and_ancestors(root, self_cgroup):
        for name in ("memory.max", "memory.high"):
            limits.extend(_limit(folder / name))
    for folder in {root / "memory", root / "memory" / _v1_path(self_cgroup, "memory").lstrip("/")}:
        limits.extend(_limit(folder / "memory.limit_in_bytes"))
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    except (AttributeError, ValueError, OSError):
        pass
    limits = [v for v in limits if v > 0]
    return min(limits, default=None)


def _limit(path: Path) -> list[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return []
    if text == "max":
        return []
    try:
        return [int(text)]
    except ValueError:
        return []


def _own_and_ancestors(root: Path, self_cgroup: Path) -> list[Path]:
    """This process's cgroup v2 folder and each parent up to the cgroup root."""
    try:
        rel = next((line.split("::", 1)[1].strip() for line in self_cgroup.read_text().splitlines()
                    if line.startswith("0::")), "/")
    except OSError:
        rel = "/"
    folder = root / rel.lstrip("/")
    out = []
    for f in [folder, *folder.parents]:
        out.append(f)
        if f == root:
            break
    return out


def _v1_path(self_cgroup: Path, controller: str) -> str:
    """The cgroup v1 path of `controller` ('4:memory:/slurm/job1' -> '/slurm/job1')."""
    try:
        for line in self_cgroup.read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and controller in parts[1].split(","):
                return parts[2].strip()
    except OSError:
        pass
    return "/"
