"""Fixtures: an in-process daemon on trio's clock, and a real ``resd`` subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from resd import journal
from resd.config import Config
from resd.daemon import Daemon
from tests.wire import WireClient

# Every append in the tests checks that its entry would replay (off in production).
journal.CHECK_REPLAY = True

# A suite started in the background by a non-interactive shell (``cmd &``, nohup)
# inherits SIGINT, SIGQUIT and SIGHUP ignored, and so would every resctl and resd it
# starts (ignored signals survive exec): the tests that signal them would hang.
for _sig in (signal.SIGHUP, signal.SIGQUIT):
    if signal.getsignal(_sig) == signal.SIG_IGN:
        signal.signal(_sig, signal.SIG_DFL)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
BASE_WALL = 1_800_000_000.0


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: the source tree importable, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESD_")}
    paths = [str(ROOT), str(ROOT / "client"), str(ROOT / "cli")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["NO_COLOR"] = "1"
    env["XDG_CONFIG_HOME"] = "/nonexistent-resd-test-config"
    return env


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: Unix socket paths are limited to 107 bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="resd-") as d:
        yield Path(d)


def make_config(tmp: Path, **changes: object) -> Config:
    base = Config(
        socket=str(tmp / "resd.sock"),
        state_dir=str(tmp / "state"),
        fsync="never",
        host_pool=False,
        log_level="warning",
        gpu_sample_interval=0,  # GPU tests turn the reconciler on with a scripted host
        cgroup_root="off",  # cgroup tests give a directory of their own
    )
    return attrs.evolve(base, **changes)  # type: ignore[arg-type]


@attrs.define
class InProcess:
    daemon: Daemon
    socket: str
    nursery: trio.Nursery

    async def restart(self, **changes: object) -> InProcess:
        await WireClient.close_all()
        self.daemon.request_stop()
        await self.daemon.stopped.wait()
        cfg = attrs.evolve(self.daemon.config, **changes)  # type: ignore[arg-type]
        daemon = await self.nursery.start(
            Daemon(cfg, wall=self.daemon.wall, handle_signals=False).run
        )
        self.daemon = daemon
        return self


@pytest.fixture
async def inproc(short_tmp: Path) -> AsyncIterator[InProcess]:
    """A daemon in this trio run; its wall clock follows trio's clock."""
    cfg = make_config(short_tmp)
    async with trio.open_nursery() as nursery:
        daemon = Daemon(cfg, wall=lambda: BASE_WALL + trio.current_time(), handle_signals=False)
        await nursery.start(daemon.run)
        handle = InProcess(daemon, cfg.socket or "", nursery)
        yield handle
        await WireClient.close_all()
        handle.daemon.request_stop()


@attrs.define
class Proc:
    """A real resd process."""

    socket: str
    state_dir: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    env: dict[str, str] = attrs.Factory(dict)

    def start(self, timeout: float = 15.0) -> Proc:
        assert self.log is not None
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "resd",
                    "--socket",
                    self.socket,
                    "--state-dir",
                    self.state_dir,
                    *self.args,
                ],
                env={**subprocess_env(), **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"resd exited with {self.proc.returncode}: {self.log.read_text()}"
                )
            if self._ready(offset):
                return self
            time.sleep(0.02)
        raise AssertionError(f"resd did not become ready: {self.log.read_text()}")

    def _ready(self, offset: int) -> bool:
        """This run (the log from ``offset`` on) has logged ``ready``."""
        assert self.log is not None
        return b'"event": "ready"' in self.log.read_bytes()[offset:]

    def log_text(self) -> str:
        assert self.log is not None
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def resd_proc(short_tmp: Path) -> Iterator[Proc]:
    """A real ``resd`` subprocess (fsync always, no host pool); stopped with SIGTERM."""
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=["--no-host-pool", "--log-level", "info", "--log-format", "json"],
        log=short_tmp / "resd.log",
    )
    proc.start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        code = proc.stop()
        assert code == 0, (
            f"resd exited {code} on SIGTERM: {proc.log.read_text() if proc.log else ''}"
        )


def resctl(
    proc: Proc, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``resctl`` against ``proc``."""
    result = subprocess.run(
        [sys.executable, "-m", "resctl", *args, "--socket", proc.socket],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
        input=input,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"resctl {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def run_argv(proc: Proc, options: list[str], cmd: list[str]) -> list[str]:
    """``resctl run --socket S OPTIONS -- CMD`` against ``proc`` (the conftest
    ``resctl`` helper puts ``--socket`` last, where CMD would take it)."""
    return [sys.executable, "-m", "resctl", "run", "--socket", proc.socket, *options, "--", *cmd]


DAEMON_ARGS = ["--no-host-pool", "--fsync", "always", "--log-level", "info", "--log-format", "json"]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class Daemons:
    """Makes real resd processes in one temp dir; whatever still runs at teardown is killed."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def make(
        self,
        name: str = "a",
        *,
        state: str | None = None,
        sock: str | None = None,
        config: str = "",
    ) -> Proc:
        args = list(DAEMON_ARGS)
        if config:
            path = self.tmp / f"{name}.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        proc = Proc(
            socket=str(self.tmp / f"{sock or name}.sock"),
            state_dir=str(self.tmp / f"state-{state or name}"),
            args=args,
            log=self.tmp / f"{name}.log",
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait(10)


@pytest.fixture
def daemons(short_tmp: Path) -> Iterator[Daemons]:
    d = Daemons(short_tmp)
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """``resctl run`` processes started in the background; killed if a test fails."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)
