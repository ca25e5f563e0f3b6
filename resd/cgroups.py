"""cgroup v2 limits for ``resctl run``'s CMD: the ``cgroup`` enforcement level (SPEC §10).

resd confines a registered process in a cgroup of its own, made in a subtree of the
cgroup v2 hierarchy delegated to resd (systemd ``Delegate=``; see
docs/architecture.md for why a delegated subtree rather than transient scopes)::

    <base>/                 delegated to resd; controllers enabled for its children
      daemon/               resd itself, when it started inside <base>
      resd-jobs/            controllers enabled for the jobs
        <lease id>/         cpu.max, memory.max, memory.swap.max, cpuset.cpus, CMD

``<base>`` is ``cgroup_root`` from the configuration, or resd's own cgroup. A job's
cgroup is named after its lease, so that a sweep after a restart keeps the jobs of
live leases (``resctl run`` outlives a restart of resd) and kills what is left of
ended ones. When a lease ends, what still runs in its cgroup is killed
(``cgroup.kill``) and the cgroup removed: nothing keeps running on resources that
are no longer reserved.

Everything here is plain file I/O on cgroupfs (a pseudo-filesystem: no disk, no
blocking), so the pool actor may call it; ``limits_for`` is pure.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio

__all__ = ["JOBS", "CgroupError", "CgroupJobs", "CgroupTree", "limits_for", "needed", "probe"]

log = structlog.get_logger("resd.cgroups")

#: the directory of job cgroups under the delegated base
JOBS: Final = "resd-jobs"
#: resd's own leaf when it started inside the base (cgroup v2: no processes in a
#: cgroup that hands controllers to its children, the root excepted)
DAEMON: Final = "daemon"
#: the set resource whose members are CPU numbers (``cpuset.cpus``)
CORES: Final = "cores"
#: cpu.max's period in microseconds (the kernel's default)
PERIOD_US: Final = 100_000
#: the smallest quota cpu.max takes
MIN_QUOTA_US: Final = 1_000
#: what each resource needs of the kernel
_CONTROLLER: Final = {"cpu": "cpu", "memory": "memory", CORES: "cpuset"}


class CgroupError(Exception):
    """A cgroup could not be made, written or removed; the message says which file."""


def needed(resources: Mapping[str, int], members: Mapping[str, Iterable[str]]) -> set[str]:
    """The controllers confining a lease with these amounts takes (empty: nothing to
    limit, so no cgroup)."""
    names = set(resources) | {name for name, held in members.items() if list(held)}
    return {_CONTROLLER[name] for name in names if name in _CONTROLLER}


def limits_for(
    resources: Mapping[str, int], members: Mapping[str, Iterable[str]]
) -> dict[str, str]:
    """Interface file → value for a lease: ``cpu.max`` from millicores (quota per
    100 ms period, at least 1 ms), ``memory.max`` from bytes with no swap beyond it
    (a memory reservation means RAM), ``cpuset.cpus`` from the members of a ``cores``
    set whose names are CPU numbers (others are not CPUs and are left out)."""
    limits: dict[str, str] = {}
    cpu = resources.get("cpu")
    if cpu is not None:
        quota = max(MIN_QUOTA_US, cpu * PERIOD_US // 1000)
        limits["cpu.max"] = f"{quota} {PERIOD_US}"
    memory = resources.get("memory")
    if memory is not None:
        limits["memory.max"] = str(max(memory, 4096))  # the kernel rounds to pages
        limits["memory.swap.max"] = "0"
    cores = sorted({int(c) for c in members.get(CORES, ()) if c.isdigit()})
    if cores:
        limits["cpuset.cpus"] = ",".join(map(str, cores))
    return limits


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror}") from exc


def _write(path: Path, value: str) -> None:
    """One write, as the kernel wants a control value (no buffering in pieces).
    cgroupfs refuses to create files, so O_CREAT only matters off it (tests)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _procs(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


@attrs.frozen
class CgroupTree:
    """A usable delegated subtree: where job cgroups go and which controllers they
    get."""

    base: Path
    controllers: frozenset[str]

    @property
    def jobs(self) -> Path:
        return self.base / JOBS

    def missing(self, wanted: set[str]) -> set[str]:
        return wanted - self.controllers

    def path_of(self, rid: str) -> Path:
        return self.jobs / rid

    def place(self, rid: str, pid: int, limits: Mapping[str, str]) -> Path:
        """Put ``pid`` in lease ``rid``'s cgroup (made with ``limits`` if new; a second
        process of the same lease joins it). Undone if any step fails."""
        path = self.path_of(rid)
        try:
            path.mkdir()
            made = True
        except FileExistsError:
            made = False
        except OSError as exc:
            raise CgroupError(f"cannot create {path}: {exc.strerror}") from exc
        try:
            if made:
                for name, value in limits.items():
                    if name == "memory.swap.max" and not (path / name).exists():
                        continue  # no swap accounting: no swap to forbid either
                    _write(path / name, value)
            _write(path / "cgroup.procs", str(pid))
        except CgroupError:
            if made:
                self.remove(rid)
            raise
        return path

    def kill(self, rid: str) -> bool:
        """Kill whatever runs in lease ``rid``'s cgroup; False if it has none."""
        path = self.path_of(rid)
        if not path.is_dir():
            return False
        try:
            _write(path / "cgroup.kill", "1")
        except CgroupError:  # before Linux 5.14: one by one
            for pid in _procs(path):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        return True

    def remove(self, rid: str) -> bool:
        """Remove lease ``rid``'s cgroup; False while processes are still in it (they
        take a moment to die after ``kill``)."""
        try:
            self.path_of(rid).rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise CgroupError(f"cannot remove {self.path_of(rid)}: {exc.strerror}") from exc
        return True

    def leftovers(self, live: Iterable[str]) -> list[str]:
        """Job cgroups whose lease is not ``live`` (after a restart)."""
        keep = set(live)
        try:
            names = [p.name for p in self.jobs.iterdir() if p.is_dir()]
        except OSError:
            return []
        return sorted(n for n in names if n not in keep)


class CgroupJobs:
    """Ends job cgroups off the pool actor's step: ``ended`` kills at once (a
    write) and a task of its own waits for the processes to go before the cgroup
    can be removed."""

    def __init__(self, tree: CgroupTree, pause: float = 0.05, tries: int = 200) -> None:
        self.tree = tree
        self.pause = pause
        self.tries = tries
        self._send, self._recv = trio.open_memory_channel[str](math.inf)

    def ended(self, rid: str) -> None:
        """Lease ``rid`` ended: kill what runs in its cgroup (if it has one) and have
        the cgroup removed."""
        if self.tree.kill(rid):
            try:
                self._send.send_nowait(rid)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # shutting down: the sweep at the next start removes it

    def sweep(self, live: Iterable[str]) -> list[str]:
        """End the job cgroups of leases that are not ``live`` (after a restart)."""
        gone = self.tree.leftovers(live)
        for rid in gone:
            log.info("cgroup_leftover", reservation=rid)
            self.ended(rid)
        return gone

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for rid in self._recv:
            for _ in range(self.tries):
                try:
                    if self.tree.remove(rid):
                        break
                except CgroupError as exc:
                    log.warning("cgroup_not_removed", reservation=rid, error=str(exc))
                    break
                await trio.sleep(self.pause)
            else:
                log.warning("cgroup_not_removed", reservation=rid, error="processes did not exit")


# ------------------------------------------------------------------------ probing


def _mount(mountinfo: str) -> Path | None:
    """The cgroup2 mount point in ``/proc/self/mountinfo`` text."""
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def _own(cgroup_file: str) -> str | None:
    """This process's cgroup v2 path (the ``0::`` line of ``/proc/self/cgroup``)."""
    for line in cgroup_file.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _enable(cgroup: Path, controllers: set[str]) -> None:
    if controllers:
        _write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(controllers)))


def _base(setting: str, proc: Path) -> tuple[Path, bool] | str:
    """The delegated base, and whether resd must leave it for a ``daemon`` leaf;
    or why there is none."""
    if setting:
        return Path(setting), False
    try:
        mount = _mount((proc / "self/mountinfo").read_text())
        own = _own((proc / "self/cgroup").read_text())
    except OSError as exc:
        return f"cannot read {proc}: {exc.strerror}"
    if mount is None or own is None:
        return "no cgroup v2 hierarchy is mounted"
    here = mount / own.lstrip("/")
    if here == mount:  # not under systemd, or in a container: which subtree is ours?
        return (
            f"resd runs in the root cgroup of {mount}; set cgroup_root to a cgroup v2"
            " directory delegated to it"
        )
    if here.name == DAEMON:  # systemd's DelegateSubgroup=daemon, or our leaf of old
        return here.parent, False
    return here, True


def probe(setting: str, proc: Path = Path("/proc")) -> CgroupTree | None:
    """The subtree for job cgroups, set up (controllers enabled, resd moved to its
    leaf when it shares the base) — or None, with one log line saying why, when the
    host has no usable cgroup v2 (never an error: CMD then runs with ``enforcement``
    as the lease had it). ``setting``: ``cgroup_root`` ("" = resd's own cgroup,
    ``off`` = never)."""
    if setting == "off":
        log.info("cgroup_limits_off", reason="cgroup_root = off")
        return None
    found = _base(setting, proc)
    if isinstance(found, str):
        log.info("cgroup_limits_off", reason=found)
        return None
    base, leave = found
    try:
        if not (base / "cgroup.controllers").is_file():
            raise CgroupError(f"{base} is not a cgroup v2 directory")
        if not os.access(base / "cgroup.subtree_control", os.W_OK) or not os.access(base, os.W_OK):
            raise CgroupError(
                f"{base} is not delegated to resd (run it with systemd's Delegate=yes,"
                " or set cgroup_root to a cgroup v2 directory it may write)"
            )
        available = set(_read(base / "cgroup.controllers").split()) & set(_CONTROLLER.values())
        if leave:
            others = [p for p in _procs(base) if p != os.getpid()]
            if others:
                raise CgroupError(
                    f"{base} holds other processes ({len(others)}); give resd a cgroup of"
                    " its own (systemd Delegate=yes) or set cgroup_root"
                )
            (base / DAEMON).mkdir(exist_ok=True)
            _write(base / DAEMON / "cgroup.procs", str(os.getpid()))
        _enable(base, available)
        (base / JOBS).mkdir(exist_ok=True)
        _enable(base / JOBS, available)
        enabled = set(_read(base / JOBS / "cgroup.subtree_control").split())
    except (CgroupError, OSError) as exc:
        log.info("cgroup_limits_off", reason=str(exc))
        return None
    tree = CgroupTree(base, frozenset(enabled & available))
    missing = sorted(set(_CONTROLLER.values()) - tree.controllers)
    log.info(
        "cgroup_limits",
        base=str(base),
        controllers=sorted(tree.controllers),
        missing=missing,
        detail=(
            "leases that need a missing controller run without cgroup limits"
            if missing
            else "resctl run confines CMD"
        ),
    )
    return tree
