"""Lifecycle of a real ``resd`` process: signals, socket ownership, pipelining (SPEC §1, §6).

SIGTERM/SIGINT stop the daemon cleanly (exit 0, socket removed); a second daemon on the
same socket or the same state directory refuses to start and leaves the first one
serving; a stale socket file does not block a start; requests pipelined on one
connection are each answered exactly once, also when SIGTERM arrives mid-burst.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import pytest

from resd_client import Client
from resd_client.protocol import PoolCreate, from_wire
from tests.conftest import DAEMON_ARGS, Daemons, Proc, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ERROR_CODES = {
    "invalid",
    "not_found",
    "exists",
    "conflict",
    "insufficient",
    "quota_exceeded",
    "forbidden",
    "timeout",
    "preempted",
    "unsupported_version",
    "unavailable",
    "internal",
}


# ---------------------------------------------------------------------------- helpers


def run_resd(sock: str, state_dir: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a resd that is expected to refuse to start. If it is still running after
    ``timeout`` it is stopped and the result's returncode is 0 (as if it had served)."""
    with subprocess.Popen(
        [sys.executable, "-m", "resd", "--socket", sock, "--state-dir", state_dir, *DAEMON_ARGS],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            out, err = child.communicate(timeout=timeout)
            code = child.returncode
        except subprocess.TimeoutExpired:
            child.terminate()
            out, err = child.communicate(timeout=10)
            code = 0
    return subprocess.CompletedProcess(child.args, code, out, err)


def create_pool(client: Client, name: str, cpu_cores: int) -> None:
    client.call(
        "pool.create",
        from_wire(
            PoolCreate,
            {
                "name": name,
                "resources": {"cpu": {"capacity": cpu_cores * 1000}},
                "max_per_tenant": 0,
            },
        ),
    )


def serving(proc: Proc) -> bool:
    with Client(proc.socket, timeout=5) as c:
        return c.status().server_version is not None


# --- a raw protocol connection, framed by hand (4-byte BE length + msgpack map)


def frame(obj: Any) -> bytes:
    payload: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def req(rid: int, op: str, args: dict[str, Any] | None = None) -> bytes:
    return frame({"v": 1, "id": rid, "op": op, "args": args or {}})


class Raw:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.buf = b""
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_frame(self) -> dict[str, Any] | None:
        """The next frame, None at EOF (a connection reset counts as EOF)."""
        while True:
            if len(self.buf) >= 4:
                (length,) = struct.unpack_from(">I", self.buf)
                if len(self.buf) >= 4 + length:
                    payload, self.buf = self.buf[4 : 4 + length], self.buf[4 + length :]
                    value = msgpack.unpackb(payload, raw=False)
                    assert isinstance(value, dict), value
                    return value
            if self.eof:
                assert not self.buf, f"connection closed mid-frame: {self.buf!r}"
                return None
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.buf += data

    def replies(self, count: int | None = None) -> list[dict[str, Any]]:
        """Replies (frames with no ``event``) until ``count`` of them or EOF."""
        out: list[dict[str, Any]] = []
        while count is None or len(out) < count:
            f = self.next_frame()
            if f is None:
                break
            if "event" not in f:
                out.append(f)
        return out


def check_well_formed(reply: dict[str, Any]) -> None:
    assert set(reply) == {"id", "ok", "result"} or set(reply) == {"id", "ok", "error"}, reply
    assert isinstance(reply["id"], int), reply
    if reply["ok"] is True:
        assert isinstance(reply["result"], dict), reply
    else:
        assert reply["ok"] is False, reply
        err = reply["error"]
        assert err["code"] in ERROR_CODES, reply
        assert isinstance(err["message"], str) and err["message"], reply
        assert isinstance(err.get("details", {}), dict), reply


# --------------------------------------------------------------------- 5. signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(daemons: Daemons, sig: signal.Signals) -> None:
    proc = daemons.make().start()
    assert stat.S_ISSOCK(os.stat(proc.socket).st_mode)
    assert stat.S_IMODE(os.stat(proc.socket).st_mode) == 0o600, "user-mode socket is 0600"
    with Client(proc.socket) as c:
        create_pool(c, "p", 4)
        lease = c.reserve("p", cpu="1", binding="detached")
    # An idle connection and a subscriber must not hold the shutdown up.
    idle = Client(proc.socket)
    sub = Client(proc.socket)
    sub.subscribe()
    try:
        started = time.monotonic()
        assert proc.stop(sig, timeout=10) == 0, proc.log_text()
        assert time.monotonic() - started < 5
    finally:
        idle.close()
        sub.close()
    assert not os.path.exists(proc.socket), "the socket file should be removed on exit"
    log = proc.log_text()
    assert '"event": "stopped"' in log and "Traceback" not in log, log
    # The state lock was released and the state kept: a new daemon starts on it.
    proc.start()
    with Client(proc.socket) as c:
        assert [r.id for r in c.list()] == [lease.id]
    assert proc.stop() == 0


# ------------------------------------------------------- 6. one daemon per socket/state


def test_second_daemon_on_same_socket_refuses(daemons: Daemons) -> None:
    first = daemons.make("first").start()
    with Client(first.socket) as c:
        create_pool(c, "p", 4)
    result = run_resd(first.socket, str(daemons.tmp / "state-second"))
    assert result.returncode != 0
    assert "another resd is already listening" in result.stderr, result.stderr
    assert first.socket in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # The first keeps serving on its socket file, which the second left alone.
    assert os.path.exists(first.socket)
    assert first.proc is not None and first.proc.poll() is None
    with Client(first.socket) as c:
        assert [p.name for p in c.status().pools] == ["p"]
        c.reserve("p", cpu="1", binding="detached")
    assert first.stop() == 0


def test_second_daemon_on_same_state_dir_refuses(daemons: Daemons) -> None:
    first = daemons.make("first").start()
    assert first.proc is not None
    other_socket = str(daemons.tmp / "second.sock")
    result = run_resd(other_socket, first.state_dir)
    assert result.returncode != 0
    err = result.stderr
    assert "in use" in err and first.state_dir in err, err
    assert str(first.proc.pid) in err, f"the message should name the holder's pid: {err}"
    assert "Traceback" not in err, err
    assert not os.path.exists(other_socket), "the refused daemon must not listen"
    assert first.proc.poll() is None
    assert serving(first)
    assert first.stop() == 0


# ---------------------------------------------------------------- 7. stale socket


def test_stale_socket_file_does_not_block_start(daemons: Daemons) -> None:
    proc = daemons.make()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(proc.socket)
    stale.close()  # the file stays, nobody listens
    assert os.path.exists(proc.socket)
    with pytest.raises(ConnectionRefusedError):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(proc.socket)
        finally:
            probe.close()
    proc.start()
    assert "stale_socket_removed" in proc.log_text()
    assert serving(proc)
    assert proc.stop() == 0
    assert not os.path.exists(proc.socket)


def test_regular_file_at_socket_path_is_not_deleted(daemons: Daemons) -> None:
    """Only a socket nobody listens on is stale; any other file there is not resd's to
    delete (think ``--socket`` with a typo pointing at someone's data)."""
    path = daemons.tmp / "precious"
    path.write_text("do not delete me\n")
    result = run_resd(str(path), str(daemons.tmp / "state"), timeout=5)
    assert path.exists() and path.read_text() == "do not delete me\n", (
        "resd deleted a regular file at its socket path"
    )
    assert result.returncode != 0
    assert str(path) in result.stderr and "not a socket" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_directory_at_socket_path_gives_a_clear_error(daemons: Daemons) -> None:
    path = daemons.tmp / "a-directory"
    path.mkdir()
    result = run_resd(str(path), str(daemons.tmp / "state"), timeout=10)
    assert result.returncode != 0
    assert path.is_dir()
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert any(ln.startswith("resd: ") and str(path) in ln for ln in lines), result.stderr


def test_socket_left_by_kill9_does_not_block_restart(daemons: Daemons) -> None:
    proc = daemons.make().start()
    proc.kill9()
    assert os.path.exists(proc.socket), "kill -9 leaves the socket file behind"
    proc.start()
    assert serving(proc)
    assert proc.stop() == 0


# ------------------------------------------------------------------ 8. pipelining


def test_fifty_pipelined_requests_each_answered_once(daemons: Daemons) -> None:
    proc = daemons.make().start()
    with Client(proc.socket) as c:
        create_pool(c, "p", 64)
    conn = Raw(proc.socket)
    try:
        expect_ok: dict[int, bool] = {1: True}
        parts = [req(1, "hello", {"version": 1, "client": "pipeline-test"})]
        menu: list[tuple[str, dict[str, Any], bool]] = [
            ("reserve", {"pool": "p", "resources": {"cpu": 500}, "binding": "detached"}, True),
            ("status", {}, True),
            ("list", {"pool": "p"}, True),
            ("pool.show", {"name": "p"}, True),
            ("export", {}, True),
            ("pool.show", {"name": "nope"}, False),  # not_found
            ("no.such.op", {}, False),  # invalid, still answered with its id
        ]
        for rid in range(2, 51):
            op, args, ok = menu[rid % len(menu)]
            parts.append(req(rid, op, args))
            expect_ok[rid] = ok
        conn.send(b"".join(parts))  # all 50 before reading anything
        replies = conn.replies(50)
    finally:
        conn.close()
    ids = [r["id"] for r in replies]
    assert sorted(ids) == list(range(1, 51)), f"missing/duplicate: {sorted(ids)}"
    for r in replies:
        check_well_formed(r)
        assert r["ok"] is expect_ok[r["id"]], r
    reserved = [r["result"]["id"] for r in replies if r["ok"] and "binding" in r["result"]]
    assert len(reserved) == sum(1 for rid in range(2, 51) if menu[rid % len(menu)][0] == "reserve")
    with Client(proc.socket) as c:
        assert sorted(r.id for r in c.list()) == sorted(reserved)
    assert proc.stop() == 0


def test_pipelining_beyond_the_pending_limit_loses_nothing(daemons: Daemons) -> None:
    """More requests than ``max_pending`` (64): the daemon stops reading, not answering."""
    proc = daemons.make().start()
    count = 600
    conn = Raw(proc.socket)
    try:
        data = req(1, "hello", {"version": 1}) + b"".join(
            req(rid, "status" if rid % 2 else "list") for rid in range(2, count + 1)
        )
        sender = threading.Thread(target=conn.send, args=(data,))
        sender.start()
        replies = conn.replies(count)
        sender.join(10)
    finally:
        conn.close()
    ids = sorted(r["id"] for r in replies)
    assert ids == list(range(1, count + 1))
    assert all(r["ok"] for r in replies)
    assert proc.stop() == 0


# ------------------------------------------------- 9. in-flight requests and SIGTERM


@pytest.mark.parametrize("when", ["immediately", "after-first-reply"])
def test_in_flight_requests_finish_on_sigterm(daemons: Daemons, when: str) -> None:
    proc = daemons.make().start()
    assert proc.proc is not None
    with Client(proc.socket) as c:
        create_pool(c, "p", 10_000)
    conn = Raw(proc.socket)
    burst = 300
    try:
        conn.send(req(1, "hello", {"version": 1}))
        (hello,) = conn.replies(1)
        assert hello["ok"], hello
        sent = set(range(2, burst + 2))
        conn.send(
            b"".join(
                req(
                    rid,
                    "reserve",
                    {
                        "pool": "p",
                        "resources": {"cpu": 100},
                        "binding": "detached",
                        "label": str(rid),
                    },
                )
                for rid in sorted(sent)
            )
        )
        replies = conn.replies(1) if when == "after-first-reply" else []
        proc.proc.send_signal(signal.SIGTERM)
        replies += conn.replies()  # until the daemon closes the connection
    finally:
        conn.close()
    assert proc.proc.wait(15) == 0, proc.log_text()
    assert not os.path.exists(proc.socket)

    ids = [r["id"] for r in replies]
    assert len(ids) == len(set(ids)), "a request was answered twice"
    assert set(ids) <= sent
    granted: dict[str, int] = {}
    for r in replies:
        check_well_formed(r)
        if r["ok"]:
            res = r["result"]
            assert res["resources"] == {"cpu": 100} and res["label"] == str(r["id"]), r
            assert res["state"] == "active" and res["binding"] == "detached", r
            granted[res["id"]] = r["id"]
    print(f"{len(replies)} of {burst} answered before shutdown, {len(granted)} granted")

    proc.start()
    with Client(proc.socket) as c:
        present = {r.id: r for r in c.list(pool="p")}
    missing = set(granted) - set(present)
    assert not missing, f"acknowledged reservations lost by a clean shutdown: {sorted(missing)}"
    for info in present.values():
        assert info.resources == {"cpu": 100} and info.label.isdigit(), info
    # A graceful stop lets every request it started finish and answers it, so nothing
    # should exist that its client was never told about.
    unanswered = set(present) - set(granted)
    assert not unanswered, f"reservations made but never acknowledged: {sorted(unanswered)}"
    assert proc.stop() == 0
