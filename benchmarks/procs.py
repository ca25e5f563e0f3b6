"""Processes the benchmarks start: real ``resd`` daemons, the echo server, and a raw
pipelining connection for bulk loading. Everything runs from the source tree."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from resd_client.protocol import PROTOCOL_VERSION, FrameDecoder, encode_frame

ROOT = Path(__file__).resolve().parent.parent


def source_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the source tree importable, no stray RESD_* config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESD_")}
    paths = [str(ROOT), str(ROOT / "client"), str(ROOT / "cli")]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["XDG_CONFIG_HOME"] = "/nonexistent-resd-bench-config"
    env.update(extra or {})
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_connectable(path: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Wait until a Unix socket at ``path`` accepts connections (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.005)
        finally:
            s.close()
    raise RuntimeError(f"{what} did not listen on {path} within {timeout:g}s")


class Daemon:
    """A real ``resd`` process: ``python -m resd --socket S --state-dir D --fsync F``.

    Logs go to ``log`` at the default level (info, JSON), as a production daemon's would.
    """

    def __init__(
        self,
        workdir: Path,
        name: str,
        fsync: str,
        *,
        env: Mapping[str, str] | None = None,
        module: str = "resd",
    ) -> None:
        self.socket = str(workdir / f"{name}.sock")
        self.state_dir = str(workdir / f"{name}-state")
        self.log = workdir / f"{name}.log"
        self.fsync = fsync
        self.env = dict(env or {})
        self.module = module  # benchmarks.profiled_resd wraps resd in a profiler
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait until the socket answers ``hello``; returns the seconds it took."""
        started = time.monotonic()
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                self.module,
                "--socket",
                self.socket,
                "--state-dir",
                self.state_dir,
                "--fsync",
                self.fsync,
                "--no-host-pool",
                "--log-format",
                "json",
            ],
            env=source_env(self.env),
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = started + timeout
        while True:
            wait_connectable(self.socket, self.proc, deadline - time.monotonic(), "resd")
            try:
                with RawConn(self.socket):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        return time.monotonic() - started

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """Resident set size of the daemon in bytes (from /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 120.0) -> float:
        """SIGTERM (clean stop: snapshot, flush); returns the seconds it took."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close()
        if code != 0:
            raise RuntimeError(f"resd exited {code} on SIGTERM; see {self.log}")
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL: no snapshot, the journal is replayed on the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class EchoServer:
    """``python -m benchmarks.echo SOCKET``: the transport limit (``writer_task``: the
    reference design whose replies go through a writer task)."""

    def __init__(self, workdir: Path, *, writer_task: bool = False) -> None:
        self.writer_task = writer_task
        self.socket = str(workdir / ("echo-writer.sock" if writer_task else "echo.sock"))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EchoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.echo", self.socket]
            + (["--writer-task"] if self.writer_task else []),
            env=source_env(),
            stdout=subprocess.DEVNULL,
        )
        wait_connectable(self.socket, self.proc, 30, "echo server")
        return self

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class RequestFailed(Exception):
    def __init__(self, op: str, reply: dict[str, Any]) -> None:
        super().__init__(f"{op} failed: {reply.get('error')}")
        self.reply = reply


class RawConn:
    """A blocking socket speaking the wire protocol directly, with pipelining: the fastest
    way to load a daemon with many requests (no reader thread, no typed decoding)."""

    #: requests in flight at once; at most the daemon's max_pending (64) so it never stalls
    WINDOW = 64

    def __init__(self, path: str, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = FrameDecoder(max_frame=256 << 20)
        self.ids = itertools.count(1)
        self.pushes: list[dict[str, Any]] = []
        if hello:
            self.call("hello", {"version": PROTOCOL_VERSION, "client": "bench"})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _frames(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.decoder.frames()
            data = self.sock.recv(1 << 18)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self.decoder.feed(data)

    def send(self, op: str, args: Any) -> int:
        rid = next(self.ids)
        frame = {"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": args}
        self.sock.sendall(encode_frame(frame))
        return rid

    def call(self, op: str, args: Any) -> Any:
        """One request; returns the result map or raises RequestFailed."""
        (reply,) = self.many([(op, args)])
        if not reply.get("ok"):
            raise RequestFailed(op, reply)
        return reply["result"]

    def many(self, requests: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Send requests pipelined, ``WINDOW`` in flight; returns the replies in order."""
        replies: dict[int, dict[str, Any]] = {}
        order: list[int] = []
        frames = self._frames()
        in_flight = 0

        def receive_one() -> None:
            nonlocal in_flight
            for frame in frames:
                if "event" in frame:
                    self.pushes.append(frame)
                    continue
                replies[frame["id"]] = frame
                in_flight -= 1
                return

        batch: list[bytes] = []
        for op, args in requests:
            rid = next(self.ids)
            order.append(rid)
            batch.append(encode_frame({"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": args}))
            if in_flight + len(batch) >= self.WINDOW:
                self.sock.sendall(b"".join(batch))
                in_flight += len(batch)
                batch.clear()
                while in_flight > self.WINDOW // 2:
                    receive_one()
        if batch:
            self.sock.sendall(b"".join(batch))
            in_flight += len(batch)
        while in_flight:
            receive_one()
        return [replies.pop(rid) for rid in order]

    def check_all(self, requests: Iterable[tuple[str, Any]]) -> list[Any]:
        """``many`` that raises on the first error reply; returns the results."""
        results = []
        for reply in self.many(requests):
            if not reply.get("ok"):
                raise RequestFailed("request", reply)
            results.append(reply["result"])
        return results

    def load(self, requests: Iterable[tuple[str, Any]], chunk: int = 2000) -> int:
        """Like ``check_all`` for bulk loading: consumes ``requests`` lazily, in chunks,
        keeping no results (this process stays small, so forking clients later stays
        cheap); returns how many were sent."""
        done = 0
        batch: list[tuple[str, Any]] = []
        for request in requests:
            batch.append(request)
            if len(batch) == chunk:
                self.check_all(batch)
                done += len(batch)
                batch = []
        if batch:
            self.check_all(batch)
            done += len(batch)
        return done
