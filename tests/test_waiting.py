"""Waiting (SPEC §4): queued requests, pushes on grant, rank order, no starvation,
timeouts and disconnects that leave nothing behind. On trio's MockClock."""

from __future__ import annotations

from typing import Any

import trio

from tests.conftest import InProcess
from tests.wire import WireClient


async def pool(c: WireClient, **extra: Any) -> None:
    await c.ok(
        "pool.create",
        {
            "name": "p",
            "resources": {"cpu": {"capacity": 8000}, "memory": {"capacity": 8 << 30}},
            "max_per_tenant": 0,
            **extra,
        },
    )
    for name, priority in (("low", 3), ("mid", 5), ("high", 8)):
        await c.ok("tenant.add", {"name": name, "priority": priority})


def ask(tenant: str, cpu: int = 0, **extra: Any) -> dict[str, Any]:
    resources = {"cpu": cpu} if cpu else {}
    return {"pool": "p", "tenant": tenant, "resources": resources, **extra}


async def pending(c: WireClient) -> list[dict[str, Any]]:
    return (await c.ok("list", {"pending": True}))["reservations"]  # type: ignore[no-any-return]


async def test_a_waiter_is_pushed_granted_when_room_appears(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    holder = await c.ok("reserve", ask("low", 8000))
    w = await WireClient.connect(inproc.socket)
    queued = await w.ok("reserve", ask("mid", 4000, wait=True))
    assert queued["state"] == "pending" and queued["position"] == 1
    why = await c.ok("why", {"id": queued["id"]})
    assert why["reason"] == "resources" and why["position"] == 1 and why["queued"] == 1
    assert why["details"]["resources"]["cpu"]["shortfall"] == 4000
    await c.ok("release", {"id": holder["id"]})
    granted = await w.push()
    assert granted["event"] == "granted"
    assert granted["reservation"]["id"] == queued["id"]
    assert granted["reservation"]["state"] == "active"
    assert await pending(c) == []
    active = (await c.ok("list"))["reservations"]
    assert [r["id"] for r in active] == [queued["id"]]


async def test_a_waiter_that_fits_is_granted_in_the_reply(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    r = await c.ok("reserve", ask("low", 1000, wait=True))
    assert r["state"] == "active" and r["position"] == 0


async def test_the_head_is_not_starved_by_smaller_requests(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    first = await c.ok("reserve", ask("low", 6000))
    big = await c.ok("reserve", ask("mid", 8000, wait=True))
    small = await c.ok("reserve", ask("mid", 1000, wait=True))
    assert small["state"] == "pending", "2000 CPU are free but held back for the head"
    why = await c.ok("why", {"id": small["id"]})
    assert why["reason"] == "resources" and why["details"]["held_for"] == big["id"]
    assert why["position"] == 2
    refused = await c.request("reserve", ask("mid", 1000))
    assert refused["error"]["code"] == "insufficient"
    assert big["id"] in refused["error"]["message"]
    # what the head does not touch may go
    other = await c.ok("reserve", {**ask("mid"), "resources": {"memory": 1 << 30}})
    assert other["state"] == "active"
    await c.ok("release", {"id": first["id"]})
    granted = await c.push()
    assert granted["event"] == "granted" and granted["reservation"]["id"] == big["id"]
    assert [w["id"] for w in await pending(c)] == [small["id"]]


async def test_queue_order_is_priority_then_deadline_then_arrival(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    holder = await c.ok("reserve", ask("high", 8000))
    ids = {}
    for name, tenant, deadline in (
        ("low", "low", None),
        ("mid-late", "mid", 2_000_000_000.0),
        ("mid-none", "mid", None),
        ("mid-soon", "mid", 1_900_000_000.0),
        ("high", "high", None),
    ):
        extra = {"deadline": deadline} if deadline else {}
        ids[name] = (await c.ok("reserve", ask(tenant, 8000, wait=True, **extra)))["id"]
    order = [w["id"] for w in await pending(c)]
    assert order == [ids[n] for n in ("high", "mid-soon", "mid-late", "mid-none", "low")]
    assert [w["position"] for w in await pending(c)] == [1, 2, 3, 4, 5]
    await c.ok("release", {"id": holder["id"]})
    granted = await c.push()
    assert granted["reservation"]["id"] == ids["high"]


async def test_fair_share_ranks_equal_priorities(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    await c.ok("tenant.add", {"name": "busy", "priority": 5})
    await c.ok("tenant.add", {"name": "idle", "priority": 5})
    await c.ok("reserve", ask("busy", 4000))
    await c.ok("reserve", ask("low", 4000))
    busy = await c.ok("reserve", ask("busy", 4000, wait=True))
    idle = await c.ok("reserve", ask("idle", 4000, wait=True))
    assert [w["id"] for w in await pending(c)] == [idle["id"], busy["id"]]


async def test_a_timeout_leaves_nothing_behind(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    await c.ok("reserve", ask("low", 8000))
    start = trio.current_time()
    queued = await c.ok("reserve", ask("mid", 1000, wait=True, timeout=5.0))
    denied = await c.push()
    assert trio.current_time() - start == 5.0
    assert denied["event"] == "denied" and denied["reservation_id"] == queued["id"]
    assert denied["error"]["code"] == "timeout"
    assert await pending(c) == []
    gone = await c.request("why", {"id": queued["id"]})
    assert gone["error"]["code"] == "not_found"
    history = (await c.ok("export"))["events"]
    assert history[-1]["kind"] == "denied" and "gave up" in history[-1]["detail"]


async def test_a_closed_connection_leaves_the_queue(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    holder = await c.ok("reserve", ask("low", 8000))
    w = await WireClient.connect(inproc.socket)
    await w.ok("reserve", ask("mid", 1000, wait=True, binding="session"))
    await w.aclose()
    for _ in range(100):
        if not await pending(c):
            break
        await trio.sleep(0.01)
    assert await pending(c) == []
    await c.ok("release", {"id": holder["id"]})
    assert (await c.ok("list"))["reservations"] == []


async def test_release_cancels_a_waiting_request(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    await c.ok("reserve", ask("low", 8000))
    queued = await c.ok("reserve", ask("mid", 1000, wait=True))
    cancelled = await c.ok("release", {"id": queued["id"]})
    assert cancelled["state"] == "cancelled"
    assert await pending(c) == []


async def test_a_conflict_waits_without_holding_others_back(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    await c.ok("pool.set", {"name": "p", "max_per_tenant": 1})
    mine = await c.ok("reserve", ask("low", 1000))
    again = await c.ok("reserve", ask("low", 1000, wait=True))
    why = await c.ok("why", {"id": again["id"]})
    assert why["reason"] == "conflict" and mine["id"] in why["message"]
    assert (await c.ok("reserve", ask("mid", 1000)))["state"] == "active"
    await c.ok("release", {"id": mine["id"]})
    granted = await c.push()
    assert granted["reservation"]["id"] == again["id"]


async def test_timeout_needs_wait_and_is_bounded(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    for bad in (
        ask("low", 1000, timeout=5.0),
        ask("low", 1000, wait=True, timeout=-1.0),
        ask("low", 1000, wait=True, deadline=-5.0),
        ask("low", 1000, wait="yes"),
    ):
        reply = await c.request("reserve", bad)
        assert reply["error"]["code"] == "invalid", bad
    assert (await c.ok("list"))["reservations"] == []


async def test_a_request_that_could_never_fit_is_refused_at_once(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    reply = await c.request("reserve", ask("low", 9000, wait=True))
    assert reply["error"]["code"] == "insufficient"
    assert "never" in reply["error"]["message"] and reply["error"]["details"]["never"] is True
    assert reply["error"]["details"]["resources"]["cpu"]["available"] == 8000
    assert await pending(c) == []
    plan = await c.ok("plan", {"request": ask("high", 9000)})
    assert plan["outcome"] == "never"


async def test_a_conflict_waiter_is_woken_by_a_release_of_other_resources(
    inproc: InProcess,
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    await c.ok("pool.set", {"name": "p", "max_per_tenant": 1})
    mine = await c.ok("reserve", {**ask("low"), "resources": {"memory": 1 << 30}})
    again = await c.ok("reserve", ask("low", 1000, wait=True))
    assert again["state"] == "pending"
    await c.ok("release", {"id": mine["id"]})
    granted = await c.push()
    assert granted["event"] == "granted" and granted["reservation"]["id"] == again["id"]


async def test_closed_connections_leave_no_bookkeeping_behind(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    actor = inproc.daemon.pools
    assert actor is not None
    held = await c.ok("reserve", ask("low", 4000))
    others = []
    for _ in range(3):
        w = await WireClient.connect(inproc.socket)
        # detached: outlives the connection
        await w.ok("reserve", {**ask("mid"), "resources": {"memory": 1 << 30}})
        queued = await w.ok("reserve", ask("mid", 8000, wait=True))
        assert queued["state"] == "pending"
        others.append(w)
    assert len(actor.holders) == 4 and len(actor.queue) == 3
    for w in others:
        await w.aclose()
    for _ in range(100):
        if not actor.queue:
            break
        await trio.sleep(0.01)
    assert len(actor.queue) == 0 and len(actor.holders) == 1
    assert not actor.queue.keys and not actor.queue.tenants
    await c.ok("release", {"id": held["id"]})
    assert len(actor.holders) == 0
