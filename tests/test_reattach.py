"""Leases and waiters outlive a daemon restart (SPEC §9), on the wire and on trio's
MockClock: orphans held for ``reattach_grace``, re-attached by token, released with
a history event when nobody comes back."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from tests.conftest import InProcess
from tests.wire import WireClient

TOKEN = "tok-" + "a" * 28
OTHER = "tok-" + "b" * 28


async def setup(c: WireClient, cpu: int = 8000) -> None:
    await c.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": cpu}}, "max_per_tenant": 0},
    )
    for name, priority in (("low", 3), ("mid", 5)):
        await c.ok("tenant.add", {"name": name, "priority": priority})


def ask(tenant: str, cpu: int, **extra: Any) -> dict[str, Any]:
    return {"pool": "p", "tenant": tenant, "resources": {"cpu": cpu}, **extra}


async def history(c: WireClient, rid: str) -> list[dict[str, Any]]:
    events = (await c.ok("export", {}))["events"]
    return [e for e in events if e["reservation"] == rid]


async def test_a_session_lease_survives_a_restart_and_is_reattached(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    lease = await c.ok("reserve", ask("low", 2000, binding="session", ttl=100, token=TOKEN))
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    listed = (await c.ok("list"))["reservations"]
    assert [r["id"] for r in listed] == [lease["id"]], "held for its client"
    await trio.sleep(30)
    back = await c.ok("attach", {"token": TOKEN, "id": lease["id"]})
    assert back["id"] == lease["id"] and back["state"] == "active"
    assert back["expires_at"] == lease["expires_at"], "its TTL kept running"
    renewed = await c.ok("renew", {"id": lease["id"], "ttl": 100})
    assert renewed["expires_at"] > lease["expires_at"]
    await trio.sleep(60)  # past the grace: re-attached, so it stays
    assert [r["id"] for r in (await c.ok("list"))["reservations"]] == [lease["id"]]
    assert [e["kind"] for e in await history(c, lease["id"])] == [
        "reserved",
        "reattached",
        "renewed",
    ]
    # bound to the new connection now: closing it releases the lease at once
    await c.aclose()
    d = await WireClient.connect(inproc.socket)
    await trio.sleep(0.1)
    assert (await d.ok("list"))["reservations"] == []


async def test_an_orphan_not_reattached_in_time_is_released_and_history_says_so(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    lease = await c.ok("reserve", ask("low", 2000, binding="session", token=TOKEN))
    untokened = await c.ok("reserve", ask("low", 1000, binding="session"))
    await inproc.restart(reattach_grace=20.0)
    c = await WireClient.connect(inproc.socket)
    assert [r["id"] for r in (await c.ok("list"))["reservations"]] == [lease["id"]], (
        "a lease without a token cannot be re-attached: released at start"
    )
    await trio.sleep(19.9)
    assert len((await c.ok("list"))["reservations"]) == 1
    await trio.sleep(0.2)
    assert (await c.ok("list"))["reservations"] == []
    ended = await history(c, lease["id"])
    assert ended[-1]["kind"] == "released"
    assert "not re-attached within 20s" in ended[-1]["detail"]
    assert "resd stopped" in (await history(c, untokened["id"]))[-1]["detail"]
    # the holder coming back too late learns how it ended
    late = await c.ok("attach", {"token": TOKEN, "id": lease["id"]})
    assert late["state"] == "released" and "not re-attached" in late["reason"]
    unknown = await c.request("attach", {"token": TOKEN})
    assert unknown["error"]["code"] == "not_found"


async def test_grace_zero_keeps_the_old_behaviour(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    await c.ok("reserve", ask("low", 2000, binding="session", token=TOKEN))
    detached = await c.ok("reserve", ask("low", 1000, token=OTHER))
    await inproc.restart(reattach_grace=0.0)
    c = await WireClient.connect(inproc.socket)
    assert [r["id"] for r in (await c.ok("list"))["reservations"]] == [detached["id"]]


async def test_a_waiter_keeps_its_place_across_a_restart_and_is_granted_after(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    blocker = await c.ok("reserve", ask("low", 8000))
    w1 = await WireClient.connect(inproc.socket)
    first = await w1.ok("reserve", ask("mid", 6000, wait=True, binding="session", token=TOKEN))
    w2 = await WireClient.connect(inproc.socket)
    second = await w2.ok("reserve", ask("low", 4000, wait=True, binding="session", token=OTHER))
    assert (first["position"], second["position"]) == (1, 2)
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    queue = (await c.ok("list", {"pending": True}))["reservations"]
    assert [(r["id"], r["position"]) for r in queue] == [(first["id"], 1), (second["id"], 2)]
    w2 = await WireClient.connect(inproc.socket)
    again = await w2.ok("attach", {"token": OTHER, "id": second["id"]})
    assert again["state"] == "pending" and again["position"] == 2
    w1 = await WireClient.connect(inproc.socket)
    # the same reserve sent again (its reply lost) re-attaches instead of queueing twice
    same = await w1.ok("reserve", ask("mid", 6000, wait=True, binding="session", token=TOKEN))
    assert same["id"] == first["id"] and same["state"] == "pending" and same["position"] == 1
    await c.ok("release", {"id": blocker["id"]})
    granted = await w1.push()
    assert granted["event"] == "granted" and granted["reservation"]["id"] == first["id"]
    await c.ok("release", {"id": first["id"]})
    granted = await w2.push()
    assert granted["event"] == "granted" and granted["reservation"]["id"] == second["id"]


async def test_a_waiter_granted_while_orphaned_is_held_for_its_client(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    blocker = await c.ok("reserve", ask("low", 8000, ttl=10))
    w = await WireClient.connect(inproc.socket)
    queued = await w.ok("reserve", ask("mid", 6000, wait=True, binding="session", token=TOKEN))
    await inproc.restart()
    await trio.sleep(11)  # the blocker expires while nobody is attached to the waiter
    c = await WireClient.connect(inproc.socket)
    held = (await c.ok("list"))["reservations"]
    assert [r["id"] for r in held] == [queued["id"]]
    assert blocker["id"] not in [r["id"] for r in held]
    w = await WireClient.connect(inproc.socket)
    back = await w.ok("attach", {"token": TOKEN, "id": queued["id"]})
    assert back["state"] == "active"


async def test_attach_refuses_bad_tokens_and_changes_nothing(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    for bad in ("short", "x" * 129, "has space in it!!!!", 12, None):
        reply = await c.request("attach", {"token": bad})
        assert reply["error"]["code"] == "invalid", (bad, reply)
        assert "token" in reply["error"]["message"]
    reply = await c.request("reserve", ask("low", 1000, token="no"))
    assert reply["error"]["code"] == "invalid" and "token" in reply["error"]["message"]
    assert (await c.ok("list"))["reservations"] == []


async def test_a_retried_reserve_returns_what_the_first_attempt_made(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """The reply to a detached reserve is lost in a crash; the client sends the same
    request (same token) again: it gets the first reservation, not a second one."""
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    first = await c.ok("reserve", ask("low", 2000, token=TOKEN))
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    again = await c.ok("reserve", ask("low", 2000, token=TOKEN))
    assert again["id"] == first["id"] and again["state"] == "active"
    assert [r["id"] for r in (await c.ok("list"))["reservations"]] == [first["id"]]
    assert (await c.ok("pool.show", {"name": "p"}))["resources"][0]["allocated"] == 2000
