"""What this process may really use: the CPUs it may run on (so torch's threads fit) and its memory limit.

os.cpu_count() counts the machine's CPUs, not this process's share of them: a container limited
by a cgroup CPU quota, or a process pinned to some cores (taskset, a scheduler's affinity mask),
sees all of them. torch sizes its intra-op pool from that count, and OpenMP threads that
outnumber the CPUs wait on each other at every op (measured on a 2-core machine: a step that
takes 0.4 ms went to 130 ms while another process kept a core busy). Every step that trains or
times (probe, train, study_run) calls `configure_threads` first.

Memory is the same story: a pod's container sees the node's RAM in /proc/meminfo and sysconf, but
the kernel kills it at its cgroup's limit. `memory_limit_bytes` reads that limit (v2 memory.max,
v1 memory.limit_in_bytes, the tightest of the cgroup and those above it); the probe sizes its CPU
memory budget from it (components/probe.py: memory_budget).
"""

import math
import os
from pathlib import Path
from typing import Callable, Iterator, List, Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP,
                affinity: Optional[int] = None) -> int:
    """The CPUs this process may use: its affinity mask, capped by the tightest CPU quota of its
    cgroup and the cgroups above it (v2 cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us),
    rounded down (threads past a fractional quota get throttled), at least 1."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quotas = [q for q in _quotas(Path(cgroup_root), Path(proc_cgroup)) if q is not None]
    limit = min([affinity, *(math.floor(q) for q in quotas)])
    return max(1, limit)


def memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Optional[int]:
    """The tightest memory limit, in bytes, of this process's cgroup and the cgroups above it (v2
    memory.max, v1 memory.limit_in_bytes); None when no cgroup limits it."""
    limits = [b for b in _memory_limits(Path(cgroup_root), Path(proc_cgroup)) if b is not None]
    return min(limits) if limits else None


def configure_threads(train_cfg) -> int:
    """Sets torch's intra-op threads and returns how many: `train.cpu_threads` if set (it overrides
    everything), else the usable CPUs, or fewer if OMP_NUM_THREADS asks for fewer."""
    import torch

    threads = getattr(train_cfg, "cpu_threads", None)
    if not threads:
        threads = usable_cpus()
        omp = _positive_int(os.environ.get("OMP_NUM_THREADS"))
        if omp is not None:
            threads = min(threads, omp)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def _positive_int(value: Optional[str]) -> Optional[int]:
    try:
        n = int(str(value).split(",")[0])  # OpenMP allows a list per nesting level; the first is ours
    except ValueError:
        return None
    return n if n > 0 else None


def _quotas(root: Path, proc_cgroup: Path) -> Iterator[Optional[float]]:
    """CPU quotas (in CPUs) of this process's cgroups and their ancestors, v2 and v1."""
    return _per_cgroup(root, proc_cgroup, "cpu", ("cpu", "cpu,cpuacct", "cpuacct,cpu"),
                       lambda d: _v2_quota(d / "cpu.max"),  # v2: "quota period"
                       lambda d: _v1_quota(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"))


def _memory_limits(root: Path, proc_cgroup: Path) -> Iterator[Optional[int]]:
    """Memory limits (bytes) of this process's cgroups and their ancestors, v2 and v1."""
    return _per_cgroup(root, proc_cgroup, "memory", ("memory",), lambda d: _bytes(d / "memory.max"),
                       lambda d: _bytes(d / "memory.limit_in_bytes"))


def _per_cgroup(root: Path, proc_cgroup: Path, controller: str, v1_mounts: tuple, read_v2: Callable,
                read_v1: Callable) -> Iterator:
    """A limit read from each of this process's cgroups and their ancestors: in the v2 tree (one
    hierarchy, "0::<path>" in /proc/self/cgroup) with read_v2(directory), in the v1 hierarchy of
    `controller` (mounted under one of v1_mounts) with read_v1(directory); with no /proc, at the
    root of either layout."""
    for hierarchy, controllers, path in _memberships(proc_cgroup):
        if hierarchy == "0" and not controllers:
            for directory in _ancestors([root], path):
                yield read_v2(directory)
        elif controller in controllers.split(","):
            for directory in _ancestors([root / name for name in v1_mounts], path):
                yield read_v1(directory)
    if not proc_cgroup.exists():
        yield read_v2(root)
        yield read_v1(root / v1_mounts[0])


# v1 writes "no limit" as the largest page-aligned counter (9223372036854771712 on 4 KiB pages)
_V1_UNLIMITED = 2 ** 62


def _bytes(limit_file: Path) -> Optional[int]:
    try:
        text = limit_file.read_text().strip()
    except OSError:
        return None
    try:
        value = int(text)  # v2 says "max" for no limit
    except ValueError:
        return None
    return value if 0 < value < _V1_UNLIMITED else None


def _memberships(proc_cgroup: Path) -> List[tuple]:
    """(hierarchy id, controllers, path) per line of /proc/self/cgroup, e.g. ("0", "", "/user.slice")."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    return [tuple(line.split(":", 2)) for line in lines if line.count(":") >= 2]


def _ancestors(mounts: List[Path], path: str) -> Iterator[Path]:
    """The process's cgroup directory and each one above it, under the first mount that exists.
    Inside a container the path may be the host's, absent from the container's view: then only
    the mount's root (the container's own cgroup) is there to read."""
    for mount in mounts:
        if mount.is_dir():
            parts = [p for p in path.strip("/").split("/") if p]
            for depth in range(len(parts), -1, -1):
                directory = mount.joinpath(*parts[:depth])
                if directory.is_dir():
                    yield directory
            return


def _v2_quota(cpu_max: Path) -> Optional[float]:
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def _v1_quota(quota_file: Path, period_file: Path) -> Optional[float]:
    try:
        quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> Optional[float]:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # v1 writes -1 for no limit
