"""Replay alone: build a write-ahead log like the scale section's, in process, then time
(and optionally profile) what a restart after SIGKILL spends on it — ``Journal.recover``
reading the segments and ``Daemon._recover`` decoding and applying every entry.

    python -m benchmarks.replay --records 1000000 --dir /tmp/replay-state   # build once
    python -m benchmarks.replay --dir /tmp/replay-state --reuse --profile /tmp/replay.prof

The log: ``tenants`` tenants (one ``tenants`` entry each), ``reservations`` detached
reservations of the scale section's mix (cpu, a tenth with a port of a range, up to
4,000 with a member of a 4,096-member set), then churn until ``records`` records:
session-bound cpu reservations of 20,000 at a time (one entry each) ended together by
their connection closing (one entry of 20,000 ``ended`` records). The RSS the replayed
books take is reported too (``ru_maxrss`` of this process, so run it once per number).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from benchmarks.scale import POOL, _pool_args, _reservation
from resd.config import Config
from resd.daemon import Daemon
from resd.journal import Journal
from resd.pools import PoolBook
from resd.records import Event, Tenant, TenantRemoved, TenantSaved, journal_events
from resd_client.protocol import PoolCreate, Reserve, from_wire

CHUNK = 20_000


def build(state_dir: Path, records: int, tenants: int, reservations: int) -> int:
    """Writes the log; returns how many records it holds."""
    shutil.rmtree(state_dir, ignore_errors=True)
    journal = Journal(state_dir, "never")
    journal.recover()
    book = PoolBook()
    now = 1_800_000_000.0
    written = 0

    def commit(domain: str, events: Sequence[Event]) -> None:
        nonlocal written
        journal_events(journal, domain, events)
        written += len(events)
        if domain == "pools":
            book.apply(e for e in events if not isinstance(e, TenantSaved | TenantRemoved))

    people = [Tenant(f"t{i}", 1, created_at=now) for i in range(tenants)]
    for t in people:
        commit("tenants", [TenantSaved(t)])
    commit("pools", book.create_pool(from_wire(PoolCreate, _pool_args(10 * reservations)), now))
    set_quota = min(reservations // 10, 4000)
    for i in range(reservations):
        args = from_wire(Reserve, _reservation(i, tenants, set_quota))
        now += 0.001
        events = book.reserve(
            args, people[i % tenants], uid=1000, session="", now=now, rid=f"r-{i:012x}"
        )
        commit("pools", events)
    serial = reservations
    while written < records:
        n = min(CHUNK, max(1, (records - written) // 2))
        session = f"c-{serial}"
        for i in range(n):
            args = Reserve(pool=POOL, resources={"cpu": 10}, binding="session")
            now += 0.001
            events = book.reserve(
                args,
                people[i % tenants],
                uid=1000,
                session=session,
                now=now,
                rid=f"r-{serial:012x}",
                peer=4242,
            )
            serial += 1
            commit("pools", events)
        commit("pools", book.end_sessions(session, now, "connection closed"))
    trio.run(journal.close)
    return written


def replay(state_dir: Path, profile: Path | None) -> tuple[float, PoolBook]:
    daemon = Daemon(Config(state_dir=str(state_dir), fsync="never"), handle_signals=False)
    journal = Journal(state_dir, "never")
    profiler = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    book, _tenants, _fresh = daemon._recover(journal)
    if profiler is not None:
        profiler.disable()
    took = time.perf_counter() - t
    trio.run(journal.close)
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
    return took, book


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/resd-replay"))
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--reservations", type=int, default=100_000)
    parser.add_argument("--reuse", action="store_true", help="replay the log already in --dir")
    parser.add_argument("--profile", type=Path, help="write a cProfile here (and print it)")
    args = parser.parse_args()
    if not args.reuse:
        t = time.perf_counter()
        n = build(args.dir, args.records, args.tenants, args.reservations)
        print(f"built {n} records in {time.perf_counter() - t:.1f} s")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    took, book = replay(args.dir, args.profile)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = sum(p.stat().st_size for p in args.dir.glob("wal-*.log"))
    print(
        f"replayed {size / 2**20:.0f} MiB in {took:.2f} s: {len(book.reservations)} active,"
        f" max RSS +{(rss1 - rss0) / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
