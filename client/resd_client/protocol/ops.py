"""The argument type of every op, and ``OPS``, the table of ops (SPEC §1).

Each op's ``args`` decode into one frozen type here; its ``check`` runs after the
field types are checked. To add an op: its argument type here, its result type in
``results.py``, and one line in ``OPS`` and in ``RESULTS``.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec
from msgspec import field

from resd_client.errors import InvalidError
from resd_client.protocol.checks import (
    MEMBER,
    check_amounts,
    check_grace,
    check_idle_after,
    check_ids,
    check_label,
    check_labels,
    check_max_per_tenant,
    check_name,
    check_pid,
    check_priority,
    check_ratio,
    check_reservation_id,
    check_token,
    check_ttl,
    check_wait,
    show,
)
from resd_client.protocol.convert import Float, Int, Message
from resd_client.quantity import check_resource_name

Binding = Literal["detached", "session", "pid"]
Preemption = Literal["off", "lower_priority"]
Placement = Literal["binpack", "spread", "least_used"]
#: what resd does with a lease whose processes use more GPU memory than it reserved
OverusePolicy = Literal["warn", "terminate"]


class Hello(Message, frozen=True):
    version: Int
    client: str = ""

    def check(self) -> None:
        if len(self.client) > 128:
            raise InvalidError("client name is longer than 128 characters", {"field": "client"})


class MemberSpec(Message, frozen=True):
    """A member of a set resource: a name, an optional sliceable capacity, attributes."""

    name: str
    capacity: Int = 0
    labels: dict[str, str] = field(default_factory=dict)


ResourceKind = Literal["scalar", "range", "set"]


class ResourceSpec(Message, frozen=True):
    """One resource of a pool (SPEC §2 kinds).

    ``scalar``: ``capacity`` in internal units, times ``ratio``. ``range``: the
    integers ``lo``..``hi``. ``set``: ``members`` (a GPU set's members carry their
    VRAM as capacity, which makes ``vram`` requests possible).
    """

    capacity: Int | None = None
    ratio: Float = 1.0
    kind: ResourceKind = "scalar"
    lo: Int = 0
    hi: Int | None = None
    members: list[MemberSpec] = field(default_factory=list)
    source: Literal["detected", "configured"] = "configured"

    def check_as(self, name: str) -> None:
        if self.kind == "scalar":
            if self.capacity is None:
                raise InvalidError(
                    f"args.resources.{name}.capacity: a scalar resource needs a capacity",
                    {"field": f"args.resources.{name}.capacity"},
                )
            if self.members or self.hi is not None:
                raise InvalidError(
                    f"args.resources.{name}: a scalar resource has no members or range",
                    {"resource": name},
                )
            return
        if self.ratio != 1.0:
            raise InvalidError(
                f"resources.{name}: only scalar resources can be oversubscribed (ratio must be 1)",
                {"resource": name},
            )
        if self.kind == "range":
            if self.hi is None or self.hi < self.lo or self.lo < 0 or self.hi - self.lo >= 1 << 32:
                raise InvalidError(
                    f"resources.{name}: a range needs 0 <= lo <= hi and at most 2^32 values",
                    {"resource": name, "lo": self.lo, "hi": self.hi},
                )
            if self.members:
                raise InvalidError(f"resources.{name}: a range has no members", {"resource": name})
            return
        if self.hi is not None:
            raise InvalidError(
                f"resources.{name}: a set has members, not a range", {"resource": name}
            )
        if not 1 <= len(self.members) <= 4096:
            raise InvalidError(
                f"resources.{name}: a set needs 1 to 4096 members", {"resource": name}
            )
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise InvalidError(f"resources.{name}: member names must be unique", {"resource": name})
        for m in self.members:
            if not MEMBER.fullmatch(m.name):
                raise InvalidError(
                    f"resources.{name}: member name {show(m.name)} is not valid (1-64 letters, digits, '.', '_', '-', ':')",
                    {"resource": name},
                )
            if m.capacity < 0:
                raise InvalidError(
                    f"resources.{name}.{m.name}: capacity must be >= 0", {"resource": name}
                )
            check_labels(m.labels)

    @property
    def size(self) -> int:
        """How many units the resource holds (members, values, or the capacity)."""
        if self.kind == "set":
            return len(self.members)
        if self.kind == "range":
            return (self.hi if self.hi is not None else self.lo) - self.lo + 1
        return self.capacity or 0


class PoolCreate(Message, frozen=True):
    name: str
    resources: dict[str, ResourceSpec]
    max_per_tenant: Int = 1
    preemption: Preemption = "off"
    placement: Placement = "binpack"
    grace: Float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    overuse: OverusePolicy = "warn"
    idle_after: Float = 0.0
    adopt_foreign: bool = False

    def check(self) -> None:
        check_name("pool", self.name)
        check_idle_after(self.idle_after)
        for k, v in self.resources.items():
            v.check_as(k)
            check_ratio(k, v.ratio)
        check_amounts({k: v.size for k, v in self.resources.items()}, allow_zero=True)
        if "vram" in self.resources:
            raise InvalidError(
                "resources.vram: VRAM is not a resource of its own; give the gpu set members their memory as capacity",
                {"resource": "vram"},
            )
        check_max_per_tenant(self.max_per_tenant)
        check_grace(self.grace)
        check_labels(self.labels)


class PoolSet(Message, frozen=True):
    """Change a pool; only the fields given change. ``remove`` drops resources."""

    name: str
    capacity: dict[str, Int] = field(default_factory=dict)
    ratios: dict[str, Float] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    max_per_tenant: Int | None = None
    preemption: Preemption | None = None
    placement: Placement | None = None
    grace: Float | None = None
    labels: dict[str, str] | None = None
    overuse: OverusePolicy | None = None
    idle_after: Float | None = None
    adopt_foreign: bool | None = None

    def check(self) -> None:
        check_name("pool", self.name)
        if self.idle_after is not None:
            check_idle_after(self.idle_after)
        check_amounts(self.capacity, allow_zero=True, what="capacity")
        for k, r in self.ratios.items():
            check_resource_name(k)
            check_ratio(k, r)
        for k in self.remove:
            check_resource_name(k)
        if self.max_per_tenant is not None:
            check_max_per_tenant(self.max_per_tenant)
        if self.grace is not None:
            check_grace(self.grace)
        if self.labels is not None:
            check_labels(self.labels)


class PoolName(Message, frozen=True):
    name: str

    def check(self) -> None:
        check_name("pool", self.name)


class PoolDelete(Message, frozen=True):
    name: str
    force: bool = False

    def check(self) -> None:
        check_name("pool", self.name)


class Empty(Message, frozen=True):
    """Arguments of ops that take none."""


class TenantAdd(Message, frozen=True):
    name: str
    priority: Int = 5
    owners: list[Int] = field(default_factory=list)
    groups: list[Int] = field(default_factory=list)
    weight: Float = 1.0

    def check(self) -> None:
        check_name("tenant", self.name)
        check_priority(self.priority)
        check_ids("owners", self.owners)
        check_ids("groups", self.groups)
        if not 0 < self.weight <= 1000:
            raise InvalidError(
                f"weight must be > 0 and <= 1000, got {self.weight:g}", {"field": "weight"}
            )


class TenantName(Message, frozen=True):
    name: str

    def check(self) -> None:
        check_name("tenant", self.name)


class TenantSet(Message, frozen=True):
    name: str
    priority: Int | None = None
    owners: list[Int] | None = None
    groups: list[Int] | None = None
    weight: Float | None = None
    #: quota in ``pool`` (SPEC §3): ``min`` guaranteed, ``max`` cap, per resource in
    #: internal units (a set resource counts members); each given map replaces that
    #: side of the quota, ``{}`` clears it
    pool: str | None = None
    min: dict[str, Int] | None = None
    max: dict[str, Int] | None = None

    def check(self) -> None:
        check_name("tenant", self.name)
        if self.pool is None and (self.min is not None or self.max is not None):
            raise InvalidError("min and max are per pool: give the pool too", {"field": "pool"})
        if self.pool is not None:
            check_name("pool", self.pool)
            if self.min is None and self.max is None:
                raise InvalidError(
                    f"pool {self.pool!r}: give min and/or max to set the tenant's quota there",
                    {"field": "min"},
                )
        for side, amounts in (("min", self.min), ("max", self.max)):
            if amounts is not None:
                check_amounts(amounts, allow_zero=True, what=side)
        for name, low in (self.min or {}).items():
            high = (self.max or {}).get(name)
            if high is not None and low > high:
                raise InvalidError(
                    f"min {name} {low} is above max {name} {high}",
                    {"field": f"min.{name}", "min": low, "max": high},
                )
        if self.priority is not None:
            check_priority(self.priority)
        if self.owners is not None:
            check_ids("owners", self.owners)
        if self.groups is not None:
            check_ids("groups", self.groups)
        if self.weight is not None and not 0 < self.weight <= 1000:
            raise InvalidError(
                f"weight must be > 0 and <= 1000, got {self.weight:g}", {"field": "weight"}
            )


class TenantRemove(Message, frozen=True):
    name: str
    force: bool = False

    def check(self) -> None:
        check_name("tenant", self.name)


#: the most parts one gang may have
MAX_PARTS: Final = 16


class Part(Message, frozen=True):
    """One part of a gang: what one pool is asked for."""

    pool: str
    resources: dict[str, Int] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    constraints: dict[str, str] = field(default_factory=dict)
    contiguous: list[str] = field(default_factory=list)

    def request(self, base: Reserve | None = None) -> Reserve:
        """This part as a plain request (with ``base``'s tenant, ttl, binding, ...)."""
        return msgspec.structs.replace(
            base or Reserve(),
            pool=self.pool,
            resources=dict(self.resources),
            members={k: list(v) for k, v in self.members.items()},
            constraints=dict(self.constraints),
            contiguous=list(self.contiguous),
            parts=[],
        )


class Reserve(Message, frozen=True):
    """Reserve ``resources`` (internal units) in ``pool`` as ``tenant``.

    ``tenant`` defaults to the caller's Unix user name; ``ttl`` in seconds, none for
    no expiry; ``binding`` ``session`` releases when this connection closes.
    """

    pool: str | None = None
    resources: dict[str, Int] = field(default_factory=dict)
    tenant: str | None = None
    ttl: Float | None = None
    binding: Binding = "detached"
    label: str = ""
    reclaimable: bool = False
    members: dict[str, list[str]] = field(default_factory=dict)
    contiguous: list[str] = field(default_factory=list)
    constraints: dict[str, str] = field(default_factory=dict)
    selector: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None
    wait: bool = False
    timeout: Float | None = None
    deadline: Float | None = None
    pid: Int | None = None
    #: the attach token: a secret the client chooses for this request (SPEC §9).
    #: Presenting it again (``attach``, or this same ``reserve`` retried after a lost
    #: reply) re-binds the lease or waiter to the presenting connection.
    token: str | None = None
    #: a gang (SPEC §4): several parts granted all or nothing as one lease; then the
    #: parts say pool and amounts, and ``pool``/``resources``/``members``/
    #: ``constraints``/``contiguous``/``selector`` stay empty
    parts: list[Part] = field(default_factory=list)

    def check(self) -> None:
        if self.parts:
            self._check_gang()
        else:
            self._check_ask()
        self._check_common()

    def _check_gang(self) -> None:
        if self.pool or self.resources or self.members or self.constraints:
            raise InvalidError(
                "parts: a gang gives each part's pool and amounts; leave pool, resources,"
                " members and constraints empty",
                {"field": "parts"},
            )
        if self.contiguous or self.selector:
            raise InvalidError(
                "parts: contiguous and constraints go in each part; a gang has no selector",
                {"field": "parts"},
            )
        if not 2 <= len(self.parts) <= MAX_PARTS:
            raise InvalidError(
                f"parts: a gang has 2 to {MAX_PARTS} parts, got {len(self.parts)}",
                {"field": "parts"},
            )
        for i, part in enumerate(self.parts):
            try:
                part.request()._check_ask()
            except InvalidError as exc:
                raise InvalidError(
                    f"parts[{i}]: {exc.message}", {**exc.details, "part": i}
                ) from None

    def _check_common(self) -> None:
        check_token(self.token)
        if self.tenant is not None:
            check_name("tenant", self.tenant)
        check_wait("timeout", self.timeout)
        if self.timeout is not None and not self.wait:
            raise InvalidError(
                "timeout: only a waiting request (wait) has one", {"field": "timeout"}
            )
        if self.deadline is not None and not 0 < self.deadline < 2**33:
            raise InvalidError(
                "deadline: give a Unix time in seconds",
                {"field": "deadline", "value": self.deadline},
            )
        check_pid(self.pid)
        if self.pid is not None and self.binding != "pid":
            raise InvalidError("pid: only a pid binding names a process", {"field": "pid"})
        check_ttl(self.ttl)
        check_label(self.label)

    def _check_ask(self) -> None:
        """What one pool is asked for (a plain request, or one part of a gang)."""
        if self.pool is not None:
            check_name("pool", self.pool)
        # A resource named in ``members`` may leave its count at 0 (the names say it);
        # every other amount must be positive.
        counted = {k: v for k, v in self.resources.items() if k not in self.members}
        if counted or not self.members:
            check_amounts(counted, allow_zero=False)
        check_amounts(
            {k: v for k, v in self.resources.items() if k in self.members}, allow_zero=True
        )
        if not self.resources and not self.members:
            raise InvalidError(
                "resources: ask for at least one resource (e.g. cpu, memory, gpu)",
                {"field": "resources"},
            )
        for name, values in self.members.items():
            check_resource_name(name)
            if not 1 <= len(values) <= 4096 or any(not MEMBER.fullmatch(v) for v in values):
                raise InvalidError(
                    f"members.{name}: give 1 to 4096 member names or values like 30001 or 30005-30009",
                    {"field": f"members.{name}"},
                )
        for name in self.contiguous:
            check_resource_name(name)
            if name not in self.resources:
                raise InvalidError(f"contiguous: {name} is not requested", {"field": "contiguous"})
        if "gpu" in self.resources and "vram" in self.resources:
            raise InvalidError(
                "ask for whole GPUs (gpu) or a slice of one (vram), not both",
                {"field": "resources"},
            )
        check_labels(self.constraints, "constraints")
        check_labels(self.selector, "selector")
        if self.pool is not None and self.selector:
            raise InvalidError("give a pool or a label selector, not both", {"field": "selector"})


class ReservationRef(Message, frozen=True):
    id: str

    def check(self) -> None:
        check_reservation_id(self.id)


class Renew(Message, frozen=True):
    """Extend a reservation: its new expiry is now + ``ttl`` (default: its own ttl)."""

    id: str
    ttl: Float | None = None

    def check(self) -> None:
        check_reservation_id(self.id)
        check_ttl(self.ttl)


class Resize(Message, frozen=True):
    """Change a lease's amounts in place: ``resources`` gives the new amount of each
    resource named (internal units; a set or range resource a count; 0 gives it all
    back); the rest stays. Shrinking always succeeds: ``give_back`` names which set
    members (``{"gpu": ["3"]}``) or range values (``{"ports": ["30005-30009"]}``)
    go, else the last ones do. Growing is granted at once if it fits, else refused —
    or, with ``wait``, queued while the lease keeps what it holds (``timeout``
    seconds at most); the holder then gets a ``resized`` push. TTL and binding do
    not change."""

    id: str
    resources: dict[str, Int]
    give_back: dict[str, list[str]] = field(default_factory=dict)
    wait: bool = False
    timeout: Float | None = None

    def check(self) -> None:
        check_reservation_id(self.id)
        if not self.resources:
            raise InvalidError(
                "resources: name at least one resource and its new amount",
                {"field": "resources"},
            )
        check_amounts(self.resources, allow_zero=True)
        for name, values in self.give_back.items():
            check_resource_name(name)
            if not values:
                raise InvalidError(
                    f"give_back.{name}: name the members or values to give back",
                    {"field": f"give_back.{name}"},
                )
            if name not in self.resources and not (name == "gpu" and "vram" in self.resources):
                raise InvalidError(
                    f"give_back.{name}: give {name}'s new amount in resources too",
                    {"field": f"give_back.{name}"},
                )
        check_wait("timeout", self.timeout)
        if self.timeout is not None and not self.wait:
            raise InvalidError("timeout applies only with wait", {"field": "timeout"})


class Attach(Message, frozen=True):
    """Re-bind the lease or waiter made with ``token`` to this connection (after a
    reconnect). ``id``: the reservation the client knew, so that one that ended while
    it was away is reported (its final state) instead of ``not_found``."""

    token: str
    id: str | None = None

    def check(self) -> None:
        check_token(self.token)
        if self.id is not None:
            check_reservation_id(self.id)


class Preempt(Message, frozen=True):
    target: str
    tenant: str | None = None
    pool: str | None = None

    def check(self) -> None:
        check_name("tenant", self.target)
        if self.tenant is not None:
            check_name("tenant", self.tenant)
        if self.pool is not None:
            check_name("pool", self.pool)


class ListReservations(Message, frozen=True):
    """Active reservations, or with ``pending`` the queued requests in queue order."""

    pool: str | None = None
    tenant: str | None = None
    pending: bool = False
    #: only leases marked idle (``idle_after``)
    idle: bool = False

    def check(self) -> None:
        if self.pending and self.idle:
            raise InvalidError(
                "pending and idle cannot be combined: a waiting request holds no GPU",
                {"field": "idle"},
            )
        if self.pool is not None:
            check_name("pool", self.pool)
        if self.tenant is not None:
            check_name("tenant", self.tenant)


class Plan(Message, frozen=True):
    """Dry run of ``request`` at ``priority`` (default: its tenant's): would it fit,
    wait, or evict whom? Changes nothing."""

    request: Reserve
    priority: Int | None = None

    def check(self) -> None:
        if self.priority is not None:
            check_priority(self.priority)


class ResourcesOf(Message, frozen=True):
    """hypeman's GET /resources for one pool (the discovered ``host`` by default)."""

    pool: str = "host"

    def check(self) -> None:
        check_name("pool", self.pool)


class Export(Message, frozen=True):
    since: Float | None = None
    tenant: str | None = None

    def check(self) -> None:
        if self.tenant is not None:
            check_name("tenant", self.tenant)


class Subscribe(Message, frozen=True):
    """Ask for ``state`` pushes (a fresh status after every change)."""

    topics: list[Literal["state", "top"]] = field(default_factory=lambda: ["state"])

    def check(self) -> None:
        if not self.topics:
            raise InvalidError("topics: name at least one of state, top", {"field": "topics"})


class Register(Message, frozen=True):
    """Add process ``pid`` (and its descendants) to lease ``id``'s processes, for GPU
    attribution (SPEC §10): ``resctl run`` registers its CMD. The process must be
    alive and belong to the caller's uid (or the caller be an admin). ``confine``:
    also put it in a cgroup limited to the lease's CPU and memory, where the host
    allows (``enforcement`` then says ``cgroup``; otherwise it runs unconfined)."""

    id: str
    pid: Int
    confine: bool = False

    def check(self) -> None:
        check_reservation_id(self.id)
        check_pid(self.pid)


#: op name → argument type. The daemon's dispatch table must cover exactly these.
OPS: Final[dict[str, type]] = {
    "hello": Hello,
    "pool.create": PoolCreate,
    "pool.list": Empty,
    "pool.show": PoolName,
    "pool.set": PoolSet,
    "pool.delete": PoolDelete,
    "tenant.add": TenantAdd,
    "tenant.list": Empty,
    "tenant.show": TenantName,
    "tenant.set": TenantSet,
    "tenant.remove": TenantRemove,
    "reserve": Reserve,
    "release": ReservationRef,
    "renew": Renew,
    "preempt": Preempt,
    "list": ListReservations,
    "status": Empty,
    "export": Export,
    "subscribe": Subscribe,
    "resources": ResourcesOf,
    "why": ReservationRef,
    "plan": Plan,
    "attach": Attach,
    "register": Register,
    "top": Empty,
    "resize": Resize,
    "metrics": Empty,
}
