"""Percentiles and summaries of fleet runs."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.fleet import FleetResult


def held_name(system: str, held: int) -> str:
    """The name of a throughput row measured with ``held`` other leases active."""
    return f"{system}, {held:,} held" if held else system


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; nan if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def other_cpu_percent(fleet: FleetResult) -> float | None:
    """How busy the machine was with anything but this server and these clients, in % of
    all CPUs over the window (other jobs, the kernel's own work, the harness)."""
    if fleet.machine_cpu is None or fleet.elapsed <= 0:
        return None
    ours = (fleet.server_cpu or 0.0) + sum(w.cpu for w in fleet.workers)
    cpus = os.cpu_count() or 1
    return max(0.0, fleet.machine_cpu - ours) / (fleet.elapsed * cpus) * 100


def summarize(fleet: FleetResult) -> dict[str, Any]:
    lat = sorted(fleet.latencies)
    return {
        "other_cpu_pct": other_cpu_percent(fleet),
        "clients": fleet.clients,
        "ops": fleet.ops,
        "seconds": fleet.elapsed,
        "ops_per_s": fleet.rate,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "max_ms": (lat[-1] if lat else math.nan) * 1e3,
        "min_client_ops": min(w.ops for w in fleet.workers),
        "max_client_ops": max(w.ops for w in fleet.workers),
        "lock_timeouts": sum(int(w.extra.get("lock_timeouts", 0)) for w in fleet.workers),
        "server_cpu_us_per_op": (
            fleet.server_cpu / fleet.ops * 1e6
            if fleet.server_cpu is not None and fleet.ops
            else None
        ),
        "client_cpu_us_per_op": (
            sum(w.cpu for w in fleet.workers) / fleet.ops * 1e6 if fleet.ops else None
        ),
    }


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one instant (touching ends do not overlap)."""
    events: list[tuple[float, int]] = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    events.sort()  # at equal times -1 sorts before +1
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best
