"""A full disk or an I/O error on the state directory refuses writes with a clear
error, changes nothing, keeps the daemon serving reads, and is never fatal; writes
resume by themselves (SPEC §7, issue 10). Faults are injected in the journal's file
layer, and (where the test may mount one) a real 2 MiB tmpfs fills up."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from resd import journal as journal_mod
from resd_client import Client, UnavailableError
from resd_client.protocol import PoolCreate, from_wire
from tests.conftest import InProcess, Proc
from tests.wire import WireClient


class Faults:
    """Switchable faults of the journal's file layer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.fsync_broken = False
        real_write, real_fsync = journal_mod._write_all, journal_mod._fsync

        def write_all(fd: int, data: bytes) -> None:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(fd, data)

        def fsync(fd: int) -> None:
            if self.fsync_broken:
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(journal_mod, "_write_all", write_all)
        monkeypatch.setattr(journal_mod, "_fsync", fsync)


async def setup(c: WireClient) -> None:
    await c.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": 8000}}, "max_per_tenant": 0},
    )


async def state(c: WireClient) -> tuple[Any, Any]:
    return (await c.ok("list"))["reservations"], (await c.ok("pool.show", {"name": "p"}))


async def test_a_full_disk_refuses_writes_serves_reads_and_recovers_by_itself(
    inproc: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    held = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}, "ttl": 0.5})
    faults = Faults(monkeypatch)
    faults.full = True
    before = await state(c)
    refused = await c.request("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    assert refused["error"]["code"] == "unavailable"
    assert "is full (" in refused["error"]["message"]
    assert "bytes free" in refused["error"]["message"]
    assert "nothing was changed" in refused["error"]["message"]
    await trio.sleep(0.8)  # the TTL passes while the disk is full: the expiry waits
    assert await state(c) == before, "reads are served, nothing changed"
    assert (await c.ok("status"))["active"] == 1
    faults.full = False  # space returns: writes resume by themselves
    for _ in range(100):
        if not (await c.ok("list"))["reservations"]:
            break
        await trio.sleep(0.05)
    kinds = [
        e["kind"] for e in (await c.ok("export", {}))["events"] if e["reservation"] == held["id"]
    ]
    assert kinds == ["reserved", "expired"], "the refused expiry was tried again"
    again = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    assert again["state"] == "active"
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    assert [r["id"] for r in (await c.ok("list"))["reservations"]] == [again["id"]]


async def test_a_failed_fsync_is_unknown_outcome_then_the_state_is_written_anew(
    inproc: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    await inproc.restart(fsync="always")
    c = await WireClient.connect(inproc.socket)
    await setup(c)
    faults = Faults(monkeypatch)
    faults.fsync_broken = True
    unknown = await c.request("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    assert unknown["error"]["code"] == "unavailable", unknown
    assert unknown["error"]["details"]["outcome"] == "unknown"
    refused = await c.request("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    assert refused["error"]["code"] == "unavailable"
    assert "writing its state anew" in refused["error"]["message"]
    assert len((await c.ok("list"))["reservations"]) == 1, "reads served; the first one is made"
    faults.fsync_broken = False  # the resync snapshot is retried until it succeeds
    with trio.fail_after(10):
        while True:
            reply = await c.request("reserve", {"pool": "p", "resources": {"cpu": 1000}})
            if reply["ok"]:
                break
            await trio.sleep(0.1)
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    assert len((await c.ok("list"))["reservations"]) == 2, "both survive: written anew"


# ------------------------------------------------------------------ a real tmpfs


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_is_survived(short_tmp: Path) -> None:
    with small_tmpfs(short_tmp / "disk") as disk:
        proc = Proc(
            socket=str(short_tmp / "resd.sock"),
            state_dir=str(disk / "state"),
            args=["--no-host-pool", "--fsync", "always", "--log-format", "json"],
            log=short_tmp / "resd.log",
        ).start()
        try:
            with Client(proc.socket, reconnect=0) as c:
                args = {"name": "p", "resources": {"cpu": {"capacity": 10**9}}, "max_per_tenant": 0}
                c.call("pool.create", from_wire(PoolCreate, args))
                filler = disk / "filler"
                with contextlib.suppress(OSError), filler.open("wb") as f:
                    while True:
                        f.write(b"\0" * (64 << 10))
                        f.flush()
                made, error = 0, None
                for _ in range(10_000):
                    try:
                        c.reserve("p", cpu="1m", binding="detached", label="x" * 200, wait=False)
                        made += 1
                    except UnavailableError as exc:
                        error = exc
                        break
                assert error is not None, "the disk never filled"
                assert "is full (" in error.message, error.message
                assert c.status().active == made, "the daemon serves reads"
                filler.unlink()  # space returns
                c.reserve("p", cpu="1m", binding="detached", wait=False)
                assert c.status().active == made + 1
            assert proc.proc is not None and proc.proc.poll() is None, "still running"
            assert proc.stop() == 0
            proc.start()
            with Client(proc.socket, reconnect=0) as c:
                assert c.status().active == made + 1, "every acknowledged change is there"
            assert proc.stop() == 0
        finally:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait(5)
            time.sleep(0.05)
