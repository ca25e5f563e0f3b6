"""What each protocol op does: the dispatch table from op name to handler.

Handlers run in the connection's task, orchestrate the actors with ``ask``, check
authority, and await durability of what the actors journaled before returning the
result. They hold no state of their own. ``HANDLERS`` must cover exactly
``protocol.OPS`` (a test checks it).

Every request ends with one debug line from ``dispatch``: ``handled`` or, for an
error the client caused, ``refused`` (its ``code`` and ``error``); ``named_in``
gives the log keys a request's arguments name (``resd.logs``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import msgspec
import structlog
from structlog.contextvars import bind_contextvars

from resd import messages as m
from resd.discovery import numa_cpus
from resd.journal import Journal, JournalFailed
from resd.metrics import Metrics
from resd.pool_actor import PoolActor
from resd.procwatch import process_start, process_uid
from resd.reconciler import Reconciler
from resd.records import Tenant
from resd.registry import TenantRegistry
from resd.tenants import Peer, TenantBook
from resd_client.errors import (
    ForbiddenError,
    InvalidError,
    NotFoundError,
    ResdError,
    UnavailableError,
)
from resd_client.protocol import (
    PROTOCOL_VERSION,
    Attach,
    Done,
    Empty,
    Export,
    Hello,
    HelloResult,
    History,
    HostResources,
    ListReservations,
    MetricsText,
    Plan,
    PlanResult,
    PoolCreate,
    PoolDelete,
    PoolInfo,
    PoolList,
    PoolName,
    PoolSet,
    Preempt,
    Preempted,
    QuotaInfo,
    Register,
    Renew,
    ReservationInfo,
    ReservationList,
    ReservationRef,
    Reserve,
    Resize,
    ResourcesOf,
    Status,
    Subscribe,
    TenantAdd,
    TenantInfo,
    TenantList,
    TenantName,
    TenantRemove,
    TenantSet,
    TopSnapshot,
    WaitInfo,
)

log = structlog.get_logger("resd.ops")


@attrs.define(eq=False)
class Services:
    """What handlers may reach: the actors, the journal, and facts about the daemon."""

    pools: PoolActor
    tenants: TenantRegistry
    journal: Journal
    version: str
    boot_id: str
    started_at: float
    wall: Callable[[], float]
    connections: Callable[[], int]
    reconciler: Reconciler
    metrics: Metrics = attrs.Factory(Metrics)


@attrs.define(eq=False)
class Conn:
    """One client connection, as handlers see it."""

    id: str
    peer: Peer
    outbox: m.Outbox


Handler = Callable[[Services, Conn, Any], Awaitable[Any]]


async def _durable(svc: Services, *lsns: int) -> None:
    """Wait until what the actors journaled is durable. Raises UnavailableError when an
    fsync failed first: the change is made, but may not survive a crash until resd has
    written its state anew (it is doing so)."""
    lsn = max(lsns, default=0)
    if lsn:
        try:
            await svc.journal.wait_durable(lsn)
        except JournalFailed as exc:
            raise UnavailableError(
                f"{exc}; the change was made but may not survive a crash until resd has"
                " written its state anew",
                {"outcome": "unknown"},
            ) from exc


async def _mutate(svc: Services, message: Any) -> Any:
    result, lsn = await svc.pools.ask(message)
    await _durable(svc, lsn)
    return result


async def hello(svc: Services, conn: Conn, args: Hello) -> HelloResult:
    return HelloResult(
        server_version=svc.version,
        protocol=PROTOCOL_VERSION,
        boot_id=svc.boot_id,
        uid=conn.peer.uid,
        gid=conn.peer.gid,
        pid=conn.peer.pid,
        admin=conn.peer.admin,
        user_tenant=conn.peer.user,
    )


async def pool_create(svc: Services, conn: Conn, args: PoolCreate) -> PoolInfo:
    TenantBook.check_admin(conn.peer, "create pools")
    info: PoolInfo = await _mutate(svc, m.CreatePool(args))
    return info


async def pool_list(svc: Services, conn: Conn, args: Empty) -> PoolList:
    return PoolList(pools=await svc.pools.ask(m.ListPools()))


async def pool_show(svc: Services, conn: Conn, args: PoolName) -> PoolInfo:
    info: PoolInfo = await svc.pools.ask(m.ShowPool(args.name))
    return info


async def pool_set(svc: Services, conn: Conn, args: PoolSet) -> PoolInfo:
    TenantBook.check_admin(conn.peer, "change pools")
    info: PoolInfo = await _mutate(svc, m.SetPool(args))
    return info


async def pool_delete(svc: Services, conn: Conn, args: PoolDelete) -> Done:
    TenantBook.check_admin(conn.peer, "delete pools")
    done: Done = await _mutate(svc, m.DeletePool(args.name, args.force))
    return done


async def _tenant_info(svc: Services, tenant: Tenant) -> TenantInfo:
    active: int = await svc.pools.ask(m.CountActive(tenant.name))
    standing = await svc.pools.ask(m.TenantStanding(tenant.name))
    return _with_standing(tenant.info(active=active), standing)


def _with_standing(
    info: TenantInfo, standing: dict[str, tuple[dict[str, QuotaInfo], float, float]]
) -> TenantInfo:
    quotas, usage, share = standing.get(info.name, ({}, 0.0, 0.0))
    return msgspec.structs.replace(
        info, quotas=quotas, usage=round(usage, 3), share=round(share, 4)
    )


async def tenant_add(svc: Services, conn: Conn, args: TenantAdd) -> TenantInfo:
    tenant, lsn = await svc.tenants.ask(m.AddTenant(args, conn.peer))
    await _durable(svc, lsn)
    info: TenantInfo = tenant.info()
    return info


async def tenant_list(svc: Services, conn: Conn, args: Empty) -> TenantList:
    tenants: list[Tenant] = await svc.tenants.ask(m.ListTenants())
    active = Counter(r.tenant for r in await svc.pools.ask(m.ListActive()))
    standing = await svc.pools.ask(m.TenantStanding())
    return TenantList(
        tenants=[_with_standing(t.info(active=active[t.name]), standing) for t in tenants]
    )


async def tenant_show(svc: Services, conn: Conn, args: TenantName) -> TenantInfo:
    return await _tenant_info(svc, await svc.tenants.ask(m.GetTenant(args.name)))


async def tenant_set(svc: Services, conn: Conn, args: TenantSet) -> TenantInfo:
    """A quota (``pool`` with ``min``/``max``) is the pool actor's, checked against
    the pool first, so a refused quota changes nothing of the tenant either."""
    quota_lsn = 0
    if args.pool is not None:
        TenantBook.check_admin(conn.peer, "change tenants")
        await svc.tenants.ask(m.GetTenant(args.name))  # it must exist
        _, quota_lsn = await svc.pools.ask(m.SetQuota(args.pool, args.name, args.min, args.max))
    tenant, lsn = await svc.tenants.ask(m.SetTenant(args, conn.peer))
    await _durable(svc, quota_lsn, lsn)
    return await _tenant_info(svc, tenant)


async def tenant_remove(svc: Services, conn: Conn, args: TenantRemove) -> Done:
    """The pool actor first releases the tenant's reservations, cancels its waiters and
    from then on refuses requests for it that are still on their way (so none can
    slip in between); then the registry forgets it."""
    TenantBook.check_admin(conn.peer, "remove tenants")
    tenant: Tenant = await svc.tenants.ask(m.GetTenant(args.name))
    released, pool_lsn = await svc.pools.ask(m.ReleaseTenant(tenant, args.force))
    try:
        lsn = await svc.tenants.ask(m.RemoveTenant(args.name, conn.peer))
    except BaseException:
        svc.pools.tell(m.ForgetTenant(tenant))
        raise
    await _durable(svc, pool_lsn, lsn)
    return Done(removed=released)


def _bound_process(peer: Peer, pid: int | None) -> tuple[int, float]:
    """The process a ``pid`` binding follows (default: the caller) and its start time.
    Only its owner (or an admin) may bind a lease to it."""
    pid = peer.pid if pid is None else pid
    start = process_start(pid) if pid > 0 else None
    if start is None:
        raise NotFoundError(f"process {pid} does not exist", {"field": "pid", "pid": pid})
    if not peer.admin and process_uid(pid) != peer.uid:
        raise ForbiddenError(
            f"process {pid} belongs to another user; bind leases only to your own processes",
            {"field": "pid", "pid": pid},
        )
    return pid, start


async def reserve(svc: Services, conn: Conn, args: Reserve) -> ReservationInfo:
    pid = _bound_process(conn.peer, args.pid) if args.binding == "pid" else None
    tenant, made = await svc.tenants.ask(m.PeekTenant(args.tenant, conn.peer))
    bind_contextvars(tenant=tenant.name)  # the request's task: the tenant it acts as
    tenant_lsn = 0
    if made:  # the caller's own tenant, new: a bad request must not create it
        await svc.pools.ask(m.CheckReserve(args))
        tenant, tenant_lsn = await svc.tenants.ask(m.Resolve(args.tenant, conn.peer))
    info, lsn = await svc.pools.ask(m.DoReserve(args, tenant, conn.peer, conn.id, conn.outbox, pid))
    await _durable(svc, tenant_lsn, lsn)
    result: ReservationInfo = info
    return result


async def why(svc: Services, conn: Conn, args: ReservationRef) -> WaitInfo:
    """Who holds what a request waits for is its owner's business, as for release."""
    info: WaitInfo = await _as_holder(svc, conn, args.id, lambda uid: m.WhyWaiting(args.id, uid))
    return info


async def plan(svc: Services, conn: Conn, args: Plan) -> PlanResult:
    await svc.pools.ask(m.CheckReserve(args.request))
    tenant: Tenant
    tenant, _ = await svc.tenants.ask(m.PeekTenant(args.request.tenant, conn.peer))
    if args.priority is not None:
        tenant = attrs.evolve(tenant, priority=args.priority)
    result: PlanResult = await svc.pools.ask(m.PlanRequest(args.request, tenant))
    return result


async def _as_holder(svc: Services, conn: Conn, rid: str, make: Callable[[int | None], Any]) -> Any:
    """Ask the pool actor for ``make(uid)``: the caller must have made reservation
    ``rid``, be an admin, or may act as its tenant (asked of the registry only then)."""
    outcome = await svc.pools.ask(make(None if conn.peer.admin else conn.peer.uid))
    if isinstance(outcome, m.OwnerCheck):
        tenant: Tenant = await svc.tenants.ask(m.GetTenant(outcome.tenant))
        if not TenantBook.may_act_as(conn.peer, tenant):
            raise ForbiddenError(
                f"uid {conn.peer.uid} may not act on reservation {rid} of tenant {tenant.name!r}",
                {"id": rid, "tenant": tenant.name},
            )
        outcome = await svc.pools.ask(make(None))
    result, lsn = outcome
    await _durable(svc, lsn)
    return result


async def register(svc: Services, conn: Conn, args: Register) -> ReservationInfo:
    """Add a process tree to a lease for GPU attribution (SPEC §10): the holder's own
    process only, since ``overuse = terminate`` signals what a lease owns."""
    pid, start = _bound_process(conn.peer, args.pid)
    info: ReservationInfo = await _as_holder(
        svc, conn, args.id, lambda uid: m.DoRegister(args.id, pid, start, uid, args.confine)
    )
    return info


async def top(svc: Services, conn: Conn, args: Empty) -> TopSnapshot:
    return await svc.reconciler.fresh()


async def release(svc: Services, conn: Conn, args: ReservationRef) -> ReservationInfo:
    info: ReservationInfo = await _as_holder(
        svc, conn, args.id, lambda uid: m.DoRelease(args.id, uid, conn.id)
    )
    return info


async def attach(svc: Services, conn: Conn, args: Attach) -> ReservationInfo:
    """Re-bind a lease or waiter to this connection by its token (SPEC §9): only the
    uid that made it (or an admin) may."""
    uid = None if conn.peer.admin else conn.peer.uid
    info: ReservationInfo = await _mutate(
        svc, m.DoAttach(args, uid, conn.id, conn.outbox, conn.peer.pid)
    )
    return info


async def resize(svc: Services, conn: Conn, args: Resize) -> ReservationInfo:
    info: ReservationInfo = await _as_holder(
        svc, conn, args.id, lambda uid: m.DoResize(args, uid, conn.id, conn.outbox)
    )
    return info


async def renew(svc: Services, conn: Conn, args: Renew) -> ReservationInfo:
    info: ReservationInfo = await _as_holder(svc, conn, args.id, lambda uid: m.DoRenew(args, uid))
    return info


async def preempt(svc: Services, conn: Conn, args: Preempt) -> Preempted:
    by, lsn = await svc.tenants.ask(m.Resolve(args.tenant, conn.peer))
    target: Tenant = await svc.tenants.ask(m.GetTenant(args.target))
    if by.name == target.name:
        raise InvalidError("a tenant cannot preempt itself", {"tenant": by.name})
    if by.priority <= target.priority:
        raise ForbiddenError(
            f"tenant {by.name!r} (priority {by.priority}) cannot preempt {target.name!r}"
            f" (priority {target.priority}): preemption needs a strictly higher priority",
            {
                "tenant": by.name,
                "priority": by.priority,
                "target": target.name,
                "target_priority": target.priority,
            },
        )
    victims, pool_lsn = await svc.pools.ask(
        m.PreemptTenant(target.name, args.pool, by.name, admin=conn.peer.admin)
    )
    await _durable(svc, lsn, pool_lsn)
    return Preempted(reservations=victims)


async def list_reservations(svc: Services, conn: Conn, args: ListReservations) -> ReservationList:
    return ReservationList(
        reservations=await svc.pools.ask(
            m.ListActive(args.pool, args.tenant, args.pending, args.idle)
        )
    )


async def status(svc: Services, conn: Conn, args: Empty) -> Status:
    pools: list[PoolInfo] = await svc.pools.ask(m.ListPools())
    tenants: list[Tenant] = await svc.tenants.ask(m.ListTenants())
    return Status(
        server_version=svc.version,
        boot_id=svc.boot_id,
        started_at=svc.started_at,
        pools=pools,
        tenants=len(tenants),
        active=sum(p.active for p in pools),
        connections=svc.connections(),
    )


async def export(svc: Services, conn: Conn, args: Export) -> History:
    return History(events=await svc.pools.ask(m.ExportHistory(args.since, args.tenant)))


async def resources(svc: Services, conn: Conn, args: ResourcesOf) -> HostResources:
    """The pool's view from its actor, plus the host's NUMA CPU lists read now (a
    few sysfs files, in memory, so inline). Raises NotFoundError for no such pool."""

    view: HostResources = await svc.pools.ask(m.ShowResources(args.pool))
    return msgspec.structs.replace(view, numa_cpus=numa_cpus())


async def subscribe(svc: Services, conn: Conn, args: Subscribe) -> Status:
    if "state" in args.topics:
        await svc.pools.ask(m.Subscribe(conn.outbox))
    if "top" in args.topics:
        svc.reconciler.subscribe(conn.outbox)
    return await status(svc, conn, Empty())


async def metrics(svc: Services, conn: Conn, args: Empty) -> MetricsText:
    """What the HTTP endpoint serves; anyone may read it, as ``status`` (no tenant
    names in it)."""
    return MetricsText(text=svc.metrics.text().decode())


HANDLERS: Final[dict[str, Handler]] = {
    "hello": hello,
    "pool.create": pool_create,
    "pool.list": pool_list,
    "pool.show": pool_show,
    "pool.set": pool_set,
    "pool.delete": pool_delete,
    "tenant.add": tenant_add,
    "tenant.list": tenant_list,
    "tenant.show": tenant_show,
    "tenant.set": tenant_set,
    "tenant.remove": tenant_remove,
    "reserve": reserve,
    "release": release,
    "renew": renew,
    "preempt": preempt,
    "list": list_reservations,
    "status": status,
    "export": export,
    "subscribe": subscribe,
    "resources": resources,
    "why": why,
    "plan": plan,
    "attach": attach,
    "register": register,
    "top": top,
    "resize": resize,
    "metrics": metrics,
}


def named_in(args: Any) -> dict[str, str]:
    """The ``reservation`` and ``tenant`` a request's arguments name, as log keys."""
    keys: dict[str, str] = {}
    rid = getattr(args, "id", None)
    if isinstance(rid, str):
        keys["reservation"] = rid
    tenant = getattr(args, "tenant", None)
    if isinstance(args, TenantAdd | TenantName | TenantSet | TenantRemove):
        tenant = args.name
    elif isinstance(args, Plan):
        tenant = args.request.tenant
    if isinstance(tenant, str):
        keys["tenant"] = tenant
    return keys


def _named_by(result: Any) -> dict[str, str]:
    """The reservation and tenant a result is about (a reserve's new id), as log keys."""
    if isinstance(result, ReservationInfo):
        return {"reservation": result.id, "tenant": result.tenant}
    if isinstance(result, TenantInfo):
        return {"tenant": result.name}
    return {}


async def dispatch(svc: Services, conn: Conn, op: str, args: Any) -> Any:
    """Run ``op``'s handler, timing it for the request-latency metric, and log the
    outcome at debug. Raises what the handler raises; an error that is not a
    ResdError counts as ``internal`` (the server logs it), and a request cancelled
    (its connection or the daemon going away) is not counted."""
    began = svc.metrics.clock()
    try:
        result = await HANDLERS[op](svc, conn, args)
    except ResdError as exc:
        took = svc.metrics.clock() - began
        svc.metrics.request(op, took, str(exc.code))
        log.debug("refused", code=str(exc.code), error=exc.message, seconds=took)
        raise
    except Exception:
        svc.metrics.request(op, svc.metrics.clock() - began, "internal")
        raise
    took = svc.metrics.clock() - began
    svc.metrics.request(op, took, None)
    log.debug("handled", seconds=took, **_named_by(result))
    return result
