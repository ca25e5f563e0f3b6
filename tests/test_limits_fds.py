"""Running out of file descriptors is survived (SPEC §7, issue 10): resd raises its
soft ``RLIMIT_NOFILE`` to the hard one at start, and when ``accept`` still fails
with EMFILE it backs off and retries, serving its open connections meanwhile,
instead of exiting. A real resd started under a low limit."""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
import trio
import trio.testing

from resd import daemon as daemon_module
from resd.ops import Services
from resd.server import Limits, Server
from resd_client import Client
from resd_client.protocol import PROTOCOL_VERSION, FrameDecoder, encode_frame
from tests.conftest import DAEMON_ARGS, subprocess_env, wait_for

# Set the limits, then become resd: no preexec_fn in the test process.
WITH_LIMIT = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.executable, [sys.executable, '-m', 'resd', *sys.argv[3:]])"
)


class LimitedResd:
    def __init__(self, tmp: Path, soft: int, hard: int, config: str = "") -> None:
        self.socket = str(tmp / "resd.sock")
        self.log = tmp / "resd.log"
        args = ["--socket", self.socket, "--state-dir", str(tmp / "state"), *DAEMON_ARGS]
        if config:
            (tmp / "resd.toml").write_text(config)
            args += ["--config", str(tmp / "resd.toml")]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WITH_LIMIT, str(soft), str(hard), *args],
                env=subprocess_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: self.ready() or self.proc.poll() is not None, 15, "resd ready")
        assert self.proc.poll() is None, self.log.read_text()

    def ready(self) -> bool:
        return b'"event": "ready"' in self.log.read_bytes()

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [
            e for e in (json.loads(x) for x in lines if x.startswith("{")) if e["event"] == name
        ]

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(15)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def limited(short_tmp: Path) -> Iterator[list[LimitedResd]]:
    started: list[LimitedResd] = []
    yield started
    for d in started:
        d.kill()


@pytest.mark.slow
def test_the_soft_limit_is_raised_to_the_hard_one(
    short_tmp: Path, limited: list[LimitedResd]
) -> None:
    d = LimitedResd(short_tmp, 256, 1024)
    limited.append(d)
    [event] = d.events("fd_limit")
    assert (event["was"], event["soft"], event["hard"]) == (256, 1024, 1024)
    [line] = [
        x for x in Path(f"/proc/{d.proc.pid}/limits").read_text().splitlines() if "open files" in x
    ]
    assert line.split()[3:5] == ["1024", "1024"]
    [warning] = d.events("fd_limit_below_max_connections")  # 1024 connections need more
    assert warning["max_connections"] == 1024 and warning["soft"] == 1024
    assert d.stop() == 0


def hello(sock: socket.socket) -> dict[str, Any]:
    sock.sendall(
        encode_frame(
            {"v": PROTOCOL_VERSION, "id": 1, "op": "hello", "args": {"version": PROTOCOL_VERSION}}
        )
    )
    decoder = FrameDecoder()
    while True:
        for frame in decoder.frames():
            return frame  # type: ignore[no-any-return]
        chunk = sock.recv(1 << 16)
        assert chunk, "closed"
        decoder.feed(chunk)


@pytest.mark.slow
def test_emfile_in_accept_backs_off_and_the_daemon_serves_on(
    short_tmp: Path, limited: list[LimitedResd]
) -> None:
    """More connections than descriptors: the daemon neither exits nor stops serving
    the connections it has; the backlog is accepted once descriptors are free."""
    limit = 64
    d = LimitedResd(short_tmp, limit, limit, config="handshake_timeout = 600.0\n")
    limited.append(d)
    early = Client(d.socket, reconnect=0)
    idle = d.open_fds()
    holders: list[socket.socket] = []
    try:
        for _ in range(limit + 20):  # the rest wait in the listen backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            holders.append(s)
        wait_for(lambda: bool(d.events("accept_backing_off")), 10, "accept backing off")
        time.sleep(0.5)  # several retries, still out of descriptors
        assert d.proc.poll() is None, d.log.read_text()
        [backing_off] = d.events("accept_backing_off")  # once per episode
        assert backing_off["error"] == "EMFILE"
        assert d.open_fds() == limit
        assert early.status().connections == limit - idle + 1  # still served
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.settimeout(5)
        late.connect(d.socket)  # queued in the backlog, behind the holders
        holders.append(late)
        for s in holders[:-1]:
            s.close()
        started = time.monotonic()
        assert hello(late)["ok"], "accepted and served once descriptors are free"
        recovery = time.monotonic() - started
        assert recovery < 2.0  # the back-off is capped at 1 s
        [recovered] = d.events("accept_recovered")
        assert recovered["retries"] >= 3
        wait_for(lambda: early.status().connections == 2, 5, "the closed holders to go")
    finally:
        for s in holders:
            s.close()
        early.close()
    with Client(d.socket, reconnect=0) as again:
        assert again.status().connections == 1
    assert d.stop() == 0


# ------------------------------------------------------------ without a process


def test_an_unlimited_hard_limit_means_fs_nr_open(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: asked.append(limits))
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    with structlog.testing.capture_logs() as logs:
        assert daemon_module.raise_fd_limit(1024) == nr_open
    assert asked == [(nr_open, resource.RLIM_INFINITY)]
    [event] = [e for e in logs if e["event"] == "fd_limit"]
    assert (event["was"], event["soft"], event["hard"]) == (1024, nr_open, "unlimited")


def test_a_limit_that_cannot_be_raised_is_logged_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(_resource: int, _limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (512, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with structlog.testing.capture_logs() as logs:
        assert daemon_module.raise_fd_limit(1024) == 512
    events = {e["event"]: e for e in logs}
    assert events["fd_limit_not_raised"]["error"] == "not allowed"
    assert events["fd_limit"]["soft"] == 512
    assert events["fd_limit_below_max_connections"]["max_connections"] == 1024


class FakeListener:
    """``accept`` fails as listed, then waits for ever."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = list(errnos)
        self.calls: list[float] = []

    async def accept(self) -> tuple[object, object]:
        self.calls.append(trio.current_time())
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, os.strerror(code))
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_accept_backs_off_from_10ms_doubling_to_1s(
    mock_clock: trio.testing.MockClock,
) -> None:
    listener = FakeListener(errno.ECONNABORTED, *[errno.EMFILE] * 9, errno.ENFILE, errno.ENOBUFS)
    server = Server(cast(Services, None), Limits())
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            await trio.sleep(60)
            nursery.cancel_scope.cancel()
    gaps = [round(b - a, 3) for a, b in zip(listener.calls, listener.calls[1:], strict=False)]
    assert gaps == [0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0, 1.0]
    [warning] = [e for e in logs if e["event"] == "accept_backing_off"]  # once per episode
    assert warning["error"] == "EMFILE" and warning["log_level"] == "warning"


async def test_other_accept_errors_are_raised() -> None:
    server = Server(cast(Services, None), Limits())
    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, FakeListener(errno.EBADF))
    assert raised.group_contains(OSError, match="Bad file descriptor", depth=None)
