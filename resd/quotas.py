"""Tenant quotas per pool (SPEC §3, §4; Kueue's cohort rule): pure rules.

A tenant's quota in a pool has, per resource, a ``min`` (guaranteed) and a ``max``
(a cap). Amounts are what its live reservations there hold, in internal units; a
set or range resource counts members or values (``gpu=2`` is 2, a ``vram`` slice
its bytes). Rules:

* The mins of a pool may not add up to more than its capacity.
* A request that would take its tenant past a ``max`` is refused
  ``quota_exceeded`` (or waits with reason ``quota`` for its own tenant to give
  something back); one that is past the max by itself can never be granted.
* A tenant above its ``min`` of a resource is *borrowing* it. When a tenant whose
  request keeps it within its mins does not fit, capacity is reclaimed from
  borrowers of what it needs — whatever their priority — through the same notice,
  grace and release path as preemption: the fewest leases, each of a tenant still
  borrowing when its turn comes (Kueue's rule; a lease is never split).
"""

from __future__ import annotations

from collections.abc import Iterable

from resd.records import Pool, Quota, Reservation
from resd_client.errors import InvalidError, QuotaExceededError
from resd_client.protocol import QuotaInfo, Reserve


def capacity_of(pool: Pool, resource: str) -> int | None:
    """What a quota of ``resource`` is measured against: a scalar's effective
    capacity, a set's member count (``vram``: the GPUs' memory), a range's size;
    None when the pool has no such resource."""
    if resource == "vram":
        gpus = pool.resources.get("gpu")
        return sum(m.capacity for m in gpus.members) if gpus and gpus.sliceable else None
    cap = pool.resources.get(resource)
    if cap is None:
        return None
    if cap.kind == "set":
        return len(cap.members)
    return cap.effective


def held(reservations: Iterable[Reservation]) -> dict[str, int]:
    """What ``reservations`` hold together, per resource (their ``resources`` carry
    member and value counts)."""
    total: dict[str, int] = {}
    for r in reservations:
        for name, amount in r.resources.items():
            total[name] = total.get(name, 0) + amount
    return total


def asked(args: Reserve) -> dict[str, int]:
    """What a request asks for, per resource, as quotas count it (a gang: its
    parts' together)."""
    amounts = dict(args.resources)
    for name, names in args.members.items():
        amounts.setdefault(name, len(set(names)))
    for part in args.parts:
        for name, amount in asked(part.request()).items():
            amounts[name] = amounts.get(name, 0) + amount
    return amounts


def check_quota(pool: Pool, tenant: str, quota: Quota) -> None:
    """Refuse a quota naming what the pool lacks, or whose mins with the others'
    exceed the pool's capacity (InvalidError)."""
    for side in (quota.min, quota.max):
        for name in side:
            if capacity_of(pool, name) is None:
                raise InvalidError(
                    f"pool {pool.name!r} has no resource {name} to give a quota of",
                    {"resource": name, "allowed": sorted(pool.resources)},
                )
    for name, low in quota.min.items():
        others = sum(q.min.get(name, 0) for t, q in pool.quotas.items() if t != tenant)
        capacity = capacity_of(pool, name) or 0
        if others + low > capacity:
            raise InvalidError(
                f"the mins of {name} in pool {pool.name!r} would add up to {others + low},"
                f" more than its capacity {capacity}: a guarantee must be there to give",
                {"resource": name, "min_total": others + low, "capacity": capacity},
            )


def over_max(
    pool: Pool, tenant: str, holding: dict[str, int], args: Reserve
) -> QuotaExceededError | None:
    """The refusal of a request that takes ``tenant`` (holding ``holding``) past a
    max in ``pool``; None when it stays within them."""
    quota = pool.quotas.get(tenant)
    if quota is None or not quota.max:
        return None
    for name, amount in sorted(asked(args).items()):
        cap = quota.max.get(name)
        held = holding.get(name, 0)
        if cap is None or held + amount <= cap:
            continue
        never = amount > cap
        message = (
            f"tenant {tenant!r} asks {amount} {name} in pool {pool.name!r}, more than"
            f" its max of {cap}: it can never be granted"
            if never
            else f"tenant {tenant!r} holds {held} {name} in pool {pool.name!r};"
            f" {amount} more would pass its max of {cap}"
        )
        return QuotaExceededError(
            message,
            {
                "pool": pool.name,
                "tenant": tenant,
                "resource": name,
                "max": cap,
                "held": held,
                "requested": amount,
                "never": never,
            },
        )
    return None


def within_min(pool: Pool, tenant: str, holding: dict[str, int], args: Reserve) -> bool:
    """Whether granting ``args`` keeps ``tenant`` within its mins for everything it
    asks (so it may reclaim what borrowers hold)."""
    quota = pool.quotas.get(tenant)
    if quota is None or not quota.min:
        return False
    return all(
        name in quota.min and holding.get(name, 0) + amount <= quota.min[name]
        for name, amount in asked(args).items()
    )


def borrowing(pool: Pool, tenant: str, holding: dict[str, int], resource: str) -> int:
    """How much of ``resource`` ``tenant`` holds beyond its min (all it holds when it
    has no min there)."""
    quota = pool.quotas.get(tenant)
    low = 0 if quota is None else quota.min.get(resource, 0)
    return max(0, holding.get(resource, 0) - low)


def borrowers_first(
    pool: Pool,
    victims: Iterable[Reservation],
    holdings: dict[str, dict[str, int]],
    needs: Iterable[str],
) -> bool:
    """Kueue's reclaim rule: taking ``victims`` back one by one (in ranking order),
    each one's tenant must still be borrowing something the request needs when its
    turn comes (``holdings``: tenant → what it holds in the pool now). So a borrower
    gives back until it no longer borrows — and a single lease that holds more than
    its min may go whole, as a job cannot be split."""
    wanted = tuple(needs)
    left = {t: dict(h) for t, h in holdings.items()}
    for v in victims:
        mine = left[v.tenant]
        if not any(borrowing(pool, v.tenant, mine, n) > 0 for n in wanted if n in v.resources):
            return False
        for name, amount in v.resources.items():
            mine[name] = mine.get(name, 0) - amount
    return True


def info(pool: Pool, tenant: str, holding: dict[str, int]) -> QuotaInfo:
    quota = pool.quotas.get(tenant, Quota())
    return QuotaInfo(min=dict(quota.min), max=dict(quota.max), used=dict(holding))
