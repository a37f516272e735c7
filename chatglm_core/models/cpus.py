"""How many CPUs and physical cores this process may use: the default thread count for a model step.

llama.cpp's own default is the number of physical cores (`cpu_get_num_math`): on a machine with
hyper-threading two threads of one core share its arithmetic units, so a second thread per core
gains little and makes the threads of a step wait for each other. We count the same thing, but
only over the CPUs this process may run on (`os.sched_getaffinity`: a container or `taskset` may
give it fewer than the machine has) and within a cgroup CPU quota (`docker --cpus=2` on a 64-core
host leaves the affinity at 64 CPUs, and 32 threads would be throttled most of each period).

Hand-written rather than a library: `psutil.cpu_count(logical=False)` counts the whole machine's
cores, ignoring affinity and quotas, and it would be a new dependency for forty lines. Each
source is parsed by a pure function over its text, so tests run on canned /proc/cpuinfo files.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus() -> set[int]:
    """Ids of the CPUs this process may run on (all of them where affinity is unknown)."""
    try:
        return set(os.sched_getaffinity(0)) or {0}
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def cores_from_cpuinfo(text: str, cpus: set[int]) -> int | None:
    """Distinct (physical id, core id) pairs among `cpus`' entries in /proc/cpuinfo's text; None when
    the text does not give a core id for each of them (ARM, some VMs)."""
    cores: set[tuple[str, str]] = set()
    described: set[int] = set()
    for block in re.split(r"\n\s*\n", text):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        processor = fields.get("processor", "")
        if not processor.isdigit() or int(processor) not in cpus:
            continue
        if "core id" not in fields:
            return None
        cores.add((fields.get("physical id", "0"), fields["core id"]))
        described.add(int(processor))
    return len(cores) if described == cpus else None


def cores_from_siblings(siblings: dict[int, str], cpus: set[int]) -> int | None:
    """Physical cores among `cpus` from each CPU's sysfs `topology/thread_siblings_list` ("0,4",
    "2-3"): the CPUs of one core share one list. None when a CPU's list is missing."""
    if not cpus or any(cpu not in siblings for cpu in cpus):
        return None
    return len({siblings[cpu].strip() for cpu in cpus})


def cgroup_cpu_limit(text: str) -> int | None:
    """CPUs a cgroup v2 `cpu.max` ("200000 100000", or "max 100000" for none) allows, rounded up."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def physical_cores() -> int:
    """Physical cores this process may use: /proc/cpuinfo, else sysfs, else llama.cpp's own guess
    (the CPU count, halved above 4 for hyper-threading); never more than a cgroup quota allows."""
    cpus = available_cpus()
    cores = cores_from_cpuinfo(_read(CPUINFO) or "", cpus)
    if cores is None:
        listed = {cpu: _read(SYSFS_CPU / f"cpu{cpu}" / "topology" / "thread_siblings_list") for cpu in cpus}
        cores = cores_from_siblings({cpu: s for cpu, s in listed.items() if s is not None}, cpus)
    if cores is None:
        cores = len(cpus) if len(cpus) <= 4 else len(cpus) // 2
    limit = cgroup_cpu_limit(_read(CGROUP_CPU_MAX) or "")
    return max(1, min(cores, limit) if limit else cores)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
