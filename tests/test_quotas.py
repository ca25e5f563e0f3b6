"""Tenant quotas (SPEC §3, §4): min and max per pool, borrowing and reclaim.

Book-level rules first (what a quota may say, ``quota_exceeded``), then the daemon
on trio's MockClock over the real protocol: a tenant within its min gets back what
a borrower holds after the borrower's grace, whatever the borrower's priority.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from resd.pools import PoolBook
from resd.records import Reserved, Tenant
from resd_client.errors import InvalidError
from resd_client.protocol import PoolCreate, Reserve, from_wire
from tests.conftest import InProcess
from tests.wire import WireClient


def book_with_pool(**policy: Any) -> PoolBook:
    book = PoolBook()
    args = from_wire(
        PoolCreate,
        {
            "name": "p",
            "resources": {
                "cpu": {"capacity": 8000},
                "gpu": {"kind": "set", "members": [{"name": str(i)} for i in range(8)]},
            },
            "max_per_tenant": 0,
            **policy,
        },
    )
    book.apply(book.create_pool(args, 0.0))
    return book


def grant(book: PoolBook, tenant: str, n: int, rid: str, **kw: Any) -> list[Any]:
    args = from_wire(Reserve, {"pool": "p", "resources": {"gpu": n}, **kw})
    events = book.reserve(args, Tenant(tenant, 5), uid=0, session="", now=1.0, rid=rid)
    if isinstance(events[0], Reserved):
        book.apply(events)
    return events


def test_a_quota_names_only_what_the_pool_has_and_mins_fit_its_capacity() -> None:
    book = book_with_pool()
    with pytest.raises(InvalidError, match="has no resource licenses"):
        book.set_quota("p", "a", {"licenses": 1}, None)
    book.apply(book.set_quota("p", "a", {"gpu": 5}, {"gpu": 8}))
    with pytest.raises(InvalidError, match="mins of gpu in pool 'p' would add up to 9"):
        book.set_quota("p", "b", {"gpu": 4}, None)
    with pytest.raises(InvalidError, match="min gpu 6 is above max gpu 5"):
        book.set_quota("p", "a", {"gpu": 6}, {"gpu": 5})
    book.apply(book.set_quota("p", "b", {"gpu": 3}, None))
    assert book.pool_info(book.pools["p"]).quotas["b"].min == {"gpu": 3}
    book.apply(book.set_quota("p", "b", {}, {}))  # both sides cleared: no quota
    assert "b" not in book.pools["p"].quotas


def test_max_refuses_with_quota_exceeded_and_counts_what_is_held() -> None:
    book = book_with_pool()
    book.apply(book.set_quota("p", "a", None, {"gpu": 6}))
    assert isinstance(grant(book, "a", 4, "r-000000000001")[0], Reserved)
    refused = grant(book, "a", 3, "r-000000000002")[0]
    assert refused.code == "quota_exceeded"
    assert "holds 4 gpu in pool 'p'; 3 more would pass its max of 6" in refused.reason
    assert isinstance(grant(book, "a", 2, "r-000000000003")[0], Reserved)
    assert isinstance(grant(book, "b", 2, "r-000000000004")[0], Reserved)  # no quota: no cap
    never = book.never_fits(from_wire(Reserve, {"pool": "p", "resources": {"gpu": 7}}), tenant="a")
    assert never is not None and never.code == "quota_exceeded"


def test_shrinking_a_pool_below_its_mins_is_refused() -> None:
    book = book_with_pool()
    book.apply(book.set_quota("p", "a", {"cpu": 6000}, None))
    from resd_client.protocol import PoolSet

    with pytest.raises(InvalidError, match="mins of cpu"):
        book.set_pool(from_wire(PoolSet, {"name": "p", "capacity": {"cpu": 4000}}))


# ------------------------------------------------------------------ the daemon


async def setup(inproc: InProcess, grace: float = 10.0) -> WireClient:
    c = await WireClient.connect(inproc.socket)
    await c.ok(
        "pool.create",
        {
            "name": "gpus",
            "resources": {"gpu": {"kind": "set", "members": [{"name": str(i)} for i in range(8)]}},
            "max_per_tenant": 0,
            "grace": grace,
        },
    )
    await c.ok("tenant.add", {"name": "a", "priority": 9})
    await c.ok("tenant.add", {"name": "b", "priority": 1})
    for tenant in ("a", "b"):
        await c.ok("tenant.set", {"name": tenant, "pool": "gpus", "min": {"gpu": 4}})
    return c


async def test_a_borrower_gives_back_what_a_tenant_within_its_min_needs(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await setup(inproc)
    borrowed = []
    for _ in range(2):
        borrowed.append(
            await c.ok("reserve", {"pool": "gpus", "tenant": "a", "resources": {"gpu": 4}})
        )
        await trio.sleep(1)
    shown = await c.ok("tenant.show", {"name": "a"})
    assert shown["quotas"]["gpus"] == {"min": {"gpu": 4}, "max": {}, "used": {"gpu": 8}}
    plan = await c.ok("plan", {"request": {"pool": "gpus", "tenant": "b", "resources": {"gpu": 4}}})
    assert plan["outcome"] == "reclaim" and [v["id"] for v in plan["victims"]] == [
        borrowed[1]["id"]
    ]
    assert "reclaim 1 reservation(s) from borrowers" in plan["message"]
    t0 = trio.current_time()
    pending = await c.ok(
        "reserve", {"pool": "gpus", "tenant": "b", "resources": {"gpu": 4}, "wait": True}
    )
    assert pending["state"] == "pending"
    why = await c.ok("why", {"id": pending["id"]})
    assert why["reason"] == "reclaiming" and "reclaiming from borrowers" in why["message"]
    # One of A's two leases (the youngest) is enough, and A keeps its own min.
    assert why["details"]["victims"] == [borrowed[1]["id"]]
    granted = await c.push()
    while granted["event"] != "granted":
        granted = await c.push()
    assert granted["reservation"]["id"] == pending["id"]
    assert trio.current_time() - t0 == pytest.approx(10.0, abs=0.5)  # after A's grace
    left = {r["id"] for r in (await c.ok("list", {}))["reservations"]}
    assert left == {borrowed[0]["id"], pending["id"]}
    status = (await c.ok("status", {}))["pools"][0]["quotas"]
    assert status["a"]["used"] == {"gpu": 4} and status["b"]["used"] == {"gpu": 4}


async def test_max_makes_a_waiter_wait_for_its_own_tenant(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await setup(inproc)
    await c.ok("tenant.set", {"name": "a", "pool": "gpus", "max": {"gpu": 6}})
    first = await c.ok("reserve", {"pool": "gpus", "tenant": "a", "resources": {"gpu": 4}})
    refused = await c.request("reserve", {"pool": "gpus", "tenant": "a", "resources": {"gpu": 4}})
    assert refused["error"]["code"] == "quota_exceeded", refused
    never = await c.request("reserve", {"pool": "gpus", "tenant": "a", "resources": {"gpu": 7}})
    assert never["error"]["code"] == "quota_exceeded" and never["error"]["details"]["never"]
    pending = await c.ok(
        "reserve", {"pool": "gpus", "tenant": "a", "resources": {"gpu": 4}, "wait": True}
    )
    assert (await c.ok("why", {"id": pending["id"]}))["reason"] == "quota"
    # B is not held back by A's capped waiter: it waits for its own tenant only.
    other = await c.ok("reserve", {"pool": "gpus", "tenant": "b", "resources": {"gpu": 2}})
    assert other["state"] == "active"
    await c.ok("release", {"id": first["id"]})
    granted = await c.push()
    while granted["event"] != "granted":
        granted = await c.push()
    assert granted["reservation"]["id"] == pending["id"]


async def test_quota_inputs_are_checked(inproc: InProcess) -> None:
    c = await setup(inproc)
    for args, field in (
        ({"name": "a", "min": {"gpu": 1}}, "pool"),
        ({"name": "a", "pool": "gpus"}, "min"),
        ({"name": "a", "pool": "gpus", "min": {"gpu": -1}}, "gpu"),
        ({"name": "a", "pool": "gpus", "min": {"gpu": 3}, "max": {"gpu": 2}}, "min"),
        ({"name": "a", "pool": "gpus", "min": {"cpu": 1}}, "cpu"),
        ({"name": "b", "pool": "gpus", "min": {"gpu": 5}}, "mins of gpu"),
    ):
        reply = await c.request("tenant.set", args)
        assert not reply["ok"] and reply["error"]["code"] == "invalid", (args, reply)
        assert field in reply["error"]["message"], reply
    missing = await c.request("tenant.set", {"name": "nobody", "pool": "gpus", "min": {"gpu": 1}})
    assert missing["error"]["code"] == "not_found"
    assert (await c.ok("tenant.show", {"name": "b"}))["quotas"]["gpus"]["min"] == {"gpu": 4}


async def test_a_borrower_holding_everything_in_one_lease_gives_it_back_whole(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """The issue's check: A borrows all 8 (one job); B asks for its 4 and gets them
    after A's grace, whatever A's priority. A job cannot be split, so A's goes."""
    c = await setup(inproc)
    everything = await c.ok("reserve", {"pool": "gpus", "tenant": "a", "resources": {"gpu": 8}})
    t0 = trio.current_time()
    pending = await c.ok(
        "reserve", {"pool": "gpus", "tenant": "b", "resources": {"gpu": 4}, "wait": True}
    )
    assert (await c.ok("why", {"id": pending["id"]}))["details"]["victims"] == [everything["id"]]
    granted = await c.push()
    while granted["event"] != "granted":
        granted = await c.push()
    assert trio.current_time() - t0 == pytest.approx(10.0, abs=0.5)
    kinds = [
        e["kind"]
        for e in (await c.ok("export", {}))["events"]
        if e["reservation"] == everything["id"]
    ]
    assert kinds == ["reserved", "preempting", "preempted"]


async def test_past_max_is_quota_exceeded_in_a_preempting_pool_too(inproc: InProcess) -> None:
    """A request that will not wait joins one scheduling pass where the pool may
    preempt; its refusal still says quota_exceeded, not insufficient."""
    c = await WireClient.connect(inproc.socket)
    await c.ok(
        "pool.create",
        {
            "name": "pre",
            "resources": {"cpu": {"capacity": 8000}},
            "max_per_tenant": 0,
            "preemption": "lower_priority",
        },
    )
    await c.ok("tenant.add", {"name": "t", "priority": 5})
    await c.ok("tenant.set", {"name": "t", "pool": "pre", "max": {"cpu": 2000}})
    await c.ok("reserve", {"pool": "pre", "tenant": "t", "resources": {"cpu": 2000}})
    refused = await c.request("reserve", {"pool": "pre", "tenant": "t", "resources": {"cpu": 1000}})
    assert refused["error"]["code"] == "quota_exceeded", refused
