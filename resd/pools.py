"""The pool book: pools, active reservations, allocation sums and history.

Pure and synchronous: no I/O, no clock (``now`` is passed in), no awaits. Decision
methods read the book and return the events a request would cause, or raise a
``ResdError``; only ``apply`` changes the book, and it is also what replay calls.
The pool actor is the book's one owner.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs
import msgspec

from resd import quotas
from resd.fairshare import HALF_LIFE, FairShare, share
from resd.gpu_usage import enforcement_of, stronger
from resd.holdings import GPU, VRAM, Placement, PoolHoldings, members_of, shortfall
from resd.records import (
    EMPTY,
    Capacity,
    Denied,
    Ended,
    Marked,
    Pool,
    PoolChanged,
    PoolCreated,
    PoolDeleted,
    PoolEvent,
    Queued,
    Quota,
    Rebound,
    Registered,
    Renewed,
    Reservation,
    Reserved,
    Resized,
    Tenant,
    Terminating,
    Waiting,
    converter,
    shared_amounts,
)
from resd_client.errors import (
    ERRORS,
    ConflictError,
    ErrorCode,
    ExistsError,
    ForbiddenError,
    InsufficientError,
    InvalidError,
    NotFoundError,
    ResdError,
)
from resd_client.protocol import (
    Allocation,
    DeviceUse,
    GpuStatus,
    HistoryEvent,
    HostResources,
    PoolCreate,
    PoolInfo,
    PoolSet,
    QuotaInfo,
    Renew,
    ReservationInfo,
    Reserve,
    ResourceStatus,
    ResourceUsage,
    to_wire,
)
from resd_client.quantity import render_quantity, unit_of

LIVE = ("active", "terminating")
#: processes one lease may have registered (resctl run registers one)
MAX_PROCS = 64
#: where a request of scalar amounts only goes: nowhere in particular
_NOTHING_PLACED = Placement(EMPTY, EMPTY, (), EMPTY)
_intern = sys.intern
_MEMO_MAX = 4096  # shares remembered per (pool, amounts); then it starts over


@attrs.define(eq=False)
class PoolBook:
    """All pools and their reservations; the one place allocation is decided."""

    history_limit: int = 100_000
    pools: dict[str, Pool] = attrs.Factory(dict)
    reservations: dict[str, Reservation] = attrs.Factory(dict)
    allocated: dict[str, dict[str, int]] = attrs.Factory(dict)
    history: deque[HistoryEvent] = attrs.field(init=False)
    seq: int = 0
    #: (pool, tenant) → that tenant's live reservations there (conflict checks, quotas),
    #: each with its dominant share of the pool when granted (what fair share counts
    #: for it until it ends). One map for both: a small dict costs less than a set.
    _held: dict[tuple[str, str], dict[str, float]] = attrs.Factory(dict)
    #: pool → who holds which set members and range values.
    holdings: dict[str, PoolHoldings] = attrs.Factory(dict)
    #: tenant → live reservations, for fair-share ranking of waiters.
    tenant_live: Counter[str] = attrs.Factory(Counter)
    #: connection id → its session-bound reservations (released when it closes)
    by_session: dict[str, set[str]] = attrs.Factory(dict)
    #: queued requests (journaled, so that waiters keep their place across restarts)
    waiting: dict[str, Waiting] = attrs.Factory(dict)
    #: attach token → the live reservation or waiter that carries it
    by_token: dict[str, str] = attrs.Factory(dict)
    #: whether an MPS control daemon serves this host's GPUs (decides ``enforcement``)
    mps: bool = False
    #: what the last GPU sample saw (not journaled; the reconciler sets it):
    #: pool → its devices, and live lease → GPU memory its processes hold
    live_devices: dict[str, list[DeviceUse]] = attrs.Factory(dict)
    live_vram: dict[str, int] = attrs.Factory(dict)
    #: what the reconciler looks at each sample, without walking every reservation:
    #: root pid → leases (SPEC §10 attribution), leases holding GPUs, marked leases
    by_root: dict[int, set[str]] = attrs.Factory(dict)
    gpu_held: set[str] = attrs.Factory(set)
    marked: set[str] = attrs.Factory(set)
    #: decayed usage per tenant (fair share)
    fair: FairShare = attrs.Factory(FairShare)
    #: (pool, id of an amounts map) → (the pool, the map, the share of those amounts in
    #: it): leases come in a few shapes, whose records share one map per shape
    #: (``shared_amounts``), so a share is computed once per shape and its float shared.
    #: An entry holds its map, so while it is here no other map has that id.
    _share_memo: dict[tuple[str, int], tuple[Pool, dict[str, int], float]] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.history = deque(maxlen=self.history_limit)

    # ---------------------------------------------------------------- queries

    def pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise NotFoundError(
                f"pool {name!r} does not exist; pools: {', '.join(sorted(self.pools)) or 'none'}",
                {"pool": name},
            ) from None

    def reservation(self, rid: str) -> Reservation:
        try:
            return self.reservations[rid]
        except KeyError:
            raise NotFoundError(
                f"reservation {rid} is not active (released, expired or unknown)", {"id": rid}
            ) from None

    def held(self, pool: str, tenant: str) -> set[str]:
        return set(self._held.get((pool, tenant), ()))

    def active_in(self, pool: str) -> list[Reservation]:
        return [r for r in self.reservations.values() if r.pool == pool]

    def of_tenant(self, tenant: str, pool: str | None = None) -> list[Reservation]:
        return [
            r
            for r in self.reservations.values()
            if r.tenant == tenant and (pool is None or r.pool == pool)
        ]

    def available(self, pool: Pool, resource: str) -> int:
        return pool.resources[resource].effective - self.used(pool, resource)

    def used(self, pool: Pool, resource: str) -> int:
        """Allocated units: scalar sums, held values of a range, busy members of a set."""
        cap = pool.resources[resource]
        holdings = self.holdings[pool.name]
        if cap.kind == "range":
            return cap.capacity - len(holdings.free[resource])
        if cap.kind == "set":
            return sum(1 for u in holdings.use[resource].values() if not u.free_whole)
        return self.allocated[pool.name].get(resource, 0)

    def usage(self, pool: Pool) -> list[ResourceUsage]:
        holdings = self.holdings[pool.name]
        rows = []
        for name, cap in pool.resources.items():
            used = self.used(pool, name)
            rows.append(
                ResourceUsage(
                    name=name,
                    unit=unit_of(name).value,
                    capacity=cap.capacity,
                    ratio=cap.ratio,
                    effective=cap.effective,
                    allocated=used,
                    available=cap.effective - used,
                    kind=cap.kind,
                    source=cap.source,
                    lo=cap.lo if cap.kind == "range" else None,
                    hi=cap.hi if cap.kind == "range" else None,
                    members=holdings.member_usage(name),
                )
            )
            if name == GPU and cap.sliceable:
                total, in_use = holdings.vram()
                rows.append(
                    ResourceUsage(
                        name=VRAM,
                        unit=unit_of(VRAM).value,
                        capacity=total,
                        ratio=1.0,
                        effective=total,
                        allocated=in_use,
                        available=total - in_use,
                        kind="slice",
                        source=cap.source,
                    )
                )
        return rows

    def resources_view(self, name: str) -> HostResources:
        """hypeman's GET /resources for one pool: per resource status, GPUs, allocations."""
        pool = self.pool(name)
        statuses = {
            row.name: ResourceStatus(
                capacity=row.capacity,
                effective_limit=row.effective,
                allocated=row.allocated,
                available=row.available,
                oversub_ratio=row.ratio,
                source=row.source,
                unit=row.unit,
            )
            for row in self.usage(pool)
        }
        live = {d.member: d for d in self.live_devices.get(pool.name, ())}
        gpus = [
            GpuStatus(
                name=m.name,
                index=m.labels.get("index", m.name),
                uuid=m.labels.get("uuid", ""),
                model=m.labels.get("model", ""),
                numa=m.labels.get("numa", ""),
                memory_bytes=m.capacity,
                vram_allocated=m.allocated,
                whole=m.whole,
                holders=m.holders,
                memory_used=None if seen is None else seen.memory_used,
                foreign_bytes=0 if seen is None else seen.foreign,
                utilization=None if seen is None else seen.utilization,
            )
            for m in self.holdings[pool.name].member_usage(GPU)
            for seen in [live.get(m.name)]
        ]
        known = {"cpu", "memory", "disk", "net", "disk_io", GPU, VRAM}
        allocations = [
            Allocation(
                reservation_id=r.id,
                name=r.label,
                tenant=r.tenant,
                cpu=r.resources.get("cpu", 0),
                memory_bytes=r.resources.get("memory", 0),
                disk_bytes=r.resources.get("disk", 0),
                network_bps=r.resources.get("net", 0),
                disk_io_bps=r.resources.get("disk_io", 0),
                gpus=list(r.members.get(GPU, ())),
                vram_bytes=r.resources.get(VRAM, 0),
                other={k: v for k, v in r.resources.items() if k not in known},
                vram_used_bytes=self.live_vram.get(r.id, 0),
                marks=dict(r.marks),
            )
            for r in sorted(self.active_in(pool.name), key=lambda r: r.created_at)
        ]
        return HostResources(
            pool=pool.name,
            resources=statuses,
            gpus=gpus,
            allocations=allocations,
            quotas={
                t: quotas.info(pool, t, self.quota_use(pool.name, t)) for t in sorted(pool.quotas)
            },
        )

    def pool_info(self, pool: Pool) -> PoolInfo:
        active = self.active_in(pool.name)
        return PoolInfo(
            name=pool.name,
            resources=self.usage(pool),
            max_per_tenant=pool.max_per_tenant,
            preemption=pool.preemption,
            placement=pool.placement,
            grace=pool.grace,
            labels=dict(pool.labels),
            created_at=pool.created_at,
            active=len(active),
            overuse=pool.overuse,
            idle_after=pool.idle_after,
            adopt_foreign=pool.adopt_foreign,
            devices=list(self.live_devices.get(pool.name, ())),
            marks=dict(Counter(mark for r in active for mark in r.marks)),
            quotas={
                t: quotas.info(pool, t, self.quota_use(pool.name, t)) for t in sorted(pool.quotas)
            },
        )

    def usage_at(self, now: float) -> Callable[[str], float]:
        """tenant → its decayed fair-share usage at ``now`` (for ranking waiters)."""
        return lambda tenant: self.fair.usage(tenant, now)

    def _share_of(self, r: Reservation) -> float:
        pool = self.pools[r.pool]
        if VRAM in r.resources:  # a fraction of the pool's VRAM
            return share(pool, r, self.holdings[r.pool].vram()[0])
        key = (r.pool, id(r.resources))
        memo = self._share_memo.get(key)
        if memo is not None and memo[0] is pool:
            return memo[2]
        if len(self._share_memo) >= _MEMO_MAX:
            self._share_memo.clear()
        part = share(pool, r, 0)
        self._share_memo[key] = (pool, r.resources, part)
        return part

    def quota_use(self, pool: str, tenant: str) -> dict[str, int]:
        """What ``tenant``'s live reservations in ``pool`` hold, as quotas count it."""
        return quotas.held(self.reservations[i] for i in self._held.get((pool, tenant), ()))

    def tenant_quotas(self, tenant: str) -> dict[str, QuotaInfo]:
        """``tenant``'s quota in every pool that gives it one."""
        return {
            p.name: quotas.info(p, tenant, self.quota_use(p.name, tenant))
            for p in sorted(self.pools.values(), key=lambda p: p.name)
            if tenant in p.quotas
        }

    def set_quota(
        self, pool_name: str, tenant: str, low: dict[str, int] | None, high: dict[str, int] | None
    ) -> list[PoolEvent]:
        """Events of setting ``tenant``'s quota in ``pool_name`` (a side given as None
        stays; ``{}`` clears it; a quota with neither is removed)."""
        pool = self.pool(pool_name)
        old = pool.quotas.get(tenant, Quota())
        new = Quota(
            min=dict(old.min if low is None else low), max=dict(old.max if high is None else high)
        )
        for name, floor in new.min.items():
            cap = new.max.get(name)
            if cap is not None and floor > cap:
                raise InvalidError(
                    f"min {name} {floor} is above max {name} {cap}", {"field": f"min.{name}"}
                )
        quotas.check_quota(pool, tenant, new)
        table = {t: q for t, q in pool.quotas.items() if t != tenant}
        if new.min or new.max:
            table[tenant] = new
        return [PoolChanged(attrs.evolve(pool, quotas=table))]

    def drop_quotas(self, tenant: str) -> list[PoolEvent]:
        """Events of forgetting ``tenant``'s quotas (the tenant is removed)."""
        return [
            PoolChanged(attrs.evolve(p, quotas={t: q for t, q in p.quotas.items() if t != tenant}))
            for p in self.pools.values()
            if tenant in p.quotas
        ]

    def pool_infos(self) -> list[PoolInfo]:
        return [self.pool_info(p) for p in sorted(self.pools.values(), key=lambda p: p.name)]

    # -------------------------------------------------------------- decisions

    def create_pool(self, args: PoolCreate, now: float) -> list[PoolEvent]:
        if args.name in self.pools:
            raise ExistsError(f"pool {args.name!r} already exists", {"pool": args.name})
        if not any(spec.size > 0 for spec in args.resources.values()):
            raise InvalidError(
                f"pool {args.name!r} would hold nothing: every resources quantity is 0;"
                " give at least one resource a capacity above 0 (e.g. cpu 4)",
                {"pool": args.name, "field": "resources"},
            )
        pool = Pool(
            name=args.name,
            resources={
                k: Capacity(
                    capacity=v.size,
                    ratio=v.ratio,
                    kind=v.kind,
                    lo=v.lo,
                    members=members_of(v.members),
                    source=v.source,
                )
                for k, v in args.resources.items()
            },
            max_per_tenant=args.max_per_tenant,
            preemption=args.preemption,
            placement=args.placement,
            grace=args.grace,
            labels=dict(args.labels),
            created_at=now,
            overuse=args.overuse,
            idle_after=args.idle_after,
            adopt_foreign=args.adopt_foreign,
        )
        return [PoolCreated(pool)]

    def set_pool(self, args: PoolSet) -> list[PoolEvent]:
        pool = self.pool(args.name)
        resources = dict(pool.resources)
        for name in args.remove:
            if name not in resources:
                raise InvalidError(
                    f"pool {pool.name!r} has no resource {name!r} to remove", {"resource": name}
                )
            resources.pop(name)
        for name, capacity in args.capacity.items():
            old = resources.get(name, Capacity(0))
            if old.kind != "scalar":
                raise InvalidError(
                    f"{name} is a {old.kind} resource; its members or values cannot be changed in place",
                    {"resource": name},
                )
            resources[name] = attrs.evolve(old, capacity=capacity)
        for name, ratio in args.ratios.items():
            if name not in resources:
                raise InvalidError(
                    f"pool {pool.name!r} has no resource {name!r}; give its capacity too",
                    {"resource": name},
                )
            resources[name] = attrs.evolve(resources[name], ratio=ratio)
        self._check_held(pool, resources)
        changed = attrs.evolve(
            pool,
            resources=resources,
            max_per_tenant=pool.max_per_tenant
            if args.max_per_tenant is None
            else args.max_per_tenant,
            preemption=args.preemption or pool.preemption,
            placement=args.placement or pool.placement,
            grace=pool.grace if args.grace is None else args.grace,
            labels=pool.labels if args.labels is None else dict(args.labels),
            overuse=args.overuse or pool.overuse,
            idle_after=pool.idle_after if args.idle_after is None else args.idle_after,
            adopt_foreign=pool.adopt_foreign if args.adopt_foreign is None else args.adopt_foreign,
        )
        for tenant, quota in changed.quotas.items():  # a guarantee must stay possible
            quotas.check_quota(changed, tenant, quota)
        return [PoolChanged(changed)]

    def _check_held(self, pool: Pool, resources: dict[str, Capacity]) -> None:
        """Refuse (ConflictError, naming the holders) a change of ``pool`` to
        ``resources`` that would drop, change the kind of, or shrink below what is
        allocated any resource a live reservation holds."""
        holders: dict[str, list[str]] = {}
        for r in self.active_in(pool.name):
            for name in {GPU if n == VRAM else n for n in (*r.resources, *r.members, *r.values)}:
                if name in pool.resources:
                    holders.setdefault(name, []).append(r.id)
        short: dict[str, dict[str, Any]] = {}
        for name, ids in holders.items():
            old, new = pool.resources[name], resources.get(name)
            allocated = self.used(pool, name)
            if new is None:
                problem = "would be removed"
            elif new.kind != old.kind:
                problem = f"would change from {old.kind} to {new.kind}"
            elif new.kind == "scalar" and new.effective < allocated:
                problem = f"would have {new.effective} where {allocated} is reserved"
            else:
                continue
            short[name] = {
                "problem": problem,
                "allocated": allocated,
                "effective": 0 if new is None else new.effective,
                "holders": sorted(ids),
            }
        if short:
            raise ConflictError(
                f"pool {pool.name!r}: "
                + "; ".join(
                    f"{name} {s['problem']} but is held by {', '.join(s['holders'])}"
                    for name, s in sorted(short.items())
                )
                + "; release those reservations first",
                {"resources": short},
            )

    def delete_pool(self, name: str, force: bool, now: float) -> list[PoolEvent]:
        self.pool(name)
        live = self.active_in(name)
        if live and not force:
            raise ConflictError(
                f"pool {name!r} has {len(live)} active reservation(s); release them or use --force",
                {"pool": name, "active": [r.id for r in live]},
            )
        events: list[PoolEvent] = [Ended(r.id, "released", now, "pool deleted") for r in live]
        events.append(PoolDeleted(name, now))
        return events

    def candidates(self, args: Reserve) -> list[Pool]:
        """The pools a request may go to: the one it names, those its selector matches,
        or ``host``. Raises NotFoundError when there is none."""
        if args.pool is not None:
            return [self.pool(args.pool)]
        if args.selector:
            found = [
                p
                for p in sorted(self.pools.values(), key=lambda p: p.name)
                if all(p.labels.get(k) == v for k, v in args.selector.items())
            ]
            if not found:
                raise NotFoundError(
                    f"no pool has the labels {args.selector}", {"selector": dict(args.selector)}
                )
            return found
        return [self.pool("host")]

    def check_request(self, args: Reserve) -> list[Pool]:
        """The candidate pools on which ``args`` is well-formed; raises the first
        InvalidError/NotFoundError when it fits none. Capacity is not checked. A gang:
        each part on its own pool, and the pools of its parts."""
        if args.parts:
            named: dict[str, Pool] = {}
            for i, part in enumerate(args.parts):
                try:
                    (pool,) = self.check_request(part.request(args))
                except ResdError as exc:
                    raise in_part(i, exc) from None
                named[pool.name] = pool
            return list(named.values())
        pools, first = [], None
        for pool in self.candidates(args):
            try:
                PoolHoldings.check(pool, args)
            except ResdError as exc:
                first = first or exc
                continue
            pools.append(pool)
        if not pools:
            assert first is not None
            raise first
        return pools

    def reserve(
        self,
        args: Reserve,
        tenant: Tenant,
        *,
        uid: int,
        session: str,
        now: float,
        rid: str,
        pools: list[Pool] | None = None,
        pid: tuple[int, float] | None = None,
        peer: int | None = None,
    ) -> list[PoolEvent]:
        """Events of granting ``args``; raises InvalidError/NotFoundError for bad input.

        A business refusal (conflict, insufficient) is not raised: it comes back as a
        single ``Denied`` event so that it is journaled; ``denial_error`` rebuilds it.
        With several candidate pools (a label selector) the request goes to the one the
        placement policy prefers among those it fits. A request for scalar amounts in
        one pool (``scalar_pool``) has nothing to place: it skips the request checks
        (it passes them) and placement, and gets the same events.
        """
        if rid in self.reservations:  # pragma: no cover - ids are random 48-bit
            raise ExistsError(f"reservation id {rid} collides", {"id": rid})
        if args.parts:
            return self._reserve_gang(
                args, tenant, uid=uid, session=session, now=now, rid=rid, pid=pid, peer=peer
            )
        alone = self.scalar_pool(args, pools)
        if alone is not None:  # nothing to place: checked and granted as it is
            outcome = self._try(
                alone,
                args,
                tenant,
                uid=uid,
                session=session,
                now=now,
                rid=rid,
                pid=pid,
                peer=peer,
                place=False,
            )
            if isinstance(outcome, ResdError):
                return [self.denied(args, alone.name, tenant, now, outcome)]
            return [Reserved(outcome)]
        pools = self.check_request(args) if pools is None else pools
        granted: list[tuple[float, Reservation]] = []
        refusals: list[ResdError] = []
        for pool in pools:
            outcome = self._try(
                pool, args, tenant, uid=uid, session=session, now=now, rid=rid, pid=pid, peer=peer
            )
            if isinstance(outcome, ResdError):
                refusals.append(outcome)
            else:
                granted.append((self._fill(pool, outcome), outcome))
        if not granted:
            return [self.denied(args, pools[0].name, tenant, now, refusals[0])]
        policy = args.placement or pools[0].placement
        best = (
            max(granted, key=lambda g: g[0])
            if policy == "binpack"
            else min(granted, key=lambda g: g[0])
        )
        return [Reserved(best[1])]

    def scalar_pool(self, args: Reserve, pools: list[Pool] | None = None) -> Pool | None:
        """The one pool a request of scalar amounts only goes to; None when it needs the
        general path: several candidate pools, a member, value or VRAM slice to choose,
        constraints, or a pool or resource that is not there (the general path says so)."""
        if args.members or args.contiguous or args.constraints:
            return None
        if pools is not None:
            if len(pools) != 1:
                return None
            pool: Pool | None = pools[0]
        elif args.pool is not None:
            pool = self.pools.get(args.pool)
        elif args.selector:
            return None
        else:
            pool = self.pools.get("host")
        if pool is None:
            return None
        kinds = pool.resources
        for name in args.resources:
            cap = kinds.get(name)
            if cap is None or cap.kind != "scalar" or name == VRAM:
                return None
        return pool

    def _reserve_gang(
        self,
        args: Reserve,
        tenant: Tenant,
        *,
        uid: int,
        session: str,
        now: float,
        rid: str,
        pid: tuple[int, float] | None,
        peer: int | None,
    ) -> list[PoolEvent]:
        """All parts of gang ``args`` or none: each part is placed with the earlier
        ones held (in place, undone before returning), so parts in one pool see each
        other. The parts are reservations ``rid``, ``rid.1``, ``rid.2``...; the first
        carries the attach token and answers for the lease."""
        self.check_request(args)
        ids = tuple(rid if i == 0 else f"{rid}.{i}" for i in range(len(args.parts)))
        placed: list[Reservation] = []
        held_now: list[Reservation] = []
        try:
            for i, part in enumerate(args.parts):
                request = part.request(args)
                if i:
                    request = msgspec.structs.replace(request, token=None)
                outcome = self._try(
                    self.pools[part.pool],
                    request,
                    tenant,
                    uid=uid,
                    session=session,
                    now=now,
                    rid=ids[i],
                    pid=pid,
                    siblings=frozenset(ids),
                )
                if isinstance(outcome, ResdError):
                    return [self.denied(args, part.pool, tenant, now, in_part(i, outcome))]
                outcome = attrs.evolve(
                    outcome, gang=ids, peer=peer if args.binding == "session" else None
                )
                # Held for the trial without its token: the token may already name
                # this very request waiting in the queue, and undoing must not drop it.
                trial = attrs.evolve(outcome, token="")
                self._hold(trial)
                held_now.append(trial)
                placed.append(outcome)
        finally:
            for r in reversed(held_now):
                self._unhold(r)
        return [Reserved(r) for r in placed]

    def gang_whole(self, events: Sequence[PoolEvent]) -> list[PoolEvent]:
        """``events`` with what happens to one part of a gang done to all of its parts
        (ended, preempted, renewed, re-attached, a process registered): a gang is
        held, preempted and released as a whole, whatever decided it."""
        out = list(events)
        done = {(type(e), getattr(e, "id", None)) for e in events}
        for e in events:
            if not isinstance(e, Ended | Terminating | Renewed | Rebound | Registered):
                continue
            r = self.reservations.get(e.id)
            if r is None or not r.gang:
                continue
            for sibling in r.gang:
                if (type(e), sibling) not in done and sibling in self.reservations:
                    out.append(attrs.evolve(e, id=sibling))
                    done.add((type(e), sibling))
        return out

    def pools_of(self, r: Reservation) -> set[str]:
        """The pools lease ``r`` holds something in (a gang: its parts')."""
        return {self.reservations[i].pool for i in r.gang if i in self.reservations} or {r.pool}

    def lease_info(self, rid: str, **kw: Any) -> ReservationInfo:
        """What the holder sees of lease ``rid``: a gang as one lease whose amounts,
        members, values and devices are its parts' together, with ``parts``."""
        r = self.reservation(rid)
        info = r.info(**kw)
        if not r.gang:
            return info
        parts = [self.reservations[i].info(**kw) for i in r.gang if i in self.reservations]
        resources: dict[str, int] = {}
        members: dict[str, list[str]] = {}
        values: dict[str, list[list[int]]] = {}
        for p in parts:
            for k, v in p.resources.items():
                resources[k] = resources.get(k, 0) + v
            for k, names in p.members.items():
                members.setdefault(k, []).extend(names)
            for k, vals in p.values.items():
                values.setdefault(k, []).extend(vals)
        return msgspec.structs.replace(
            info,
            pool=",".join(dict.fromkeys(p.pool for p in parts)),
            resources=resources,
            members=members,
            values=values,
            devices=[d for p in parts for d in p.devices],
            parts=parts,
        )

    def _try(
        self,
        pool: Pool,
        args: Reserve,
        tenant: Tenant,
        *,
        uid: int,
        session: str,
        now: float,
        rid: str,
        pid: tuple[int, float] | None,
        peer: int | None = None,
        siblings: frozenset[str] = frozenset(),
        place: bool = True,
    ) -> Reservation | ResdError:
        """``args`` granted in ``pool``, or why not; ``place=False``: it holds nothing
        to place (``scalar_pool`` says so)."""
        if pool.quotas:
            refusal = quotas.over_max(
                pool, tenant.name, self.quota_use(pool.name, tenant.name), args
            )
            if refusal is not None:
                return refusal
        if pool.max_per_tenant:
            held = self.held(pool.name, tenant.name) - siblings
            if len(held) >= pool.max_per_tenant:
                existing = sorted(held)
                return ConflictError(
                    f"tenant {tenant.name!r} already holds {', '.join(existing)}"
                    f" in pool {pool.name!r} (max {pool.max_per_tenant} per tenant)",
                    {"existing": existing, "max_per_tenant": pool.max_per_tenant},
                )
        short: dict[str, dict[str, int]] = {}
        kinds, used = pool.resources, self.allocated[pool.name]
        for name, amount in args.resources.items():
            if name == VRAM or kinds[name].kind != "scalar":
                continue
            available = kinds[name].effective - used.get(name, 0)
            if amount > available:
                short[name] = shortfall(amount, available)
        if place:
            placement, missing = self.holdings[pool.name].place(
                pool, args, args.placement or pool.placement
            )
            short.update(missing)
        else:
            placement = _NOTHING_PLACED
        if short or placement is None:
            return _insufficient(pool, short)
        session_bound = args.binding == "session"
        amounts = {**args.resources, **placement.counts} if placement.counts else args.resources
        return Reservation(
            id=rid,
            tenant=tenant.name,
            pool=pool.name,
            resources=shared_amounts(amounts),
            label=args.label,
            created_at=now,
            ttl=args.ttl,
            expires_at=None if args.ttl is None else now + args.ttl,
            binding=_intern(args.binding),
            session=session if session_bound else "",
            reclaimable=args.reclaimable,
            uid=uid,
            members=placement.members or EMPTY,
            values=placement.values or EMPTY,
            devices=placement.devices,
            priority=tenant.priority,
            pid=None if pid is None else pid[0],
            pid_start=None if pid is None else pid[1],
            token=args.token or "",
            peer=peer if session_bound else None,
            enforcement=enforcement_of(args.binding, placement.devices, args.resources, self.mps),
        )

    def never_fits(
        self, args: Reserve, pools: list[Pool] | None = None, tenant: str | None = None
    ) -> ResdError | None:
        """The refusal of a request that would not fit any of its pools even if they
        were empty, or is past ``tenant``'s max there by itself (waiting for it would
        be forever); None when it could fit. A gang never fits when one part does not."""
        if args.parts:
            for i, part in enumerate(args.parts):
                error = self.never_fits(part.request(args), None, tenant)
                if error is not None:
                    return in_part(i, error)
            return None
        pools = self.check_request(args) if pools is None else pools
        shorts = []
        capped: ResdError | None = None
        for pool in pools:
            if tenant is not None and pool.quotas:
                capped = quotas.over_max(pool, tenant, {}, args)
                if capped is not None:
                    continue
            short = {
                name: shortfall(amount, pool.resources[name].effective)
                for name, amount in args.resources.items()
                if name != VRAM
                and pool.resources[name].kind == "scalar"
                and amount > pool.resources[name].effective
            }
            _, missing = PoolHoldings.of(pool).place(pool, args, args.placement or pool.placement)
            short.update(missing)
            if not short:
                return None
            shorts.append((pool.name, short))
        if not shorts:
            return capped
        name, short = shorts[0]
        return InsufficientError(
            f"pool {name!r} can never fit the request, even empty:"
            f" {_short_text(short, 'the pool has', ' in all')}",
            {"pool": name, "resources": short, "never": True},
        )

    def _fill(self, pool: Pool, r: Reservation) -> float:
        """How full ``pool`` would be with ``r``: its most used requested resource."""
        fill = 0.0
        for name, amount in r.resources.items():
            if name == VRAM:
                total, in_use = self.holdings[pool.name].vram()
                fill = max(fill, (in_use + amount) / total if total else 1.0)
                continue
            cap = pool.resources[name]
            fill = max(
                fill, (self.used(pool, name) + amount) / cap.effective if cap.effective else 1.0
            )
        return fill

    @staticmethod
    def denied(
        args: Reserve, pool: str, tenant: Tenant, now: float, error: ResdError, rid: str = ""
    ) -> Denied:
        """The event of refusing ``args`` (or of waiter ``rid`` leaving the queue)."""
        return Denied(
            tenant=tenant.name,
            pool=pool,
            resources=dict(args.resources),
            at=now,
            code=str(error.code),
            reason=error.message,
            details=error.details,
            id=rid,
        )

    def release(self, rid: str, now: float, reason: str = "released") -> list[PoolEvent]:
        self.reservation(rid)
        return [Ended(rid, "released", now, reason)]

    def renew(self, args: Renew, now: float) -> list[PoolEvent]:
        r = self.reservation(args.id)
        if r.state != "active":
            raise ConflictError(
                f"reservation {r.id} is being preempted and cannot be renewed",
                {"id": r.id, "state": r.state},
            )
        ttl = args.ttl if args.ttl is not None else r.ttl
        if ttl is None:
            raise InvalidError(
                f"reservation {r.id} has no ttl; give one to renew it", {"id": r.id, "field": "ttl"}
            )
        return [Renewed(r.id, ttl, now + ttl, now)]

    def expire(self, rid: str, expires_at: float, now: float) -> list[PoolEvent]:
        """Events of a TTL timer firing; none when the timer is stale (renewed or gone)."""
        r = self.reservations.get(rid)
        if r is None or r.state != "active" or r.expires_at != expires_at:
            return []
        return [Ended(rid, "expired", now, "ttl elapsed")]

    def preempt(
        self, target: str, pool: str | None, by: str, now: float, *, admin: bool = True
    ) -> list[PoolEvent]:
        """Evict every live reservation of ``target`` (in ``pool``): at once, or after
        grace. A non-``admin`` evicts only in pools whose policy allows preemption
        (``lower_priority``); naming a pool where it is ``off``, or a target whose
        leases all sit in such pools, raises ForbiddenError. Raises NotFoundError when ``target`` has no active reservation (in ``pool``),
        as resgate does, rather than preempting nothing."""
        if pool is not None and not admin and self.pool(pool).preemption == "off":
            raise ForbiddenError(
                f"pool {pool!r} has preemption off; only an admin may preempt there",
                {"pool": pool},
            )
        if pool is not None:
            self.pool(pool)
        active = [r for r in self.of_tenant(target, pool) if r.state == "active"]
        if not active:
            where = "" if pool is None else f" in pool {pool!r}"
            raise NotFoundError(
                f"tenant {target!r} has no active reservations to preempt{where}",
                {"tenant": target} if pool is None else {"tenant": target, "pool": pool},
            )
        allowed = [r for r in active if admin or self.pools[r.pool].preemption != "off"]
        if not allowed:  # every lease sits in a pool where only an admin may preempt
            shielded = sorted({r.pool for r in active})
            raise ForbiddenError(
                f"tenant {target!r} holds reservations only in pools with preemption off"
                f" ({', '.join(shielded)}); only an admin may preempt there",
                {"tenant": target, "pools": shielded},
            )
        return [self.evict(r, by, now) for r in allowed]

    def evict(self, r: Reservation, by: str, now: float) -> PoolEvent:
        """The event of preempting ``r``: at once, or at the end of its pool's grace
        (asking a reclaimable lease to give its resources back meanwhile)."""
        grace = self.pools[r.pool].grace
        if grace > 0:
            return Terminating(r.id, now + grace, by, now, reclaim=r.reclaimable)
        return Ended(r.id, "preempted", now, f"preempted by {by}")

    def finish_grace(self, rid: str, now: float) -> list[PoolEvent]:
        r = self.reservations.get(rid)
        if r is None or r.state != "terminating":
            return []
        return [Ended(rid, "preempted", now, "grace ended")]

    def process_exited(self, rid: str, pid: int, start: float, now: float) -> list[PoolEvent]:
        """Events of a bound process's exit; none when the reservation is gone or
        bound to another process (a stale report)."""
        r = self.reservations.get(rid)
        if r is None or r.pid != pid or r.pid_start != start:
            return []
        return [Ended(rid, "released", now, f"process {pid} exited")]

    @contextlib.contextmanager
    def without(self, rids: Iterable[str]) -> Iterator[None]:
        """Decide as if ``rids`` had ended (dry runs of preemption); restored after."""
        gone = [self.reservations[rid] for rid in rids]
        parts = [self._unhold(r) for r in gone]
        try:
            yield
        finally:
            for r, part in zip(gone, parts, strict=True):
                self._hold(r, part)

    def end_sessions(self, session: str, now: float, reason: str) -> list[PoolEvent]:
        """Release the session-bound reservations of connection ``session``."""
        return [
            Ended(rid, "released", now, reason) for rid in sorted(self.by_session.get(session, ()))
        ]

    def rebind(
        self, rid: str, session: str, now: float, peer: int | None = None
    ) -> list[PoolEvent]:
        """Events of re-attaching lease or waiter ``rid`` to connection ``session``
        (whose peer process ``peer`` becomes a session lease's attribution root)."""
        if rid not in self.reservations and rid not in self.waiting:
            raise NotFoundError(f"{rid} is neither active nor waiting", {"id": rid})
        return [Rebound(rid, session, now, peer)]

    def register(
        self, rid: str, pid: int, start: float, now: float, cgroup: str = ""
    ) -> list[PoolEvent]:
        """Events of adding process ``pid`` to live lease ``rid``'s processes (none
        when it is there already), confined in ``cgroup`` if given."""
        r = self.reservations.get(rid)
        if r is None:
            raise NotFoundError(f"{rid} is not an active reservation", {"id": rid})
        if (pid, start) in r.procs or r.pid == pid:
            return []
        if len(r.procs) >= MAX_PROCS:
            raise InvalidError(
                f"{rid} has {MAX_PROCS} processes registered already; register the"
                " parent of a process tree, not each process",
                {"id": rid, "max": MAX_PROCS},
            )
        return [Registered(rid, pid, start, now, cgroup)]

    def mark(self, rid: str, wanted: dict[str, str], now: float) -> list[PoolEvent]:
        """Events that make live lease ``rid``'s marks those ``wanted`` (mark → what
        was seen): only what changes, so a standing mark is journaled once."""
        r = self.reservations.get(rid)
        if r is None:
            return []
        events: list[PoolEvent] = []
        for mark in sorted(set(r.marks) | set(wanted)):
            if (mark in wanted) != (mark in r.marks):
                on = mark in wanted
                events.append(Marked(rid, mark, on, wanted[mark] if on else r.marks[mark], now))
        return events

    def last_event(self, rid: str) -> HistoryEvent | None:
        """The latest history event of ``rid`` (how it ended), None if forgotten."""
        for h in reversed(self.history):
            if h.reservation == rid:
                return h
        return None

    # ------------------------------------------------------------------ apply

    def apply(self, events: Iterable[PoolEvent]) -> None:
        """Change the book by ``events``; the only mutator, used live and on replay."""
        for event in events:
            self._apply_one(event)

    def _apply_one(self, event: PoolEvent) -> None:
        match event:
            case Reserved(reservation=r):
                if self.waiting:
                    self._unqueue(r.id)
                part = self._share_of(r)
                self._hold(r, part)
                self.fair.change(r.tenant, part, r.created_at)
                self._record(r.created_at, "reserved", r, r.label)
            case Ended(id=rid, state=state, at=at, reason=reason):
                r = self.reservations[rid]
                self.fair.change(r.tenant, -self._unhold(r), at)
                self._record(at, state, r, reason)
            case Queued(waiting=w):
                self.waiting[w.id] = w
                if w.args.token:
                    self.by_token[w.args.token] = w.id
            case Rebound(id=rid, session=session, at=at, peer=peer):
                if rid in self.waiting:
                    self.waiting[rid] = attrs.evolve(self.waiting[rid], session=session, peer=peer)
                else:
                    r = self.reservations[rid]
                    part = self._unhold(r)
                    session_bound = r.binding == "session"
                    r = attrs.evolve(
                        r,
                        session=session if session_bound else "",
                        peer=peer if session_bound else r.peer,
                    )
                    self._hold(r, part)
                    self._record(at, "reattached", r, "re-attached after a reconnect")
            case Resized(id=rid, at=at, detail=detail):
                r = self.reservations[rid]
                was = self._unhold(r)
                r = attrs.evolve(
                    r,
                    resources=shared_amounts(event.resources),
                    members=dict(event.members) or EMPTY,
                    values=dict(event.values) or EMPTY,
                    devices=event.devices,
                )
                part = self._share_of(r)
                self._hold(r, part)
                self.fair.change(r.tenant, part - was, at)
                self._record(at, "resized", r, detail)
            case Registered(id=rid, pid=pid, start=start, at=at, cgroup=cgroup):
                r = self.reservations[rid]
                r = attrs.evolve(r, procs=(*r.procs, (pid, start)))
                if cgroup:
                    level = stronger(r.enforcement, "cgroup")
                    r = attrs.evolve(r, cgroup=cgroup, enforcement=level)
                self.reservations[rid] = r
                self.by_root.setdefault(pid, set()).add(rid)
                where = f" in cgroup {cgroup}" if cgroup else ""
                self._record(at, "registered", r, f"process {pid}{where}")
            case Marked(id=rid, mark=mark, on=on, detail=detail, at=at):
                r = self.reservations[rid]
                marks = {k: v for k, v in r.marks.items() if k != mark}
                if on:
                    marks[mark] = detail
                r = self.reservations[rid] = attrs.evolve(r, marks=marks or EMPTY)
                (self.marked.add if marks else self.marked.discard)(rid)
                self._record(at, mark if on else f"{mark}_cleared", r, detail)
            case Renewed(id=rid, ttl=ttl, expires_at=expires_at, at=at):
                r = attrs.evolve(self.reservations[rid], ttl=ttl, expires_at=expires_at)
                self.reservations[rid] = r
                self._record(at, "renewed", r, f"expires at {expires_at:.3f}")
            case Terminating(id=rid, deadline=deadline, by=by, at=at, reclaim=reclaim):
                r = attrs.evolve(
                    self.reservations[rid], state="terminating", deadline=deadline, reclaim=reclaim
                )
                self.reservations[rid] = r
                self._record(at, "preempting", r, f"by {by}; grace until {deadline:.3f}")
            case Denied():
                self._unqueue(event.id)
                self._push(
                    HistoryEvent(
                        seq=self.seq + 1,
                        at=event.at,
                        kind="denied",
                        reservation=event.id,
                        tenant=event.tenant,
                        pool=event.pool,
                        resources=event.resources,
                        detail=event.reason,
                    )
                )
            case PoolCreated(pool=pool):
                self.pools[pool.name] = pool
                self.allocated[pool.name] = {}
                self.holdings[pool.name] = PoolHoldings.of(pool)
            case PoolChanged(pool=pool):
                self.pools[pool.name] = pool
                outside = self.holdings[pool.name].outside
                holdings = self.holdings[pool.name] = PoolHoldings.of(pool)
                holdings.outside = outside
                for r in self.active_in(pool.name):
                    holdings.hold(r)
            case PoolDeleted(name=name):
                del self.pools[name]
                del self.allocated[name]
                del self.holdings[name]

    def _unqueue(self, rid: str) -> None:
        w = self.waiting.pop(rid, None) if self.waiting else None
        if w is not None and w.args.token:
            del self.by_token[w.args.token]

    def _hold(self, r: Reservation, part: float = 0.0) -> None:
        """Index live ``r``, whose fair share is ``part`` (0: none, a trial)."""
        rid, pool = r.id, r.pool
        self.reservations[rid] = r
        used = self.allocated[pool]
        kinds = self.pools[pool].resources
        for name, amount in r.resources.items():
            cap = kinds.get(name)
            if cap is not None and cap.kind == "scalar":
                used[name] = used.get(name, 0) + amount
        if r.members or r.values:
            self.holdings[pool].hold(r)
        held = self._held.get((pool, r.tenant))
        if held is None:
            self._held[pool, r.tenant] = {rid: part}
        else:
            held[rid] = part
        self.tenant_live[r.tenant] += 1
        if r.binding == "session":
            self.by_session.setdefault(r.session, set()).add(rid)
        if r.token:
            self.by_token[r.token] = rid
        for pid in _roots(r):
            self.by_root.setdefault(pid, set()).add(rid)
        if r.members.get(GPU):
            self.gpu_held.add(rid)
        if r.marks:
            self.marked.add(rid)

    def _unhold(self, r: Reservation) -> float:
        """Forget live ``r``; returns the fair share it was held with."""
        rid, pool = r.id, r.pool
        del self.reservations[rid]
        used = self.allocated[pool]
        kinds = self.pools[pool].resources
        for name, amount in r.resources.items():
            cap = kinds.get(name)
            if cap is not None and cap.kind == "scalar":
                used[name] -= amount
        if r.members or r.values:
            self.holdings[pool].unhold(r)
        ids = self._held[(pool, r.tenant)]
        part = ids.pop(rid, 0.0)
        if not ids:
            del self._held[(pool, r.tenant)]
        self.tenant_live[r.tenant] -= 1
        if not self.tenant_live[r.tenant]:
            del self.tenant_live[r.tenant]
        if r.binding == "session":
            mine = self.by_session[r.session]
            mine.discard(rid)
            if not mine:
                del self.by_session[r.session]
        if r.token:
            del self.by_token[r.token]
        for pid in _roots(r):
            mine = self.by_root[pid]
            mine.discard(rid)
            if not mine:
                del self.by_root[pid]
        self.gpu_held.discard(rid)
        self.marked.discard(rid)
        return part

    def _record(self, at: float, kind: str, r: Reservation, detail: str) -> None:
        self.seq = seq = self.seq + 1
        self.history.append(
            HistoryEvent(
                seq=seq,
                at=at,
                kind=kind,
                reservation=r.id,
                tenant=r.tenant,
                pool=r.pool,
                resources=r.resources,  # shared: a record's map is never changed in place
                detail=detail,
            )
        )

    def _push(self, event: HistoryEvent) -> None:
        self.seq = event.seq
        self.history.append(event)

    # -------------------------------------------------------------- snapshots

    def snapshot(self) -> dict[str, Any]:
        return {
            "pools": [converter.unstructure(p) for p in self.pools.values()],
            "reservations": [converter.unstructure(r) for r in self.reservations.values()],
            "history": [to_wire(h) for h in self.history],
            "seq": self.seq,
            "waiting": [converter.unstructure(w) for w in self.waiting.values()],
            "fair_share": self.fair.snapshot(),
        }

    @classmethod
    def from_snapshot(
        cls,
        state: dict[str, Any] | None,
        history_limit: int = 100_000,
        half_life: float = HALF_LIFE,
    ) -> PoolBook:
        book = cls(history_limit=history_limit, fair=FairShare(half_life))
        if state is None:
            return book
        for p in state["pools"]:
            pool = converter.structure(p, Pool)
            book.pools[pool.name] = pool
            book.allocated[pool.name] = {}
            book.holdings[pool.name] = PoolHoldings.of(pool)
        for raw in state["reservations"]:
            r = converter.structure(raw, Reservation)
            part = book._share_of(r)
            book._hold(r, part)
            book.fair.change(r.tenant, part, r.created_at)
        book.fair.restore(state.get("fair_share", {}))  # absent before issue 12
        book.history.extend(HistoryEvent(**h) for h in state["history"])
        book.seq = state["seq"]
        for raw in state.get("waiting", ()):  # absent in snapshots made before issue 9
            book.apply([Queued(converter.structure(raw, Waiting))])
        return book


def in_part(i: int, error: ResdError) -> ResdError:
    """``error`` of a gang's part ``i``, saying which part."""
    return type(error)(f"parts[{i}]: {error.message}", {**error.details, "part": i})


def _roots(r: Reservation) -> tuple[int, ...]:
    """``r.roots()``, without building it for the common leases: none, or only the
    session's peer."""
    if r.procs or r.pid is not None:
        return r.roots()
    if r.peer is not None and r.binding == "session":
        return (r.peer,)
    return ()


def _insufficient(pool: Pool, short: dict[str, dict[str, int]]) -> InsufficientError:
    return InsufficientError(
        f"pool {pool.name!r} cannot fit the request: {_short_text(short, 'available')}",
        {"pool": pool.name, "resources": short},
    )


def _short_text(short: dict[str, dict[str, int]], have: str, tail: str = "") -> str:
    """``cpu: requested 4, available 2; …`` from per-resource shortfalls."""
    return "; ".join(
        f"{n}: requested {render_quantity(n, s['requested'])},"
        f" {have} {render_quantity(n, s['available'])}{tail}"
        for n, s in short.items()
    )


def denial_error(event: PoolEvent) -> ResdError:
    """The error a ``Denied`` event stands for, to raise to the requester."""
    assert isinstance(event, Denied), event
    return ERRORS[ErrorCode(event.code)](event.reason, dict(event.details))
