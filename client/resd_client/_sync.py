"""The synchronous client: one Unix socket, a reader thread, leases.

Requests may be issued from several threads; replies are matched by id. The reader
thread also receives pushes (``expired``, ``preempted``, ``state``) and hands them
to the lease they concern or to ``events()``. Failures of the socket become
``UnavailableError``; error replies become the typed exceptions of ``errors``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from resd_client import __version__
from resd_client.env import GpuIds, lease_env
from resd_client.env import assigned as _assigned
from resd_client.errors import (
    ConflictError,
    InsufficientError,
    ResdError,
    UnavailableError,
    error_from_wire,
)
from resd_client.paths import socket_candidates
from resd_client.protocol import (
    PROTOCOL_VERSION,
    RESULTS,
    BadFrame,
    Empty,
    ExpiredEvent,
    FrameDecoder,
    FrameTooLarge,
    Hello,
    HelloResult,
    ListReservations,
    PreemptedEvent,
    Renew,
    ReservationInfo,
    ReservationRef,
    Reserve,
    StateEvent,
    Status,
    Subscribe,
    decode_event,
    encode_frame,
    from_wire,
    request,
)
from resd_client.quantity import parse_quantity


class _Pending:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.frame: dict[str, Any] | None = None


def connect_socket(
    path: str | os.PathLike[str] | None = None, timeout: float = 5.0
) -> tuple[socket.socket, Path]:
    """Connect to the first listening daemon among the candidate paths.

    Raises UnavailableError saying where it looked when none is listening.
    """
    tried: list[str] = []
    refused = True
    for candidate in socket_candidates(path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(candidate))
        except OSError as exc:
            sock.close()
            tried.append(f"{candidate} ({exc.strerror or exc})")
            refused = refused and exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK)
            continue
        sock.settimeout(None)
        return sock, candidate
    raise UnavailableError(
        "no resd daemon is listening; tried "
        + ", ".join(tried)
        + ". Start one with 'resd', or point to it with --socket or RESD_SOCKET.",
        {"tried": tried},
    )


def resources_from(
    cpu: object = None,
    memory: object = None,
    gpu: object = None,
    resources: dict[str, object] | None = None,
) -> dict[str, int]:
    """Internal-unit amounts from human quantities (``memory="8G"``, ``cpu=1.5``)."""
    out: dict[str, int] = {}
    for name, value in (("cpu", cpu), ("memory", memory), ("gpu", gpu)):
        if value is not None:
            out[name] = parse_quantity(name, value)
    for name, value in (resources or {}).items():
        out[name] = parse_quantity(name, value)
    return out


class Lease:
    """A granted reservation. A context manager that releases on exit.

    ``ended`` becomes the reason string once the daemon says the reservation is gone
    (``expired``, ``preempted``) or it was released here. ``assigned`` and ``env``
    say what a worker runs on (see ``resd_client.env``).
    """

    def __init__(self, client: Client, info: ReservationInfo) -> None:
        self.client = client
        self.info = info
        self.ended: str | None = None
        self.preempt_deadline: float | None = None
        self.on_event: Callable[[Any], None] | None = None

    @classmethod
    def track(cls, client: Client, info: ReservationInfo) -> Lease:
        """A lease for ``info``, granted by a raw ``client.call("reserve", ...)``,
        registered so that the daemon's pushes about it reach it."""
        lease = cls(client, info)
        client._leases[info.id] = lease
        return lease

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def assigned(self) -> dict[str, list[str] | list[list[int]]]:
        """Assigned set members and range values: ``{"gpu": ["0", "3"], "ports": [[30000, 30009]]}``."""
        return _assigned(self.info)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a worker: ``CUDA_VISIBLE_DEVICES`` by GPU index,
        ``RESD_RESERVATION_ID``, ``RESD_GPUS``, ``RESD_CPU``, ... (``resd_client.env``)."""
        return lease_env(self.info)

    def environment(self, gpu_ids: GpuIds = "index") -> dict[str, str]:
        """Like ``env``; ``gpu_ids="uuid"`` gives ``CUDA_VISIBLE_DEVICES`` as GPU UUIDs."""
        return lease_env(self.info, gpu_ids)

    def release(self) -> None:
        """Release now; a lease that is already gone is left alone."""
        if self.ended is not None:
            return
        try:
            self.info = self.client.release(self.id)
        except ResdError as exc:
            if exc.code != "not_found":
                raise
        self.ended = self.ended or "released"

    def renew(self, ttl: float | None = None) -> None:
        self.info = self.client.renew(self.id, ttl)

    def _event(self, event: Any) -> None:
        if isinstance(event, ExpiredEvent):
            self.ended = "expired"
        elif isinstance(event, PreemptedEvent):
            self.preempt_deadline = event.deadline
            if event.reservation.state == "preempted":
                self.ended = "preempted"
        self.info = event.reservation
        if self.on_event is not None:
            self.on_event(event)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.client.closed:
            self.release()

    def __repr__(self) -> str:
        return f"Lease({self.id}, pool={self.info.pool}, resources={self.info.resources})"


class Client:
    """Synchronous resd client. ``Client()`` finds the daemon like ``resctl`` does."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        name: str = "resd_client",
        timeout: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self._sock, self.socket_path = connect_socket(socket_path)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._leases: dict[str, Lease] = {}
        self._events: queue.Queue[Any] = queue.Queue()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.closed = False
        self._reader = threading.Thread(
            target=self._read_loop, name="resd-client-reader", daemon=True
        )
        self._reader.start()
        self.hello: HelloResult = self.call(
            "hello", Hello(version=PROTOCOL_VERSION, client=f"{name}/{__version__}")
        )

    # ----------------------------------------------------------------- plumbing

    def call(self, op: str, args: Any) -> Any:
        """Send one request and wait for its typed result; raises ResdError subclasses."""
        frame = self.call_raw(op, args)
        if frame.get("ok"):
            return from_wire(RESULTS[op], frame.get("result"), "result")
        raise error_from_wire(frame.get("error"))

    def call_raw(self, op: str, args: Any) -> dict[str, Any]:
        rid = next(self._ids)
        pending = _Pending()
        with self._state_lock:
            if self.closed:
                raise UnavailableError("the connection to resd is closed")
            self._pending[rid] = pending
        data = encode_frame(request(rid, op, args))
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as exc:
            self._fail(f"sending to resd failed: {exc}")
        if not pending.event.wait(self.timeout):
            with self._state_lock:
                self._pending.pop(rid, None)
            raise UnavailableError(f"resd did not answer {op} within {self.timeout:g}s")
        assert pending.frame is not None
        return pending.frame

    def _read_loop(self) -> None:
        decoder = FrameDecoder(max_frame=64 << 20)
        reason = "resd closed the connection"
        try:
            while True:
                data = self._sock.recv(1 << 16)
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    self._dispatch(frame)
        except (OSError, FrameTooLarge, BadFrame) as exc:
            reason = f"connection to resd failed: {exc}"
        self._fail(reason)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        if "event" in frame:
            try:
                event = decode_event(frame)
            except ResdError:
                return
            reservation = getattr(event, "reservation", None)
            lease = self._leases.get(reservation.id) if reservation is not None else None
            if lease is not None:
                lease._event(event)
            self._events.put(event)
            return
        rid = frame.get("id")
        with self._state_lock:
            pending = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if pending is not None:
            pending.frame = frame
            pending.event.set()

    def _fail(self, reason: str) -> None:
        with self._state_lock:
            if self.closed and not self._pending:
                return
            self.closed = True
            pending, self._pending = self._pending, {}
        for p in pending.values():
            p.frame = {"ok": False, "error": UnavailableError(reason).to_wire()}
            p.event.set()
        self._events.put(None)

    def close(self) -> None:
        """Close the connection; the daemon releases this client's session leases."""
        if not self.closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=5)
        self._fail("client closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- the API

    def reserve(
        self,
        pool: str = "host",
        *,
        cpu: object = None,
        memory: object = None,
        gpu: object = None,
        resources: dict[str, object] | None = None,
        tenant: str | None = None,
        ttl: float | None = None,
        binding: str = "session",
        label: str = "",
        reclaimable: bool = False,
    ) -> Lease:
        """Reserve now or raise (InsufficientError, ConflictError, ...).

        The default ``session`` binding releases the lease when this client's
        connection closes, e.g. when the worker process dies.
        """
        args = Reserve(
            pool=pool,
            resources=resources_from(cpu, memory, gpu, resources),
            tenant=tenant,
            ttl=ttl,
            binding=binding,  # type: ignore[arg-type]
            label=label,
            reclaimable=reclaimable,
        )
        info: ReservationInfo = self.call("reserve", args)
        lease = Lease(self, info)
        self._leases[info.id] = lease
        return lease

    def try_reserve(self, pool: str = "host", **kwargs: Any) -> Lease | None:
        """Like ``reserve`` but returns None when it does not fit or conflicts."""
        try:
            return self.reserve(pool, **kwargs)
        except (InsufficientError, ConflictError):
            return None

    def release(self, reservation_id: str) -> ReservationInfo:
        info: ReservationInfo = self.call("release", ReservationRef(id=reservation_id))
        lease = self._leases.pop(reservation_id, None)
        if lease is not None:
            lease.ended = "released"
        return info

    def renew(self, reservation_id: str, ttl: float | None = None) -> ReservationInfo:
        info: ReservationInfo = self.call("renew", Renew(id=reservation_id, ttl=ttl))
        return info

    def status(self) -> Status:
        status: Status = self.call("status", Empty())
        return status

    def list(self, pool: str | None = None, tenant: str | None = None) -> list[ReservationInfo]:
        result = self.call("list", ListReservations(pool=pool, tenant=tenant))
        reservations: list[ReservationInfo] = result.reservations
        return reservations

    def subscribe(self) -> Status:
        """Ask for ``state`` pushes; read them with ``events()``."""
        status: Status = self.call("subscribe", Subscribe())
        return status

    def events(self, timeout: float | None = None) -> Iterator[Any]:
        """Pushed events as they arrive; ends when the connection closes."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                return
            if event is None:
                return
            yield event


__all__ = ["Client", "Lease", "StateEvent", "connect_socket", "resources_from"]
