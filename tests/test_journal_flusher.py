"""The journal's flusher thread (issue 14): one long-lived thread does every fsync, the
event loop hands it work without a worker-thread dispatch, its report wakes the waiters
and sends the pushes that waited for it, and no thread outlives ``run``
(docs/architecture.md, "Durability")."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from resd import journal as journal_mod
from resd.announcer import Announcer
from resd.journal import Journal
from resd.messages import Outbox
from tests.conftest import InProcess
from tests.test_journal import GatedFsync, running
from tests.wire import WireClient

pytestmark = pytest.mark.timeout(20)

FLUSHER = "resd-journal-flusher"


def flushers() -> int:
    return sum(t.name == FLUSHER for t in threading.enumerate())


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[str, Any]]:
    """Wrap the journal's ``name`` (``_fsync``, ``_decode_entry``): each call is recorded
    as (the calling thread's name, its argument)."""
    calls: list[tuple[str, Any]] = []
    real = getattr(journal_mod, name)

    def wrapper(arg: Any) -> Any:
        calls.append((threading.current_thread().name, arg))
        return real(arg)

    monkeypatch.setattr(journal_mod, name, wrapper)
    return calls


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[GatedFsync]:
    """Every fsync waits (in the flusher thread) while ``gate.gate`` is clear; open at first."""
    gated = GatedFsync(monkeypatch)
    gated.gate.set()
    yield gated
    gated.gate.set()


def outbox() -> tuple[Outbox, list[bytes]]:
    """An outbox whose socket takes every frame whole, and the frames it took."""
    written: list[bytes] = []

    def write(data: bytes | memoryview) -> int:
        written.append(bytes(data))
        return len(data)

    return Outbox(write, 100), written


def received(written: list[bytes]) -> list[bytes]:
    """The frames written since the last look."""
    frames = list(written)
    written.clear()
    return frames


async def test_every_fsync_is_done_by_one_thread_without_worker_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_worker_threads(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no worker thread per fsync")

    calls = spy(monkeypatch, "_fsync")
    assert flushers() == 0
    async with running(tmp_path) as (journal, _):
        assert flushers() == 1
        monkeypatch.setattr(trio.to_thread, "run_sync", no_worker_threads)

        async def client(i: int) -> None:
            for j in range(10):
                await journal.wait_durable(journal.append("d", [i, j]))
                if j == 5:
                    journal.rotate()

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(client, i)
        monkeypatch.undo()
        assert journal.is_durable(journal.last_lsn)
    assert {thread for thread, _ in calls} == {FLUSHER}
    assert flushers() == 0, "run() joins its thread"


async def test_an_fsync_is_started_for_what_someone_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, "_fsync")
    async with running(tmp_path, batch_interval=60) as (journal, _):
        await journal.wait_durable(journal.append("d", ["the segment and its directory"]))
        calls.clear()
        unwaited = journal.append("d", ["a closed connection's leases end"])
        await trio.sleep(0.05)
        assert calls == [] and not journal.is_durable(unwaited)
        await journal.wait_durable(journal.append("d", ["the next reserve"]))
        assert len(calls) == 1, "one fsync made both durable"
        assert journal.is_durable(unwaited)


async def test_what_nobody_waits_for_is_fsynced_within_the_batch_interval(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, batch_interval=0.05) as (journal, _):
        lsn = journal.append("d", [1])
        assert not journal.is_durable(lsn)
        with trio.fail_after(2):
            while not journal.is_durable(lsn):  # noqa: ASYNC110 - the flusher thread's report
                await trio.sleep(0.01)


async def test_cancelling_run_waits_for_the_sync_under_way(
    tmp_path: Path, gate: GatedFsync
) -> None:
    journal = Journal(tmp_path, "always")
    journal.recover()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        lsn = journal.append("d", [1])
        gate.gate.clear()
        waiter_done = trio.Event()

        async def waiter() -> None:
            await journal.wait_durable(lsn)
            waiter_done.set()

        nursery.start_soon(waiter)
        while gate.calls == 0:  # noqa: ASYNC110 - set by the flusher thread, inside the fsync
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await trio.sleep(0.1)
            assert flushers() == 1, "run() is still waiting for its thread"
            gate.gate.set()
    assert flushers() == 0
    assert journal.is_durable(lsn), "the sync under way was finished and reported"
    await journal.close()


async def test_pushes_wait_for_their_fsync_and_keep_their_order(
    tmp_path: Path, gate: GatedFsync
) -> None:
    async with running(tmp_path) as (journal, _):
        announcer = Announcer(journal)
        box, frames = outbox()
        await journal.wait_durable(journal.append("d", [0]))
        announcer.push(box, b"at once", journal.last_lsn)  # durable already: sent now
        assert received(frames) == [b"at once"]
        gate.gate.clear()
        lsn = journal.append("d", [1])
        announcer.push(box, b"first", lsn)
        announcer.push(box, b"second", 0)  # needs nothing, but never overtakes
        await trio.sleep(0.1)
        assert received(frames) == []
        gate.gate.set()
        with trio.fail_after(5):
            await journal.wait_durable(lsn)
        assert received(frames) == [b"first", b"second"], "sent by the durability report"


async def test_pushes_wait_out_a_failed_fsync_until_the_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path) as (journal, _):
        announcer = Announcer(journal)
        box, frames = outbox()
        real = journal_mod._fsync

        def broken(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(journal_mod, "_fsync", broken)
        lsn = journal.append("d", [1])
        announcer.push(box, b"granted", lsn)
        with trio.fail_after(5):
            while not journal.unsynced:  # noqa: ASYNC110 - the flusher thread's report
                await trio.sleep(0.01)
        assert received(frames) == []
        monkeypatch.setattr(journal_mod, "_fsync", real)
        await journal.write_snapshot({"d": (lsn, "state")}, lsn, resync=True)
        assert received(frames) == [b"granted"]
        await journal.wait_durable(journal.append("d", [2]))  # the thread syncs again


async def test_the_replay_self_check_runs_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = spy(monkeypatch, "_decode_entry")
    async with running(tmp_path, "never") as (journal, _):
        journal.append("d", [1])
        assert len(decoded) == 1  # tests/conftest.py turns it on
        monkeypatch.setattr(journal_mod, "CHECK_REPLAY", False)
        journal.append("d", [2])
        assert len(decoded) == 1, "production appends do not decode again"


async def test_no_flusher_thread_outlives_the_daemon(inproc: InProcess) -> None:
    for n in range(3):
        await inproc.restart(fsync="always")
        assert flushers() == 1
        c = await WireClient.connect(inproc.socket)
        await c.ok("pool.create", {"name": f"p{n}", "resources": {"cpu": {"capacity": 8000}}})
    inproc.daemon.request_stop()
    await inproc.daemon.stopped.wait()
    assert flushers() == 0


async def test_a_granted_push_waits_for_the_fsync_of_its_grant(
    inproc: InProcess, gate: GatedFsync
) -> None:
    await inproc.restart(fsync="always")
    holder = await WireClient.connect(inproc.socket)
    await holder.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": 1000}}, "max_per_tenant": 0},
    )
    ask = {"pool": "p", "resources": {"cpu": 1000}, "binding": "session"}
    lease = await holder.ok("reserve", ask)
    waiter = await WireClient.connect(inproc.socket)
    queued = await waiter.ok("reserve", {**ask, "wait": True})
    assert queued["state"] == "pending"
    gate.gate.clear()
    released = trio.Event()

    async def release() -> None:
        await holder.ok("release", {"id": lease["id"]})  # a session lease's, too
        released.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release)
        with trio.move_on_after(0.3) as held_back:
            await waiter.push()
        assert held_back.cancelled_caught, "no grant before its record is durable"
        assert not released.is_set(), "no release answered before its record is durable"
        gate.gate.set()
        with trio.fail_after(5):
            granted = await waiter.push()
    assert granted["event"] == "granted" and granted["reservation"]["id"] == queued["id"]
    assert released.is_set()
