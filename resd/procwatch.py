"""Leases that follow processes (SPEC §3 ``pid`` binding).

A process is named by its pid and its start time, so a pid the kernel hands to a
new process never keeps a dead lease alive. Where the kernel has pidfds (Linux
5.3+) each watched process gets one and the watcher sleeps until it turns
readable, which it does the moment the process exits: no polling, and the lease
ends within one actor turn of the death. Elsewhere the watcher polls psutil every
``poll_interval`` seconds. Either way it tells the pool actor ``ProcessExited``,
which checks the reservation is still bound to that very process.
"""

from __future__ import annotations

import math
import os
from typing import Any

import psutil
import structlog
import trio

from resd.messages import ProcessExited, Unwatch, Watch
from resd.reconcile import ProcInfo

log = structlog.get_logger("resd.procwatch")


def process_start(pid: int) -> float | None:
    """Start time of a live process ``pid`` (rounded to ms); None if it is gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(float(proc.create_time()), 3)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def process_uid(pid: int) -> int | None:
    """Real uid of process ``pid``; None if it is gone."""
    try:
        return int(psutil.Process(pid).uids().real)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def process_table() -> dict[int, ProcInfo]:
    """Every process the kernel shows: parent, start time, uid, CPU seconds, RSS
    (for GPU attribution and ``resctl top``). Processes that vanish or deny a field
    midway are skipped or get zeros; never raises for one process."""
    table: dict[int, ProcInfo] = {}
    fields = ["pid", "ppid", "create_time", "uids", "cpu_times", "memory_info"]
    for proc in psutil.process_iter(fields, ad_value=None):
        info = proc.info
        if info["create_time"] is None or info["ppid"] is None:
            continue
        cpu = info["cpu_times"]
        memory = info["memory_info"]
        table[info["pid"]] = ProcInfo(
            pid=info["pid"],
            ppid=info["ppid"],
            start=round(float(info["create_time"]), 3),
            uid=-1 if info["uids"] is None else int(info["uids"].real),
            cpu=0.0 if cpu is None else float(cpu.user + cpu.system),
            rss=0 if memory is None else int(memory.rss),
        )
    return table


def signal_processes(procs: tuple[ProcInfo, ...], signum: int, owner_uid: int) -> list[int]:
    """Send ``signum`` to each of ``procs`` that is still the same process (pid and
    start time) and belongs to ``owner_uid`` (any, for a root-owned lease); never to
    resd itself. Returns the pids signalled."""
    sent = []
    for p in procs:
        if p.pid in (os.getpid(), os.getppid()) or (owner_uid != 0 and p.uid != owner_uid):
            continue
        if process_start(p.pid) != p.start:
            continue
        try:
            os.kill(p.pid, signum)
        except (ProcessLookupError, PermissionError) as exc:
            log.warning("signal_failed", pid=p.pid, signal=signum, error=str(exc))
            continue
        sent.append(p.pid)
    return sent


def has_pidfd() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


class ProcessWatcher:
    def __init__(self, poll_interval: float = 0.05, use_pidfd: bool | None = None) -> None:
        self.pool_actor: Any = None
        self.poll_interval = poll_interval
        self.use_pidfd = has_pidfd() if use_pidfd is None else use_pidfd
        self._send, self._recv = trio.open_memory_channel[Watch | Unwatch](math.inf)
        self._scopes: dict[str, trio.CancelScope] = {}
        self._polled: dict[str, Watch] = {}
        self._wake = trio.Event()

    def tell(self, message: Watch | Unwatch) -> None:
        try:
            self._send.send_nowait(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # shutting down

    def __len__(self) -> int:
        return len(self._scopes) + len(self._polled)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.debug("watching", method="pidfd" if self.use_pidfd else "poll")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll_loop)
            task_status.started()
            async for message in self._recv:
                if isinstance(message, Watch):
                    self._unwatch(message.id)
                    if self.use_pidfd:
                        scope = self._scopes[message.id] = trio.CancelScope()
                        nursery.start_soon(self._watch_pidfd, message, scope)
                    else:
                        self._poll(message)
                else:
                    self._unwatch(message.id)

    def _unwatch(self, rid: str) -> None:
        scope = self._scopes.pop(rid, None)
        if scope is not None:
            scope.cancel()
        self._polled.pop(rid, None)

    def _exited(self, w: Watch) -> None:
        log.debug("process_exited", reservation=w.id, pid=w.pid)
        self.pool_actor.tell(ProcessExited(w.id, w.pid, w.start))

    async def _watch_pidfd(self, w: Watch, scope: trio.CancelScope) -> None:
        try:
            fd = os.pidfd_open(w.pid)
        except ProcessLookupError:
            fd = -1
        except OSError as exc:  # pidfds refused for this process: poll it instead
            log.warning("pidfd_failed", pid=w.pid, error=str(exc))
            self._scopes.pop(w.id, None)
            self._poll(w)
            return
        try:
            # Checked after opening: if the pid was reused before, the fd names the
            # new process and its start time differs.
            if fd >= 0 and process_start(w.pid) == w.start:
                with scope:
                    await trio.lowlevel.wait_readable(fd)
            if not scope.cancel_called:
                self._scopes.pop(w.id, None)
                self._exited(w)
        finally:
            if fd >= 0:
                os.close(fd)

    def _poll(self, w: Watch) -> None:
        self._polled[w.id] = w
        self._wake.set()

    async def _poll_loop(self) -> None:
        while True:
            if not self._polled:
                self._wake = trio.Event()
                await self._wake.wait()
            await trio.sleep(self.poll_interval)
            for rid, w in list(self._polled.items()):
                if process_start(w.pid) != w.start:
                    del self._polled[rid]
                    self._exited(w)
