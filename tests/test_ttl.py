"""TTL expiry on trio's MockClock: on time, with no other traffic, with a push."""

from __future__ import annotations

import trio

from tests.conftest import BASE_WALL, InProcess
from tests.wire import WireClient

POOL = {"name": "p", "resources": {"cpu": {"capacity": 8000}}, "max_per_tenant": 0}


async def test_expires_on_time_without_traffic(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await admin.ok("pool.create", POOL)
    holder = await WireClient.connect(inproc.socket)
    r = await holder.ok("reserve", {"pool": "p", "resources": {"cpu": 2000}, "ttl": 10.0})
    assert r["expires_at"] == r["created_at"] + 10.0
    start = trio.current_time()

    with trio.move_on_after(60):
        push = await holder.push()
    elapsed = trio.current_time() - start
    assert push["event"] == "expired"
    assert push["reservation"]["id"] == r["id"]
    assert push["reservation"]["state"] == "expired"
    assert 10.0 <= elapsed <= 10.1
    assert abs(push["reservation"]["ended_at"] - (BASE_WALL + trio.current_time())) < 0.1
    listed = await admin.ok("list", {})
    assert listed["reservations"] == []
    pool = await admin.ok("pool.show", {"name": "p"})
    assert pool["resources"][0]["allocated"] == 0


async def test_renew_pushes_expiry_back(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await c.ok("pool.create", POOL)
    r = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}, "ttl": 10.0})
    await trio.sleep(8)
    renewed = await c.ok("renew", {"id": r["id"], "ttl": 20.0})
    assert renewed["expires_at"] > r["expires_at"]
    await trio.sleep(5)  # past the first deadline: the stale timer must not expire it
    assert [x["id"] for x in (await c.ok("list", {}))["reservations"]] == [r["id"]]
    await trio.sleep(15.05)
    assert (await c.ok("list", {}))["reservations"] == []
    push = await c.push()
    assert push["event"] == "expired"


async def test_no_ttl_never_expires(inproc: InProcess, mock_clock: trio.testing.MockClock) -> None:
    c = await WireClient.connect(inproc.socket)
    await c.ok("pool.create", POOL)
    r = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    await trio.sleep(10 * 86400)
    assert [x["id"] for x in (await c.ok("list", {}))["reservations"]] == [r["id"]]


async def test_expiry_survives_restart(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await c.ok("pool.create", POOL)
    r = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}, "ttl": 30.0})
    await c.aclose()
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    assert [x["id"] for x in (await c.ok("list", {}))["reservations"]] == [r["id"]]
    await trio.sleep(30.05)
    assert (await c.ok("list", {}))["reservations"] == []
    history = (await c.ok("export", {}))["events"]
    assert [h["kind"] for h in history if h["reservation"] == r["id"]] == ["reserved", "expired"]
