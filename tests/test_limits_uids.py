"""Nobody can lock everyone out (SPEC §7, issue 10): a per-uid connection cap, the
last of ``max_connections`` kept for admins, stalled connections closed.

The pure admission rule is tested directly; the end-to-end tests run a real resd
and connect from other uids (child processes started with ``user=``), so they need
root.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from resd.server import Limits, admission
from resd.tenants import Peer
from resd_client import Client
from resd_client.protocol import PROTOCOL_VERSION, FrameDecoder, encode_frame
from tests.conftest import Daemons, Proc, wait_for

ATTACKER = 65534  # nobody
VICTIM = 40_001
HELLO = encode_frame(
    {"v": PROTOCOL_VERSION, "id": 1, "op": "hello", "args": {"version": PROTOCOL_VERSION}}
)
STATUS = encode_frame({"v": PROTOCOL_VERSION, "id": 2, "op": "status", "args": {}})

# Child scripts: stdlib only, so that they run as any uid.
OPEN_MANY = r"""
import json, selectors, socket, sys, time
path, count, kinds, hello = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), bytes.fromhex(sys.argv[4])
window = float(sys.argv[5])
stalls = {"silent": b"", "half": hello[: len(hello) // 2], "hello": hello,
          "hello+half": hello + b"\0\0\0\x20ab"}
socks = []
for i in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.sendall(stalls[kinds[i % len(kinds)]])
    except (BrokenPipeError, ConnectionResetError):  # refused and closed already
        pass
    s.setblocking(False)
    socks.append(s)
got, eof = [b""] * count, [False] * count
sel = selectors.DefaultSelector()
for i, s in enumerate(socks):
    sel.register(s, selectors.EVENT_READ, i)
deadline = time.monotonic() + window
while time.monotonic() < deadline:
    for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
        i = key.data
        try:
            data = socks[i].recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if data:
            got[i] += data
        else:
            eof[i] = True
            sel.unregister(socks[i])
print(json.dumps({"frames": [g.hex() for g in got], "eof": eof}), flush=True)
sys.stdin.read()  # hold the connections until the test closes stdin
"""

ASK_STATUS = r"""
import json, socket, struct, sys, time
path, data = sys.argv[1], bytes.fromhex(sys.argv[2])
start = time.monotonic()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
try:
    s.sendall(data)
except (BrokenPipeError, ConnectionResetError):  # refused and closed already
    pass
buf, frames = b"", 0
while frames < 2:
    try:
        chunk = s.recv(1 << 16)
    except ConnectionResetError:  # closed with our status unread, after its refusal
        break
    if not chunk:
        break
    buf += chunk
    frames, at = 0, 0
    while len(buf) >= at + 4 and len(buf) >= at + 4 + struct.unpack(">I", buf[at:at + 4])[0]:
        at += 4 + struct.unpack(">I", buf[at:at + 4])[0]
        frames += 1
print(json.dumps({"elapsed": time.monotonic() - start, "data": buf.hex()}), flush=True)
"""


def decode(hexed: str) -> list[dict[str, Any]]:
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex(hexed))
    return list(decoder.frames())


# ------------------------------------------------------------ the admission rule

LIMITS = Limits(max_connections=100, max_connections_per_uid=10, admin_reserved_connections=5)
USER = Peer(uid=1000, gid=1000, pid=1, user="u")
ADMIN = Peer(uid=0, gid=0, pid=1, user="root", admin=True)


@pytest.mark.parametrize(
    ("peer", "total", "of_uid", "limit"),
    [
        (USER, 0, 0, None),
        (USER, 94, 9, None),
        (USER, 50, 10, "max_connections_per_uid"),
        (USER, 95, 0, "admin_reserved_connections"),
        (USER, 95, 10, "max_connections_per_uid"),  # the user's own excess says so first
        (USER, 100, 0, "max_connections"),
        (ADMIN, 99, 99, None),  # admins: no per-uid cap, the reserve is theirs
        (ADMIN, 100, 0, "max_connections"),
    ],
)
def test_admission(peer: Peer, total: int, of_uid: int, limit: str | None) -> None:
    refusal = admission(LIMITS, peer, total, of_uid)
    if limit is None:
        assert refusal is None
        return
    assert refusal is not None
    assert refusal.code == "unavailable"
    assert refusal.details["limit"] == limit
    assert refusal.message.startswith("too many connections")
    assert str(refusal.details["value"]) in refusal.message
    assert limit in refusal.message or limit == "max_connections"


def test_admission_messages_name_the_limit_and_its_value() -> None:
    per_uid = admission(LIMITS, USER, 50, 10)
    assert per_uid is not None
    assert per_uid.message == "too many connections from uid 1000: max_connections_per_uid is 10"
    reserved = admission(LIMITS, USER, 95, 0)
    assert reserved is not None and "the last 5 of max_connections 100 are kept for admins" in (
        reserved.message
    )
    full = admission(LIMITS, ADMIN, 100, 0)
    assert full is not None and full.message == "too many connections: max_connections is 100"


# ------------------------------------------------------------- real uids, real resd

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="connecting as other uids needs root (setuid in the child)"
)


@functools.cache
def python_for(uid: int) -> str | None:
    """A Python that ``uid`` may run (the venv's may live under a 0700 /root)."""
    candidates = [
        sys.executable,
        os.path.realpath(sys.executable),
        getattr(sys, "_base_executable", ""),
        shutil.which("python3") or "",
        "/usr/bin/python3",
    ]
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            done = subprocess.run(
                [exe, "-I", "-c", "pass"],
                user=uid,
                group=uid,
                extra_groups=[],
                capture_output=True,
                timeout=30,
            )
        except OSError:
            continue
        if done.returncode == 0:
            return exe
    return None


def as_uid(uid: int, script: str, *args: str) -> subprocess.Popen[str]:
    """Run a stdlib-only ``script`` as ``uid`` (and gid ``uid``, no other groups)."""
    exe = python_for(uid)
    if exe is None:
        pytest.skip(f"no Python interpreter that uid {uid} may run")
    return subprocess.Popen(
        [exe, "-I", "-c", script, *args],
        user=uid,
        group=uid,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def open_many(
    uid: int, path: str, count: int, kinds: str, window: float = 1.0
) -> tuple[subprocess.Popen[str], list[list[dict[str, Any]]], list[bool]]:
    """``count`` connections from ``uid`` that stall in the ways of ``kinds``; what
    each got within ``window`` seconds and whether it was closed. The child holds
    them until its stdin is closed."""
    child = as_uid(uid, OPEN_MANY, path, str(count), kinds, HELLO.hex(), str(window))
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"the child of uid {uid} failed: exit {child.wait(10)}"
    report = json.loads(line)
    return child, [decode(h) for h in report["frames"]], report["eof"]


def release(child: subprocess.Popen[str]) -> None:
    """Let the child go: its connections close."""
    child.communicate(timeout=10)


def status_as(uid: int, path: str) -> tuple[float, list[dict[str, Any]]]:
    child = as_uid(uid, ASK_STATUS, path, (HELLO + STATUS).hex())
    out, _ = child.communicate(timeout=15)
    report = json.loads(out)
    return report["elapsed"], decode(report["data"])


def open_daemon(daemons: Daemons, config: str) -> Proc:
    os.chmod(daemons.tmp, 0o755)  # other uids must reach the socket
    return daemons.make(config='socket_mode = "0666"\n' + config).start()


@needs_root
@pytest.mark.slow
def test_one_uid_stalling_a_thousand_connections_locks_nobody_out(daemons: Daemons) -> None:
    proc = open_daemon(
        daemons, "max_connections = 600\nhandshake_timeout = 3.0\nread_timeout = 3.0\n"
    )
    attacker, got, closed = open_many(ATTACKER, proc.socket, 1000, "silent,half,hello+half")
    try:
        held = [i for i, c in enumerate(closed) if not c]
        assert len(held) == 256, "max_connections_per_uid's default"
        refused = [frames for frames, c in zip(got, closed, strict=True) if c]
        assert len(refused) == 744
        for frames in refused:
            assert frames[0]["error"]["code"] == "unavailable"
            assert frames[0]["error"]["message"] == (
                f"too many connections from uid {ATTACKER}: max_connections_per_uid is 256"
            )
        # another user is served at once, and so is an admin
        elapsed, frames = status_as(VICTIM, proc.socket)
        assert [f["ok"] for f in frames] == [True, True], frames
        assert elapsed < 1.0
        with Client(proc.socket, reconnect=0) as admin:
            assert admin.status().connections == 257
            # the stalled ones are closed after the timeouts; the idle admin stays
            wait_for(lambda: admin.status().connections == 1, 10, "stalled connections closed")
    finally:
        release(attacker)
    log = proc.log_text()
    assert '"event": "handshake_timeout"' in log and '"event": "read_timeout"' in log
    assert '"limit": "max_connections_per_uid"' in log
    assert log.count('"event": "connection_refused"') == 1, "744 refusals, one warning"
    assert proc.stop() == 0


@needs_root
@pytest.mark.slow
def test_the_last_connections_are_kept_for_admins(daemons: Daemons) -> None:
    proc = open_daemon(
        daemons,
        "max_connections = 30\nadmin_reserved_connections = 10\nmax_connections_per_uid = 15\n",
    )
    a, got_a, closed_a = open_many(40_002, proc.socket, 17, "hello", window=0.5)
    b, got_b, closed_b = open_many(40_003, proc.socket, 10, "hello", window=0.5)
    admins: list[Client] = []
    try:
        assert closed_a == [False] * 15 + [True] * 2
        assert all(frames[0]["ok"] for frames in got_a[:15])
        assert "max_connections_per_uid is 15" in got_a[15][0]["error"]["message"]
        assert closed_b == [False] * 5 + [True] * 5
        message = got_b[5][0]["error"]["message"]
        assert "the last 10 of max_connections 30 are kept for admins" in message
        _, frames = status_as(40_004, proc.socket)
        assert "kept for admins" in frames[0]["error"]["message"]
        admins = [Client(proc.socket, reconnect=0) for _ in range(10)]  # root: the reserve
        assert admins[0].status().connections == 30
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(5)
            extra.connect(proc.socket)
            refusal = decode(extra.recv(1 << 16).hex())[0]
            assert refusal["error"]["message"] == "too many connections: max_connections is 30"
            assert refusal["error"]["details"] == {"limit": "max_connections", "value": 30}
            assert extra.recv(1) == b""  # then closed
    finally:
        for client in admins:
            client.close()
        release(a)
        release(b)
    assert proc.stop() == 0


def test_every_connection_needs_the_daemon_reachable(short_tmp: Path) -> None:
    """The helpers above make the temp dir 0755; the daemon must still accept it
    (owned by root, not writable by others)."""
    os.chmod(short_tmp, 0o755)
    from resd.daemon import check_socket_dirs

    check_socket_dirs(short_tmp, short_tmp / "resd.sock")
