"""Every change is decided in full, journaled, then applied (SPEC §9): the
reproductions of issue 9 — a pool change that would orphan held members, a
journal that refuses an entry, a tenant removal racing a reserve — change nothing
they should not, and the state directory always starts again."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from resd import journal as journal_module
from resd.journal import JournalFailed
from resd.timerheap import TimerHeap
from tests.conftest import InProcess
from tests.wire import WireClient


async def pool(c: WireClient, **resources: Any) -> None:
    await c.ok("pool.create", {"name": "p", "resources": resources, "max_per_tenant": 0})


async def state_of(c: WireClient) -> tuple[Any, Any]:
    return (await c.ok("pool.show", {"name": "p"})), (await c.ok("list"))["reservations"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"remove": ["disks"]}, "disks would be removed"),
        ({"remove": ["ports"]}, "ports would be removed"),
        ({"remove": ["disks"], "capacity": {"disks": 5}}, "disks would change from set to scalar"),
        ({"remove": ["cpu"]}, "cpu would be removed"),
        ({"capacity": {"cpu": 500}}, "cpu would have 500 where 1000 is reserved"),
        ({"ratios": {"cpu": 0.1}}, "cpu would have 400 where 1000 is reserved"),
    ],
)
async def test_a_pool_change_that_would_drop_what_is_held_is_refused(
    inproc: InProcess, change: dict[str, Any], problem: str
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(
        c,
        cpu={"capacity": 4000},
        disks={"kind": "set", "members": [{"name": "a"}, {"name": "b"}]},
        ports={"kind": "range", "lo": 30000, "hi": 30009},
    )
    held = await c.ok(
        "reserve",
        {"pool": "p", "resources": {"cpu": 1000, "disks": 1, "ports": 2}},
    )
    before = await state_of(c)
    refused = await c.request("pool.set", {"name": "p", **change})
    assert refused["error"]["code"] == "conflict", refused
    assert problem in refused["error"]["message"]
    assert held["id"] in refused["error"]["message"], "names the holders"
    assert await state_of(c) == before, "nothing changed"
    await c.ok("release", {"id": held["id"]})
    # once nothing holds them, the same change goes through
    await c.ok("pool.set", {"name": "p", **change})
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    assert (await c.ok("list"))["reservations"] == []


async def test_removing_an_unheld_set_survives_a_restart(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(
        c,
        cpu={"capacity": 4000},
        disks={"kind": "set", "members": [{"name": "a"}, {"name": "b"}]},
    )
    r = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    info = await c.ok("pool.set", {"name": "p", "remove": ["disks"]})
    assert [x["name"] for x in info["resources"]] == ["cpu"]
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    assert [x["id"] for x in (await c.ok("list"))["reservations"]] == [r["id"]]
    await c.ok("release", {"id": r["id"]})


async def tenant_list(c: WireClient) -> list[dict[str, Any]]:
    """Tenants without their fair-share usage, which grows while a lease is held."""
    listed = (await c.ok("tenant.list"))["tenants"]
    return [{k: v for k, v in t.items() if k not in ("usage", "share")} for t in listed]


async def test_a_journal_that_refuses_an_entry_leaves_memory_unchanged(
    inproc: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c, cpu={"capacity": 4000})
    await c.ok("tenant.add", {"name": "t", "priority": 5})
    held = await c.ok("reserve", {"pool": "p", "tenant": "t", "resources": {"cpu": 1000}})
    before = await state_of(c)
    tenants = await tenant_list(c)

    def refuse(self: Any, domain: str, records: list[Any]) -> int:
        raise JournalFailed("disk on fire")

    monkeypatch.setattr(journal_module.Journal, "append", refuse)
    for op, args in (
        ("reserve", {"pool": "p", "tenant": "t", "resources": {"cpu": 1000}}),
        ("release", {"id": held["id"]}),
        ("renew", {"id": held["id"], "ttl": 10}),
        ("pool.set", {"name": "p", "capacity": {"cpu": 8000}}),
        ("pool.delete", {"name": "p", "force": True}),
        ("tenant.add", {"name": "u", "priority": 5}),
        ("tenant.set", {"name": "t", "priority": 9}),
        ("tenant.remove", {"name": "t", "force": True}),
        ("preempt", {"target": "t", "tenant": "root"}),
    ):
        reply = await c.request(op, args)
        assert not reply["ok"], (op, reply)
        if op != "preempt":  # preempt first resolves (creates) the caller's tenant
            assert reply["error"]["code"] == "unavailable", (op, reply)
            assert "nothing was changed" in reply["error"]["message"]
        assert await state_of(c) == before, op
        assert await tenant_list(c) == tenants, op
    monkeypatch.undo()
    await c.ok("release", {"id": held["id"]})


async def test_tenant_remove_cancels_its_waiters(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c, cpu={"capacity": 4000})
    await c.ok("tenant.add", {"name": "t", "priority": 5})
    await c.ok("tenant.add", {"name": "other", "priority": 5})
    blocker = await c.ok("reserve", {"pool": "p", "tenant": "other", "resources": {"cpu": 4000}})
    w = await WireClient.connect(inproc.socket)
    queued = await w.ok(
        "reserve", {"pool": "p", "tenant": "t", "resources": {"cpu": 1000}, "wait": True}
    )
    assert queued["state"] == "pending"
    done = await c.ok("tenant.remove", {"name": "t"})
    assert done["removed"] == 0
    denied = await w.push()
    assert denied["event"] == "denied" and denied["reservation_id"] == queued["id"]
    assert denied["error"]["code"] == "not_found"
    assert (await c.ok("list", {"pending": True}))["reservations"] == []
    await c.ok("release", {"id": blocker["id"]})
    assert (await c.ok("list"))["reservations"] == []


async def test_tenant_remove_cannot_race_a_reserve_for_it(inproc: InProcess) -> None:
    """Many reserves for the tenant in flight while it is removed: each one either
    was released by the removal or refused; none is left holding anything."""
    c = await WireClient.connect(inproc.socket)
    await pool(c, cpu={"capacity": 1_000_000})
    for _ in range(5):
        await c.ok("tenant.add", {"name": "t", "priority": 5})
        clients = [await WireClient.connect(inproc.socket) for _ in range(8)]
        outcomes: list[dict[str, Any]] = []

        async def hammer(w: WireClient, outcomes: list[dict[str, Any]] = outcomes) -> None:
            for _ in range(10):
                outcomes.append(
                    await w.request(
                        "reserve", {"pool": "p", "tenant": "t", "resources": {"cpu": 1}}
                    )
                )

        async with trio.open_nursery() as nursery:
            for w in clients:
                nursery.start_soon(hammer, w)
            await trio.lowlevel.checkpoint()
            removed = await c.request("tenant.remove", {"name": "t", "force": True})
        assert removed["ok"], removed
        assert all(o["ok"] or o["error"]["code"] == "not_found" for o in outcomes), outcomes
        assert [r for r in (await c.ok("list"))["reservations"] if r["tenant"] == "t"] == []


def test_timers_of_ended_reservations_do_not_linger() -> None:
    heap = TimerHeap()
    for i in range(10_000):
        heap.add(f"r-{i}", 1e9 + i)  # far deadlines, as a long TTL
        heap.discard(f"r-{i}")
        heap.add("renewed", float(i))  # the same key re-armed over and over
    assert len(heap) == 1
    assert heap.stored <= 2 * len(heap) + 64 + 1
    assert heap.pop_due(1e12) == [("renewed", None)]
