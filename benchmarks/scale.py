"""Scale: does reserve+release stay fast with a big book, what does a reservation cost
in memory, and how long does a restart take (replaying a long log, or from a snapshot)?

1. A fresh daemon (fsync=never, no snapshots while loading) with one pool holding a
   scalar ``cpu``, a range ``ports``, a set ``slots`` (4096 members, the most a set may
   have) and a 1-unit ``licenses``. Reserve+release latency is measured empty.
2. Load: ``tenants`` tenants; ``reservations`` detached reservations spread over them,
   a tenth of them holding a port and up to 4000 holding a set member; one lease on
   ``licenses`` and ``waiters`` queued requests waiting for it (on open connections).
   RSS before and after gives the memory per active reservation.
3. The same reserve+release measurement on the loaded daemon (the p99 ratio target).
4. Churn until the write-ahead log holds ``log_records`` records: session-bound
   reservations on a connection that is then closed (one record per reserve, one
   entry of many ``released`` records per close).
5. SIGKILL, restart: time to answer ``hello`` with the whole log replayed.
6. SIGTERM (snapshot at clean stop), restart: time to answer ``hello`` from the snapshot.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from benchmarks import profile
from benchmarks.fleet import FleetResult, run_fleet
from benchmarks.procs import Daemon, RawConn
from benchmarks.stats import summarize
from benchmarks.workers import ResdPairs

POOL = "scale"
SET_MEMBERS = 4096
_ENTRY = struct.Struct(">II")
_WAL_HEADER = 12  # magic (8) + version (4)


@dataclass(frozen=True)
class ScaleParams:
    tenants: int
    reservations: int
    waiters: int
    log_records: int
    clients: tuple[int, ...]
    duration: float


FULL = ScaleParams(10_000, 100_000, 1_000, 1_000_000, (1, 8), 5.0)
QUICK = ScaleParams(1_000, 10_000, 100, 100_000, (1, 8), 2.0)
SMOKE = ScaleParams(50, 500, 10, 2_000, (1,), 1.0)


def count_wal(state_dir: Path) -> tuple[int, int, int]:
    """(entries, records, bytes) in the WAL segments of ``state_dir``."""
    entries = records = size = 0
    for path in sorted(state_dir.glob("wal-*.log")):
        data = path.read_bytes()
        size += len(data)
        offset = _WAL_HEADER
        while offset + _ENTRY.size <= len(data):
            length, _crc = _ENTRY.unpack_from(data, offset)
            start = offset + _ENTRY.size
            if start + length > len(data):
                break
            body = msgpack.unpackb(data[start : start + length], raw=False, strict_map_key=False)
            entries += 1
            records += len(body["r"])
            offset = start + length
    return entries, records, size


def _pool_args(max_ports: int) -> dict[str, Any]:
    return {
        "name": POOL,
        "resources": {
            "cpu": {"capacity": 10**9},
            "ports": {"kind": "range", "lo": 1, "hi": max_ports},
            "slots": {"kind": "set", "members": [{"name": f"s{i}"} for i in range(SET_MEMBERS)]},
            "licenses": {"capacity": 1},
        },
        "max_per_tenant": 0,
    }


def _reservation(i: int, tenants: int, set_quota: int) -> dict[str, Any]:
    resources: dict[str, int] = {"cpu": 10}
    if i % 10 == 1:
        resources["ports"] = 1
    elif i % 10 == 2 and i // 10 < set_quota:
        resources["slots"] = 1
    return {"pool": POOL, "tenant": f"t{i % tenants}", "resources": resources}


def _measure(daemon: Daemon, clients: tuple[int, ...], duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in clients:
        fleet: FleetResult = run_fleet(
            ResdPairs(daemon.socket, POOL), n, duration, probe=daemon.cpu
        )
        out[str(n)] = summarize(fleet)
    return out


def _active(conn: RawConn) -> int:
    return int(conn.call("status", {})["active"])


def run_scale(
    workdir: Path,
    params: ScaleParams,
    say: Callable[[str], None] = print,
    *,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Returns every number measured; with ``profile_to`` (and pyinstrument installed) a
    profile of reserve+release on the loaded daemon (1 client) is written there."""
    res: dict[str, Any] = {"params": params.__dict__ | {"set_members": SET_MEMBERS}}
    env = {"RESD_SNAPSHOT_EVERY": str(max(10 * params.log_records, 1_000_000))}
    if profile_to is not None and profile.available():
        daemon = profile.profiled_daemon(workdir, "scale", "never", env)
    else:
        profile_to = None
        daemon = Daemon(workdir, "scale", "never", env=env)
    set_quota = min(params.reservations // 10, SET_MEMBERS - 96)
    with daemon:
        res["start_empty_s"] = daemon.start()
        res["rss_empty"] = daemon.rss()
        with RawConn(daemon.socket) as c:
            c.call("pool.create", _pool_args(10 * params.reservations))
            c.check_all(
                [("tenant.add", {"name": f"bench-{i}"}) for i in range(max(params.clients))]
            )
        say(f"scale: empty daemon, reserve+release with {params.clients} clients")
        res["empty"] = _measure(daemon, params.clients, params.duration)

        rss0 = daemon.rss()
        with RawConn(daemon.socket) as c:
            t = time.monotonic()
            c.load(("tenant.add", {"name": f"t{i}"}) for i in range(params.tenants))
            res["tenant_add_per_s"] = params.tenants / (time.monotonic() - t)
            rss1 = daemon.rss()
            say(f"scale: {params.tenants} tenants; loading {params.reservations} reservations")
            t = time.monotonic()
            c.load(
                ("reserve", _reservation(i, params.tenants, set_quota))
                for i in range(params.reservations)
            )
            res["reserve_load_per_s"] = params.reservations / (time.monotonic() - t)
            c.call("reserve", {"pool": POOL, "tenant": "t0", "resources": {"licenses": 1}})
            rss2 = daemon.rss()
        waiters = [RawConn(daemon.socket) for _ in range(10)]
        try:
            per = -(-params.waiters // len(waiters))
            queued = 0
            for k, w in enumerate(waiters):
                n = min(per, params.waiters - queued)
                replies = w.check_all(
                    [
                        (
                            "reserve",
                            {
                                "pool": POOL,
                                "tenant": f"t{(k * per + j) % params.tenants}",
                                "resources": {"licenses": 1},
                                "wait": True,
                            },
                        )
                        for j in range(n)
                    ]
                )
                if any(r["state"] != "pending" for r in replies):
                    raise RuntimeError("a waiter for the held license was granted")
                queued += n
            with RawConn(daemon.socket) as c:
                pending = c.call("list", {"pending": True})["reservations"]
                res["active"] = _active(c)
            res["queued"] = len(pending)
            rss3 = daemon.rss()
            res["rss"] = {"before_tenants": rss0, "tenants": rss1, "reservations": rss2}
            res["rss"]["waiters"] = rss3
            res["rss_per_tenant"] = (rss1 - rss0) / max(1, params.tenants)
            res["rss_per_reservation"] = (rss2 - rss1) / max(1, params.reservations)
            say(
                f"scale: {res['active']} active, {res['queued']} queued, "
                f"RSS {rss3 / 2**20:.0f} MiB; reserve+release again"
            )
            res["loaded"] = _measure(daemon, params.clients, params.duration)
            if profile_to is not None:
                res["profile"] = profile.profiled(
                    daemon,
                    lambda: run_fleet(ResdPairs(daemon.socket, POOL), 1, params.duration),
                    profile_to,
                    f"resd loaded with {params.tenants:,} tenants, {res['active']:,} active "
                    f"reservations and {res['queued']:,} waiters; 1 client process doing "
                    f"reserve+release pairs for {params.duration:g} s, fsync=never, "
                    "sampled every 0.5 ms",
                )
                say(f"scale: wrote {res['profile']['file']}")
        finally:
            for w in waiters:
                w.close()

        # churn up to the log size
        entries, records, _ = count_wal(Path(daemon.state_dir))
        missing = params.log_records - records
        chunk = 20_000
        t = time.monotonic()
        while missing > 0:
            n = min(chunk, max(1, missing // 2))
            with RawConn(daemon.socket) as c:
                c.load(
                    (
                        "reserve",
                        {
                            "pool": POOL,
                            "tenant": f"t{i % params.tenants}",
                            "resources": {"cpu": 10},
                            "binding": "session",
                        },
                    )
                    for i in range(n)
                )
            missing -= 2 * n
        with RawConn(daemon.socket) as c:  # the last close has been handled
            deadline = time.monotonic() + 120
            while _active(c) != res["active"] and time.monotonic() < deadline:
                time.sleep(0.05)
        res["churn_s"] = time.monotonic() - t
        time.sleep(0.2)
        entries, records, size = count_wal(Path(daemon.state_dir))
        res["log"] = {"entries": entries, "records": records, "bytes": size}
        say(f"scale: log of {records} records ({entries} entries, {size / 2**20:.0f} MiB)")
        daemon.kill()

        res["restart_log_s"] = daemon.start(timeout=600)
        res["rss_after_replay"] = daemon.rss()
        with RawConn(daemon.socket) as c:
            res["active_after_replay"] = _active(c)
        res["stop_with_snapshot_s"] = daemon.stop(timeout=600)
        snap = Path(daemon.state_dir) / "snapshot.msgpack"
        res["snapshot_bytes"] = snap.stat().st_size if snap.exists() else 0
        res["restart_snapshot_s"] = daemon.start(timeout=600)
        with RawConn(daemon.socket) as c:
            res["active_after_snapshot"] = _active(c)
        daemon.stop(timeout=600)
        say(
            f"scale: restart {res['restart_log_s']:.1f} s replaying the log, "
            f"{res['restart_snapshot_s']:.1f} s from the snapshot"
        )
    expected = params.reservations + 1
    res["restored_ok"] = (
        res["active"] == expected
        and res["active_after_replay"] == expected
        and res["active_after_snapshot"] == expected
    )
    res["p99_ratio"] = {}
    for key in map(str, params.clients):
        e, loaded = res["empty"][key]["p99_ms"], res["loaded"][key]["p99_ms"]
        res["p99_ratio"][key] = loaded / e if e else float("inf")
    os.sync()
    return res
