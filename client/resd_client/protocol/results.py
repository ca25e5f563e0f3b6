"""The result type of every op, and ``RESULTS``, op name → result type (SPEC §1).

The daemon packs these as maps; the client decodes a reply's ``result`` into the
type ``RESULTS`` names for its op, with ``decode_result``.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from msgspec import field

from resd_client.protocol.convert import Float, Int, Message

#: the strongest guard the host gives a reservation (SPEC §10), strongest first
Enforcement = Literal["mig", "mps", "cgroup", "framework", "watch", "none"]
ReservationState = Literal[
    "pending", "active", "terminating", "released", "expired", "preempted", "cancelled"
]


class HelloResult(Message, frozen=True):
    server_version: str
    protocol: Int
    boot_id: str
    uid: Int
    gid: Int
    pid: Int
    admin: bool
    user_tenant: str


class MemberUsage(Message, frozen=True):
    name: str
    capacity: Int
    allocated: Int
    whole: bool
    holders: Int
    labels: dict[str, str]


class ResourceUsage(Message, frozen=True):
    """One resource of a pool, hypeman's shape: effective = capacity × ratio."""

    name: str
    unit: str
    capacity: Int
    ratio: Float
    effective: Int
    allocated: Int
    available: Int
    kind: str = "scalar"
    source: str = "configured"
    lo: Int | None = None
    hi: Int | None = None
    members: list[MemberUsage] = field(default_factory=list)


class PoolInfo(Message, frozen=True):
    name: str
    resources: list[ResourceUsage]
    max_per_tenant: Int
    preemption: str
    placement: str
    grace: Float
    labels: dict[str, str]
    created_at: Float
    active: Int
    overuse: str = "warn"
    idle_after: Float = 0.0
    adopt_foreign: bool = False
    #: live GPU figures from the last sample (empty when nothing is sampled)
    devices: list[DeviceUse] = field(default_factory=list)
    #: how many leases carry each mark now (``overuse``, ``idle``)
    marks: dict[str, Int] = field(default_factory=dict)
    #: tenant → its quota here and what it holds
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)


class QuotaInfo(Message, frozen=True):
    """A tenant's quota in one pool and what it holds there now (internal units; a
    set resource counts members). Above ``min`` it is borrowing."""

    min: dict[str, Int] = field(default_factory=dict)
    max: dict[str, Int] = field(default_factory=dict)
    used: dict[str, Int] = field(default_factory=dict)


class TenantInfo(Message, frozen=True):
    name: str
    priority: Int
    owners: list[Int]
    groups: list[Int]
    weight: Float
    created_at: Float
    active: Int = 0
    #: pool → its quota there (``tenant show``)
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)
    #: fair share: its decayed usage (dominant-share seconds, SPEC §4) and that
    #: usage's part of all tenants' (0 to 1)
    usage: Float = 0.0
    share: Float = 0.0


class ReservationInfo(Message, frozen=True):
    id: str
    tenant: str
    pool: str
    resources: dict[str, Int]
    label: str
    created_at: Float
    ttl: Float | None
    expires_at: Float | None
    binding: str
    reclaimable: bool
    state: str
    uid: Int
    ended_at: Float | None = None
    members: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[list[Int]]] = field(default_factory=dict)
    devices: list[dict[str, str]] = field(default_factory=list)
    priority: Int = 0
    pid: Int | None = None
    #: for a ``pending`` request: its place in the queue (1 = head) and why it waits;
    #: for one that ended: why
    position: Int = 0
    reason: str = ""
    #: for a ``terminating`` lease: when its grace ends
    deadline: Float | None = None
    #: the strongest guard the host gives it (SPEC §10): mig, mps, cgroup, framework,
    #: watch, none
    enforcement: str = "none"
    #: the cgroup its registered processes run in (CPU / memory limits), "" when none
    cgroup: str = ""
    #: ``overuse`` / ``idle`` → what was seen, while the mark stands
    marks: dict[str, str] = field(default_factory=dict)
    #: processes registered to it (``register``), besides its pid / session peer
    processes: list[Int] = field(default_factory=list)
    #: a gang's parts (one per pool ask), all granted and ended together; the lease's
    #: own amounts, members and devices are theirs together
    parts: list[ReservationInfo] = field(default_factory=list)


class HistoryEvent(Message, frozen=True):
    seq: Int
    at: Float
    kind: str
    reservation: str
    tenant: str
    pool: str
    resources: dict[str, Int]
    detail: str = ""


class ResourceStatus(Message, frozen=True):
    """hypeman's ResourceStatus: effective_limit = capacity × oversub_ratio,
    available = effective_limit − allocated (internal units, see ``unit``)."""

    capacity: Int
    effective_limit: Int
    allocated: Int
    available: Int
    oversub_ratio: Float
    source: str
    unit: str


class DeviceUse(Message, frozen=True):
    """One GPU (or MIG instance) as the last sample saw it: ``member`` is its name in
    the pool's ``gpu`` set; ``foreign`` the bytes held by no lease's processes
    (unmanaged work, the driver's own); ``overuse`` bytes leases hold beyond what they
    reserved here; ``utilization`` percent (None: not reported)."""

    member: str
    uuid: str
    memory_total: Int
    memory_used: Int
    foreign: Int
    overuse: Int = 0
    utilization: Int | None = None
    foreign_pids: list[Int] = field(default_factory=list)
    at: Float = 0.0


class GpuStatus(Message, frozen=True):
    """One GPU of the pool's ``gpu`` set: its memory and who holds it."""

    name: str
    index: str
    uuid: str
    model: str
    numa: str
    memory_bytes: Int
    vram_allocated: Int
    whole: bool
    holders: Int
    #: live, from the last sample (None when it is not sampled)
    memory_used: Int | None = None
    foreign_bytes: Int = 0
    utilization: Int | None = None


class Allocation(Message, frozen=True):
    """hypeman's AllocationBreakdown, per reservation (cpu in millicores)."""

    reservation_id: str
    name: str
    tenant: str
    cpu: Int
    memory_bytes: Int
    disk_bytes: Int
    network_bps: Int
    disk_io_bps: Int
    gpus: list[str]
    vram_bytes: Int
    other: dict[str, Int]
    #: live GPU memory its processes hold (from the last sample), and its marks
    vram_used_bytes: Int = 0
    marks: dict[str, str] = field(default_factory=dict)


class HostResources(Message, frozen=True):
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


class PoolList(Message, frozen=True):
    pools: list[PoolInfo]


class TenantList(Message, frozen=True):
    tenants: list[TenantInfo]


class ReservationList(Message, frozen=True):
    reservations: list[ReservationInfo]


class Status(Message, frozen=True):
    server_version: str
    boot_id: str
    started_at: Float
    pools: list[PoolInfo]
    tenants: Int
    active: Int
    connections: Int


class History(Message, frozen=True):
    events: list[HistoryEvent]


class Done(Message, frozen=True):
    """Result of ops that report only success."""

    removed: Int = 0


class Preempted(Message, frozen=True):
    reservations: list[ReservationInfo]


class WaitInfo(Message, frozen=True):
    """Why a request waits: ``reason`` is ``resources`` (``details.resources`` has the
    per-resource shortfall, or ``details.held_for`` the waiter ahead that needs the
    same resources), ``conflict``, ``preemption_pending`` (``details.victims``) or
    ``none`` (it is not waiting; ``state`` says what it is)."""

    id: str
    state: str
    position: Int
    queued: Int
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class PlanResult(Message, frozen=True):
    """``fits``: granted at once; ``wait``: would queue; ``preempt``: would evict
    ``victims`` (after ``grace`` seconds); ``reclaim``: would take ``victims`` back
    from borrowers (the tenant asks within its quota's min); ``never``: cannot fit
    even so."""

    outcome: Literal["fits", "wait", "preempt", "reclaim", "never"]
    pool: str
    message: str
    victims: list[ReservationInfo] = field(default_factory=list)
    grace: Float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class TopRow(Message, frozen=True):
    """One lease as ``resctl top`` shows it: what it reserved and what its processes
    use now. ``cpu_percent`` is of one core (200.0 = two cores busy); ``rss`` bytes;
    ``gpu_memory`` / ``gpu_utilization`` by gpu member name; ``idle_for`` seconds its
    GPUs and processes have been idle (0: busy, or not a GPU lease)."""

    id: str
    tenant: str
    pool: str
    state: str
    label: str
    priority: Int
    resources: dict[str, Int]
    members: dict[str, list[str]] = field(default_factory=dict)
    pids: list[Int] = field(default_factory=list)
    cpu_percent: Float = 0.0
    rss: Int = 0
    gpu_memory: dict[str, Int] = field(default_factory=dict)
    gpu_utilization: dict[str, Int] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)
    enforcement: str = "none"
    idle_for: Float = 0.0
    created_at: Float = 0.0


class TopSnapshot(Message, frozen=True):
    """Every lease's live use at ``at``, sampled every ``interval`` seconds;
    ``devices`` per pool (pool → its GPUs); ``gpu_sampling`` says why GPUs are not
    sampled ("" when they are)."""

    at: Float
    interval: Float
    rows: list[TopRow] = field(default_factory=list)
    devices: dict[str, list[DeviceUse]] = field(default_factory=dict)
    gpu_sampling: str = ""


class MetricsText(Message, frozen=True):
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
