"""Whether a run's timings are the machine's: the share of the decoding's wall time that work waited for a CPU.

Linux's pressure stall information (``cpu.pressure`` of the process's cgroup, else ``/proc/pressure/cpu``) counts the
microseconds in which some runnable task had no CPU; its growth over the decoding, divided by the wall time, is the
``cpu_wait_share`` a run's summary keeps. It counts other processes and this run's own threads beyond the cores
alike (both make the timings not the machine's), and a container or Slurm job limited to its cores sees its own
cgroup's. Where the kernel has no pressure files (macOS, Windows, old kernels) the 1-minute load average at the
run's end stands in, less this process's threads.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

#: A run whose decoding waited for a CPU longer than this share of its wall time warns (measured on a 2-core VM: an
#: idle machine's runs stay under a few percent, one other busy process makes ~50%).
BUSY_SHARE = 0.2
_PRESSURE_FILES = (Path("/sys/fs/cgroup/cpu.pressure"), Path("/proc/pressure/cpu"))


def cpu_stall_us() -> int | None:
    """The microseconds some task waited for a CPU since boot (the cgroup's, else the system's), None without
    pressure files."""
    for path in _PRESSURE_FILES:
        try:
            some = path.read_text(encoding="ascii").splitlines()[0].split()
            return int(next(field for field in some if field.startswith("total=")).split("=", 1)[1])
        except (OSError, IndexError, StopIteration, ValueError):
            continue
    return None


@dataclass
class LoadWatch:
    """Started as the decoding starts; :meth:`summary` as it ends."""

    stall_us: int | None
    start: float
    threads: int

    @classmethod
    def start_now(cls) -> LoadWatch:
        import torch

        return cls(cpu_stall_us(), time.perf_counter(), torch.get_num_threads())

    def summary(self) -> dict:
        """``{"cpu_wait_share", "load_average_1m", "cpu_cores", "warnings"}`` for the run's summary."""
        end, wall = cpu_stall_us(), time.perf_counter() - self.start
        share = (end - self.stall_us) / 1e6 / wall if end is not None and self.stall_us is not None and wall > 0 \
            else None
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return {"cpu_wait_share": share, "load_average_1m": load, "cpu_cores": cores,
                "warnings": busy_machine_warnings(share, load, self.threads, cores)}


def busy_machine_warnings(share: float | None, load: float | None, threads: int, cores: int) -> list[str]:
    """A warning when the decoding waited for a CPU over :data:`BUSY_SHARE` of its time (without pressure files: the
    load average is over the cores by half a core, and over ``threads`` by as much or ``threads`` exceed the cores):
    its timings and speedup are not the machine's (a trial's busy 2-core machine showed 2.03x for a drafter that
    drafts nothing)."""
    if share is not None:
        if share <= BUSY_SHARE:
            return []
        said = f"work waited for a CPU {share:.0%} of the decoding's time"
    elif load is not None and load > cores + 0.5 and (load - threads > 0.5 or threads > cores):
        said = f"load average {load:.1f} on {cores} cores as the run ended"
    else:
        return []
    why = " (more torch threads than cores)" if threads > cores else ""
    steadier = " (num_threads=1 also steadies them)" if threads > 1 else ""
    return [f"the machine was busy{why}: {said}; timings and speedups are unreliable: rerun on an idle machine{steadier}"]
