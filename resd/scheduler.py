"""Who is granted, what is held back for the head, whom to evict: pure scheduling.

One pass walks the wait queue in rank order over the pool book. Each waiter is
granted if it fits; if not, what it needs is held back from every waiter ranked
below it (so a stream of small requests cannot starve a large one), and in a pool
with ``preemption = lower_priority`` the arbiter's choice of victims is evicted for
it. A waiter that conflicts only with its own tenant's holdings
(``max_per_tenant``) holds nothing back.

The pass is a generator of ``Step``s, so that it decides but never journals: its
driver (the pool actor) journals and applies each step's events to the book, then
resumes the pass, which goes on deciding against the changed book — the sans-I/O
pattern of the client core. A test drives it with ``book.apply`` alone. If the
driver cannot commit a step it closes the pass and runs a new one later. The pass
also writes each waiter's position and why it waits (display state, not journaled).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence

import attrs

from resd import preemption, quotas, resize
from resd.pools import PoolBook, denial_error
from resd.records import Pool, PoolEvent, Reservation, Reserved, Resized, Tenant
from resd.waiting import Waiter, WaitQueue
from resd_client.errors import (
    ConflictError,
    ErrorCode,
    InsufficientError,
    NotFoundError,
    QuotaExceededError,
    ResdError,
)
from resd_client.protocol import Reserve


@attrs.frozen
class Grant:
    """Grant ``waiter``: ``events`` is its ``Reserved``."""

    waiter: Waiter
    events: list[PoolEvent]


@attrs.frozen
class Evict:
    """Evict victims for ``waiter``: ``events`` end or put them in their grace;
    ``reclaim``: from borrowers, for a tenant within its min (any priority)."""

    waiter: Waiter
    events: list[PoolEvent]
    reclaim: bool = False


@attrs.frozen
class Drop:
    """``waiter`` can wait no more (its pool was deleted or changed under it)."""

    waiter: Waiter
    error: ResdError


Step = Grant | Evict | Drop


def decide(book: PoolBook, w: Waiter, now: float) -> list[PoolEvent]:
    """The book's answer to ``w`` now: ``[Reserved]`` (``[Resized]`` for a waiting
    resize) or ``[Denied]``."""
    if w.resize_of:
        return resize.resize(book, w.resize_of, w.args.resources, {}, now)
    return book.reserve(
        w.args,
        w.tenant,
        uid=w.uid,
        session=w.session,
        now=now,
        rid=w.id,
        pid=w.pid,
        peer=w.peer,
    )


def preemptible(book: PoolBook, w: Waiter) -> bool:
    """May ``w`` evict now? Only in a preempting pool, and a request that will not
    wait only where there is no grace to wait out."""
    return any(
        book.pools[p].preemption == "lower_priority" and (w.args.wait or book.pools[p].grace == 0)
        for p in w.pools
    )


def error_of(w: Waiter) -> ResdError:
    """The refusal a waiter that will not wait gets: why it would have waited."""
    if w.reason == "conflict":
        return ConflictError(w.message, w.details)
    if w.reason == "quota":
        return QuotaExceededError(w.message, w.details)
    return InsufficientError(w.message, w.details)


def waiting_reason(error: ResdError) -> tuple[str, str, dict[str, object]]:
    """(reason, message, details) a refusal means for a waiter."""
    if error.code == ErrorCode.CONFLICT:
        return "conflict", error.message, dict(error.details)
    if error.code == ErrorCode.QUOTA_EXCEEDED:
        return "quota", error.message, dict(error.details)
    return "resources", error.message, dict(error.details)


def run_pass(
    book: PoolBook, queue: WaitQueue, now: float, granted: Callable[[str], bool]
) -> Generator[Step, None, None]:
    """One pass over ``queue`` (see the module docstring). After each yielded step
    the driver has applied it; ``granted(id)`` tells the pass whether a waiter was
    granted meanwhile (an eviction with no grace grants at once)."""
    blocked: dict[tuple[str, str], str] = {}
    for position, w in enumerate(queue.ordered(book.usage_at(now)), 1):
        w.position = position
        if w.resize_of and w.resize_of not in book.reservations:
            yield Drop(w, NotFoundError(f"{w.resize_of} ended before it could grow", {"id": w.id}))
            continue
        head = next((blocked[k] for k in w.keys if k in blocked), None)
        if head is not None:
            w.waits_for(
                "resources",
                f"held back for {head}, ahead in the queue, which needs the same resources",
                {"held_for": head},
            )
            continue
        try:
            events = decide(book, w, now)
        except ResdError as exc:  # its pool was deleted or changed under it
            yield Drop(w, exc)
            continue
        if isinstance(events[0], Reserved | Resized):
            yield Grant(w, events)
            continue
        w.waits_for(*waiting_reason(denial_error(events[0])))
        if w.reason in ("conflict", "quota"):
            continue  # waits for its own tenant's release: holds nothing back
        if w.resize_of or w.args.parts:  # a resize or a gang evicts nobody: it waits
            for k in w.keys:
                blocked.setdefault(k, w.id)
            continue
        if not (yield from _reclaim_for(book, w, now)):
            yield from _preempt_for(book, w, now)
        if granted(w.id):
            continue
        for k in w.keys:
            blocked.setdefault(k, w.id)


def reclaim_plan(
    book: PoolBook, args: Reserve, tenant: Tenant, now: float
) -> preemption.Plan | None:
    """Kueue's cohort rule (``resd/quotas.py``): when ``tenant`` asks within its mins
    and does not fit, the fewest borrowers' leases (reclaimable first, then lowest
    priority, youngest — but any priority) whose eviction makes room without taking
    a tenant that no longer borrows. ``reclaim``: evict ``victims``; ``wait``:
    leases already terminating will make room; None: the rule does not apply, or
    reclaiming cannot make room (or ``args`` is a gang: a gang evicts nobody)."""
    if args.parts:
        return None
    for pool in book.check_request(args):
        if not pool.quotas:
            continue
        holding = book.quota_use(pool.name, tenant.name)
        if not quotas.within_min(pool, tenant.name, holding, args):
            continue
        live = book.active_in(pool.name)
        leaving = [r.id for r in live if r.state == "terminating"]
        if leaving and preemption.fits_without(book, args, tenant, pool, now, leaving):
            return preemption.Plan(
                "wait", pool.name, tuple(r for r in live if r.state == "terminating")
            )
        holdings = {t: book.quota_use(pool.name, t) for t in {r.tenant for r in live}}
        needs = {"gpu" if n == "vram" else n for n in quotas.asked(args)}
        ranked = sorted(
            (
                r
                for r in live
                if r.state == "active"
                and r.tenant != tenant.name
                and any(
                    quotas.borrowing(pool, r.tenant, holdings[r.tenant], n) > 0
                    for n in needs
                    if n in r.resources
                )
            ),
            key=lambda r: (not r.reclaimable, r.priority, -r.created_at, r.id),
        )
        fits = functools.partial(
            _reclaim_fits, book, args, tenant, pool, now, leaving, holdings, frozenset(needs)
        )
        victims = preemption.fewest(ranked, fits)
        if victims:
            return preemption.Plan("reclaim", pool.name, tuple(victims), pool.grace)
    return None


def _reclaim_fits(
    book: PoolBook,
    args: Reserve,
    tenant: Tenant,
    pool: Pool,
    now: float,
    leaving: list[str],
    holdings: dict[str, dict[str, int]],
    needs: frozenset[str],
    victims: Sequence[Reservation],
) -> bool:
    """Would ``args`` fit with ``victims`` (and the leaving) gone, each victim's
    tenant still borrowing when its turn comes?"""
    return quotas.borrowers_first(pool, victims, holdings, needs) and preemption.fits_without(
        book, args, tenant, pool, now, [*leaving, *(v.id for v in victims)]
    )


def _reclaim_for(book: PoolBook, w: Waiter, now: float) -> Generator[Step, None, bool]:
    """Reclaim from borrowers for ``w`` (``reclaim_plan``); True when the rule
    applies (then priority preemption is not tried), granting ``w`` when the
    victims leave at once."""
    plan = reclaim_plan(book, w.args, w.tenant, now)
    if plan is None:
        return False
    if plan.outcome == "reclaim" and (w.args.wait or plan.grace == 0):
        by = f"quota: reclaiming for tenant {w.tenant.name!r} (within its min)"
        if (yield from _evict(book, w, plan, by, now, reclaim=True)):
            return True
    ids = [v.id for v in plan.victims]
    w.waits_for(
        "reclaiming",
        f"reclaiming from borrowers: waiting for {', '.join(ids)} to give back what"
        f" tenant {w.tenant.name!r} is guaranteed",
        {"victims": ids, "pool": plan.pool},
    )
    return True


def _evict(
    book: PoolBook, w: Waiter, plan: preemption.Plan, by: str, now: float, *, reclaim: bool
) -> Generator[Step, None, bool]:
    """Evict ``plan``'s victims for ``w``; when they leave at once (no grace), grant
    ``w`` if it fits now. True when it was granted."""
    yield Evict(w, [book.evict(v, by, now) for v in plan.victims], reclaim=reclaim)
    if plan.grace == 0:
        events = decide(book, w, now)
        if isinstance(events[0], Reserved):
            yield Grant(w, events)
            return True
    return False


def _preempt_for(book: PoolBook, w: Waiter, now: float) -> Generator[Step, None, None]:
    """Evict the arbiter's choice of victims for ``w`` and, when they leave at once
    (no grace), grant it; else note what it waits for."""
    if not preemptible(book, w):
        return
    plan = preemption.plan(book, w.args, w.tenant, now)
    if plan.outcome == "preempt" and (w.args.wait or plan.grace == 0):
        if (yield from _evict(book, w, plan, w.tenant.name, now, reclaim=False)):
            return
    elif plan.outcome != "wait" or not plan.victims:
        return
    ids = [v.id for v in plan.victims]
    w.waits_for(
        "preemption_pending",
        f"waiting for {', '.join(ids)} to give back their resources (grace ends by"
        f" {max(v.deadline or now + plan.grace for v in plan.victims):.3f})",
        {"victims": ids, "pool": plan.pool},
    )
