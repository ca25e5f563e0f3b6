"""Running work survives the daemon (SPEC §9), end to end against real resd processes.

A lease held inside ``with client.reserve(...)`` and a wait in ``reserve(wait=True)``
live through a SIGTERM restart and a kill -9 restart of resd (same socket, same
state directory), for the sync, trio and asyncio clients; ``resctl run`` keeps CMD
running meanwhile; ``resctl watch`` keeps following. The scenarios run through the
faces of ``tests.test_client_suite``. Each restart takes about half a second; the
other side of a scenario (restarting, releasing a blocker) runs on a helper thread
with short-lived admin clients that do not reconnect.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resd_client import Client, Disconnected, Reconnected, UnavailableError
from resd_client.protocol import (
    Export,
    PoolCreate,
    Preempt,
    ReservationInfo,
    ResourceSpec,
    StateEvent,
    TenantAdd,
)
from tests.conftest import Daemons, Proc, resctl, subprocess_env, wait_for
from tests.test_client_suite import FLAVOURS, Api, Background, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(45)]

RESTARTS = ("sigterm", "kill9")


@pytest.fixture
def proc(daemons: Daemons) -> Iterator[Proc]:
    """A real resd with fsync always (a kill -9 loses nothing acknowledged)."""
    p = daemons.make()
    p.start()
    yield p
    if p.proc is not None and p.proc.poll() is None:
        assert p.stop() == 0, p.log_text()


def admin(proc: Proc) -> Client:
    """A short-lived client for the test's own checks; it never reconnects."""
    return Client(proc.socket, name="reconnect-admin", reconnect=0)


def make_pool(proc: Proc, name: str = "p", cpu: int = 4) -> str:
    with admin(proc) as c:
        c.call(
            "pool.create",
            PoolCreate(
                name=name, resources={"cpu": ResourceSpec(capacity=cpu * 1000)}, max_per_tenant=0
            ),
        )
    return name


def listed(proc: Proc, pool: str, *, pending: bool = False) -> list[ReservationInfo]:
    with admin(proc) as c:
        return c.list(pool=pool, pending=pending)


def restart(proc: Proc, how: str) -> None:
    """Stop resd (SIGTERM, or kill -9) and start it again on the same socket and state."""
    if how == "sigterm":
        assert proc.stop() == 0, proc.log_text()
    else:
        proc.kill9()
    proc.start()


async def restart_meanwhile(api: Api, proc: Proc, how: str) -> None:
    """Restart resd on a helper thread while the client under test keeps running."""
    done = threading.Event()

    def go() -> None:
        try:
            restart(proc, how)
        finally:
            done.set()

    helper = Background(go)
    assert await api.wait(done, 30.0), "the restart took too long"
    helper.join()


# ----------------------------------------------------------- (a) and (b): a lease


async def lease_survives(api: Api, proc: Proc, how: str) -> None:
    pool = make_pool(proc)
    async with api.held(pool, cpu=1, ttl=60, label="job") as lease:
        assert lease.token and lease.info.binding == "session"
        await restart_meanwhile(api, proc, how)
        # the same calls as before, as if nothing happened
        await api.renew(lease, 120)
        assert lease.ended is None and lease.info.state == "active"
        assert [r.id for r in await api.list(pool=pool)] == [lease.id]
        assert [r.id for r in listed(proc, pool)] == [lease.id], "another client sees it too"
        notices = [await api.next_event(), await api.next_event()]
        assert isinstance(notices[0], Disconnected) and isinstance(notices[1], Reconnected)
        await api.release(lease)
        assert lease.ended == "released"
    assert await api.list(pool=pool) == []
    assert listed(proc, pool) == []


@pytest.mark.parametrize("how", RESTARTS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_session_lease_survives_a_restart(flavour: str, how: str, proc: Proc) -> None:
    run(flavour, proc.socket, lease_survives, proc, how)


async def calls_wait_for_the_reconnection(api: Api, proc: Proc) -> None:
    pool = make_pool(proc)
    lease = await api.reserve(pool, cpu=1)
    proc.kill9()
    helper = Background(lambda: (time.sleep(0.5), proc.start()))
    t0 = time.monotonic()
    status = await api.status()  # made while resd is down: sent once it is back
    assert time.monotonic() - t0 >= 0.4
    helper.join(20)
    assert status.active == 1
    assert [r.id for r in await api.list(pool=pool)] == [lease.id]
    await api.release(lease)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_calls_made_while_resd_is_down_wait_for_it(flavour: str, proc: Proc) -> None:
    run(flavour, proc.socket, calls_wait_for_the_reconnection, proc)


# ------------------------------------------------------------------ (c): a wait


async def wait_survives(api: Api, proc: Proc, how: str) -> None:
    pool = make_pool(proc)
    with admin(proc) as c:
        blocker = c.reserve(pool, cpu=4, binding="detached")

    def restart_then_unblock() -> None:
        wait_for(lambda: bool(listed(proc, pool, pending=True)), 10, "the request to queue")
        restart(proc, how)
        (queued,) = listed(proc, pool, pending=True)  # it kept its place
        wait_for(
            lambda: "reattached" in proc.log_text() and queued.id in proc.log_text(),
            10,
            "the waiter to be re-attached",
        )
        with admin(proc) as c:
            c.release(blocker.id)

    helper = Background(restart_then_unblock)
    lease = await api.reserve(pool, cpu=2, timeout=30)
    helper.join(30)
    assert lease.info.state == "active" and lease.ended is None
    assert [r.id for r in listed(proc, pool)] == [lease.id]
    await api.release(lease)
    assert listed(proc, pool) == []


@pytest.mark.parametrize(
    ("flavour", "how"),
    [("sync", "sigterm"), ("sync", "kill9"), ("trio", "kill9"), ("asyncio", "sigterm")],
)
def test_a_wait_keeps_its_place_across_a_restart_and_is_granted_after(
    flavour: str, how: str, proc: Proc
) -> None:
    run(flavour, proc.socket, wait_survives, proc, how)


# ---------------------------------------------- what ended while the client was away


def test_a_lease_that_expired_during_the_outage_is_told_on_reconnect(proc: Proc) -> None:
    pool = make_pool(proc)
    with Client(proc.socket) as client:
        lease = client.reserve(pool, cpu=1, ttl=1.0)
        seen: list[Any] = []
        lease.on_event = seen.append
        proc.kill9()
        time.sleep(1.3)  # the TTL runs out while resd is down
        proc.start()
        events = client.events(5.0)
        names = [type(next(events)).__name__ for _ in range(3)]
        assert names == ["Disconnected", "ExpiredEvent", "Reconnected"]
        assert lease.ended == "expired" and lease.info.state == "expired"
        wait_for(lambda: bool(seen), 5, "the lease's callback")
        assert client.list(pool=pool) == [], "and the client goes on working"


@pytest.mark.parametrize("reclaimable", [False, True])
def test_a_preemption_begun_during_the_outage_is_told_with_its_deadline(
    reclaimable: bool, proc: Proc
) -> None:
    with admin(proc) as c:
        c.call(
            "pool.create",
            PoolCreate(
                name="p",
                resources={"cpu": ResourceSpec(capacity=4000)},
                max_per_tenant=0,
                preemption="lower_priority",
                grace=10.0,
            ),
        )
        c.call("tenant.add", TenantAdd(name="low", priority=2))
        c.call("tenant.add", TenantAdd(name="high", priority=8))
    with Client(proc.socket) as client:
        lease = client.reserve("p", cpu=4, tenant="low", reclaimable=reclaimable)
        with client._lock:  # the client cannot resume until resd preempted it
            restart(proc, "sigterm")
            with admin(proc) as c:
                c.call("preempt", Preempt(target="low", tenant="high"))
        events = client.events(5.0)
        names = [type(next(events)).__name__ for _ in range(3)]
        notice = "ReclaimEvent" if reclaimable else "PreemptedEvent"
        assert names == ["Disconnected", notice, "Reconnected"]
        assert lease.info.state == "terminating" and lease.ended is None
        assert lease.preempt_deadline is not None and lease.preempt_deadline > time.time() + 5
        assert lease.reclaim_requested is reclaimable
        lease.release()  # given back within the grace
        assert lease.ended == "released" and listed(proc, "p") == []


def test_a_lease_not_reattached_in_time_is_released_and_history_says_why(
    daemons: Daemons,
) -> None:
    proc = daemons.make(config="reattach_grace = 1.0\n")
    proc.start()
    pool = make_pool(proc)
    script = (
        "import sys, time\n"
        "from resd_client import Client\n"
        f"c = Client({proc.socket!r})\n"
        f"lease = c.reserve({pool!r}, cpu=1)\n"
        "print(lease.id, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        rid = child.stdout.readline().strip()
        child.send_signal(signal.SIGSTOP)  # the holder cannot re-attach in time
        restart(proc, "sigterm")
        wait_for(lambda: listed(proc, pool) == [], 10, "the orphan to be released")
        with admin(proc) as c:
            (last,) = [h for h in c.call("export", Export()).events if h.reservation == rid][-1:]
        assert last.kind == "released" and "re-attached" in last.detail
    finally:
        child.kill()
        child.wait(10)
        if child.stdout:
            child.stdout.close()
        assert proc.stop() == 0


# ------------------------------------------------------------- (e): reconnect=0


async def old_behaviour(api: Api, proc: Proc) -> None:
    pool = make_pool(proc)
    lease = await api.reserve(pool, cpu=1)
    assert proc.stop() == 0
    with pytest.raises(UnavailableError):
        await api.status()
    assert lease.ended is None  # active leases are not touched; the session is closed
    assert await api.next_event() is None, "events() ends"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_reconnect_zero_keeps_the_old_behaviour(
    flavour: str, proc: Proc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESD_RECONNECT", "0")  # how the suite's clients are made
    run(flavour, proc.socket, old_behaviour, proc)


# ------------------------------------------------------------------ resctl run


def run_argv(proc: Proc, *args: str) -> list[str]:
    return [sys.executable, "-m", "resctl", "run", "--socket", proc.socket, *args]


def start_run(
    procs: list[subprocess.Popen[str]], proc: Proc, *args: str, **env: str
) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        run_argv(proc, *args),
        env={**subprocess_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(p)
    return p


def run_on_one_cpu(
    procs: list[subprocess.Popen[str]], proc: Proc, ready: Path, script: str, **env: str
) -> tuple[str, subprocess.Popen[str]]:
    """``resctl run --cpu 1 -- sh -c 'touch READY; SCRIPT'`` in a fresh pool; returns
    the pool and the process once CMD runs."""
    pool = make_pool(proc)
    p = start_run(
        procs,
        proc,
        "--pool",
        pool,
        "--cpu",
        "1",
        "--",
        "sh",
        "-c",
        f"touch {ready}; {script}",
        **env,
    )
    wait_for(ready.exists, 15, "CMD to start")
    return pool, p


@pytest.mark.parametrize("how", RESTARTS)
def test_resctl_run_keeps_cmd_running_across_a_restart(
    how: str, proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    pool, p = run_on_one_cpu(started, proc, tmp_path / "ready", "sleep 4; exit 3")
    (before,) = listed(proc, pool)
    restart(proc, how)
    wait_for(lambda: "reattached" in proc.log_text(), 10, "resctl to re-attach its lease")
    assert [r.id for r in listed(proc, pool)] == [before.id], "held again after the restart"
    _, stderr = p.communicate(timeout=20)
    assert p.returncode == 3, stderr
    assert "lost the connection to resd" in stderr and "CMD keeps running" in stderr
    assert f"reconnected to resd; reservation {before.id} re-attached" in stderr
    assert stderr.count("lost the connection") == 1
    assert listed(proc, pool) == [], "released when CMD finished"


def test_resctl_run_ends_cmd_when_its_lease_is_released_by_someone_else(
    proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    pool, p = run_on_one_cpu(started, proc, tmp_path / "ready", "exec sleep 30")
    (lease,) = listed(proc, pool)
    resctl(proc, "release", "--id", lease.id)
    _, stderr = p.communicate(timeout=20)
    assert p.returncode == 12, stderr
    assert f"reservation {lease.id} was released" in stderr and "SIGTERM" in stderr


def test_resctl_run_ends_cmd_when_reconnecting_gives_up(
    proc: Proc, started: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    _, p = run_on_one_cpu(started, proc, tmp_path / "ready", "exec sleep 30", RESD_RECONNECT="1")
    assert proc.stop() == 0
    t0 = time.monotonic()
    _, stderr = p.communicate(timeout=20)
    assert p.returncode == 12, stderr
    assert "CMD keeps running while resctl reconnects" in stderr
    assert "gave up reconnecting after 1s" in stderr
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------ resctl watch


def test_resctl_watch_keeps_following_across_a_restart(proc: Proc) -> None:
    make_pool(proc)
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resctl",
            "watch",
            "--json",
            "--interval",
            "0",
            "--socket",
            proc.socket,
        ],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        assert [p["name"] for p in first["pools"]] == ["p"]
        restart(proc, "kill9")
        # after the reconnection watch draws the new daemon's status
        after = json.loads(watch.stdout.readline())
        assert [p["name"] for p in after["pools"]] == ["p"]
        make_pool(proc, "q")  # a change after the restart is pushed to the new subscription
        while True:
            frame = json.loads(watch.stdout.readline())
            if len(frame["pools"]) == 2:
                break
        assert watch.poll() is None
    finally:
        watch.send_signal(signal.SIGINT)
        _, stderr = watch.communicate(timeout=10)
    assert "lost the connection to resd" in stderr and "reconnected to resd" in stderr


def test_events_carry_the_notices_between_the_pushes(proc: Proc) -> None:
    make_pool(proc)
    with Client(proc.socket) as client:
        client.subscribe()
        restart(proc, "sigterm")
        kinds = []
        for event in client.events(5.0):
            kinds.append(type(event))
            if isinstance(event, Reconnected):
                make_pool(proc, "q")  # pushed to the subscription the client renewed
            if isinstance(event, StateEvent) and len(event.pools) == 2:
                break
        assert kinds[:2] == [Disconnected, Reconnected] and kinds[-1] is StateEvent
