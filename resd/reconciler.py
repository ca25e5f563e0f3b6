"""The reconciler: looks at what the GPUs and lease processes really use (SPEC §10).

One task owns all of it (the judge's memory, the latest snapshot, the ``top``
subscribers), so, like an actor, it needs no lock. Every ``interval`` seconds it
samples NVML and the process table in a worker thread (both block), asks the pool
actor for its live leases, lets the pure ``Judge`` conclude, tells the pool actor
the verdict (marks, terminations, foreign use for admission) and pushes a ``top``
snapshot to subscribers. A driver that goes away is logged once and reported in
``top``; sampling resumes when it answers again. Nothing here raises into the
daemon: a failed look is logged and the next one comes on time.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from resd import messages as m
from resd.actor import Actor
from resd.config import Config
from resd.gpu_usage import GpuSample
from resd.nvml import FileBackend, NvmlBackend, NvmlUnavailable, PynvmlBackend
from resd.procwatch import process_table
from resd.reconcile import Judge, Observation, ProcInfo, ancestry
from resd_client.protocol import TopEvent, TopSnapshot, encode_frame, push

log = structlog.get_logger("resd.reconciler")
#: seconds between the two looks of a first ``top``, so CPU shares have a baseline
BASELINE = 0.5

#: runs a blocking call off the event loop (tests run it inline on a MockClock)
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]


async def _to_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


class Reconciler:
    def __init__(
        self,
        pools: Actor,
        backend: NvmlBackend | None,
        interval: float,
        wall: Callable[[], float],
        *,
        margin: int = 0,
        why_not: str = "",
        table: Callable[[], dict[int, ProcInfo]] = process_table,
        offload: Offload = _to_thread,
    ) -> None:
        self.pools = pools
        self.backend = backend
        self.interval = interval
        self.wall = wall
        self.table = table
        self.offload = offload
        self.judge = Judge(margin=margin)
        #: why GPUs are not sampled ("" while they are)
        self.why_not = why_not if backend is None else ""
        if interval <= 0:
            self.why_not = "sampling is off (gpu_sample_interval = 0)"
        self.subscribers: set[m.Outbox] = set()
        #: one look at a time: the loop's and ``fresh``'s (the judge has one writer)
        self._lock = trio.Lock()
        #: whether ``latest`` has a row for every lease
        self._complete = False
        self.latest = TopSnapshot(at=wall(), interval=interval, gpu_sampling=self.why_not)

    def subscribe(self, outbox: m.Outbox) -> None:
        self.subscribers.add(outbox)

    def unsubscribe(self, outbox: m.Outbox) -> None:
        self.subscribers.discard(outbox)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.interval <= 0:
            return
        while True:
            try:
                async with self._lock:
                    await self.look(everything=bool(self.subscribers))
            except Exception:  # a bug must not end sampling for the daemon's life
                log.exception("reconcile_failed")
            await trio.sleep(self.interval)

    async def fresh(self) -> TopSnapshot:
        """A snapshot of every lease no older than one interval, for the ``top`` op:
        looked at now when the last look was older or covered only the leases a GPU
        sample concerns (twice, the first time, so CPU shares have a baseline)."""
        if self.interval <= 0:
            return self.latest
        async with self._lock:
            if not self._complete or self.wall() - self.latest.at >= self.interval:
                if not self.judge.cpu_seen:
                    await self.look(everything=True)
                    await trio.sleep(min(self.interval, BASELINE))
                await self.look(everything=True)
        return self.latest

    async def look(self, *, everything: bool) -> None:
        """One sample: observe, judge, report, push. Without GPUs to sample and
        nobody asking for every lease (``everything``: ``top``), there is nothing to
        look at. The judge runs off the event loop too: with ``everything`` it sees
        every lease, which may be many."""
        samples = await self._sample()
        if samples is None and not everything:
            self._complete = False
            self.latest = TopSnapshot(
                at=self.wall(), interval=self.interval, gpu_sampling=self.why_not
            )
            return
        procs: dict[int, ProcInfo] = await self.offload(self.table)
        pids = None if everything else ancestry(samples or [], procs)
        leases, devices = await self.pools.ask(m.GpuLeases(pids))
        at = self.wall()
        obs = Observation(at, samples, procs, self.why_not)
        verdict = await self.offload(functools.partial(self.judge.step, obs, leases, devices))
        self.pools.tell(m.GpuReport(verdict, at))
        self._complete = everything
        self.latest = TopSnapshot(
            at=at,
            interval=self.interval,
            rows=verdict.rows,
            devices=verdict.devices,
            gpu_sampling=self.why_not,
        )
        if self.subscribers:
            frame = encode_frame(push(TopEvent(snapshot=self.latest)))
            for outbox in list(self.subscribers):
                if not outbox.push(frame):
                    self.subscribers.discard(outbox)

    async def _sample(self) -> list[GpuSample] | None:
        if self.backend is None:
            return None
        try:
            samples: list[GpuSample] = await self.offload(self.backend.sample)
        except NvmlUnavailable as exc:
            if self.why_not != exc.reason:
                log.error("gpu_sampling_failed", reason=exc.reason, retry_in=self.interval)
            self.why_not = exc.reason
            return None
        if self.why_not:
            log.info("gpu_sampling_resumed", devices=len(samples))
            self.why_not = ""
        return samples


def choose_backend(cfg: Config) -> tuple[NvmlBackend | None, str]:
    """The backend to sample, or None and why not: the ``gpus_file``'s GPUs, else
    NVML when it lists at least one GPU (no sampling without GPUs). Blocking: NVML
    is asked once, here."""
    if cfg.gpus_file:
        return FileBackend(Path(cfg.gpus_file)), ""  # re-read each sample: live fields
    backend = PynvmlBackend()
    try:
        found = backend.devices()
    except NvmlUnavailable as exc:
        return None, f"no GPUs: {exc.reason}"
    if not found:
        return None, "no GPUs: NVML lists none"
    return backend, ""
