"""CPU and memory of processes, from /proc (Linux): what `sessiongate bench gateway` accounts."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import subprocess
from pathlib import Path
from typing import Any, Final

import uvloop

from extproc.supervisor import envoy_binary

__all__ = [
    "CLK_TCK",
    "child_pids",
    "children_cpu_s",
    "machine_cpu",
    "machine_info",
    "process_cpu_precise_s",
    "process_cpu_s",
    "process_cpu_s_of",
    "rss_bytes",
    "self_cpu_s",
    "thread_cpu_s",
]

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds."""
    return process_cpu_s_of(Path(f"/proc/{pid}/stat"))


def process_cpu_s_of(stat: Path) -> float:
    """utime + stime from a /proc/.../stat file, in seconds."""
    text = stat.read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> dict[str, int]:
    """Jiffies of the whole machine from /proc/stat: `total`, `busy` (all but idle and
    iowait), and the parts of busy no process is charged for: `irq` (hard and soft
    interrupts: loopback networking runs largely here) and `steal` (the hypervisor)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return {
        "total": total,
        "busy": total - idle - iowait,
        "irq": irq + softirq,
        "steal": steal,
    }


def process_cpu_precise_s(pid: int) -> float:
    """CPU seconds of a live process's live threads from /proc/<pid>/task/*/schedstat
    (nanoseconds; /proc/<pid>/stat counts clock ticks of 10 ms, too coarse for an idle
    process over a few seconds). 0.0 when schedstat is not available."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def rss_bytes(pid: int) -> int:
    """VmRSS of a live process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return out


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process ("main" is its first thread)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
                out[name] = out.get(name, 0.0) + process_cpu_s_of(task / "stat")
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_info(wrk: str) -> dict[str, Any]:
    """What the run ran on: CPUs, Python, uvloop, Envoy and wrk versions, load average."""
    affinity = getattr(os, "sched_getaffinity", None)
    envoy_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        found = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/", text)
        envoy_version = found.group(1) if found else text.strip()[-60:]
    wrk_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].strip()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvloop": str(getattr(uvloop, "__version__", "")),
        "envoy": envoy_version,
        "wrk": wrk_version,
        "loadavg_start": list(os.getloadavg()),
    }
