"""What this host has: CPUs, memory, disk, disk I/O, network and GPUs.

The source of the first ``host`` pool. Each figure is measured where the machine
can tell (``detected``) or taken from the configuration (``configured``); a figure
that cannot be found is left out rather than guessed. NVML failures (no driver, no
GPU) mean no GPUs, logged once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import attrs
import psutil
import structlog

from resd_client.quantity import parse_quantity

log = structlog.get_logger("resd.discovery")


@attrs.frozen
class Figure:
    resource: str
    capacity: int
    source: str  # "detected" | "configured"


def _gpu_count() -> int:
    try:
        import pynvml
    except ImportError:
        log.info("nvml_absent", detail="nvidia-ml-py not importable; no GPUs")
        return 0
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses for every missing piece
        log.info("nvml_unavailable", detail=str(exc))
        return 0
    try:
        count: int = pynvml.nvmlDeviceGetCount()
        return count
    finally:
        pynvml.nvmlShutdown()


def _net_speed() -> int | None:
    speeds = [
        s.speed
        for name, s in psutil.net_if_stats().items()
        if s.isup and s.speed > 0 and name != "lo"
    ]
    return max(speeds) * 1_000_000 // 8 if speeds else None


def discover(state_dir: Path, disk_io_limit: str) -> list[Figure]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    figures = [
        Figure("cpu", cpus * 1000, "detected"),
        Figure("memory", int(psutil.virtual_memory().total), "detected"),
    ]
    probe: Path = state_dir
    while not probe.exists():
        probe = probe.parent
    figures.append(Figure("disk", shutil.disk_usage(probe).total, "detected"))
    figures.append(Figure("disk_io", parse_quantity("disk_io", disk_io_limit), "configured"))
    net = _net_speed()
    if net:
        figures.append(Figure("net", net, "detected"))
    gpus = _gpu_count()
    if gpus:
        figures.append(Figure("gpu", gpus, "detected"))
    return figures


def host_pool_resources(figures: list[Figure], oversub: dict[str, float]) -> dict[str, Any]:
    return {
        f.resource: {"capacity": f.capacity, "ratio": oversub.get(f.resource, 1.0)} for f in figures
    }
