"""The synchronous client: one Unix socket, a reader thread, leases.

Requests may be issued from several threads; replies are matched by id. The reader
thread feeds what it reads to the connection's ``Session`` (``_core``), which
completes calls and applies pushes (``granted``, ``reclaim``, ``expired``,
``preempted``, ``state``) to the leases they concern; every push is also queued for
``events()``. Lease callbacks (``on_event``, ``on_reclaim``) run on a separate
callback thread, one at a time in push order, so a callback may call the client
(``lease.release()``) without stalling the reader; their exceptions are logged
(logger ``resd_client``) and ignored. Failures of the socket become
``UnavailableError``; error replies become the typed exceptions of ``errors``.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack, cast

from resd_client import __version__
from resd_client import _core as flows
from resd_client._core import (
    Flow,
    LeaseState,
    Need,
    Reply,
    ReserveOptions,
    Runner,
    Send,
    Session,
    notify,
    reserve_args,
    resources_from,
)
from resd_client.errors import UnavailableError
from resd_client.paths import socket_candidates
from resd_client.protocol import (
    PROTOCOL_VERSION,
    BadFrame,
    FrameTooLarge,
    Hello,
    HelloResult,
    PlanResult,
    ReservationInfo,
    Reserve,
    StateEvent,
    Status,
    WaitInfo,
)

T = TypeVar("T")
OnReclaim = Callable[["Lease"], object]


def connect_socket(
    path: str | os.PathLike[str] | None = None, timeout: float = 5.0
) -> tuple[socket.socket, Path]:
    """Connect to the first listening daemon among the candidate paths.

    Raises UnavailableError saying where it looked when none is listening.
    """
    tried: list[str] = []
    for candidate in socket_candidates(path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(candidate))
        except OSError as exc:
            sock.close()
            tried.append(f"{candidate} ({exc.strerror or exc})")
            continue
        sock.settimeout(None)
        return sock, candidate
    raise UnavailableError(
        "no resd daemon is listening; tried "
        + ", ".join(tried)
        + ". Start one with 'resd', or point to it with --socket or RESD_SOCKET.",
        {"tried": tried},
    )


class Lease(LeaseState):
    """A reservation held through a sync ``Client``; a context manager that releases
    on exit. State, ``ended``, ``reclaim_requested``, ``assigned`` and ``env``: see
    ``resd_client._core.LeaseState``."""

    def __init__(
        self, client: Client, info: ReservationInfo, on_reclaim: OnReclaim | None = None
    ) -> None:
        super().__init__(info, threading.Event(), on_reclaim)
        self.client = client

    @classmethod
    def track(cls, client: Client, info: ReservationInfo) -> Lease:
        """A lease for ``info``, granted by a raw ``client.call("reserve", ...)``,
        registered so that the daemon's pushes about it reach it."""
        with client._lock:
            return client.session.track(cls(client, info))

    def release(self) -> None:
        """Release now; a lease that is already gone is left alone."""
        self.client._run(flows.release_lease(self.client, self))

    def renew(self, ttl: float | None = None) -> None:
        """Extend the TTL: expires ``ttl`` (default: its own ttl) seconds from now."""
        self.info = self.client._run(flows.renew(self.client, self.id, ttl))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.client.closed:
            self.release()


class Client:
    """Synchronous resd client. ``Client()`` finds the daemon like ``resctl`` does;
    ``timeout`` bounds each reply (not a wait for resources)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        name: str = "resd_client",
        timeout: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self._sock, self.socket_path = connect_socket(socket_path)
        self._lock = threading.Lock()  # guards the session
        self._send_lock = threading.Lock()
        self._events: queue.Queue[Any] = queue.Queue()
        self._callbacks: queue.SimpleQueue[tuple[LeaseState, Any] | None] | None = None
        self.session = Session(
            on_push=self._events.put, on_lease=self._on_lease, on_close=self._on_close
        )
        self._reader = threading.Thread(
            target=self._read_loop, name="resd-client-reader", daemon=True
        )
        self._reader.start()
        try:
            self.hello: HelloResult = self.call(
                "hello", Hello(version=PROTOCOL_VERSION, client=f"{name}/{__version__}")
            )
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self.session.closed is not None

    # ----------------------------------------------------------------- plumbing

    def call(self, op: str, args: Any) -> Any:
        """Send one request and wait for its typed result; raises ResdError subclasses."""
        return self._run(flows.call(self, op, args))

    def call_raw(self, op: str, args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply frame, as it came."""
        frame: dict[str, Any] = self._run(flows.call(self, op, args, raw=True))
        return frame

    def _run(self, flow: Flow[T]) -> T:
        runner = Runner(flow)
        while True:
            with self._lock:
                need = runner.next()
            if need is None:
                return runner.result
            try:
                runner.done(self._perform(need))
            except BaseException as exc:  # KeyboardInterrupt too: the flow cleans up
                runner.failed(exc)

    def _perform(self, need: Need) -> Any:
        if isinstance(need, Send):
            try:
                with self._send_lock:
                    self._sock.sendall(need.data)
            except OSError as exc:
                self._close_session(f"sending to resd failed: {exc}")
            return None
        if isinstance(need, Reply):
            if not cast(threading.Event, need.call.done).wait(self.timeout):
                with self._lock:
                    raise self.session.abandon(need.call, self.timeout)
            return need.outcome()
        return cast(threading.Event, need.lease._settled).wait(need.timeout)

    def _new_flag(self) -> threading.Event:
        return threading.Event()

    def _new_lease(self, info: ReservationInfo, on_reclaim: OnReclaim | None) -> Lease:
        return Lease(self, info, on_reclaim)

    def _read_loop(self) -> None:
        reason = "resd closed the connection"
        try:
            while data := self._sock.recv(1 << 16):
                with self._lock:
                    self.session.receive(data)
        except (OSError, FrameTooLarge, BadFrame) as exc:
            reason = f"connection to resd failed: {exc}"
        self._close_session(reason)

    def _close_session(self, reason: str) -> None:
        with self._lock:
            self.session.close(reason)

    def _on_close(self) -> None:
        self._events.put(None)
        if self._callbacks is not None:
            self._callbacks.put(None)

    def _on_lease(self, lease: LeaseState, event: Any) -> None:
        if lease.on_event is None and lease.on_reclaim is None:
            return
        if self._callbacks is None:
            self._callbacks = queue.SimpleQueue()
            threading.Thread(
                target=self._call_back,
                args=(self._callbacks,),
                name="resd-client-callbacks",
                daemon=True,
            ).start()
        self._callbacks.put((lease, event))

    @staticmethod
    def _call_back(inbox: queue.SimpleQueue[tuple[LeaseState, Any] | None]) -> None:
        while (item := inbox.get()) is not None:
            notify(*item)

    def close(self) -> None:
        """Close the connection; the daemon releases this client's session leases
        and cancels its waiting requests."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        self._sock.close()
        self._close_session("client closed")

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
        pool: str | None = None,
        *,
        wait: bool = True,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[ReserveOptions],
    ) -> Lease:
        """Reserve, waiting (by default) until it is granted; returns the ``Lease``.

        ``pool`` None lets the daemon choose (a ``selector``'s match, else ``host``).
        Options: ``ReserveOptions``; the ``session`` binding ends the lease with this
        connection. With ``wait=False`` it reserves now or raises. Raises
        InsufficientError, ConflictError, ..., TimeoutError_ when ``timeout`` passed;
        a KeyboardInterrupt while waiting cancels the request at the daemon first.
        ``on_reclaim(lease)`` runs (on the callback thread) when the daemon asks a
        ``reclaimable`` lease to give its resources back.
        """
        return self.request(reserve_args(pool, wait=wait, **options), on_reclaim)

    def try_reserve(
        self,
        pool: str | None = None,
        *,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[ReserveOptions],
    ) -> Lease | None:
        """Reserve now without waiting; None when it does not fit or conflicts."""
        args = reserve_args(pool, wait=False, **options)
        return self._run(flows.try_reserve(flows.reserve(self, args, on_reclaim)))

    def request(
        self,
        args: Reserve,
        on_reclaim: OnReclaim | None = None,
        on_pending: Callable[[ReservationInfo], object] | None = None,
    ) -> Lease:
        """``reserve`` with prebuilt arguments (internal units; ``args.wait`` decides)."""
        return self._run(flows.reserve(self, args, on_reclaim, on_pending))

    def release(self, reservation_id: str) -> ReservationInfo:
        """Release a reservation, or cancel a waiting request (state ``cancelled``)."""
        return self._run(flows.release(self, reservation_id))

    def renew(self, reservation_id: str, ttl: float | None = None) -> ReservationInfo:
        return self._run(flows.renew(self, reservation_id, ttl))

    def status(self) -> Status:
        return self._run(flows.status(self))

    def subscribe(self) -> Status:
        """Ask for ``state`` pushes; read them with ``events()``."""
        return self._run(flows.subscribe(self))

    def why(self, reservation_id: str) -> WaitInfo:
        """Why a request waits: its queue position and what it waits for."""
        return self._run(flows.why(self, reservation_id))

    def plan(
        self,
        pool: str | None = None,
        *,
        request: Reserve | None = None,
        priority: int | None = None,
        wait: bool = True,
        **options: Unpack[ReserveOptions],
    ) -> PlanResult:
        """Would this request fit, wait, or preempt whom? Changes nothing. Give reserve
        arguments or a prebuilt ``request``; ``priority`` overrides the tenant's."""
        return self._run(flows.plan(self, pool, request, priority, wait, dict(options)))

    def events(self, timeout: float | None = None) -> Iterator[Any]:
        """Pushed events as they arrive; ends when the connection closes, or when none
        came for ``timeout`` seconds."""
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                return
            if event is None:
                self._events.put(None)  # for the next reader
                return
            yield event

    def list(
        self, pool: str | None = None, tenant: str | None = None, *, pending: bool = False
    ) -> builtins.list[ReservationInfo]:
        """Active reservations, or with ``pending`` the waiting requests in queue order."""
        return self._run(flows.listing(self, pool, tenant, pending))


__all__ = ["Client", "Lease", "StateEvent", "connect_socket", "resources_from"]
