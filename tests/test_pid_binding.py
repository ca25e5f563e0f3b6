"""Leases that follow processes (SPEC §3 ``pid`` binding): real processes, real
SIGKILL, pidfd where the kernel has it and psutil polling where it does not."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import trio

from resd.messages import ProcessExited, Watch
from resd.procwatch import ProcessWatcher, has_pidfd, process_start
from tests.conftest import InProcess
from tests.wire import WireClient


async def pool(c: WireClient) -> None:
    await c.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": 8000}}, "max_per_tenant": 0},
    )


def ask(**extra: Any) -> dict[str, Any]:
    return {"pool": "p", "resources": {"cpu": 1000}, "binding": "pid", **extra}


async def gone(c: WireClient, rid: str, limit: float = 5.0) -> float:
    """Seconds until ``rid`` is no longer active (polled every 2 ms)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if rid not in {r["id"] for r in (await c.ok("list"))["reservations"]}:
            return time.monotonic() - start
        await trio.sleep(0.002)
    raise AssertionError(f"{rid} outlived its process by {limit}s")


async def test_sigkill_of_the_bound_process_releases_the_lease(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    child = await trio.lowlevel.open_process(["sleep", "60"])
    try:
        r = await c.ok("reserve", ask(pid=child.pid))
        assert r["pid"] == child.pid and r["binding"] == "pid"
        await trio.sleep(0.05)
        assert r["id"] in {x["id"] for x in (await c.ok("list"))["reservations"]}
        child.send_signal(signal.SIGKILL)
        elapsed = await gone(c, r["id"])
        history = (await c.ok("export"))["events"]
        assert history[-1]["kind"] == "released"
        assert f"process {child.pid} exited" in history[-1]["detail"]
        print(f"released {elapsed * 1000:.1f} ms after SIGKILL")
    finally:
        child.kill()
        await child.wait()


async def test_the_default_process_is_the_caller(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    r = await c.ok("reserve", ask())
    assert r["pid"] == os.getpid()


async def test_a_missing_process_is_refused(inproc: InProcess) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    child = await trio.lowlevel.open_process(["true"])
    await child.wait()
    reply = await c.request("reserve", ask(pid=child.pid))
    assert reply["error"]["code"] == "not_found" and str(child.pid) in reply["error"]["message"]
    reply = await c.request("reserve", {**ask(pid=os.getpid()), "binding": "session"})
    assert reply["error"]["code"] == "invalid"
    assert (await c.ok("list"))["reservations"] == []


async def test_a_process_gone_while_the_daemon_was_down_is_released_on_start(
    inproc: InProcess,
) -> None:
    c = await WireClient.connect(inproc.socket)
    await pool(c)
    child = await trio.lowlevel.open_process(["sleep", "60"])
    r = await c.ok("reserve", ask(pid=child.pid))
    keeper = await c.ok("reserve", ask())
    await inproc.restart()
    child.kill()
    await child.wait()
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    await gone(c, r["id"])
    assert keeper["id"] in {x["id"] for x in (await c.ok("list"))["reservations"]}


class Recorder:
    def __init__(self) -> None:
        self.told: list[Any] = []
        self.event = trio.Event()

    def tell(self, message: Any) -> None:
        self.told.append(message)
        self.event.set()


@pytest.mark.parametrize(
    "use_pidfd",
    [
        pytest.param(True, marks=pytest.mark.skipif(not has_pidfd(), reason="no pidfd here")),
        False,
    ],
    ids=["pidfd", "poll"],
)
async def test_watcher_reports_exit_and_ignores_a_reused_pid(use_pidfd: bool) -> None:
    watcher = ProcessWatcher(poll_interval=0.01, use_pidfd=use_pidfd)
    recorder = Recorder()
    watcher.pool_actor = recorder
    child = await trio.lowlevel.open_process(["sleep", "60"])
    start = process_start(child.pid)
    assert start is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        # a start time that does not match is another process: reported gone at once
        watcher.tell(Watch("r-aaaaaaaaaaaa", child.pid, start + 1.0))
        watcher.tell(Watch("r-bbbbbbbbbbbb", child.pid, start))
        with trio.fail_after(5):
            await recorder.event.wait()
        assert recorder.told == [ProcessExited("r-aaaaaaaaaaaa", child.pid, start + 1.0)]
        recorder.event = trio.Event()
        await trio.sleep(0.05)
        assert len(recorder.told) == 1, "the live process is still watched"
        child.kill()
        with trio.fail_after(5):
            await recorder.event.wait()
        assert recorder.told[-1] == ProcessExited("r-bbbbbbbbbbbb", child.pid, start)
        assert len(watcher) == 0
        nursery.cancel_scope.cancel()
    await child.wait()
