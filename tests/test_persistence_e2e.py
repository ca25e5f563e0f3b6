"""Persistence end to end, against real ``resd`` processes (SPEC §1, §3, §5).

A mutation is acknowledged only once durable, so whatever a client saw acknowledged must
survive ``kill -9`` of the daemon; a clean or unclean restart restores pools, tenants,
reservations and history exactly; session leases die with the connection (or with the
daemon); a torn WAL tail is truncated with a warning while real corruption stops the
daemon with a clear message instead of a silent reset.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from resd_client import Client, InsufficientError
from resd_client.protocol import Empty, Export, PoolCreate, PoolSet, TenantAdd, TenantSet, from_wire
from tests.conftest import DAEMON_ARGS, Daemons, Proc, subprocess_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

CORE = 1000  # millicores


# ---------------------------------------------------------------------------- helpers


def create_pool(client: Client, name: str, **fields: Any) -> Any:
    return client.call("pool.create", from_wire(PoolCreate, {"name": name, **fields}))


def add_tenant(client: Client, name: str, **fields: Any) -> Any:
    return client.call("tenant.add", TenantAdd(name=name, **fields))


def raw(client: Client, op: str, args: Any) -> Any:
    """The wire result of ``op`` (plain maps, compared field by field)."""
    frame = client.call_raw(op, args)
    assert frame.get("ok"), frame
    return frame["result"]


def full_state(client: Client) -> dict[str, Any]:
    """Everything a client can see of the daemon's persistent state."""
    return {
        "pools": raw(client, "pool.list", Empty()),
        # fair-share usage decays and accrues with time, restart or not
        "tenants": [
            {k: v for k, v in t.items() if k not in ("usage", "share")}
            for t in raw(client, "tenant.list", Empty())["tenants"]
        ],
        "reservations": raw(client, "list", {}),
        "history": raw(client, "export", Export()),
    }


def pool_cpu(client: Client, pool: str) -> dict[str, Any]:
    info = raw(client, "pool.show", {"name": pool})
    (cpu,) = [r for r in info["resources"] if r["name"] == "cpu"]
    return cpu  # type: ignore[no-any-return]


def run_refused(proc: Proc) -> subprocess.CompletedProcess[str]:
    """Run resd on ``proc``'s socket and state dir, expecting it to exit by itself."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "resd",
            "--socket",
            proc.socket,
            "--state-dir",
            proc.state_dir,
            *DAEMON_ARGS,
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def wal_segments(state_dir: str) -> list[Path]:
    return sorted(Path(state_dir).glob("wal-*.log"))


# ------------------------------------------------ 1. kill -9 under concurrent load

LOAD_CLIENT = textwrap.dedent(
    """
    import random, sys
    from resd_client import Client, InsufficientError, UnavailableError
    sock, pool, tenant, out, seed, max_held = sys.argv[1:7]
    rng = random.Random(int(seed))
    held = []
    with open(out, "a") as f:
        def note(line):
            f.write(line + "\\n")
            f.flush()
        try:
            c = Client(sock, name="load-" + tenant, timeout=20, reconnect=0)
            note("S")
            while True:
                if held and (len(held) >= int(max_held) or rng.random() < 0.3):
                    rid = held.pop(rng.randrange(len(held)))
                    note("P " + rid)  # release sent, not yet acknowledged
                    c.release(rid)
                    note("X " + rid)  # release acknowledged
                else:
                    try:
                        lease = c.reserve(pool, cpu="1", tenant=tenant, binding="detached",
                                          label=tenant, wait=False)
                    except InsufficientError:
                        note("I")
                        continue
                    held.append(lease.id)
                    note("R %s %s %d" % (lease.id, lease.info.tenant,
                                         lease.info.resources["cpu"]))
        except UnavailableError as exc:
            note("U " + str(exc).replace("\\n", " "))
    """
)


class LoadLog:
    """What one load client wrote: acknowledged reserves and releases."""

    def __init__(self, path: Path) -> None:
        self.reserved: dict[str, tuple[str, int]] = {}
        self.released: set[str] = set()
        self.pending_release: set[str] = set()
        self.insufficient = 0
        self.unavailable = False
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "R":
                self.reserved[parts[1]] = (parts[2], int(parts[3]))
            elif parts[0] == "P":
                self.pending_release.add(parts[1])
            elif parts[0] == "X":
                self.released.add(parts[1])
                self.pending_release.discard(parts[1])
            elif parts[0] == "I":
                self.insufficient += 1
            elif parts[0] == "U":
                self.unavailable = True


def start_load(proc: Proc, pool: str, tmp: Path, n: int, max_held: int) -> list[tuple[Any, Path]]:
    clients = []
    for i in range(n):
        out = tmp / f"load-{pool}-{i}.txt"
        args = [proc.socket, pool, f"t{i}", str(out), str(1000 + i), str(max_held)]
        with open(tmp / f"load-{pool}-{i}.err", "wb") as err:
            child = subprocess.Popen(
                [sys.executable, "-c", LOAD_CLIENT, *args],
                env=subprocess_env(),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        clients.append((child, out))
    return clients


def run_load_then_kill9(
    daemons: Daemons, pool: str, cores: int, max_held: int, n_clients: int = 4, config: str = ""
) -> tuple[Proc, list[LoadLog]]:
    proc = daemons.make(pool, config=config).start()
    with Client(proc.socket) as admin:
        create_pool(admin, pool, resources={"cpu": {"capacity": cores * CORE}}, max_per_tenant=0)
        for i in range(n_clients):
            add_tenant(admin, f"t{i}", priority=1 + i)
    clients = start_load(proc, pool, daemons.tmp, n_clients, max_held)
    try:

        def acks() -> list[int]:
            return [len(LoadLog(out).reserved) for _, out in clients]

        wait_for(lambda: min(acks()) >= 3, 15, "every load client to get reservations")
        time.sleep(1.0)  # ~1 s of concurrent load
        proc.kill9()
        for child, _ in clients:
            child.wait(15)
    finally:
        for child, _ in clients:
            if child.poll() is None:
                child.kill()
                child.wait(5)
    logs = [LoadLog(out) for _, out in clients]
    for i, log in enumerate(logs):
        err = (daemons.tmp / f"load-{pool}-{i}.err").read_text()
        assert log.unavailable, f"load client {i} did not end with UnavailableError: {err}"
    return proc, logs


def check_after_restart(proc: Proc, pool: str, logs: list[LoadLog], cores: int) -> None:
    with Client(proc.socket) as c:
        listed = {r.id: r for r in c.list(pool=pool)}
        tenants = {f"t{i}" for i in range(len(logs))}
        unknown: list[str] = []
        for log in logs:
            must_exist = set(log.reserved) - log.released - log.pending_release
            missing = must_exist - set(listed)
            assert not missing, f"acknowledged reservations lost by kill -9: {sorted(missing)}"
            resurrected = log.released & set(listed)
            assert not resurrected, f"acknowledged releases undone: {sorted(resurrected)}"
        acked = set().union(*(log.reserved for log in logs))
        for rid, r in listed.items():
            assert r.pool == pool and r.state == "active" and r.binding == "detached"
            assert r.resources == {"cpu": CORE}, r
            assert r.tenant in tenants and r.label == r.tenant, r
            if rid in acked:
                acked_as = next(log.reserved[rid] for log in logs if rid in log.reserved)
                assert (r.tenant, r.resources["cpu"]) == acked_as
            else:
                unknown.append(rid)  # durable, but killed before the reply went out
        # Each client has at most one request in flight, so at most one unacknowledged grant.
        per_tenant = {t: sum(listed[u].tenant == t for u in unknown) for t in tenants}
        assert all(n <= 1 for n in per_tenant.values()), (unknown, per_tenant)

        cpu = pool_cpu(c, pool)
        assert cpu["effective"] == cores * CORE
        assert cpu["allocated"] == sum(r.resources["cpu"] for r in listed.values())
        assert cpu["allocated"] <= cpu["effective"]
        assert cpu["available"] == cpu["effective"] - cpu["allocated"]

        # History agrees: every live reservation was reserved and never ended.
        events = raw(c, "export", Export())["events"]
        ended = {e["reservation"] for e in events if e["kind"] in ("released", "expired")}
        reserved = {e["reservation"] for e in events if e["kind"] == "reserved"}
        assert set(listed) <= reserved
        assert not set(listed) & ended

        # The daemon is usable afterwards.
        if cpu["available"] >= CORE:
            lease = c.reserve(pool, cpu="1", tenant="t0", binding="detached")
            assert pool_cpu(c, pool)["allocated"] == cpu["allocated"] + CORE
            lease.release()
        else:
            with pytest.raises(InsufficientError):
                c.reserve(pool, cpu="1", tenant="t0", binding="detached", wait=False)
            victim = next(iter(listed))
            c.release(victim)
            c.reserve(pool, cpu="1", tenant="t0", binding="detached").release()
        assert pool_cpu(c, pool)["allocated"] <= cpu["allocated"]


def test_kill9_under_concurrent_load_keeps_every_acknowledged_change(daemons: Daemons) -> None:
    cores = 200
    proc, logs = run_load_then_kill9(daemons, "big", cores=cores, max_held=40)
    total = sum(len(log.reserved) for log in logs)
    assert total >= 20, f"too little load to mean anything: {total} reservations"
    assert sum(len(log.released) for log in logs) > 0
    proc.start()
    check_after_restart(proc, "big", logs, cores)
    assert proc.stop() == 0


def test_kill9_under_contention_never_exceeds_capacity(daemons: Daemons) -> None:
    cores = 6
    proc, logs = run_load_then_kill9(daemons, "small", cores=cores, max_held=4)
    assert sum(log.insufficient for log in logs) > 0, "the pool never ran short"
    proc.start()
    check_after_restart(proc, "small", logs, cores)
    assert proc.stop() == 0


def test_kill9_while_snapshots_rotate_the_wal_under_load(daemons: Daemons) -> None:
    """Snapshots every 20 entries: segments are rotated and deleted while clients write."""
    cores = 200
    proc, logs = run_load_then_kill9(
        daemons, "snap", cores=cores, max_held=40, config="snapshot_every = 20\n"
    )
    assert proc.log_text().count('"event": "snapshot_written"') >= 5, "too few snapshots"
    assert (Path(proc.state_dir) / "snapshot.msgpack").exists()
    proc.start()
    check_after_restart(proc, "snap", logs, cores)
    assert proc.stop() == 0


# ---------------------------------------------------- 2. restart restores exactly


def populate(c: Client) -> None:
    create_pool(
        c,
        "gpu-a",
        resources={
            "cpu": {"capacity": 16 * CORE, "ratio": 4.0},
            "memory": {"capacity": 64 << 30, "ratio": 1.0},
            "licenses": {"capacity": 5, "ratio": 1.5},
        },
        max_per_tenant=2,
        preemption="lower_priority",
        placement="spread",
        grace=7.5,
        labels={"zone": "a", "tier": "gold"},
    )
    create_pool(c, "b", resources={"cpu": {"capacity": 8 * CORE}})
    add_tenant(c, "alice", priority=8, owners=[1000, 1001], groups=[50], weight=2.5)
    add_tenant(c, "bob", priority=2)
    add_tenant(c, "carol", priority=5, owners=[os.getuid()])
    a = c.reserve(
        "gpu-a",
        cpu="2",
        memory="8G",
        resources={"licenses": 1},
        tenant="alice",
        ttl=3600,
        binding="detached",
        label="train-1",
        reclaimable=True,
    )
    c.reserve("gpu-a", cpu="500m", tenant="alice", binding="detached", label="α ü")
    c.reserve("gpu-a", cpu="1", tenant="bob", binding="detached")
    c.reserve("b", cpu="4", tenant="carol", ttl=7200.25, binding="detached", label="etl")
    gone = c.reserve("b", cpu="1", tenant="bob", binding="detached")
    a.renew(5000)
    gone.release()
    with pytest.raises(InsufficientError):
        c.reserve("b", cpu="100", tenant="bob", binding="detached", wait=False)
    with pytest.raises(Exception, match="already holds"):
        c.reserve("gpu-a", cpu="1", tenant="alice", binding="detached", wait=False)
    c.call("tenant.set", from_wire(TenantSet, {"name": "bob", "priority": 3}))
    c.call("pool.set", from_wire(PoolSet, {"name": "b", "max_per_tenant": 0, "labels": {"k": "v"}}))


def more_changes(c: Client) -> None:
    create_pool(c, "late", resources={"disk": {"capacity": 500 << 30}}, max_per_tenant=3)
    add_tenant(c, "dave", priority=10, groups=[7, 8])
    r = c.reserve("late", resources={"disk": "20G"}, tenant="dave", ttl=900, binding="detached")
    c.reserve("b", cpu="1500m", tenant="dave", binding="detached", label="after-snapshot")
    r.renew(1800)
    bob = c.list(tenant="bob")
    c.release(bob[0].id)


def test_restart_restores_exactly(daemons: Daemons) -> None:
    proc = daemons.make().start()
    with Client(proc.socket) as c:
        populate(c)
        before = full_state(c)
    assert len(before["reservations"]["reservations"]) == 4
    kinds = [e["kind"] for e in before["history"]["events"]]
    assert {"reserved", "released", "renewed", "denied"} <= set(kinds), kinds

    # kill -9 with only a WAL (no snapshot yet): replay restores everything.
    proc.kill9()
    assert not (Path(proc.state_dir) / "snapshot.msgpack").exists()
    proc.start()
    with Client(proc.socket) as c:
        assert full_state(c) == before

    # Clean SIGTERM restart (snapshot).
    assert proc.stop() == 0
    proc.start()
    with Client(proc.socket) as c:
        assert full_state(c) == before
        more_changes(c)
        after = full_state(c)
    assert after != before

    # kill -9 with a snapshot plus a WAL on top of it.
    proc.kill9()
    assert wal_segments(proc.state_dir), "changes after the snapshot should be in a WAL segment"
    proc.start()
    with Client(proc.socket) as c:
        assert full_state(c) == after
    assert proc.stop() == 0
    proc.start()
    with Client(proc.socket) as c:
        assert full_state(c) == after
    assert proc.stop() == 0


# ------------------------------------------------------------ 3. session-bound leases

HOLDER = textwrap.dedent(
    """
    import sys, time
    from resd_client import Client
    sock, out = sys.argv[1:3]
    c = Client(sock, name="holder")
    s = c.reserve("p", cpu="1", binding="session", label="session-one")
    d = c.reserve("p", cpu="2", binding="detached", label="detached-one")
    with open(out + ".tmp", "w") as f:
        f.write(s.id + " " + d.id + "\\n")
    import os
    os.replace(out + ".tmp", out)
    time.sleep(120)
    """
)


def start_holder(proc: Proc, tmp: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """A client process holding one session and one detached lease; returns its ids."""
    out = tmp / f"holder-{time.monotonic_ns()}.txt"
    err = tmp / (out.name + ".err")
    with err.open("wb") as err_file:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, proc.socket, str(out)],
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    try:
        wait_for(lambda: out.exists() or child.poll() is not None, 15, "the holder's leases")
        if not out.exists():
            raise AssertionError(f"holder failed: {err.read_text()}")
    except BaseException:
        child.kill()
        child.wait(5)
        raise
    session_id, detached_id = out.read_text().split()
    return child, session_id, detached_id


def test_session_lease_ends_with_daemon_restart_detached_survives(daemons: Daemons) -> None:
    """With ``reattach_grace = 0`` a restart ends session leases, as before issue 9."""
    proc = daemons.make(config="reattach_grace = 0\n").start()
    with Client(proc.socket) as c:
        create_pool(c, "p", resources={"cpu": {"capacity": 8 * CORE}}, max_per_tenant=0)
    child, session_id, detached_id = start_holder(proc, daemons.tmp)
    try:
        with Client(proc.socket) as c:
            assert {r.id: r.binding for r in c.list()} == {
                session_id: "session",
                detached_id: "detached",
            }
        proc.kill9()
        proc.start()
        with Client(proc.socket) as c:
            listed = c.list()
            assert [r.id for r in listed] == [detached_id]
            assert listed[0].label == "detached-one" and listed[0].resources == {"cpu": 2 * CORE}
            assert pool_cpu(c, "p")["allocated"] == 2 * CORE
            events = [
                e for e in raw(c, "export", Export())["events"] if e["reservation"] == session_id
            ]
            assert [e["kind"] for e in events] == ["reserved", "released"], events
            assert "restart" in events[1]["detail"], events[1]
        # The release is itself durable: another unclean restart does not resurrect it.
        proc.kill9()
        proc.start()
        with Client(proc.socket) as c:
            assert [r.id for r in c.list()] == [detached_id]
            kinds = [
                e["kind"]
                for e in raw(c, "export", Export())["events"]
                if e["reservation"] == session_id
            ]
            assert kinds == ["reserved", "released"]
        assert proc.stop() == 0
    finally:
        child.kill()
        child.wait(5)


def test_session_lease_waits_for_its_holder_after_a_restart(daemons: Daemons) -> None:
    """Default: a session lease outlives a kill -9 restart for ``reattach_grace``; its
    holder died meanwhile, so it is then released, and history says why."""
    proc = daemons.make(config="reattach_grace = 1.5\n").start()
    with Client(proc.socket) as c:
        create_pool(c, "p", resources={"cpu": {"capacity": 8 * CORE}}, max_per_tenant=0)
    child, session_id, detached_id = start_holder(proc, daemons.tmp)
    proc.kill9()
    child.kill()
    child.wait(5)
    proc.start()
    with Client(proc.socket) as c:
        assert {r.id for r in c.list()} == {session_id, detached_id}, "held for its client"
        wait_for(lambda: [r.id for r in c.list()] == [detached_id], 10, "the orphan's release")
        events = [e for e in raw(c, "export", Export())["events"] if e["reservation"] == session_id]
        assert [e["kind"] for e in events] == ["reserved", "released"], events
        assert "not re-attached within 1.5s" in events[-1]["detail"]
    assert proc.stop() == 0


def test_session_lease_released_promptly_when_client_is_killed(daemons: Daemons) -> None:
    proc = daemons.make().start()
    with Client(proc.socket) as c:
        create_pool(c, "p", resources={"cpu": {"capacity": 8 * CORE}}, max_per_tenant=0)
        child, session_id, detached_id = start_holder(proc, daemons.tmp)
        try:
            assert {r.id for r in c.list()} == {session_id, detached_id}
            child.send_signal(signal.SIGKILL)
            child.wait(5)
            killed = time.monotonic()
            wait_for(
                lambda: {r.id for r in c.list()} == {detached_id},
                2.0,
                "the session lease of the killed client to be released",
            )
            assert time.monotonic() - killed < 2.0
        finally:
            child.kill()
            child.wait(5)
        assert pool_cpu(c, "p")["allocated"] == 2 * CORE
        events = [e for e in raw(c, "export", Export())["events"] if e["reservation"] == session_id]
        assert [e["kind"] for e in events] == ["reserved", "released"]
        assert "session" in events[1]["detail"]
    # ... and that release is durable.
    proc.kill9()
    proc.start()
    with Client(proc.socket) as c:
        assert [r.id for r in c.list()] == [detached_id]
    assert proc.stop() == 0


@pytest.mark.parametrize("grace", [0, 60])
def test_session_lease_across_a_clean_restart(daemons: Daemons, grace: int) -> None:
    """SIGTERM (``systemctl restart``): held for its client by default, ended with
    ``reattach_grace = 0`` as before issue 9."""
    proc = daemons.make(config=f"reattach_grace = {grace}\n").start()
    with Client(proc.socket) as c:
        create_pool(c, "p", resources={"cpu": {"capacity": 8 * CORE}}, max_per_tenant=0)
    child, session_id, detached_id = start_holder(proc, daemons.tmp)
    try:
        assert proc.stop() == 0
    finally:
        child.kill()
        child.wait(5)
    proc.start()
    with Client(proc.socket) as c:
        events = [e for e in raw(c, "export", Export())["events"] if e["reservation"] == session_id]
        if grace:
            assert {r.id for r in c.list()} == {session_id, detached_id}
            assert pool_cpu(c, "p")["allocated"] == 3 * CORE
            assert [e["kind"] for e in events] == ["reserved"], events
        else:
            assert [r.id for r in c.list()] == [detached_id]
            assert pool_cpu(c, "p")["allocated"] == 2 * CORE
            assert [e["kind"] for e in events] == ["reserved", "released"], events
    assert proc.stop() == 0


def test_ttl_that_ran_out_while_down_expires_at_startup(daemons: Daemons) -> None:
    proc = daemons.make().start()
    with Client(proc.socket) as c:
        create_pool(c, "p", resources={"cpu": {"capacity": 8 * CORE}}, max_per_tenant=0)
        short = c.reserve("p", cpu="1", ttl=0.5, binding="detached")
        keep = c.reserve("p", cpu="2", ttl=3600, binding="detached")
    proc.kill9()
    assert short.info.expires_at is not None
    time.sleep(0.8)
    proc.start()
    with Client(proc.socket) as c:
        wait_for(lambda: [r.id for r in c.list()] == [keep.id], 2, "the overdue lease to expire")
        assert pool_cpu(c, "p")["allocated"] == 2 * CORE
        events = [e for e in raw(c, "export", Export())["events"] if e["reservation"] == short.id]
        assert [e["kind"] for e in events] == ["reserved", "expired"], events
    assert proc.stop() == 0


# ------------------------------------------------------------------ 4. torn tail


def entry_bytes(lsn: int, domain: str, records: list[Any]) -> bytes:
    payload: bytes = msgpack.packb({"lsn": lsn, "d": domain, "r": records}, use_bin_type=True)
    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def entry_offsets(data: bytes) -> list[int]:
    """Offsets of each entry in a segment (after the 12-byte header)."""
    offsets, offset = [], 12
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 8 + length
    assert offset == len(data)
    return offsets


def prepare_wal(daemons: Daemons) -> tuple[Proc, dict[str, Any], Path]:
    """A daemon with pools/tenants/reservations in its WAL, killed -9 (no snapshot)."""
    proc = daemons.make().start()
    with Client(proc.socket) as c:
        create_pool(c, "p", resources={"cpu": {"capacity": 8 * CORE}}, max_per_tenant=0)
        add_tenant(c, "t", priority=6)
        for i in range(4):
            c.reserve("p", cpu="1", tenant="t", binding="detached", label=f"r{i}")
        c.release(c.list()[0].id)
        state = full_state(c)
    proc.kill9()
    segments = wal_segments(proc.state_dir)
    assert segments, "expected a WAL segment after kill -9"
    return proc, state, segments[-1]


TORN_TAILS = {
    "garbage": b"\x07\x13",  # not even an entry header
    "half-header": b"\x00\x00\x01",
    "half-record": entry_bytes(99, "pools", [{"t": "nothing", "x": "y" * 40}])[:30],
    "zeros": b"\x00" * 64,  # preallocated-but-unwritten blocks
}


@pytest.mark.parametrize("tail", list(TORN_TAILS), ids=list(TORN_TAILS))
def test_torn_tail_is_truncated_with_a_warning(daemons: Daemons, tail: str) -> None:
    proc, state, wal = prepare_wal(daemons)
    intact = wal.read_bytes()
    with wal.open("ab") as f:
        f.write(TORN_TAILS[tail])
    log_before = len(proc.log_text())
    proc.start()
    fresh_log = proc.log_text()[log_before:]
    assert "torn" in fresh_log and "truncat" in fresh_log, fresh_log
    assert '"level": "warning"' in fresh_log
    assert wal.read_bytes() == intact, "the torn tail should have been cut off"
    with Client(proc.socket) as c:
        assert full_state(c) == state
        # New appends land after the cut, so they replay after another crash.
        lease = c.reserve("p", cpu="2", tenant="t", binding="detached", label="after")
        state = full_state(c)
    proc.kill9()
    proc.start()
    with Client(proc.socket) as c:
        assert full_state(c) == state
        assert lease.id in {r.id for r in c.list()}
    assert proc.stop() == 0


def test_corrupt_record_in_the_middle_stops_the_daemon(daemons: Daemons) -> None:
    proc, _, wal = prepare_wal(daemons)
    data = bytearray(wal.read_bytes())
    offsets = entry_offsets(bytes(data))
    assert len(offsets) >= 4
    target = offsets[1] + 8 + 5  # a payload byte of the second entry: crc no longer matches
    data[target] ^= 0xFF
    wal.write_bytes(bytes(data))
    before = wal.read_bytes()
    snapshot_before = sorted(p.name for p in Path(proc.state_dir).iterdir())

    os.unlink(proc.socket)  # left by kill -9; a serving daemon would re-create it
    result = run_refused(proc)
    assert result.returncode != 0
    assert result.returncode != -signal.SIGKILL
    err = result.stderr
    assert wal.name in err and f"offset {offsets[1]}" in err, err
    assert "crc" in err and "refuses to start" in err, err
    assert "Traceback" not in err, err
    assert '"event": "ready"' not in result.stdout + err
    assert not os.path.exists(proc.socket), "resd must not start serving"
    # Nothing was reset or truncated.
    assert wal.read_bytes() == before
    assert sorted(p.name for p in Path(proc.state_dir).iterdir()) == snapshot_before


def test_corrupt_snapshot_stops_the_daemon(daemons: Daemons) -> None:
    proc = daemons.make().start()
    with Client(proc.socket) as c:
        create_pool(c, "p", resources={"cpu": {"capacity": 8 * CORE}}, max_per_tenant=0)
        c.reserve("p", cpu="1", binding="detached")
    assert proc.stop() == 0
    snap = Path(proc.state_dir) / "snapshot.msgpack"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x55
    snap.write_bytes(bytes(data))
    result = run_refused(proc)
    assert result.returncode == 1, result.stderr
    assert "snapshot.msgpack" in result.stderr and "refuses to start" in result.stderr
    assert "Traceback" not in result.stderr
    assert snap.read_bytes() == bytes(data)
    assert not os.path.exists(proc.socket)


def test_bad_entry_header_in_the_middle_stops_the_daemon(daemons: Daemons) -> None:
    """An absurd length field before the last entry is corruption, not a torn tail."""
    proc, _, wal = prepare_wal(daemons)
    data = bytearray(wal.read_bytes())
    offsets = entry_offsets(bytes(data))
    struct.pack_into(">I", data, offsets[2], 0xFFFFFFF0)
    wal.write_bytes(bytes(data))
    os.unlink(proc.socket)
    result = run_refused(proc)
    assert result.returncode == 1, result.stderr
    assert "invalid entry length" in result.stderr and "refuses to start" in result.stderr
    assert wal.read_bytes() == bytes(data)
    assert not os.path.exists(proc.socket)
