"""The async clients' common body: the API over a ``_core.Session``, written once
for trio (``resd_client.trio``) and asyncio (``resd_client.asyncio``).

``AsyncClient`` owns the session, one background reader task, the ``events()``
buffer and the API. Each backend supplies only what differs: a byte stream over the
connected socket (whose failures it raises as OSError), events and locks, a timed
wait, a sleep and a clock, a shield from cancellation, and how the reader task is
started and stopped. Nothing here imports trio or asyncio.

When the connection ends unexpectedly, the reader task reconnects (capped
back-off, at most ``reconnect`` seconds) and resumes the session as the sync client
does (see ``resd_client._sync``); what waits meanwhile waits for it.

Lease callbacks (``on_event``, ``on_reclaim``) are plain callables that run in the
reader task, between its reads: they must not block; exceptions in them are logged
(logger ``resd_client``) and ignored. A wait for resources that is cancelled is
cancelled at the daemon too (shielded), so nothing stays queued.
"""

from __future__ import annotations

import abc
import builtins
import collections
import contextlib
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar, Unpack, cast

from resd_client import _core as flows
from resd_client._core import (
    ConnectionLost,
    Flow,
    GangOptions,
    GangPart,
    LeaseState,
    Need,
    Reconnect,
    Reply,
    ReserveOptions,
    ResizeOptions,
    Runner,
    Send,
    Session,
    gang_args,
    notify,
    reserve_args,
    resize_args,
)
from resd_client._sync import CONNECT_TIMEOUT, backoff, connect_socket, reconnect_limit
from resd_client._version import __version__
from resd_client.errors import UnavailableError
from resd_client.protocol import (
    PROTOCOL_VERSION,
    BadFrame,
    FrameTooLarge,
    Hello,
    HelloResult,
    Part,
    PlanResult,
    ReservationInfo,
    Reserve,
    Resize,
    Status,
    TopSnapshot,
    WaitInfo,
)

T = TypeVar("T")
OnReclaim = Callable[["Lease"], object]
log = logging.getLogger("resd_client")

#: pushes kept for ``events()`` when nobody reads them (the oldest are dropped)
MAX_QUEUED_EVENTS: Final = 4096


class AsyncFlag(Protocol):
    """``trio.Event`` or ``asyncio.Event``."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class Stream(Protocol):
    """A connected byte stream; raises OSError when the connection fails."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes: ...

    async def aclose(self) -> None: ...


class Lease(LeaseState):
    """A reservation held through an async client; ``async with lease:`` releases it
    on exit (shielded from cancellation). State, ``ended``, ``reclaim_requested``,
    ``marks``, ``assigned`` and ``env``: see ``resd_client._core.LeaseState``."""

    def __init__(
        self, client: AsyncClient, info: ReservationInfo, on_reclaim: OnReclaim | None = None
    ) -> None:
        super().__init__(info, client._new_flag(), on_reclaim)
        self.client = client

    async def release(self, *, wait: bool = True) -> None:
        """Release now; a lease that is already gone is left alone. While resd is
        away it waits for the reconnection; ``wait=False`` does not: it raises
        ConnectionLost and forgets the lease (resd lets a session lease nobody
        re-attaches go after its ``reattach_grace``)."""
        await self.client._run(flows.release_lease(self.client, self, wait=wait))

    async def renew(self, ttl: float | None = None) -> None:
        """Extend the TTL: expires ``ttl`` (default: its own ttl) seconds from now
        (``info`` is the reply, applied by the session as it was read)."""
        await self.client._run(flows.renew(self.client, self.id, ttl))

    async def register(self, pid: int, *, confine: bool = False) -> None:
        """Count process ``pid`` (and its descendants) as this lease's, for resd's GPU
        accounting (SPEC §10): a worker it started that holds GPU memory. ``confine``:
        put it in a cgroup limited to the lease's CPU and memory where the host allows
        (``info.enforcement`` then says ``cgroup``)."""
        await self.client._run(flows.register(self.client, self.id, pid, confine))

    async def resize(
        self,
        *,
        wait: bool = False,
        on_pending: Callable[[ReservationInfo], object] | None = None,
        **options: Unpack[ResizeOptions],
    ) -> ReservationInfo:
        """Give this lease new amounts (``await lease.resize(cpu=4)``; what is not
        named stays); ``info`` then has them, and so does the result. As the sync
        ``Lease.resize`` (``on_pending(info)`` runs once with the waiting request if
        it waits); a cancelled wait is cancelled at the daemon (shielded)."""
        args = resize_args(self.id, wait=wait, **options)
        return await self.client._run(flows.resize(self.client, args, self, on_pending))

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.client.closed:
            return
        # Leaving normally (or by an error): release, waiting out an outage. Leaving
        # by a cancellation: release if connected, without waiting (shielded either way).
        wait = exc is None or isinstance(exc, Exception)
        with contextlib.suppress(ConnectionLost):
            await self.client._run(flows.release_lease(self.client, self, wait=wait), shielded=True)


class LeaseRequest:
    """What ``client.reserve(...)`` returns: ``await`` it for the ``Lease``, or use it
    as ``async with client.reserve(...) as lease:`` to release on exit."""

    def __init__(self, client: AsyncClient, args: Reserve, on_reclaim: OnReclaim | None) -> None:
        self._client = client
        self._args = args
        self._on_reclaim = on_reclaim
        self._lease: Lease | None = None

    def __await__(self) -> Generator[Any, None, Lease]:
        return self._client.request(self._args, self._on_reclaim).__await__()

    async def __aenter__(self) -> Lease:
        self._lease = await self
        return self._lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lease is not None:
            await self._lease.__aexit__(exc_type, exc, tb)


class _Events:
    """The async iterator of ``AsyncClient.events`` (a plain object, not an async
    generator: leaving the loop early needs no ``aclose``)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Any:
        client = self._client
        while not client._queued:
            if client.closed:
                raise StopAsyncIteration
            if client._arrived.is_set():  # a fresh flag, shared by all who wait
                client._arrived = client._new_flag()
            await client._arrived.wait()
        return client._queued.popleft()


class AsyncClient(abc.ABC):
    """The API of the async clients (see the module doc); ``timeout`` bounds each
    reply (not a wait for resources); ``reconnect``: seconds it keeps trying to
    reconnect (None: ``$RESD_RECONNECT`` or 120; 0: never). Use a backend's
    ``Client``."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        name: str = "resd_client",
        timeout: float = 30.0,
        reconnect: float | None = None,
    ) -> None:
        self.timeout = timeout
        self.name = name
        self.reconnect = reconnect_limit(reconnect)
        self._where = socket_path
        self.socket_path: Path | None = None
        self._stream: Stream | None = None
        self._send_lock = self._new_lock()
        self._queued: collections.deque[Any] = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self._arrived = self._new_flag()
        self.session = Session(
            on_push=self._on_push,
            on_lease=notify,
            on_close=self._on_close,
            new_flag=self._new_flag,
        )

    # ---------------------------------------------------------------- backend

    @abc.abstractmethod
    def _new_flag(self) -> AsyncFlag: ...

    @abc.abstractmethod
    def _new_lock(self) -> AbstractAsyncContextManager[Any]: ...

    @abc.abstractmethod
    async def _wait(self, flag: AsyncFlag, limit: float | None) -> bool:
        """Whether ``flag`` was set within ``limit`` seconds (None: no limit)."""

    @abc.abstractmethod
    async def _within(self, limit: float, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()``; raises OSError when it takes longer than ``limit`` seconds."""

    @abc.abstractmethod
    async def _sleep(self, seconds: float) -> None: ...

    @abc.abstractmethod
    def _now(self) -> float:
        """The backend's clock (seconds), for the reconnection deadline."""

    @abc.abstractmethod
    async def _shielded(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` to its end even if this task is cancelled meanwhile (the
        cancellation is delivered afterwards)."""

    @abc.abstractmethod
    async def _wrap(self, sock: socket.socket) -> Stream:
        """A stream over the connected ``sock``."""

    @abc.abstractmethod
    async def _start(self, stream: Stream) -> None:
        """Start ``_read_loop(stream)`` in the background."""

    @abc.abstractmethod
    async def _end(self) -> None:
        """Stop the reader task (the stream is closed already)."""

    # ---------------------------------------------------------------- plumbing

    @property
    def closed(self) -> bool:
        return self.session.closed is not None

    @property
    def hello(self) -> HelloResult | None:
        """The daemon's latest ``hello`` answer (a new one after each reconnection)."""
        return self.session.hello

    def _hello_args(self) -> Hello:
        return Hello(version=PROTOCOL_VERSION, client=f"{self.name}/{__version__}")

    async def open(self) -> None:
        """Connect and say hello; raises UnavailableError when no daemon listens."""
        sock, self.socket_path = connect_socket(self._where)
        self._stream = await self._wrap(sock)
        await self._start(self._stream)
        try:
            self.session.hello = await self.call("hello", self._hello_args())
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection; the daemon releases this client's session leases
        and cancels its waiting requests. Stops a reconnection under way."""
        self.session.close("client closed")
        if self._stream is not None:
            await self._shielded(self._stream.aclose)
        await self._end()

    aclose = close

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(self, op: str, args: Any) -> Any:
        """Send one request and wait for its typed result; raises ResdError subclasses."""
        return await self._run(flows.call(self, op, args))

    async def call_raw(self, op: str, args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply frame, as it came."""
        frame: dict[str, Any] = await self._run(flows.call(self, op, args, raw=True))
        return frame

    async def _run(self, flow: Flow[T], *, shielded: bool = False) -> T:
        runner = Runner(flow)
        while (need := runner.next()) is not None:
            try:
                if shielded or runner.cleaning or isinstance(need, Send):
                    value = await self._shielded(functools.partial(self._perform, need))
                else:
                    value = await self._perform(need)
                runner.done(value)
            except BaseException as exc:  # cancellation too: the flow cleans up
                runner.failed(exc)
        return runner.result

    async def _perform(self, need: Need) -> Any:
        if isinstance(need, Send):
            if self._stream is None:
                raise UnavailableError("not connected: use 'async with Client(...)'")
            async with self._send_lock:
                if self.session.sending(need.call):
                    stream = self._stream
                    try:
                        await stream.send_all(need.data)
                    except OSError as exc:
                        await self._broken(
                            stream, need.call.epoch, f"sending to resd failed: {exc}"
                        )
            return None
        if isinstance(need, Reply):
            if not await self._wait(cast(AsyncFlag, need.call.done), self.timeout):
                raise self.session.abandon(need.call, self.timeout)
            return need.outcome()
        if isinstance(need, Reconnect):
            await self._wait(cast(AsyncFlag, need.flag), None)
            return None
        return await self._wait(cast(AsyncFlag, need.flag), need.timeout)

    async def _broken(self, stream: Stream, epoch: int, reason: str) -> None:
        """A write on ``stream`` (connection ``epoch``) failed: drop that connection;
        the reader sees it end and reconnects (or the session closes)."""
        if self.reconnect <= 0:
            self.session.close(reason)
        elif self.session.epoch == epoch:
            self.session.disconnect(reason)
        with contextlib.suppress(OSError):
            await stream.aclose()

    def _new_lease(self, info: ReservationInfo, on_reclaim: OnReclaim | None) -> Lease:
        return Lease(self, info, on_reclaim)

    async def _read_loop(self, stream: Stream) -> None:
        """The reader task: feeds the session; reconnects when the connection ends;
        never raises (when it stops, whatever the cause, the session closes, which
        fails what waits)."""
        reason = "resd closed the connection"
        try:
            current: Stream | None = stream
            while current is not None:
                reason = await self._read(current)
                if self.closed or self.reconnect <= 0:
                    break
                self.session.disconnect(reason)
                current = await self._reconnect(reason)
        except Exception as exc:  # a bug here must not cancel the caller's block
            log.exception("resd client reader failed")
            reason = f"the client's reader failed: {exc!r}"
        finally:
            self.session.close(reason)

    async def _read(self, stream: Stream) -> str:
        """Feed what ``stream`` brings to the session until it ends; returns why."""
        try:
            while data := await stream.receive_some(1 << 16):
                self.session.receive(data)
        except (OSError, FrameTooLarge, BadFrame) as exc:
            return f"connection to resd failed: {exc}"
        return "resd closed the connection"

    async def _reconnect(self, reason: str) -> Stream | None:
        """Connect again and resume, with capped back-off, for at most ``reconnect``
        seconds; the resumed stream, or None (closed, refused, or given up: then the
        session is closed)."""
        deadline = self._now() + self.reconnect
        delays = backoff()
        attempt = 0
        while not self.closed:
            attempt += 1
            stream = await self._resume(attempt)
            if stream is not None:
                return stream
            left = deadline - self._now()
            if left <= 0:
                self.session.close(
                    f"{reason}; gave up reconnecting after {self.reconnect:g}s"
                    f" ({attempt} attempt{'s' if attempt != 1 else ''})"
                )
                break
            await self._sleep(min(next(delays), left))
        return None

    async def _resume(self, attempt: int) -> Stream | None:
        """One attempt: connect, send what ``Session.resume`` gives, and read until
        every reply of the resumption came; the stream, or None when it failed."""
        try:
            # a Unix socket connects at once or fails at once; the timeout is a guard
            sock, _ = connect_socket(self.socket_path, timeout=min(self.timeout, CONNECT_TIMEOUT))
        except UnavailableError:
            return None
        try:
            stream = await self._wrap(sock)
        except OSError:
            sock.close()
            return None
        try:
            async with self._send_lock:
                if self.closed:
                    raise OSError("client closed")
                data = self.session.resume(self._hello_args(), attempt)
                old, self._stream = self._stream, stream
            if old is not None:
                with contextlib.suppress(OSError):
                    await self._shielded(old.aclose)
            await stream.send_all(data)
            while self.session.resuming:
                chunk = await self._within(
                    self.timeout, functools.partial(stream.receive_some, 1 << 16)
                )
                if not chunk:
                    raise OSError("resd closed the connection")
                self.session.receive(chunk)
                more = self.session.resume_frames()
                if more:
                    await stream.send_all(more)
        except (OSError, FrameTooLarge, BadFrame) as exc:
            self.session.disconnect(f"reconnecting failed: {exc}")
            with contextlib.suppress(OSError):
                await self._shielded(stream.aclose)
            return None
        except BaseException:
            with contextlib.suppress(OSError):
                await self._shielded(stream.aclose)
            raise
        return None if self.closed else stream

    def _on_push(self, event: Any) -> None:
        self._queued.append(event)
        self._arrived.set()

    def _on_close(self) -> None:
        self._arrived.set()

    # ---------------------------------------------------------------- the API

    def reserve(
        self,
        pool: str | None = None,
        *,
        wait: bool = True,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[ReserveOptions],
    ) -> LeaseRequest:
        """Reserve, waiting (by default) until granted: ``lease = await
        client.reserve(...)`` or ``async with client.reserve(...) as lease:``.

        As the sync ``Client.reserve``; a cancelled wait is cancelled at the daemon
        (shielded) before the cancellation goes on. ``on_reclaim(lease)`` runs in the
        reader task. Bad arguments raise InvalidError here, before any await.
        """
        return LeaseRequest(self, reserve_args(pool, wait=wait, **options), on_reclaim)

    async def try_reserve(
        self,
        pool: str | None = None,
        *,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[ReserveOptions],
    ) -> Lease | None:
        """Reserve now without waiting; None when it does not fit or conflicts."""
        args = reserve_args(pool, wait=False, **options)
        return await self._run(flows.try_reserve(flows.reserve(self, args, on_reclaim)))

    def reserve_gang(
        self,
        parts: Sequence[GangPart | Part],
        *,
        wait: bool = True,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[GangOptions],
    ) -> LeaseRequest:
        """Reserve a gang, several parts granted all or nothing as one lease: ``lease
        = await client.reserve_gang([...])`` or ``async with client.reserve_gang([...])
        as lease:``.

        As the sync ``Client.reserve_gang`` (``parts``: dicts such as ``{"pool": "a",
        "gpu": 2}``, or ``Part``s; options apply to the whole gang) and as
        ``reserve`` otherwise. Bad parts raise InvalidError here, before any await.
        """
        return LeaseRequest(self, gang_args(parts, wait=wait, **options), on_reclaim)

    async def try_reserve_gang(
        self,
        parts: Sequence[GangPart | Part],
        *,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[GangOptions],
    ) -> Lease | None:
        """Reserve a gang now without waiting; None when a part does not fit or conflicts."""
        args = gang_args(parts, wait=False, **options)
        return await self._run(flows.try_reserve(flows.reserve(self, args, on_reclaim)))

    async def request(
        self,
        args: Reserve,
        on_reclaim: OnReclaim | None = None,
        on_pending: Callable[[ReservationInfo], object] | None = None,
    ) -> Lease:
        """``reserve`` with prebuilt arguments (internal units; ``args.wait`` decides;
        a ``Reserve`` with ``parts`` is a gang)."""
        return await self._run(flows.reserve(self, args, on_reclaim, on_pending))

    async def release(self, reservation_id: str) -> ReservationInfo:
        """Release a reservation, or cancel a waiting request (state ``cancelled``)."""
        return await self._run(flows.release(self, reservation_id))

    async def renew(self, reservation_id: str, ttl: float | None = None) -> ReservationInfo:
        return await self._run(flows.renew(self, reservation_id, ttl))

    async def resize(
        self,
        reservation_id: str,
        *,
        wait: bool = False,
        on_pending: Callable[[ReservationInfo], object] | None = None,
        **options: Unpack[ResizeOptions],
    ) -> ReservationInfo:
        """Give a lease new amounts in place; returns it with them. As the sync
        ``Client.resize``: with ``wait`` a growth that does not fit waits until
        granted; a cancelled wait is cancelled at the daemon (shielded) before the
        cancellation goes on. Bad arguments raise InvalidError before any await."""
        return await self.request_resize(
            resize_args(reservation_id, wait=wait, **options), on_pending
        )

    async def request_resize(
        self, args: Resize, on_pending: Callable[[ReservationInfo], object] | None = None
    ) -> ReservationInfo:
        """``resize`` with prebuilt arguments (internal units; ``args.wait`` decides)."""
        return await self._run(flows.resize(self, args, on_pending=on_pending))

    async def status(self) -> Status:
        return await self._run(flows.status(self))

    async def subscribe(self, topics: Iterable[str] = ("state",)) -> Status:
        """Ask for pushes of ``topics``, read with ``events()``: ``state`` (a
        ``StateEvent`` after each change), ``top`` (a ``TopEvent`` every sample
        interval). After a reconnection it subscribes again by itself."""
        return await self._run(flows.subscribe(self, topics))

    async def register(
        self, reservation_id: str, pid: int, *, confine: bool = False
    ) -> ReservationInfo:
        """Count process ``pid`` (and its descendants) as the lease's, for resd's GPU
        accounting (SPEC §10); ``resctl run`` registers its CMD, confined (``confine``)
        in a cgroup with the lease's CPU and memory limits where the host allows."""
        return await self._run(flows.register(self, reservation_id, pid, confine))

    async def top(self) -> TopSnapshot:
        """Every lease's live use (CPU, RSS, GPU memory and utilization, marks), as
        of resd's last sample."""
        return await self._run(flows.top(self))

    async def why(self, reservation_id: str) -> WaitInfo:
        """Why a request waits: its queue position and what it waits for."""
        return await self._run(flows.why(self, reservation_id))

    async def plan(
        self,
        pool: str | None = None,
        *,
        request: Reserve | None = None,
        priority: int | None = None,
        wait: bool = True,
        **options: Unpack[ReserveOptions],
    ) -> PlanResult:
        """Would this request fit, wait, or preempt whom? Changes nothing."""
        return await self._run(flows.plan(self, pool, request, priority, wait, dict(options)))

    def events(self) -> AsyncIterator[Any]:
        """Pushed events as they arrive, with the ``Disconnected`` / ``Reconnected``
        notices (at most ``MAX_QUEUED_EVENTS`` kept unread): ``async for event in
        client.events():``; ends when the session closes (closed, or reconnecting
        gave up)."""
        return _Events(self)

    async def list(
        self, pool: str | None = None, tenant: str | None = None, *, pending: bool = False
    ) -> builtins.list[ReservationInfo]:
        """Active reservations, or with ``pending`` the waiting requests in queue order."""
        return await self._run(flows.listing(self, pool, tenant, pending))


__all__ = ["AsyncClient", "Lease", "LeaseRequest"]
