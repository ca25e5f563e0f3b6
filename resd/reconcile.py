"""What the reconciler concludes from one look at the host (SPEC §10): pure.

Each tick the reconciler gathers an ``Observation`` (GPU samples, the process table)
and the live leases as ``LeaseView``s; ``Judge.step`` turns them into a ``Verdict``:
the marks each lease should carry (``overuse``, ``idle``), the GPU memory held outside
the ledger per pool member (what VRAM admission must leave alone), live figures per
device, a ``top`` row per lease, the processes a terminated lease owns, and foreign
GPU processes (for ``adopt_foreign``). The judge remembers only what spans ticks: CPU
times seen, and since when each lease has been idle. No clock, no I/O: time is
``Observation.at``, so tests drive it sample by sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

from resd.gpu_usage import Attribution, GpuSample, LeaseGpus, Overuse, attribute
from resd_client.protocol import DeviceUse, TopRow

#: below this share of one core, a lease's processes count as using no CPU (a
#: sleeping process still wakes for a timer now and then)
IDLE_CPU_SHARE = 0.01


@attrs.frozen
class ProcInfo:
    """One process as the table saw it: ``cpu`` seconds (user + system) so far."""

    pid: int
    ppid: int
    start: float
    uid: int
    cpu: float = 0.0
    rss: int = 0


@attrs.frozen
class DeviceRef:
    """A GPU (or MIG instance) of a pool: its member name and NVML uuid."""

    pool: str
    member: str
    uuid: str
    capacity: int


@attrs.frozen
class LeaseView:
    """What the judge needs of one live lease. ``roots``: the processes whose trees
    are its own; ``work``: the trees whose CPU says whether it is busy (its registered
    processes when it has any — not the ``resctl run`` that waits for them);
    ``reserved``: bytes by device uuid (a whole GPU or MIG instance: all of it)."""

    id: str
    tenant: str
    pool: str
    state: str
    label: str
    priority: int
    uid: int
    created_at: float
    resources: dict[str, int]
    members: dict[str, tuple[str, ...]]
    roots: tuple[int, ...]
    work: tuple[int, ...]
    reserved: dict[str, int]
    enforcement: str = "none"
    marks: dict[str, str] = attrs.Factory(dict)
    idle_after: float = 0.0


@attrs.frozen
class Observation:
    """One look at the host at wall time ``at``. ``samples`` None: GPUs are not
    sampled (``gpu_error`` says why, "" when there are none)."""

    at: float
    samples: list[GpuSample] | None
    procs: dict[int, ProcInfo]
    gpu_error: str = ""


@attrs.frozen
class ForeignProcess:
    """A GPU process of no lease, with what adoption needs to bind a lease to it."""

    uuid: str
    pid: int
    used: int
    start: float
    uid: int


@attrs.frozen
class Verdict:
    #: live lease → the marks it should carry now (mark → what was seen)
    marks: dict[str, dict[str, str]]
    #: pool → member → GPU bytes held outside the ledger (foreign use, over-use)
    outside: dict[str, dict[str, int]]
    #: pool → its devices as sampled (empty when GPUs are not sampled)
    devices: dict[str, list[DeviceUse]]
    #: live lease → GPU bytes its processes hold, over all devices
    vram_used: dict[str, int]
    rows: list[TopRow]
    #: live lease → its processes (pid, start time, uid): what ``terminate`` signals
    processes: dict[str, tuple[ProcInfo, ...]]
    foreign: list[ForeignProcess]
    sampled: bool


def _descendants(roots: Iterable[int], children: dict[int, list[int]]) -> list[int]:
    """``roots`` that exist and all their descendants, each once, roots first."""
    out: list[int] = []
    seen: set[int] = set()
    stack = [r for r in roots if r in children]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def ancestry(samples: Iterable[GpuSample], procs: dict[int, ProcInfo]) -> frozenset[int]:
    """The GPU processes of ``samples`` and all their ancestors: the only pids a lease
    must be rooted at for a sample to concern it (besides leases holding GPUs)."""
    out: set[int] = set()
    for sample in samples:
        for gpu_proc in sample.processes:
            pid: int | None = gpu_proc.pid
            while pid is not None and pid not in out:
                out.add(pid)
                info = procs.get(pid)
                pid = None if info is None or info.ppid == pid else info.ppid
    return frozenset(out)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


@attrs.define
class Judge:
    """Carries CPU times and idle starts from one observation to the next."""

    #: pid → (start time, cpu seconds, when seen)
    cpu_seen: dict[int, tuple[float, float, float]] = attrs.Factory(dict)
    #: lease → wall time since which it has been idle
    idle_since: dict[str, float] = attrs.Factory(dict)
    #: bytes kept free on every sampled GPU (``gpu_memory_margin``)
    margin: int = 0

    def step(self, obs: Observation, leases: list[LeaseView], devices: list[DeviceRef]) -> Verdict:
        children: dict[int, list[int]] = {pid: [] for pid in obs.procs}
        for p in obs.procs.values():
            if p.ppid in children and p.ppid != p.pid:
                children[p.ppid].append(p.pid)
        parent = {p.pid: p.ppid for p in obs.procs.values()}
        cpu_rate = self._cpu_rates(obs)
        samples = obs.samples or []
        attribution = attribute(
            samples, [LeaseGpus(v.id, v.roots, v.reserved) for v in leases], parent
        )
        by_uuid = {s.uuid: s for s in samples}
        names = {d.uuid: d.member for d in devices}

        def where(uuid: str) -> str:
            return f"gpu {names[uuid]}" if uuid in names else f"GPU {uuid}"

        marks: dict[str, dict[str, str]] = {}
        rows: list[TopRow] = []
        processes: dict[str, tuple[ProcInfo, ...]] = {}
        vram_used: dict[str, int] = {}
        for v in leases:
            use = attribution.leases[v.id]
            tree = _descendants(v.roots, children)
            work = _descendants(v.work, children) if v.work != v.roots else tree
            wanted: dict[str, str] = {}
            if use.overuse and obs.samples is not None:
                wanted["overuse"] = "; ".join(_overuse_text(o, where) for o in use.overuse)
            gpu_util = {
                names.get(u, u): by_uuid[u].utilization or 0 for u in v.reserved if u in by_uuid
            }
            idle_for = self._idle_for(obs, v, work, cpu_rate, gpu_util)
            if v.idle_after and idle_for >= v.idle_after:
                wanted["idle"] = (
                    f"GPUs at 0% and no CPU for {idle_for:.0f}s (idle_after {v.idle_after:g}s)"
                )
            if obs.samples is None:  # nothing to judge by: keep what stands
                wanted = {k: v.marks[k] for k in ("overuse",) if k in v.marks} | wanted
            marks[v.id] = wanted
            gpu_pids = set(use.pids)
            processes[v.id] = tuple(
                obs.procs[pid]
                for pid in dict.fromkeys([*work, *sorted(gpu_pids)])
                if pid in obs.procs
            )
            vram_used[v.id] = sum(use.used.values())
            rows.append(
                TopRow(
                    id=v.id,
                    tenant=v.tenant,
                    pool=v.pool,
                    state=v.state,
                    label=v.label,
                    priority=v.priority,
                    resources=dict(v.resources),
                    members={k: list(m) for k, m in v.members.items()},
                    pids=sorted(set(tree) | gpu_pids),
                    cpu_percent=round(sum(cpu_rate.get(p, 0.0) for p in tree) * 100, 1),
                    rss=sum(obs.procs[p].rss for p in tree),
                    gpu_memory={names.get(u, u): b for u, b in sorted(use.used.items())},
                    gpu_utilization=gpu_util,
                    marks=wanted,
                    enforcement=v.enforcement,
                    idle_for=round(idle_for, 1),
                    created_at=v.created_at,
                )
            )
        live = {v.id for v in leases}
        self.idle_since = {k: t for k, t in self.idle_since.items() if k in live}
        outside, per_pool = self._devices(obs, devices, attribution, leases)
        foreign = [
            ForeignProcess(uuid, pid, by_uuid[uuid].used_by(pid), info.start, info.uid)
            for uuid, pids in sorted(attribution.foreign_pids.items())
            for pid in pids
            for info in [obs.procs.get(pid)]
            if info is not None and by_uuid[uuid].used_by(pid) > 0
        ]
        return Verdict(
            marks=marks,
            outside=outside,
            devices=per_pool,
            vram_used=vram_used,
            rows=rows,
            processes=processes,
            foreign=foreign,
            sampled=obs.samples is not None,
        )

    def _cpu_rates(self, obs: Observation) -> dict[int, float]:
        """pid → cores used since the last observation; a process seen for the first
        time counts as busy (1.0: its past is unknown), never as idle."""
        rates: dict[int, float] = {}
        seen: dict[int, tuple[float, float, float]] = {}
        for p in obs.procs.values():
            before = self.cpu_seen.get(p.pid)
            if before is not None and before[0] == p.start and obs.at > before[2]:
                rates[p.pid] = max(0.0, p.cpu - before[1]) / (obs.at - before[2])
            else:
                rates[p.pid] = 1.0
            seen[p.pid] = (p.start, p.cpu, obs.at)
        self.cpu_seen = seen
        return rates

    def _idle_for(
        self,
        obs: Observation,
        v: LeaseView,
        work: list[int],
        cpu_rate: dict[int, float],
        gpu_util: dict[str, int],
    ) -> float:
        """How long ``v`` has been idle: a GPU lease whose devices show 0% and whose
        working processes use no CPU. Seconds (0: busy, or not a GPU lease)."""
        idle = (
            bool(v.reserved)
            and obs.samples is not None
            and len(gpu_util) == len(v.reserved)
            and not any(gpu_util.values())
            and sum(cpu_rate.get(p, 0.0) for p in work) < IDLE_CPU_SHARE
        )
        if not idle:
            self.idle_since.pop(v.id, None)
            return 0.0
        since = self.idle_since.setdefault(v.id, obs.at)
        return obs.at - since

    def _devices(
        self,
        obs: Observation,
        devices: list[DeviceRef],
        attribution: Attribution,
        leases: list[LeaseView],
    ) -> tuple[dict[str, dict[str, int]], dict[str, list[DeviceUse]]]:
        outside: dict[str, dict[str, int]] = {}
        per_pool: dict[str, list[DeviceUse]] = {}
        if obs.samples is None:
            return outside, per_pool
        by_uuid = {s.uuid: s for s in obs.samples}
        reserved = {v.id: v.reserved for v in leases}
        for d in devices:
            sample = by_uuid.get(d.uuid)
            if sample is None:
                continue
            managed = entitled = 0
            for rid, use in attribution.leases.items():
                held = use.used.get(d.uuid, 0)
                managed += held
                entitled += min(held, reserved[rid].get(d.uuid, 0))
            foreign = max(0, sample.memory_used - managed)
            excess = managed - entitled
            outside.setdefault(d.pool, {})[d.member] = foreign + excess + self.margin
            per_pool.setdefault(d.pool, []).append(
                DeviceUse(
                    member=d.member,
                    uuid=d.uuid,
                    memory_total=sample.memory_total,
                    memory_used=sample.memory_used,
                    foreign=foreign,
                    overuse=excess,
                    utilization=sample.utilization,
                    foreign_pids=list(attribution.foreign_pids.get(d.uuid, ())),
                    at=obs.at,
                )
            )
        return outside, per_pool


def _overuse_text(o: Overuse, where: Callable[[str], str]) -> str:
    place = where(o.device)
    if o.reserved == 0:
        return f"uses {place} ({_gib(o.used)}), which is not assigned to it"
    return f"holds {_gib(o.used)} on {place} where it reserved {_gib(o.reserved)}"
