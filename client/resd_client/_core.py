"""The client side of the protocol, free of I/O: one ``Session`` and its ``flows``,
shared by the sync, trio and asyncio clients (standard library + msgpack only).

A client owns a ``Session`` and moves bytes: ``Session.ask`` numbers a request and
gives the frame to send; ``Session.receive`` takes the bytes read from the socket,
completes the matching ``Call`` (its ``done`` flag is set; ``Call.result`` decodes
the typed result or raises the typed error) and routes pushes to the ``LeaseState``
they concern (a ``marked`` push updates the lease's ``marks``, a ``resized`` push its
amounts and what it holds). A push about a
reservation this session does not track yet (a ``granted`` that overtook the
``pending`` reply) waits in a small buffer and is applied when the lease is
tracked. A push this client does not understand (a newer daemon's) is skipped.

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

Surviving a restart of resd (SPEC §9). Every ``reserve`` carries an attach token,
a secret the client chooses. When the connection ends unexpectedly the client calls
``Session.disconnect``: calls in flight fail with ``ConnectionLost`` (flows re-send
what is safe to send twice once the session is back), leases stay as they are,
and ``events()`` gets a ``Disconnected`` notice. On each new connection the client
sends what ``Session.resume`` gives — ``hello``, one ``attach`` per lease, and
``subscribe`` to the topics it had subscribed to — and feeds the replies to
``receive`` as usual; each ``attach`` reply is applied as it comes (``resume_events``: a grant, a
preemption notice, or the end that happened meanwhile), and once all are in the
session is connected again and ``events()`` gets ``Reconnected``. ``close`` is the
end for good: the user closed the client, or reconnecting gave up.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Final, Generic, Literal, Protocol, Required, TypedDict, TypeVar

import msgspec

from resd_client.env import GpuIds, lease_env
from resd_client.env import assigned as _assigned
from resd_client.errors import (
    ConflictError,
    InsufficientError,
    InternalError,
    InvalidError,
    NotFoundError,
    ResdError,
    TimeoutError_,
    UnavailableError,
    error_from_wire,
)
from resd_client.protocol import (
    MAX_PARTS,
    RESULTS,
    Attach,
    Binding,
    DeniedEvent,
    Empty,
    ExpiredEvent,
    FrameDecoder,
    GrantedEvent,
    Hello,
    HelloResult,
    ListReservations,
    MarkedEvent,
    OkReply,
    Part,
    Placement,
    Plan,
    PlanResult,
    PreemptedEvent,
    ReclaimEvent,
    Register,
    ReleasedEvent,
    Renew,
    ReservationInfo,
    ReservationList,
    ReservationRef,
    Reserve,
    Resize,
    ResizedEvent,
    Status,
    Subscribe,
    TopSnapshot,
    WaitInfo,
    decode_event,
    decode_ok,
    decode_plain,
    decode_result,
    encode_frame,
    from_value,
    from_wire,
    request,
    unpack,
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
#: ``attach`` requests a resuming session keeps in flight: the daemon stops reading
#: a connection with many unanswered requests, and we write before we read
RESUME_WINDOW: Final = 32
#: ops sent again after a reconnection when their reply was lost: reads, and changes
#: that come out the same when made twice (a second ``release`` of an ended lease
#: says ``not_found``; ``reserve`` is re-sent by its token, see ``reserve``). Not
#: ``resize``: a lost reply may or may not have resized, and the same amounts asked
#: again could queue a second growth; its caller gets ConnectionLost
RESENT: Final = frozenset(
    {
        "attach",
        "export",
        "list",
        "plan",
        "pool.list",
        "pool.show",
        "register",
        "release",
        "renew",
        "resources",
        "status",
        "subscribe",
        "tenant.list",
        "tenant.show",
        "top",
        "why",
    }
)
#: ops whose reply is the newest ``ReservationInfo`` of a lease: the session applies
#: it as it reads it, so that a push read after it is not undone by it (a waiting
#: ``resize`` answers its waiting request, which no lease is: nothing is applied)
LEASE_REPLIES: Final = frozenset({"register", "renew", "resize"})
#: what ``subscribe`` can ask for (``Subscribe.topics``)
Topic = Literal["state", "top"]
#: reservation states that are an end (what ``attach`` reports from history)
ENDED_STATES: Final = frozenset({"released", "expired", "preempted", "denied", "cancelled"})


class Flag(Protocol):
    """What the session sets when something completes: a ``threading.Event``, a
    ``trio.Event`` or an ``asyncio.Event``."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...


# ------------------------------------------------------------- the connection


class ConnectionLost(UnavailableError):
    """The connection to resd ended before this request's reply came; the client is
    reconnecting. Flows catch it and send again what is safe to send twice; it
    reaches the caller only for a change whose fate is unknown (``details``: ``op``,
    ``sent``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnected:
    """A notice in ``events()`` (not a wire event): the connection to resd ended
    unexpectedly (``reason``) and the client is reconnecting; leases are kept."""

    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Reconnected:
    """A notice in ``events()`` (not a wire event): connected again after
    ``attempts`` tries; every lease was re-attached, or got the event that ended it
    while the client was away (those come before this notice)."""

    attempts: int


# ------------------------------------------------------------------ arguments


class GangOptions(TypedDict, total=False):
    """Keyword arguments of ``reserve_gang`` and ``try_reserve_gang`` (all clients):
    the ``ReserveOptions`` that apply to the whole gang. What one pool is asked for
    (amounts, ``members``, ``contiguous``, ``constraints``) goes in each part; a gang
    has no ``selector``."""

    placement: Placement | None
    tenant: str | None
    ttl: float | None
    binding: Binding
    pid: int | None
    label: str
    reclaimable: bool
    timeout: float | None
    deadline: float | None


class ReserveOptions(GangOptions, total=False):
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


#: the keyword arguments of ``reserve``
RESERVE_OPTIONS: Final = frozenset(ReserveOptions.__annotations__)


def resources_from(
    cpu: object = None,
    memory: object = None,
    gpu: object = None,
    resources: Mapping[str, object] | None = None,
    vram: object = None,
    *,
    allow_zero: bool = False,
) -> dict[str, int]:
    """Internal-unit amounts from human quantities (``memory="8G"``, ``cpu=1.5``);
    raises InvalidError naming the bad one (0 too, unless ``allow_zero``)."""
    out: dict[str, int] = {}
    for name, value in (("cpu", cpu), ("memory", memory), ("gpu", gpu), ("vram", vram)):
        if value is not None:
            out[name] = parse_quantity(name, value, allow_zero=allow_zero)
    for name, value in (resources or {}).items():
        out[name] = parse_quantity(name, value, allow_zero=allow_zero)
    return out


def _request(pool: str | None, wait: bool, opt: ReserveOptions) -> Reserve:
    """The unchecked ``Reserve`` of ``ReserveOptions`` (amounts converted)."""
    pid = opt.get("pid")
    return Reserve(
        pool=pool,
        resources=resources_from(
            opt.get("cpu"), opt.get("memory"), opt.get("gpu"), opt.get("resources"), opt.get("vram")
        ),
        tenant=opt.get("tenant"),
        ttl=opt.get("ttl"),
        binding=opt.get("binding") or ("session" if pid is None else "pid"),
        label=opt.get("label", ""),
        reclaimable=opt.get("reclaimable", False),
        members=_member_names(opt.get("members")),
        contiguous=list(opt.get("contiguous") or []),
        constraints=dict(opt.get("constraints") or {}),
        selector=dict(opt.get("selector") or {}),
        placement=opt.get("placement"),
        wait=wait,
        timeout=opt.get("timeout"),
        deadline=opt.get("deadline"),
        pid=pid,
    )


def _member_names(members: Mapping[str, Sequence[str | int]] | None) -> dict[str, list[str]]:
    return {k: [str(v) for v in vs] for k, vs in (members or {}).items()}


def reserve_args(pool: str | None = None, *, wait: bool, **options: Any) -> Reserve:
    """The checked ``Reserve`` for ``reserve(pool, wait=..., **options)``.

    ``options`` are those of ``ReserveOptions``; raises InvalidError (checked here,
    before anything is sent) and TypeError for an unknown keyword.
    """
    if not RESERVE_OPTIONS.issuperset(options):
        unknown = sorted(set(options) - RESERVE_OPTIONS)
        raise TypeError(f"unexpected reserve argument(s): {', '.join(unknown)}")
    args = _request(pool, wait, options)  # type: ignore[arg-type]
    args.check()
    return args


class GangPart(TypedDict, total=False):
    """One part of ``reserve_gang``, as a dict: its ``pool`` (required) and what
    ``reserve`` takes for what one pool is asked for, in the same human quantities
    (``{"pool": "a", "gpu": 2}``, ``{"pool": "b", "cpu": 4, "memory": "8G"}``,
    ``{"pool": "c", "resources": {"ports": 2}, "contiguous": ["ports"]}``). A
    ``protocol.Part`` (internal units) may stand in for it."""

    pool: Required[str]
    cpu: object
    memory: object
    gpu: object
    vram: object
    resources: Mapping[str, object]
    members: Mapping[str, Sequence[str | int]]
    contiguous: Sequence[str]
    constraints: Mapping[str, str]


#: the ``ReserveOptions`` that say what one pool is asked for: in a gang they go in
#: each part (``GangPart``); ``GANG_OPTIONS`` apply to the whole gang
PART_OPTIONS: Final = frozenset(GangPart.__annotations__) - {"pool"}
GANG_OPTIONS: Final = frozenset(GangOptions.__annotations__)


def gang_part(index: int, spec: GangPart | Part) -> Part:
    """Part ``index`` of a gang from a ``GangPart`` dict (quantities converted as
    ``reserve`` converts them) or a ``Part`` (taken as it is).

    Raises InvalidError saying which part (``parts[1]: ...``): no pool, a bad
    quantity; TypeError for something that is not a part or an unknown key.
    """
    if isinstance(spec, Part):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"parts[{index}]: give a dict such as {{'pool': 'a', 'gpu': 2}} or a Part,"
            f" not {type(spec).__name__}"
        )
    unknown = sorted(set(spec) - set(GangPart.__annotations__))
    if unknown:
        common = sorted(set(unknown) & GANG_OPTIONS)
        hint = (
            f"; {', '.join(common)} {'applies' if len(common) == 1 else 'apply'} to the"
            f" whole gang: give {'it' if len(common) == 1 else 'them'} to reserve_gang"
            if common
            else ""
        )
        raise TypeError(f"parts[{index}]: unexpected key(s): {', '.join(unknown)}{hint}")
    pool = spec.get("pool")
    if not isinstance(pool, str) or not pool:
        raise InvalidError(
            f"parts[{index}]: pool: each part names the pool it asks in ({{'pool': 'a', ...}})",
            {"field": "pool", "part": index},
        )
    try:
        resources = resources_from(
            spec.get("cpu"),
            spec.get("memory"),
            spec.get("gpu"),
            spec.get("resources"),
            spec.get("vram"),
        )
    except InvalidError as exc:
        raise InvalidError(
            f"parts[{index}]: {exc.message}", {**exc.details, "part": index}
        ) from None
    return Part(
        pool=pool,
        resources=resources,
        members=_member_names(spec.get("members")),
        contiguous=list(spec.get("contiguous") or []),
        constraints=dict(spec.get("constraints") or {}),
    )


def gang_args(parts: Sequence[GangPart | Part], *, wait: bool, **options: Any) -> Reserve:
    """The checked ``Reserve`` of a gang: ``parts`` (2 to ``MAX_PARTS``, each a
    ``GangPart`` dict or a ``Part``) granted all or nothing as one lease, and the
    ``ReserveOptions`` that apply to the whole gang (``ttl``, ``binding``, ``label``,
    ``reclaimable``, ``timeout``, ``deadline``, ``pid``, ``tenant``, ``placement``).

    Raises InvalidError (checked here, before anything is sent; a part's error says
    which: ``parts[1]: ...``), TypeError for an unknown keyword or one that belongs
    in a part (``gpu=``, ``members=``, ...).
    """
    if isinstance(parts, str | bytes | Mapping) or not isinstance(parts, Sequence):
        raise TypeError(
            "parts: give a list of parts, e.g. [{'pool': 'a', 'gpu': 2}, {'pool': 'b', 'cpu': 4}]"
        )
    if "selector" in options:
        raise TypeError("reserve_gang: a gang has no selector; each part names its pool")
    misplaced = sorted(set(options) & PART_OPTIONS)
    if misplaced:
        raise TypeError(
            f"reserve_gang: give {', '.join(misplaced)} in each part"
            " ({'pool': 'a', 'gpu': 2}), not to the whole gang"
        )
    unknown = sorted(set(options) - GANG_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected reserve_gang argument(s): {', '.join(unknown)}")
    if not 2 <= len(parts) <= MAX_PARTS:
        raise InvalidError(
            f"parts: a gang has 2 to {MAX_PARTS} parts, got {len(parts)}",
            {"field": "parts"},
        )
    gang = [gang_part(i, spec) for i, spec in enumerate(parts)]
    args = msgspec.structs.replace(_request(None, wait, options), parts=gang)  # type: ignore[arg-type]
    args.check()
    return args


class ResizeOptions(TypedDict, total=False):
    """Keyword arguments of ``resize`` (all clients): the *new* amounts, in the same
    human quantities as ``reserve`` (``cpu=4``, ``memory="16G"``, ``gpu=2``,
    ``vram="40G"``, ``resources={"ports": 8}``; 0 gives a resource all back), and
    which set members or range values go when one shrinks (``give_back={"gpu":
    ["3"], "ports": ["30005-30009"]}``; default: the last ones). ``timeout``
    (seconds) bounds a wait. Resources not named keep their amounts.
    """

    cpu: object
    memory: object
    gpu: object
    vram: object
    resources: Mapping[str, object]
    give_back: Mapping[str, Sequence[str | int]] | None
    timeout: float | None


def resize_args(reservation_id: str, *, wait: bool, **options: Any) -> Resize:
    """The checked ``Resize`` for ``resize(reservation_id, wait=..., **options)``.

    ``options`` are those of ``ResizeOptions``; raises InvalidError (checked here,
    before anything is sent: no amount given, a bad quantity, a ``give_back`` of a
    resource not resized, a ``timeout`` without ``wait``) and TypeError for an
    unknown keyword.
    """
    unknown = sorted(set(options) - set(ResizeOptions.__annotations__))
    if unknown:
        raise TypeError(f"unexpected resize argument(s): {', '.join(unknown)}")
    opt: ResizeOptions = options  # type: ignore[assignment]
    amounts = resources_from(
        opt.get("cpu"),
        opt.get("memory"),
        opt.get("gpu"),
        opt.get("resources"),
        opt.get("vram"),
        allow_zero=True,
    )
    give_back = opt.get("give_back") or {}
    args = Resize(
        id=reservation_id,
        resources=amounts,
        give_back={
            k: [str(v) for v in ([vs] if isinstance(vs, str | int) else vs)]
            for k, vs in give_back.items()
        },
        wait=wait,
        timeout=opt.get("timeout"),
    )
    args.check()
    return args


def wait_limit(args: Reserve | Resize, margin: float) -> float | None:
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
    ``token`` is the secret that re-attaches it after a reconnection (None: it was
    made without one and cannot be re-attached).
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
        self.token: str | None = None
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

    @property
    def marks(self) -> dict[str, str]:
        """The marks resd's GPU reconciler put on it now (SPEC §10): ``overuse`` /
        ``idle`` → what was seen; kept current by ``marked`` pushes and every newer
        ``info`` (a renewal, a re-attachment)."""
        return dict(self.info.marks)

    def _apply(self, event: Any) -> None:
        if isinstance(event, DeniedEvent):
            if self.pending:
                self.error = error_from_wire(event.error)
                self._end("denied")
            return
        was_pending = self.pending
        self.info = (
            marked(self.info, event) if isinstance(event, MarkedEvent) else event.reservation
        )
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
        elif isinstance(event, ReleasedEvent):
            self._end("released")
        if was_pending and self.ended is not None and self.error is None:
            # a wait must not return a lease that ended before its holder saw the grant
            why = f": {self.info.reason}" if self.info.reason else ""
            self.error = UnavailableError(
                f"{self.id} ended ({self.info.state}) before its grant reached this client{why}",
                {"id": self.id, "state": self.info.state},
            )
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


def marked(known: ReservationInfo, event: MarkedEvent) -> ReservationInfo:
    """The reservation of a ``marked`` push with that mark put on or taken off; the
    other marks are those ``known`` had and those the push's ``reservation`` shows
    (each mark comes and goes by its own push)."""
    marks = {**known.marks, **event.reservation.marks}
    if event.on:
        marks[event.mark] = event.detail
    else:
        marks.pop(event.mark, None)
    return msgspec.structs.replace(event.reservation, marks=marks)


class Resizing:
    """A ``resize`` with ``wait`` as this session sees it, from before it is sent
    until it is decided; the session is its only writer.

    ``lease_id`` is the lease that grows; ``waiter`` the id of its waiting request
    once the reply said it was queued (releasing that id cancels the wait). It is
    decided (``settled`` is set) by the ``resized`` push for the lease (``info``:
    the lease with its new amounts), a ``denied`` push for the waiter (``error``:
    TimeoutError_ when its timeout passed, or why else resd gave up, e.g. the lease
    ended), or the end of the connection (``error``: ConnectionLost; resd ends a
    waiting resize with the connection that asked) or of the session.
    """

    def __init__(self, lease_id: str, settled: Flag) -> None:
        self.lease_id = lease_id
        self.settled = settled
        self.waiter: str | None = None
        self.info: ReservationInfo | None = None
        self.error: ResdError | None = None

    @property
    def decided(self) -> bool:
        return self.info is not None or self.error is not None

    def _grant(self, info: ReservationInfo) -> None:
        if not self.decided:
            self.info = info
        self.settled.set()

    def _fail(self, error: ResdError) -> None:
        if not self.decided:
            self.error = error
        self.settled.set()

    def outcome(self) -> ReservationInfo:
        """The lease with its new amounts; raises the error that ended the wait."""
        if self.error is not None:
            raise self.error
        if self.info is None:  # pragma: no cover - flows only ask once it settled
            raise InternalError(f"the resize of {self.lease_id} is still waiting")
        return self.info

    def __repr__(self) -> str:
        state = "granted" if self.info else "failed" if self.error else "waiting"
        return f"Resizing({self.lease_id}, waiter={self.waiter}, {state})"


def resume_events(lease: LeaseState, info: ReservationInfo) -> list[Any]:
    """What ``info`` (an ``attach`` reply after a reconnection) tells ``lease`` that it
    does not know yet, as the pushes it missed: a grant (the lease was pending), a
    preemption or reclaim notice with its deadline, or the end (``expired``,
    ``preempted``, ``denied``; ``released`` and ``cancelled`` as ``ReleasedEvent``).
    Empty when nothing new happened (the caller just takes ``info``)."""
    state = info.state
    if state == "pending":
        return []
    if state in ENDED_STATES:
        # history knows little of the lease: keep what we know, take the end from it
        ended = msgspec.structs.replace(
            lease.info, state=state, ended_at=info.ended_at, reason=info.reason
        )
        if state == "expired":
            return [ExpiredEvent(reservation=ended)]
        if state == "preempted":
            by = info.reason or "preempted while the connection to resd was lost"
            return [PreemptedEvent(reservation=ended, by=by, deadline=None)]
        if state == "denied" and lease.pending:
            return [DeniedEvent(reservation_id=lease.id, error=_denial(info))]
        return [ReleasedEvent(reservation=ended)]
    events: list[Any] = [GrantedEvent(reservation=info)] if lease.pending else []
    if state == "terminating" and info.deadline is not None:
        by = info.reason or "resd"
        if info.reclaimable:
            if not lease.reclaim_requested:
                events.append(ReclaimEvent(reservation=info, by=by, deadline=info.deadline))
        elif lease.preempt_deadline is None:
            events.append(PreemptedEvent(reservation=info, by=by, deadline=info.deadline))
    return events


def _denial(info: ReservationInfo) -> dict[str, Any]:
    """The wire error of a wait that history says was denied; history keeps the
    reason, not the code: a wait that ran out of time says "gave up after waiting"."""
    code = "timeout" if "gave up after waiting" in info.reason else "unavailable"
    message = info.reason or f"{info.id} was denied while the connection to resd was lost"
    return {"code": code, "message": message, "details": {"id": info.id}}


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
    """One request in flight; once ``done`` is set, ``result()`` gives its reply
    (typed only then: a reply nobody reads is never decoded past its envelope).

    ``epoch`` is the connection it was numbered on (see ``Session.sending``);
    ``sent`` says it was handed to the socket; ``lost`` says why its connection
    ended before the reply came (the client is reconnecting); ``topics`` are what a
    ``subscribe`` asks for (the session keeps them once granted)."""

    id: int
    op: str
    done: Flag
    epoch: int = 0
    #: the reply, when it was not a plain success (an error, or one ``decode_ok``
    #: refused), as a map; or a success as ``ok`` and the ``payload`` it came in
    frame: dict[str, Any] | None = None
    ok: OkReply | None = None
    payload: bytes | None = None
    sent: bool = False
    lost: str | None = None
    #: for a ``subscribe``: the topics it asks for
    topics: tuple[Topic, ...] = ()

    def result(self) -> Any:
        """The typed result (``RESULTS[op]``, decoded now from the reply's bytes);
        raises the typed error of an error reply, ConnectionLost when the connection
        ended first."""
        if self.lost is not None:
            raise ConnectionLost(
                f"the connection to resd was lost before the reply to {self.op} ({self.lost})",
                {"op": self.op, "sent": self.sent},
            )
        if self.ok is not None:
            return decode_result(self.op, self.ok.result)
        frame = self.frame
        if frame is None:  # pragma: no cover - read only once done
            raise InternalError(f"{self.op} has no reply yet")
        if frame.get("ok") is True:
            return from_value(RESULTS[self.op], frame.get("result"), "result")
        raise error_from_wire(frame.get("error"))

    def reply_frame(self) -> dict[str, Any] | None:
        """The reply as it came, as a map (None before it came)."""
        if self.frame is None and self.payload is not None:
            self.frame = decode_plain(self.payload)
        return self.frame


def _error_text(error: Any) -> str:
    """``code: message`` of a wire error map (whatever its shape)."""
    if isinstance(error, dict):
        return f"{error.get('code', 'error')}: {error.get('message', '')}"
    return repr(error)


def _reservation_id(event: Any) -> str | None:
    if isinstance(event, DeniedEvent):
        return event.reservation_id
    reservation = getattr(event, "reservation", None)
    return reservation.id if isinstance(reservation, ReservationInfo) else None


def _resize_lost(reason: str, resizing: Resizing) -> ConnectionLost:
    """What a waiting resize raises when the connection ends: resd ends the wait
    with the connection that asked (it has no attach token to come back by)."""
    return ConnectionLost(
        f"the connection to resd was lost ({reason}) while {resizing.lease_id} waited to"
        " grow; resd ends such a wait with its connection, so the lease keeps its old"
        " amounts unless the growth was granted just before: look, and resize again",
        {"op": "resize", "sent": True, "id": resizing.lease_id, "waiter": resizing.waiter},
    )


@dataclasses.dataclass(eq=False, slots=True)
class _Resume:
    """A resumption in progress: the replies it waits for, by call id, with what to
    do with each; the leases still to attach; the attempt it is."""

    attempt: int
    todo: deque[LeaseState]
    waiting: dict[int, Callable[[Call], None]] = dataclasses.field(default_factory=dict)


class Session:
    """Protocol state of one client's connection, across reconnections; not
    thread-safe (the sync client locks it).

    ``on_push(event)`` gets every push as it arrives (after it was applied to its
    lease), and the ``Disconnected`` / ``Reconnected`` notices; ``on_lease(lease,
    event)`` each change a push made to a tracked lease (where the client runs
    callbacks); ``on_close()`` once, when the session closes. ``new_flag`` makes the
    flags the session sets itself (the one a reconnection sets).
    """

    def __init__(
        self,
        *,
        on_push: Callable[[Any], None],
        on_lease: Callable[[LeaseState, Any], None],
        on_close: Callable[[], None],
        new_flag: Callable[[], Flag] = threading.Event,
    ) -> None:
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._leases: dict[str, LeaseState] = {}
        self._early: OrderedDict[str, list[Any]] = OrderedDict()
        self._resizes: list[Resizing] = []
        self._decoder = FrameDecoder(max_frame=MAX_REPLY_FRAME)
        self._on_push = on_push
        self._on_lease = on_lease
        self._on_close = on_close
        self._new_flag = new_flag
        self._resume: _Resume | None = None
        #: set while connected; a fresh one, unset, while disconnected
        self._back: Flag = new_flag()
        self._back.set()
        #: why the session closed; None while it is open
        self.closed: str | None = None
        #: what resd said in an error frame with no id, until the connection ends
        self._refusal: str | None = None
        #: why the connection ended while the client reconnects; None when connected
        self.disconnected: str | None = None
        #: the connection requests go on; a new one after each reconnection
        self.epoch = 0
        #: the topics of every ``subscribe`` that succeeded, sorted (a resumption
        #: subscribes to them again); empty when the client never subscribed
        self.topics: tuple[Topic, ...] = ()
        #: the daemon's answer to the latest ``hello``
        self.hello: HelloResult | None = None

    # ---- requests

    def ask(self, op: str, args: Any, done: Flag) -> tuple[Call, bytes]:
        """Number a request; returns its ``Call`` and the frame to send.

        Raises UnavailableError when the session is closed, ConnectionLost while it
        is disconnected (flows wait for ``reconnected`` first).
        """
        if self.closed is not None:
            raise UnavailableError(f"the connection to resd is closed ({self.closed})")
        if self.disconnected is not None:
            raise ConnectionLost(
                f"not connected to resd ({self.disconnected}); reconnecting",
                {"op": op, "sent": False},
            )
        call = Call(next(self._ids), op, done, self.epoch)
        if op == "subscribe":
            call.topics = tuple(args.topics if isinstance(args, Subscribe) else Subscribe().topics)
        self._calls[call.id] = call
        return call, encode_frame(request(call.id, op, args))

    @property
    def subscribed(self) -> bool:
        """Whether a ``subscribe`` succeeded (a resumption subscribes again)."""
        return bool(self.topics)

    def sending(self, call: Call) -> bool:
        """Whether ``call`` may be written now (its connection is the current one and
        it is still waiting); marks it sent. A call refused here failed as lost and
        was never sent, so its flow sends it again after the reconnection."""
        if call.done.is_set() or call.epoch != self.epoch or self.disconnected is not None:
            return False
        call.sent = True
        return True

    def abandon(self, call: Call, timeout: float) -> UnavailableError:
        """Forget a call whose reply did not come within ``timeout``; the error to raise."""
        self._calls.pop(call.id, None)
        return UnavailableError(
            f"resd did not answer {call.op} within {timeout:g}s", {"op": call.op}
        )

    # ---- bytes in

    def receive(self, data: bytes) -> None:
        """Take bytes read from the socket: complete calls, route pushes, apply the
        replies of a resumption.

        Raises FrameTooLarge or BadFrame when the stream is unusable; the client then
        drops the connection (``disconnect``, or ``close``).
        """
        self._decoder.feed(data)
        for payload in self._decoder.payloads():
            if self.closed is not None:
                return
            ok = decode_ok(payload)  # most frames: read without building the result
            if ok is not None:
                call = self._calls.pop(ok.id, None)
                if call is not None:
                    call.ok, call.payload = ok, payload
                    self._answered(call, True)
                continue
            frame = unpack(payload)
            if "event" in frame:
                self._push(frame)
                continue
            rid = frame.get("id")
            call = self._calls.pop(rid, None) if isinstance(rid, int) else None
            if call is None:
                if rid is None and frame.get("ok") is False:  # e.g. "too many connections"
                    self._refusal = _error_text(frame.get("error"))
                continue
            call.frame = frame
            self._answered(call, frame.get("ok") is True)
        resume = self._resume
        if resume is not None and not resume.waiting and not resume.todo:
            self._resumed(resume)

    def _answered(self, call: Call, ok: bool) -> None:
        """``call``'s reply came (``ok``: a success): apply what the session keeps of
        it, then complete it."""
        resume = self._resume
        then = resume.waiting.pop(call.id, None) if resume is not None else None
        if then is not None:
            then(call)
        elif ok and call.op == "subscribe":
            self.topics = tuple(sorted({*self.topics, *call.topics}))
        elif ok and call.op in LEASE_REPLIES:
            self._lease_reply(call)
        call.done.set()

    def _push(self, frame: dict[str, Any]) -> None:
        """Decode and route one push; one this client does not understand (a newer
        daemon's event, or a known one with fields it does not know) is skipped."""
        if not isinstance(frame.get("event"), str):
            log.debug("ignoring push with a bad event name: %r", type(frame.get("event")))
            return
        try:
            event = decode_event(frame)
        except ResdError as exc:
            log.debug("ignoring push: %s", exc)
            return
        taken = self._decide_resize(event)
        rid = _reservation_id(event)
        lease = self._leases.get(rid) if rid is not None else None
        if lease is not None:
            self._apply(lease, event)
        elif rid is not None and not taken:
            self._buffer(rid, event)
        self._on_push(event)

    def _decide_resize(self, event: Any) -> bool:
        """Decide the waiting resize ``event`` is about, if any: a ``resized`` push
        grants the lease's (one already queued first, else one whose reply is still
        to come: the push overtook it), a ``denied`` push for its waiter fails it."""
        found: Resizing | None = None
        if isinstance(event, ResizedEvent):
            mine = [r for r in self._resizes if r.lease_id == event.reservation.id]
            found = next((r for r in mine if r.waiter is not None), mine[0] if mine else None)
            if found is not None:
                found._grant(event.reservation)
        elif isinstance(event, DeniedEvent):
            found = next((r for r in self._resizes if r.waiter == event.reservation_id), None)
            if found is not None:
                found._fail(error_from_wire(event.error))
        if found is None:
            return False
        self._resizes.remove(found)
        return True

    def _lease_reply(self, call: Call) -> None:
        """Apply a ``LEASE_REPLIES`` reply to its tracked lease now, in stream order
        (a bad one is the flow's to raise)."""
        try:
            info = call.result()
        except ResdError:
            return
        if isinstance(info, ReservationInfo):
            self.updated(info)

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
        before it was known. On a session that closed meanwhile (its ``pending`` reply
        was read just before the end), a pending lease ends at once, as those tracked
        before the close did: no grant can reach it any more."""
        if self.closed is not None:
            if lease.pending:
                lease.error = UnavailableError(self.closed)
                lease._end("closed")
            return lease
        self._leases[lease.id] = lease
        if self._early:
            for event in self._early.pop(lease.id, []):
                self._apply(lease, event)
        return lease

    def lease(self, reservation_id: str) -> LeaseState | None:
        return self._leases.get(reservation_id)

    def leases(self) -> list[LeaseState]:
        """The leases this session tracks (those a resumption re-attaches)."""
        return list(self._leases.values())

    def forget(self, lease: LeaseState) -> None:
        """Stop tracking ``lease`` (a wait given up while disconnected: not re-attached)."""
        if self._leases.get(lease.id) is lease:
            del self._leases[lease.id]

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

    # ---- waiting resizes

    def resizing(self, lease_id: str, settled: Flag) -> Resizing:
        """Watch for the outcome of a waiting ``resize`` of ``lease_id`` about to be
        sent (its ``resized`` push may overtake the reply); ``settled`` is set when
        it is decided. ``resize_done`` stops watching."""
        resizing = Resizing(lease_id, settled)
        self._resizes.append(resizing)
        return resizing

    def resize_queued(self, resizing: Resizing, waiter: str) -> None:
        """The reply said ``resizing`` waits as request ``waiter``: a ``denied`` push
        for it (one read before the reply too) fails it."""
        resizing.waiter = waiter
        for event in self._early.pop(waiter, []):
            if isinstance(event, DeniedEvent) and resizing in self._resizes:
                self._resizes.remove(resizing)
                resizing._fail(error_from_wire(event.error))

    def resize_done(self, resizing: Resizing) -> None:
        """Stop watching ``resizing`` (decided, answered at once, or given up)."""
        if resizing in self._resizes:
            self._resizes.remove(resizing)

    def _fail_resizes(self, error: Callable[[Resizing], ResdError]) -> None:
        resizes, self._resizes = self._resizes, []
        for resizing in resizes:
            resizing._fail(error(resizing))

    # ---- losing the connection, and resuming on a new one

    @property
    def back(self) -> Flag:
        """Set once the session is connected again (or closed); what a flow waiting
        for ``Reconnect`` waits on."""
        return self._back

    @property
    def resuming(self) -> bool:
        """A resumption waits for replies (or has attaches still to send)."""
        return self._resume is not None

    def disconnect(self, reason: str) -> None:
        """The connection ended unexpectedly: fail the calls in flight with
        ConnectionLost and keep every lease (a pending one keeps waiting). Also ends
        a resumption that was under way (its connection ended too). The first time,
        ``on_push`` gets ``Disconnected(reason)``. Idempotent; nothing once closed."""
        if self.closed is not None:
            return
        reason = self._with_refusal(reason)
        self._resume = None
        first = self.disconnected is None
        if first:
            self.disconnected = reason
            self._back = self._new_flag()
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.lost = reason
            call.done.set()
        self._fail_resizes(partial(_resize_lost, reason))
        if first:
            self._on_push(Disconnected(reason))

    def resume(self, hello: Hello, attempt: int) -> bytes:
        """Begin again on a new connection: the frames to send first — ``hello``,
        ``subscribe`` to ``topics`` if the client had subscribed, and the first
        ``attach`` requests (one per tracked lease with a token; ``resume_frames``
        gives the rest). The replies go to ``receive``; ``resuming`` stays true until
        all came.

        Raises UnavailableError when the session is closed.
        """
        if self.closed is not None:
            raise UnavailableError(f"the connection to resd is closed ({self.closed})")
        if self.disconnected is None:  # pragma: no cover - clients resume after disconnect
            raise InternalError("resume() while connected")
        self.epoch += 1
        self._decoder = FrameDecoder(max_frame=MAX_REPLY_FRAME)
        todo = deque(lease for lease in self._leases.values() if lease.token is not None)
        self._resume = _Resume(attempt, todo)
        frames = [self._resume_call("hello", hello, self._hello_back)]
        if self.topics:
            again = Subscribe(topics=list(self.topics))
            frames.append(self._resume_call("subscribe", again, self._subscribe_back))
        return b"".join(frames) + self.resume_frames()

    def resume_frames(self) -> bytes:
        """More ``attach`` frames of the resumption, as replies make room (at most
        ``RESUME_WINDOW`` in flight); empty when there is nothing more to send."""
        resume = self._resume
        frames: list[bytes] = []
        while resume is not None and resume.todo and len(resume.waiting) < RESUME_WINDOW:
            lease = resume.todo.popleft()
            token = lease.token
            assert token is not None  # only leases with a token are queued
            frames.append(
                self._resume_call(
                    "attach", Attach(token=token, id=lease.id), partial(self._attach_back, lease)
                )
            )
        return b"".join(frames)

    def _resume_call(self, op: str, args: Any, then: Callable[[Call], None]) -> bytes:
        assert self._resume is not None
        call = Call(next(self._ids), op, self._new_flag(), self.epoch, sent=True)
        self._calls[call.id] = call
        self._resume.waiting[call.id] = then
        return encode_frame(request(call.id, op, args))

    def _hello_back(self, call: Call) -> None:
        try:
            self.hello = call.result()
        except ResdError as exc:  # e.g. an upgraded daemon that no longer speaks ours
            self.close(f"resd refused the reconnection: {exc.code}: {exc.message}")

    def _subscribe_back(self, call: Call) -> None:
        try:
            call.result()
        except ResdError as exc:
            log.warning("could not subscribe again after reconnecting: %s", exc)

    def _attach_back(self, lease: LeaseState, call: Call) -> None:
        """Apply one ``attach`` reply: what happened to ``lease`` while we were away."""
        if lease.ended is not None or self._leases.get(lease.id) is not lease:
            return  # ended meanwhile (a push on this connection came first)
        try:
            info: ReservationInfo = call.result()
        except ResdError as exc:
            self._lose(lease, f"lost while the connection to resd was down: {exc.message}")
            return
        events = resume_events(lease, info)
        for event in events:
            self._apply(lease, event)
            self._on_push(event)
        if not events and (info.state != "pending" or lease.pending):
            lease.info = info

    def _lose(self, lease: LeaseState, reason: str) -> None:
        """End ``lease`` as released: resd no longer knows it (or it cannot be asked)."""
        event = ReleasedEvent(
            reservation=msgspec.structs.replace(lease.info, state="released", reason=reason)
        )
        self._apply(lease, event)
        self._on_push(event)

    def _resumed(self, resume: _Resume) -> None:
        self._resume = None
        for lease in self.leases():
            if lease.token is None and lease.info.binding == "session":
                # made without a token (a raw ``reserve``): it cannot be re-attached,
                # and resd releases a session lease nobody re-attaches
                self._lose(lease, "it has no attach token, so it could not be re-attached")
        self.disconnected = None
        self._back.set()
        self._on_push(Reconnected(resume.attempt))

    def _with_refusal(self, reason: str) -> str:
        """``reason``, with what resd said when it refused this connection (an error
        frame with no id, e.g. ``too many connections from uid …``), said once."""
        refusal, self._refusal = self._refusal, None
        return reason if refusal is None else f"{reason}: {refusal}"

    # ---- the end

    def close(self, reason: str) -> None:
        """Fail every call in flight and every wait with UnavailableError(reason);
        idempotent."""
        if self.closed is not None:
            return
        self.closed = reason = self._with_refusal(reason)
        self._resume = None
        error = UnavailableError(reason)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.frame = {"id": call.id, "ok": False, "error": error.to_wire()}
            call.done.set()
        for lease in list(self._leases.values()):
            if lease.pending:
                lease.error = error
                lease._end("closed")
        self._fail_resizes(lambda _: error)
        self._back.set()
        self._on_close()


# ----------------------------------------------------------------------- flows


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` (the frame of ``call``) to the socket, whole, if
    ``Session.sending(call)`` allows; the outcome is None. An async client shields
    it, so that a cancellation never splits a frame nor loses a request that went
    out. A failed write drops the connection (the client reconnects, or closes the
    session when it does not)."""

    call: Call
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """Wait for the reply to ``call`` (at most the client's ``timeout``: then
    ``Session.abandon``); the outcome is ``outcome()``."""

    call: Call
    raw: bool = False

    def outcome(self) -> Any:
        """The typed result (or the frame, ``raw``); raises the reply's error, and
        ConnectionLost when the connection ended first (``raw`` too)."""
        if self.raw and self.call.lost is None:
            return self.call.reply_frame()
        return self.call.result()


@dataclasses.dataclass(frozen=True, slots=True)
class Await:
    """Wait until ``lease`` is no longer pending, at most ``timeout`` seconds (None:
    no limit); the outcome is whether it settled. A reconnection does not end it."""

    lease: LeaseState
    timeout: float | None

    @property
    def flag(self) -> Flag:
        """What the client waits on."""
        return self.lease._settled


@dataclasses.dataclass(frozen=True, slots=True)
class AwaitResize:
    """Wait until the waiting resize ``resizing`` is decided (granted, denied, or
    failed with the connection), at most ``timeout`` seconds (None: no limit); the
    outcome is whether it was."""

    resizing: Resizing
    timeout: float | None

    @property
    def flag(self) -> Flag:
        """What the client waits on."""
        return self.resizing.settled


@dataclasses.dataclass(frozen=True, slots=True)
class Reconnect:
    """Wait until ``flag`` (``Session.back``) is set: the session is connected again,
    or it closed because reconnecting gave up; the outcome is None. The client's
    reconnection limit bounds it."""

    flag: Flag


Need = Send | Reply | Await | AwaitResize | Reconnect
Flow = Generator[Need, Any, T]


class Runner(Generic[T]):
    """Steps a flow for a client: ``next()`` gives what it needs (None once it is
    finished: ``result``), then the client reports ``done(value)`` or ``failed(exc)``.
    After an interruption (anything but a ResdError: KeyboardInterrupt, a
    cancellation) was thrown in, ``cleaning`` is true: what the flow still needs is
    cleanup, which an async client shields from cancellation. A ResdError is the
    flow's own business (a refusal, a lost connection it retries after)."""

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
            if not isinstance(error, ResdError):
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


def reconnected(host: Host[LeaseState]) -> Flow[None]:
    """Wait while the session reconnects; raises UnavailableError when it closed
    (reconnecting gave up, or the client was closed)."""
    session = host.session
    while session.disconnected is not None and session.closed is None:
        yield Reconnect(session.back)
    if session.closed is not None:
        raise UnavailableError(f"the connection to resd is closed ({session.closed})")


def send(host: Host[LeaseState], op: str, args: Any, *, wait: bool = True) -> Flow[Call]:
    """Number and send one request. While the session reconnects it first waits
    (``wait``) or raises ConnectionLost; raises UnavailableError when closed."""
    session = host.session
    if wait and (session.disconnected is not None or session.closed is not None):
        yield from reconnected(host)
    call, data = session.ask(op, args, host._new_flag())
    yield Send(call, data)
    return call


def _repeatable(op: str, args: Any) -> bool:
    """Whether sending ``op`` twice does what sending it once does."""
    return op in RESENT or (op == "reserve" and isinstance(args, Reserve) and bool(args.token))


def call(
    host: Host[LeaseState], op: str, args: Any, *, raw: bool = False, resend: bool = True
) -> Flow[Any]:
    """One request's typed result (or its reply frame, ``raw``).

    When the connection is lost first and ``resend`` (never for ``hello``), the
    request is sent again once the session is back if it was never written or is
    safe to repeat (``RESENT``, a ``reserve`` with a token); a change whose reply
    was lost raises ConnectionLost saying it may or may not have been made.
    """
    resend = resend and op != "hello"
    while True:
        sent = yield from send(host, op, args, wait=resend)
        try:
            return (yield Reply(sent, raw))
        except ConnectionLost:
            if not resend:
                raise
            if sent.sent and not _repeatable(op, args):
                raise ConnectionLost(
                    f"the connection to resd was lost before the reply to {op} ({sent.lost});"
                    " the change may or may not have been made",
                    {"op": op, "sent": True},
                ) from None


def ask(
    host: Host[LeaseState], op: str, args: Any, result: type[T], *, resend: bool = True
) -> Flow[T]:
    """One request's result, checked to be a ``result``."""
    value = yield from call(host, op, args, resend=resend)
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

    The request carries an attach token (a new secret when ``args`` has none; the
    lease keeps it as ``token``). If the connection is lost before the reply, the
    same request is sent again once reconnected: resd knows the token and answers
    what the first attempt got. A wait goes on across reconnections.

    Raises the daemon's refusal (InsufficientError, ConflictError, ...), and for a
    wait that ended ungranted its error (TimeoutError_ when ``timeout`` passed). An
    interruption (KeyboardInterrupt, cancellation) before the reply or during the
    wait is cleaned up first: the request is cancelled at the daemon, or what it got
    released, so nothing stays queued or held — unless the connection is down then:
    the cleanup does not wait for it, and resd lets a session lease or wait that
    nobody re-attaches go after its ``reattach_grace``.
    """
    if args.token is None:
        args = msgspec.structs.replace(args, token=secrets.token_urlsafe(24))
    while True:
        sent = yield from send(host, "reserve", args)
        try:
            info = yield Reply(sent)
            break
        except ConnectionLost:
            continue  # once reconnected, the same token again
        except ResdError:
            raise
        except BaseException:
            yield from _undo(host, sent)
            raise
    lease = host._new_lease(info, on_reclaim)
    lease.token = args.token
    host.session.track(lease)
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
        return  # refused, no answer, or the connection is gone: nothing we can undo
    yield from _release_quietly(host, info.id)


def _release_quietly(host: Host[LeaseState], reservation_id: str) -> Flow[None]:
    """Release without waiting for a reconnection; never raises ResdError."""
    try:
        yield from release(host, reservation_id, resend=False)
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
    """Cancel a wait (or release what a racing grant gave); never raises ResdError.
    It does not wait for a reconnection: a wait it could not cancel is no longer
    re-attached (see ``reserve``)."""
    if lease.ended is not None:
        return
    yield from _release_quietly(host, lease.id)
    host.session.forget(lease)
    lease._end("cancelled")


def release(
    host: Host[LeaseState], reservation_id: str, *, resend: bool = True
) -> Flow[ReservationInfo]:
    """Release a reservation, or cancel a waiting request (state ``cancelled``)."""
    args = ReservationRef(id=reservation_id)
    info = yield from ask(host, "release", args, ReservationInfo, resend=resend)
    host.session.ended(info)
    return info


def release_lease(host: Host[LeaseState], lease: LeaseState, *, wait: bool = True) -> Flow[None]:
    """Release ``lease`` unless it already ended; one the daemon no longer knows
    counts as released.

    While the connection is down it waits for the reconnection; with ``wait`` False
    it does not: the lease is forgotten (no longer re-attached, so resd lets a
    session lease go after ``reattach_grace``) and ConnectionLost is raised.
    """
    if lease.ended is not None:
        return
    try:
        yield from release(host, lease.id, resend=wait)
    except NotFoundError:
        pass
    except ConnectionLost:
        host.session.forget(lease)
        raise
    lease._end("released")


def renew(host: Host[LeaseState], reservation_id: str, ttl: float | None) -> Flow[ReservationInfo]:
    """Extend a reservation's TTL (``ttl``: a new one; None: its own)."""
    return ask(host, "renew", Renew(id=reservation_id, ttl=ttl), ReservationInfo)


def resize(
    host: Host[LeaseState],
    args: Resize,
    lease: LeaseState | None = None,
    on_pending: Callable[[ReservationInfo], object] | None = None,
) -> Flow[ReservationInfo]:
    """Give lease ``args.id`` new amounts; the lease with them (a tracked lease's
    ``info`` is updated by the session, in stream order; ``lease``, when given and
    not tracked, is updated here).

    Growing that does not fit raises InsufficientError (QuotaExceededError past a
    quota's max) — or, with ``args.wait``, waits: ``on_pending(info)`` runs once with
    the waiting request (its own id, position and reason) and the flow returns when
    the ``resized`` push comes. A wait that resd ends raises its error (TimeoutError_
    when ``timeout`` passed; NotFoundError or ConflictError when the lease ended or
    is being preempted meanwhile); one the daemon
    never decides raises TimeoutError_ after ``timeout`` plus the client's reply
    timeout. An interruption (KeyboardInterrupt, cancellation) cancels the waiting
    request at the daemon first (what was already granted stays).

    ``resize`` is not safe to send twice: a reply lost with the connection raises
    ConnectionLost (the lease may or may not have been resized), and so does a wait
    the connection's end cut short. Also InvalidError, NotFoundError,
    ForbiddenError, ConflictError (the lease is being preempted).
    """
    if not args.wait:
        now = yield from ask(host, "resize", args, ReservationInfo)
        _refresh(host, lease, now)
        return now
    while True:
        yield from reconnected(host)
        resizing = host.session.resizing(args.id, host._new_flag())
        try:
            sent = yield from send(host, "resize", args, wait=False)
            try:
                info: ReservationInfo = yield Reply(sent)
            except ConnectionLost:
                if not sent.sent:
                    continue  # never written: send it once the session is back
                raise ConnectionLost(
                    f"the connection to resd was lost before the reply to resize ({sent.lost});"
                    " the change may or may not have been made",
                    {"op": "resize", "sent": True},
                ) from None
            except ResdError:
                raise
            except BaseException:
                yield from _undo_resize(host, sent, args.id)
                raise
            if info.id == args.id:  # resized at once
                _refresh(host, lease, info)
                return info
            host.session.resize_queued(resizing, info.id)
            try:
                if on_pending is not None and not resizing.decided:
                    on_pending(info)
                settled = yield AwaitResize(resizing, wait_limit(args, host.timeout))
                if not settled:
                    raise TimeoutError_(
                        f"resd did not decide the resize of {args.id} (waiting as {info.id})"
                        f" within {args.timeout:g}s",
                        {"id": args.id, "waiter": info.id, "timeout": args.timeout},
                    )
            except BaseException:
                if not resizing.decided:
                    host.session.resize_done(resizing)
                    yield from _release_quietly(host, info.id)
                raise
            done = resizing.outcome()
            _refresh(host, lease, done)
            return done
        finally:
            host.session.resize_done(resizing)


def _refresh(host: Host[LeaseState], lease: LeaseState | None, info: ReservationInfo) -> None:
    """Give ``lease`` the ``info`` a resize got, unless the session keeps it (then it
    did, in stream order) or it ended."""
    if lease is not None and lease.ended is None and host.session.lease(lease.id) is not lease:
        lease.info = info


def _undo_resize(host: Host[LeaseState], sent: Call, lease_id: str) -> Flow[None]:
    """Cancel the waiting request an interrupted waiting ``resize`` made, once its
    reply comes; a resize done at once stays done."""
    try:
        info = yield Reply(sent)
    except ResdError:
        return
    if info.id != lease_id and info.state == "pending":
        yield from _release_quietly(host, info.id)


def status(host: Host[LeaseState]) -> Flow[Status]:
    return ask(host, "status", Empty(), Status)


def subscribe_args(topics: Iterable[str]) -> Subscribe:
    """The checked ``Subscribe`` for ``topics`` (one name, or several); raises
    InvalidError naming the topics allowed (``state``, ``top``)."""
    names = [topics] if isinstance(topics, str) else list(topics)
    return from_wire(Subscribe, {"topics": names}, "subscribe")


def subscribe(host: Host[LeaseState], topics: Iterable[str] = ("state",)) -> Flow[Status]:
    """Ask for pushes of ``topics``: ``state`` (pools after each change), ``top`` (a
    ``TopSnapshot`` every sample interval). A resumption asks again by itself, for
    every topic subscribed so far."""
    return ask(host, "subscribe", subscribe_args(topics), Status)


def register(
    host: Host[LeaseState], reservation_id: str, pid: int, confine: bool = False
) -> Flow[ReservationInfo]:
    """Add process ``pid`` (and its descendants) to a lease's processes, so that resd
    counts its GPU memory against the lease (SPEC §10); ``confine``: in a cgroup with
    the lease's CPU and memory limits where the host allows. Raises InvalidError for a
    bad id or pid, NotFoundError, ForbiddenError (another uid's process)."""
    args = Register(id=reservation_id, pid=pid, confine=confine)
    args.check()
    return ask(host, "register", args, ReservationInfo)


def top(host: Host[LeaseState]) -> Flow[TopSnapshot]:
    """Every lease's live use, as of resd's last sample."""
    return ask(host, "top", Empty(), TopSnapshot)


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
    "GANG_OPTIONS",
    "PART_OPTIONS",
    "Await",
    "AwaitResize",
    "Call",
    "ConnectionLost",
    "Disconnected",
    "Flag",
    "Flow",
    "GangPart",
    "Host",
    "LeaseState",
    "Need",
    "Reconnect",
    "Reconnected",
    "Reply",
    "ReserveOptions",
    "ResizeOptions",
    "Resizing",
    "Runner",
    "Send",
    "Session",
    "gang_args",
    "gang_part",
    "notify",
    "reserve_args",
    "resize_args",
    "resources_from",
    "resume_events",
    "subscribe_args",
    "wait_limit",
]
