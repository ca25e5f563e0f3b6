"""Fair share (SPEC §4; Slurm's decayed usage): pure arithmetic on events' times.

A tenant's *usage* is the resource-seconds its reservations have held, each second
counted as the reservation's dominant share of its pool (its largest fraction of
any resource's capacity: 2 of 8 GPUs is 0.25 whatever else it holds), decayed with
a half-life: usage from one half-life ago counts half. Between two changes a
tenant holds a constant ``rate`` (the sum of its reservations' shares), so its
usage at any time has a closed form and needs no timer:

    u(t) = u(t0) · 2^(−Δ/h) + rate · h/ln 2 · (1 − 2^(−Δ/h)),   Δ = t − t0

Waiters of equal priority and deadline are ordered by usage ÷ weight, lower
first, so a tenant of weight 2 gets about twice the grants of one of weight 1
under sustained contention. The book updates a tenant's usage when a reservation
of it is granted or ends, at the event's own time, so replaying the journal gives
the same figures; snapshots carry them.
"""

from __future__ import annotations

import math

import attrs

from resd.records import Pool, Reservation

#: the default half-life of usage (``fair_share_half_life``), seconds
HALF_LIFE = 3600.0
_LN2 = math.log(2)


def share(pool: Pool, r: Reservation, vram_total: int) -> float:
    """``r``'s dominant share of ``pool``: its largest fraction of a capacity (a set
    counts members, a range values; a VRAM slice is a fraction of the GPUs' memory)."""
    best = 0.0
    for name, amount in r.resources.items():
        if name == "vram":
            capacity = vram_total
        else:
            cap = pool.resources.get(name)
            if cap is None:
                continue
            capacity = len(cap.members) if cap.kind == "set" else cap.effective
        if capacity > 0:
            best = max(best, amount / capacity)
    return min(best, 1.0)


@attrs.define
class Usage:
    """One tenant's decayed usage ``value`` as of ``at``, and the ``rate`` (sum of its
    live reservations' shares) it accrues at since."""

    value: float = 0.0
    rate: float = 0.0
    at: float = 0.0

    def at_time(self, now: float, half_life: float) -> float:
        at = self.at
        if now <= at or half_life <= 0:
            return self.value
        decay = math.pow(2.0, -(now - at) / half_life)
        return self.value * decay + self.rate * half_life / _LN2 * (1.0 - decay)

    def change(self, delta: float, now: float, half_life: float) -> None:
        """The rate changes by ``delta`` at ``now`` (a grant, or an end)."""
        if now > self.at:
            self.value = self.at_time(now, half_life)
            self.at = now
        rate = self.rate + delta
        self.rate = rate if rate > 0.0 else 0.0  # max(0.0, rate) without the call


@attrs.define
class FairShare:
    """Every tenant's usage; the pool book keeps one."""

    half_life: float = HALF_LIFE
    tenants: dict[str, Usage] = attrs.Factory(dict)

    def change(self, tenant: str, delta: float, now: float) -> None:
        u = self.tenants.get(tenant)
        if u is None:  # (not setdefault: a replay changes usage a million times)
            u = self.tenants[tenant] = Usage(at=now)
        u.change(delta, now, self.half_life)

    def usage(self, tenant: str, now: float) -> float:
        u = self.tenants.get(tenant)
        return 0.0 if u is None else u.at_time(now, self.half_life)

    def usages(self, now: float) -> dict[str, float]:
        return {t: u.at_time(now, self.half_life) for t, u in self.tenants.items()}

    def snapshot(self) -> dict[str, list[float]]:
        return {t: [u.value, u.at] for t, u in self.tenants.items()}

    def restore(self, saved: dict[str, list[float]]) -> None:
        """Values from a snapshot; rates come from the live reservations (held again
        on load), so only value and time are taken."""
        for tenant, (value, at) in saved.items():
            u = self.tenants.setdefault(tenant, Usage())
            u.value, u.at = value, at
