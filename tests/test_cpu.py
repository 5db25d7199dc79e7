"""CPU threads: the CPUs a process may use (affinity mask, cgroup v1/v2 quota) and torch's threads."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from components import cpu
from components.config import TrainConfig
from components.errors import ConfigError
from conftest import config

REPO = Path(__file__).resolve().parent.parent


def cgroup(tmp_path, membership: str, files: dict):
    """A fake /sys/fs/cgroup tree and /proc/self/cgroup: files maps relative paths to contents."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(membership)
    return root, proc


@pytest.mark.parametrize("cpu_max, expected", [("max 100000\n", 8), ("300000 100000\n", 3),
                                               ("150000 100000\n", 1),  # a fractional quota rounds down
                                               ("50000 100000\n", 1),  # never below one thread
                                               ("2000000 100000\n", 8)])  # a quota above the mask: the mask
def test_cgroup_v2_quota_caps_the_affinity_mask(tmp_path, cpu_max, expected):
    root, proc = cgroup(tmp_path, "0::/job\n", {"job/cpu.max": cpu_max})
    assert cpu.usable_cpus(root, proc, affinity=8) == expected


def test_the_tightest_quota_above_the_process_counts(tmp_path):
    root, proc = cgroup(tmp_path, "0::/kubepods/pod1/ctr\n",
                        {"kubepods/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "200000 100000",
                         "kubepods/pod1/ctr/cpu.max": "max 100000"})
    assert cpu.usable_cpus(root, proc, affinity=16) == 2
    # inside a container its own cgroup is the mount's root, and the host's path is not there
    root, proc = cgroup(tmp_path / "ns", "0::/kubepods/pod1/ctr\n", {"cpu.max": "400000 100000"})
    assert cpu.usable_cpus(root, proc, affinity=16) == 4


def test_cgroup_v1_cfs_quota(tmp_path):
    membership = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    root, proc = cgroup(tmp_path, membership, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
                                               "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cpu.usable_cpus(root, proc, affinity=8) == 2
    root, proc = cgroup(tmp_path / "unlimited", "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n",
                                                              "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpu.usable_cpus(root, proc, affinity=8) == 8


def test_no_cgroup_files_leaves_the_affinity_mask(tmp_path):
    assert cpu.usable_cpus(tmp_path / "none", tmp_path / "no_proc_file", affinity=3) == 3
    root, proc = cgroup(tmp_path, "0::/job\n", {"job/cpu.max": "garbage"})
    assert cpu.usable_cpus(root, proc, affinity=3) == 3


def test_a_real_affinity_mask_sets_torch_threads_in_a_fresh_process():
    """Pinned to one CPU with sched_setaffinity, the process sees one usable CPU and torch gets one
    thread, whatever os.cpu_count() says; train.cpu_threads overrides it."""
    script = textwrap.dedent("""
        import os, torch
        from components import cpu
        from components.config import TrainConfig
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        print(cpu.usable_cpus(), cpu.configure_threads(TrainConfig()), torch.get_num_threads())
        print(cpu.configure_threads(TrainConfig(cpu_threads=3)), torch.get_num_threads())
    """)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "1 1 1" and out[1] == "3 3"


def test_omp_num_threads_lowers_but_cpu_threads_overrides(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cpu.configure_threads(TrainConfig()) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "8")  # asks for more than may run: the usable CPUs
        assert cpu.configure_threads(TrainConfig()) == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
        assert cpu.configure_threads(TrainConfig()) == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cpu.configure_threads(TrainConfig(cpu_threads=3)) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_must_be_positive():
    assert config(train={"cpu_threads": 2}).train.cpu_threads == 2
    with pytest.raises(ConfigError, match=r"^train.cpu_threads: must be > 0 or null; got 0$"):
        config(train={"cpu_threads": 0})


# --- memory: the cgroup's limit, not the machine's RAM ----------------------------------------

GiB = 2 ** 30


def test_cgroup_v2_memory_max_the_tightest_of_the_process_and_its_parents(tmp_path):
    root, proc = cgroup(tmp_path, "0::/kubepods/pod1/ctr\n",
                        {"kubepods/memory.max": str(64 * GiB), "kubepods/pod1/memory.max": str(6 * GiB) + "\n",
                         "kubepods/pod1/ctr/memory.max": "max\n"})
    assert cpu.memory_limit_bytes(root, proc) == 6 * GiB
    # inside a container: its own cgroup is the mount's root
    root, proc = cgroup(tmp_path / "ns", "0::/kubepods/pod1/ctr\n", {"memory.max": "2147483648"})
    assert cpu.memory_limit_bytes(root, proc) == 2 * GiB
    root, proc = cgroup(tmp_path / "none", "0::/job\n", {"job/memory.max": "max"})
    assert cpu.memory_limit_bytes(root, proc) is None


def test_cgroup_v1_memory_limit_in_bytes_and_its_no_limit_value(tmp_path):
    membership = "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    root, proc = cgroup(tmp_path, membership, {"memory/docker/abc/memory.limit_in_bytes": str(3 * GiB),
                                               "memory/docker/memory.limit_in_bytes": str(8 * GiB)})
    assert cpu.memory_limit_bytes(root, proc) == 3 * GiB
    root, proc = cgroup(tmp_path / "unlimited", "5:memory:/\n",
                        {"memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert cpu.memory_limit_bytes(root, proc) is None
    assert cpu.memory_limit_bytes(tmp_path / "no-cgroup", tmp_path / "no_proc_file") is None


@pytest.mark.parametrize("limit, expected_total, said", [
    (2 * GiB, 2 * GiB, "a quarter of the cgroup's memory limit (2.0 GiB; the machine has "),
    (None, None, "a quarter of RAM ("),
    (2 ** 50, None, "a quarter of RAM ("),  # a limit above the machine's RAM: the RAM
])
def test_the_probe_budget_on_cpu_is_a_quarter_of_the_pod_limit_not_of_the_node(tmp_path, monkeypatch, limit,
                                                                               expected_total, said):
    from components import probe

    files = {"pod/memory.max": str(limit) if limit else "max"}
    root, proc = cgroup(tmp_path, "0::/pod\n", files)
    real = cpu.memory_limit_bytes
    monkeypatch.setattr(cpu, "memory_limit_bytes", lambda: real(root, proc))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget, why = probe.memory_budget(config(), torch.device("cpu"))
    assert budget == (expected_total or ram) // 4
    assert why.startswith(f"CPU: {said}")
    # probe.memory_budget_gb, when set, is the budget whatever the cgroup says
    assert probe.memory_budget(config(probe={"memory_budget_gb": 0.5}), torch.device("cpu"))[0] == GiB // 2
