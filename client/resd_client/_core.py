"""The client side of the protocol, free of I/O: one ``Session`` and its ``flows``,
shared by the sync, trio and asyncio clients (standard library + msgpack only).

A client owns a ``Session`` and moves bytes: ``Session.ask`` numbers a request and
gives the frame to send; ``Session.receive`` takes the bytes read from the socket,
completes the matching ``Call`` (its ``done`` flag is set; ``Call.result`` decodes
the typed result or raises the typed error) and routes pushes to the ``LeaseState``
they concern. A push about a reservation this session does not track yet (a
``granted`` that overtook the ``pending`` reply) waits in a small buffer and is
applied when the lease is tracked.

The operations themselves are *flows*: generators that yield what they need done
(``Send`` a request, wait for its ``Reply``, ``Await`` a lease leaving ``pending``)
and get the outcome sent back, or the exception thrown in. A client drives a flow
with ``Runner`` and its own I/O. Waiting, and cancelling a wait that was interrupted (a KeyboardInterrupt, a
trio or asyncio cancellation thrown into the flow), are written once, here.

Lease states: ``pending`` (queued, ``wait=True``) → ``active`` (granted; it may be
asked to give its resources back: ``reclaim_requested``, ``preempt_deadline``) →
ended, with ``ended`` saying why: ``released``, ``expired``, ``preempted``,
``cancelled`` (a wait given up here), ``denied`` (a wait ended by the daemon,
``error`` says why) or ``closed`` (the connection ended while it waited).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, Final, Generic, Protocol, TypedDict, TypeVar

from resd_client.env import GpuIds, lease_env
from resd_client.env import assigned as _assigned
from resd_client.errors import (
    ConflictError,
    InsufficientError,
    InternalError,
    NotFoundError,
    ResdError,
    TimeoutError_,
    UnavailableError,
    error_from_wire,
)
from resd_client.protocol import (
    RESULTS,
    Binding,
    DeniedEvent,
    Empty,
    ExpiredEvent,
    FrameDecoder,
    ListReservations,
    Placement,
    Plan,
    PlanResult,
    PreemptedEvent,
    ReclaimEvent,
    Renew,
    ReservationInfo,
    ReservationList,
    ReservationRef,
    Reserve,
    Status,
    Subscribe,
    WaitInfo,
    decode_event,
    encode_frame,
    from_wire,
    request,
)
from resd_client.quantity import parse_quantity

log = logging.getLogger("resd_client")

T = TypeVar("T")
L = TypeVar("L", bound="LeaseState")
L_co = TypeVar("L_co", bound="LeaseState", covariant=True)

#: how many reservation ids may have early pushes buffered, and how many each
EARLY_IDS: Final = 64
EARLY_PER_ID: Final = 16
#: replies may carry big lists (export); the daemon bounds what it accepts, not this
MAX_REPLY_FRAME: Final = 64 << 20


class Flag(Protocol):
    """What the session sets when something completes: a ``threading.Event``, a
    ``trio.Event`` or an ``asyncio.Event``."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...


# ------------------------------------------------------------------ arguments


class ReserveOptions(TypedDict, total=False):
    """Keyword arguments of ``reserve``, ``try_reserve`` and ``plan`` (all clients).

    Amounts take human quantities (``cpu=1.5``, ``memory="8G"``, ``vram="20G"``,
    ``resources={"licenses": 2}``); ``members`` names set members or range values
    (``{"gpu": ["0", "3"]}``, ``{"ports": ["30000-30009"]}``). ``binding`` defaults to
    ``session``, or to ``pid`` when ``pid`` is given; ``timeout`` (seconds) bounds a
    wait; ``deadline`` (Unix time) ranks waiters.
    """

    cpu: object
    memory: object
    gpu: object
    vram: object
    resources: Mapping[str, object]
    members: Mapping[str, Sequence[str | int]]
    contiguous: Sequence[str]
    constraints: Mapping[str, str]
    selector: Mapping[str, str]
    placement: Placement | None
    tenant: str | None
    ttl: float | None
    binding: Binding
    pid: int | None
    label: str
    reclaimable: bool
    timeout: float | None
    deadline: float | None


def resources_from(
    cpu: object = None,
    memory: object = None,
    gpu: object = None,
    resources: Mapping[str, object] | None = None,
    vram: object = None,
) -> dict[str, int]:
    """Internal-unit amounts from human quantities (``memory="8G"``, ``cpu=1.5``);
    raises InvalidError naming the bad one."""
    out: dict[str, int] = {}
    for name, value in (("cpu", cpu), ("memory", memory), ("gpu", gpu), ("vram", vram)):
        if value is not None:
            out[name] = parse_quantity(name, value)
    for name, value in (resources or {}).items():
        out[name] = parse_quantity(name, value)
    return out


def reserve_args(pool: str | None = None, *, wait: bool, **options: Any) -> Reserve:
    """The checked ``Reserve`` for ``reserve(pool, wait=..., **options)``.

    ``options`` are those of ``ReserveOptions``; raises InvalidError (checked here,
    before anything is sent) and TypeError for an unknown keyword.
    """
    unknown = sorted(set(options) - set(ReserveOptions.__annotations__))
    if unknown:
        raise TypeError(f"unexpected reserve argument(s): {', '.join(unknown)}")
    opt: ReserveOptions = options  # type: ignore[assignment]
    pid = opt.get("pid")
    args = Reserve(
        pool=pool,
        resources=resources_from(
            opt.get("cpu"), opt.get("memory"), opt.get("gpu"), opt.get("resources"), opt.get("vram")
        ),
        tenant=opt.get("tenant"),
        ttl=opt.get("ttl"),
        binding=opt.get("binding") or ("session" if pid is None else "pid"),
        label=opt.get("label", ""),
        reclaimable=opt.get("reclaimable", False),
        members={k: [str(v) for v in vs] for k, vs in (opt.get("members") or {}).items()},
        contiguous=list(opt.get("contiguous") or []),
        constraints=dict(opt.get("constraints") or {}),
        selector=dict(opt.get("selector") or {}),
        placement=opt.get("placement"),
        wait=wait,
        timeout=opt.get("timeout"),
        deadline=opt.get("deadline"),
        pid=pid,
    )
    args.check()
    return args


def wait_limit(args: Reserve, margin: float) -> float | None:
    """How long a client waits for the daemon to decide a queued ``args``: its
    ``timeout`` plus ``margin`` (the daemon pushes ``denied`` when the timeout passes;
    the margin only guards against a daemon that never says), or for ever."""
    return None if args.timeout is None else args.timeout + margin


# ---------------------------------------------------------------------- leases


class LeaseState:
    """One reservation as this connection sees it (see the module doc for states).

    The base of each client's ``Lease``; the session is its only writer. ``info`` is
    the latest ``ReservationInfo``; ``on_event(event)`` runs after every push about
    it, ``on_reclaim(lease)`` after a ``reclaim`` push (where: see the client).
    """

    def __init__(
        self,
        info: ReservationInfo,
        settled: Flag,
        on_reclaim: Callable[[Any], object] | None = None,
    ) -> None:
        self.info = info
        self.ended: str | None = None
        self.error: ResdError | None = None
        self.reclaim_requested = False
        self.preempt_deadline: float | None = None
        self.on_event: Callable[[Any], object] | None = None
        self.on_reclaim = on_reclaim
        self._settled = settled
        if info.state != "pending":
            settled.set()

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def pending(self) -> bool:
        """Queued and not yet decided."""
        return self.info.state == "pending" and self.ended is None

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

    def _apply(self, event: Any) -> None:
        if isinstance(event, DeniedEvent):
            if self.pending:
                self.error = error_from_wire(event.error)
                self._end("denied")
            return
        self.info = event.reservation
        if isinstance(event, ReclaimEvent):
            self.reclaim_requested = True
            self.preempt_deadline = event.deadline
        elif isinstance(event, PreemptedEvent):
            if event.deadline is not None:  # the final notice has none: keep the one given
                self.preempt_deadline = event.deadline
            if event.reservation.state == "preempted":
                self._end("preempted")
        elif isinstance(event, ExpiredEvent):
            self._end("expired")
        if not self.pending:
            self._settled.set()

    def _end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
        self._settled.set()

    def _outcome(self: L) -> L:
        """This lease once its wait is over; raises the error that ended the wait."""
        if self.error is not None:
            raise self.error
        if self.pending:  # pragma: no cover - flows only ask once it settled
            raise InternalError(f"{self.id} is still waiting")
        return self

    def __repr__(self) -> str:
        state = self.ended or self.info.state
        return f"{type(self).__name__}({self.id}, {state}, pool={self.info.pool}, resources={self.info.resources})"


def notify(lease: LeaseState, event: Any) -> None:
    """Run ``lease``'s callbacks for ``event``; their exceptions are logged, never raised."""
    on_reclaim = lease.on_reclaim if isinstance(event, ReclaimEvent) else None
    for callback, arg in ((lease.on_event, event), (on_reclaim, lease)):
        if callback is None:
            continue
        try:
            callback(arg)
        except Exception:
            log.exception("a callback of lease %s failed on %s", lease.id, type(event).__name__)


# --------------------------------------------------------------------- session


@dataclasses.dataclass(eq=False, slots=True)
class Call:
    """One request in flight; ``frame`` is its reply once ``done`` is set."""

    id: int
    op: str
    done: Flag
    frame: dict[str, Any] | None = None

    def result(self) -> Any:
        """The typed result (``RESULTS[op]``); raises the typed error of an error reply."""
        frame = self.frame
        if frame is None:  # pragma: no cover - read only once done
            raise InternalError(f"{self.op} has no reply yet")
        if frame.get("ok") is True:
            return from_wire(RESULTS[self.op], frame.get("result"), "result")
        raise error_from_wire(frame.get("error"))


def _reservation_id(event: Any) -> str | None:
    if isinstance(event, DeniedEvent):
        return event.reservation_id
    reservation = getattr(event, "reservation", None)
    return reservation.id if isinstance(reservation, ReservationInfo) else None


class Session:
    """Protocol state of one connection; not thread-safe (the sync client locks it).

    ``on_push(event)`` gets every push as it arrives (after it was applied to its
    lease); ``on_lease(lease, event)`` each change a push made to a tracked lease
    (where the client runs callbacks); ``on_close()`` once, when the session closes.
    """

    def __init__(
        self,
        *,
        on_push: Callable[[Any], None],
        on_lease: Callable[[LeaseState, Any], None],
        on_close: Callable[[], None],
    ) -> None:
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._leases: dict[str, LeaseState] = {}
        self._early: OrderedDict[str, list[Any]] = OrderedDict()
        self._decoder = FrameDecoder(max_frame=MAX_REPLY_FRAME)
        self._on_push = on_push
        self._on_lease = on_lease
        self._on_close = on_close
        #: why the session closed; None while it is open
        self.closed: str | None = None

    # ---- requests

    def ask(self, op: str, args: Any, done: Flag) -> tuple[Call, bytes]:
        """Number a request; returns its ``Call`` and the frame to send.

        Raises UnavailableError when the session is closed.
        """
        if self.closed is not None:
            raise UnavailableError(f"the connection to resd is closed ({self.closed})")
        call = Call(next(self._ids), op, done)
        self._calls[call.id] = call
        return call, encode_frame(request(call.id, op, args))

    def abandon(self, call: Call, timeout: float) -> UnavailableError:
        """Forget a call whose reply did not come within ``timeout``; the error to raise."""
        self._calls.pop(call.id, None)
        return UnavailableError(
            f"resd did not answer {call.op} within {timeout:g}s", {"op": call.op}
        )

    # ---- bytes in

    def receive(self, data: bytes) -> None:
        """Take bytes read from the socket: complete calls, route pushes.

        Raises FrameTooLarge or BadFrame when the stream is unusable; the client then
        closes the connection and the session (``close``).
        """
        self._decoder.feed(data)
        for frame in self._decoder.frames():
            if "event" in frame:
                self._push(frame)
                continue
            rid = frame.get("id")
            call = self._calls.pop(rid, None) if isinstance(rid, int) else None
            if call is not None:
                call.frame = frame
                call.done.set()

    def _push(self, frame: dict[str, Any]) -> None:
        try:
            event = decode_event(frame)
        except ResdError as exc:  # a newer daemon's event: not ours to understand
            log.debug("ignoring push: %s", exc)
            return
        rid = _reservation_id(event)
        lease = self._leases.get(rid) if rid is not None else None
        if lease is not None:
            self._apply(lease, event)
        elif rid is not None:
            self._buffer(rid, event)
        self._on_push(event)

    def _buffer(self, rid: str, event: Any) -> None:
        events = self._early.setdefault(rid, [])
        self._early.move_to_end(rid)
        if len(events) < EARLY_PER_ID:
            events.append(event)
        while len(self._early) > EARLY_IDS:
            self._early.popitem(last=False)

    def _apply(self, lease: LeaseState, event: Any) -> None:
        lease._apply(event)
        if lease.ended is not None:
            self._leases.pop(lease.id, None)
        self._on_lease(lease, event)

    # ---- leases

    def track(self, lease: L) -> L:
        """Route pushes about ``lease`` to it from now on, and apply those that came
        before it was known."""
        self._leases[lease.id] = lease
        for event in self._early.pop(lease.id, []):
            self._apply(lease, event)
        return lease

    def lease(self, reservation_id: str) -> LeaseState | None:
        return self._leases.get(reservation_id)

    def ended(self, info: ReservationInfo) -> None:
        """``info`` (a ``release`` reply) ended its reservation here: ``cancelled``
        for a wait given up, else ``released``."""
        self._early.pop(info.id, None)
        lease = self._leases.pop(info.id, None)
        if lease is not None:
            lease.info = info
            lease._end("cancelled" if info.state == "cancelled" else "released")

    def updated(self, info: ReservationInfo) -> None:
        lease = self._leases.get(info.id)
        if lease is not None:
            lease.info = info

    # ---- the end

    def close(self, reason: str) -> None:
        """Fail every call in flight and every wait with UnavailableError(reason);
        idempotent."""
        if self.closed is not None:
            return
        self.closed = reason
        error = UnavailableError(reason)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.frame = {"id": call.id, "ok": False, "error": error.to_wire()}
            call.done.set()
        for lease in list(self._leases.values()):
            if lease.pending:
                lease.error = error
                lease._end("closed")
        self._on_close()


# ----------------------------------------------------------------------- flows


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` (the frame of ``call``) to the socket, whole; the outcome is
    None. An async client shields it, so that a cancellation never splits a frame
    nor loses a request that went out. A failed write closes the session."""

    call: Call
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """Wait for the reply to ``call`` (at most the client's ``timeout``: then
    ``Session.abandon``); the outcome is ``outcome()``."""

    call: Call
    raw: bool = False

    def outcome(self) -> Any:
        """The typed result (or the frame, ``raw``); raises the reply's error."""
        if self.raw:
            return self.call.frame
        return self.call.result()


@dataclasses.dataclass(frozen=True, slots=True)
class Await:
    """Wait until ``lease`` is no longer pending, at most ``timeout`` seconds (None:
    no limit); the outcome is whether it settled."""

    lease: LeaseState
    timeout: float | None


Need = Send | Reply | Await
Flow = Generator[Need, Any, T]


class Runner(Generic[T]):
    """Steps a flow for a client: ``next()`` gives what it needs (None once it is
    finished: ``result``), then the client reports ``done(value)`` or ``failed(exc)``.
    After a failure was thrown in, ``cleaning`` is true: what the flow still needs is
    cleanup, which an async client shields from cancellation."""

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self._value: Any = None
        self._error: BaseException | None = None
        self.cleaning = False
        self.result: T

    def next(self) -> Need | None:
        """Advance the flow; raises whatever the flow raises."""
        try:
            if self._error is None:
                return self._flow.send(self._value)
            error, self._error = self._error, None
            self.cleaning = True
            return self._flow.throw(error)
        except StopIteration as stop:
            self.result = stop.value
            return None

    def done(self, value: Any) -> None:
        self._value, self._error = value, None

    def failed(self, error: BaseException) -> None:
        self._value, self._error = None, error


class Host(Protocol[L_co]):
    """What flows need of a client: its session, its reply timeout, and flags and
    leases of its own kind."""

    session: Session
    timeout: float

    def _new_flag(self) -> Flag: ...

    def _new_lease(
        self, info: ReservationInfo, on_reclaim: Callable[[Any], object] | None
    ) -> L_co: ...


def send(host: Host[LeaseState], op: str, args: Any) -> Flow[Call]:
    """Number and send one request; raises UnavailableError when closed."""
    call, data = host.session.ask(op, args, host._new_flag())
    yield Send(call, data)
    return call


def call(host: Host[LeaseState], op: str, args: Any, *, raw: bool = False) -> Flow[Any]:
    """One request's typed result (or its reply frame, ``raw``)."""
    sent = yield from send(host, op, args)
    return (yield Reply(sent, raw))


def ask(host: Host[LeaseState], op: str, args: Any, result: type[T]) -> Flow[T]:
    """One request's result, checked to be a ``result``."""
    value = yield from call(host, op, args)
    if not isinstance(value, result):  # pragma: no cover - RESULTS decides the type
        raise InternalError(f"{op} answered {type(value).__name__}, not {result.__name__}")
    return value


def reserve(
    host: Host[L],
    args: Reserve,
    on_reclaim: Callable[[Any], object] | None = None,
    on_pending: Callable[[ReservationInfo], object] | None = None,
) -> Flow[L]:
    """Reserve; with ``args.wait``, wait until granted or denied. ``on_pending(info)``
    runs once if the request is queued (``info`` has its position and reason).

    Raises the daemon's refusal (InsufficientError, ConflictError, ...), and for a
    wait that ended ungranted its error (TimeoutError_ when ``timeout`` passed). An
    interruption (KeyboardInterrupt, cancellation) before the reply or during the
    wait is cleaned up first: the request is cancelled at the daemon, or what it got
    released, so nothing stays queued or held.
    """
    sent = yield from send(host, "reserve", args)
    try:
        info = yield Reply(sent)
    except ResdError:
        raise
    except BaseException:
        yield from _undo(host, sent)
        raise
    lease = host.session.track(host._new_lease(info, on_reclaim))
    if lease.pending:
        try:
            if on_pending is not None:
                on_pending(info)
            settled = yield Await(lease, wait_limit(args, host.timeout))
            if not settled:
                raise TimeoutError_(
                    f"resd did not decide {lease.id} within {args.timeout:g}s",
                    {"id": lease.id, "timeout": args.timeout},
                )
        except BaseException:
            yield from give_up(host, lease)
            raise
    return lease._outcome()


def _undo(host: Host[LeaseState], sent: Call) -> Flow[None]:
    """Release (or cancel) what an interrupted ``reserve`` got, once its reply comes."""
    try:
        info = yield Reply(sent)
    except ResdError:
        return  # refused, or no answer: nothing to undo
    yield from _release_quietly(host, info.id)


def _release_quietly(host: Host[LeaseState], reservation_id: str) -> Flow[None]:
    try:
        yield from release(host, reservation_id)
    except ResdError as exc:  # already denied or ended, or the connection is gone
        log.debug("could not release %s: %s", reservation_id, exc)


def try_reserve(flow: Flow[L]) -> Flow[L | None]:
    """``flow`` (a ``reserve`` without waiting), or None where it does not fit now or
    conflicts."""
    try:
        return (yield from flow)
    except (InsufficientError, ConflictError):
        return None


def give_up(host: Host[LeaseState], lease: LeaseState) -> Flow[None]:
    """Cancel a wait (or release what a racing grant gave); never raises ResdError."""
    if lease.ended is not None:
        return
    yield from _release_quietly(host, lease.id)
    lease._end("cancelled")


def release(host: Host[LeaseState], reservation_id: str) -> Flow[ReservationInfo]:
    """Release a reservation, or cancel a waiting request (state ``cancelled``)."""
    info = yield from ask(host, "release", ReservationRef(id=reservation_id), ReservationInfo)
    host.session.ended(info)
    return info


def release_lease(host: Host[LeaseState], lease: LeaseState) -> Flow[None]:
    """Release ``lease`` unless it already ended; one the daemon no longer knows
    counts as released."""
    if lease.ended is not None:
        return
    try:
        yield from release(host, lease.id)
    except NotFoundError:
        pass
    lease._end("released")


def renew(host: Host[LeaseState], reservation_id: str, ttl: float | None) -> Flow[ReservationInfo]:
    """Extend a reservation's TTL (``ttl``: a new one; None: its own)."""
    info = yield from ask(host, "renew", Renew(id=reservation_id, ttl=ttl), ReservationInfo)
    host.session.updated(info)
    return info


def status(host: Host[LeaseState]) -> Flow[Status]:
    return ask(host, "status", Empty(), Status)


def subscribe(host: Host[LeaseState]) -> Flow[Status]:
    return ask(host, "subscribe", Subscribe(), Status)


def listing(
    host: Host[LeaseState], pool: str | None, tenant: str | None, pending: bool
) -> Flow[list[ReservationInfo]]:
    """Active reservations, or with ``pending`` the queued requests in queue order."""
    args = ListReservations(pool=pool, tenant=tenant, pending=pending)
    result = yield from ask(host, "list", args, ReservationList)
    return result.reservations


def why(host: Host[LeaseState], reservation_id: str) -> Flow[WaitInfo]:
    return ask(host, "why", ReservationRef(id=reservation_id), WaitInfo)


def plan(
    host: Host[LeaseState],
    pool: str | None,
    request: Reserve | None,
    priority: int | None,
    wait: bool,
    options: dict[str, Any],
) -> Flow[PlanResult]:
    """Dry run of a request (built from ``pool``/``options`` or given as ``request``)."""
    if request is None:
        request = reserve_args(pool, wait=wait, **options)
    elif pool is not None or options:
        raise TypeError("give a prebuilt request or reserve arguments, not both")
    return ask(host, "plan", Plan(request=request, priority=priority), PlanResult)


__all__ = [
    "Await",
    "Call",
    "Flag",
    "Flow",
    "Host",
    "LeaseState",
    "Need",
    "Reply",
    "ReserveOptions",
    "Runner",
    "Send",
    "Session",
    "notify",
    "reserve_args",
    "resources_from",
    "wait_limit",
]
