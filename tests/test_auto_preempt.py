"""Automatic preemption (SPEC §4): the arbiter's choice of victims, grace, reclaim
and the dry-run ``plan``. On trio's MockClock."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.conftest import BASE_WALL, InProcess
from tests.wire import WireClient


async def setup(c: WireClient, grace: float = 0.0, preemption: str = "lower_priority") -> None:
    await c.ok(
        "pool.create",
        {
            "name": "p",
            "resources": {"cpu": {"capacity": 8000}},
            "max_per_tenant": 0,
            "preemption": preemption,
            "grace": grace,
        },
    )
    for name, priority in (("low", 2), ("low3", 3), ("mid", 5), ("high", 9)):
        await c.ok("tenant.add", {"name": name, "priority": priority})


def ask(tenant: str, cpu: int, **extra: Any) -> dict[str, Any]:
    return {"pool": "p", "tenant": tenant, "resources": {"cpu": cpu}, **extra}


async def active_ids(c: WireClient) -> set[str]:
    return {r["id"] for r in (await c.ok("list"))["reservations"]}


async def fill(c: WireClient) -> dict[str, str]:
    """8000 CPU used: old low 4000, young low 2000, mid 2000."""
    ids = {}
    for name, tenant, cpu in (("old", "low", 4000), ("young", "low", 2000), ("mid", "mid", 2000)):
        ids[name] = (await c.ok("reserve", ask(tenant, cpu)))["id"]
        await trio.sleep(1)
    return ids


async def test_fewest_victims_lowest_priority_then_youngest(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    ids = await fill(c)
    plan = await c.ok("plan", {"request": ask("high", 4000)})
    assert plan["outcome"] == "preempt"
    assert [v["id"] for v in plan["victims"]] == [ids["old"]], "one victim beats two"
    assert await active_ids(c) == set(ids.values()), "plan changes nothing"
    got = await c.ok("reserve", ask("high", 4000, wait=True))
    assert got["state"] == "active", "grace 0: evicted and granted at once"
    assert await active_ids(c) == {ids["young"], ids["mid"], got["id"]}
    history = (await c.ok("export"))["events"]
    assert [h["reservation"] for h in history if h["kind"] == "preempted"] == [ids["old"]]


async def test_youngest_first_among_equal_priority(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    ids = await fill(c)
    plan = await c.ok("plan", {"request": ask("high", 2000)})
    assert [v["id"] for v in plan["victims"]] == [ids["young"]]
    plan = await c.ok("plan", {"request": ask("high", 6000)})
    assert {v["id"] for v in plan["victims"]} == {ids["old"], ids["young"]}, "mid is spared"
    plan = await c.ok("plan", {"request": ask("mid", 2000)})
    assert [v["id"] for v in plan["victims"]] == [ids["young"]]
    plan = await c.ok("plan", {"request": ask("mid", 8000)})
    assert plan["outcome"] == "never", "mid cannot evict mid"


async def test_nothing_is_evicted_when_it_fits_or_cannot_help(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    first = await c.ok("reserve", ask("low", 2000))
    fits = await c.ok("reserve", ask("high", 2000, wait=True))
    assert fits["state"] == "active"
    assert await active_ids(c) == {first["id"], fits["id"]}
    # 6000 would need high's own 2000 too: only lower priorities may go, so nothing does
    hopeless = await c.ok("reserve", ask("mid", 7000, wait=True))
    assert hopeless["state"] == "pending"
    assert await active_ids(c) == {first["id"], fits["id"]}
    why = await c.ok("why", {"id": hopeless["id"]})
    assert why["reason"] == "resources"


async def test_preemption_off_never_evicts(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c, preemption="off")
    ids = await fill(c)
    plan = await c.ok("plan", {"request": ask("high", 4000)})
    assert plan["outcome"] == "wait" and plan["victims"] == []
    queued = await c.ok("reserve", ask("high", 4000, wait=True))
    assert queued["state"] == "pending"
    assert await active_ids(c) == set(ids.values())


async def test_grace_keeps_the_preemptor_waiting_at_the_head(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin, grace=30.0)
    holder = await WireClient.connect(inproc.socket)
    victim = await holder.ok("reserve", ask("low", 8000))
    boss = await WireClient.connect(inproc.socket)
    start = trio.current_time()
    queued = await boss.ok("reserve", ask("high", 6000, wait=True))
    assert queued["state"] == "pending"
    notice = await holder.push()
    assert notice["event"] == "preempted" and notice["reservation"]["state"] == "terminating"
    assert notice["deadline"] == pytest.approx(BASE_WALL + start + 30.0)
    why = await admin.ok("why", {"id": queued["id"]})
    assert why["reason"] == "preemption_pending" and why["details"]["victims"] == [victim["id"]]
    # a lower-priority newcomer cannot take what is being freed
    late = await admin.ok("reserve", ask("mid", 2000, wait=True))
    assert late["state"] == "pending"
    granted = await boss.push()
    assert granted["event"] == "granted" and granted["reservation"]["id"] == queued["id"]
    assert trio.current_time() - start == 30.0
    ended = await holder.push()
    assert ended["event"] == "preempted" and ended["reservation"]["state"] == "preempted"
    granted_late = await admin.push()
    assert granted_late["reservation"]["id"] == late["id"], "2000 left after the preemptor"


async def test_reclaimable_leases_go_first_and_may_release_in_time(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin, grace=30.0)
    plain = await admin.ok("reserve", ask("low", 4000))
    holder = await WireClient.connect(inproc.socket)
    lendable = await holder.ok("reserve", ask("low3", 4000, reclaimable=True))
    boss = await WireClient.connect(inproc.socket)
    start = trio.current_time()
    queued = await boss.ok("reserve", ask("high", 4000, wait=True))
    notice = await holder.push()
    assert notice["event"] == "reclaim" and notice["reservation"]["id"] == lendable["id"]
    assert notice["deadline"] == pytest.approx(BASE_WALL + start + 30.0)
    await trio.sleep(5)
    released = await holder.ok("release", {"id": lendable["id"]})
    assert released["state"] == "released"
    granted = await boss.push()
    assert granted["reservation"]["id"] == queued["id"]
    assert trio.current_time() - start == 5.0, "granted the moment it was given back"
    kinds = [(h["kind"], h["reservation"]) for h in (await admin.ok("export"))["events"]]
    assert ("released", lendable["id"]) in kinds
    assert not any(k == "preempted" for k, _ in kinds), "nobody was killed"
    assert plain["id"] in await active_ids(admin)


async def test_a_non_waiting_request_preempts_only_without_grace(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c, grace=10.0)
    victim = await c.ok("reserve", ask("low", 8000))
    refused = await c.request("reserve", ask("high", 1000))
    assert refused["error"]["code"] == "insufficient"
    assert await active_ids(c) == {victim["id"]}
    plan = await c.ok("plan", {"request": ask("low", 1000), "priority": 10})
    assert plan["outcome"] == "preempt" and plan["grace"] == 10.0


async def test_the_fewest_victims_not_a_pruned_prefix(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """7000 held as 2000, 2000, 1000, 1000, 1000 (and 1000 of high's own): 4000 takes
    the two leases of 2000; the greedy prefix (youngest first) evicted three."""
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    mine = await c.ok("reserve", ask("high", 1000))
    held = []
    for cpu in (2000, 2000, 1000, 1000, 1000):
        held.append((await c.ok("reserve", ask("low", cpu)))["id"])
        await trio.sleep(1)
    plan = await c.ok("plan", {"request": ask("high", 4000)})
    assert plan["outcome"] == "preempt"
    assert [v["id"] for v in plan["victims"]] == [held[1], held[0]], "youngest first"
    got = await c.ok("reserve", ask("high", 4000, wait=True))
    assert got["state"] == "active"
    assert await active_ids(c) == {mine["id"], *held[2:], got["id"]}
    history = (await c.ok("export"))["events"]
    preempted = [h["reservation"] for h in history if h["kind"] == "preempted"]
    assert sorted(preempted) == sorted(held[:2])
