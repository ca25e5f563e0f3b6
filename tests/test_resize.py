"""Resizing a lease in place (issue 12): shrink always, grow when it fits or wait,
one journal record, TTL and binding unchanged."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from resd import resize
from resd.pools import PoolBook
from resd.records import Denied, Reserved, Resized, Tenant
from resd_client.errors import InvalidError
from resd_client.protocol import PoolCreate, Reserve, from_wire
from tests.conftest import InProcess
from tests.wire import WireClient

GiB = 1 << 30


def book() -> PoolBook:
    b = PoolBook()
    members = [
        {"name": str(i), "capacity": 80 * GiB, "labels": {"numa": str(i // 2)}} for i in range(4)
    ]
    args = from_wire(
        PoolCreate,
        {
            "name": "p",
            "resources": {
                "cpu": {"capacity": 8000},
                "gpu": {"kind": "set", "members": members},
                "ports": {"kind": "range", "lo": 100, "hi": 109},
            },
            "max_per_tenant": 0,
        },
    )
    b.apply(b.create_pool(args, 0.0))
    return b


def take(b: PoolBook, rid: str, **resources: int) -> None:
    args = from_wire(Reserve, {"pool": "p", "resources": resources, "ttl": 60.0})
    events = b.reserve(args, Tenant("t", 1), uid=0, session="", now=1.0, rid=rid)
    assert isinstance(events[0], Reserved), events
    b.apply(events)


def test_grow_and_shrink_keep_what_is_held() -> None:
    b = book()
    take(b, "r-000000000001", cpu=1000, gpu=1, ports=2)
    before = b.reservations["r-000000000001"]
    events = resize.resize(b, before.id, {"cpu": 3000, "gpu": 2, "ports": 5}, {}, 2.0)
    assert isinstance(events[0], Resized), events
    b.apply(events)
    r = b.reservations[before.id]
    assert r.resources == {"cpu": 3000, "gpu": 2, "ports": 5}
    assert r.members["gpu"] == ("0", "1")  # kept 0, added its NUMA neighbour
    assert r.values["ports"] == ((100, 104),)
    assert (r.ttl, r.expires_at, r.binding) == (before.ttl, before.expires_at, before.binding)
    assert b.used(b.pools["p"], "cpu") == 3000
    shrink = resize.resize(
        b, r.id, {"gpu": 1, "ports": 3}, {"gpu": ["0"], "ports": ["100-101"]}, 3.0
    )
    b.apply(shrink)
    r = b.reservations[r.id]
    assert r.members["gpu"] == ("1",) and r.values["ports"] == ((102, 104),)
    assert "gpu gave back 0" in shrink[0].detail
    assert b.history[-1].kind == "resized"


def test_growth_that_does_not_fit_is_refused_and_changes_nothing() -> None:
    b = book()
    take(b, "r-000000000001", cpu=1000)
    take(b, "r-000000000002", cpu=6000)
    events = resize.resize(b, "r-000000000001", {"cpu": 4000}, {}, 2.0)
    assert isinstance(events[0], Denied) and events[0].code == "insufficient"
    assert "cpu short by 2000" in events[0].reason
    assert b.reservations["r-000000000001"].resources == {"cpu": 1000}


@pytest.mark.parametrize(
    ("targets", "give_back", "match"),
    [
        ({"cpu": 0, "gpu": 0}, {}, "release it instead"),
        ({"licenses": 1}, {}, "has no resource licenses"),
        ({"gpu": 0}, {"gpu": ["3"]}, "name 1 of 0 \\(got 3\\)"),
        ({"cpu": 2000}, {"cpu": ["1"]}, "scalar"),
        ({"vram": GiB}, {}, "holds no VRAM slice"),
    ],
)
def test_bad_resizes_are_refused(
    targets: dict[str, int], give_back: dict[str, list[str]], match: str
) -> None:
    b = book()
    take(b, "r-000000000001", cpu=1000, gpu=1)
    with pytest.raises(InvalidError, match=match):
        resize.resize(b, "r-000000000001", targets, give_back, 2.0)


async def test_a_waiting_resize_is_granted_when_room_appears(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await c.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": 4000}}, "max_per_tenant": 0},
    )
    mine: dict[str, Any] = await c.ok(
        "reserve", {"pool": "p", "resources": {"cpu": 1000}, "binding": "session"}
    )
    other = await WireClient.connect(inproc.socket)
    theirs = await other.ok("reserve", {"pool": "p", "resources": {"cpu": 3000}})
    refused = await c.request("resize", {"id": mine["id"], "resources": {"cpu": 2000}})
    assert refused["error"]["code"] == "insufficient", refused
    pending = await c.ok(
        "resize", {"id": mine["id"], "resources": {"cpu": 2000}, "wait": True, "timeout": 60.0}
    )
    assert pending["state"] == "pending" and pending["id"] != mine["id"]
    shrunk = await other.ok("resize", {"id": theirs["id"], "resources": {"cpu": 2000}})
    assert shrunk["resources"] == {"cpu": 2000}
    pushed = await c.push()
    assert pushed["event"] == "resized", pushed
    assert pushed["reservation"]["id"] == mine["id"]
    assert pushed["reservation"]["resources"] == {"cpu": 2000}
    kinds = [
        e["kind"] for e in (await c.ok("export", {}))["events"] if e["reservation"] == mine["id"]
    ]
    assert kinds == ["reserved", "resized"]
    # A restart keeps the new amounts (one journal record each).
    await inproc.restart()
    c2 = await WireClient.connect(inproc.socket)
    listed = {r["id"]: r for r in (await c2.ok("list", {}))["reservations"]}
    assert listed[theirs["id"]]["resources"] == {"cpu": 2000}


async def test_a_waiting_resize_times_out_and_the_lease_keeps_its_amounts(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await c.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": 2000}}, "max_per_tenant": 0},
    )
    mine = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    t0 = trio.current_time()
    pending = await c.ok(
        "resize", {"id": mine["id"], "resources": {"cpu": 2000}, "wait": True, "timeout": 5.0}
    )
    assert pending["position"] == 1
    denied = await c.push()
    assert denied["event"] == "denied" and denied["reservation_id"] == pending["id"], denied
    assert denied["error"]["code"] == "timeout"
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.2)
    listed = {r["id"]: r for r in (await c.ok("list", {}))["reservations"]}
    assert listed[mine["id"]]["resources"] == {"cpu": 1000}
