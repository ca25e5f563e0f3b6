"""Explicit preemption (resgate's rule) with and without a grace period, on MockClock."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from resd.config import Config
from resd.pools import PoolBook
from resd.records import Tenant
from resd.tenants import Peer, TenantBook
from resd_client.errors import ForbiddenError
from resd_client.protocol import PoolCreate, Reserve, from_wire
from tests.conftest import BASE_WALL, InProcess
from tests.wire import WireClient


async def setup(c: WireClient, grace: float) -> None:
    await c.ok(
        "pool.create", {"name": "p", "resources": {"cpu": {"capacity": 8000}}, "grace": grace}
    )
    await c.ok("tenant.add", {"name": "low", "priority": 3})
    await c.ok("tenant.add", {"name": "mid", "priority": 5})
    await c.ok("tenant.add", {"name": "high", "priority": 8})


async def test_needs_strictly_higher_priority(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c, 0.0)
    await c.ok("tenant.set", {"name": "mid", "priority": 8})
    r = await c.ok("reserve", {"pool": "p", "tenant": "mid", "resources": {"cpu": 1000}})
    same = await c.request("preempt", {"tenant": "high", "target": "mid"})
    assert same["error"]["code"] == "forbidden" and "strictly higher" in same["error"]["message"]
    lower = await c.request("preempt", {"tenant": "low", "target": "mid"})
    assert lower["error"]["code"] == "forbidden"
    assert [x["id"] for x in (await c.ok("list"))["reservations"]] == [r["id"]]
    self_ = await c.request("preempt", {"tenant": "mid", "target": "mid"})
    assert self_["error"]["code"] == "invalid"


async def test_immediate_preemption_frees_and_notifies(inproc: InProcess) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin, 0.0)
    holder = await WireClient.connect(inproc.socket)
    r = await holder.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 6000}})
    result = await admin.ok("preempt", {"tenant": "high", "target": "low"})
    assert [v["id"] for v in result["reservations"]] == [r["id"]]
    push = await holder.push()
    assert push["event"] == "preempted" and push["reservation"]["state"] == "preempted"
    assert push["by"] == "preempted by high"
    pool = await admin.ok("pool.show", {"name": "p"})
    assert pool["resources"][0]["allocated"] == 0


async def test_nothing_to_preempt_is_an_error(inproc: InProcess) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin, 30.0)
    await admin.ok("pool.create", {"name": "q", "resources": {"cpu": {"capacity": 1000}}})
    none = await admin.request("preempt", {"tenant": "high", "target": "low"})
    assert none["error"]["code"] == "not_found"
    assert none["error"]["message"] == "tenant 'low' has no active reservations to preempt"
    r = await admin.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 1000}})
    elsewhere = await admin.request("preempt", {"tenant": "high", "target": "low", "pool": "q"})
    assert elsewhere["error"]["code"] == "not_found"
    assert "no active reservations to preempt in pool 'q'" in elsewhere["error"]["message"]
    await admin.ok("preempt", {"tenant": "high", "target": "low"})  # now terminating
    again = await admin.request("preempt", {"tenant": "high", "target": "low"})
    assert again["error"]["code"] == "not_found", again
    listed = (await admin.ok("list"))["reservations"]
    assert [(x["id"], x["state"]) for x in listed] == [(r["id"], "terminating")]


async def test_grace_keeps_resources_counted_until_the_deadline(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin, 30.0)
    holder = await WireClient.connect(inproc.socket)
    r = await holder.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 6000}})
    other = await holder.ok("reserve", {"pool": "p", "tenant": "mid", "resources": {"cpu": 1000}})
    start = trio.current_time()
    result = await admin.ok("preempt", {"tenant": "high", "target": "low", "pool": "p"})
    assert [v["state"] for v in result["reservations"]] == ["terminating"]
    notice = await holder.push()
    assert notice["event"] == "preempted" and notice["reservation"]["state"] == "terminating"
    assert abs(notice["deadline"] - (BASE_WALL + start + 30.0)) < 0.1
    await trio.sleep(29.9)
    pool = await admin.ok("pool.show", {"name": "p"})
    assert pool["resources"][0]["allocated"] == 7000  # still counted during grace
    states = {x["id"]: x["state"] for x in (await admin.ok("list"))["reservations"]}
    assert states == {r["id"]: "terminating", other["id"]: "active"}
    renew = await holder.request("renew", {"id": r["id"], "ttl": 10.0})
    assert renew["error"]["code"] == "conflict"
    final = await holder.push()
    assert 30.0 <= trio.current_time() - start <= 30.1
    assert final["event"] == "preempted" and final["reservation"]["state"] == "preempted"
    pool = await admin.ok("pool.show", {"name": "p"})
    assert pool["resources"][0]["allocated"] == 1000
    kinds = [h["kind"] for h in (await admin.ok("export", {"tenant": "low"}))["events"]]
    assert kinds == ["reserved", "preempting", "preempted"]


async def test_release_during_grace_ends_it_early(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin, 30.0)
    r = await admin.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 6000}})
    await admin.ok("preempt", {"tenant": "high", "target": "low"})
    await admin.ok("release", {"id": r["id"]})
    await trio.sleep(31)
    kinds = [h["kind"] for h in (await admin.ok("export", {"tenant": "low"}))["events"]]
    assert kinds == ["reserved", "preempting", "released"]


async def test_delete_and_remove_refuse_while_active_unless_forced(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c, 0.0)
    await c.ok("reserve", {"pool": "p", "tenant": "low", "resources": {"cpu": 1000}})
    refused = await c.request("pool.delete", {"name": "p"})
    assert refused["error"]["code"] == "conflict"
    refused = await c.request("tenant.remove", {"name": "low"})
    assert refused["error"]["code"] == "conflict"
    assert (await c.ok("tenant.remove", {"name": "low", "force": True}))["removed"] == 1
    await c.ok("reserve", {"pool": "p", "tenant": "mid", "resources": {"cpu": 1000}})
    assert (await c.ok("pool.delete", {"name": "p", "force": True}))["removed"] == 1
    assert (await c.ok("pool.list"))["pools"] == []
    assert (await c.ok("list"))["reservations"] == []
    shrink = await c.ok("pool.create", {"name": "q", "resources": {"cpu": {"capacity": 4000}}})
    assert shrink["name"] == "q"
    await c.ok("reserve", {"pool": "q", "tenant": "mid", "resources": {"cpu": 3000}})
    below = await c.request("pool.set", {"name": "q", "capacity": {"cpu": 2000}})
    assert below["error"]["code"] == "conflict"
    grown = await c.ok("pool.set", {"name": "q", "capacity": {"cpu": 6000}, "ratios": {"cpu": 2.0}})
    assert grown["resources"][0]["effective"] == 12000


# --------------------------------------------------- who may preempt (issue 10)


def _book_with(preemption: str) -> tuple[PoolBook, Any]:
    book = PoolBook()
    book.apply(
        book.create_pool(
            from_wire(
                PoolCreate,
                {
                    "name": "p",
                    "resources": {"cpu": {"capacity": 4}},
                    "max_per_tenant": 0,
                    "preemption": preemption,
                },
            ),
            0.0,
        )
    )
    events = book.reserve(
        Reserve(pool="p", resources={"cpu": 1}),
        Tenant("root", 1),
        uid=0,
        session="",
        now=1.0,
        rid="r-000000000001",
    )
    book.apply(events)
    return book, events[0]


def test_a_non_admin_cannot_preempt_in_a_pool_whose_policy_is_off() -> None:
    book, _ = _book_with("off")
    with pytest.raises(ForbiddenError, match="preemption off; only an admin"):
        book.preempt("root", "p", "alice", 2.0, admin=False)
    with pytest.raises(ForbiddenError, match="only in pools with preemption off \\(p\\)"):
        book.preempt("root", None, "alice", 2.0, admin=False)  # not "preempted 0"
    assert len(book.preempt("root", "p", "ops", 2.0, admin=True)) == 1, "an admin may"
    book, _ = _book_with("lower_priority")
    assert len(book.preempt("root", "p", "alice", 2.0, admin=False)) == 1


def test_tenants_made_on_first_use_have_the_lowest_priority() -> None:
    book = TenantBook(default_priority=Config().default_priority)
    tenant, _ = book.resolve(None, Peer(uid=1000, gid=1000, pid=1, user="alice"), 0.0)
    assert tenant.priority == 1, "nobody below it to preempt: that power comes from an admin"
