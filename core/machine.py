"""One line naming the machine a benchmark ran on, printed above its figures."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """``"AMD EPYC 7B13, 2 cores, 24 GiB"`` (the CPU model from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        mem = ""
    return f"{cpu}, {os.cpu_count()} cores{mem}"
