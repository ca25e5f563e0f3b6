"""Gang requests (SPEC §4): several parts, granted all or nothing in one journal
record, waiting, preempted, expiring and released as a whole, one lease to its
holder — in the daemon over the real protocol, and across a kill -9."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from resd_client import Client
from resd_client.protocol import PoolCreate, from_wire
from tests.conftest import DAEMON_ARGS, InProcess, Proc, subprocess_env
from tests.wire import WireClient

GANG = [{"pool": "a", "resources": {"gpu": 2}}, {"pool": "b", "resources": {"cpu": 4000}}]


async def pools(c: WireClient, preemption: str = "off", grace: float = 0.0) -> None:
    await c.ok(
        "pool.create",
        {
            "name": "a",
            "resources": {"gpu": {"kind": "set", "members": [{"name": str(i)} for i in range(4)]}},
            "max_per_tenant": 0,
            "preemption": preemption,
            "grace": grace,
        },
    )
    await c.ok(
        "pool.create",
        {"name": "b", "resources": {"cpu": {"capacity": 8000}}, "max_per_tenant": 0},
    )
    await c.ok("tenant.add", {"name": "other", "priority": 1})


def held(listed: dict[str, Any]) -> dict[str, Any]:
    return {r["id"]: r for r in listed["reservations"]}


async def test_a_gang_is_one_lease_of_all_its_parts(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pools(c)
    lease = await c.ok("reserve", {"parts": GANG, "label": "train"})
    assert lease["state"] == "active" and lease["pool"] == "a,b"
    assert lease["resources"] == {"gpu": 2, "cpu": 4000}
    assert len(lease["members"]["gpu"]) == 2
    assert [p["pool"] for p in lease["parts"]] == ["a", "b"]
    listed = held(await c.ok("list", {}))
    assert list(listed) == [lease["id"]]  # one lease, not two
    assert list(held(await c.ok("list", {"pool": "b"}))) == [lease["id"]]
    usage = {p["name"]: p for p in (await c.ok("pool.list", {}))["pools"]}
    assert {r["name"]: r["allocated"] for r in usage["b"]["resources"]}["cpu"] == 4000
    kinds = {e["kind"] for e in (await c.ok("export", {}))["events"]}
    assert "reserved" in kinds
    await c.ok("release", {"id": lease["id"]})
    assert held(await c.ok("list", {})) == {}
    for pool in (await c.ok("pool.list", {}))["pools"]:
        assert all(r["allocated"] == 0 for r in pool["resources"]), pool


async def test_all_or_nothing_and_waiting_as_a_whole(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pools(c)
    cpu = await c.ok("reserve", {"pool": "b", "resources": {"cpu": 6000}, "tenant": "other"})
    refused = await c.request("reserve", {"parts": GANG})
    assert refused["error"]["code"] == "insufficient", refused
    assert "parts[1]" in refused["error"]["message"]
    assert list(held(await c.ok("list", {}))) == [cpu["id"]]  # no GPU was taken
    pending = await c.ok("reserve", {"parts": GANG, "wait": True})
    assert pending["state"] == "pending" and pending["resources"] == {"gpu": 2, "cpu": 4000}
    # It holds back what it waits for, as any head waiter does: GPUs of pool a too.
    small = await c.request("reserve", {"pool": "a", "resources": {"gpu": 1}, "tenant": "other"})
    assert small["error"]["details"]["held_for"] == pending["id"], small
    await c.ok("release", {"id": cpu["id"]})
    granted = await c.push()
    while granted["event"] != "granted":
        granted = await c.push()
    assert granted["reservation"]["id"] == pending["id"]
    assert granted["reservation"]["resources"] == {"gpu": 2, "cpu": 4000}


async def test_a_gang_expires_and_is_preempted_as_a_whole(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pools(c, preemption="lower_priority", grace=5.0)
    await c.ok("tenant.add", {"name": "low", "priority": 2})
    await c.ok("tenant.add", {"name": "high", "priority": 9})
    short = await c.ok("reserve", {"parts": GANG, "ttl": 10.0, "tenant": "low"})
    await trio.sleep(10.5)
    assert held(await c.ok("list", {})) == {}
    expired = [e for e in (await c.ok("export", {}))["events"] if e["kind"] == "expired"]
    assert len(expired) == 2 and {e["pool"] for e in expired} == {"a", "b"}
    victim = await c.ok("reserve", {"parts": GANG, "tenant": "low"})
    await c.ok("reserve", {"pool": "a", "resources": {"gpu": 4}, "tenant": "high", "wait": True})
    assert held(await c.ok("list", {}))[victim["id"]]["state"] == "terminating"
    await trio.sleep(5.5)
    assert victim["id"] not in held(await c.ok("list", {}))
    ends = {
        (e["pool"], e["kind"])
        for e in (await c.ok("export", {}))["events"]
        if e["reservation"].startswith(victim["id"]) and e["kind"] == "preempted"
    }
    assert ends == {("a", "preempted"), ("b", "preempted")}  # its CPU part too
    assert short["id"] != victim["id"]


async def test_a_gang_survives_a_restart_whole(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pools(c)
    lease = await c.ok("reserve", {"parts": GANG})
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    again = held(await c.ok("list", {}))[lease["id"]]
    assert again["resources"] == {"gpu": 2, "cpu": 4000} and len(again["parts"]) == 2


def _gangs(socket: str) -> list[Any]:
    with Client(socket, reconnect=0) as client:
        return client.list()


@pytest.mark.slow
def test_a_gang_is_never_half_held_across_kill_9(short_tmp: Path) -> None:
    """Gangs are reserved in a loop while resd is killed (three times): after each restart every
    gang holds all its parts or none (one journal record per grant)."""
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=DAEMON_ARGS,
        log=short_tmp / "resd.log",
    ).start()
    with Client(proc.socket) as client:
        for name, spec in (
            ("a", {"gpu": {"kind": "set", "members": [{"name": str(i)} for i in range(64)]}}),
            ("b", {"cpu": {"capacity": 1_000_000}}),
        ):
            args = {"name": name, "resources": spec, "max_per_tenant": 0}
            client.call("pool.create", from_wire(PoolCreate, args))
    rng = random.Random(7)
    loader = [sys.executable, "-c", LOADER, proc.socket]
    for _ in range(3):
        worker = subprocess.Popen(loader, env=subprocess_env(), stderr=subprocess.DEVNULL)
        trio.run(trio.sleep, rng.uniform(0.2, 0.6))
        proc.kill9()
        worker.kill()
        worker.wait()
        proc.start()
        found = _gangs(proc.socket)
        for lease in found:
            assert [p.pool for p in lease.parts] == ["a", "b"], lease
            assert lease.resources == {"gpu": 1, "cpu": 1000}, lease
    assert proc.stop() == 0


LOADER = """
import sys
from resd_client import Client
from resd_client.errors import InsufficientError
from resd_client.protocol import Reserve, ReservationRef, from_wire
gang = {"parts": [{"pool": "a", "resources": {"gpu": 1}}, {"pool": "b", "resources": {"cpu": 1000}}]}
held = []
with Client(sys.argv[1], reconnect=0) as c:
    for lease in c.list():
        held.append(lease.id)
    while True:
        try:
            held.append(c.call("reserve", from_wire(Reserve, gang)).id)
        except InsufficientError:
            for rid in held[:40]:
                c.call("release", ReservationRef(id=rid))
            del held[:40]
"""


async def test_a_waiting_gang_keeps_its_token_through_passes_that_cannot_grant_it(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """A pass tries the gang part by part; undoing a trial must not drop the token
    that names the waiting request (every client sends one)."""
    c = await WireClient.connect(inproc.socket)
    await pools(c)
    blocker = await c.ok("reserve", {"pool": "b", "resources": {"cpu": 6000}, "tenant": "other"})
    token = "gang-token-0123456789"
    pending = await c.ok("reserve", {"parts": GANG, "wait": True, "token": token})
    for i in range(3):  # passes that try it and cannot grant it (a pool change runs one)
        await c.ok("pool.set", {"name": "b", "labels": {"round": str(i)}})
    again = await c.ok("attach", {"token": token})
    assert again["id"] == pending["id"] and again["state"] == "pending"
    await c.ok("release", {"id": blocker["id"]})
    granted = await c.push()
    while granted["event"] != "granted":
        granted = await c.push()
    assert granted["reservation"]["id"] == pending["id"]
    assert (await c.ok("attach", {"token": token}))["state"] == "active"
