"""The result type of every op, and ``RESULTS``, op name → result type (SPEC §1).

The daemon packs these as maps; the client decodes a reply's ``result`` into the
type ``RESULTS`` names for its op, with ``from_wire``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

#: the strongest guard the host gives a reservation (SPEC §10), strongest first
Enforcement = Literal["mig", "mps", "cgroup", "framework", "watch", "none"]
ReservationState = Literal[
    "pending", "active", "terminating", "released", "expired", "preempted", "cancelled"
]


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloResult:
    server_version: str
    protocol: int
    boot_id: str
    uid: int
    gid: int
    pid: int
    admin: bool
    user_tenant: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberUsage:
    name: str
    capacity: int
    allocated: int
    whole: bool
    holders: int
    labels: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceUsage:
    """One resource of a pool, hypeman's shape: effective = capacity × ratio."""

    name: str
    unit: str
    capacity: int
    ratio: float
    effective: int
    allocated: int
    available: int
    kind: str = "scalar"
    source: str = "configured"
    lo: int | None = None
    hi: int | None = None
    members: list[MemberUsage] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolInfo:
    name: str
    resources: list[ResourceUsage]
    max_per_tenant: int
    preemption: str
    placement: str
    grace: float
    labels: dict[str, str]
    created_at: float
    active: int
    overuse: str = "warn"
    idle_after: float = 0.0
    adopt_foreign: bool = False
    #: live GPU figures from the last sample (empty when nothing is sampled)
    devices: list[DeviceUse] = field(default_factory=list)
    #: how many leases carry each mark now (``overuse``, ``idle``)
    marks: dict[str, int] = field(default_factory=dict)
    #: tenant → its quota here and what it holds
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaInfo:
    """A tenant's quota in one pool and what it holds there now (internal units; a
    set resource counts members). Above ``min`` it is borrowing."""

    min: dict[str, int] = field(default_factory=dict)
    max: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantInfo:
    name: str
    priority: int
    owners: list[int]
    groups: list[int]
    weight: float
    created_at: float
    active: int = 0
    #: pool → its quota there (``tenant show``)
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)
    #: fair share: its decayed usage (dominant-share seconds, SPEC §4) and that
    #: usage's part of all tenants' (0 to 1)
    usage: float = 0.0
    share: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationInfo:
    id: str
    tenant: str
    pool: str
    resources: dict[str, int]
    label: str
    created_at: float
    ttl: float | None
    expires_at: float | None
    binding: str
    reclaimable: bool
    state: str
    uid: int
    ended_at: float | None = None
    members: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[list[int]]] = field(default_factory=dict)
    devices: list[dict[str, str]] = field(default_factory=list)
    priority: int = 0
    pid: int | None = None
    #: for a ``pending`` request: its place in the queue (1 = head) and why it waits;
    #: for one that ended: why
    position: int = 0
    reason: str = ""
    #: for a ``terminating`` lease: when its grace ends
    deadline: float | None = None
    #: the strongest guard the host gives it (SPEC §10): mig, mps, cgroup, framework,
    #: watch, none
    enforcement: str = "none"
    #: the cgroup its registered processes run in (CPU / memory limits), "" when none
    cgroup: str = ""
    #: ``overuse`` / ``idle`` → what was seen, while the mark stands
    marks: dict[str, str] = field(default_factory=dict)
    #: processes registered to it (``register``), besides its pid / session peer
    processes: list[int] = field(default_factory=list)
    #: a gang's parts (one per pool ask), all granted and ended together; the lease's
    #: own amounts, members and devices are theirs together
    parts: list[ReservationInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEvent:
    seq: int
    at: float
    kind: str
    reservation: str
    tenant: str
    pool: str
    resources: dict[str, int]
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceStatus:
    """hypeman's ResourceStatus: effective_limit = capacity × oversub_ratio,
    available = effective_limit − allocated (internal units, see ``unit``)."""

    capacity: int
    effective_limit: int
    allocated: int
    available: int
    oversub_ratio: float
    source: str
    unit: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceUse:
    """One GPU (or MIG instance) as the last sample saw it: ``member`` is its name in
    the pool's ``gpu`` set; ``foreign`` the bytes held by no lease's processes
    (unmanaged work, the driver's own); ``overuse`` bytes leases hold beyond what they
    reserved here; ``utilization`` percent (None: not reported)."""

    member: str
    uuid: str
    memory_total: int
    memory_used: int
    foreign: int
    overuse: int = 0
    utilization: int | None = None
    foreign_pids: list[int] = field(default_factory=list)
    at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuStatus:
    """One GPU of the pool's ``gpu`` set: its memory and who holds it."""

    name: str
    index: str
    uuid: str
    model: str
    numa: str
    memory_bytes: int
    vram_allocated: int
    whole: bool
    holders: int
    #: live, from the last sample (None when it is not sampled)
    memory_used: int | None = None
    foreign_bytes: int = 0
    utilization: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Allocation:
    """hypeman's AllocationBreakdown, per reservation (cpu in millicores)."""

    reservation_id: str
    name: str
    tenant: str
    cpu: int
    memory_bytes: int
    disk_bytes: int
    network_bps: int
    disk_io_bps: int
    gpus: list[str]
    vram_bytes: int
    other: dict[str, int]
    #: live GPU memory its processes hold (from the last sample), and its marks
    vram_used_bytes: int = 0
    marks: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostResources:
    pool: str
    resources: dict[str, ResourceStatus]
    gpus: list[GpuStatus]
    allocations: list[Allocation]
    #: tenant → its quota in this pool and what it holds (resd's addition)
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)
    #: NUMA node (as ``GpuStatus.numa``) → the host's CPUs on it, in ``CPU_LIST``
    #: form; nodes the daemon could not read are absent, and so is the whole map
    #: from daemons before it (what ``resctl export --format slurm`` needs for
    #: gres.conf ``Cores=``)
    numa_cpus: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolList:
    pools: list[PoolInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantList:
    tenants: list[TenantInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationList:
    reservations: list[ReservationInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    server_version: str
    boot_id: str
    started_at: float
    pools: list[PoolInfo]
    tenants: int
    active: int
    connections: int


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    events: list[HistoryEvent]


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """Result of ops that report only success."""

    removed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Preempted:
    reservations: list[ReservationInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitInfo:
    """Why a request waits: ``reason`` is ``resources`` (``details.resources`` has the
    per-resource shortfall, or ``details.held_for`` the waiter ahead that needs the
    same resources), ``conflict``, ``preemption_pending`` (``details.victims``) or
    ``none`` (it is not waiting; ``state`` says what it is)."""

    id: str
    state: str
    position: int
    queued: int
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanResult:
    """``fits``: granted at once; ``wait``: would queue; ``preempt``: would evict
    ``victims`` (after ``grace`` seconds); ``reclaim``: would take ``victims`` back
    from borrowers (the tenant asks within its quota's min); ``never``: cannot fit
    even so."""

    outcome: Literal["fits", "wait", "preempt", "reclaim", "never"]
    pool: str
    message: str
    victims: list[ReservationInfo] = field(default_factory=list)
    grace: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopRow:
    """One lease as ``resctl top`` shows it: what it reserved and what its processes
    use now. ``cpu_percent`` is of one core (200.0 = two cores busy); ``rss`` bytes;
    ``gpu_memory`` / ``gpu_utilization`` by gpu member name; ``idle_for`` seconds its
    GPUs and processes have been idle (0: busy, or not a GPU lease)."""

    id: str
    tenant: str
    pool: str
    state: str
    label: str
    priority: int
    resources: dict[str, int]
    members: dict[str, list[str]] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    cpu_percent: float = 0.0
    rss: int = 0
    gpu_memory: dict[str, int] = field(default_factory=dict)
    gpu_utilization: dict[str, int] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)
    enforcement: str = "none"
    idle_for: float = 0.0
    created_at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TopSnapshot:
    """Every lease's live use at ``at``, sampled every ``interval`` seconds;
    ``devices`` per pool (pool → its GPUs); ``gpu_sampling`` says why GPUs are not
    sampled ("" when they are)."""

    at: float
    interval: float
    rows: list[TopRow] = field(default_factory=list)
    devices: dict[str, list[DeviceUse]] = field(default_factory=dict)
    gpu_sampling: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsText:
    """The daemon's Prometheus metrics in the text exposition format, as its
    HTTP endpoint serves them (for node_exporter's textfile collector)."""

    text: str


#: op name → result type; the client decodes replies through this.
RESULTS: Final[dict[str, type]] = {
    "hello": HelloResult,
    "pool.create": PoolInfo,
    "pool.list": PoolList,
    "pool.show": PoolInfo,
    "pool.set": PoolInfo,
    "pool.delete": Done,
    "tenant.add": TenantInfo,
    "tenant.list": TenantList,
    "tenant.show": TenantInfo,
    "tenant.set": TenantInfo,
    "tenant.remove": Done,
    "reserve": ReservationInfo,
    "release": ReservationInfo,
    "renew": ReservationInfo,
    "preempt": Preempted,
    "list": ReservationList,
    "status": Status,
    "export": History,
    "subscribe": Status,
    "resources": HostResources,
    "why": WaitInfo,
    "plan": PlanResult,
    "attach": ReservationInfo,
    "register": ReservationInfo,
    "top": TopSnapshot,
    "resize": ReservationInfo,
    "metrics": MetricsText,
}
