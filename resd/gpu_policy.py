"""What the pool book does with the reconciler's verdict (SPEC §10): pure decisions.

``lease_views`` describes the book's live leases and GPUs for the judge;
``decide`` turns a ``Verdict`` into journal events (marks, terminations, adopted
foreign use) and the processes to signal. The pool actor journals and applies the
events and sends the signals; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from resd.holdings import GPU, VRAM
from resd.pools import PoolBook
from resd.reconcile import DeviceRef, ForeignProcess, LeaseView, ProcInfo, Verdict
from resd.records import Marked, PoolEvent, Reserved, Tenant, Terminating
from resd_client.protocol import MAX_PRIORITY, Reserve

#: the tenant of adopted foreign GPU use
UNMANAGED = "unmanaged"


def lease_views(
    book: PoolBook, pids: frozenset[int] | None = None
) -> tuple[list[LeaseView], list[DeviceRef]]:
    """Live leases as the judge needs them, and every pool GPU that has a uuid.
    ``pids`` None: every lease (for ``top``); else only those a sample can concern —
    leases holding GPUs, leases marked now, and leases rooted at one of ``pids``
    (the GPU processes and their ancestors) — so that a sample costs what the GPUs
    hold, not what the book holds."""
    devices: list[DeviceRef] = []
    by_member: dict[tuple[str, str], tuple[str, int, bool]] = {}
    for pool in book.pools.values():
        gpus = pool.resources.get(GPU)
        if gpus is None or gpus.kind != "set":
            continue
        for m in gpus.members:
            uuid = m.labels.get("uuid", "")
            if uuid:
                devices.append(DeviceRef(pool.name, m.name, uuid, m.capacity))
                by_member[(pool.name, m.name)] = (
                    uuid,
                    m.capacity,
                    m.labels.get("mig") == "instance",
                )
    if pids is None:
        wanted: Iterable[str] = book.reservations
    else:
        rooted = (rid for pid in pids for rid in book.by_root.get(pid, ()))
        wanted = sorted({*book.gpu_held, *book.marked, *rooted})
    leases = []
    for r in (book.reservations[rid] for rid in wanted):
        reserved: dict[str, int] = {}
        for member in r.members.get(GPU, ()):
            known = by_member.get((r.pool, member))
            if known is None:
                continue
            uuid, capacity, instance = known
            reserved[uuid] = r.resources[VRAM] if VRAM in r.resources and not instance else capacity
        roots = r.roots()
        leases.append(
            LeaseView(
                id=r.id,
                tenant=r.tenant,
                pool=r.pool,
                state=r.state,
                label=r.label,
                priority=r.priority,
                uid=r.uid,
                created_at=r.created_at,
                resources=dict(r.resources),
                members=dict(r.members),
                roots=roots,
                work=tuple(p for p, _ in r.procs) or roots,
                reserved=reserved,
                enforcement=r.enforcement,
                marks=dict(r.marks),
                idle_after=book.pools[r.pool].idle_after,
            )
        )
    return leases, devices


@attrs.frozen
class Decision:
    events: list[PoolEvent]
    #: lease newly over (``terminate``) → processes to SIGTERM now
    terminate: dict[str, tuple[ProcInfo, ...]]
    #: every lease in its grace for over-use → its processes now, SIGKILLed when the
    #: grace ends (refreshed each sample: children born meanwhile, or after a restart)
    doomed: dict[str, tuple[ProcInfo, ...]]
    #: the pools whose ``outside`` figures changed (their waiters may fit now)
    outside_changed: bool


def decide(book: PoolBook, verdict: Verdict, now: float, new_id: str) -> Decision:
    """Events for ``verdict``: marks that changed; ``overuse = terminate`` leases
    newly over put in their grace; reclaimable leases newly idle asked to give back;
    one foreign process adopted (``adopt_foreign``; ``new_id`` names its lease).
    Also sets each pool's ``outside`` bytes, which VRAM admission leaves alone."""
    events: list[PoolEvent] = []
    terminate: dict[str, tuple[ProcInfo, ...]] = {}
    doomed: dict[str, tuple[ProcInfo, ...]] = {}
    for rid, wanted in sorted(verdict.marks.items()):
        r = book.reservations.get(rid)
        if r is None:
            continue
        marked = book.mark(rid, wanted, now)
        events += marked
        pool = book.pools[r.pool]
        if pool.overuse == "terminate" and "overuse" in wanted:
            doomed[rid] = verdict.processes.get(rid, ())
        if r.state != "active":
            continue
        newly = {e.mark for e in marked if isinstance(e, Marked) and e.on}
        if "overuse" in newly and pool.overuse == "terminate":
            events.append(Terminating(rid, now + pool.grace, f"overuse: {wanted['overuse']}", now))
            terminate[rid] = verdict.processes.get(rid, ())
        elif "idle" in newly and r.reclaimable:
            events.append(
                Terminating(rid, now + pool.grace, f"idle: {wanted['idle']}", now, reclaim=True)
            )
    changed = False
    for name, holdings in book.holdings.items():
        outside = verdict.outside.get(name, {}) if verdict.sampled else {}
        if any(outside.get(k, 0) < v for k, v in holdings.outside.items()):
            changed = True
        holdings.outside = dict(outside)
    book.live_devices = verdict.devices
    book.live_vram = verdict.vram_used
    adopted = _adopt(book, verdict.foreign, now, new_id) if verdict.sampled else None
    if adopted is not None:
        events.append(adopted)
    return Decision(events, terminate, doomed, changed)


def _adopt(
    book: PoolBook, foreign: list[ForeignProcess], now: float, new_id: str
) -> Reserved | None:
    """The first foreign process that an ``adopt_foreign`` pool can record as a
    ``pid`` lease of the ``unmanaged`` tenant (released when it exits), as an event;
    None when there is none, or none fits the ledger."""
    adopted = {(r.pid, r.pid_start) for r in book.reservations.values() if r.pid is not None}
    tenant = Tenant(UNMANAGED, MAX_PRIORITY)  # what it holds cannot be taken back
    for f in foreign:
        if (f.pid, f.start) in adopted:
            continue
        for pool in sorted(book.pools.values(), key=lambda p: p.name):
            gpus = pool.resources.get(GPU)
            member = next(
                (m for m in (gpus.members if gpus else ()) if m.labels.get("uuid") == f.uuid), None
            )
            if not pool.adopt_foreign or member is None:
                continue
            args = Reserve(
                pool=pool.name,
                resources={VRAM: f.used},
                tenant=UNMANAGED,
                binding="pid",
                label=f"adopted: pid {f.pid}",
                constraints={"uuid": f.uuid},
                pid=f.pid,
            )
            holdings = book.holdings[pool.name]
            before = holdings.outside.get(member.name, 0)
            # Its bytes are in ``outside`` until the ledger holds them: not twice.
            holdings.outside[member.name] = max(0, before - f.used)
            events = book.reserve(
                args, tenant, uid=f.uid, session="", now=now, rid=new_id, pid=(f.pid, f.start)
            )
            if isinstance(events[0], Reserved):
                return events[0]
            holdings.outside[member.name] = before
    return None
