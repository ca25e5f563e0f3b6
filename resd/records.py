"""The daemon's records and the journal events that change them.

Records (``Pool``, ``Tenant``, ``Reservation``) are frozen attrs values changed with
``attrs.evolve``. Events are what actors append to the journal and what ``apply``
replays; every state change is exactly one list of events, so replay after a crash
and the live path run the same code. ``encode``/``decode`` turn events into tagged
msgpack maps; the tag names are part of the on-disk format and never change meaning.
The events every lease makes (``reserved``, ``ended``, ``renewed``, ...) and the
``Reservation`` inside them have hand-written codecs (a journal replay decodes a
million of them); the rest go through cattrs. Both write the same maps. A replay
reads those events' records typed (``RECORD``), in C, and ``decode`` takes either.

Memory: a record's dicts are never changed in place (a change is a new record), so
records share them. Every empty one is ``EMPTY``; identical amounts maps are one
object (``shared_amounts``); names that repeat (tenant, pool, binding, state, ...)
are interned when read back. Shared maps refuse changes (``TypeError``).
"""

from __future__ import annotations

import functools
import operator
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn, Protocol

import attrs
import cattrs
import msgspec

from resd_client.errors import UnavailableError
from resd_client.protocol import ReservationInfo, Reserve, TenantInfo, from_wire

_intern = sys.intern


class _Shared(dict[Any, Any]):
    """A dict that records share, so that no one may change it in place."""

    __slots__ = ()

    def _refuse(self, *_args: Any, **_kw: Any) -> NoReturn:
        raise TypeError("a record's map is shared and never changed in place; build a new one")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[type[_Shared], tuple[dict[Any, Any]]]:
        return _Shared, (dict(self),)  # copied and pickled whole, not item by item


#: the one empty map of every record that has none (members, values, marks, ...)
EMPTY: Final[dict[Any, Any]] = _Shared()

_AMOUNTS: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}
_AMOUNTS_MAX: Final = 4096  # distinct amounts maps kept for sharing; then it starts over


def shared_amounts(amounts: Mapping[str, int]) -> dict[str, int]:
    """``amounts`` as a map shared by every record with the same amounts (in the same
    order): most leases ask for one of a few shapes, and a dict costs ~200 bytes."""
    if not amounts:
        return EMPTY
    key = tuple(amounts.items())
    got = _AMOUNTS.get(key)
    if got is None:
        if len(_AMOUNTS) >= _AMOUNTS_MAX:
            _AMOUNTS.clear()
        got = _AMOUNTS[key] = _Shared(amounts)
    return got


@attrs.frozen
class Member:
    """A named member of a set resource (a GPU, a disk).

    ``capacity`` > 0 lets the member be sliced (a GPU's VRAM in bytes); ``labels``
    are its attributes (uuid, model, numa, pci_bus, index, ...).
    """

    name: str
    capacity: int = 0
    labels: dict[str, str] = attrs.Factory(dict)


@attrs.frozen
class Capacity:
    """One resource of a pool.

    ``scalar``: any amount up to capacity × ratio. ``range``: the integers
    ``lo .. lo + capacity - 1``, each held by one reservation. ``set``: the named
    ``members``, each held whole by one reservation or (if it has a capacity) in
    slices by several.
    """

    capacity: int
    ratio: float = 1.0
    kind: str = "scalar"
    lo: int = 0
    members: tuple[Member, ...] = ()
    source: str = "configured"

    @property
    def effective(self) -> int:
        """Allocatable amount: capacity × oversubscription ratio, rounded down."""
        return int(self.capacity * self.ratio)

    @property
    def hi(self) -> int:
        return self.lo + self.capacity - 1

    @property
    def sliceable(self) -> bool:
        return self.kind == "set" and any(m.capacity > 0 for m in self.members)


@attrs.frozen
class Quota:
    """A tenant's quota in a pool (SPEC §3): ``min`` guaranteed, ``max`` a cap, per
    resource in internal units (a set or range resource counts members / values)."""

    min: dict[str, int] = attrs.Factory(dict)
    max: dict[str, int] = attrs.Factory(dict)


@attrs.frozen
class Pool:
    name: str
    resources: dict[str, Capacity]
    max_per_tenant: int
    preemption: str
    placement: str
    grace: float
    labels: dict[str, str]
    created_at: float
    #: GPU truth policy (SPEC §10): what over-use gets, when a GPU lease counts as
    #: idle (0: never), whether foreign GPU use becomes an ``unmanaged`` reservation
    overuse: str = "warn"
    idle_after: float = 0.0
    adopt_foreign: bool = False
    #: tenant → its quota here
    quotas: dict[str, Quota] = attrs.Factory(dict)


@attrs.frozen
class Tenant:
    name: str
    priority: int
    owners: tuple[int, ...] = ()
    groups: tuple[int, ...] = ()
    weight: float = 1.0
    created_at: float = 0.0

    def info(self, active: int = 0) -> TenantInfo:
        return TenantInfo(
            name=self.name,
            priority=self.priority,
            owners=list(self.owners),
            groups=list(self.groups),
            weight=self.weight,
            created_at=self.created_at,
            active=active,
        )


@attrs.frozen(weakref_slot=False)  # a hundred thousand of them: no slot nobody uses
class Reservation:
    id: str
    tenant: str
    pool: str
    resources: dict[str, int]
    label: str
    created_at: float
    ttl: float | None
    expires_at: float | None
    binding: str
    session: str
    reclaimable: bool
    uid: int
    state: str = "active"
    deadline: float | None = None
    members: dict[str, tuple[str, ...]] = EMPTY
    values: dict[str, tuple[tuple[int, int], ...]] = EMPTY
    devices: tuple[dict[str, str], ...] = ()
    #: the tenant's priority when the reservation was made (what preemption compares,
    #: as Kubernetes resolves a pod's priority once, at creation)
    priority: int = 1
    #: ``pid`` binding: the process and its start time (pid reuse cannot keep it alive)
    pid: int | None = None
    pid_start: float | None = None
    #: a terminating reservation that was asked to reclaim (may still release in time)
    reclaim: bool = False
    #: the holder's attach token (SPEC §9); "" when it gave none. Never shown.
    token: str = ""
    #: a session lease's peer process (SO_PEERCRED), whose tree its GPU use is
    peer: int | None = None
    #: processes registered to it (``resctl run``'s CMD): (pid, start time)
    procs: tuple[tuple[int, float], ...] = ()
    #: the strongest guard the host gives it (SPEC §10), decided at grant; ``cgroup``
    #: once a process is confined, unless a stronger GPU guard holds
    enforcement: str = "none"
    #: the cgroup its registered processes run in ("" when none)
    cgroup: str = ""
    #: reconciler marks standing now: ``overuse`` / ``idle`` → what was seen
    marks: dict[str, str] = EMPTY
    #: a gang part: the ids of all its parts, the first being the lease's own id
    gang: tuple[str, ...] = ()

    def roots(self) -> tuple[int, ...]:
        """The processes whose trees are this lease's own (SPEC §10 attribution)."""
        pids = [p for p, _ in self.procs]
        if self.pid is not None:
            pids.append(self.pid)
        if self.peer is not None and self.binding == "session":
            pids.append(self.peer)
        return tuple(dict.fromkeys(pids))

    def info(self, *, state: str | None = None, ended_at: float | None = None) -> ReservationInfo:
        return ReservationInfo(
            id=self.id,
            tenant=self.tenant,
            pool=self.pool,
            resources=dict(self.resources),
            label=self.label,
            created_at=self.created_at,
            ttl=self.ttl,
            expires_at=self.expires_at,
            binding=self.binding,
            reclaimable=self.reclaimable,
            state=state or self.state,
            uid=self.uid,
            ended_at=ended_at,
            members={k: list(v) for k, v in self.members.items()},
            values={k: [list(i) for i in v] for k, v in self.values.items()},
            devices=[dict(d) for d in self.devices],
            priority=self.priority,
            pid=self.pid,
            deadline=self.deadline if self.state == "terminating" else None,
            enforcement=self.enforcement,
            cgroup=self.cgroup,
            marks=dict(self.marks),
            processes=[p for p, _ in self.procs],
        )


@attrs.frozen
class Waiting:
    """A queued request, as the journal keeps it: enough to put it back in its
    place after a restart (``seq`` is its arrival rank; ``timeout_at`` wall time;
    the attach token is ``args.token``)."""

    id: str
    args: Reserve
    tenant: Tenant
    uid: int
    session: str
    pools: tuple[str, ...]
    arrived: float
    seq: int
    timeout_at: float | None = None
    pid: int | None = None
    pid_start: float | None = None
    #: the session peer's process (see ``Reservation.peer``)
    peer: int | None = None
    #: a waiting resize: the lease it grows (``args.resources`` its new amounts)
    resize_of: str = ""


# ------------------------------------------------------------------------ events


@attrs.frozen
class PoolCreated:
    pool: Pool


@attrs.frozen
class PoolChanged:
    pool: Pool


@attrs.frozen
class PoolDeleted:
    name: str
    at: float


@attrs.frozen
class Reserved:
    reservation: Reservation


@attrs.frozen
class Ended:
    """A reservation left the pool: ``state`` is released, expired or preempted."""

    id: str
    state: str
    at: float
    reason: str = ""


@attrs.frozen
class Renewed:
    id: str
    ttl: float
    expires_at: float
    at: float


@attrs.frozen
class Terminating:
    """A preempted reservation keeps its resources until ``deadline`` (its grace);
    ``reclaim``: it is reclaimable and is asked to release by then."""

    id: str
    deadline: float
    by: str
    at: float
    reclaim: bool = False


@attrs.frozen
class Queued:
    """A request joined the wait queue."""

    waiting: Waiting


@attrs.frozen
class Rebound:
    """The lease or waiter ``id`` was re-attached to connection ``session``."""

    id: str
    session: str
    at: float
    #: the new connection's peer process (a session lease's attribution root)
    peer: int | None = None


@attrs.frozen
class Resized:
    """Lease ``id`` now holds ``resources`` (with these members, values, devices);
    ``detail`` says what changed."""

    id: str
    resources: dict[str, int]
    members: dict[str, tuple[str, ...]]
    values: dict[str, tuple[tuple[int, int], ...]]
    devices: tuple[dict[str, str], ...]
    at: float
    detail: str = ""


@attrs.frozen
class Registered:
    """Process ``pid`` (started at ``start``) was added to lease ``id``'s processes,
    in cgroup ``cgroup`` when it was confined."""

    id: str
    pid: int
    start: float
    at: float
    cgroup: str = ""


@attrs.frozen
class Marked:
    """The GPU reconciler put ``mark`` (``overuse``, ``idle``) on lease ``id``
    (``on``) or took it off, having seen ``detail``."""

    id: str
    mark: str
    on: bool
    detail: str
    at: float


@attrs.frozen
class Denied:
    """A request was refused, or a waiter (``id``) left the queue ungranted."""

    tenant: str
    pool: str
    resources: dict[str, int]
    at: float
    code: str
    reason: str
    details: dict[str, Any] = attrs.Factory(dict)
    id: str = ""


@attrs.frozen
class TenantSaved:
    tenant: Tenant


@attrs.frozen
class TenantRemoved:
    name: str
    at: float


PoolEvent = (
    PoolCreated
    | PoolChanged
    | PoolDeleted
    | Reserved
    | Ended
    | Renewed
    | Terminating
    | Denied
    | Queued
    | Rebound
    | Registered
    | Marked
    | Resized
)
TenantEvent = TenantSaved | TenantRemoved
Event = PoolEvent | TenantEvent

TAGS: Final[dict[str, type]] = {
    "pool_created": PoolCreated,
    "pool_changed": PoolChanged,
    "pool_deleted": PoolDeleted,
    "reserved": Reserved,
    "ended": Ended,
    "renewed": Renewed,
    "terminating": Terminating,
    "denied": Denied,
    "queued": Queued,
    "rebound": Rebound,
    "registered": Registered,
    "marked": Marked,
    "resized": Resized,
    "tenant_saved": TenantSaved,
    "tenant_removed": TenantRemoved,
}
_TAG_OF: Final[dict[type, str]] = {v: k for k, v in TAGS.items()}

converter = cattrs.Converter()
# A queued request is kept in its wire form: the protocol's own, versioned format,
# checked again by ``from_wire`` when it is read back. msgspec writes the same map as
# ``to_wire`` (every field, in order), in C: a tenth of the time per queued request.
converter.register_unstructure_hook(Reserve, msgspec.to_builtins)
converter.register_structure_hook(
    Reserve, lambda value, _: from_wire(Reserve, value, "waiting.args")
)
#: cattrs alone: what a record that the hand-written decoders cannot read goes to, so
#: that junk is refused with cattrs's account of what is wrong with it
_generic = converter.copy()

# ------------------------------------------------------------------------ codecs


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def reservation_to_map(r: Reservation) -> dict[str, Any]:
    """``r`` as its journal and snapshot map (what cattrs writes, the same keys in the
    same order; tuples where it writes lists, which msgpack does not tell apart)."""
    return {
        "id": r.id,
        "tenant": r.tenant,
        "pool": r.pool,
        "resources": r.resources,
        "label": r.label,
        "created_at": r.created_at,
        "ttl": r.ttl,
        "expires_at": r.expires_at,
        "binding": r.binding,
        "session": r.session,
        "reclaimable": r.reclaimable,
        "uid": r.uid,
        "state": r.state,
        "deadline": r.deadline,
        "members": r.members,
        "values": r.values,
        "devices": r.devices,
        "priority": r.priority,
        "pid": r.pid,
        "pid_start": r.pid_start,
        "reclaim": r.reclaim,
        "token": r.token,
        "peer": r.peer,
        "procs": r.procs,
        "enforcement": r.enforcement,
        "cgroup": r.cgroup,
        "marks": r.marks,
        "gang": r.gang,
    }


def _members_of(members: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    if not members:
        return EMPTY
    return {_intern(k): tuple(map(_intern, v)) for k, v in members.items()}


def _values_of(
    values: Mapping[str, Sequence[Sequence[int]]] | None,
) -> dict[str, tuple[tuple[int, int], ...]]:
    if not values:
        return EMPTY
    return {_intern(k): tuple((int(lo), int(hi)) for lo, hi in v) for k, v in values.items()}


def _reservation_from_map(raw: dict[str, Any]) -> Reservation:
    # What cattrs does, spelled out (a replay reads a million): the same conversions,
    # defaults for keys that records written before a field existed lack.
    get = raw.get
    ttl, expires_at, deadline = raw["ttl"], raw["expires_at"], get("deadline")
    members, values, devices = get("members"), get("values"), get("devices")
    pid, pid_start, peer = get("pid"), get("pid_start"), get("peer")
    procs, marks, gang = get("procs"), get("marks"), get("gang")
    return Reservation(
        id=raw["id"],
        tenant=_intern(raw["tenant"]),
        pool=_intern(raw["pool"]),
        resources=shared_amounts(raw["resources"]),
        label=_intern(raw["label"]),
        created_at=float(raw["created_at"]),
        ttl=None if ttl is None else float(ttl),
        expires_at=None if expires_at is None else float(expires_at),
        binding=_intern(raw["binding"]),
        session=_intern(raw["session"]),
        reclaimable=bool(raw["reclaimable"]),
        uid=int(raw["uid"]),
        state=_intern(get("state", "active")),
        deadline=None if deadline is None else float(deadline),
        members=_members_of(members),
        values=_values_of(values),
        devices=tuple(map(dict, devices)) if devices else (),
        priority=int(get("priority", 1)),
        pid=None if pid is None else int(pid),
        pid_start=None if pid_start is None else float(pid_start),
        reclaim=bool(get("reclaim", False)),
        token=get("token", ""),
        peer=None if peer is None else int(peer),
        procs=tuple((int(p), float(start)) for p, start in procs) if procs else (),
        enforcement=_intern(get("enforcement", "none")),
        cgroup=get("cgroup", ""),
        marks=dict(marks) if marks else EMPTY,
        gang=tuple(gang) if gang else (),
    )


def reservation_from_map(raw: dict[str, Any]) -> Reservation:
    """The reservation of a journal or snapshot map written by any release (keys added
    later take their defaults); raises what cattrs raises for one it cannot read."""
    try:
        return _reservation_from_map(raw)
    except (KeyError, TypeError, ValueError, AttributeError):
        reservation: Reservation = _generic.structure(raw, Reservation)
        return reservation


converter.register_unstructure_hook(Reservation, reservation_to_map)
converter.register_structure_hook(Reservation, lambda raw, _: reservation_from_map(raw))

#: the events of every lease's life, written and read without cattrs (same maps)
_ENCODERS: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    Reserved: lambda e: {"reservation": reservation_to_map(e.reservation), "t": "reserved"},
    Ended: lambda e: {"id": e.id, "state": e.state, "at": e.at, "reason": e.reason, "t": "ended"},
    Renewed: lambda e: {
        "id": e.id,
        "ttl": e.ttl,
        "expires_at": e.expires_at,
        "at": e.at,
        "t": "renewed",
    },
    Terminating: lambda e: {
        "id": e.id,
        "deadline": e.deadline,
        "by": e.by,
        "at": e.at,
        "reclaim": e.reclaim,
        "t": "terminating",
    },
    Rebound: lambda e: {
        "id": e.id,
        "session": e.session,
        "at": e.at,
        "peer": e.peer,
        "t": "rebound",
    },
    Registered: lambda e: {
        "id": e.id,
        "pid": e.pid,
        "start": e.start,
        "at": e.at,
        "cgroup": e.cgroup,
        "t": "registered",
    },
    Marked: lambda e: {
        "id": e.id,
        "mark": e.mark,
        "on": e.on,
        "detail": e.detail,
        "at": e.at,
        "t": "marked",
    },
}
_DECODERS: Final[dict[str, Callable[[dict[str, Any]], Event]]] = {
    "reserved": lambda b: Reserved(_reservation_from_map(b["reservation"])),
    "ended": lambda b: Ended(
        b["id"], _intern(b["state"]), float(b["at"]), _intern(b.get("reason", ""))
    ),
    "renewed": lambda b: Renewed(b["id"], float(b["ttl"]), float(b["expires_at"]), float(b["at"])),
    "terminating": lambda b: Terminating(
        b["id"], float(b["deadline"]), b["by"], float(b["at"]), bool(b.get("reclaim", False))
    ),
    "rebound": lambda b: Rebound(
        b["id"], _intern(b["session"]), float(b["at"]), _int_or_none(b.get("peer"))
    ),
    "registered": lambda b: Registered(
        b["id"], int(b["pid"]), float(b["start"]), float(b["at"]), b.get("cgroup", "")
    ),
    "marked": lambda b: Marked(
        b["id"], _intern(b["mark"]), bool(b["on"]), b["detail"], float(b["at"])
    ),
}


# ----------------------------------------------------------------- typed records
#
# What the journal reads these events' records as, in C (``Journal.recover``'s
# ``records``): msgspec structs of each event's own fields, the reservation inside
# read straight into a ``Reservation``. Only what the hand-written decoders then add
# is left to do: the interning and sharing. A record they do not fit (an unknown tag,
# an older release's looser type) makes the journal read its entry as plain maps,
# which go the hand-written way, so both ways give the same events.

_FACTORY: Final[type] = type(attrs.Factory(list))
#: field → its slot's setter, which sets what a frozen class's ``__setattr__`` refuses:
#: for a reservation msgspec has just made and no one has seen yet
_SET: Final[dict[str, Callable[[Reservation, Any], None]]] = {
    a.name: Reservation.__dict__[a.name].__set__ for a in attrs.fields(Reservation)
}


def _shared(r: Reservation) -> Reservation:
    """``r`` as msgspec read it, made to share what ``_reservation_from_map`` shares."""
    _SET["tenant"](r, _intern(r.tenant))
    _SET["pool"](r, _intern(r.pool))
    _SET["resources"](r, shared_amounts(r.resources))
    _SET["label"](r, _intern(r.label))
    _SET["binding"](r, _intern(r.binding))
    _SET["session"](r, _intern(r.session))
    _SET["state"](r, _intern(r.state))
    _SET["enforcement"](r, _intern(r.enforcement))
    if r.members is not EMPTY:
        _SET["members"](r, _members_of(r.members))
    if r.values is not EMPTY:
        _SET["values"](r, _values_of(r.values))
    if not r.marks:
        _SET["marks"](r, EMPTY)
    return r


def _record_struct(cls: type) -> type[msgspec.Struct]:
    """A tagged msgspec struct with the fields (names, types, defaults) of event ``cls``."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for a in attrs.fields(cls):
        assert not isinstance(a.default, _FACTORY), a  # (immutable defaults only)
        default = () if a.default is attrs.NOTHING else (a.default,)
        fields.append((a.name, hints[a.name], *default))
    name = f"{cls.__name__}Record"
    return msgspec.defstruct(name, fields, tag_field="t", tag=_TAG_OF[cls], frozen=True, gc=False)


_FROM_RECORD: Final[dict[type, Callable[[Any], Event]]] = {
    _record_struct(Reserved): lambda w: Reserved(_shared(w.reservation)),
    _record_struct(Ended): lambda w: Ended(w.id, _intern(w.state), w.at, _intern(w.reason)),
    _record_struct(Renewed): lambda w: Renewed(w.id, w.ttl, w.expires_at, w.at),
    _record_struct(Terminating): lambda w: Terminating(w.id, w.deadline, w.by, w.at, w.reclaim),
    _record_struct(Rebound): lambda w: Rebound(w.id, _intern(w.session), w.at, w.peer),
    _record_struct(Registered): lambda w: Registered(w.id, w.pid, w.start, w.at, w.cgroup),
    _record_struct(Marked): lambda w: Marked(w.id, _intern(w.mark), w.on, w.detail, w.at),
}
#: the type of a record as the journal reads it (``Journal.recover(records=...)``):
#: one of the typed records above, which ``decode`` takes as it takes their maps
RECORD: Final[Any] = functools.reduce(operator.or_, _FROM_RECORD)


def encode(event: Event) -> dict[str, Any]:
    """``event`` as its tagged journal map."""
    fast = _ENCODERS.get(type(event))
    if fast is not None:
        return fast(event)
    body: dict[str, Any] = converter.unstructure(event)
    body["t"] = _TAG_OF[type(event)]
    return body


def decode(record: dict[str, Any] | msgspec.Struct) -> Event:
    """Rebuild an event from its journal map, or from its typed record (``RECORD``).
    Raises KeyError for an unknown tag, and cattrs's ``BaseValidationError`` for a map
    it cannot read (a missing field, a value of the wrong kind): the hand-written
    decoders hand what they cannot read to it."""
    typed = _FROM_RECORD.get(type(record))
    if typed is not None:
        return typed(record)
    record = typing.cast(dict[str, Any], record)
    fast = _DECODERS.get(record["t"])
    if fast is not None:
        try:
            return fast(record)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # cattrs says what is wrong with it, below
    body = dict(record)
    cls = TAGS[body.pop("t")]
    event: Event = (converter if fast is None else _generic).structure(body, cls)
    return event


class Appends(Protocol):
    """What ``journal_events`` needs of the journal."""

    def append(self, domain: str, records: list[Any]) -> int: ...


def journal_events(journal: Appends, domain: str, events: Sequence[Event]) -> int:
    """Append ``events`` as one journal entry; returns its lsn.

    Raises UnavailableError (and appends nothing) when they cannot be encoded or the
    journal refuses them (it failed, or is closed): the caller has changed nothing
    yet, so memory and disk still agree.
    """
    try:
        return journal.append(domain, [encode(e) for e in events])
    except Exception as exc:  # JournalRefused, RuntimeError, or an encoding bug
        raise UnavailableError(
            f"resd cannot write its journal, so nothing was changed: {exc}",
            {"journal": type(exc).__name__},
        ) from exc
