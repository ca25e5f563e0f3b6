"""The daemon's records and the journal events that change them.

Records (``Pool``, ``Tenant``, ``Reservation``) are frozen attrs values changed with
``attrs.evolve``. Events are what actors append to the journal and what ``apply``
replays; every state change is exactly one list of events, so replay after a crash
and the live path run the same code. ``encode``/``decode`` turn events into tagged
msgpack maps through cattrs; the tag names are part of the on-disk format and never
change meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

import attrs
import cattrs

from resd_client.errors import UnavailableError
from resd_client.protocol import ReservationInfo, Reserve, TenantInfo, from_wire, to_wire


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


@attrs.frozen
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
    members: dict[str, tuple[str, ...]] = attrs.Factory(dict)
    values: dict[str, tuple[tuple[int, int], ...]] = attrs.Factory(dict)
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
    marks: dict[str, str] = attrs.Factory(dict)
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
# checked again by ``from_wire`` when it is read back.
converter.register_unstructure_hook(Reserve, to_wire)
converter.register_structure_hook(
    Reserve, lambda value, _: from_wire(Reserve, value, "waiting.args")
)


def encode(event: Event) -> dict[str, Any]:
    body: dict[str, Any] = converter.unstructure(event)
    body["t"] = _TAG_OF[type(event)]
    return body


def decode(record: dict[str, Any]) -> Event:
    """Rebuild an event from its journal map; raises KeyError/ValueError on junk."""
    body = dict(record)
    cls = TAGS[body.pop("t")]
    event: Event = converter.structure(body, cls)
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
