"""GPU truth in the daemon (SPEC §10), on scripted GPUs and trio's MockClock.

A daemon runs in this trio run with a ``ScriptedBackend`` whose per-process usage
follows the test's timeline and, where a test needs no real process, a fake process
table. Over-use, foreign use in VRAM admission, idle marks, adoption, ``register``
and ``top`` are driven through the real socket protocol.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from resd.daemon import Daemon
from resd.inventory import GpuDevice
from resd.nvml import ScriptedBackend, Usage
from resd.procwatch import process_table
from resd.reconcile import ProcInfo
from tests.conftest import BASE_WALL, make_config
from tests.wire import WireClient

GiB = 1 << 30
INTERVAL = 2.0
ME = os.getpid()


def gpus(n: int = 1, memory: int = 80 * GiB) -> list[GpuDevice]:
    return [GpuDevice(i, f"GPU-{i}", "H100", memory) for i in range(n)]


async def inline(fn: Callable[[], Any]) -> Any:
    return fn()


@attrs.define
class Host:
    """The scripted host: GPUs, the usage script, and a process table."""

    devices: list[GpuDevice]
    script: list[Usage] = attrs.Factory(list)
    #: None: the real process table
    procs: dict[int, ProcInfo] | None = attrs.Factory(dict)

    def table(self) -> dict[int, ProcInfo]:
        return process_table() if self.procs is None else dict(self.procs)

    def backend(self) -> ScriptedBackend:
        return ScriptedBackend(self.devices, (), clock=trio.current_time)

    def use(self, at: float, device: int, **kw: Any) -> None:
        self.script.append(Usage(at, device, **kw))


@attrs.define
class Rig:
    daemon: Daemon
    socket: str
    host: Host
    backend: ScriptedBackend

    def play(self) -> None:
        """Hand the backend the script written so far."""
        self.backend.script = tuple(sorted(self.host.script, key=lambda u: u.at))

    async def client(self) -> WireClient:
        return await WireClient.connect(self.socket)


@pytest.fixture
async def rig(short_tmp: Path) -> AsyncIterator[Callable[..., Any]]:
    async with trio.open_nursery() as nursery:
        started: list[Daemon] = []

        async def start(host: Host, **cfg: Any) -> Rig:
            config = make_config(short_tmp, gpu_sample_interval=INTERVAL, **cfg)
            backend = host.backend()
            daemon = Daemon(
                config,
                wall=lambda: BASE_WALL + trio.current_time(),
                handle_signals=False,
                gpu_backend=backend,
                process_table=host.table,
                offload=inline,
            )
            await nursery.start(daemon.run)
            started.append(daemon)
            return Rig(daemon, config.socket, host, backend)

        yield start
        await WireClient.close_all()
        for daemon in started:
            daemon.request_stop()


def gpu_pool(name: str, devices: list[GpuDevice], **policy: Any) -> dict[str, Any]:
    members = [
        {"name": str(d.index), "capacity": d.memory_total, "labels": {"uuid": d.uuid}}
        for d in devices
    ]
    return {
        "name": name,
        "resources": {"gpu": {"kind": "set", "members": members}},
        "max_per_tenant": 0,
        **policy,
    }


def proc(pid: int, ppid: int = 1, cpu: float = 0.0, rss: int = 0, uid: int = 0) -> ProcInfo:
    return ProcInfo(pid, ppid, 1000.0 + pid, uid or os.getuid(), cpu, rss)


async def until(predicate: Callable[[], Any], within: float, what: str) -> None:
    """Wait on trio's (mock) clock for ``predicate``; fail after ``within`` seconds."""
    deadline = trio.current_time() + within
    while not await _call(predicate):
        assert trio.current_time() < deadline, f"not within {within}s: {what}"
        await trio.sleep(0.1)


async def _call(predicate: Callable[[], Any]) -> Any:
    value = predicate()
    if hasattr(value, "__await__"):
        value = await value
    return value


async def lease(c: WireClient, rid: str) -> dict[str, Any]:
    found = [r for r in (await c.ok("list", {}))["reservations"] if r["id"] == rid]
    return found[0] if found else {}


# ----------------------------------------------------------------- over-use


async def test_overuse_is_flagged_within_two_intervals_and_pushed(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(gpus(1), procs={ME: proc(ME), 5001: proc(5001, ppid=ME)})
    r = await rig(host)
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices))
    info = await c.ok(
        "reserve", {"pool": "gpu", "resources": {"vram": 20 * GiB}, "binding": "session"}
    )
    assert info["enforcement"] == "framework"
    at = trio.current_time()
    host.use(at, 0, processes={5001: 30 * GiB}, utilization=90)
    r.play()
    await trio.sleep(2 * INTERVAL)
    marked = await lease(c, info["id"])
    assert "overuse" in marked["marks"], marked
    assert "30.0 GiB on gpu 0 where it reserved 20.0 GiB" in marked["marks"]["overuse"]
    event = await c.push()
    assert event["event"] == "marked" and event["mark"] == "overuse", event
    history = (await c.ok("export", {}))["events"]
    assert [h["kind"] for h in history if h["reservation"] == info["id"]][-1] == "overuse"
    status = await c.ok("status", {})
    pool = status["pools"][0]
    assert pool["marks"] == {"overuse": 1}
    assert pool["devices"][0]["overuse"] == 10 * GiB
    # Back under its slice: the mark comes off, once.
    host.use(trio.current_time(), 0, processes={5001: 10 * GiB}, utilization=90)
    r.play()
    await trio.sleep(2 * INTERVAL)
    assert (await lease(c, info["id"]))["marks"] == {}
    kinds = [
        h["kind"] for h in (await c.ok("export", {}))["events"] if h["reservation"] == info["id"]
    ]
    assert kinds == ["reserved", "overuse", "overuse_cleared"]


async def test_use_of_an_unassigned_gpu_is_overuse(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(gpus(2), procs={ME: proc(ME), 5001: proc(5001, ppid=ME)})
    r = await rig(host)
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices))
    info = await c.ok(
        "reserve",
        {"pool": "gpu", "resources": {"gpu": 1}, "members": {"gpu": ["0"]}, "binding": "session"},
    )
    host.use(0, 1, processes={5001: 1 * GiB})
    r.play()
    await trio.sleep(2 * INTERVAL)
    marks = (await lease(c, info["id"]))["marks"]
    assert "uses gpu 1 (1.0 GiB), which is not assigned to it" in marks["overuse"]


def _sleeper(ignore_term: bool = False) -> subprocess.Popen[bytes]:
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('up', flush=True)\ntime.sleep(600)\n"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"up\n"
    return child


def _reap(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait()
    if child.stdout is not None:
        child.stdout.close()


async def _dies(child: subprocess.Popen[bytes], within: float = 10.0) -> int:
    """Wait in real time (the mock clock runs on meanwhile) for ``child`` to end."""
    limit = time.monotonic() + within
    while child.poll() is None:
        assert time.monotonic() < limit, f"process {child.pid} still runs"
        await trio.sleep(0.05)
    return child.returncode


@pytest.mark.parametrize("ignore_term", [False, True], ids=["sigterm", "sigkill"])
async def test_overuse_terminate_signals_the_lease_processes(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock, ignore_term: bool
) -> None:
    host = Host(gpus(1), procs=None)  # the real process table: real signals
    r = await rig(host)
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices, overuse="terminate", grace=5.0))
    info = await c.ok("reserve", {"pool": "gpu", "resources": {"vram": 20 * GiB}})
    child = _sleeper(ignore_term)
    try:
        registered = await c.ok("register", {"id": info["id"], "pid": child.pid})
        assert registered["processes"] == [child.pid]
        host.use(trio.current_time(), 0, processes={child.pid: 30 * GiB})
        r.play()
        await trio.sleep(2 * INTERVAL)
        state = await lease(c, info["id"])
        if not ignore_term:
            assert await _dies(child) == -signal.SIGTERM
        else:
            assert state["state"] == "terminating", state
            assert child.poll() is None  # it ignored SIGTERM; SIGKILL comes at the grace's end
            await trio.sleep(5.0)
            assert await _dies(child) == -signal.SIGKILL
        await until(lambda: _gone(c, info["id"]), 10.0, "the lease ended")
        last = [h for h in (await c.ok("export", {}))["events"] if h["reservation"] == info["id"]][
            -1
        ]
        assert last["kind"] == "preempted"
    finally:
        _reap(child)


async def _gone(c: WireClient, rid: str) -> bool:
    return not await lease(c, rid)


# -------------------------------------------------------------- foreign use


async def test_foreign_use_makes_a_vram_request_wait_until_it_goes(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(gpus(1))
    host.use(0, 0, processes={9999: 60 * GiB})  # a process of no lease: foreign
    r = await rig(host)
    r.play()
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices))
    await trio.sleep(INTERVAL + 0.1)
    refused = await c.request("reserve", {"pool": "gpu", "resources": {"vram": 40 * GiB}})
    assert not refused["ok"] and refused["error"]["code"] == "insufficient", refused
    shown = (await c.ok("resources", {"pool": "gpu"}))["gpus"][0]
    assert shown["foreign_bytes"] == 60 * GiB and shown["memory_used"] == 60 * GiB
    device = (await c.ok("status", {}))["pools"][0]["devices"][0]
    assert device["foreign"] == 60 * GiB and device["foreign_pids"] == [9999]
    pending = await c.ok("reserve", {"pool": "gpu", "resources": {"vram": 40 * GiB}, "wait": True})
    assert pending["state"] == "pending"
    host.use(trio.current_time(), 0, processes={})  # the foreign job ends
    r.play()
    granted = await c.push()
    while granted["event"] != "granted":
        granted = await c.push()
    assert granted["reservation"]["id"] == pending["id"]


async def test_foreign_use_sends_a_vram_request_to_another_gpu(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(gpus(2))
    host.use(0, 0, processes={9999: 60 * GiB})
    r = await rig(host, gpu_memory_margin="1G")
    r.play()
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices, placement="binpack"))
    await trio.sleep(INTERVAL + 0.1)
    # binpack would pick the fuller GPU 0 by the ledger (both empty: the first);
    # live, GPU 0 has 80 - 60 - 1 (margin) = 19 GiB free.
    info = await c.ok("reserve", {"pool": "gpu", "resources": {"vram": 40 * GiB}})
    assert info["members"] == {"gpu": ["1"]}
    small = await c.ok("reserve", {"pool": "gpu", "resources": {"vram": 19 * GiB}})
    assert small["members"] == {"gpu": ["0"]}
    refused = await c.request("reserve", {"pool": "gpu", "resources": {"vram": 41 * GiB}})
    assert refused["error"]["code"] == "insufficient", refused


async def test_adopt_foreign_records_unmanaged_use_until_the_process_exits(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    child = _sleeper()
    try:
        host = Host(gpus(1), procs=None)
        host.use(0, 0, processes={child.pid: 10 * GiB})
        r = await rig(host)
        r.play()
        c = await r.client()
        await c.ok("pool.create", gpu_pool("gpu", host.devices, adopt_foreign=True))
        await trio.sleep(2 * INTERVAL + 0.1)
        found = (await c.ok("list", {}))["reservations"]
        assert len(found) == 1, found
        adopted = found[0]
        assert adopted["tenant"] == "unmanaged" and adopted["binding"] == "pid"
        assert adopted["pid"] == child.pid and adopted["resources"] == {"vram": 10 * GiB}
        assert adopted["enforcement"] == "watch"
        # Attributed now: not foreign any more, and adopted once only.
        await trio.sleep(2 * INTERVAL)
        assert len((await c.ok("list", {}))["reservations"]) == 1
        assert (await c.ok("status", {}))["pools"][0]["devices"][0]["foreign"] == 0
        _reap(child)
        host.use(trio.current_time(), 0, processes={})
        r.play()
        await until(lambda: _gone(c, adopted["id"]), 10.0, "the adopted lease ended")
    finally:
        _reap(child)


# --------------------------------------------------------------------- idle


async def test_idle_lease_is_marked_after_idle_after_and_listed(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(gpus(1), procs={ME: proc(ME), 5001: proc(5001, ppid=ME)})
    r = await rig(host)
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices, idle_after=60.0))
    busy = await c.ok(
        "reserve", {"pool": "gpu", "resources": {"vram": 10 * GiB}, "binding": "session"}
    )
    idle = await c.ok(
        "reserve", {"pool": "gpu", "resources": {"vram": 10 * GiB}}
    )  # detached: no process
    host.use(0, 0, processes={5001: 5 * GiB}, utilization=0)
    r.play()
    await trio.sleep(30)
    assert (await c.ok("list", {"idle": True}))["reservations"] == []
    await trio.sleep(40)
    both = (await c.ok("list", {"idle": True}))["reservations"]
    # Both idle: the device shows 0 % and the worker uses no CPU.
    assert {x["id"] for x in both} == {busy["id"], idle["id"]}
    # The worker starts computing: the session lease is busy again.
    host.procs[5001] = proc(5001, ppid=ME, cpu=50.0)  # type: ignore[index]
    host.use(trio.current_time(), 0, processes={5001: 5 * GiB}, utilization=80)
    r.play()
    await trio.sleep(2 * INTERVAL)
    assert (await c.ok("list", {"idle": True}))["reservations"] == []
    kinds = [
        h["kind"] for h in (await c.ok("export", {}))["events"] if h["reservation"] == busy["id"]
    ]
    assert kinds == ["reserved", "idle", "idle_cleared"]


async def test_idle_reclaimable_lease_gets_a_reclaim_notice(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(gpus(1))
    r = await rig(host)
    r.play()
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices, idle_after=60.0, grace=10.0))
    info = await c.ok(
        "reserve",
        {"pool": "gpu", "resources": {"gpu": 1}, "reclaimable": True, "binding": "session"},
    )
    await trio.sleep(62 + INTERVAL)
    kinds = []
    while "reclaim" not in kinds:
        kinds.append((await c.push())["event"])
    assert (await lease(c, info["id"]))["state"] == "terminating"
    await c.ok("release", {"id": info["id"]})
    last = [h for h in (await c.ok("export", {}))["events"] if h["reservation"] == info["id"]][-1]
    assert last["kind"] == "released"


# ---------------------------------------------------------------------- top


async def test_top_shows_per_lease_usage_and_is_pushed(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(
        gpus(1),
        procs={ME: proc(ME, cpu=1.0, rss=100 << 20), 5001: proc(5001, ppid=ME, rss=2 * GiB)},
    )
    host.use(0, 0, processes={5001: 12 * GiB, 9999: 3 * GiB}, utilization=55)
    r = await rig(host)
    r.play()
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices))
    info = await c.ok(
        "reserve", {"pool": "gpu", "resources": {"vram": 20 * GiB}, "binding": "session"}
    )
    watcher = await r.client()
    await watcher.ok("subscribe", {"topics": ["top"]})
    host.procs[ME] = proc(ME, cpu=2.0, rss=100 << 20)  # type: ignore[index]
    pushed = await watcher.push()
    assert pushed["event"] == "top"
    await trio.sleep(INTERVAL)
    snap = await c.ok("top", {})
    assert snap["interval"] == INTERVAL and snap["gpu_sampling"] == ""
    (row,) = snap["rows"]
    assert row["id"] == info["id"] and row["pids"] == sorted([ME, 5001])
    assert row["gpu_memory"] == {"0": 12 * GiB} and row["gpu_utilization"] == {"0": 55}
    assert row["rss"] == 100 * (1 << 20) + 2 * GiB
    assert snap["devices"]["gpu"][0]["foreign"] == 3 * GiB


async def test_top_says_why_gpus_are_not_sampled(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    host = Host(gpus(1))
    r = await rig(host)
    r.backend.failing = "the NVIDIA kernel driver is not loaded"
    c = await r.client()
    await trio.sleep(INTERVAL + 0.1)
    assert (await c.ok("top", {}))["gpu_sampling"] == "the NVIDIA kernel driver is not loaded"
    r.backend.failing = ""
    await trio.sleep(INTERVAL)
    assert (await c.ok("top", {}))["gpu_sampling"] == ""


# ----------------------------------------------------------------- register


async def test_register_is_checked_and_survives_a_restart(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock, short_tmp: Path
) -> None:
    host = Host(gpus(1), procs={})
    r = await rig(host)
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices))
    info = await c.ok("reserve", {"pool": "gpu", "resources": {"vram": GiB}})
    gone = await c.request("register", {"id": info["id"], "pid": 4_000_000})
    assert gone["error"]["code"] == "not_found", gone
    unknown = await c.request("register", {"id": "r-000000000000", "pid": ME})
    assert unknown["error"]["code"] == "not_found", unknown
    bad = await c.request("register", {"id": info["id"], "pid": 0})
    assert bad["error"]["code"] == "invalid", bad
    done = await c.ok("register", {"id": info["id"], "pid": ME})
    assert done["processes"] == [ME]
    again = await c.ok("register", {"id": info["id"], "pid": ME})
    assert again["processes"] == [ME]
    await WireClient.close_all()
    r.daemon.request_stop()
    await r.daemon.stopped.wait()
    r2 = await rig(host)
    c2 = await r2.client()
    assert (await lease(c2, info["id"]))["processes"] == [ME]


# ---------------------------------------------------------------------- MIG


async def test_mig_instances_are_taken_whole_and_judged_by_their_size(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    """A MIG-mode GPU's instances are members: a VRAM request takes the smallest that
    fits, whole (``enforcement: mig``), and its processes may use all of it."""
    instances = [
        GpuDevice(0, "MIG-a", "H100 MIG 1g.10gb", 10 * GiB),
        GpuDevice(1, "MIG-b", "H100 MIG 2g.20gb", 20 * GiB),
    ]
    host = Host(instances, procs={ME: proc(ME), 5001: proc(5001, ppid=ME)})
    r = await rig(host)
    c = await r.client()
    members = [
        {
            "name": f"0-mig{i}",
            "capacity": d.memory_total,
            "labels": {"uuid": d.uuid, "mig": "instance", "parent": "0"},
        }
        for i, d in enumerate(instances)
    ]
    await c.ok(
        "pool.create",
        {
            "name": "mig",
            "resources": {"gpu": {"kind": "set", "members": members}},
            "max_per_tenant": 0,
        },
    )
    info = await c.ok(
        "reserve", {"pool": "mig", "resources": {"vram": 8 * GiB}, "binding": "session"}
    )
    assert info["members"] == {"gpu": ["0-mig0"]} and info["enforcement"] == "mig"
    assert info["devices"][0]["uuid"] == "MIG-a"
    host.use(0, 0, processes={5001: 9 * GiB})  # beyond the 8 GiB asked, within the instance
    r.play()
    await trio.sleep(2 * INTERVAL)
    assert (await lease(c, info["id"]))["marks"] == {}
    second = await c.ok("reserve", {"pool": "mig", "resources": {"vram": 1 * GiB}})
    assert second["members"] == {"gpu": ["0-mig1"]}  # instances are never shared


async def test_a_restart_during_the_grace_still_kills_the_over_user(
    rig: Callable[..., Any], mock_clock: trio.testing.MockClock
) -> None:
    """What to SIGKILL is not journaled: the first sample after the restart finds it."""
    host = Host(gpus(1), procs=None)
    r = await rig(host)
    c = await r.client()
    await c.ok("pool.create", gpu_pool("gpu", host.devices, overuse="terminate", grace=30.0))
    info = await c.ok("reserve", {"pool": "gpu", "resources": {"vram": 20 * GiB}})
    child = _sleeper(ignore_term=True)
    try:
        await c.ok("register", {"id": info["id"], "pid": child.pid})
        host.use(trio.current_time(), 0, processes={child.pid: 30 * GiB})
        r.play()
        await trio.sleep(2 * INTERVAL)
        assert (await lease(c, info["id"]))["state"] == "terminating"
        await WireClient.close_all()
        r.daemon.request_stop()
        await r.daemon.stopped.wait()
        r2 = await rig(host)
        r2.play()
        c2 = await r2.client()
        assert (await lease(c2, info["id"]))["state"] == "terminating"
        await trio.sleep(30.0)
        assert await _dies(child) == -signal.SIGKILL
        await until(lambda: _gone(c2, info["id"]), 10.0, "the lease ended")
    finally:
        _reap(child)
