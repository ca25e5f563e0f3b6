"""The daemon's records and the journal events that change them.

Records (``Pool``, ``Tenant``, ``Reservation``) are frozen attrs values changed with
``attrs.evolve``. Events are what actors append to the journal and what ``apply``
replays; every state change is exactly one list of events, so replay after a crash
and the live path run the same code. ``encode``/``decode`` turn events into tagged
msgpack maps through cattrs; the tag names are part of the on-disk format and never
change meaning.
"""

from __future__ import annotations

from typing import Any, Final

import attrs
import cattrs

from resd_client.protocol import ReservationInfo, TenantInfo


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
class Pool:
    name: str
    resources: dict[str, Capacity]
    max_per_tenant: int
    preemption: str
    placement: str
    grace: float
    labels: dict[str, str]
    created_at: float


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
        )


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
class Denied:
    tenant: str
    pool: str
    resources: dict[str, int]
    at: float
    code: str
    reason: str
    details: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen
class TenantSaved:
    tenant: Tenant


@attrs.frozen
class TenantRemoved:
    name: str
    at: float


PoolEvent = (
    PoolCreated | PoolChanged | PoolDeleted | Reserved | Ended | Renewed | Terminating | Denied
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
    "tenant_saved": TenantSaved,
    "tenant_removed": TenantRemoved,
}
_TAG_OF: Final[dict[type, str]] = {v: k for k, v in TAGS.items()}

converter = cattrs.Converter()


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
