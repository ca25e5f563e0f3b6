"""A request for scalar amounts in one pool skips the request checks and placement
(``PoolBook.scalar_pool``): a hypothesis state machine asks both ways at every step
(the general way with ``scalar_pool`` answering None) and requires the same events,
grants and refusals alike (quota, max per tenant, not enough), on a pool that also
has a set and a range held by other leases."""

from __future__ import annotations

import itertools
from typing import Any
from unittest import mock

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from resd import holdings
from resd.pools import PoolBook
from resd.records import Ended, Reserved, Tenant
from resd_client.protocol import PoolCreate, Reserve, from_wire

TENANTS = [Tenant(f"t{i}", i + 1) for i in range(3)]
NOW = 1_800_000_000.0


def pool_args(name: str = "p", **extra: Any) -> PoolCreate:
    return from_wire(
        PoolCreate,
        {
            "name": name,
            "resources": {
                "cpu": {"capacity": 8000, "ratio": 1.5},
                "memory": {"capacity": 1 << 34},
                "licenses": {"capacity": 3},
                "ports": {"kind": "range", "lo": 100, "hi": 119},
                "disks": {"kind": "set", "members": [{"name": "a"}, {"name": "b"}]},
            },
            "max_per_tenant": 4,
            **extra,
        },
    )


class BothPaths(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = PoolBook()
        self.book.apply(self.book.create_pool(pool_args(), NOW))
        self.book.apply(self.book.set_quota("p", "t0", None, {"cpu": 3000, "licenses": 2}))
        self.ids = itertools.count()
        self.now = NOW

    def _reserve(self, args: Reserve, tenant: Tenant, binding_peer: int | None) -> None:
        rid = f"r-{next(self.ids):012x}"
        self.now += 1.0
        kw: dict[str, Any] = {
            "uid": 1000,
            "session": "c-1",
            "now": self.now,
            "rid": rid,
            "pid": None,
            "peer": binding_peer,
        }
        events = self.book.reserve(args, tenant, **kw)
        with mock.patch.object(PoolBook, "scalar_pool", return_value=None):
            assert self.book.reserve(args, tenant, **kw) == events
        self.book.apply(events)

    @rule(
        tenant=st.sampled_from(TENANTS),
        amounts=st.dictionaries(
            st.sampled_from(["cpu", "memory", "licenses"]),
            st.integers(min_value=1, max_value=7000),
            min_size=1,
        ),
        binding=st.sampled_from(["detached", "session"]),
        ttl=st.one_of(st.none(), st.floats(min_value=0.5, max_value=100)),
        label=st.sampled_from(["", "job"]),
        token=st.one_of(st.none(), st.just("tok")),
    )
    def reserve_scalar(
        self,
        tenant: Tenant,
        amounts: dict[str, int],
        binding: str,
        ttl: float | None,
        label: str,
        token: str | None,
    ) -> None:
        if token is not None:
            token = f"{token}-{next(self.ids):08d}"
        args = Reserve(
            pool="p",
            resources=amounts,
            binding=binding,  # type: ignore[arg-type]
            ttl=ttl,
            label=label,
            token=token,
        )
        assert self.book.scalar_pool(args) is self.book.pools["p"]
        self._reserve(args, tenant, 4242)

    @rule(
        tenant=st.sampled_from(TENANTS),
        resource=st.sampled_from(["ports", "disks"]),
        cpu=st.integers(min_value=0, max_value=100),
    )
    def reserve_placed(self, tenant: Tenant, resource: str, cpu: int) -> None:
        amounts = {resource: 1, **({"cpu": cpu} if cpu else {})}
        args = Reserve(pool="p", resources=amounts)
        assert self.book.scalar_pool(args) is None
        self._reserve(args, tenant, None)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.book.reservations:
            rid = data.draw(st.sampled_from(sorted(self.book.reservations)))
            self.now += 1.0
            self.book.apply([Ended(rid, "released", self.now)])

    @invariant()
    def sums_are_the_leases(self) -> None:
        held: dict[str, int] = {}
        for r in self.book.reservations.values():
            for name in ("cpu", "memory", "licenses"):
                held[name] = held.get(name, 0) + r.resources.get(name, 0)
        assert {k: v for k, v in self.book.allocated["p"].items() if v} == {
            k: v for k, v in held.items() if v
        }


BothPaths.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBothPaths = BothPaths.TestCase


def test_what_takes_the_general_path() -> None:
    book = PoolBook()
    book.apply(book.create_pool(pool_args(), NOW))
    book.apply(book.create_pool(pool_args("q", labels={"zone": "a"}), NOW))
    assert book.scalar_pool(Reserve(pool="p", resources={"cpu": 1})) is book.pools["p"]
    general = [
        Reserve(pool="p", resources={"ports": 1}),  # a range value to choose
        Reserve(pool="p", resources={"disks": 1}),  # a set member to choose
        Reserve(pool="p", members={"disks": ["a"]}),
        Reserve(pool="p", resources={"cpu": 1}, constraints={"model": "x"}),  # refused there
        Reserve(pool="p", resources={"vram": 1}),  # refused there: no GPUs
        Reserve(pool="p", resources={"nonesuch": 1}),  # refused there
        Reserve(pool="nonesuch", resources={"cpu": 1}),  # refused there
        Reserve(selector={"zone": "a"}, resources={"cpu": 1}),  # a choice of pools
        Reserve(resources={"cpu": 1}),  # the host pool, which is not there
    ]
    for args in general:
        assert book.scalar_pool(args) is None, args
    assert book.scalar_pool(Reserve(resources={"cpu": 1}), [book.pools["q"]]) is book.pools["q"]
    assert book.scalar_pool(Reserve(resources={"cpu": 1}), list(book.pools.values())) is None


def test_a_scalar_request_never_reaches_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    book = PoolBook()
    book.apply(book.create_pool(pool_args(), NOW))

    def place(*_args: Any) -> Any:
        raise AssertionError("placement was asked")

    monkeypatch.setattr(holdings.PoolHoldings, "place", place)
    (event,) = book.reserve(
        Reserve(pool="p", resources={"cpu": 10}), TENANTS[0], uid=0, session="", now=NOW, rid="r-1"
    )
    assert isinstance(event, Reserved)
    assert event.reservation.resources == {"cpu": 10}
