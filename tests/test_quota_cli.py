"""Quotas from the command line, end to end (issue 12): a real resd, real ``resctl``
processes. Two tenants with ``min gpu=4`` on an 8-GPU pool: quotas set and shown,
a request past a max refused (exit 7) or queued with reason ``quota``, and a
borrower's lease reclaimed for the tenant within its min, seen by ``plan`` and
``why`` before it happens."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Proc, resctl, subprocess_env, wait_for

pytestmark = pytest.mark.slow


def spawn(proc: Proc, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "resctl", *args, "--socket", proc.socket],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def as_json(proc: Proc, *args: str) -> Any:
    return json.loads(resctl(proc, *args, "--json").stdout)


def pending(proc: Proc) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = as_json(proc, "list", "--pending")["reservations"]
    return listed


def reserve(proc: Proc, tenant: str, gpus: int) -> str:
    out = resctl(proc, "reserve", "--tenant", tenant, "--pool", "gp", "--gpu", str(gpus))
    return out.stdout.split()[0]


def two_tenants(proc: Proc) -> None:
    """Pool gp (8 GPUs, 16 cpus, no priority preemption, long grace); tenant a at
    priority 9 with min gpu=4, tenant b at priority 1 with min cpu=8,gpu=4, max gpu=6."""
    resctl(proc, "pool", "create", "--name", "gp", "--gpu", "8", "--cpu", "16")
    resctl(proc, "pool", "set", "--name", "gp", "--max-per-tenant", "0", "--grace", "60")
    resctl(proc, "tenant", "add", "--name", "a", "--priority", "9")
    resctl(proc, "tenant", "add", "--name", "b", "--priority", "1")
    resctl(proc, "tenant", "set", "--name", "a", "--pool", "gp", "--min", "gpu=4")
    resctl(
        proc,
        "tenant",
        "set",
        "--name",
        "b",
        "--pool",
        "gp",
        "--min",
        "cpu=8,gpu=4",
        "--max",
        "gpu=6",
    )


def test_quotas_are_set_shown_and_checked(resd_proc: Proc) -> None:
    two_tenants(resd_proc)
    b = as_json(resd_proc, "tenant", "show", "--name", "b")
    assert b["quotas"] == {"gp": {"min": {"cpu": 8000, "gpu": 4}, "max": {"gpu": 6}, "used": {}}}
    assert b["weight"] == 1 and b["usage"] == 0 and b["share"] == 0

    # the mins of a pool may not add up to more than it has
    greedy = resctl(
        resd_proc, "tenant", "set", "--name", "a", "--pool", "gp", "--min", "gpu=5", check=False
    )
    assert greedy.returncode == 2 and "more than its capacity 8" in greedy.stderr
    unknown = resctl(
        resd_proc, "tenant", "set", "--name", "a", "--pool", "gp", "--max", "foo=1", check=False
    )
    assert unknown.returncode == 2 and "no resource foo" in unknown.stderr
    bad = resctl(resd_proc, "tenant", "set", "--name", "a", "--min", "gpu=1", check=False)
    assert bad.returncode == 2 and "give --pool POOL too" in bad.stderr

    # a borrows all 8 GPUs while b is idle
    first, second = reserve(resd_proc, "a", 4), reserve(resd_proc, "a", 4)
    status = resctl(resd_proc, "status").stdout.splitlines()
    assert "pool gp quota a: gpu 8/min 4/max -  (borrowing gpu 4)" in status
    assert "pool gp quota b: cpu 0/min 8/max -, gpu 0/min 4/max 6" in status
    a_show = resctl(resd_proc, "tenant", "show", "--name", "a").stdout
    assert ["gp", "gpu", "4", "-", "8", "BORROWING", "4"] in [
        line.split() for line in a_show.splitlines()
    ]
    listed = {t["name"]: t for t in as_json(resd_proc, "tenant", "list")["tenants"]}
    assert listed["a"]["quotas"]["gp"]["used"] == {"gpu": 8}
    assert listed["a"]["share"] >= listed["b"]["share"]

    # past its max by itself: refused with quota_exceeded, exit 7
    over = resctl(resd_proc, "reserve", "--tenant", "b", "--pool", "gp", "--gpu", "7", check=False)
    assert over.returncode == 7, over.stderr
    assert over.stderr.startswith("resctl: quota_exceeded: ") and "max of 6" in over.stderr

    # b asks within its min: plan says whom it would reclaim from a, whatever a's priority
    plan = resctl(resd_proc, "plan", "--tenant", "b", "--pool", "gp", "--gpu", "4").stdout
    assert plan.startswith("reclaim: would reclaim 1 reservation(s) from borrowers")
    assert "to reclaim from borrowers" in plan
    planned = as_json(resd_proc, "plan", "--tenant", "b", "--pool", "gp", "--gpu", "4")
    assert planned["outcome"] == "reclaim" and planned["grace"] == 60
    (victim,) = planned["victims"]
    assert victim["tenant"] == "a" and victim["id"] in (first, second) and victim["id"] in plan

    # asked for real, it waits for the reclaim; why says so; the victim gives back
    waiter = spawn(resd_proc, "reserve", "--tenant", "b", "--pool", "gp", "--gpu", "4", "--wait")
    try:
        wait_for(lambda: len(pending(resd_proc)) == 1, 15, "b's request to queue")
        (queued,) = pending(resd_proc)
        why = resctl(resd_proc, "why", "--id", queued["id"]).stdout
        assert "reason: reclaiming — reclaiming from borrowers" in why
        assert f"reclaiming from borrowers in pool gp: {victim['id']}" in why
        states = {r["id"]: r["state"] for r in as_json(resd_proc, "list")["reservations"]}
        assert states[victim["id"]] == "terminating"
        resctl(resd_proc, "release", "--id", victim["id"])
        stdout, stderr = waiter.communicate(timeout=15)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate(timeout=10)
    assert waiter.returncode == 0, stderr
    assert f"waiting as {queued['id']} (position 1: reclaiming)" in stderr
    assert stdout.split()[:2] == [queued["id"], "active"]
    status = resctl(resd_proc, "status").stdout.splitlines()
    assert "pool gp quota a: gpu 4/min 4/max -" in status
    assert "pool gp quota b: cpu 0/min 8/max -, gpu 4/min 4/max 6" in status

    # b at 4 of its max 6 asks 4 more and waits: why says quota, in human units
    capped = spawn(resd_proc, "reserve", "--tenant", "b", "--pool", "gp", "--gpu", "4", "--wait")
    try:
        wait_for(lambda: len(pending(resd_proc)) == 1, 15, "b's second request to queue")
        (queued,) = pending(resd_proc)
        why = resctl(resd_proc, "why", "--id", queued["id"]).stdout
        assert "reason: quota (it would take its tenant past its max)" in why
        assert "gpu in pool gp: tenant b holds 4, asks 4 more, its max is 6" in why
        capped.send_signal(signal.SIGINT)
        capped.communicate(timeout=15)
    finally:
        if capped.poll() is None:
            capped.kill()
            capped.communicate(timeout=10)
    assert capped.returncode == 130
    assert pending(resd_proc) == []

    # clearing both sides removes b's quota
    resctl(resd_proc, "tenant", "set", "--name", "b", "--pool", "gp", "--clear-min", "--clear-max")
    assert as_json(resd_proc, "tenant", "show", "--name", "b")["quotas"] == {}
    assert "quota b" not in resctl(resd_proc, "status").stdout
