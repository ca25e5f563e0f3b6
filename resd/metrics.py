"""Prometheus metrics (SPEC §8): one registry per daemon, and the HTTP endpoint that
serves it.

``Metrics`` owns a private ``CollectorRegistry`` (never prometheus-client's global one,
so two daemons in one test process do not collide) holding two kinds of metric:

- *State*, read from the pool book at scrape time by ``BookCollector``: capacity,
  effective capacity, allocated and available per pool and resource; reservations by
  state; queue length; leases carrying each GPU mark; each sampled GPU's used,
  foreign and over-used bytes. The collector reads the book synchronously, with no
  await, on the trio thread: the pool actor changes the book only in synchronous
  steps on that thread (STYLE habit 2), so a scrape always sees a whole state.
- *Events*, counted by hooks the owners call: evictions (preemptions and reclaims),
  expiries and every end of a reservation (the pool actor's effects), wait time from
  arrival to grant (its ``_grant``), request latency and errors by op (``ops.dispatch``),
  and the journal's fsync latency and batch size (``Journal``'s ``on_sync``).
  Counters start at zero with each process, as Prometheus expects.

``serve_http`` answers ``GET /metrics`` with ``generate_latest`` on the trio thread
(fast and synchronous, which is what keeps the book reads safe); prometheus-client's
own threaded server is not used because it would read the book from another thread.
Requests are bounded: a head of at most ``MAX_HEAD`` bytes within ``HTTP_TIMEOUT``
seconds, at most ``MAX_HTTP_CONNECTIONS`` at once (more are closed at once), one
request per connection. A failed connection costs that connection, never the daemon.
"""

from __future__ import annotations

import functools
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Final, final

import structlog
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from resd.pools import PoolBook

log = structlog.get_logger("resd.metrics")

#: seconds a request may take (the latency of a blocking ``reserve`` is its wait)
REQUEST_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
)  # fmt: skip
#: seconds a waiter waited before its grant
WAIT_BUCKETS: Final = (
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14_400.0,
    43_200.0, 86_400.0,
)  # fmt: skip
#: seconds one group-commit fsync of the WAL took
FSYNC_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
#: journal entries one fsync made durable
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

#: the states a reservation is counted in, so that every pool shows each of them
STATES: Final = ("active", "terminating", "waiting")
#: what an eviction's ``by`` starts with, for the cause label
_CAUSES: Final = (("quota:", "quota"), ("overuse:", "overuse"), ("idle:", "idle"))
#: causes counted as reclaims (resources taken back); the others are preemptions
RECLAIM_CAUSES: Final = frozenset({"quota", "idle"})

MAX_HEAD: Final = 8192
HTTP_TIMEOUT: Final = 5.0
MAX_HTTP_CONNECTIONS: Final = 16


def eviction_cause(by: str) -> str:
    """``quota`` (a borrower's lease taken back for a tenant within its min),
    ``overuse`` / ``idle`` (the GPU policy), or ``priority`` (a preemption). ``by`` is
    a Terminating event's ``by``, or an Ended event's ``reason`` ("preempted by ...")."""
    by = by.removeprefix("preempted by ")
    for prefix, cause in _CAUSES:
        if by.startswith(prefix):
            return cause
    return "priority"


@final
class BookCollector(Collector):
    """The pool book's state, read at scrape time (see the module docstring)."""

    def __init__(self, book: Callable[[], PoolBook | None], version: str) -> None:
        self._book = book
        self._version = version

    def describe(self) -> Iterable[Metric]:
        return []  # families vary with the book; the registry must not call collect early

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily("resd_build", "The resd version serving these metrics.")
        info.add_metric([], {"version": self._version})
        yield info
        book = self._book()
        if book is None:  # before recovery
            return
        resource = ["pool", "resource", "unit"]
        capacity = GaugeMetricFamily(
            "resd_resource_capacity",
            "Capacity of a pool's resource before over-subscription, in its unit.",
            labels=resource,
        )
        effective = GaugeMetricFamily(
            "resd_resource_effective",
            "Capacity × over-subscription ratio: what may be reserved in all.",
            labels=resource,
        )
        allocated = GaugeMetricFamily(
            "resd_resource_allocated", "Reserved now, in the resource's unit.", labels=resource
        )
        available = GaugeMetricFamily(
            "resd_resource_available",
            "Effective capacity not reserved now (may be negative after a shrink).",
            labels=resource,
        )
        reservations = GaugeMetricFamily(
            "resd_reservations",
            "Reservations by state: active, terminating (preempted, in their grace) and "
            "waiting (queued; counted in the first pool they asked for).",
            labels=["pool", "state"],
        )
        queue = GaugeMetricFamily(
            "resd_queue_length", "Requests waiting in the queue, all pools together."
        )
        marks = GaugeMetricFamily(
            "resd_marked_reservations",
            "Leases carrying a GPU mark now (overuse, idle), set by the reconciler.",
            labels=["pool", "mark"],
        )
        device = ["pool", "gpu", "uuid"]
        gpu_used = GaugeMetricFamily(
            "resd_gpu_memory_used_bytes", "GPU memory in use at the last sample.", labels=device
        )
        gpu_total = GaugeMetricFamily(
            "resd_gpu_memory_total_bytes", "GPU memory of the device.", labels=device
        )
        foreign = GaugeMetricFamily(
            "resd_gpu_foreign_bytes",
            "GPU memory held by no lease's processes (unmanaged work, the driver).",
            labels=device,
        )
        overuse = GaugeMetricFamily(
            "resd_gpu_overuse_bytes",
            "GPU memory leases hold beyond what they reserved on the device.",
            labels=device,
        )
        states: Tally[tuple[str, str]] = Tally()
        marked: Tally[tuple[str, str]] = Tally()
        for r in book.reservations.values():
            states[r.pool, r.state] += 1
            for mark in r.marks:
                marked[r.pool, mark] += 1
        for w in book.waiting.values():
            states[w.pools[0], "waiting"] += 1
        for name in sorted(book.pools):
            for row in book.usage(book.pools[name]):
                labels = [name, row.name, row.unit]
                capacity.add_metric(labels, row.capacity)
                effective.add_metric(labels, row.effective)
                allocated.add_metric(labels, row.allocated)
                available.add_metric(labels, row.available)
            for state in STATES:
                reservations.add_metric([name, state], states.pop((name, state), 0))
            for d in book.live_devices.get(name, ()):
                labels = [name, d.member, d.uuid]
                gpu_used.add_metric(labels, d.memory_used)
                gpu_total.add_metric(labels, d.memory_total)
                foreign.add_metric(labels, d.foreign)
                overuse.add_metric(labels, d.overuse)
        for (pool, state), n in sorted(states.items()):  # a pool deleted under its waiters
            reservations.add_metric([pool, state], n)
        for (pool, mark), n in sorted(marked.items()):
            marks.add_metric([pool, mark], n)
        queue.add_metric([], len(book.waiting))
        yield from (capacity, effective, allocated, available, reservations, queue, marks)
        yield from (gpu_used, gpu_total, foreign, overuse)


@final
class Metrics:
    """The daemon's registry and the hooks that count events into it."""

    def __init__(self, version: str = "", clock: Callable[[], float] = time.perf_counter) -> None:
        """``clock``: what request latency is measured with (a monotonic clock)."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.clock = clock
        self._book: Callable[[], PoolBook | None] = lambda: None
        self.registry.register(BookCollector(lambda: self._book(), version))
        reg = self.registry
        self.preemptions = Counter(
            "resd_preemptions",
            "Leases evicted for a higher-priority tenant (cause priority) or for GPU "
            "over-use (cause overuse), counted when decided.",
            ["pool", "cause"],
            registry=reg,
        )
        self.reclaims = Counter(
            "resd_reclaims",
            "Leases taken back: from a borrower for a tenant within its quota's min "
            "(cause quota) or from an idle GPU lease (cause idle), counted when decided.",
            ["pool", "cause"],
            registry=reg,
        )
        self.expiries = Counter(
            "resd_expiries", "Leases ended by their TTL.", ["pool"], registry=reg
        )
        self.ended = Counter(
            "resd_reservations_ended",
            "Leases ended, by final state (released, expired, preempted).",
            ["pool", "state"],
            registry=reg,
        )
        self.wait = Histogram(
            "resd_wait_seconds",
            "Time from a request's arrival to its grant, for requests that waited.",
            ["pool"],
            buckets=WAIT_BUCKETS,
            registry=reg,
        )
        self.requests = Histogram(
            "resd_request_seconds",
            "Time to answer a request, by op (errors included; cancelled ones not).",
            ["op"],
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self.errors = Counter(
            "resd_request_errors",
            "Requests answered with an error, by op and error code.",
            ["op", "code"],
            registry=reg,
        )
        self.fsync = Histogram(
            "resd_journal_fsync_seconds",
            "Time one group-commit fsync of the write-ahead log took.",
            buckets=FSYNC_BUCKETS,
            registry=reg,
        )
        self.batch = Histogram(
            "resd_journal_fsync_entries",
            "Journal entries one fsync made durable (the group-commit batch size).",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )

        # Children looked up once per label set: ``labels()`` takes a lock and builds
        # a key on every call, and these two are on every request and every end.
        self._request_child = functools.cache(self.requests.labels)
        self._ended_child = functools.cache(self.ended.labels)

    def watch(self, book: Callable[[], PoolBook]) -> None:
        """Read state from ``book()`` at each scrape (the pool actor's book)."""
        self._book = book

    def text(self) -> bytes:
        """The text exposition format of everything, now (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ hooks

    def evicted(self, pool: str, by: str) -> None:
        """A lease of ``pool`` is being evicted by ``by`` (a Terminating event, or an
        Ended ``preempted`` without a grace)."""
        cause = eviction_cause(by)
        family = self.reclaims if cause in RECLAIM_CAUSES else self.preemptions
        family.labels(pool, cause).inc()

    def lease_ended(self, pool: str, state: str) -> None:
        self._ended_child(pool, state).inc()
        if state == "expired":
            self.expiries.labels(pool).inc()

    def waited(self, pool: str, seconds: float) -> None:
        self.wait.labels(pool).observe(max(0.0, seconds))

    def request(self, op: str, seconds: float, code: str | None) -> None:
        self._request_child(op).observe(seconds)
        if code is not None:
            self.errors.labels(op, code).inc()

    def journal_synced(self, seconds: float, entries: int) -> None:
        self.fsync.observe(seconds)
        if entries > 0:
            self.batch.observe(entries)


# ------------------------------------------------------------------ the endpoint


def parse_head(head: bytes) -> tuple[str, str]:
    """The method and path (without its query) of an HTTP/1.x request head.
    Raises ValueError for anything else."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x request line: {line[:80]!r}")
    return parts[0], parts[1].split("?", 1)[0]


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def http_reply(metrics: Metrics, head: bytes) -> bytes:
    """The whole response to one request head: the metrics for ``GET /metrics``
    (``HEAD`` too, without the body), 404 for another path, 405 for another method,
    400 for what is not HTTP/1.x."""
    try:
        method, path = parse_head(head)
    except ValueError:
        return _response("400 Bad Request", "text/plain; charset=utf-8", b"bad request\n")
    if path != "/metrics":
        return _response("404 Not Found", "text/plain; charset=utf-8", b"try /metrics\n")
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain; charset=utf-8", b"GET only\n")
    body = metrics.text()
    reply = _response("200 OK", CONTENT_TYPE_LATEST, body)
    return reply[: len(reply) - len(body)] if method == "HEAD" else reply


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise ValueError("request head too long")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ValueError("connection closed before the request head ended")
        data += chunk
    return data


async def serve_http(
    metrics: Metrics,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``metrics`` over HTTP on ``listeners`` (``trio.open_tcp_listeners``; the
    caller closes them) until cancelled; reports the first one's address (with port
    0, the port the kernel picked) once listening."""
    busy = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal busy
        busy += 1
        try:
            if busy > MAX_HTTP_CONNECTIONS:
                return
            with trio.move_on_after(HTTP_TIMEOUT):
                try:
                    head = await _read_head(stream)
                    await stream.send_all(http_reply(metrics, head))
                except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        except Exception:  # a scrape must never take the daemon down
            log.exception("metrics_http_failed")
        finally:
            busy -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        address = listeners[0].socket.getsockname()
        log.info("metrics_listening", address=f"{address[0]}:{address[1]}")
        task_status.started((address[0], address[1]))


__all__ = [
    "BookCollector",
    "Metrics",
    "eviction_cause",
    "http_reply",
    "parse_head",
    "serve_http",
]
