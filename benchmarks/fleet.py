"""Run N client processes in lock step and collect what each measured.

Every worker is created in its own forked process, does its setup and a short warm-up,
reports ready, then runs ``step`` back to back from a common start time until a common
end time (``time.monotonic`` is CLOCK_MONOTONIC, the same clock in every process). Each
step's latency is recorded; ``step`` may return its own latency (e.g. the wait part of
acquire → hold → release) instead of the wall time of the whole step.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Worker(Protocol):
    def step(self) -> float | None:
        """One operation; returns the latency to record, or None to record its wall time."""

    def close(self) -> dict[str, Any]:
        """Tear down; returns extra results (ids granted, hold intervals, ...)."""


Factory = Callable[[int], Worker]


@dataclass
class WorkerResult:
    ops: int
    latencies: list[float]
    first_start: float
    last_end: float
    cpu: float  # CPU seconds this client process used in the window (all its threads)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FleetResult:
    clients: int
    t0: float
    workers: list[WorkerResult]
    #: CPU seconds the server process used in the window (``probe`` after - before)
    server_cpu: float | None = None
    #: CPU seconds the whole machine was busy in the window (all processes)
    machine_cpu: float | None = None

    @property
    def ops(self) -> int:
        return sum(w.ops for w in self.workers)

    @property
    def elapsed(self) -> float:
        return max(w.last_end for w in self.workers) - self.t0

    @property
    def rate(self) -> float:
        return self.ops / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def latencies(self) -> list[float]:
        return [x for w in self.workers for x in w.latencies]


class WorkerFailed(Exception):
    pass


def machine_busy() -> float | None:
    """CPU seconds all CPUs have been busy since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _child(
    factory: Factory,
    index: int,
    conn: multiprocessing.connection.Connection,
    warmup: int,
) -> None:
    try:
        worker = factory(index)
        for _ in range(warmup):
            worker.step()
        conn.send(("ready",))
        t0, t1 = conn.recv()
        delay = t0 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        lat = array("d")
        ops = 0
        cpu0 = time.process_time()
        first = now = time.monotonic()
        while now < t1:
            start = now
            own = worker.step()
            now = time.monotonic()
            lat.append(now - start if own is None else own)
            ops += 1
        cpu = time.process_time() - cpu0
        extra = worker.close()
        conn.send(("done", ops, lat.tobytes(), first, now, cpu, extra))
    except BaseException:
        conn.send(("error", f"worker {index}:\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_fleet(
    factory: Factory,
    clients: int,
    duration: float,
    *,
    warmup: int = 20,
    setup_timeout: float = 120.0,
    probe: Callable[[], float] | None = None,
) -> FleetResult:
    """Run ``clients`` workers for ``duration`` seconds; raises WorkerFailed on any error.

    ``probe`` (e.g. the server's CPU seconds) is read at the start and at the end of the
    window; the difference is ``server_cpu``.
    """
    ctx = multiprocessing.get_context("fork")
    # Children share this process's pages copy-on-write; freezing the heap keeps the
    # garbage collector (here and in the children) from touching, and so copying, them.
    gc.collect()
    gc.freeze()
    procs = []
    conns = []
    for i in range(clients):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child, args=(factory, i, child, warmup), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    try:
        deadline = time.monotonic() + setup_timeout
        for c in conns:
            if not c.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerFailed("a worker did not get ready in time")
            msg = c.recv()
            if msg[0] == "error":
                raise WorkerFailed(msg[1])
        t0 = time.monotonic() + 0.05
        for c in conns:
            c.send((t0, t0 + duration))
        before = None
        time.sleep(max(0.0, t0 - time.monotonic()))
        busy0 = machine_busy()
        if probe is not None:
            before = probe()
        results = []
        for c in conns:
            if not c.poll(duration + setup_timeout):
                raise WorkerFailed("a worker did not finish in time")
            msg = c.recv()
            if msg[0] == "error":
                raise WorkerFailed(msg[1])
            _, ops, raw, first, last, cpu, extra = msg
            lat = array("d")
            lat.frombytes(raw)
            results.append(WorkerResult(ops, lat.tolist(), first, last, cpu, extra))
        server_cpu = None if probe is None or before is None else probe() - before
        busy1 = machine_busy()
        machine_cpu = None if busy0 is None or busy1 is None else busy1 - busy0
        return FleetResult(clients, t0, results, server_cpu, machine_cpu)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        gc.unfreeze()
