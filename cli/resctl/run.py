"""``resctl run [reserve options] -- CMD [ARGS]...``: run a command on reserved resources.

1. Reserve with binding ``session``: the reservation lives exactly as long as this
   process's connection to resd, so if resctl dies (even by SIGKILL) the daemon
   releases it at once.
2. Start CMD (stdio inherited) with the lease's environment (``CUDA_VISIBLE_DEVICES``,
   ``RESD_RESERVATION_ID``, ``RESD_GPUS``, … — ``resd_client.env``) added to ours,
   in its own process group, with a parent-death signal (``PR_SET_PDEATHSIG`` =
   SIGKILL), exec'd through the single-threaded helper of ``resctl.spawn`` so that
   no Python code runs between fork and exec in this threaded process. A small
   watchdog process SIGKILLs CMD's whole process group if resctl disappears without
   saying goodbye, so nothing keeps running on resources that are no longer reserved.
   When resctl owns the terminal's foreground, CMD's group is given the terminal
   (like a shell's foreground job) and it is taken back after. CMD's pid is
   registered with the lease (``register``, in the background), so that resd counts
   the GPU memory of CMD and its descendants against the reservation (SPEC §10).
3. Supervise, on the main thread only: a ``select`` on a wake-up pipe that the
   signal module (``signal.set_wakeup_fd``), the child-waiter thread and the
   push-reader thread write to; each thread hands its news over through a
   ``queue.SimpleQueue``. Signals SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and
   SIGUSR2 received by resctl are forwarded to CMD's process group.
4. If the reservation ends while CMD runs — preempted (with or without a grace
   period), expired, released by someone else, or gone with resd (the client gave
   up reconnecting) — CMD's group gets SIGTERM and, if still alive, SIGKILL at the
   preemption deadline, or ``kill_after`` seconds later (the pool's grace, or
   ``DEFAULT_KILL_AFTER`` when the pool has none). While resd restarts, CMD keeps
   running: the client reconnects and re-attaches the lease by itself, and resctl
   only says so on stderr (or ends CMD as above if the lease ended meanwhile).
   A reclaim notice (``--reclaimable``) also sends SIGTERM at once and SIGKILL at
   its deadline, but CMD exiting before the deadline gives the resources back: the
   lease ends ``released``, never ``preempted``, and resctl exits with CMD's status.
5. When CMD exits, anything left in its process group gets SIGTERM (SIGKILL after
   ``LEFTOVER_GRACE``), the reservation is released, and resctl exits with CMD's
   status (128+N for signal N) — or with 10 (preempted), 9 (expired) or 12 (resd
   went away) when the reservation ended first. CMD not found: 127; found but not
   executable: 126; in both cases the reservation is released.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Final

import typer
from typer.core import TyperCommand

from resctl import spawn
from resctl.options import (
    ContiguousOpt,
    CpuOpt,
    DeadlineOpt,
    GpuModelOpt,
    GpuOpt,
    JsonOpt,
    MemberOpt,
    MemoryOpt,
    NoWaitOpt,
    NumaOpt,
    PartOpt,
    PlacementOpt,
    ReservePoolOpt,
    ResOpt,
    SelectorOpt,
    SocketOpt,
    VramOpt,
    WaitTimeoutOpt,
    build,
    require_choice,
    reserve_fields_of,
)
from resctl.render import json_text, reservation_lines, waiting_line
from resctl.reservations import LabelOpt, ReclaimableOpt, TenantOpt, TtlOpt, _ttl, wait_fields
from resctl.session import CLIENT_NAME, Output, guard, socket_of
from resd_client import Client, ConnectionLost, Disconnected, Lease, Reconnected
from resd_client.env import GPU_IDS, GpuIds
from resd_client.errors import (
    InvalidError,
    PreemptedError,
    ResdError,
    TimeoutError_,
    UnavailableError,
)
from resd_client.protocol import (
    ExpiredEvent,
    PoolInfo,
    PoolName,
    PreemptedEvent,
    ReclaimEvent,
    ReleasedEvent,
    ReservationInfo,
    Reserve,
)

log = logging.getLogger("resctl")

EXIT_NOT_FOUND: Final = 127
EXIT_NOT_EXECUTABLE: Final = 126
#: Seconds between SIGTERM and SIGKILL when the reservation ends with no deadline
#: (preemption without grace, expiry, lost connection) and the pool has no grace.
DEFAULT_KILL_AFTER: Final = 5.0
#: Seconds processes left in CMD's group after CMD exits get between SIGTERM and SIGKILL.
LEFTOVER_GRACE: Final = 2.0
FORWARDED: Final = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
ARGV_KEY: Final = "resctl.run.argv"

#: The watchdog: reads CMD's process group id, then waits for EOF on its pipe; EOF
#: without resctl's goodbye byte means resctl died, so CMD's group is SIGKILLed.
WATCHDOG: Final = """
import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP,
          signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
    signal.signal(s, signal.SIG_IGN)
fd, data = int(sys.argv[1]), b""
while True:
    try:
        chunk = os.read(fd, 64)
    except InterruptedError:
        continue
    if not chunk:
        break
    data += chunk
head, _, rest = data.partition(b"\\n")
if head.isdigit() and b"done" not in rest:
    try:
        os.killpg(int(head), signal.SIGKILL)
    except OSError:
        pass
"""


class RunCommand(TyperCommand):
    """Keeps the raw arguments, so that ``run`` can insist on ``--`` before CMD."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # a click Context
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)


def command_after_dashdash(argv: Sequence[str], cmd: Sequence[str]) -> list[str]:
    """``cmd`` if it came after a ``--`` in ``argv``; raises InvalidError otherwise."""
    cmd = list(cmd)
    n = len(cmd)
    if not cmd:
        raise InvalidError(
            "give the command to run after --, e.g. resctl run --gpu 1 -- python train.py",
            {"field": "cmd"},
        )
    if len(argv) <= n or list(argv[-n:]) != cmd or argv[-n - 1] != "--":
        raise InvalidError(
            f"put -- before the command to run: resctl run [options] -- {' '.join(cmd)}",
            {"field": "cmd"},
        )
    return cmd


def exit_status(returncode: int) -> int:
    """A shell's exit status for ``Popen.returncode``: -N (killed by N) → 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------ the child


def controlling_tty() -> int | None:
    """A descriptor of our controlling terminal, or None when we have none."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.tcgetpgrp(fd)
    except OSError:
        os.close(fd)
        return None
    return fd


def in_foreground(tty: int | None) -> bool:
    """Our process group is the terminal's foreground group."""
    if tty is None:
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False


def give_terminal(tty: int, pgid: int) -> None:
    """Make ``pgid`` the terminal's foreground group (SIGTTOU blocked meanwhile)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(tty, pgid)
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------ supervision


@dataclasses.dataclass
class Ending:
    """Why the reservation ended under a running CMD."""

    error: ResdError
    kill_at: float  # monotonic time of the SIGKILL
    #: a reclaim notice: CMD exiting before the deadline gives the resources back
    #: (the lease ends ``released``), so resctl exits with CMD's own status
    reclaim: bool = False


class Supervisor:
    """Runs CMD on a granted lease and returns resctl's exit status (see module doc)."""

    def __init__(
        self,
        client: Client,
        lease: Lease,
        cmd: list[str],
        env: dict[str, str],
        *,
        kill_after: float,
        warn: Callable[[str], None],
    ) -> None:
        self.client = client
        self.lease = lease
        self.cmd = cmd
        self.env = env
        self.kill_after = kill_after
        self.warn = warn
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.signals: list[int] = []
        self.ending: Ending | None = None
        self.killed = False
        self.waits_for_tty = False
        self.child: subprocess.Popen[bytes] | None = None
        self.tty: int | None = None
        #: set once CMD is done: what fails after that is no news
        self.finished = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # ---- hand-over from other threads and from signal handlers

    def post(self, kind: str, payload: Any = None) -> None:
        """Called from any thread: queue the news and wake the main loop."""
        self.inbox.put((kind, payload))
        with self._wake_lock:
            if self._wake_closed:
                return  # the run is over (and the descriptor number may be reused)
            try:
                os.write(self._wake_w, b"!")
            except OSError:
                pass  # the pipe is full: the loop is awake already

    def _on_signal(self, signum: int, frame: object) -> None:
        # Runs on the main thread between bytecodes; only note it (no locks here).
        self.signals.append(signum)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        old: dict[int, Any] = {}
        try:
            for sig in FORWARDED:
                current = signal.getsignal(sig)
                if current == signal.SIG_IGN:
                    continue  # e.g. nohup: CMD inherits the ignoring, as with a shell
                old[sig] = signal.signal(sig, self._on_signal)
            old[signal.SIGCONT] = signal.signal(signal.SIGCONT, self._on_signal)
            yield
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(old_wakeup)

    # ---- threads

    def _wait_child(self, pid: int) -> None:
        while True:
            try:
                _, status = os.waitpid(pid, os.WUNTRACED)
            except InterruptedError:
                continue
            except ChildProcessError:
                self.post("exited", 255)
                return
            if os.WIFSTOPPED(status):
                self.post("stopped", os.WSTOPSIG(status))
                continue
            self.post("exited", os.waitstatus_to_exitcode(status))
            return

    def _read_pushes(self) -> None:
        """Hand over the pushes about our lease and the client's connection notices;
        ``closed`` when the events end (the client gave up reconnecting, or closed)."""
        for event in self.client.events():
            if isinstance(event, Disconnected | Reconnected):
                self.post("link", event)
                continue
            reservation = getattr(event, "reservation", None)
            if reservation is not None and reservation.id == self.lease.id:
                self.post("lease", event)
        self.post("closed")

    # ---- the run

    def run(self) -> int:
        watchdog, goodbye = self._start_watchdog()
        self.tty = controlling_tty()
        returncode = 0
        try:
            with self._signals():
                threading.Thread(
                    target=self._read_pushes, name="resctl-run-pushes", daemon=True
                ).start()
                try:
                    self.child = spawn.start(
                        self.cmd,
                        self.env,
                        tty=self.tty if in_foreground(self.tty) else None,
                        before_exec=self._register,
                    )
                except OSError as exc:
                    return self._not_started(exc)
                if goodbye is not None:
                    self._send(goodbye, f"{self.child.pid}\n".encode())
                threading.Thread(
                    target=self._wait_child,
                    args=(self.child.pid,),
                    name="resctl-run-wait",
                    daemon=True,
                ).start()
                returncode = self._supervise(self.child)
                self.child.returncode = returncode  # reaped by _wait_child
                self._reap_leftovers(self.child.pid)
        finally:
            self.finished.set()
            self._take_terminal_back()
            self._release()
            if goodbye is not None:
                self._send(goodbye, b"done\n")
                os.close(goodbye)
            if watchdog is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    watchdog.wait(5)
            with self._wake_lock:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
            if self.tty is not None:
                os.close(self.tty)
        return self._outcome(returncode)

    def _register(self, pid: int) -> None:
        """Register CMD with the lease while it waits at the spawn helper's gate,
        asking resd to confine it in a cgroup with the lease's CPU and memory limits
        (SPEC §10), so that it is limited from its first instruction. Never fatal:
        CMD runs whether or not resd knows it — an older resd without ``register``
        gets a debug line, anything else one line on stderr; resd journals the
        registration, so a reconnection needs none again."""
        try:
            info = self.client.register(self.lease.id, pid, confine=True)
        except ResdError as exc:
            if isinstance(exc, InvalidError) and exc.details.get("field") == "op":
                log.debug("resd does not know register: %s", exc.message)
                return
            self.warn(
                f"could not register CMD (pid {pid}) with {self.lease.id}: {exc.code}:"
                f" {exc.message}; it runs without cgroup limits and its GPU use may"
                " count as foreign"
            )
        except Exception as exc:  # never fatal: CMD runs whether or not resd knows it
            self.warn(
                f"could not register CMD (pid {pid}) with {self.lease.id}: {exc}; it runs"
                " without cgroup limits and its GPU use may count as foreign"
            )
        else:
            log.debug("registered CMD: enforcement %s, cgroup %r", info.enforcement, info.cgroup)

    def _supervise(self, child: subprocess.Popen[bytes]) -> int:
        """The main loop; returns CMD's ``returncode`` (negative: killed by a signal)."""
        pgid = child.pid
        while True:
            timeout = None
            if self.ending is not None and not self.killed:
                timeout = max(0.0, self.ending.kill_at - time.monotonic())
            try:
                select.select([self._wake_r], [], [], timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                pass
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
            while self.signals:
                signum = self.signals.pop(0)
                if signum == signal.SIGCONT:
                    self._continued(pgid)
                else:
                    self._kill(pgid, signum)
            returncode: int | None = None
            while True:
                try:
                    kind, payload = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "exited":
                    returncode = payload
                elif kind == "stopped":
                    self._stopped(pgid, payload)
                elif kind == "lease":
                    self._lease_event(pgid, payload)
                elif kind == "link":
                    self._link(payload)
                elif kind == "closed" and returncode is None:
                    why = self.client.session.closed or "closed"
                    self._end(
                        pgid,
                        UnavailableError(
                            f"lost the connection to resd ({why});"
                            f" reservation {self.lease.id} ended with it"
                        ),
                        time.monotonic() + self.kill_after,
                    )
            if returncode is not None:
                return int(returncode)
            if (
                self.ending is not None
                and not self.killed
                and time.monotonic() >= self.ending.kill_at
            ):
                self.killed = True
                self._kill(pgid, signal.SIGKILL)

    def _link(self, event: Disconnected | Reconnected) -> None:
        """Say that resd went away (CMD keeps running) and that the lease is back; a
        lease that ended meanwhile comes as its own event, before ``Reconnected``."""
        if isinstance(event, Disconnected):
            self.warn(
                f"lost the connection to resd ({event.reason});"
                " CMD keeps running while resctl reconnects"
            )
        elif self.ending is None and self.lease.ended is None:
            self.warn(f"reconnected to resd; reservation {self.lease.id} re-attached")

    def _lease_event(self, pgid: int, event: Any) -> None:
        info: ReservationInfo = event.reservation
        now = time.monotonic()
        if isinstance(event, ReleasedEvent):
            # an admin, a deleted pool or tenant, or resd after an outage let it go
            self._end(
                pgid,
                UnavailableError(
                    f"reservation {info.id} was released ({info.reason or 'not by resctl'})"
                ),
                now + self.kill_after,
            )
        elif isinstance(event, ExpiredEvent):
            self._end(
                pgid,
                TimeoutError_(f"reservation {info.id} expired (ttl {info.ttl or 0:g}s)"),
                now + self.kill_after,
            )
        elif isinstance(event, ReclaimEvent):
            # CMD ending in time lets resctl release: given back, nobody killed.
            left = max(0.0, event.deadline - time.time())
            self._end(
                pgid,
                PreemptedError(
                    f"reservation {info.id} is reclaimed by {event.by}; it must be given back"
                    f" within {left:.3g}s"
                ),
                now + left,
                reclaim=True,
            )
        elif isinstance(event, PreemptedEvent):
            if info.state == "terminating" and event.deadline is not None:
                left = max(0.0, event.deadline - time.time())
                self._end(
                    pgid,
                    PreemptedError(
                        f"reservation {info.id} was preempted by {event.by}"
                        f" (grace period {left:.3g}s)"
                    ),
                    now + left,
                )
            else:
                # Final: the resources are free now. After a grace period CMD has
                # had its SIGTERM and time; without one it gets kill_after seconds.
                why = event.by if event.by.startswith("preempted") else f"preempted ({event.by})"
                self._end(
                    pgid,
                    PreemptedError(f"reservation {info.id} was {why}"),
                    now if self.ending is not None else now + self.kill_after,
                )

    def _end(self, pgid: int, error: ResdError, kill_at: float, *, reclaim: bool = False) -> None:
        if self.ending is None:
            self.ending = Ending(error, kill_at, reclaim)
            wait = max(0.0, kill_at - time.monotonic())
            self.warn(
                f"{error.code}: {error.message}; sending SIGTERM to CMD, SIGKILL in {wait:.3g}s"
            )
            self._kill(pgid, signal.SIGTERM)
            self._kill(pgid, signal.SIGCONT)
        else:
            if self.ending.reclaim and not reclaim:
                # the lease ended otherwise (preempted at the deadline, released,
                # expired) before CMD gave it back: that is the outcome
                self.ending.error = error
                self.ending.reclaim = False
            self.ending.kill_at = min(self.ending.kill_at, kill_at)

    def _stopped(self, pgid: int, stopsig: int) -> None:
        """CMD was stopped (Ctrl-Z, or SIGTTIN reading the terminal from the background):
        stop our own job too, so that the shell shows it stopped and ``fg`` works; once
        continued, give CMD the terminal if we are in the foreground and continue it."""
        if self.tty is None or self.ending is not None:
            return  # no terminal: whoever stopped CMD will continue it
        with contextlib.suppress(OSError):
            if os.tcgetpgrp(self.tty) == pgid:
                give_terminal(self.tty, os.getpgrp())
        # SIGTSTP, not SIGSTOP: the kernel discards it in an orphaned process group,
        # where nobody could ever continue us.
        self._kill(os.getpgrp(), signal.SIGTSTP)
        if in_foreground(self.tty):
            give_terminal(self.tty, pgid)
        elif stopsig in (signal.SIGTTIN, signal.SIGTTOU):
            # Continuing it in the background would only stop it again, over and over
            # if nobody stops us; it waits for our next SIGCONT (fg or bg).
            self.waits_for_tty = True
            self.warn("CMD waits for the terminal; bring resctl to the foreground (fg)")
            return
        self._kill(pgid, signal.SIGCONT)

    def _continued(self, pgid: int) -> None:
        """We got SIGCONT: continue CMD if it was left waiting for the terminal."""
        if not self.waits_for_tty:
            return
        self.waits_for_tty = False
        if self.tty is not None and in_foreground(self.tty):
            give_terminal(self.tty, pgid)
        self._kill(pgid, signal.SIGCONT)

    # ---- helpers

    @staticmethod
    def _kill(pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _send(fd: int, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, data)

    def _start_watchdog(self) -> tuple[subprocess.Popen[bytes] | None, int | None]:
        read_end, write_end = os.pipe()
        try:
            watchdog = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", WATCHDOG, str(read_end)],
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                process_group=0,
            )
        except OSError as exc:
            self.warn(f"cannot start the watchdog ({exc}); relying on the parent-death signal")
            os.close(write_end)
            return None, None
        finally:
            os.close(read_end)
        return watchdog, write_end

    def _not_started(self, exc: OSError) -> int:
        name = self.cmd[0]
        if isinstance(exc, FileNotFoundError):
            self.warn(f"{name}: command not found; released {self.lease.id}")
            return EXIT_NOT_FOUND
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOEXEC:
            reason = "not an executable format"
        self.warn(f"{name}: cannot execute: {reason}; released {self.lease.id}")
        return EXIT_NOT_EXECUTABLE

    def _reap_leftovers(self, pgid: int) -> None:
        """SIGTERM what CMD left running in its group; SIGKILL it after LEFTOVER_GRACE."""
        if not _group_alive(pgid):
            return
        self._kill(pgid, signal.SIGTERM)
        self._kill(pgid, signal.SIGCONT)
        deadline = time.monotonic() + LEFTOVER_GRACE
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.02)
        self._kill(pgid, signal.SIGKILL)

    def _take_terminal_back(self) -> None:
        """Take the terminal back from CMD's group (or from a child whose exec failed)."""
        if self.tty is None:
            return
        with contextlib.suppress(OSError):
            holder = os.tcgetpgrp(self.tty)
            ours = self.child is not None and holder == self.child.pid
            if holder != os.getpgrp() and (ours or not _group_alive(holder)):
                give_terminal(self.tty, os.getpgrp())

    def _release(self) -> None:
        if self.client.closed:
            return
        try:
            # CMD is done: do not wait out an outage; resd lets a session lease that
            # nobody re-attaches go by itself
            self.lease.release(wait=False)
        except ConnectionLost:
            self.warn(f"resd is away; it releases {self.lease.id} when nobody re-attaches it")
        except UnavailableError:
            pass
        except ResdError as exc:
            self.warn(f"releasing {self.lease.id} failed: {exc.code}: {exc.message}")

    def _outcome(self, returncode: int) -> int:
        if self.child is None:
            return returncode  # CMD never started: 126 / 127
        if self.ending is None:
            return exit_status(returncode)
        how = (
            f"killed by {signal_name(-returncode)}"
            if returncode < 0
            else f"exited with status {returncode}"
        )
        error = self.ending.error
        if self.ending.reclaim and not self.killed:
            # CMD gave back in time: resctl released the lease, nobody was preempted
            self.warn(f"reservation {self.lease.id} given back in time; CMD {how}")
            return exit_status(returncode)
        self.warn(f"{error.code}: {error.message}; CMD {how}")
        return error.exit_code


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def pool_grace(client: Client, pool: str) -> float:
    """The pool's grace period, or 0 when it cannot be read."""
    try:
        info: PoolInfo = client.call("pool.show", PoolName(name=pool))
    except ResdError:
        return 0.0
    return max(0.0, info.grace)


def lease_grace(client: Client, info: ReservationInfo) -> float:
    """The grace period of the lease's pool; for a gang the longest of its parts'
    pools (0 when none can be read)."""
    pools = dict.fromkeys(p.pool for p in info.parts) or {info.pool: None}
    return max(pool_grace(client, pool) for pool in pools)


# ------------------------------------------------------------------- command


def run(
    ctx: typer.Context,
    cmd: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- CMD [ARGS]...", help="The command to run, after --."),
    ] = None,
    tenant: TenantOpt = None,
    pool: ReservePoolOpt = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    vram: VramOpt = None,
    res: ResOpt = None,
    member: MemberOpt = None,
    contiguous: ContiguousOpt = None,
    gpu_model: GpuModelOpt = None,
    numa: NumaOpt = None,
    selector: SelectorOpt = None,
    placement: PlacementOpt = None,
    part: PartOpt = None,
    ttl: TtlOpt = None,
    label: LabelOpt = "",
    reclaimable: ReclaimableOpt = False,
    no_wait: NoWaitOpt = False,
    timeout: WaitTimeoutOpt = None,
    deadline: DeadlineOpt = None,
    gpu_ids: Annotated[
        str,
        typer.Option(
            "--gpu-ids",
            metavar="index|uuid",
            help="Give CUDA_VISIBLE_DEVICES as GPU indices or as GPU UUIDs.",
        ),
    ] = "index",
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Do not print the reservation on stderr."),
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Reserve, run CMD on the reservation, release when it exits; exits with CMD's status.

    CMD gets CUDA_VISIBLE_DEVICES, RESD_RESERVATION_ID, RESD_GPUS, RESD_VRAM_BYTES,
    RESD_CPU, RESD_MEMORY_BYTES, ... The reservation is bound to this process: if
    resctl dies, it is released and CMD is killed. SIGINT, SIGTERM, SIGHUP, SIGQUIT,
    SIGUSR1 and SIGUSR2 are forwarded to CMD. If the reservation is preempted or
    expires, CMD gets SIGTERM, then SIGKILL after the grace period, and resctl exits
    10 (preempted) or 9 (expired). With --part (twice or more) CMD runs on a gang,
    granted all or nothing as one lease: its environment covers every part (e.g.
    CUDA_VISIBLE_DEVICES lists the GPUs of all of them).
    """
    out = Output(json_out)
    code = 0
    with guard(out):
        argv = ctx.meta.get(ARGV_KEY, [])
        command = command_after_dashdash(argv, cmd or [])
        ids: GpuIds = "uuid" if require_choice(gpu_ids, "--gpu-ids", GPU_IDS) == "uuid" else "index"
        args = build(
            Reserve,
            {
                **reserve_fields_of(ctx.params),
                "tenant": tenant,
                "ttl": _ttl(ttl),
                "binding": "session",
                "label": label,
                "reclaimable": reclaimable,
                **wait_fields(not no_wait, timeout, deadline),
            },
        )
        client = Client(socket_of(socket), name=CLIENT_NAME)
        try:
            lease = client.request(
                args, on_pending=lambda w: out.warn(waiting_line(w)) if not quiet else None
            )
            info: ReservationInfo = lease.info
            if not quiet:
                lines = (
                    [json_text(info, compact=True)]
                    if out.json
                    else [f"resctl: {line}" for line in reservation_lines(info, time.time())]
                )
                sys.stderr.write("".join(line + "\n" for line in lines))
                sys.stderr.flush()
            grace = lease_grace(client, info)
            supervisor = Supervisor(
                client,
                lease,
                command,
                {**os.environ, **lease.environment(ids)},
                kill_after=grace if grace > 0 else DEFAULT_KILL_AFTER,
                warn=out.warn,
            )
            code = supervisor.run()
        finally:
            client.close()
    raise typer.Exit(code)
