"""The benchmark sections: each starts what it measures, runs fleets, checks the grants,
and returns plain data (maps of numbers) for the report."""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.fleet import FleetResult, run_fleet
from benchmarks.procs import Daemon, EchoServer, RawConn
from benchmarks.stats import held_name, max_overlap, other_cpu_percent, percentile, summarize
from benchmarks.workers import (
    Echo,
    ResdContention,
    ResdPairs,
    ReslockContention,
    ReslockPairs,
    client_waits,
)

Say = Callable[[str], None]
BIG = 10**9


class CheckFailed(Exception):
    """A lost or duplicated grant, or a leak: the numbers of that run are not valid."""


def have_reslock() -> bool:
    return importlib.util.find_spec("reslock") is not None


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def fsync_latency_us(directory: Path, n: int = 200) -> float:
    """Median time of a 4 KiB append + fsync in ``directory``, in microseconds."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        block = b"x" * 4096
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return percentile(times, 50) * 1e6


def machine(workdir: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "trio": _version("trio"),
        "msgpack": _version("msgpack"),
        "reslock": _version("reslock"),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Hypervisor vendor"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        df = (
            subprocess.run(["df", "-T", str(workdir)], capture_output=True, text=True, timeout=10)
            .stdout.splitlines()[-1]
            .split()
        )
        info["state_fs"] = f"{df[1]} on {df[0]}"
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    info["fsync_4k_us"] = fsync_latency_us(workdir)
    return info


def _row(system: str, unit: str, fleet: FleetResult, rts_per_op: int) -> dict[str, Any]:
    row = summarize(fleet)
    row.update(system=system, unit=unit, rt_per_s=row["ops_per_s"] * rts_per_op)
    return row


# --------------------------------------------------------------------------- limit


def bench_echo(
    workdir: Path, clients: list[int], duration: float, say: Say, raw: bool = True
) -> list[dict[str, Any]]:
    """The limit (resd's outbox, the real Client), and for reference the same server
    with a writer task per connection (the design before issue 14) and, with ``raw``,
    the limit for a bare blocking socket client."""
    rows = []
    kinds = [("limit", False, False), ("limit (writer task)", True, False)]
    kinds += [("limit (raw socket)", False, True)] if raw else []
    for name, writer_task, use_raw in kinds:
        with EchoServer(workdir, writer_task=writer_task) as echo:
            for n in clients:
                fleet = run_fleet(Echo(echo.socket, use_raw), n, duration, probe=echo.cpu)
                row = _row(name, "round trip", fleet, 1)
                rows.append(row)
                say(_line(row))
    return rows


# ---------------------------------------------------------------------------- resd


def setup_pool(path: str, *, pool: str, capacity: int, tenants: list[str]) -> None:
    with RawConn(path) as c:
        c.call(
            "pool.create",
            {"name": pool, "resources": {"cpu": {"capacity": capacity}}, "max_per_tenant": 0},
        )
        c.check_all([("tenant.add", {"name": t}) for t in tenants])


def check_resd_idle(path: str, pool: str, what: str) -> None:
    """Nothing may be left held or queued once every client has released and closed."""
    with RawConn(path) as c:
        deadline = time.monotonic() + 10
        while True:
            active = c.call("status", {})["active"]
            info = c.call("pool.show", {"name": pool})
            allocated = {r["name"]: r["allocated"] for r in info["resources"]}
            pending = c.call("list", {"pending": True})["reservations"]
            if active == 0 and not any(allocated.values()) and not pending:
                return
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"{what}: {active} active, allocated {allocated}, {len(pending)} pending after the run"
                )
            time.sleep(0.05)


def check_unique(fleet: FleetResult, what: str) -> int:
    ids = [i for w in fleet.workers for i in w.extra.get("ids", [])]
    if len(set(ids)) != len(ids):
        raise CheckFailed(f"{what}: {len(ids) - len(set(ids))} reservation ids granted twice")
    return len(ids)


def bench_resd(
    workdir: Path,
    fsync: str,
    clients: list[int],
    duration: float,
    say: Say,
    *,
    held: int = 0,
    held_clients: tuple[int, ...] = (),
) -> list[dict[str, Any]]:
    """Pairs with each client count; then, with ``held`` other leases active, again with
    ``held_clients`` (reslock's cost grows with the leases in its file: compare)."""
    rows = []
    system = f"resd fsync={fsync}"
    with Daemon(workdir, f"resd-{fsync}", fsync) as daemon:
        daemon.start()
        setup_pool(
            daemon.socket,
            pool="bench",
            capacity=BIG,
            tenants=[f"bench-{i}" for i in range(max(clients))] + ["holder"],
        )
        points = [(n, 0) for n in clients]
        if held:
            points += [(n, held) for n in held_clients]
        holding: list[str] = []
        for n, h in points:
            if h and not holding:
                with RawConn(daemon.socket) as c:
                    reserve = {"pool": "bench", "tenant": "holder", "resources": {"cpu": 1000}}
                    holding = [r["id"] for r in c.check_all([("reserve", reserve)] * h)]
            fleet = run_fleet(ResdPairs(daemon.socket, "bench"), n, duration, probe=daemon.cpu)
            check_unique(fleet, f"{system} x{n}")
            if not h:
                check_resd_idle(daemon.socket, "bench", f"{system} x{n}")
            row = _row(held_name(system, h), "reserve+release", fleet, 2)
            row.update(checked=True, held=h)
            rows.append(row)
            say(_line(row))
        if holding:
            with RawConn(daemon.socket) as c:
                c.check_all([("release", {"id": rid}) for rid in holding])
            check_resd_idle(daemon.socket, "bench", f"{system} after held")
        daemon.stop()
    return rows


# ------------------------------------------------------------------------- reslock


def _reslock_state(workdir: Path, name: str, cpu_cores: int) -> Path:
    from reslock import ResourcePool  # type: ignore[import-untyped, import-not-found, unused-ignore]

    state = workdir / f"reslock-{name}" / "state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    ResourcePool(state).set_resources({"cpu_cores": cpu_cores})
    return state


def _reslock_leases(state: Path) -> int:
    from reslock import ResourcePool  # type: ignore[import-untyped, import-not-found, unused-ignore]

    return len(ResourcePool(state).status().leases)


def bench_reslock(
    workdir: Path,
    clients: list[int],
    duration: float,
    say: Say,
    *,
    held: int = 0,
    held_clients: tuple[int, ...] = (),
) -> list[dict[str, Any]]:
    from reslock import ResourcePool  # type: ignore[import-untyped, import-not-found, unused-ignore]

    rows = []
    points = [(n, 0) for n in clients] + ([(n, held) for n in held_clients] if held else [])
    for n, h in points:
        state = _reslock_state(workdir, f"pairs-{n}-{h}", BIG)
        holder = ResourcePool(state)
        leases = [holder.try_acquire(cpu_cores=1) for _ in range(h)]  # held by this process
        fleet = run_fleet(ReslockPairs(state), n, duration)
        check_unique(fleet, "reslock")
        for lease in leases:
            lease.release()
        if _reslock_leases(state):
            raise CheckFailed(f"reslock x{n}: leases left in the state file after the run")
        row = _row(held_name("reslock", h), "acquire+release", fleet, 0)
        row.update(checked=True, held=h)
        rows.append(row)
        say(_line(row))
    return rows


# ---------------------------------------------------------------------- contention


def _contention_row(system: str, fleet: FleetResult, capacity: int, hold: float) -> dict[str, Any]:
    intervals = [(float(s), float(e)) for w in fleet.workers for s, e in w.extra["intervals"]]
    overlap = max_overlap(intervals)
    if overlap > capacity:
        raise CheckFailed(f"{system}: {overlap} holders at once with capacity {capacity}")
    check_unique(fleet, system)
    grants = [w.ops for w in fleet.workers]
    ideal = capacity / hold
    held = [end - start for start, end in intervals if start >= fleet.t0]
    idle = capacity * fleet.elapsed - sum(held)  # slot time nobody held
    waits = sorted(fleet.latencies)
    mean = sum(grants) / len(grants)
    return {
        "system": system,
        "processes": fleet.clients,
        "capacity": capacity,
        "hold_ms": hold * 1e3,
        "grants": fleet.ops,
        "seconds": fleet.elapsed,
        "grants_per_s": fleet.rate,
        "ideal_per_s": ideal,
        "fraction": fleet.rate / ideal,
        "p50_wait_ms": percentile(waits, 50) * 1e3,
        "p99_wait_ms": percentile(waits, 99) * 1e3,
        "min_grants": min(grants),
        "mean_grants": mean,
        "max_grants": max(grants),
        "max_holders_seen": overlap,
        "other_cpu_pct": other_cpu_percent(fleet),
        "mean_hold_ms": sum(held) / len(held) * 1e3 if held else math.nan,
        "idle_slot_ms_per_grant": idle / fleet.ops * 1e3 if fleet.ops else math.nan,
        "lock_timeouts": sum(int(w.extra.get("lock_timeouts", 0)) for w in fleet.workers),
        "starved": min(grants) < 0.5 * mean,
        "checked": True,
    }


def bench_contention(
    workdir: Path,
    processes: list[int],
    duration: float,
    say: Say,
    *,
    hold: float = 0.010,
    fsyncs: tuple[str, ...] = ("always", "never"),
    reslock: bool = True,
) -> list[dict[str, Any]]:
    rows = []
    for fsync in fsyncs:
        with Daemon(workdir, f"contend-{fsync}", fsync) as daemon:
            daemon.start()
            for n in processes:
                capacity = max(1, n // 4)
                pool = f"contend{n}"
                setup_pool(
                    daemon.socket,
                    pool=pool,
                    capacity=capacity * 1000,
                    tenants=[f"contend{n}-{i}" for i in range(n)],
                )
                fleet = run_fleet(
                    ResdContention(daemon.socket, pool, hold, f"contend{n}"),
                    n,
                    duration,
                    warmup=2,
                    probe=daemon.cpu,
                )
                row = _contention_row(f"resd fsync={fsync}", fleet, capacity, hold)
                check_resd_idle(daemon.socket, pool, f"contention x{n}")
                row["client_wait_api"] = "Client.reserve(wait=True)" if client_waits() else "raw"
                rows.append(row)
                say(_contention_line(row))
            daemon.stop()
    if reslock:
        for n in processes:
            capacity = max(1, n // 4)
            state = _reslock_state(workdir, f"contend-{n}", capacity)
            fleet = run_fleet(ReslockContention(state, hold), n, duration, warmup=2)
            row = _contention_row("reslock", fleet, capacity, hold)
            if _reslock_leases(state):
                raise CheckFailed(f"reslock contention x{n}: leases left after the run")
            rows.append(row)
            say(_contention_line(row))
    return rows


# ---------------------------------------------------------------------- formatting


def _line(row: dict[str, Any]) -> str:
    rt = f"{row['rt_per_s']:9.0f} rt/s" if row["rt_per_s"] else " " * 14
    cpu = row.get("server_cpu_us_per_op")
    server = f"  server {cpu:5.0f} us/op" if cpu else ""
    fair = f"  ops/client {row['min_client_ops']}..{row['max_client_ops']}"
    errors = f"  lock timeouts {row['lock_timeouts']}" if row.get("lock_timeouts") else ""
    other = row.get("other_cpu_pct")
    errors += f"  other CPU {other:.0f} %" if other is not None else ""
    return (
        f"  {row['system']:<22} {row['clients']:>3} clients  {row['ops_per_s']:9.0f} "
        f"{row['unit']}/s  {rt}  p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms"
        f"{server}{fair}{errors}"
    )


def _contention_line(row: dict[str, Any]) -> str:
    return (
        f"  {row['system']:<22} {row['processes']:>3} procs cap {row['capacity']:>2}  "
        f"{row['grants_per_s']:7.0f} grants/s = {row['fraction'] * 100:5.1f} % of ideal  "
        f"p99 wait {row['p99_wait_ms']:7.1f} ms  grants/proc min {row['min_grants']} "
        f"mean {row['mean_grants']:.0f}  max holders {row['max_holders_seen']}"
        + (f"  lock timeouts {row['lock_timeouts']}" if row["lock_timeouts"] else "")
    )


def make_workdir(base: str | None) -> Path:
    """A short directory (Unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="resd-bench-", dir=base))
