"""Nobody else can stand in for resd (SPEC §7, issue 10).

The daemon refuses a user-mode runtime directory that is not its own with mode 0700
(someone's ``mkdir -m 777 /tmp/resd-$UID`` would let them swap the socket), and any
socket path another user could swap; clients check the daemon's uid (SO_PEERCRED)
before they send anything, also when reconnecting. Tests that act as another uid
need root.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from resd.daemon import StartupError, bind_listener
from resd_client import Client, Disconnected, Reconnected, UnavailableError
from resd_client._sync import connect_socket, trusted_daemon_uids
from resd_client.errors import InvalidError
from resd_client.paths import user_socket
from resd_client.protocol import PoolCreate, ResourceSpec
from tests.conftest import DAEMON_ARGS, Daemons, subprocess_env
from tests.test_limits_uids import as_uid, python_for

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="acting as another uid (chown, setuid) needs root"
)

# A stdlib-only impostor: listens at argv[1] until its stdin closes, then reports
# how many connections it got and how many bytes they sent.
IMPOSTOR = r"""
import json, os, selectors, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(64)
srv.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ, "listener")
sel.register(0, selectors.EVENT_READ, "stdin")
print("listening", flush=True)
connections = received = 0
running = True
while True:
    ready = sel.select(None if running else 0.2)  # told to stop: drain what is queued
    if not ready:
        break
    for key, _ in ready:
        if key.data == "stdin":
            if not os.read(0, 1024):
                running = False
                sel.unregister(0)
        elif key.data == "listener":
            conn, _ = srv.accept()
            connections += 1
            sel.register(conn, selectors.EVENT_READ, "conn")
        else:
            try:
                data = key.fileobj.recv(1 << 16)
            except OSError:
                data = b""
            received += len(data)
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
srv.close()
os.unlink(path)
print(json.dumps({"connections": connections, "received": received}), flush=True)
"""


class Impostor:
    """A socket at ``path`` served by a process of uid ``uid``."""

    def __init__(self, path: Path, uid: int = NOBODY) -> None:
        self.child = as_uid(uid, IMPOSTOR, str(path))
        assert self.child.stdout is not None
        assert self.child.stdout.readline() == "listening\n"

    def report(self) -> dict[str, int]:
        out, _ = self.child.communicate(timeout=10)
        report: dict[str, int] = json.loads(out)
        return report

    def kill(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.communicate(timeout=10)


@pytest.fixture
def impostor_dir(short_tmp: Path) -> Iterator[Path]:
    """A sticky world-writable directory (like /tmp) that another uid can bind in."""
    os.chmod(short_tmp, 0o755)
    d = short_tmp / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    yield d


# ------------------------------------------------------ the user runtime directory


@pytest.fixture
def runtime(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$XDG_RUNTIME_DIR`` in a temp dir: the user socket is ``<it>/resd/resd.sock``."""
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    return xdg


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_runtime_dir_is_created_0700(runtime: Path) -> None:
    path = user_socket()
    assert path == runtime / "resd" / "resd.sock"
    bind_listener(path, False, 0o600, runtime_dir=True).close()
    assert mode_of(runtime / "resd") == 0o700
    assert mode_of(path) == 0o600


def test_the_runtime_dir_is_created_0700_whatever_the_umask(runtime: Path) -> None:
    old = os.umask(0o777)
    try:
        bind_listener(user_socket(), False, 0o600, runtime_dir=True).close()
    finally:
        os.umask(old)
    assert mode_of(runtime / "resd") == 0o700


def test_a_shared_socket_mode_makes_the_runtime_dir_enterable(runtime: Path) -> None:
    bind_listener(user_socket(), False, 0o660, runtime_dir=True).close()
    assert mode_of(runtime / "resd") == 0o755


def test_a_runtime_dir_of_mode_0777_is_refused(runtime: Path) -> None:
    (runtime / "resd").mkdir()
    os.chmod(runtime / "resd", 0o777)
    with pytest.raises(StartupError, match=r"has mode 0777; it must be 0700.*chmod 0700"):
        bind_listener(user_socket(), False, 0o600, runtime_dir=True)
    assert not user_socket().exists()


def test_a_group_readable_runtime_dir_is_refused_for_a_private_socket(runtime: Path) -> None:
    (runtime / "resd").mkdir()
    os.chmod(runtime / "resd", 0o750)
    with pytest.raises(StartupError, match="has mode 0750"):
        bind_listener(user_socket(), False, 0o600, runtime_dir=True)
    bind_listener(user_socket(), False, 0o660, runtime_dir=True).close()  # shared: fine


def test_a_runtime_dir_that_is_a_symlink_is_refused(runtime: Path, short_tmp: Path) -> None:
    (short_tmp / "elsewhere").mkdir(mode=0o700)
    (runtime / "resd").symlink_to(short_tmp / "elsewhere")
    with pytest.raises(StartupError, match="is a symlink"):
        bind_listener(user_socket(), False, 0o600, runtime_dir=True)


@needs_root
def test_a_runtime_dir_of_another_user_is_refused(runtime: Path) -> None:
    (runtime / "resd").mkdir(mode=0o700)
    os.chown(runtime / "resd", NOBODY, NOBODY)
    with pytest.raises(
        StartupError, match=r"belongs to uid 65534 \(nobody\), not to you .*intercept"
    ):
        bind_listener(user_socket(), False, 0o600, runtime_dir=True)


@needs_root
@pytest.mark.slow
def test_resd_refuses_a_runtime_dir_another_user_made_and_exits_1(short_tmp: Path) -> None:
    xdg = short_tmp / "xdg"
    (xdg / "resd").mkdir(parents=True)
    os.chmod(xdg, 0o700)
    os.chown(xdg / "resd", NOBODY, NOBODY)
    os.chmod(xdg / "resd", 0o777)
    done = subprocess.run(
        [sys.executable, "-m", "resd", "--state-dir", str(short_tmp / "state"), *DAEMON_ARGS],
        env={**subprocess_env(), "XDG_RUNTIME_DIR": str(xdg)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert "runtime directory" in done.stderr and "belongs to uid 65534" in done.stderr
    assert os.listdir(xdg / "resd") == []


@needs_root
@pytest.mark.slow
def test_the_tmp_runtime_dir_made_by_another_user_is_refused() -> None:
    """The reported case: no XDG_RUNTIME_DIR, and another user ran
    ``mkdir -m 777 /tmp/resd-$UID`` first. resd runs as a spare uid here."""
    uid = 54_321
    exe = python_for(uid)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {k: v for k, v in subprocess_env().items() if k != "XDG_RUNTIME_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], *site])
    if (
        exe is None
        or subprocess.run(
            [exe, "-c", "import resd.__main__"], env=env, user=uid, group=uid, capture_output=True
        ).returncode
    ):
        pytest.skip(f"uid {uid} cannot run resd from this tree")
    target = Path(f"/tmp/resd-{uid}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    os.chmod(target, 0o777)  # made by root here: not the daemon's uid either way
    state = Path(f"/tmp/resd-state-{uid}")
    try:
        done = subprocess.run(
            [exe, "-m", "resd", "--state-dir", str(state), *DAEMON_ARGS],
            env=env,
            user=uid,
            group=uid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 1, done.stderr
        assert f"runtime directory {target} belongs to uid 0 (root)" in done.stderr
        assert os.listdir(target) == []
    finally:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


# ------------------------------------------------------------- an explicit --socket


def test_a_missing_socket_dir_is_created_0700(short_tmp: Path) -> None:
    path = short_tmp / "a" / "b" / "resd.sock"
    bind_listener(path, False, 0o600).close()
    assert mode_of(short_tmp / "a" / "b") == 0o700


def test_a_socket_dir_others_may_write_is_refused(short_tmp: Path) -> None:
    (short_tmp / "open").mkdir()
    os.chmod(short_tmp / "open", 0o777)
    with pytest.raises(StartupError, match=r"open .*mode 0777.*sticky.*chmod go-w"):
        bind_listener(short_tmp / "open" / "resd.sock", False, 0o600)
    os.chmod(short_tmp / "open", 0o775)  # a group may swap it as well
    with pytest.raises(StartupError, match="mode 0775"):
        bind_listener(short_tmp / "open" / "resd.sock", False, 0o600)


def test_an_unsafe_directory_higher_up_is_refused(short_tmp: Path) -> None:
    (short_tmp / "open" / "mine").mkdir(parents=True, mode=0o700)
    os.chmod(short_tmp / "open", 0o777)
    with pytest.raises(StartupError, match=f"{short_tmp / 'open'} \\(on the way"):
        bind_listener(short_tmp / "open" / "mine" / "resd.sock", False, 0o600)


def test_a_sticky_directory_like_tmp_is_accepted(short_tmp: Path) -> None:
    (short_tmp / "sticky").mkdir()
    os.chmod(short_tmp / "sticky", 0o1777)
    bind_listener(short_tmp / "sticky" / "resd.sock", False, 0o600).close()


def test_a_symlink_of_ours_to_a_safe_directory_is_accepted(short_tmp: Path) -> None:
    (short_tmp / "real").mkdir(mode=0o700)
    (short_tmp / "link").symlink_to(short_tmp / "real")
    bind_listener(short_tmp / "link" / "resd.sock", False, 0o600).close()
    assert (short_tmp / "real" / "resd.sock").exists()


def test_a_symlink_to_an_unsafe_directory_is_refused(short_tmp: Path) -> None:
    (short_tmp / "open").mkdir()
    os.chmod(short_tmp / "open", 0o777)
    (short_tmp / "link").symlink_to(short_tmp / "open")
    with pytest.raises(StartupError, match="mode 0777"):
        bind_listener(short_tmp / "link" / "resd.sock", False, 0o600)


@needs_root
def test_a_socket_dir_of_another_user_is_refused(short_tmp: Path) -> None:
    (short_tmp / "theirs").mkdir(mode=0o755)
    os.chown(short_tmp / "theirs", NOBODY, NOBODY)
    with pytest.raises(StartupError, match=r"belongs to uid 65534 \(nobody\)"):
        bind_listener(short_tmp / "theirs" / "resd.sock", False, 0o600)


@needs_root
def test_a_symlink_of_another_user_on_the_way_is_refused(short_tmp: Path) -> None:
    (short_tmp / "real").mkdir(mode=0o700)
    (short_tmp / "link").symlink_to(short_tmp / "real")
    os.lchown(short_tmp / "link", NOBODY, NOBODY)
    with pytest.raises(StartupError, match=r"link .*is a symlink of uid 65534"):
        bind_listener(short_tmp / "link" / "resd.sock", False, 0o600)


@needs_root
def test_a_stale_socket_of_another_user_is_not_taken(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-root daemon leaves another user's socket alone and says so (in a
    sticky directory it could not remove it anyway). Here root's stale socket, and
    resd believing it runs as uid 4242."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_tmp / "resd.sock"))
    stale.close()
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(StartupError, match=r"is a socket of uid 0 \(root\), not yours"):
        bind_listener(short_tmp / "resd.sock", False, 0o600)
    assert (short_tmp / "resd.sock").exists()


def test_system_mode_keeps_a_root_style_0755_directory(short_tmp: Path) -> None:
    bind_listener(short_tmp / "run" / "resd.sock", True, 0o660).close()
    assert mode_of(short_tmp / "run") == 0o755


# ------------------------------------------------------------------- the clients


def test_trusted_daemon_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESD_DAEMON_UID", raising=False)
    me = {0, os.getuid(), os.geteuid()}
    assert trusted_daemon_uids() == me
    assert trusted_daemon_uids(4242) == me | {4242}
    assert trusted_daemon_uids("nobody") == me | {NOBODY}
    monkeypatch.setenv("RESD_DAEMON_UID", "4243")
    assert trusted_daemon_uids() == me | {4243}
    assert trusted_daemon_uids(4242) == me | {4242}, "the argument wins"
    monkeypatch.setenv("RESD_DAEMON_UID", "no-such-user-here")
    with pytest.raises(InvalidError, match="RESD_DAEMON_UID: no user 'no-such-user-here'"):
        trusted_daemon_uids()
    with pytest.raises(InvalidError, match="daemon_uid: -1 is not a uid"):
        trusted_daemon_uids(-1)


@needs_root
def test_a_client_refuses_a_daemon_of_another_uid_before_sending(impostor_dir: Path) -> None:
    path = impostor_dir / "resd.sock"
    impostor = Impostor(path)
    try:
        with pytest.raises(UnavailableError) as refused:
            connect_socket(path)
        message = refused.value.message
        assert f"refusing the resd at {path}: it runs as uid {NOBODY}" in message
        assert f"RESD_DAEMON_UID={NOBODY}" in message
        assert refused.value.details["refused"] == [{"socket": str(path), "uid": NOBODY}]
        with pytest.raises(UnavailableError, match="another user may be impersonating resd"):
            Client(path, reconnect=0)
        cli = subprocess.run(
            [sys.executable, "-m", "resctl", "status", "--socket", str(path)],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 12, cli.stderr
        assert f"it runs as uid {NOBODY}" in cli.stderr + cli.stdout
    finally:
        report = impostor.report()
    assert report == {"connections": 3, "received": 0}, "nothing was sent to it"


@needs_root
async def test_the_async_clients_refuse_it_too(impostor_dir: Path) -> None:
    import asyncio

    import resd_client.asyncio
    import resd_client.trio

    path = impostor_dir / "resd.sock"
    impostor = Impostor(path)
    try:
        with pytest.raises(UnavailableError, match=f"it runs as uid {NOBODY}"):
            async with resd_client.trio.Client(path, reconnect=0):
                pass

        async def with_asyncio() -> None:
            async with resd_client.asyncio.Client(path, reconnect=0):
                pass

        with pytest.raises(UnavailableError, match=f"it runs as uid {NOBODY}"):
            await trio.to_thread.run_sync(asyncio.run, with_asyncio())
    finally:
        report = impostor.report()
    assert report == {"connections": 2, "received": 0}


@needs_root
def test_a_daemon_of_the_expected_uid_is_accepted(
    impostor_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = impostor_dir / "resd.sock"
    impostor = Impostor(path)
    try:
        sock, where = connect_socket(path, daemon_uid="nobody")
        sock.sendall(b"x")
        sock.close()
        monkeypatch.setenv("RESD_DAEMON_UID", str(NOBODY))
        connect_socket(path)[0].close()
    finally:
        report = impostor.report()
    assert where == path and report == {"connections": 2, "received": 1}


@needs_root
def test_a_refused_candidate_is_skipped_for_the_next_one(
    impostor_dir: Path,
    daemons: Daemons,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = impostor_dir / "resd.sock"
    impostor = Impostor(fake)
    real = daemons.make().start()
    monkeypatch.setattr(
        "resd_client._sync.socket_candidates", lambda _path: [fake, Path(real.socket)]
    )
    try:
        with caplog.at_level(logging.WARNING, logger="resd_client"):
            sock, where = connect_socket()
        sock.close()
        assert where == Path(real.socket)
        assert f"refused the resd at {fake}: it runs as uid {NOBODY}" in caplog.text
    finally:
        assert impostor.report()["received"] == 0
    assert real.stop() == 0


@needs_root
@pytest.mark.slow
def test_reconnecting_skips_an_impostor_and_resumes_with_resd(
    impostor_dir: Path, daemons: Daemons
) -> None:
    """resd restarts; meanwhile another user binds its socket path (possible in a
    sticky directory once resd removed its socket). The client's attempts count
    as failed, it sends the impostor nothing, and it resumes once resd is back."""
    proc = daemons.make()
    proc.socket = str(impostor_dir / "resd.sock")
    proc.start()
    pool = PoolCreate(name="p", resources={"cpu": ResourceSpec(capacity=4000)}, max_per_tenant=0)
    with Client(proc.socket, reconnect=30) as client:
        client.call("pool.create", pool)
        lease = client.reserve("p", cpu=1)
        assert lease.token is not None
        assert proc.stop() == 0
        impostor = Impostor(Path(proc.socket))
        try:
            time.sleep(2.0)  # several reconnection attempts, all refused
        finally:
            report = impostor.report()
        # at least two (more on a quiet machine: the backoff starts at 0.05 s and doubles)
        assert report["connections"] >= 2 and report["received"] == 0, report
        proc.start()
        assert [r.id for r in client.list()] == [lease.id]  # waits for the resumption
        events = list(client.events(timeout=0.5))
        assert [type(e) for e in events] == [Disconnected, Reconnected]
        lease.release()
    assert proc.stop() == 0
