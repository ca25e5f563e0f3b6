"""Hypothesis stateful test of set and range placement against a plain model.

After every step, across reserve / release / expire / preempt / automatic
preemption: no GPU or disk is held by two reservations, no GPU is both whole and
sliced, no GPU's slices exceed its memory, no port is assigned twice, and the free
ports plus the held ones are exactly the range. The arbiter's dry runs leave the
book exactly as they found it, and its victims are all of lower priority and
make room.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from resd import preemption
from resd.pools import PoolBook
from resd.records import Denied, Ended, Reserved, Tenant
from resd_client.errors import NotFoundError
from resd_client.protocol import PoolCreate, Reserve, from_wire

GiB = 1 << 30
VRAMS = [80 * GiB, 80 * GiB, 24 * GiB, 24 * GiB, 48 * GiB]
PORTS = (30000, 30999)
TENANTS = [Tenant(f"t{i}", i + 1) for i in range(3)]

requests = st.one_of(
    st.builds(lambda n: {"resources": {"gpu": n}}, st.integers(1, 3)),
    st.builds(lambda g: {"resources": {"vram": g * GiB}}, st.integers(1, 80)),
    st.builds(
        lambda n, c: {"resources": {"ports": n}, "contiguous": ["ports"] if c else []},
        st.integers(1, 400),
        st.booleans(),
    ),
    st.builds(
        lambda a, n: {"members": {"ports": [f"{a}-{a + n - 1}"]}},
        st.integers(PORTS[0], PORTS[1] - 50),
        st.integers(1, 50),
    ),
    st.builds(
        lambda names: {"members": {"disks": sorted(set(names))}},
        st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3),
    ),
    st.builds(lambda n: {"resources": {"disks": n}}, st.integers(1, 2)),
)

#: requests large enough to need evictions often
big_requests = st.one_of(
    st.builds(lambda n: {"resources": {"gpu": n}}, st.integers(2, 5)),
    st.builds(lambda g: {"resources": {"vram": g * GiB}}, st.integers(40, 80)),
    st.builds(lambda n: {"resources": {"ports": n}}, st.integers(300, 1000)),
    st.builds(lambda n: {"resources": {"disks": n}}, st.integers(2, 4)),
)


class MembersMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = PoolBook()
        self.ids = itertools.count()
        spec = {
            "name": "p",
            "max_per_tenant": 0,
            "grace": 0.0,
            "preemption": "lower_priority",
            "resources": {
                "gpu": {
                    "kind": "set",
                    "members": [
                        {"name": str(i), "capacity": v, "labels": {"numa": str(i % 2)}}
                        for i, v in enumerate(VRAMS)
                    ],
                },
                "ports": {"kind": "range", "lo": PORTS[0], "hi": PORTS[1]},
                "disks": {"kind": "set", "members": [{"name": n} for n in "abcd"]},
            },
        }
        self.book.apply(self.book.create_pool(from_wire(PoolCreate, spec), 0.0))
        self.live: dict[str, Any] = {}

    @rule(
        req=requests,
        tenant=st.sampled_from(TENANTS),
        placement=st.sampled_from([None, "binpack", "spread", "least_used"]),
        ttl=st.one_of(st.none(), st.just(5.0)),
    )
    def reserve(
        self, req: dict[str, Any], tenant: Tenant, placement: str | None, ttl: float | None
    ) -> None:
        rid = f"r-{next(self.ids):08x}"
        args = from_wire(Reserve, {"pool": "p", "placement": placement, "ttl": ttl, **req})
        events = self.book.reserve(args, tenant, uid=0, session="", now=1.0, rid=rid)
        self.book.apply(events)
        (event,) = events
        if isinstance(event, Reserved):
            self.live[rid] = event.reservation
        else:
            assert isinstance(event, Denied) and event.code == "insufficient"

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.live:
            rid = data.draw(st.sampled_from(sorted(self.live)))
            self.book.apply(self.book.release(rid, 2.0))
            del self.live[rid]

    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        timed = sorted(rid for rid, r in self.live.items() if r.expires_at is not None)
        if timed:
            rid = data.draw(st.sampled_from(timed))
            self.book.apply(self.book.expire(rid, self.live[rid].expires_at, 9.0))
            del self.live[rid]

    @rule(victim=st.sampled_from(TENANTS))
    def preempt(self, victim: Tenant) -> None:
        if not any(r.tenant == victim.name for r in self.live.values()):
            with pytest.raises(NotFoundError, match="in pool 'p'"):
                self.book.preempt(victim.name, "p", "boss", 3.0)
            return
        self.book.apply(self.book.preempt(victim.name, "p", "boss", 3.0))
        self.live = {rid: r for rid, r in self.live.items() if r.tenant != victim.name}

    def _state(self) -> tuple[Any, ...]:
        snap = self.book.snapshot()
        pool = self.book.pools["p"]
        return (
            sorted(snap["reservations"], key=lambda r: r["id"]),
            self.book.usage(pool),
            dict(self.book.allocated["p"]),
            dict(self.book.tenant_live),
        )

    @rule(req=big_requests, tenant=st.sampled_from(TENANTS))
    def preempt_for(self, req: dict[str, Any], tenant: Tenant) -> None:
        """What the arbiter does for a waiter of ``tenant`` in a grace-0 pool."""
        args = from_wire(Reserve, {"pool": "p", **req})
        before = self._state()
        plan = preemption.plan(self.book, args, tenant, 4.0)
        assert self._state() == before, "a dry run changed the book"
        event(f"plan: {plan.outcome}")
        if plan.outcome != "preempt":
            return
        assert plan.victims and all(v.priority < tenant.priority for v in plan.victims)
        evictions = [self.book.evict(v, tenant.name, 4.0) for v in plan.victims]
        assert all(isinstance(e, Ended) for e in evictions)
        self.book.apply(evictions)
        for v in plan.victims:
            del self.live[v.id]
        rid = f"r-{next(self.ids):08x}"
        events = self.book.reserve(args, tenant, uid=0, session="", now=4.0, rid=rid)
        assert isinstance(events[0], Reserved), "the victims did not make room"
        self.book.apply(events)
        self.live[rid] = events[0].reservation

    @invariant()
    def members_never_double_booked(self) -> None:
        assert set(self.book.reservations) == set(self.live)
        whole: dict[str, str] = {}
        sliced: dict[str, int] = {}
        disks: set[str] = set()
        for r in self.live.values():
            for m in r.members.get("gpu", ()):
                if "vram" in r.resources:
                    sliced[m] = sliced.get(m, 0) + r.resources["vram"]
                else:
                    assert m not in whole, f"GPU {m} held whole twice"
                    whole[m] = r.id
            for d in r.members.get("disks", ()):
                assert d not in disks, f"disk {d} held twice"
                disks.add(d)
        for m, used in sliced.items():
            assert m not in whole, f"GPU {m} both whole and sliced"
            assert used <= VRAMS[int(m)], f"GPU {m} over its memory"

    @invariant()
    def ports_partition_the_range(self) -> None:
        held: list[tuple[int, int]] = sorted(
            iv for r in self.live.values() for iv in r.values.get("ports", ())
        )
        free = list(self.book.holdings["p"].free["ports"])
        spans = sorted(held + free)
        cursor = PORTS[0]
        for lo, hi in spans:
            assert lo == cursor, f"gap or overlap at {lo} (expected {cursor})"
            cursor = hi + 1
        assert cursor == PORTS[1] + 1


MembersMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestMembers = MembersMachine.TestCase
