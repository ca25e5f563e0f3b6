"""Fair share (SPEC §4): decayed usage ÷ weight orders waiters of equal priority.

The arithmetic is checked against its closed form; then two tenants of weights 2
and 1 contend for a one-CPU pool on trio's MockClock, each always keeping one
request waiting, and get grants in about a 2:1 ratio.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from resd.fairshare import FairShare, Usage
from tests.conftest import InProcess
from tests.wire import WireClient


def test_usage_decays_by_half_each_half_life_and_accrues_at_its_rate() -> None:
    u = Usage()
    u.change(1.0, 0.0, 100.0)  # one whole pool from t=0
    held = u.at_time(100.0, 100.0)
    assert held == pytest.approx(100.0 / math.log(2) * 0.5)  # ∫ 2^(-(100-s)/100) ds
    u.change(-1.0, 100.0, 100.0)  # given back at t=100
    assert u.at_time(200.0, 100.0) == pytest.approx(held / 2)
    assert u.at_time(100.0 + 1000.0, 100.0) == pytest.approx(held / 1024)
    assert u.rate == 0.0


def test_fair_share_snapshot_keeps_values_not_rates() -> None:
    fair = FairShare(half_life=60.0)
    fair.change("a", 0.5, 10.0)
    fair.change("b", 0.25, 20.0)
    saved = fair.snapshot()
    again = FairShare(half_life=60.0)
    again.change("a", 0.5, 10.0)  # live reservations are held again on load
    again.restore(saved)
    assert again.usage("a", 100.0) == pytest.approx(fair.usage("a", 100.0))
    assert again.usage("b", 100.0) == pytest.approx(fair.tenants["b"].value * 2 ** (-80 / 60))


async def keep_asking(
    socket: str,
    tenant: str,
    granted: list[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Always one request of ``tenant`` waiting: a new one as soon as one is granted."""
    c = await WireClient.connect(socket)
    task_status.started()
    args = {"pool": "one", "tenant": tenant, "resources": {"cpu": 1000}, "ttl": 10.0, "wait": True}
    while True:
        reply = await c.ok("reserve", args)
        if reply["state"] != "active":
            push = await c.push()
            while push["event"] != "granted":
                push = await c.push()
        granted.append(tenant)


async def test_weights_two_to_one_get_grants_two_to_one(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await c.ok(
        "pool.create",
        {"name": "one", "resources": {"cpu": {"capacity": 1000}}, "max_per_tenant": 0},
    )
    await c.ok("tenant.add", {"name": "heavy", "priority": 5, "weight": 2.0})
    await c.ok("tenant.add", {"name": "light", "priority": 5, "weight": 1.0})
    granted: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(keep_asking, inproc.socket, "heavy", granted)
        await nursery.start(keep_asking, inproc.socket, "light", granted)
        await trio.sleep(3 * 3600)
        nursery.cancel_scope.cancel()
    heavy, light = granted.count("heavy"), granted.count("light")
    assert heavy + light >= 3 * 360 - 2  # the CPU was never idle
    assert heavy / light == pytest.approx(2.0, rel=0.1), (heavy, light)
    listed = {t["name"]: t for t in (await c.ok("tenant.list", {}))["tenants"]}
    assert listed["heavy"]["usage"] > listed["light"]["usage"] > 0
    assert listed["heavy"]["share"] + listed["light"]["share"] == pytest.approx(1.0, abs=1e-3)
