"""The WAL and snapshots: round trips, group commit, torn tails, corruption, old files."""

from __future__ import annotations

import errno
import shutil
import struct
import threading
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from resd import journal as journal_mod
from resd.journal import (
    FsyncMode,
    Journal,
    JournalCorrupt,
    JournalFailed,
    JournalRefused,
    Recovered,
)

pytestmark = pytest.mark.timeout(10)

UNDECODABLE = struct.pack(">II", 1, zlib.crc32(b"\xc1")) + b"\xc1"  # crc fine, msgpack not
MODES: list[FsyncMode] = ["always", "batch", "never"]
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "journal" / "v1"
HEADER = 12  # magic + version


# -- helpers: the format written out by hand, independently of the module -------------------


def frame(lsn: int, domain: str, records: list[Any]) -> bytes:
    payload: bytes = msgpack.packb({"lsn": lsn, "d": domain, "r": records})
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def segment(*frames: bytes) -> bytes:
    return b"RESDWAL\x00" + struct.pack(">I", 1) + b"".join(frames)


def seg_path(state: Path, first: int) -> Path:
    return state / f"wal-{first:020d}.log"


def entry_offsets(data: bytes) -> list[int]:
    offsets, offset = [], HEADER
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 8 + length
    return offsets


def wal_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if p.name.startswith("wal-"))


@asynccontextmanager
async def running(
    state: Path, mode: FsyncMode = "always", **kwargs: Any
) -> AsyncIterator[tuple[Journal, Recovered]]:
    """recover + run; on exit cancel the flusher and close."""
    journal = Journal(state, mode, **kwargs)
    recovered = journal.recover()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        yield journal, recovered
        nursery.cancel_scope.cancel()
    await journal.close()


async def commit(journal: Journal, domain: str, records: list[Any]) -> int:
    lsn = journal.append(domain, records)
    await journal.wait_durable(lsn)
    return lsn


def recover(state: Path) -> Recovered:
    journal = Journal(state, "never")
    return journal.recover()


class FsyncCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.real = journal_mod._fsync
        monkeypatch.setattr(journal_mod, "_fsync", self)

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.real(fd)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_round_trip_across_restarts(tmp_path: Path, mode: FsyncMode) -> None:
    state = tmp_path / "state"
    async with running(state, mode) as (journal, recovered):
        assert recovered == Recovered({}, [], [], 1)
        assert await commit(journal, "pools", [{"op": "reserve", "id": "r1"}]) == 1
        assert await commit(journal, "tenants", ["t1", 2, None]) == 2
        assert await commit(journal, "pools", [1, 2]) == 3
        assert journal.last_lsn == 3
    assert state.stat().st_mode & 0o777 == 0o700
    assert wal_files(state) == ["wal-00000000000000000001.log"]
    assert seg_path(state, 1).stat().st_mode & 0o777 == 0o600
    first: list[tuple[int, str, list[Any]]] = [
        (1, "pools", [{"op": "reserve", "id": "r1"}]),
        (2, "tenants", ["t1", 2, None]),
        (3, "pools", [1, 2]),
    ]
    async with running(state, mode) as (journal, recovered):
        assert recovered == Recovered({}, first, [], 4, replayed=3)
        assert journal.entries_since_snapshot == 3
        assert await commit(journal, "pools", [b"\x00bytes", -1.5, True]) == 4
    recovered = recover(state)
    assert recovered.entries == [*first, (4, "pools", [b"\x00bytes", -1.5, True])]
    assert recovered.next_lsn == 5
    streamed: list[tuple[int, str, list[Any]]] = []
    snapshots: list[Any] = []
    journal = Journal(state, "never")
    again = journal.recover(lambda *entry: streamed.append(entry), on_snapshot=snapshots.append)
    assert again.entries == [] and again.replayed == 4 and snapshots == [{}]
    assert streamed == recovered.entries, "the same entries, handed over as they are read"


async def test_close_writes_what_is_buffered_without_run(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "always")
    journal.recover()
    assert [journal.append("d", [i]) for i in range(3)] == [1, 2, 3]
    await journal.close()
    await journal.close()  # idempotent
    await journal.wait_durable(3)  # durable after close
    with pytest.raises(RuntimeError, match="closed"):
        journal.append("d", [4])
    assert [e[0] for e in recover(tmp_path).entries] == [1, 2, 3]


async def test_wait_durable_of_nothing_returns_at_once(tmp_path: Path) -> None:
    async with running(tmp_path) as (journal, _):
        await journal.wait_durable(0)
        with pytest.raises(ValueError, match="never appended"):
            await journal.wait_durable(1)


async def test_records_that_would_not_replay_append_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as (journal, _):
        with pytest.raises(TypeError):
            journal.append("d", [object()])
        with pytest.raises(ValueError, match="would not replay"):
            journal.append("d", [{(1, 2): "tuple key"}])
        with pytest.raises(ValueError, match="would not load"):
            await journal.write_snapshot({"d": (0, {(1, 2): "tuple key"})}, 0)
        assert await commit(journal, "d", [1]) == 1
    assert recover(tmp_path).entries == [(1, "d", [1])]


# -- group commit and acknowledgement --------------------------------------------------------


async def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything appended while an fsync runs is made durable by the next one: 50
    commits that arrive during the first fsync share a second (deterministic: the first
    waits at a gate until all 50 wait; timing the arrivals instead failed under load)."""
    async with running(tmp_path, "always") as (journal, _):
        gated = GatedFsync(monkeypatch)  # closed until the test opens it
        done: list[int] = []

        async def client(i: int) -> None:
            done.append(await commit(journal, "d", [i]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client, -1)
            # the flusher thread is in the first fsync
            assert await trio.to_thread.run_sync(gated.entered.wait, 5)
            for i in range(50):
                nursery.start_soon(client, i)
            await trio.testing.wait_all_tasks_blocked()
            assert not done, "nothing is acknowledged before its fsync"
            gated.gate.set()
        assert sorted(done) == list(range(1, 52))
        # the first commit's file and the new segment's directory, then one for the 50
        assert gated.calls <= 3, gated.calls
    assert len(recover(tmp_path).entries) == 51


class GatedFsync:
    """An fsync that blocks (in its worker thread) until the test opens the gate."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()  # an fsync has begun (and waits at the gate)
        self.calls = 0
        real = journal_mod._fsync

        def fsync(fd: int) -> None:
            self.calls += 1
            self.entered.set()
            assert self.gate.wait(5)
            real(fd)

        monkeypatch.setattr(journal_mod, "_fsync", fsync)


async def test_always_acknowledges_only_after_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, "always") as (journal, _):
        gated = GatedFsync(monkeypatch)
        acked = trio.Event()

        async def client() -> None:
            await commit(journal, "d", [1])
            acked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await trio.sleep(0.05)
            assert gated.calls >= 1
            assert not acked.is_set()
            gated.gate.set()
        assert acked.is_set()


async def test_batch_acknowledges_after_write_and_fsyncs_soon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, "batch", batch_interval=0.01) as (journal, _):
        gated = GatedFsync(monkeypatch)
        with trio.fail_after(1):
            await commit(journal, "d", [1])  # acknowledged while the fsync is stuck
        await trio.sleep(0.02)
        assert gated.calls >= 1
        gated.gate.set()
        with trio.fail_after(1):
            for i in range(5):
                await commit(journal, "d", [i])
    assert len(recover(tmp_path).entries) == 6


async def test_fsync_owed_when_cancelled_before_the_thread_started_is_done_by_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path, "always")
    journal.recover()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.append("d", [1])
        journal.rotate()  # written to segment 1, whose fsync (and the dir's) is now owed
        nursery.cancel_scope.cancel()  # the flusher wakes, and is cancelled before its fsync
    counter = FsyncCounter(monkeypatch)
    await journal.close()
    assert counter.calls == 2  # the retired segment and the directory
    await journal.wait_durable(1)


async def test_a_failed_fsync_is_unsynced_until_a_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[str] = []
    journal = Journal(tmp_path, "always", on_failure=lambda: failures.append("!"))
    journal.recover()
    real = journal_mod._fsync

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await commit(journal, "d", [0])
        monkeypatch.setattr(journal_mod, "_fsync", broken)
        lsn = journal.append("d", [1])
        with pytest.raises(JournalFailed, match="I/O error"):
            await journal.wait_durable(lsn)  # its outcome is unknown
        assert journal.unsynced and failures == ["!"]
        with pytest.raises(JournalRefused, match="writing its state anew"):
            journal.append("d", [2])
        await journal.wait_durable(1)  # what was durable before stays so
        monkeypatch.setattr(journal_mod, "_fsync", real)
        await journal.write_snapshot({"d": (lsn, "state-after-1")}, lsn, resync=True)
        assert not journal.unsynced
        await journal.wait_durable(lsn)
        await commit(journal, "d", [3])  # writes resume, in a fresh segment
        nursery.cancel_scope.cancel()
    await journal.close()
    rec = recover(tmp_path)
    assert rec.snapshots == {"d": (2, "state-after-1")}
    assert [e[2] for e in rec.entries] == [[3]]


class FullDisk:
    """``_write_all`` that writes ``room`` bytes more, then fails with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
        self.room = room
        self.real = journal_mod._write_all
        monkeypatch.setattr(journal_mod, "_write_all", self)

    def __call__(self, fd: int, data: bytes) -> None:
        if len(data) <= self.room:
            self.room -= len(data)
            self.real(fd, data)
            return
        self.real(fd, data[: self.room])  # a partial entry reaches the file
        self.room = 0
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("mode", ["always", "batch", "never"])
async def test_a_full_disk_refuses_the_entry_and_writes_resume_when_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: FsyncMode
) -> None:
    async with running(tmp_path, mode) as (journal, _):
        await commit(journal, "d", [0])
        full = FullDisk(monkeypatch, room=3)
        for i in range(3):
            with pytest.raises(JournalRefused, match=r"is full \(\d+ bytes free\)"):
                journal.append("d", [i])
        assert journal.last_lsn == 1 and not journal.unsynced
        full.room = 1 << 20  # space returns
        for i in range(1, 4):
            await commit(journal, "d", [i])
    assert [e[2] for e in recover(tmp_path).entries] == [[0], [1], [2], [3]]


async def test_a_partial_entry_that_cannot_be_truncated_is_cut_before_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, "always") as (journal, _):
        await commit(journal, "d", [0])
        full = FullDisk(monkeypatch, room=5)
        real_truncate = journal_mod.os.ftruncate
        refused = 0

        def no_truncate(fd: int, length: int) -> None:
            nonlocal refused
            refused += 1
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(journal_mod.os, "ftruncate", no_truncate)
        with pytest.raises(JournalRefused):
            journal.append("d", [1])
        assert refused == 1
        with pytest.raises(JournalRefused):  # still cannot cut it: refused again
            journal.append("d", [1])
        monkeypatch.setattr(journal_mod.os, "ftruncate", real_truncate)
        full.room = 1 << 20
        await commit(journal, "d", [2])
    assert [e[2] for e in recover(tmp_path).entries] == [[0], [2]]


async def test_a_segment_whose_header_cannot_be_written_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, "always") as (journal, _):
        await commit(journal, "d", [0])
        journal.rotate()
        full = FullDisk(monkeypatch, room=2)
        with pytest.raises(JournalRefused, match="full"):
            journal.append("d", [1])
        assert len(list(tmp_path.glob("wal-*.log"))) == 1  # noqa: ASYNC240 - a test's look
        full.room = 1 << 20
        await commit(journal, "d", [1])
    assert [e[2] for e in recover(tmp_path).entries] == [[0], [1]]


# -- mode never under the mock clock -------------------------------------------------------


async def test_never_mode_uses_no_thread_under_mock_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    def no_threads(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("mode never must not use a worker thread")

    def no_fsync(fd: int) -> None:
        raise AssertionError("mode never must not fsync")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads)
    monkeypatch.setattr(journal_mod, "_fsync", no_fsync)
    start = trio.current_time()
    async with running(tmp_path, "never") as (journal, _):

        async def client(i: int) -> None:
            await trio.sleep(60 * i)
            await commit(journal, "d", [i])

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(client, i)
        covered = journal.rotate()
        await commit(journal, "d", ["after rotate"])
        await journal.write_snapshot({"d": (covered, "state")}, covered)
        await trio.sleep(3600)
    assert trio.current_time() - start >= 3600 + 540
    recovered = recover(tmp_path)
    assert recovered.snapshots == {"d": (10, "state")}
    assert recovered.entries == [(11, "d", ["after rotate"])]


# -- torn tails ----------------------------------------------------------------------------


async def three_entries(state: Path) -> tuple[bytes, int]:
    """Write three entries; return the segment's bytes and the offset of the last entry."""
    async with running(state, "never") as (journal, _):
        for i in range(3):
            await commit(journal, "d", [f"record {i}", i])
    data = seg_path(state, 1).read_bytes()
    return data, entry_offsets(data)[-1]


async def assert_recovers_first_two(state: Path, cut: int) -> None:
    journal = Journal(state, "always")
    recovered = journal.recover()
    assert [lsn for lsn, _, _ in recovered.entries] == [1, 2]
    assert recovered.next_lsn == 3
    (warning,) = recovered.warnings
    assert f"truncated a torn final record at wal-00000000000000000001.log offset {cut}" in warning
    assert seg_path(state, 1).stat().st_size == cut
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        assert await commit(journal, "d", ["again"]) == 3
        nursery.cancel_scope.cancel()
    await journal.close()
    again = recover(state)
    assert again.warnings == []
    assert again.entries[-1] == (3, "d", ["again"])


@pytest.mark.parametrize("keep", [1, 4, 7, 8, 9, 15, -1])
async def test_torn_final_entry_is_truncated(tmp_path: Path, keep: int) -> None:
    data, last = await three_entries(tmp_path)
    keep = keep if keep > 0 else len(data) - last + keep  # -1: all but the final byte
    with seg_path(tmp_path, 1).open("r+b") as f:
        f.truncate(last + keep)
    await assert_recovers_first_two(tmp_path, last)


async def test_bad_crc_of_final_entry_is_a_torn_tail(tmp_path: Path) -> None:
    data, last = await three_entries(tmp_path)
    seg_path(tmp_path, 1).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    await assert_recovers_first_two(tmp_path, last)


async def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    data, _ = await three_entries(tmp_path)
    seg_path(tmp_path, 1).write_bytes(data + bytes(4096))
    recovered = recover(tmp_path)
    assert [lsn for lsn, _, _ in recovered.entries] == [1, 2, 3]
    assert "(4096 bytes)" in recovered.warnings[0]
    assert seg_path(tmp_path, 1).stat().st_size == len(data)


async def test_torn_segment_header_is_removed(tmp_path: Path) -> None:
    await three_entries(tmp_path)
    seg_path(tmp_path, 4).write_bytes(b"RESDW")
    journal = Journal(tmp_path, "never")
    recovered = journal.recover()
    assert recovered.next_lsn == 4
    assert "torn" in recovered.warnings[0]
    assert wal_files(tmp_path) == ["wal-00000000000000000001.log"]
    assert journal.append("d", ["x"]) == 4
    await journal.close()
    assert recover(tmp_path).entries[-1] == (4, "d", ["x"])


# -- corruption ----------------------------------------------------------------------------


async def test_bad_crc_in_the_middle_is_corruption(tmp_path: Path) -> None:
    data, _ = await three_entries(tmp_path)
    second = entry_offsets(data)[1]
    flipped = bytearray(data)
    flipped[second + 10] ^= 0x01
    seg_path(tmp_path, 1).write_bytes(bytes(flipped))
    with pytest.raises(JournalCorrupt) as info:
        recover(tmp_path)
    message = str(info.value)
    assert "wal-00000000000000000001.log" in message
    assert f"offset {second}" in message
    assert "crc32 mismatch" in message
    assert "refuses to start" in message
    assert seg_path(tmp_path, 1).read_bytes() == bytes(flipped)  # nothing was truncated


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"RESDWAX\x00" + struct.pack(">I", 1) + frame(1, "d", []), "bad magic"),
        (b"RESDWAL\x00" + struct.pack(">I", 2) + frame(1, "d", []), "unknown WAL format version 2"),
        (segment(frame(1, "d", []), frame(1, "d", [])), "lsn 1 where 2 was expected"),
        (segment(frame(2, "d", [])), "lsn 2 where 1 was expected"),
        (segment(struct.pack(">II", 1 << 30, 0) + b"x"), "invalid entry length"),
        (segment(frame(1, "d", []), UNDECODABLE, frame(2, "d", [])), "undecodable entry"),
    ],
)
def test_unreadable_segment_is_corruption(tmp_path: Path, content: bytes, reason: str) -> None:
    seg_path(tmp_path, 1).write_bytes(content)
    with pytest.raises(JournalCorrupt, match=reason):
        recover(tmp_path)


def test_torn_non_final_segment_is_corruption(tmp_path: Path) -> None:
    seg_path(tmp_path, 1).write_bytes(segment(frame(1, "d", []))[:-2])
    seg_path(tmp_path, 2).write_bytes(segment(frame(2, "d", [])))
    with pytest.raises(JournalCorrupt, match="runs past end of file"):
        recover(tmp_path)


def test_missing_segment_is_corruption(tmp_path: Path) -> None:
    seg_path(tmp_path, 1).write_bytes(segment(frame(1, "d", [])))
    seg_path(tmp_path, 3).write_bytes(segment(frame(3, "d", [])))
    with pytest.raises(JournalCorrupt, match="previous one ends at 1"):
        recover(tmp_path)
    seg_path(tmp_path, 1).unlink()
    with pytest.raises(JournalCorrupt, match=r"lsns 1\.\.2 are in no segment"):
        recover(tmp_path)


async def test_bad_snapshot_is_corruption(tmp_path: Path) -> None:
    async with running(tmp_path, "always") as (journal, _):
        await commit(journal, "d", [1])
        await journal.write_snapshot({"d": (1, {"x": 1})}, journal.rotate())
    snap = tmp_path / "snapshot.msgpack"
    good = snap.read_bytes()
    assert good[:8] == b"RESDSNAP"
    snap.write_bytes(good[:-1] + bytes([good[-1] ^ 0x40]))
    with pytest.raises(JournalCorrupt, match=r"snapshot\.msgpack: offset 16: snapshot crc32"):
        recover(tmp_path)
    snap.write_bytes(b"XESDSNAP" + good[8:])
    with pytest.raises(JournalCorrupt, match="bad magic"):
        recover(tmp_path)
    snap.write_bytes(good[:10])
    with pytest.raises(JournalCorrupt, match="shorter than its header"):
        recover(tmp_path)


# -- snapshots -----------------------------------------------------------------------------


async def test_snapshot_skips_covered_entries_per_domain(tmp_path: Path) -> None:
    async with running(tmp_path, "always") as (journal, _):
        await commit(journal, "alloc", ["a1"])  # 1
        await commit(journal, "tenants", ["t1"])  # 2
        await commit(journal, "alloc", ["a2"])  # 3
        covered = journal.rotate()
        assert covered == 3
        assert journal.rotate() == 3  # the new segment is still empty: nothing to do
        await commit(journal, "alloc", ["a3"])  # 4: in the alloc snapshot below
        await commit(journal, "tenants", ["t2"])  # 5: not in the tenants snapshot
        await journal.write_snapshot({"alloc": (4, "A@4"), "tenants": (3, "T@3")}, covered)
        assert journal.entries_since_snapshot == 2
        await commit(journal, "alloc", ["a4"])  # 6
        with pytest.raises(ValueError, match="between 3 and 6"):
            await journal.write_snapshot({"alloc": (7, "A@7")}, 6)
    assert wal_files(tmp_path) == ["wal-00000000000000000004.log"]
    async with running(tmp_path, "always") as (journal, recovered):
        assert recovered.snapshots == {"alloc": (4, "A@4"), "tenants": (3, "T@3")}
        assert recovered.entries == [(5, "tenants", ["t2"]), (6, "alloc", ["a4"])]
        assert recovered.next_lsn == 7
        assert journal.entries_since_snapshot == 3
        assert await commit(journal, "tenants", ["t3"]) == 7
        # a second snapshot covers everything; the live segment stays
        covered = journal.rotate()
        await journal.write_snapshot({"alloc": (7, "A@7"), "tenants": (7, "T@7")}, covered)
        assert journal.entries_since_snapshot == 0
    assert wal_files(tmp_path) == []  # nothing appended to the new segment: never created
    recovered = recover(tmp_path)
    assert recovered == Recovered({"alloc": (7, "A@7"), "tenants": (7, "T@7")}, [], [], 8)


async def test_rotate_with_buffered_entries_keeps_them_in_the_old_segment(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, "always") as (journal, _):
        first = [journal.append("d", [i]) for i in range(3)]  # not yet written
        assert journal.rotate() == 3
        second = [journal.append("d", [i]) for i in range(3, 5)]
        for lsn in first + second:
            await journal.wait_durable(lsn)
    assert wal_files(tmp_path) == [
        "wal-00000000000000000001.log",
        "wal-00000000000000000004.log",
    ]
    assert recover(tmp_path).entries == [(i + 1, "d", [i]) for i in range(5)]


@pytest.mark.parametrize("mode", MODES)
async def test_concurrent_commits_rotations_and_snapshots_replay_to_the_model(
    tmp_path: Path, mode: FsyncMode
) -> None:
    """Many writers race with rotate + snapshot; replaying gives back exactly the model."""
    model: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    async with running(tmp_path, mode, batch_interval=0.001) as (journal, _):

        async def writer(domain: str, start: int) -> None:
            for i in range(start, start + 40):
                model[domain].append(i)  # the state change and the append, with no await
                await journal.wait_durable(journal.append(domain, [i]))
                await trio.lowlevel.checkpoint()

        async def snapshotter() -> None:
            for _ in range(5):
                await trio.sleep(0.002)
                covered = journal.rotate()
                states = {d: (journal.last_lsn, list(v)) for d, v in model.items()}
                await journal.write_snapshot(states, covered)

        async with trio.open_nursery() as nursery:
            for n, domain in enumerate(model):
                nursery.start_soon(writer, domain, 1000 * n)
                nursery.start_soon(writer, domain, 1000 * n + 500)
            nursery.start_soon(snapshotter)
    recovered = recover(tmp_path)
    replayed: dict[str, list[int]] = {d: [] for d in model}
    for domain, (_, state) in recovered.snapshots.items():
        replayed[domain] = list(state)
    for _, domain, records in recovered.entries:
        replayed[domain].extend(records)
    assert replayed == model
    assert recovered.next_lsn == 241
    assert len(wal_files(tmp_path)) <= 2


async def test_concurrent_snapshots_are_serialized(tmp_path: Path) -> None:
    async with running(tmp_path, "always") as (journal, _):
        await commit(journal, "d", [1])

        async def snapshot(state: str) -> None:
            covered = journal.rotate()
            await journal.write_snapshot({"d": (journal.last_lsn, state)}, covered)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(snapshot, "first")
            await commit(journal, "d", [2])
            nursery.start_soon(snapshot, "second")
    recovered = recover(tmp_path)
    assert recovered.snapshots == {"d": (2, "second")}
    assert recovered.entries == []


async def test_snapshot_covering_more_than_the_wal_is_corruption(tmp_path: Path) -> None:
    async with running(tmp_path, "always") as (journal, _):
        await commit(journal, "d", [1])
        await journal.write_snapshot({"d": (1, "s")}, journal.rotate())
        await commit(journal, "d", [2])
    seg_path(tmp_path, 2).unlink()
    # a vanished last segment cannot be told from one never written
    assert recover(tmp_path).next_lsn == 2
    payload = msgpack.packb({"lsn": 1, "domains": {"d": {"lsn": 5, "state": "s"}}})
    snap = b"RESDSNAP" + struct.pack(">II", 1, zlib.crc32(payload)) + payload
    (tmp_path / "snapshot.msgpack").write_bytes(snap)
    with pytest.raises(JournalCorrupt, match="covers lsn 5 but the WAL ends at 1"):
        recover(tmp_path)


async def test_stale_snapshot_tmp_file_is_removed(tmp_path: Path) -> None:
    (tmp_path / "snapshot.msgpack.tmp").write_bytes(b"half a snapshot")
    assert recover(tmp_path) == Recovered({}, [], [], 1)
    assert not (tmp_path / "snapshot.msgpack.tmp").exists()


# -- the version 1 fixture: must replay forever -----------------------------------------------

V1_SNAPSHOTS: dict[str, tuple[int, Any]] = {
    "pools": (4, {"pools": {"gpu": {"capacity": 8}}, "reservations": {"r1": [1, b"\x01\x02"]}}),
    "tenants": (3, {"alice": {"priority": 10, "quota": None}}),
}
V1_ENTRIES: list[tuple[int, str, list[Any]]] = [
    (5, "tenants", [{"t": "tenant_set", "name": "bob", "priority": -3, "weight": 0.5}]),
    (6, "pools", [{"t": "released", "id": "r1"}, {"t": "reserved", "id": "r2", "n": 2**40}]),
]


async def write_v1_fixture(dest: Path) -> None:
    """Produced tests/fixtures/journal/v1 once (``trio.run(write_v1_fixture, dest)``).

    Never regenerate it: it stands for files written by resd's first on-disk format.
    """
    async with running(dest, "always") as (journal, _):
        await commit(journal, "pools", [{"t": "pool_created", "name": "gpu", "capacity": 8}])
        await commit(journal, "pools", [{"t": "reserved", "id": "r1", "n": 1}])
        await commit(journal, "tenants", [{"t": "tenant_added", "name": "alice"}])
        covered = journal.rotate()
        await commit(journal, "pools", [{"t": "renewed", "id": "r1", "until": 1.8e9}])
        await journal.write_snapshot(V1_SNAPSHOTS, covered)
        for _, domain, records in V1_ENTRIES:
            await commit(journal, domain, records)


async def test_v1_fixture_replays(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(FIXTURE_V1, state)
    assert sorted(p.name for p in state.iterdir()) == [
        "snapshot.msgpack",
        "wal-00000000000000000004.log",
    ]
    async with running(state, "always") as (journal, recovered):
        assert recovered.snapshots == V1_SNAPSHOTS
        assert recovered.entries == V1_ENTRIES
        assert recovered.warnings == []
        assert recovered.next_lsn == 7
        assert await commit(journal, "pools", ["next"]) == 7
    assert recover(state).entries[-1] == (7, "pools", ["next"])
