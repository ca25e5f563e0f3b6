"""What one client process does in each benchmark (see ``fleet``).

Every worker is built by a small factory object, called in the child process with the
worker's index; nothing connects before the fork.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from resd_client import Client
from resd_client.protocol import (
    PROTOCOL_VERSION,
    DeniedEvent,
    FrameDecoder,
    GrantedEvent,
    Reserve,
    encode_frame,
)

T = TypeVar("T")
GRANT_TIMEOUT = 60.0  # a waiter not granted by then is a lost grant: the run fails


# ------------------------------------------------------------------------- the limit


class EchoClientWorker:
    """One round trip through the real sync ``Client`` (reader thread and all)."""

    def __init__(self, path: str) -> None:
        self.client = Client(path, name="bench-echo")

    def step(self) -> float | None:
        self.client.call_raw("ping", {})
        return None

    def close(self) -> dict[str, Any]:
        self.client.close()
        return {}


class EchoRawWorker:
    """One round trip on a bare blocking socket: encode_frame, sendall, recv, FrameDecoder."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = FrameDecoder()
        self.rid = 0

    def step(self) -> float | None:
        self.rid += 1
        self.sock.sendall(
            encode_frame({"v": PROTOCOL_VERSION, "id": self.rid, "op": "ping", "args": {}})
        )
        while True:
            for frame in self.decoder.frames():
                if frame.get("id") == self.rid:
                    return None
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("echo server closed the connection")
            self.decoder.feed(data)

    def close(self) -> dict[str, Any]:
        self.sock.close()
        return {}


@dataclass(frozen=True)
class Echo:
    path: str
    raw: bool = False

    def __call__(self, index: int) -> EchoClientWorker | EchoRawWorker:
        return EchoRawWorker(self.path) if self.raw else EchoClientWorker(self.path)


# ----------------------------------------------------------------------- resd pairs


def client_waits() -> bool:
    """Whether ``Client.reserve`` takes ``wait=`` (blocking until granted)."""
    return "wait" in inspect.signature(Client.reserve).parameters


class ResdPairWorker:
    """reserve (session lease, 1 CPU) + release through the sync client, own tenant."""

    def __init__(self, path: str, pool: str, tenant: str) -> None:
        self.client = Client(path, name="bench")
        self.pool = pool
        self.tenant = tenant
        self.ids: list[str] = []
        # reserve now or fail: a pair must never wait (the pool is large enough)
        self.options: dict[str, Any] = {"wait": False} if client_waits() else {}

    def step(self) -> float | None:
        lease = self.client.reserve(self.pool, cpu=1, tenant=self.tenant, **self.options)
        lease.release()
        self.ids.append(lease.id)
        return None

    def close(self) -> dict[str, Any]:
        self.client.close()
        return {"ids": self.ids}


@dataclass(frozen=True)
class ResdPairs:
    path: str
    pool: str
    tenant_prefix: str = "bench"

    def __call__(self, index: int) -> ResdPairWorker:
        return ResdPairWorker(self.path, self.pool, f"{self.tenant_prefix}-{index}")


# --------------------------------------------------------------------- reslock pairs


def _lock_retry(fn: Callable[[], T], errors: list[int]) -> T:
    """Call ``fn`` until it does not fail on reslock's state-file lock.

    reslock gives up on the lock after 5 s (portalocker polls a non-blocking flock, so
    under load a process can lose every race for that long); both acquire and release
    are documented as safe to retry. Each failure is counted in ``errors[0]``.
    """
    from portalocker.exceptions import LockException  # type: ignore[import-untyped, import-not-found, unused-ignore]

    while True:
        try:
            return fn()
        except LockException:
            errors[0] += 1


class ReslockPairWorker:
    """reslock ``try_acquire(cpu_cores=1)`` + ``release`` on one state file."""

    def __init__(self, state: Path) -> None:
        from reslock import ResourcePool  # type: ignore[import-untyped, import-not-found, unused-ignore]

        self.pool = ResourcePool(state)
        self.ids: list[str] = []
        self.errors = [0]

    def step(self) -> float | None:
        lease = _lock_retry(lambda: self.pool.try_acquire(cpu_cores=1), self.errors)
        if lease is None:
            raise RuntimeError("reslock refused a request that fits: a lost grant")
        _lock_retry(lease.release, self.errors)
        self.ids.append(lease.id)
        return None

    def close(self) -> dict[str, Any]:
        return {"ids": self.ids, "lock_timeouts": self.errors[0]}


@dataclass(frozen=True)
class ReslockPairs:
    state: Path

    def __call__(self, index: int) -> ReslockPairWorker:
        return ReslockPairWorker(self.state)


# ------------------------------------------------------------------------ contention


class ResdContentionWorker:
    """acquire (waiting) → hold → release, one CPU of a pool that fits a quarter of us.

    Records the wait of each grant and the interval it held the grant: from the moment
    the grant was seen here to the moment the release was sent, which lies inside the
    daemon's own interval, so overlapping intervals beyond capacity would be a double grant.
    """

    def __init__(self, path: str, pool: str, tenant: str, hold: float) -> None:
        self.client = Client(path, name="bench-contention")
        self.pool = pool
        self.tenant = tenant
        self.hold = hold
        self.native = client_waits()
        self.intervals: list[tuple[float, float]] = []
        self.ids: list[str] = []

    def _acquire(self) -> str:
        if self.native:
            lease = self.client.reserve(  # type: ignore[call-arg, unused-ignore]
                self.pool, cpu=1, tenant=self.tenant, wait=True, timeout=GRANT_TIMEOUT
            )
            return str(lease.id)
        args = Reserve(
            pool=self.pool,
            resources={"cpu": 1000},
            tenant=self.tenant,
            binding="session",
            wait=True,
            timeout=GRANT_TIMEOUT,
        )
        info = self.client.call("reserve", args)
        if info.state == "active":
            return str(info.id)
        for event in self.client.events(timeout=GRANT_TIMEOUT):
            if isinstance(event, GrantedEvent) and event.reservation.id == info.id:
                return str(info.id)
            if isinstance(event, DeniedEvent) and event.reservation_id == info.id:
                raise RuntimeError(f"waiting request denied: {event.error}")
        raise RuntimeError(f"{info.id} was never granted: a lost grant")

    def step(self) -> float | None:
        asked = time.monotonic()
        rid = self._acquire()
        granted = time.monotonic()
        time.sleep(self.hold)
        released = time.monotonic()
        self.client.release(rid)
        self.intervals.append((granted, released))
        self.ids.append(rid)
        return granted - asked

    def close(self) -> dict[str, Any]:
        self.client.close()
        return {"intervals": self.intervals, "ids": self.ids, "pid": os.getpid()}


@dataclass(frozen=True)
class ResdContention:
    path: str
    pool: str
    hold: float
    tenant_prefix: str = "contend"

    def __call__(self, index: int) -> ResdContentionWorker:
        return ResdContentionWorker(
            self.path, self.pool, f"{self.tenant_prefix}-{index}", self.hold
        )


class ReslockContentionWorker:
    """reslock ``acquire(cpu_cores=1)`` (blocking, its default poll interval) → hold → release."""

    def __init__(self, state: Path, hold: float, poll: float | None) -> None:
        from reslock import ResourcePool  # type: ignore[import-untyped, import-not-found, unused-ignore]

        self.pool = ResourcePool(state)
        self.hold = hold
        self.poll = poll
        self.errors = [0]
        self.intervals: list[tuple[float, float]] = []
        self.ids: list[str] = []

    def step(self) -> float | None:
        asked = time.monotonic()
        kwargs: dict[str, Any] = {} if self.poll is None else {"poll_interval": self.poll}
        # acquire() is a context manager; enter it and release the handle ourselves, so
        # that a lock timeout in release can be retried (release is idempotent). The
        # manager must stay referenced: collecting it would release the lease at once.
        managers = []

        def enter() -> Any:
            manager = self.pool.acquire(cpu_cores=1, **kwargs)
            handle = manager.__enter__()
            managers.append(manager)
            return handle

        lease = _lock_retry(enter, self.errors)
        granted = time.monotonic()
        time.sleep(self.hold)
        released = time.monotonic()
        _lock_retry(lease.release, self.errors)
        managers[0].__exit__(None, None, None)  # its own release is now a no-op
        self.intervals.append((granted, released))
        self.ids.append(lease.id)
        return granted - asked

    def close(self) -> dict[str, Any]:
        return {
            "intervals": self.intervals,
            "ids": self.ids,
            "pid": os.getpid(),
            "lock_timeouts": self.errors[0],
        }


@dataclass(frozen=True)
class ReslockContention:
    state: Path
    hold: float
    poll: float | None = None

    def __call__(self, index: int) -> ReslockContentionWorker:
        return ReslockContentionWorker(self.state, self.hold, self.poll)
