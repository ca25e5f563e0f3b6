"""``resctl.spawn``: CMD is exec'd through a single-threaded helper, not a preexec_fn.

These start real processes but no daemon (the Supervisor gets a stand-in client);
``tests/test_run.py`` covers ``resctl run`` end to end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import resctl.run
from resctl import spawn
from resctl.run import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, Supervisor
from resd_client.errors import UnavailableError
from tests.conftest import subprocess_env, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def status_lines(pid: int, *keys: str) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines) if k in keys}


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test started; killed and reaped if it fails half-way."""
    procs: list[subprocess.Popen[Any]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


# ------------------------------------------------------------------ no preexec_fn


def test_no_preexec_fn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python code in the forked child of threaded resctl could deadlock: none runs."""
    calls: list[dict[str, Any]] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording)
    child = spawn.start(["true"], subprocess_env())
    assert child.wait(10) == 0
    assert len(calls) == 1
    assert calls[0].get("preexec_fn") is None
    assert calls[0]["process_group"] == 0
    source = Path(resctl.run.__file__).read_text() + Path(spawn.__file__).read_text()
    assert "preexec_fn=" not in source
    assert not hasattr(resctl.run, "make_preexec")


# ------------------------------------------------------------------ the child


def test_cmd_is_the_child_in_its_own_group(children: list[subprocess.Popen[Any]]) -> None:
    child = spawn.start(["sleep", "30"], subprocess_env())
    children.append(child)
    # exec kept the helper's pid: the Popen's pid is CMD's, in a group of its own
    assert Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
    assert os.getpgid(child.pid) == child.pid != os.getpgrp()
    assert os.getsid(child.pid) == os.getsid(0)
    assert status_lines(child.pid, "PPid")["PPid"] == str(os.getpid())
    child.kill()
    assert child.wait(10) == -signal.SIGKILL


def probe(out: Path) -> str:
    """A shell script writing its environment, signal masks and descriptors to ``out``."""
    return (
        f"cat /proc/self/environ > {out}/env;"
        f" grep -E '^Sig(Ign|Blk)' /proc/self/status > {out}/sig; ls /proc/self/fd > {out}/fd"
    )


def test_cmd_starts_as_with_a_plain_popen(tmp_path: Path) -> None:
    """The helper's interpreter leaves no trace: same environment (no PEP 538 LC_CTYPE),
    same ignored and blocked signals (it ignores SIGPIPE), no stray descriptors."""
    master, slave = os.openpty()  # a terminal that is not ours: tcsetpgrp fails, fd closed
    try:
        for lc_ctype in (None, "C"):
            env = {"PATH": os.environ["PATH"], "LANG": "C", "ONE": "1"}
            if lc_ctype is not None:
                env["LC_CTYPE"] = lc_ctype
            plain, helped = tmp_path / "plain", tmp_path / "helped"
            for d in (plain, helped):
                d.mkdir(exist_ok=True)
            subprocess.run(["sh", "-c", probe(plain)], env=env, process_group=0, check=True)
            child = spawn.start(["sh", "-c", probe(helped)], env, tty=slave)
            assert child.wait(10) == 0
            for name in ("env", "sig", "fd"):
                assert (helped / name).read_text() == (plain / name).read_text(), name
            environ = (helped / "env").read_bytes().split(b"\0")
            assert (b"LC_CTYPE=C" in environ) == (lc_ctype == "C")
            assert not any(e.startswith(b"LC_CTYPE=C.") for e in environ)
    finally:
        os.close(master)
        os.close(slave)


def test_cmd_gets_the_terminal(tmp_path: Path) -> None:
    """Given our controlling terminal, the helper makes CMD's group its foreground."""
    master, slave = os.openpty()
    out = tmp_path / "out"
    # A throwaway parent in a new session with the pty as its controlling terminal.
    parent = (
        "import os, sys; from resctl import spawn\n"
        "tty = os.open('/dev/tty', os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)\n"
        "child = spawn.start(['sh', '-c', sys.argv[1]], dict(os.environ), tty=tty)\n"
        "sys.exit(child.wait())\n"
    )
    # /proc/PID/stat fields 5 and 8: the process group and the terminal's foreground group
    script = f'set -- $(cat /proc/$$/stat); echo "$$ $5 $8" > {out}'

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        p = subprocess.run(
            [sys.executable, "-c", parent, script],
            env=subprocess_env(),
            stdin=slave,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=take_terminal,  # the test's own throwaway parent, single-threaded
            timeout=15,
        )
    finally:
        os.close(master)
        os.close(slave)
    assert p.returncode == 0
    pid, pgrp, foreground = out.read_text().split()
    assert pid == pgrp == foreground


def test_parent_death_signal(tmp_path: Path, children: list[subprocess.Popen[Any]]) -> None:
    """SIGKILL of a threaded parent (as resctl is) kills CMD: PR_SET_PDEATHSIG, no watchdog."""
    parent = (
        "import os, sys, threading, time; from resctl import spawn\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "child = spawn.start(['sleep', '60'], dict(os.environ))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", parent], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    children.append(p)
    assert p.stdout is not None
    cmd = int(p.stdout.readline())
    try:
        assert alive(cmd)
        p.kill()
        p.wait(10)
        wait_for(lambda: not alive(cmd), 5, "CMD to die with its parent")
    finally:
        p.stdout.close()
        if alive(cmd):
            os.kill(cmd, signal.SIGKILL)


def test_helper_dies_when_its_parent_already_has() -> None:
    """resctl gone before the prctl took effect (the helper's parent is not the pid it
    was given): the helper SIGKILLs itself instead of exec'ing CMD."""
    read_end, write_end = os.pipe()
    try:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", spawn.HELPER, str(write_end), "1", "-", "", "true"],
            pass_fds=(write_end,),
        )
        assert helper.wait(10) == -signal.SIGKILL
    finally:
        os.close(read_end)
        os.close(write_end)


# ------------------------------------------------------------------ exec failures


def not_executable(tmp_path: Path) -> dict[str, tuple[str, int]]:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\ntrue\n")
    script.chmod(0o644)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\0\1\2 no known format\n")
    garbage.chmod(0o755)
    return {
        "mode 644": (str(script), errno.EACCES),
        "a directory": (str(tmp_path), errno.EACCES),
        "no format": (str(garbage), errno.ENOEXEC),
    }


def test_exec_failures_raise_like_popen(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        spawn.start(["resctl-no-such-command"], subprocess_env())
    assert missing.value.errno == errno.ENOENT
    assert missing.value.filename == "resctl-no-such-command"
    with pytest.raises(FileNotFoundError):
        spawn.start([str(tmp_path / "nope")], subprocess_env())
    for what, (path, code) in not_executable(tmp_path).items():
        with pytest.raises(OSError) as failed:
            spawn.start([path], subprocess_env())
        assert failed.value.errno == code, what
        with pytest.raises(OSError) as popen:
            subprocess.Popen([path])
        assert popen.value.errno == code, what


class StandIn:
    """The Supervisor's client and lease: no pushes until ``done``, release noted."""

    def __init__(self) -> None:
        self.id = "r-test"
        self.closed = False
        self.released = 0
        self.registered: tuple[str, int] | None = None
        self.done = threading.Event()

    def events(self) -> Iterator[object]:
        self.done.wait(30)
        return iter(())

    def release(self, *args: Any, **kwargs: Any) -> None:
        self.released += 1

    def register(self, reservation_id: str, pid: int, *, confine: bool = False) -> Any:
        """CMD's pid, for GPU attribution and its cgroup (SPEC §10)."""
        assert confine, "resctl run asks resd to confine CMD"
        self.registered = (reservation_id, pid)
        return types.SimpleNamespace(enforcement="none", cgroup="")


def supervise(cmd: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, Supervisor, list[str]]:
    monkeypatch.setattr(resctl.run, "controlling_tty", lambda: None)  # leave pytest's alone
    stand_in, warnings = StandIn(), list[str]()
    supervisor = Supervisor(
        stand_in,  # type: ignore[arg-type]
        stand_in,  # type: ignore[arg-type]
        cmd,
        subprocess_env(),
        kill_after=1.0,
        warn=warnings.append,
    )
    try:
        code = supervisor.run()
    finally:
        stand_in.done.set()
    assert stand_in.released == 1
    return code, supervisor, warnings


def test_supervisor_not_found_and_not_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, supervisor, warnings = supervise(["resctl-no-such-command"], monkeypatch)
    assert code == EXIT_NOT_FOUND
    assert supervisor.child is None
    assert warnings == ["resctl-no-such-command: command not found; released r-test"]
    for what, (path, _) in not_executable(tmp_path).items():
        code, _, warnings = supervise([path], monkeypatch)
        assert code == EXIT_NOT_EXECUTABLE, what
        assert len(warnings) == 1 and f"{path}: cannot execute: " in warnings[0], what
    assert "not an executable format" in warnings[0]


def test_supervisor_child_is_cmd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    script = f'set -- $(cat /proc/$$/stat); echo "$$ $5" > {out}; exit 7'
    code, supervisor, warnings = supervise(["sh", "-c", script], monkeypatch)
    assert code == 7 and warnings == []
    assert supervisor.child is not None
    pid, pgrp = out.read_text().split()
    assert int(pid) == int(pgrp) == supervisor.child.pid


# ------------------------------------------------------------------ the gate


def test_cmd_is_registered_at_the_gate_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """resd confines CMD before its first instruction: registration happens while the
    helper waits at its gate, so the registered process is still the helper."""
    out = tmp_path / "out"
    ran_before: list[bool] = []
    register = StandIn.register

    def spy(self: StandIn, reservation_id: str, pid: int, *, confine: bool = False) -> Any:
        ran_before.append(out.exists())
        return register(self, reservation_id, pid, confine=confine)

    monkeypatch.setattr(StandIn, "register", spy)
    code, supervisor, warnings = supervise(["sh", "-c", f"echo $$ > {out}"], monkeypatch)
    assert code == 0 and warnings == []
    stand_in = supervisor.client
    assert supervisor.child is not None
    assert (
        stand_in.registered == ("r-test", supervisor.child.pid) == ("r-test", int(out.read_text()))
    )
    assert ran_before == [False], "CMD ran before it was registered"


def test_a_failing_before_exec_never_runs_cmd(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    seen: list[int] = []

    def refuse(pid: int) -> None:
        seen.append(pid)
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        spawn.start(["sh", "-c", f"touch {marker}"], subprocess_env(), before_exec=refuse)
    assert len(seen) == 1 and not alive(seen[0]), "the helper exited at its closed gate"
    assert not marker.exists()


def test_a_refused_registration_warns_and_cmd_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: StandIn, reservation_id: str, pid: int, *, confine: bool = False) -> None:
        raise UnavailableError("journal full")

    monkeypatch.setattr(StandIn, "register", refuse)
    out = tmp_path / "out"
    code, _, warnings = supervise(["sh", "-c", f"echo ran > {out}"], monkeypatch)
    assert code == 0 and out.read_text() == "ran\n"
    assert len(warnings) == 1 and "runs without cgroup limits" in warnings[0], warnings
