"""Choosing preemption victims (SPEC §4): pure decisions over the pool book.

A request that does not fit a pool with ``preemption = lower_priority`` may evict
reservations of strictly lower priority. Candidates are ranked reclaimable first,
then lowest priority, then youngest; the chosen set is the first single candidate
that makes room, else the shortest prefix of the ranking that does, pruned of any
member the others make unnecessary. Nothing is evicted when the request fits
already, when reservations already terminating will make room (the preemptor just
waits for them), or when even every candidate together would not make room.
Fit is decided by the same ``PoolBook.reserve`` that grants, on the book with the
candidates hypothetically removed (``PoolBook.without``).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from resd.pools import PoolBook
from resd.records import Pool, Reservation, Reserved, Tenant
from resd_client.protocol import Reserve


@attrs.frozen
class Plan:
    """``fits``: grantable now; ``wait``: terminating reservations will make room;
    ``preempt``: evicting ``victims`` in ``pool`` makes room; ``never``: no eviction
    of lower priorities can."""

    outcome: str
    pool: str
    victims: tuple[Reservation, ...] = ()
    grace: float = 0.0


def _fits(book: PoolBook, args: Reserve, tenant: Tenant, pool: Pool, now: float) -> bool:
    events = book.reserve(args, tenant, uid=0, session="", now=now, rid="r-000000", pools=[pool])
    return isinstance(events[0], Reserved)


def _fits_without(
    book: PoolBook, args: Reserve, tenant: Tenant, pool: Pool, now: float, rids: Iterable[str]
) -> bool:
    with book.without(rids):
        return _fits(book, args, tenant, pool, now)


def plan(book: PoolBook, args: Reserve, tenant: Tenant, now: float) -> Plan:
    """What granting ``args`` for ``tenant`` (at ``tenant.priority``) would take."""
    pools = book.check_request(args)
    for pool in pools:
        if _fits(book, args, tenant, pool, now):
            return Plan("fits", pool.name)
    if book.never_fits(args, pools) is not None:
        return Plan("never", pools[0].name)
    best: Plan | None = None
    for pool in pools:
        if pool.preemption != "lower_priority":
            continue
        live = book.active_in(pool.name)
        leaving = [r.id for r in live if r.state == "terminating"]
        if leaving and _fits_without(book, args, tenant, pool, now, leaving):
            return Plan("wait", pool.name, tuple(r for r in live if r.state == "terminating"))
        ranked = sorted(
            (r for r in live if r.state == "active" and r.priority < tenant.priority),
            key=lambda r: (not r.reclaimable, r.priority, -r.created_at),
        )
        victims = _choose(book, args, tenant, pool, now, leaving, ranked)
        if victims is not None and (best is None or len(victims) < len(best.victims)):
            best = Plan("preempt", pool.name, tuple(victims), pool.grace)
    if best is not None:
        return best
    return Plan(
        "never" if any(p.preemption == "lower_priority" for p in pools) else "wait", pools[0].name
    )


def _choose(
    book: PoolBook,
    args: Reserve,
    tenant: Tenant,
    pool: Pool,
    now: float,
    leaving: list[str],
    ranked: list[Reservation],
) -> list[Reservation] | None:
    if not ranked or not _fits_without(
        book, args, tenant, pool, now, [*leaving, *(r.id for r in ranked)]
    ):
        return None
    for r in ranked:
        if _fits_without(book, args, tenant, pool, now, [*leaving, r.id]):
            return [r]
    chosen: list[Reservation] = []
    for r in ranked:
        chosen.append(r)
        if _fits_without(book, args, tenant, pool, now, [*leaving, *(c.id for c in chosen)]):
            break
    for r in reversed(chosen[:-1]):
        rest = [c for c in chosen if c is not r]
        if _fits_without(book, args, tenant, pool, now, [*leaving, *(c.id for c in rest)]):
            chosen = rest
    return chosen
