"""A client that sends without reading costs the daemon bounded memory, and a
notice it cannot take closes its connection instead of vanishing (issue 9): a
real resd, raw sockets that never read."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from resd_client.protocol import FrameDecoder, encode_frame
from tests.conftest import Daemons

TOKEN = "unread-token-" + "z" * 20


class Raw:
    opened: list[socket.socket] = []

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        Raw.opened.append(self.sock)
        self.sock.connect(path)
        self.decoder = FrameDecoder(64 << 20)
        self.ids = itertools.count(1)
        self.frames: list[dict[str, Any]] = []
        self.ok("hello", {"version": 1, "client": "unread"})

    def frame(self, op: str, args: dict[str, Any]) -> bytes:
        return encode_frame({"v": 1, "id": next(self.ids), "op": op, "args": args})

    def ok(self, op: str, args: dict[str, Any]) -> Any:
        data = self.frame(op, args)
        rid = next(self.ids) - 1
        self.sock.sendall(data)
        while True:
            for f in self.decoder.frames():
                if f.get("id") == rid:
                    assert f["ok"], f
                    return f["result"]
                self.frames.append(f)
            chunk = self.sock.recv(1 << 16)
            assert chunk, "closed"
            self.decoder.feed(chunk)

    def flood(self, count: int, stall: float = 1.0) -> int:
        """Pipeline ``count`` status requests without reading; stop when the daemon
        stops taking them for ``stall`` seconds. Returns how many bytes went out."""
        data = b"".join(self.frame("status", {}) for _ in range(count))
        self.sock.settimeout(stall)
        sent = 0
        try:
            while sent < len(data):
                sent += self.sock.send(data[sent : sent + (1 << 16)])
        except (TimeoutError, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(None)
        return sent

    def drain(self, timeout: float = 20.0) -> bool:
        """Read until EOF (True) or ``timeout`` without EOF (False), keeping frames."""
        self.sock.settimeout(timeout)
        try:
            while chunk := self.sock.recv(1 << 20):
                self.decoder.feed(chunk)
                self.frames.extend(self.decoder.frames())
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        finally:
            self.sock.settimeout(None)
        return True


@pytest.fixture(autouse=True)
def close_sockets() -> Iterator[None]:
    yield
    for sock in Raw.opened:
        sock.close()
    Raw.opened.clear()


def setup(path: str) -> Raw:
    admin = Raw(path)
    admin.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": 1000}}, "max_per_tenant": 0},
    )
    return admin


def test_a_waiter_that_never_reads_gets_its_grant_or_learns_it_on_reconnect(
    daemons: Daemons,
) -> None:
    proc = daemons.make().start()
    admin = setup(proc.socket)
    blocker = admin.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    waiter = Raw(proc.socket)
    queued = waiter.ok(
        "reserve",
        {
            "pool": "p",
            "resources": {"cpu": 1000},
            "wait": True,
            "binding": "session",
            "token": TOKEN,
        },
    )
    assert queued["state"] == "pending"
    waiter.flood(20_000)
    admin.ok("release", {"id": blocker["id"]})
    closed = waiter.drain(timeout=5.0)
    pushed = [f for f in waiter.frames if f.get("event") == "granted"]
    assert closed or pushed, "the grant was neither delivered nor was the connection closed"
    if closed:
        assert "closing_unread_connection" in proc.log_text()
    # Either way the lease is held for its holder, who re-attaches and learns it.
    again = Raw(proc.socket)
    back = again.ok("attach", {"token": TOKEN, "id": queued["id"]})
    assert back["state"] == "active" and back["id"] == queued["id"]
    again.sock.close()
    deadline = time.monotonic() + 10
    while admin.ok("list", {})["reservations"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert admin.ok("list", {})["reservations"] == [], "released with its new connection"
    assert proc.stop() == 0


def rss_after_flood(daemons: Daemons, count: int) -> tuple[int, int, int]:
    proc = daemons.make().start()
    admin = setup(proc.socket)
    assert proc.proc is not None
    daemon = psutil.Process(proc.proc.pid)
    before = daemon.memory_info().rss
    flooder = Raw(proc.socket)
    sent = flooder.flood(count, stall=2.0)
    after = daemon.memory_info().rss
    # the daemon still serves everyone else meanwhile
    assert admin.ok("status", {})["active"] == 0
    flooder.sock.close()
    assert proc.stop() == 0
    return before, after, sent


def test_unread_pipelined_requests_cost_bounded_memory(daemons: Daemons) -> None:
    before, after, sent = rss_after_flood(daemons, 50_000)
    request = len(encode_frame({"v": 1, "id": 1, "op": "status", "args": {}}))
    assert sent < 50_000 * request, "the daemon stopped reading: backpressure"
    assert after - before < 64 << 20, f"grew {(after - before) >> 20} MiB"


@pytest.mark.campaign
def test_250000_unread_pipelined_requests(daemons: Daemons) -> None:
    before, after, _ = rss_after_flood(daemons, 250_000)
    assert after - before < 64 << 20, f"grew {(after - before) >> 20} MiB"
