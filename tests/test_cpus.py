"""Counting physical cores for the default thread count, on canned /proc/cpuinfo and sysfs text."""

from __future__ import annotations

import os

import pytest

from chatglm_core.models import cpus, loader


def cpuinfo(*entries: tuple[int, int | None, int | None]) -> str:
    """/proc/cpuinfo text: one (processor, physical id, core id) block each, None leaving the field out."""
    blocks = []
    for processor, package, core in entries:
        lines = [f"processor\t: {processor}", "vendor_id\t: GenuineIntel", "model name\t: Test CPU"]
        if package is not None:
            lines.append(f"physical id\t: {package}")
        lines.append("siblings\t: 4")
        if core is not None:
            lines.append(f"core id\t\t: {core}")
        lines += ["cpu cores\t: 2", "flags\t\t: fpu sse2 avx2"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\n"


# two packages of two cores with two hyper-threads each: CPUs 0-3 are one of each core, 4-7 the siblings
HYPERTHREADED = cpuinfo(*[(cpu, (cpu // 2) % 2, cpu % 2) for cpu in range(8)])


@pytest.mark.parametrize(("text", "allowed", "cores"), [
    (HYPERTHREADED, set(range(8)), 4),             # 8 CPUs, 4 physical cores
    (HYPERTHREADED, {0, 4}, 1),                    # both threads of one core (taskset -c 0,4)
    (HYPERTHREADED, {0, 1}, 2),                    # one thread of two cores
    (HYPERTHREADED, {0, 2}, 2),                    # the same core id on two packages is two cores
    (cpuinfo((0, 0, 0), (1, 0, 1)), {0, 1}, 2),    # this machine: a VM with one thread per core
    (cpuinfo((0, None, 0), (1, None, 1)), {0, 1}, 2),  # no physical id: one package
])
def test_cores_are_distinct_package_and_core_pairs_among_allowed_cpus(text, allowed, cores):
    assert cpus.cores_from_cpuinfo(text, allowed) == cores


def test_cpuinfo_without_core_ids_or_missing_cpus_gives_no_answer():
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n\n"
    assert cpus.cores_from_cpuinfo(arm, {0, 1}) is None
    assert cpus.cores_from_cpuinfo(cpuinfo((0, 0, 0)), {0, 1}) is None  # CPU 1 not described
    assert cpus.cores_from_cpuinfo("", {0}) is None


def test_sysfs_siblings_and_cgroup_quota():
    siblings = {0: "0,4\n", 1: "1,5\n", 4: "0,4\n", 5: "1,5\n"}
    assert cpus.cores_from_siblings(siblings, {0, 1, 4, 5}) == 2
    assert cpus.cores_from_siblings(siblings, {0, 4}) == 1
    assert cpus.cores_from_siblings(siblings, {0, 2}) is None  # CPU 2's list is missing
    assert cpus.cgroup_cpu_limit("max 100000\n") is None
    assert cpus.cgroup_cpu_limit("200000 100000\n") == 2
    assert cpus.cgroup_cpu_limit("150000 100000") == 2  # 1.5 CPUs: rounded up
    assert cpus.cgroup_cpu_limit("50000 100000") == 1
    assert cpus.cgroup_cpu_limit("garbage") is None


def test_physical_cores_reads_each_source_in_turn(tmp_path, monkeypatch):
    monkeypatch.setattr(cpus, "available_cpus", lambda: set(range(8)))
    monkeypatch.setattr(cpus, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(cpus, "SYSFS_CPU", tmp_path / "cpu")
    monkeypatch.setattr(cpus, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert cpus.physical_cores() == 4  # nothing readable: llama.cpp's guess, half of more than 4 CPUs
    for cpu in range(8):
        topology = tmp_path / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    assert cpus.physical_cores() == 4  # sysfs
    (tmp_path / "cpuinfo").write_text(cpuinfo(*[(cpu, 0, cpu) for cpu in range(8)]))
    assert cpus.physical_cores() == 8  # /proc/cpuinfo first
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    assert cpus.physical_cores() == 3  # within a 3-CPU quota


def test_this_machine_counts_within_its_affinity():
    n = cpus.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    assert loader.cpu_count() == len(os.sched_getaffinity(0))
