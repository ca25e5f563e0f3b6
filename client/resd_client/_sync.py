"""The synchronous client: one Unix socket, a reader thread, leases.

Requests may be issued from several threads; replies are matched by id. The reader
thread feeds what it reads to the connection's ``Session`` (``_core``), which
completes calls and applies pushes (``granted``, ``reclaim``, ``expired``,
``preempted``, ``released``, ``marked``, ``resized``) to the leases they concern; every push,
``state`` and ``top`` too, is also queued for ``events()``. Lease callbacks
(``on_event``, ``on_reclaim``) run on a separate callback thread, one at a time in
push order, so a callback may call the client (``lease.release()``) without
stalling the reader; their exceptions are logged (logger ``resd_client``) and
ignored. Failures of the socket become
``UnavailableError``; error replies become the typed exceptions of ``errors``.

When the connection ends unexpectedly (resd restarted, or crashed) the reader
thread reconnects by itself, with capped exponential back-off for at most
``reconnect`` seconds, and resumes the session (``_core``: every lease and wait is
re-attached by its token, ``subscribe`` renewed); calls made meanwhile wait for it.
``events()`` gets ``Disconnected`` and ``Reconnected`` notices. When it gives up,
the session closes as it did at once before: waits fail, ``events()`` ends.
"""

from __future__ import annotations

import _thread
import builtins
import contextlib
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar, Unpack, cast

from resd_client import _core as flows
from resd_client._core import (
    ConnectionLost,
    Disconnected,
    Flow,
    GangOptions,
    GangPart,
    LeaseState,
    Need,
    Reconnect,
    Reconnected,
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
    resources_from,
)
from resd_client._version import __version__
from resd_client.errors import InvalidError, UnavailableError
from resd_client.paths import socket_candidates
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
    StateEvent,
    Status,
    TopSnapshot,
    WaitInfo,
)

T = TypeVar("T")
OnReclaim = Callable[["Lease"], object]
log = logging.getLogger("resd_client")

#: how long a client keeps trying to reconnect by default (seconds); ``RESD_RECONNECT``
#: overrides it, ``0`` turns reconnecting off
DEFAULT_RECONNECT: Final = 120.0
#: back-off between reconnection attempts: the first delay, doubled up to the cap
RECONNECT_FIRST: Final = 0.05
RECONNECT_CAP: Final = 1.0
#: how long one reconnection attempt may take to connect
CONNECT_TIMEOUT: Final = 2.0


def reconnect_limit(reconnect: float | None) -> float:
    """``reconnect``, or ``$RESD_RECONNECT``, or ``DEFAULT_RECONNECT`` (seconds ≥ 0).

    Raises InvalidError for a ``RESD_RECONNECT`` that is not a number of seconds.
    """
    if reconnect is None:
        raw = os.environ.get("RESD_RECONNECT", "").strip()
        try:
            reconnect = float(raw) if raw else DEFAULT_RECONNECT
        except ValueError:
            raise InvalidError(
                f"RESD_RECONNECT must be a number of seconds, got {raw!r}",
                {"field": "RESD_RECONNECT"},
            ) from None
    if not reconnect >= 0:  # NaN too
        raise InvalidError(
            f"reconnect must be 0 or more seconds, got {reconnect!r}", {"field": "reconnect"}
        )
    return reconnect


def backoff(first: float = RECONNECT_FIRST, cap: float = RECONNECT_CAP) -> Iterator[float]:
    """Delays between reconnection attempts: ``first``, doubling, at most ``cap``."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


#: names one more uid (a number or a user name) whose daemon clients accept, besides
#: root and their own
DAEMON_UID_ENV: Final = "RESD_DAEMON_UID"


def trusted_daemon_uids(daemon_uid: int | str | None = None) -> frozenset[int]:
    """The uids a daemon may run as: root, this process's real and effective uid,
    and ``daemon_uid`` (else ``$RESD_DAEMON_UID``) when given.

    Raises InvalidError for a user name that does not exist or a negative uid.
    """
    uids = {0, os.getuid(), os.geteuid()}
    raw: int | str | None = daemon_uid
    if raw is None:
        raw = os.environ.get(DAEMON_UID_ENV, "").strip() or None
    if raw is not None:
        field = "daemon_uid" if daemon_uid is not None else DAEMON_UID_ENV
        if isinstance(raw, int) or raw.isdigit():
            uid = int(raw)
        else:
            import pwd

            try:
                uid = pwd.getpwnam(raw).pw_uid
            except KeyError:
                raise InvalidError(
                    f"{field}: no user {raw!r}; give a uid or a user name", {"field": field}
                ) from None
        if uid < 0:
            raise InvalidError(f"{field}: {uid} is not a uid", {"field": field})
        uids.add(uid)
    return frozenset(uids)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process that listens at the other end (SO_PEERCRED, which the
    kernel fills in at connect); None where the platform has no SO_PEERCRED."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def connect_socket(
    path: str | os.PathLike[str] | None = None,
    timeout: float = 5.0,
    *,
    daemon_uid: int | str | None = None,
) -> tuple[socket.socket, Path]:
    """Connect to the first listening daemon among the candidate paths that runs as
    a trusted uid (``trusted_daemon_uids``: root, this user, ``daemon_uid`` or
    ``$RESD_DAEMON_UID``). The daemon's uid is checked before anything is sent, so
    a socket planted by another user learns nothing; it counts as a failed
    candidate (and a failed attempt when reconnecting).

    Raises UnavailableError saying where it looked and which daemon it refused;
    InvalidError for a bad ``daemon_uid``.
    """
    trusted = trusted_daemon_uids(daemon_uid)
    tried: list[str] = []
    refused: list[dict[str, Any]] = []
    for candidate in socket_candidates(path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(candidate))
            uid = peer_uid(sock)
        except OSError as exc:
            sock.close()
            tried.append(f"{candidate} ({exc.strerror or exc})")
            continue
        if uid is not None and uid not in trusted:
            sock.close()
            tried.append(f"{candidate} (answered by uid {uid}, refused)")
            refused.append({"socket": str(candidate), "uid": uid})
            log.warning("refused the resd at %s: it runs as uid %d", candidate, uid)
            continue
        sock.settimeout(None)
        return sock, candidate
    if refused:
        first = refused[0]
        mine = os.geteuid()
        raise UnavailableError(
            f"refusing the resd at {first['socket']}: it runs as uid {first['uid']}, not as "
            f"root or you (uid {mine}), so another user may be impersonating resd. If that "
            f"daemon is the one you mean, set {DAEMON_UID_ENV}={first['uid']}; tried "
            + ", ".join(tried),
            {"tried": tried, "refused": refused, "trusted": sorted(trusted)},
        )
    raise UnavailableError(
        "no resd daemon is listening; tried "
        + ", ".join(tried)
        + ". Start one with 'resd', or point to it with --socket or RESD_SOCKET.",
        {"tried": tried},
    )


class Signal:
    """A ``threading.Event`` that is set once and never cleared, on one bare lock,
    held until ``set``: an Event is a Condition, a lock and a new lock per wait,
    several µs per request. The ``Flag`` of each call and lease of this client,
    which the thread that made it waits on (several may: each passes the lock on,
    but one interrupted in between would keep the others waiting)."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._set = False
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Whether it is set, waiting ``timeout`` seconds at most (None: for ever)."""
        if self._set:
            return True
        if timeout is None:
            got = self._lock.acquire()
        elif timeout > 0:
            got = self._lock.acquire(True, timeout)
        else:  # as an Event: 0 or less only looks
            got = self._lock.acquire(False)
        if got:
            self._release()  # the next waiter's turn
            return True
        return self._set

    def _release(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # two racing set() calls, or a set() between a waiter's
            pass  # acquire and release, find it free already: free is what both mean


class Lease(LeaseState):
    """A reservation held through a sync ``Client``; a context manager that releases
    on exit. State, ``ended``, ``reclaim_requested``, ``marks``, ``assigned`` and
    ``env``: see ``resd_client._core.LeaseState``."""

    def __init__(
        self, client: Client, info: ReservationInfo, on_reclaim: OnReclaim | None = None
    ) -> None:
        super().__init__(info, Signal(), on_reclaim)
        self.client = client

    @classmethod
    def track(cls, client: Client, info: ReservationInfo, token: str | None = None) -> Lease:
        """A lease for ``info``, granted by a raw ``client.call("reserve", ...)``,
        registered so that the daemon's pushes about it reach it; ``token``: the one
        that request carried, so that it is re-attached after a reconnection."""
        lease = cls(client, info)
        lease.token = token
        with client._lock:
            return client.session.track(lease)

    def release(self, *, wait: bool = True) -> None:
        """Release now; a lease that is already gone is left alone. While resd is
        away it waits for the reconnection; ``wait=False`` does not: it raises
        ConnectionLost and forgets the lease (resd lets a session lease nobody
        re-attaches go after its ``reattach_grace``)."""
        self.client._run(flows.release_lease(self.client, self, wait=wait))

    def renew(self, ttl: float | None = None) -> None:
        """Extend the TTL: expires ``ttl`` (default: its own ttl) seconds from now
        (``info`` is the reply, applied by the session as it was read)."""
        self.client._run(flows.renew(self.client, self.id, ttl))

    def register(self, pid: int, *, confine: bool = False) -> None:
        """Count process ``pid`` (and its descendants) as this lease's, for resd's GPU
        accounting (SPEC §10): a worker it started that holds GPU memory. ``confine``:
        put it in a cgroup limited to the lease's CPU and memory where the host allows
        (``info.enforcement`` then says ``cgroup``)."""
        self.client._run(flows.register(self.client, self.id, pid, confine))

    def resize(
        self,
        *,
        wait: bool = False,
        on_pending: Callable[[ReservationInfo], object] | None = None,
        **options: Unpack[ResizeOptions],
    ) -> ReservationInfo:
        """Give this lease new amounts (``lease.resize(cpu=4, memory="16G")``; what is
        not named stays); ``info`` then has them, and so does the result. As
        ``Client.resize``: ``wait=True`` blocks until a growth that does not fit now
        is granted (``timeout`` seconds at most; ``on_pending(info)`` runs once with
        the waiting request if it waits)."""
        args = resize_args(self.id, wait=wait, **options)
        return self.client._run(flows.resize(self.client, args, self, on_pending))

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.client.closed:
            return
        if exc is None or isinstance(exc, Exception):
            self.release()
            return
        # Ctrl-C or exit: release if connected, without waiting out an outage
        with contextlib.suppress(ConnectionLost):
            self.release(wait=False)


class Client:
    """Synchronous resd client. ``Client()`` finds the daemon like ``resctl`` does;
    ``timeout`` bounds each reply (not a wait for resources); ``reconnect`` is how
    many seconds it keeps trying to reconnect after losing the connection (None:
    ``$RESD_RECONNECT`` or 120; 0: never, the session closes at once)."""

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
        self._sock, self.socket_path = connect_socket(socket_path)
        self._lock = threading.Lock()  # guards the session
        self._send_lock = threading.Lock()  # one writer; held while the socket is swapped
        self._closing = threading.Event()  # close() began: the reader must not reconnect
        self._events: queue.Queue[Any] = queue.Queue()
        self._callbacks: queue.SimpleQueue[tuple[LeaseState, Any] | None] | None = None
        self.session = Session(
            on_push=self._events.put,
            on_lease=self._on_lease,
            on_close=self._on_close,
            new_flag=threading.Event,  # ``back``, which any number of threads await
        )
        self._reader = threading.Thread(
            target=self._read_loop, name="resd-client-reader", daemon=True
        )
        self._reader.start()
        try:
            self.session.hello = self.call("hello", self._hello_args())
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self.session.closed is not None

    @property
    def hello(self) -> HelloResult:
        """The daemon's latest ``hello`` answer (a new one after each reconnection)."""
        hello = self.session.hello
        assert hello is not None  # set before the constructor returns
        return hello

    def _hello_args(self) -> Hello:
        return Hello(version=PROTOCOL_VERSION, client=f"{self.name}/{__version__}")

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
            with self._send_lock:
                with self._lock:
                    live = self.session.sending(need.call)
                if live:
                    try:
                        self._sock.sendall(need.data)
                    except OSError as exc:
                        self._broken(self._sock, need.call.epoch, f"sending to resd failed: {exc}")
            return None
        if isinstance(need, Reply):
            if not cast(Signal, need.call.done).wait(self.timeout):
                with self._lock:
                    raise self.session.abandon(need.call, self.timeout)
            return need.outcome()
        if isinstance(need, Reconnect):
            cast(threading.Event, need.flag).wait()
            return None
        return cast(Signal, need.flag).wait(need.timeout)

    def _new_flag(self) -> Signal:
        return Signal()

    def _new_lease(self, info: ReservationInfo, on_reclaim: OnReclaim | None) -> Lease:
        return Lease(self, info, on_reclaim)

    def _broken(self, sock: socket.socket, epoch: int, reason: str) -> None:
        """A write on ``sock`` (connection ``epoch``) failed: drop that connection; the
        reader sees it end and reconnects (or closes the session)."""
        if self.reconnect <= 0:
            self._close_session(reason)
        else:
            with self._lock:
                if self.session.epoch == epoch:
                    self.session.disconnect(reason)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    # ---------------------------------------------------------------- the reader

    def _read_loop(self) -> None:
        """The reader thread: feeds the session; reconnects when the connection ends
        (unless closing); closes the session when it stops, whatever the cause."""
        reason = "resd closed the connection"
        try:
            sock: socket.socket | None = self._sock
            while sock is not None:
                reason = self._read(sock)
                if self._closing.is_set() or self.reconnect <= 0:
                    break
                with self._lock:
                    self.session.disconnect(reason)
                sock = self._reconnect(reason)
            if self._closing.is_set():
                reason = "client closed"
        except Exception as exc:  # a bug here must not leave callers waiting for ever
            log.exception("resd client reader failed")
            reason = f"the client's reader failed: {exc!r}"
        finally:
            self._close_session(reason)

    def _read(self, sock: socket.socket) -> str:
        """Feed what ``sock`` brings to the session until it ends; returns why."""
        try:
            while data := sock.recv(1 << 16):
                with self._lock:
                    self.session.receive(data)
        except (OSError, FrameTooLarge, BadFrame) as exc:
            return f"connection to resd failed: {exc}"
        return "resd closed the connection"

    def _reconnect(self, reason: str) -> socket.socket | None:
        """Connect again and resume, with capped back-off, for at most ``reconnect``
        seconds; the resumed socket, or None (closing, refused, or given up: then the
        session is closed)."""
        deadline = time.monotonic() + self.reconnect
        delays = backoff()
        attempt = 0
        while not self._closing.is_set() and not self.closed:
            attempt += 1
            sock = self._resume(attempt)
            if sock is not None:
                return sock
            left = deadline - time.monotonic()
            if left <= 0:
                self._close_session(
                    f"{reason}; gave up reconnecting after {self.reconnect:g}s"
                    f" ({attempt} attempt{'s' if attempt != 1 else ''})"
                )
                break
            self._closing.wait(min(next(delays), left))
        return None

    def _resume(self, attempt: int) -> socket.socket | None:
        """One attempt: connect, send what ``Session.resume`` gives, and read until
        every reply of the resumption came; the socket, or None when it failed."""
        try:
            sock, _ = connect_socket(self.socket_path, timeout=min(self.timeout, CONNECT_TIMEOUT))
        except UnavailableError:
            return None
        with self._send_lock:
            with self._lock:
                if self.closed:
                    sock.close()
                    return None
                data = self.session.resume(self._hello_args(), attempt)
            old, self._sock = self._sock, sock
        old.close()
        if self._closing.is_set():  # close() may have shut the old socket, not this one
            sock.close()
            return None
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
            while True:
                with self._lock:
                    more = self.session.resume_frames()
                    resuming = self.session.resuming
                if more:
                    sock.sendall(more)
                if not resuming:
                    break
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise OSError("resd closed the connection")
                with self._lock:
                    self.session.receive(chunk)
            sock.settimeout(None)
        except (OSError, FrameTooLarge, BadFrame) as exc:
            with self._lock:
                self.session.disconnect(f"reconnecting failed: {exc}")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return None
        return None if self.closed else sock

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
        and cancels its waiting requests. Stops a reconnection under way."""
        self._closing.set()
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

    def reserve_gang(
        self,
        parts: Sequence[GangPart | Part],
        *,
        wait: bool = True,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[GangOptions],
    ) -> Lease:
        """Reserve a gang: several parts granted all or nothing, as one ``Lease``.

        ``parts``: 2 to 16, each a dict of one pool and what it is asked for there,
        in the quantities of ``reserve`` (``[{"pool": "a", "gpu": 2}, {"pool": "b",
        "cpu": 4, "memory": "8G"}]``), or a ``Part``. Options (``GangOptions``: ttl,
        binding, label, timeout, ...) apply to the whole gang. The lease's ``id``
        releases it all; its ``info`` has the parts' amounts, members and devices
        together (so ``env`` names every GPU of the gang), ``info.pool`` their pools
        comma-joined and ``info.parts`` each part. It waits, expires, is preempted
        and released as a whole; it cannot be resized. As ``reserve`` otherwise;
        a refusal names the part (``parts[1]: ...``). Bad parts raise InvalidError
        (TypeError for an unknown key) before anything is sent.
        """
        return self.request(gang_args(parts, wait=wait, **options), on_reclaim)

    def try_reserve_gang(
        self,
        parts: Sequence[GangPart | Part],
        *,
        on_reclaim: OnReclaim | None = None,
        **options: Unpack[GangOptions],
    ) -> Lease | None:
        """Reserve a gang now without waiting; None when a part does not fit or conflicts."""
        args = gang_args(parts, wait=False, **options)
        return self._run(flows.try_reserve(flows.reserve(self, args, on_reclaim)))

    def request(
        self,
        args: Reserve,
        on_reclaim: OnReclaim | None = None,
        on_pending: Callable[[ReservationInfo], object] | None = None,
    ) -> Lease:
        """``reserve`` with prebuilt arguments (internal units; ``args.wait`` decides;
        a ``Reserve`` with ``parts`` is a gang)."""
        return self._run(flows.reserve(self, args, on_reclaim, on_pending))

    def release(self, reservation_id: str) -> ReservationInfo:
        """Release a reservation, or cancel a waiting request (state ``cancelled``)."""
        return self._run(flows.release(self, reservation_id))

    def renew(self, reservation_id: str, ttl: float | None = None) -> ReservationInfo:
        return self._run(flows.renew(self, reservation_id, ttl))

    def resize(
        self,
        reservation_id: str,
        *,
        wait: bool = False,
        on_pending: Callable[[ReservationInfo], object] | None = None,
        **options: Unpack[ResizeOptions],
    ) -> ReservationInfo:
        """Give a lease new amounts in place; returns it with them. TTL and binding
        do not change.

        Options: ``ResizeOptions`` (``cpu=4``, ``memory="16G"``, ``gpu=1``,
        ``resources={"ports": 2}``, 0 giving a resource all back; ``give_back``
        names the members or values that go). Shrinking always succeeds. Growing
        that does not fit raises InsufficientError (QuotaExceededError past a max),
        unless ``wait``: then it waits, keeping what it holds (``on_pending(info)``
        gets the waiting request, whose id cancels it by ``release``), until resd
        grants it, or raises TimeoutError_ after ``timeout``. A KeyboardInterrupt
        while waiting cancels the wait at the daemon. A lost connection raises
        ConnectionLost (the change may or may not have been made; it is never sent
        twice). Also InvalidError, NotFoundError, ForbiddenError, ConflictError.
        """
        args = resize_args(reservation_id, wait=wait, **options)
        return self.request_resize(args, on_pending)

    def request_resize(
        self, args: Resize, on_pending: Callable[[ReservationInfo], object] | None = None
    ) -> ReservationInfo:
        """``resize`` with prebuilt arguments (internal units; ``args.wait`` decides)."""
        return self._run(flows.resize(self, args, on_pending=on_pending))

    def status(self) -> Status:
        return self._run(flows.status(self))

    def subscribe(self, topics: Iterable[str] = ("state",)) -> Status:
        """Ask for pushes of ``topics``, read with ``events()``: ``state`` (a
        ``StateEvent`` after each change), ``top`` (a ``TopEvent`` every sample
        interval). After a reconnection it subscribes again by itself."""
        return self._run(flows.subscribe(self, topics))

    def register(self, reservation_id: str, pid: int, *, confine: bool = False) -> ReservationInfo:
        """Count process ``pid`` (and its descendants) as the lease's, for resd's GPU
        accounting (SPEC §10); ``resctl run`` registers its CMD, confined (``confine``)
        in a cgroup with the lease's CPU and memory limits where the host allows."""
        return self._run(flows.register(self, reservation_id, pid, confine))

    def top(self) -> TopSnapshot:
        """Every lease's live use (CPU, RSS, GPU memory and utilization, marks), as
        of resd's last sample."""
        return self._run(flows.top(self))

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
        """Pushed events as they arrive, with the ``Disconnected`` / ``Reconnected``
        notices; ends when the session closes (closed, or reconnecting gave up), or
        when none came for ``timeout`` seconds."""
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


__all__ = [
    "Client",
    "ConnectionLost",
    "Disconnected",
    "Lease",
    "Reconnected",
    "StateEvent",
    "connect_socket",
    "peer_uid",
    "reconnect_limit",
    "resources_from",
    "trusted_daemon_uids",
]
