"""Hypothesis stateful test of the pool book: a plain-dict model beside the real book.

Invariants after every step: nothing is ever allocated beyond the effective
capacity, the allocation sums equal the sum of live reservations, every granted
request is in the model and nothing else is, and a refusal happens only when the
model says the request did not fit (or the tenant was at its limit).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from resd import preemption
from resd.pools import PoolBook
from resd.records import Denied, Ended, Reservation, Reserved, Tenant, Terminating
from resd_client.errors import NotFoundError
from resd_client.protocol import PoolCreate, PoolSet, Renew, Reserve, ResourceSpec

RESOURCES = ("cpu", "memory", "licenses")
TENANTS = [Tenant(f"t{i}", priority=i + 1) for i in range(4)]


class PoolBookMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.book = PoolBook()
        self.now = 1000.0
        self.ids = itertools.count()
        self.capacity = {"cpu": (8000, 1.5), "memory": (1 << 34, 1.0), "licenses": (5, 1.0)}
        self.max_per_tenant = 3
        self.book.apply(
            self.book.create_pool(
                PoolCreate(
                    name="p",
                    resources={
                        k: ResourceSpec(capacity=c, ratio=r) for k, (c, r) in self.capacity.items()
                    },
                    max_per_tenant=self.max_per_tenant,
                    grace=0.0,
                ),
                self.now,
            )
        )
        self.model: dict[str, tuple[str, dict[str, int]]] = {}

    def effective(self, name: str) -> int:
        cap, ratio = self.capacity[name]
        return int(cap * ratio)

    def used(self, name: str) -> int:
        return sum(amounts.get(name, 0) for _, amounts in self.model.values())

    @rule(
        target=reservations,
        tenant=st.sampled_from(TENANTS),
        amounts=st.dictionaries(
            st.sampled_from(RESOURCES), st.integers(min_value=1, max_value=6000), min_size=1
        ),
        ttl=st.one_of(st.none(), st.floats(min_value=0.5, max_value=100)),
    )
    def reserve(self, tenant: Tenant, amounts: dict[str, int], ttl: float | None) -> str:
        rid = f"r-{next(self.ids):08x}"
        events = self.book.reserve(
            Reserve(pool="p", resources=amounts, ttl=ttl),
            tenant,
            uid=0,
            session="",
            now=self.now,
            rid=rid,
        )
        fits = all(self.used(n) + a <= self.effective(n) for n, a in amounts.items())
        held = sum(1 for t, _ in self.model.values() if t == tenant.name)
        self.book.apply(events)
        match events:
            case [Reserved()]:
                assert fits and held < self.max_per_tenant
                self.model[rid] = (tenant.name, dict(amounts))
            case [Denied(code=code)]:
                assert code == ("conflict" if held >= self.max_per_tenant else "insufficient")
                assert not fits or held >= self.max_per_tenant
            case _:
                raise AssertionError(events)
        return rid

    @rule(rid=consumes(reservations))
    def release(self, rid: str) -> None:
        if rid in self.model:
            self.book.apply(self.book.release(rid, self.now))
            del self.model[rid]

    @rule(rid=reservations)
    def renew_then_expire_stale(self, rid: str) -> None:
        r = self.book.reservations.get(rid)
        if r is None or r.ttl is None:
            return
        old = r.expires_at
        self.now += 0.25
        self.book.apply(self.book.renew(Renew(id=rid), self.now))
        assert old is not None
        assert self.book.expire(rid, old, self.now) == []  # the old timer is stale

    @rule(rid=reservations)
    def expire(self, rid: str) -> None:
        r = self.book.reservations.get(rid)
        if r is None or r.expires_at is None:
            return
        self.book.apply(self.book.expire(rid, r.expires_at, self.now))
        del self.model[rid]

    @rule(victim=st.sampled_from(TENANTS), by=st.sampled_from(TENANTS))
    def preempt(self, victim: Tenant, by: Tenant) -> None:
        holds = any(t == victim.name for t, _ in self.model.values())
        if not holds:  # nothing to preempt is an error, as resgate's
            with pytest.raises(NotFoundError, match="no active reservations to preempt"):
                self.book.preempt(victim.name, None, by.name, self.now)
            return
        events = self.book.preempt(victim.name, None, by.name, self.now)
        assert all(isinstance(e, Ended | Terminating) for e in events)
        self.book.apply(events)
        for rid in [rid for rid, (t, _) in self.model.items() if t == victim.name]:
            del self.model[rid]

    @rule(
        target=reservations,
        priority=st.integers(min_value=2, max_value=5),
        over=st.dictionaries(
            st.sampled_from(RESOURCES),
            st.one_of(st.integers(min_value=1, max_value=2), st.integers(1, 3000)),
            min_size=1,
        ),
    )
    def arbiter(self, priority: int, over: dict[str, int]) -> str:
        """Automatic preemption: the fewest lower-priority victims (checked against
        every smaller set when there are few candidates), evicted, then granted."""
        boss = Tenant("boss", priority)
        pool = self.book.pools["p"]
        amounts = {  # a little more than is free, up to everything
            n: max(1, min(self.effective(n), self.book.available(pool, n) + more))
            for n, more in over.items()
        }
        args = Reserve(pool="p", resources=amounts)
        rid = f"r-{next(self.ids):08x}"
        if self._fits_without(args, boss, []):
            return rid  # it fits: the arbiter is not asked
        ranked = preemption.rank(self.book.active_in("p"), priority)
        victims = preemption.choose(self.book, args, boss, pool, self.now, ranked)
        if len(ranked) <= 8:
            smallest = len(ranked) + 1 if victims is None else len(victims)
            for k in range(1, smallest):
                for combo in itertools.combinations(ranked, k):
                    assert not self._fits_without(args, boss, combo), (victims, combo)
        if victims is None:
            assert not self._fits_without(args, boss, ranked)
            return rid
        assert [v.id for v in victims] == sorted(
            (v.id for v in victims), key=[r.id for r in ranked].index
        ), "victims come in ranking order"
        self.book.apply([self.book.evict(v, boss.name, self.now) for v in victims])
        for v in victims:
            del self.model[v.id]
        events = self.book.reserve(args, boss, uid=0, session="", now=self.now, rid=rid)
        assert isinstance(events[0], Reserved), events
        self.book.apply(events)
        self.model[rid] = (boss.name, dict(amounts))
        return rid

    def _fits_without(self, args: Reserve, tenant: Tenant, gone: Iterable[Reservation]) -> bool:
        with self.book.without(r.id for r in gone):
            events = self.book.reserve(
                args, tenant, uid=0, session="", now=self.now, rid="r-ffffffff"
            )
        return isinstance(events[0], Reserved)

    @rule(name=st.sampled_from(RESOURCES), capacity=st.integers(min_value=0, max_value=20000))
    def resize(self, name: str, capacity: int) -> None:
        try:
            events = self.book.set_pool(PoolSet(name="p", capacity={name: capacity}))
        except Exception as exc:
            assert getattr(exc, "code", None) == "conflict"
            assert int(capacity * self.capacity[name][1]) < self.used(name)
            return
        self.book.apply(events)
        self.capacity[name] = (capacity, self.capacity[name][1])

    @invariant()
    def never_over_capacity(self) -> None:
        used = self.book.allocated["p"]
        for name in RESOURCES:
            assert used.get(name, 0) == self.used(name)
            assert used.get(name, 0) <= self.effective(name)
            assert self.book.available(self.book.pools["p"], name) >= 0

    @invariant()
    def same_reservations(self) -> None:
        assert set(self.book.reservations) == set(self.model)
        for rid, (tenant, amounts) in self.model.items():
            r = self.book.reservations[rid]
            assert (r.tenant, r.resources) == (tenant, amounts)


PoolBookMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestPoolBook = PoolBookMachine.TestCase


def test_snapshot_round_trip() -> None:
    machine = PoolBookMachine()
    for i, tenant in enumerate(TENANTS):
        machine.reserve(tenant, {"cpu": 1000 + i, "licenses": 1}, ttl=10.0 if i % 2 else None)
    book = PoolBook.from_snapshot(machine.book.snapshot())
    assert book.reservations == machine.book.reservations
    assert book.allocated == machine.book.allocated
    assert list(book.history) == list(machine.book.history)
    assert book.pools == machine.book.pools
