"""Assembly and lifecycle of the daemon: recover, start the actors, serve, stop.

Start: lock the state directory, replay the journal into the books, start the
journal flusher and the actors, restore the wait queue and hold the previous
process's session leases and waiters for their clients to re-attach, create the ``host`` pool on first start, bind the socket (refusing when
another daemon answers on it or another user could swap it, removing it when it is
stale), serve, tell systemd READY. Before all that, the soft descriptor limit is
raised to the hard one. Stop (SIGTERM/SIGINT or ``request_stop``): STOPPING, stop accepting, let
in-flight requests finish, snapshot, flush and close the journal, remove the
socket, return.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import pwd
import resource
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

import structlog
import trio

from resd import cgroups
from resd import messages as m
from resd.announcer import Announcer
from resd.config import Config, gpu_margin, metrics_address
from resd.discovery import discover, host_pool_resources
from resd.inventory import HostInventory
from resd.journal import Journal, JournalFailed
from resd.metrics import Metrics, serve_http
from resd.mps import mps_active
from resd.nvml import NvmlBackend
from resd.ops import Services
from resd.pool_actor import PoolActor
from resd.pools import PoolBook
from resd.procwatch import ProcessWatcher, process_table
from resd.reconcile import ProcInfo
from resd.reconciler import Offload, Reconciler, choose_backend
from resd.records import RECORD, decode
from resd.registry import TenantRegistry
from resd.sdnotify import activated_socket, notify
from resd.server import Limits, Server, admin_gid_of
from resd.tenants import TenantBook
from resd.timers import Arbiter, Reaper
from resd_client import __version__
from resd_client.errors import UnavailableError
from resd_client.protocol import PoolCreate, from_wire

log = structlog.get_logger("resd")
#: pauses between attempts at a snapshot that failed (a full disk, an I/O error)
SNAPSHOT_RETRY_FIRST: Final = 1.0
SNAPSHOT_RETRY_MAX: Final = 60.0


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the state directory for the daemon's life."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "resd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise StartupError(
                f"state directory {state_dir} is in use by resd pid {holder}; "
                "stop that daemon or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


#: what the soft descriptor limit is raised to when the hard one is unlimited and
#: /proc/sys/fs/nr_open cannot be read
FD_LIMIT_FALLBACK = 1 << 20
#: descriptors resd needs besides one per connection (journal, snapshot, epoll, ...)
FD_HEADROOM = 64


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: a replay makes millions of objects and no
    cycles, and each collection it would set off scans the books grown so far, for
    nothing (seconds on a long log). Collection resumes (if it was on) on the way out."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit and log both: every
    connection costs a descriptor and the usual soft default is 1,024. Returns the
    soft limit now. Never fails: without it, ``accept`` backs off at the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel still caps it at fs.nr_open
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = FD_LIMIT_FALLBACK
    now = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_not_raised", soft=soft, hard=hard, error=str(exc))

    def show(n: int) -> int | str:
        return "unlimited" if n == resource.RLIM_INFINITY else n

    log.info("fd_limit", soft=show(now), was=show(soft), hard=show(hard))
    if now != resource.RLIM_INFINITY and max_connections + FD_HEADROOM > now:
        log.warning(
            "fd_limit_below_max_connections",
            soft=now,
            max_connections=max_connections,
            hint="raise the hard limit (systemd LimitNOFILE=, ulimit -Hn) or lower "
            "max_connections; at the limit new connections wait in the backlog",
        )
    return now


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_socket_dirs(directory: Path, sock: Path) -> None:
    """Refuse a socket directory another user could swap: every directory on the way
    to it (symlinks resolved) must belong to this user or root and be writable by
    nobody else unless it is sticky like /tmp; a symlink on the way must belong to
    this user or root (OpenSSH's StrictModes, applied to the socket's path).

    Raises StartupError naming the directory, what is wrong and what to do.
    """
    trusted = {0, os.geteuid()}
    seen: set[Path] = set()
    for prefix in (directory, *directory.parents):
        link = os.lstat(prefix)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in trusted:
            raise StartupError(
                f"{prefix} (on the way to the socket {sock}) is a symlink of "
                f"{_owner(link.st_uid)}, who could point it elsewhere; use --socket with a "
                "path in a directory of your own, such as $XDG_RUNTIME_DIR"
            )
        real = Path(os.path.realpath(prefix))
        for d in (real, *real.parents):
            if d in seen:
                continue
            seen.add(d)
            st = os.stat(d)
            if st.st_uid not in trusted:
                raise StartupError(
                    f"{d} (on the way to the socket {sock}) belongs to {_owner(st.st_uid)}, "
                    "who could replace the socket with their own; use --socket with a path "
                    "in a directory of your own, such as $XDG_RUNTIME_DIR"
                )
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise StartupError(
                    f"{d} (on the way to the socket {sock}) has mode "
                    f"{stat.S_IMODE(st.st_mode):04o}: others may write in it without the "
                    f"sticky bit, so they could replace the socket; chmod go-w {d}, or use "
                    "--socket with a path in a directory of your own"
                )


def claim_runtime_dir(directory: Path, shared: bool) -> None:
    """The user-mode runtime directory (``$XDG_RUNTIME_DIR/resd``,
    ``/tmp/resd-$UID``): created 0700 (0755 for a ``socket_mode`` open to others)
    when missing; otherwise it must be a real directory of this user that nobody
    else may write (nor enter, unless shared), as ssh-agent and tmux insist.
    Someone else's ``mkdir -m 777 /tmp/resd-$UID`` would let them swap the socket
    and receive this user's requests.

    Raises StartupError saying what is wrong and what to do.
    """
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o755 if shared else 0o700)  # whatever the umask
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise StartupError(
            f"runtime directory {directory} is {kind}, of {_owner(st.st_uid)}; remove it "
            "(if it is not yours, another user may be trying to intercept resd's socket) "
            "or use --socket to pick another path"
        )
    euid = os.geteuid()
    if st.st_uid != euid:
        raise StartupError(
            f"runtime directory {directory} belongs to {_owner(st.st_uid)}, not to you "
            f"({_owner(euid)}): another user may have made it to intercept resd's socket. "
            "Have it removed (by its owner or root), or set XDG_RUNTIME_DIR or --socket to "
            "a directory of your own"
        )
    loose = 0o022 if shared else 0o077
    if st.st_mode & loose:
        want = "0755 or 0700" if shared else "0700"
        raise StartupError(
            f"runtime directory {directory} has mode {stat.S_IMODE(st.st_mode):04o}; it must "
            f"be {want}, or others could replace resd's socket in it. Check that nothing in "
            f"it is foreign, then chmod {want[:4]} {directory} (or remove it)"
        )
    if shared and not st.st_mode & 0o011:
        log.warning(
            "runtime_dir_not_reachable",
            directory=str(directory),
            mode=f"{stat.S_IMODE(st.st_mode):04o}",
            hint="socket_mode lets others use the socket, but they cannot enter this directory",
        )


def claim_socket_path(path: Path) -> None:
    """Refuse when a daemon answers on ``path``, it is not a socket, or it is another
    user's socket (root excepted); remove a stale socket of ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(
            f"{path} exists and is not a socket; remove it or use --socket to pick another path"
        )
    euid = os.geteuid()
    if euid != 0 and st.st_uid != euid:
        raise StartupError(
            f"{path} is a socket of {_owner(st.st_uid)}, not yours; have it removed or use "
            "--socket to pick another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot check existing socket {path}: {exc}") from None
        log.warning("stale_socket_removed", socket=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartupError(
        f"another resd is already listening on {path}; stop it first or use --socket to pick another path"
    )


def bind_listener(
    path: Path, system: bool, mode: int, *, runtime_dir: bool = False
) -> socket.socket:
    """Bind the socket with ``mode`` from the start (umask), so it is never looser.

    ``runtime_dir``: the socket's directory is the user-mode default, resd's own
    (``claim_runtime_dir``); otherwise a missing directory is created (0700, 0755 when
    shared or in system mode). Either way the path must pass ``check_socket_dirs``.
    Raises StartupError when the path is unsafe or taken.
    """
    path = Path(os.path.abspath(path))
    shared = bool(system or mode & 0o077)
    if runtime_dir:
        claim_runtime_dir(path.parent, shared)
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755 if shared else 0o700)
    check_socket_dirs(path.parent, path)
    claim_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if system:
        with contextlib.suppress(KeyError, PermissionError):
            import grp

            os.chown(path, 0, grp.getgrnam("resd").gr_gid)
    sock.listen(512)
    return sock


class Daemon:
    """One resd process's state and tasks. ``run`` serves until asked to stop."""

    def __init__(
        self,
        config: Config,
        *,
        wall: Callable[[], float] = time.time,
        handle_signals: bool = True,
        gpu_backend: NvmlBackend | Literal["auto"] | None = "auto",
        process_table: Callable[[], dict[int, ProcInfo]] = process_table,
        offload: Offload | None = None,
    ) -> None:
        """``gpu_backend``, ``process_table`` and ``offload``: what the reconciler
        samples and how (tests give scripted ones and sample inline)."""
        self.config = config
        self.gpu_backend = gpu_backend
        self.process_table = process_table
        self.offload = offload
        self.wall = wall
        self.handle_signals = handle_signals
        self.boot_id = uuid.uuid4().hex
        self._stop = trio.Event()
        self.stopped = trio.Event()
        self._snapshot_wanted = trio.Event()
        self.server: Server | None = None
        self.journal: Journal | None = None
        self.pools: PoolActor | None = None
        self.tenants: TenantRegistry | None = None
        self.reconciler: Reconciler | None = None
        self.metrics = Metrics(__version__)
        #: where metrics are served over HTTP once running (None: not served)
        self.metrics_address: tuple[str, int] | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        raise_fd_limit(cfg.max_connections)
        try:
            with state_lock(cfg.state_path):
                await self._run_locked(cfg, task_status)
        finally:
            self.stopped.set()

    def _recover(self, journal: Journal) -> tuple[PoolBook, TenantBook, bool]:
        """Books from the snapshot, then every later entry applied as it is read."""
        books: dict[str, Any] = {}

        def replay(_lsn: int, domain: str, records: list[Any]) -> None:
            events = list(map(decode, records))
            if domain == "pools":
                books["pools"].apply(events)
            elif domain == "tenants":
                books["tenants"].apply(events)

        def load(snapshots: dict[str, tuple[int, Any]]) -> None:
            pool_snap = snapshots.get("pools")
            tenant_snap = snapshots.get("tenants")
            books["pools"] = PoolBook.from_snapshot(
                pool_snap[1] if pool_snap else None,
                self.config.history_limit,
                self.config.fair_share_half_life,
            )
            books["tenants"] = TenantBook.from_snapshot(
                tenant_snap[1] if tenant_snap else None, self.config.default_priority
            )

        with _gc_paused():
            rec = journal.recover(replay, on_snapshot=load, records=RECORD)
        for warning in rec.warnings:
            log.warning("journal_recovered_with_warning", detail=warning)
        pools: PoolBook = books["pools"]
        tenants: TenantBook = books["tenants"]
        fresh = not rec.snapshots and not rec.replayed
        log.info(
            "recovered",
            pools=len(pools.pools),
            reservations=len(pools.reservations),
            tenants=len(tenants.tenants),
            entries=rec.replayed,
        )
        return pools, tenants, fresh

    async def _run_locked(self, cfg: Config, task_status: trio.TaskStatus[Daemon]) -> None:
        journal = Journal(
            cfg.state_path,
            cfg.fsync,  # type: ignore[arg-type]
            on_failure=lambda: self._snapshot_wanted.set(),  # write the state anew
            on_sync=self.metrics.journal_synced,
        )
        pool_book, tenant_book, fresh = self._recover(journal)
        pool_book.mps = mps_active()  # decides the ``enforcement`` of new VRAM slices
        if pool_book.mps:
            log.info("mps_detected", detail="VRAM slices get MPS pinned-memory limits")
        tree = cgroups.probe(cfg.cgroup_root)
        jobs = None if tree is None else cgroups.CgroupJobs(tree)
        reaper, arbiter = Reaper(self.wall), Arbiter(self.wall)
        announcer, watcher = Announcer(journal), ProcessWatcher()
        pools = PoolActor(
            pool_book,
            journal,
            self.wall,
            reaper,
            arbiter,
            snapshot_every=cfg.snapshot_every,
            snapshot_due=lambda: self._snapshot_wanted.set(),
            announcer=announcer,
            watcher=watcher,
            reattach_grace=cfg.reattach_grace,
            metrics=self.metrics,
            cgroups=jobs,
        )
        self.metrics.watch(lambda: pools.book)
        reaper.pool_actor = arbiter.pool_actor = watcher.pool_actor = pools
        tenants = TenantRegistry(tenant_book, journal, self.wall)
        self.journal, self.pools, self.tenants = journal, pools, tenants
        reconciler = self.reconciler = await self._reconciler(cfg, pools)
        started_at = self.wall()
        server = Server(
            Services(
                pools,
                tenants,
                journal,
                __version__,
                self.boot_id,
                started_at,
                self.wall,
                lambda: server.connection_count,
                reconciler,
                self.metrics,
            ),
            Limits(
                max_frame=cfg.max_frame,
                max_connections=cfg.max_connections,
                max_pending=cfg.max_pending,
                max_connections_per_uid=cfg.max_connections_per_uid,
                admin_reserved_connections=cfg.admin_reserved_connections,
                handshake_timeout=cfg.handshake_timeout,
                read_timeout=cfg.read_timeout,
            ),
            admin_gid=admin_gid_of(cfg.admin_group),
        )
        self.server = server
        http = await self._metrics_listeners(cfg)
        try:
            activated = activated_socket()
            listener_sock = activated or bind_listener(
                cfg.socket_path,
                cfg.system,
                cfg.socket_permissions,
                runtime_dir=not cfg.system and not cfg.socket,
            )
        except BaseException:
            for http_listener in http:
                http_listener.socket.close()
            raise
        listener = trio.socket.from_stdlib_socket(listener_sock)
        try:
            async with trio.open_nursery() as nursery:
                journal_scope, journal_done = trio.CancelScope(), trio.Event()
                await nursery.start(self._run_journal, journal, journal_scope, journal_done)
                for actor in (reaper, arbiter, pools, tenants, watcher):
                    await nursery.start(actor.run)
                lsn = await pools.ask(m.Recover())
                if lsn:
                    await journal.wait_durable(lsn)
                if jobs is not None:
                    await nursery.start(jobs.run)
                    jobs.sweep(pools.book.reservations)  # what ended while resd was away
                if fresh and cfg.host_pool:
                    await self._create_host_pool(pools, journal)
                if self.handle_signals:
                    nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._snapshots)
                await nursery.start(reconciler.run)
                await nursery.start(server.serve, listener)
                if http:
                    self.metrics_address = await nursery.start(serve_http, self.metrics, http)
                log.info(
                    "ready",
                    socket=str(cfg.socket_path),
                    state_dir=str(cfg.state_path),
                    fsync=cfg.fsync,
                    version=__version__,
                    pid=os.getpid(),
                )
                notify("READY=1\nSTATUS=serving")
                task_status.started(self)
                await self._stop.wait()
                notify("STOPPING=1")
                log.info("stopping")
                await server.stop()
                try:
                    await self.snapshot()
                except (OSError, JournalFailed, ValueError) as exc:  # the WAL still holds it all
                    log.error("final_snapshot_failed", error=str(exc))
                journal_scope.cancel()
                await journal_done.wait()
                try:
                    await journal.close()
                except JournalFailed as exc:
                    log.error("journal_unsynced_at_stop", error=str(exc))
                nursery.cancel_scope.cancel()
        finally:
            listener.close()
            for http_listener in http:
                http_listener.socket.close()
            if activated is None:
                with contextlib.suppress(FileNotFoundError):
                    cfg.socket_path.unlink()
        log.info("stopped")

    @staticmethod
    async def _metrics_listeners(cfg: Config) -> list[trio.SocketListener]:
        """The bound HTTP listeners for ``metrics_listen`` (none when it is empty).
        Raises StartupError when the address cannot be bound."""
        address = metrics_address(cfg)
        if address is None:
            return []
        try:
            return await trio.open_tcp_listeners(address[1], host=address[0])
        except OSError as exc:
            raise StartupError(
                f"metrics_listen: cannot listen on {cfg.metrics_listen}: {exc.strerror or exc}; "
                'pick a free port, or set it to "" to serve metrics only through resctl metrics'
            ) from None

    async def _reconciler(self, cfg: Config, pools: PoolActor) -> Reconciler:
        """The GPU reconciler, on the given backend or the one the host has."""
        backend: NvmlBackend | None = None
        why_not = ""
        if self.gpu_backend != "auto":
            backend = self.gpu_backend
        elif cfg.gpu_sample_interval > 0:
            backend, why_not = await trio.to_thread.run_sync(choose_backend, cfg)
        extra: dict[str, Any] = {} if self.offload is None else {"offload": self.offload}
        log.info(
            "gpu_sampling",
            interval=cfg.gpu_sample_interval,
            backend=type(backend).__name__ if backend else None,
            why_not=why_not or None,
        )
        return Reconciler(
            pools,
            backend,
            cfg.gpu_sample_interval,
            self.wall,
            margin=gpu_margin(cfg),
            why_not=why_not,
            table=self.process_table,
            **extra,
        )

    @staticmethod
    async def _run_journal(
        journal: Journal,
        scope: trio.CancelScope,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with scope:
                await journal.run(task_status=task_status)
        finally:
            done.set()

    async def _create_host_pool(self, pools: PoolActor, journal: Journal) -> HostInventory:
        """Create the ``host`` pool from discovery (``max_per_tenant`` 0); returns what
        discovery found. Raises ConfigError for a bad ``*_limit`` or ``gpus_file``."""
        inventory = discover(self.config)
        resources = host_pool_resources(inventory, self.config.oversub)
        args = from_wire(
            PoolCreate,
            {
                "name": "host",
                "resources": resources,
                "max_per_tenant": 0,
                "labels": {"source": "discovery"},
            },
        )
        try:
            info, lsn = await pools.ask(m.CreatePool(args))
            await journal.wait_durable(lsn)
        except (UnavailableError, JournalFailed) as exc:  # e.g. a full disk: serve anyway
            log.error("host_pool_not_created", error=str(exc), retry="at the next start")
            return inventory
        log.info(
            "host_pool_created",
            resources={r.name: r.capacity for r in info.resources},
            sources={r.name: r.source for r in info.resources},
            gpus=[gpu.uuid for gpu in inventory.gpus],
        )
        return inventory

    async def _watch_signals(self) -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                self._stop.set()

    async def snapshot(self) -> None:
        """Write a snapshot of both books and drop the journal segments it covers; after a
        failed fsync, the snapshot that writes the whole state anew (a resync).

        Raises OSError (or JournalFailed) when it cannot be written; nothing is lost then.
        """
        assert self.journal is not None and self.pools is not None and self.tenants is not None
        resync = self.journal.unsynced
        if self.journal.entries_since_snapshot == 0 and not resync:
            return
        covered = self.journal.last_lsn if resync else self.journal.rotate()
        domains: dict[str, tuple[int, Any]] = {
            "pools": await self.pools.ask(m.TakeSnapshot()),
            "tenants": await self.tenants.ask(m.TakeSnapshot()),
        }
        await self.journal.write_snapshot(domains, covered, resync=resync)
        log.info("snapshot_written", covered_lsn=covered, resync=resync)

    async def _snapshots(self) -> None:
        """Snapshot whenever the pool actor says enough entries have accumulated, or the
        journal needs its state written anew; a failure (a full disk) is logged and
        retried with growing pauses, never fatal."""
        pause = SNAPSHOT_RETRY_FIRST
        while True:
            await self._snapshot_wanted.wait()
            try:
                await self.snapshot()
            except (OSError, JournalFailed) as exc:
                log.error("snapshot_failed", error=str(exc), retry_in=pause)
                await trio.sleep(pause)
                pause = min(pause * 2, SNAPSHOT_RETRY_MAX)
                continue
            pause = SNAPSHOT_RETRY_FIRST
            self._snapshot_wanted = trio.Event()
