"""systemd integration for real: sd_notify datagrams and socket activation on fd 3."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resd_client import Client
from resd_client.protocol import PoolCreate, ResourceSpec
from tests.conftest import subprocess_env

pytestmark = pytest.mark.slow


def test_notify_ready_and_stopping(short_tmp: Path) -> None:
    notify_path = str(short_tmp / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(15)
    sock = str(short_tmp / "resd.sock")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resd",
            "--socket",
            sock,
            "--state-dir",
            str(short_tmp / "st"),
            "--no-host-pool",
        ],
        env={**subprocess_env(), "NOTIFY_SOCKET": notify_path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready
        with Client(sock) as client:  # READY means it serves
            assert client.status().pools == []
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(15) == 0
    finally:
        notify.close()
        proc.kill()
        proc.wait(10)


def test_socket_activation_uses_fd_3(short_tmp: Path) -> None:
    """Like systemd: bind the socket, hand it over as fd 3 with LISTEN_PID/LISTEN_FDS, exec resd."""
    path = str(short_tmp / "activated.sock")
    unused = str(short_tmp / "unused.sock")
    launcher = textwrap.dedent(f"""
        import os, socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind({path!r}); s.listen(16)
        os.dup2(s.fileno(), 3)
        os.set_inheritable(3, True)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "resd", "--socket", {unused!r},
                 "--state-dir", {str(short_tmp / "st")!r}, "--no-host-pool"])
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        client = None
        while client is None and time.monotonic() < deadline:
            try:
                client = Client(path)
            except Exception:
                time.sleep(0.05)
        assert client is not None, "resd did not serve on the activated socket"
        with client:
            client.call(
                "pool.create", PoolCreate(name="a", resources={"cpu": ResourceSpec(capacity=1000)})
            )
            assert [p.name for p in client.status().pools] == ["a"]
        assert not os.path.exists(unused)  # it did not bind its own socket
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert os.path.exists(path)  # the activated socket belongs to systemd: left in place
    finally:
        proc.kill()
        proc.wait(10)
