"""Crash campaign (issue 10; SPEC §5, §9): kill -9 a real resd again and again while
eight client processes change everything they can, and after every restart check
that nothing acknowledged was lost or undone.

The daemon runs with ``fsync = always`` and a snapshot every 7 journal entries, so
kills land inside snapshot writing and segment rotation too. Six load clients live
for one cycle and die with the daemon (``reconnect=0``); two live for the whole
campaign, reconnect by themselves and must find their session leases re-attached.
The clients log every intent and every acknowledgement (``tests.campaign``); after
each restart the driver re-sends each reserve that was in flight, with its token
(it must get the reservation the first attempt made, never a second one), then
checks the daemon against the logs: every acknowledged reservation is there or
ended legitimately (history says: released by a client that asked, expired no
earlier than its latest acknowledged expiry, preempted in a pool that allows it);
no acknowledged release is undone; allocated is the sum of what is held and never
above capacity; capacities and priorities are the last acknowledged (or a later
unanswered) value; waiters keep their relative order across the restart.

The long version (100 cycles) runs with ``-m campaign``; three cycles run by default.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from resd_client import Client, InsufficientError, ResdError, UnavailableError
from resd_client import _core as core
from resd_client.protocol import (
    FrameDecoder,
    Hello,
    PoolCreate,
    Reserve,
    ResourceSpec,
    TenantAdd,
    encode_frame,
    request,
)
from tests.campaign import (
    CAPACITY,
    POOL_A,
    POOL_B,
    RECONNECTING,
    TRANSIENT,
    Ledger,
    check_books,
    ordered_subsequence,
    priority_of,
    wire,
)
from tests.conftest import Daemons, Proc, subprocess_env, wait_for
from tests.test_persistence_e2e import entry_offsets, wal_segments
from tests.test_reconnect_core import FakeHost, info, sent, step

pytestmark = [pytest.mark.slow]

CONFIG = "snapshot_every = 7\nreattach_grace = 3\n"
GRACE = 0.3  # pool a's preemption grace: kills land inside grace periods too
CHILD = "import sys; from tests.campaign import crash_client; crash_client()"
#: log lines that answer a request (see ``tests.campaign.Ledger``)
OUTCOMES = frozenset("RFXGNKTYE")
#: slack for wall-clock comparisons between the daemon's history and our reads
SLACK = 0.25


@dataclass
class Figures:
    """What one campaign did and checked (printed at the end)."""

    cycles: int = 0
    acknowledged: int = 0
    reservations_checked: int = 0
    lost: int = 0
    kills_in_snapshot: int = 0
    most_segments: int = 0
    in_flight_durable: int = 0
    retried_same: int = 0
    retried_new: int = 0
    waiters_compared: int = 0
    reattached: int = 0
    reconnections: int = 0
    ends: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"crash campaign: {self.cycles} kill -9 cycles in {self.seconds:.0f}s;"
            f" {self.acknowledged} acknowledged changes checked"
            f" ({self.reservations_checked} reservations), lost {self.lost};"
            f" kills during a snapshot write {self.kills_in_snapshot},"
            f" most WAL segments at a kill {self.most_segments};"
            f" in-flight reserves found durable {self.in_flight_durable};"
            f" retried by token: same id {self.retried_same}, new {self.retried_new};"
            f" waiters order-checked {self.waiters_compared};"
            f" reconnections {self.reconnections}, session leases re-attached {self.reattached};"
            f" ends {dict(self.ends)}"
        )


class Campaign:
    """The driver: one daemon, the load clients, the checks."""

    def __init__(self, daemons: Daemons, seed: int) -> None:
        self.dir = daemons.tmp / "crash"
        self.dir.mkdir()
        self.proc = daemons.make("crash", config=CONFIG)
        self.rng = random.Random(seed)
        self.seed = seed
        self.pause = self.dir / "pause"
        self.driver_log = self.dir / "driver.log"
        self.children: list[subprocess.Popen[bytes]] = []
        self.reconnecting: dict[int, subprocess.Popen[bytes]] = {}
        self.fig = Figures()
        self.stopped = False  # the reconnecting clients were stopped

    # ---------------------------------------------------------------- plumbing

    def admin(self) -> Client:
        return Client(self.proc.socket, name="crash-driver", timeout=30, reconnect=0)

    def note(self, *parts: object) -> None:
        with self.driver_log.open("a") as f:
            f.write(" ".join(str(p) for p in parts) + "\n")

    def spawn(self, index: int, name: str, seed: int, reconnect: float) -> subprocess.Popen[bytes]:
        args = [self.proc.socket, str(self.dir / f"{name}.log"), str(index), str(seed)]
        with (self.dir / f"{name}.err").open("ab") as err:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, *args, str(reconnect), str(self.pause)],
                env=subprocess_env(),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.children.append(child)
        return child

    def logs(self) -> list[Path]:
        return [
            self.driver_log,
            *sorted(self.dir.glob("c*.log")),
            *sorted(self.dir.glob("r*.log")),
        ]

    def ledger(self) -> Ledger:
        return Ledger.read(self.logs())

    def stderr(self, name: str) -> str:
        path = self.dir / f"{name}.err"
        return path.read_text()[-3000:] if path.exists() else ""

    def cleanup(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait(10)

    # ------------------------------------------------------------------- phases

    def setup(self) -> None:
        self.proc.start()
        with self.admin() as c:
            for pool, preemption, grace in ((POOL_A, "lower_priority", GRACE), (POOL_B, "off", 0)):
                c.call(
                    "pool.create",
                    PoolCreate(
                        name=pool,
                        resources={"cpu": ResourceSpec(capacity=CAPACITY[pool])},
                        max_per_tenant=0,
                        preemption=preemption,  # type: ignore[arg-type]
                        grace=grace,
                    ),
                )
                self.note("K", pool, CAPACITY[pool])
            for i in [*TRANSIENT, *RECONNECTING]:
                c.call("tenant.add", TenantAdd(name=f"t{i}", priority=priority_of(i)))
                self.note("T", f"t{i}", priority_of(i))
        for i in RECONNECTING:
            self.reconnecting[i] = self.spawn(i, f"r{i}", self.seed * 1000 + i, reconnect=60)

    def cycle(self, n: int) -> None:
        names = {i: f"c{i}-{n:03d}" for i in TRANSIENT}
        kids = {i: self.spawn(i, names[i], self.seed * 1000 + n * 10 + i, 0) for i in TRANSIENT}

        def under_way(i: int) -> bool:
            log = self.dir / f"{names[i]}.log"
            if kids[i].poll() is not None:
                return True
            text = log.read_text() if log.exists() else ""
            return sum(line[:1] in OUTCOMES for line in text.splitlines()) >= 4

        wait_for(lambda: all(under_way(i) for i in TRANSIENT), 60, "load clients to get going")
        for i, kid in kids.items():
            assert kid.poll() is None, f"load client {i} ended early: {self.stderr(names[i])}"
        time.sleep(self.rng.uniform(0.05, 0.6))
        with self.admin() as c:
            before = c.list(pending=True)
        self.proc.kill9()
        self.fig.cycles += 1
        state = Path(self.proc.state_dir)
        self.fig.kills_in_snapshot += any(state.glob("snapshot*.tmp"))
        self.fig.most_segments = max(self.fig.most_segments, len(list(state.glob("wal-*.log"))))
        killed = time.monotonic()
        for i, kid in kids.items():
            kid.wait(40)
            # a wait answered 'pending' just before the connection closed used to end
            # only after its timeout (test_a_wait_answered_as_the_connection_closes_ends)
            assert time.monotonic() - killed <= 3, (
                f"load client {i} took {time.monotonic() - killed:.0f}s to notice that the"
                " daemon died"
            )
            log = (self.dir / f"{names[i]}.log").read_text().splitlines()
            assert log and log[-1].startswith("U "), (
                f"load client {i} did not end with the daemon: {log[-3:]}\n{self.stderr(names[i])}"
            )
        self.proc.start()
        with self.admin() as c:
            after = c.list(pending=True)
        self.check_queue_order(before, after)
        self.retry_in_flight(n)
        self.pause_reconnecting(f"cycle-{n}")
        self.check()
        self.pause.unlink()

    def pause_reconnecting(self, word: str) -> None:
        """Have the reconnecting clients stop between two operations (``stop``: close
        and exit) so that what the checks read is consistent with their logs."""
        tmp = self.pause.with_suffix(".tmp")
        tmp.write_text(word)
        tmp.replace(self.pause)
        for i, child in self.reconnecting.items():
            log = self.dir / f"r{i}.log"

            def paused(
                log: Path = log, child: subprocess.Popen[bytes] = child, name: str = f"r{i}"
            ) -> bool:
                if word == "stop":
                    return child.poll() is not None
                assert child.poll() is None, f"client {name} died: {self.stderr(name)}"
                return f"Z {word}\n" in log.read_text()

            wait_for(paused, 30, f"client r{i} to pause ({word})")

    # ------------------------------------------------------------------- checks

    def check_queue_order(self, before: list[Any], after: list[Any]) -> None:
        """Waiters seen before the kill that are still waiting after the restart keep
        their relative order (each tenant has its own priority: the order is stable)."""
        for pool in (POOL_A, POOL_B):
            b = [w.id for w in before if w.pool == pool]
            a = [w.id for w in after if w.pool == pool]
            moved = list(ordered_subsequence(b, a))
            assert not moved, f"pool {pool}: waiters changed order across a restart: {b} -> {a}"
            self.fig.waiters_compared += len(set(a) & set(b))

    def retry_in_flight(self, n: int) -> None:
        """Send again, with the same token, each detached reserve that was in flight
        when the daemon died: it gets the reservation the first attempt made (when
        that was durable), never a second one."""
        ledger = self.ledger()
        with self.admin() as c:
            by_label = {r.label: r for r in c.list()}
            for name, intent in ledger.in_flight.items():
                if not name.endswith(f"-{n:03d}") or intent[0] != "q":
                    continue
                ask = ledger.asks[intent[1]]
                if ask.binding != "detached" or ask.wait:
                    continue
                first = by_label.get(ask.label)
                self.fig.in_flight_durable += first is not None
                args = Reserve(
                    pool=ask.pool,
                    resources={"cpu": ask.cpu},
                    tenant=f"t{ask.index}",
                    ttl=ask.ttl,
                    binding="detached",
                    label=ask.label,
                    token=ask.token,
                )
                try:
                    info = c.call("reserve", args)
                except ResdError as exc:
                    assert first is None, f"retry of {ask.label} refused ({exc!r}), first: {first}"
                    self.note("F", ask.label, exc.code)
                    continue
                # it must not come back from the crash as a waiter
                # (test_a_request_that_would_not_wait_never_waits_after_a_crash)
                assert info.state != "pending", (
                    f"re-sent reserve {ask.label} (wait=False) answered pending: {info}"
                )
                if first is not None:
                    assert info.id == first.id, f"retry of {ask.label} made a second reservation"
                    self.fig.retried_same += 1
                else:
                    self.fig.retried_new += 1
                self.note(
                    "R", info.id, ask.label, "detached", ask.pool, ask.cpu, info.expires_at or "-"
                )
            labels = Counter(r.label for r in c.list())
            assert all(k == 1 for k in labels.values()), f"duplicated: {labels.most_common(3)}"

    def check(self) -> None:
        """The daemon against the ledger (see the module docstring)."""
        listed_at = time.time()
        with self.admin() as c:
            live = {r["id"]: r for r in wire(c, "list", {})["reservations"]}
            books = {p: wire(c, "resources", {"pool": p}) for p in (POOL_A, POOL_B)}
            pools = {p["name"]: p for p in wire(c, "pool.list", {})["pools"]}
            tenants = {t["name"]: t for t in wire(c, "tenant.list", {})["tenants"]}
            history = wire(c, "export", {})["events"]
        ledger = self.ledger()
        ends: dict[str, dict[str, Any]] = {}
        reserved: set[str] = set()
        for e in history:
            if e["kind"] in ("released", "expired", "preempted"):
                assert e["reservation"] not in ends, f"ended twice: {ends[e['reservation']]}, {e}"
                ends[e["reservation"]] = e
            elif e["kind"] == "reserved":
                reserved.add(e["reservation"])
        problems: list[str] = []

        # 1. every acknowledged reservation is live, or ended for a reason history gives
        for rid, ack in ledger.acks.items():
            # a reconnecting client's session and pid leases live as long as it does
            must_stay = ack.binding == "detached" or (ack.reconnecting and not self.stopped)
            if rid in live:
                if rid in ledger.released:
                    problems.append(f"acknowledged release of {rid} undone")
                continue
            end = ends.get(rid)
            if end is None:
                problems.append(f"LOST: acknowledged {ack} is neither live nor ended")
                continue
            kind = end["kind"]
            if kind == "released" and must_stay and rid not in ledger.release_sent:
                problems.append(f"{ack} released though nobody asked: {end['detail']!r}")
            elif kind == "expired":
                expiry = ledger.expires.get(rid)
                if expiry is None and rid not in ledger.renew_unsure:
                    problems.append(f"{ack} expired without a ttl: {end}")
                elif (
                    expiry is not None
                    and rid not in ledger.renew_unsure
                    and end["at"] < expiry - SLACK
                ):
                    problems.append(f"{ack} expired at {end['at']}, acknowledged until {expiry}")
            elif kind == "preempted" and ack.pool != POOL_A:
                problems.append(f"{ack} preempted in pool {ack.pool}, whose preemption is off")

        # 2. acknowledged releases and evictions stay done
        for rid in ledger.released & set(live):
            problems.append(f"released {rid} is live again: {live[rid]}")
        for rid in set(ledger.victims) & set(live):
            if live[rid]["state"] != "terminating":
                problems.append(f"preempted {rid} is {live[rid]['state']}")

        # 3. every live reservation was asked for once, and history agrees
        labels = Counter(r["label"] for r in live.values())
        problems += [f"{k} reservations labelled {label}" for label, k in labels.items() if k > 1]
        for rid, r in live.items():
            ask = ledger.asks.get(r["label"])
            if ask is None:
                problems.append(f"live {rid} was never asked for: {r}")
                continue
            if (r["tenant"], r["pool"], r["resources"]) != (
                f"t{ask.index}",
                ask.pool,
                {"cpu": ask.cpu},
            ):
                problems.append(f"live {r} does not match its request {ask}")
            if rid not in ledger.acks and ledger.resolved.get(ask.label, "R") != "R":
                problems.append(f"live {rid} was refused ({ledger.resolved[ask.label]}): {r}")
            if rid not in reserved:
                problems.append(f"live {rid} has no 'reserved' event")
            end = ends.get(rid)
            if end is not None and end["at"] < listed_at - SLACK:
                problems.append(f"live {rid} ended before it was listed: {end}")
            expiry = None if rid in ledger.renew_unsure else ledger.expires.get(rid)
            if expiry is not None and (
                r["expires_at"] is None or abs(r["expires_at"] - expiry) > 1e-3
            ):
                problems.append(f"{rid} expires at {r['expires_at']}, acknowledged {expiry}")

        # reconnecting clients found every lease they hold re-attached or ended for a reason
        for rid, how, why in ledger.ended_seen:
            if how not in ("expired", "preempted"):
                problems.append(f"a reconnecting client's lease {rid} ended {how}: {why}")

        # 4. books: allocated is what is held, within capacity (one atomic read per pool)
        for pool, view in books.items():
            cpu = view["resources"]["cpu"]
            held = sum(a["cpu"] for a in view["allocations"])
            if cpu["allocated"] != held or not 0 <= cpu["allocated"] <= cpu["effective_limit"]:
                problems.append(f"pool {pool}: {cpu} but reservations hold {held}")
            if cpu["available"] != cpu["effective_limit"] - cpu["allocated"]:
                problems.append(f"pool {pool}: available wrong: {cpu}")

        # 5. settings: the last acknowledged value, or one asked for after it
        for pool, changes in ledger.capacity.items():
            (cpu_res,) = [x for x in pools[pool]["resources"] if x["name"] == "cpu"]
            if cpu_res["capacity"] not in Ledger.allowed(changes):
                problems.append(f"pool {pool} capacity {cpu_res['capacity']}: {changes[-3:]}")
        for name, changes in ledger.priority.items():
            acked = any(kind.isupper() for kind, _ in changes)
            if name not in tenants:
                if acked:
                    problems.append(f"LOST: acknowledged tenant {name} is gone")
            elif tenants[name]["priority"] not in Ledger.allowed(changes):
                problems.append(f"tenant {name} priority {tenants[name]['priority']}: {changes}")

        assert not problems, "\n".join(problems[:40])
        self.fig.lost = 0
        self.fig.acknowledged = ledger.acknowledged
        self.fig.reservations_checked = len(ledger.acks)
        self.fig.reconnections = sum(ledger.reconnections.values())
        self.fig.ends = Counter(e["kind"] for e in ends.values())
        mine = {rid for rid, a in ledger.acks.items() if a.reconnecting and a.binding == "session"}
        self.fig.reattached = len(
            {e["reservation"] for e in history if e["kind"] == "reattached"} & mine
        )

    def finish(self, quiet: bool) -> None:
        """Stop the reconnecting clients and check a clean (SIGTERM) restart; with
        ``quiet``, first let the orphans' grace run out, and check the books and the
        empty queue of a daemon where nothing moves any more."""
        self.pause_reconnecting("stop")
        self.stopped = True
        for i in RECONNECTING:
            log = (self.dir / f"r{i}.log").read_text()
            assert log.count("\nC ") >= self.fig.cycles, f"r{i} missed reconnections: {log[-500:]}"
        if quiet:
            time.sleep(3.5)  # reattach_grace: orphans of the last cycle are released
        assert self.proc.stop() == 0, self.proc.log_text()[-3000:]
        self.proc.start()
        self.check()
        if not quiet:
            assert self.proc.stop() == 0, self.proc.log_text()[-3000:]
            return
        with self.admin() as c:
            checked = check_books(
                wire(c, "pool.list", {})["pools"], wire(c, "list", {})["reservations"]
            )
            assert checked == 2
            assert wire(c, "list", {"pending": True})["reservations"] == []
        assert self.proc.stop() == 0, self.proc.log_text()[-3000:]


@pytest.fixture
def campaign(daemons: Daemons) -> Iterator[Campaign]:
    run = Campaign(daemons, seed=int(time.time()) % 100_000)
    try:
        yield run
    finally:
        run.cleanup()


def run_campaign(run: Campaign, cycles: int, capsys: pytest.CaptureFixture[str]) -> Figures:
    started = time.monotonic()
    try:
        run.setup()
        for n in range(cycles):
            run.cycle(n)
        run.finish(quiet=cycles > 10)
    except Exception as exc:
        kept = tempfile.mkdtemp(prefix=f"resd-crash-campaign-{run.seed}-")
        shutil.copytree(
            run.dir.parent, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock")
        )
        exc.add_note(f"the campaign's logs and state are kept in {kept}")
        raise
    run.fig.seconds = time.monotonic() - started
    with capsys.disabled():
        print(f"\n{run.fig.line()} (seed {run.seed})")
    return run.fig


@pytest.mark.timeout(180)
def test_crash_campaign_short(campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
    fig = run_campaign(campaign, 3, capsys)
    assert fig.acknowledged > 50, fig


@pytest.mark.campaign
@pytest.mark.timeout(3600)
def test_crash_campaign_100_kills(campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
    fig = run_campaign(campaign, 100, capsys)
    assert fig.acknowledged > 5000, fig
    assert fig.kills_in_snapshot > 0, "no kill landed inside a snapshot write"
    assert fig.retried_same > 0, "no in-flight reserve was durable: the token retry went untested"
    assert fig.reattached > 0, fig


def test_retried_reserve_after_kill_returns_the_first_attempt(daemons: Daemons) -> None:
    """Pipeline reserves with tokens, kill -9 after reading some of the replies, and
    send each again with its token: an acknowledged or otherwise durable first
    attempt comes back (same id), the others are made now; never two reservations
    for one request."""
    proc: Proc = daemons.make("retry", config="reattach_grace = 3\n").start()
    with Client(proc.socket, reconnect=0) as c:
        c.call(
            "pool.create",
            PoolCreate(name="p", resources={"cpu": ResourceSpec(capacity=10**6)}, max_per_tenant=0),
        )
    same = new = 0
    for round_, read in enumerate((0, 10, 30)):
        asks = [
            Reserve(
                pool="p",
                resources={"cpu": 1000},
                binding="detached" if i % 2 else "session",
                label=f"r{round_}-{i}",
                token=f"retry-token-{round_}-{i:04d}-xxxxxxxx",
            )
            for i in range(40)
        ]
        acked: dict[str, str] = {}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(proc.socket)
            data = encode_frame(request(0, "hello", Hello(version=1, client="retry")))
            data += b"".join(encode_frame(request(i + 1, "reserve", a)) for i, a in enumerate(asks))
            raw.sendall(data)
            decoder = FrameDecoder()
            while len(acked) < read:
                decoder.feed(raw.recv(1 << 16))
                for frame in decoder.frames():
                    if frame.get("id") and frame.get("ok"):
                        acked[asks[frame["id"] - 1].label] = frame["result"]["id"]
            proc.kill9()
        proc.start()
        with Client(proc.socket, reconnect=0) as c:
            first = {r.label: r.id for r in c.list(pool="p")}
            assert set(acked) <= set(first), "acknowledged reservations lost"
            for a in asks:
                info = c.call("reserve", a)
                if a.label in first:
                    assert info.id == first[a.label], (a.label, info, first[a.label])
                    same += 1
                else:
                    new += 1
            labels = Counter(r.label for r in c.list(pool="p"))
            assert all(k == 1 for k in labels.values()), labels
            assert all(labels[a.label] == 1 for a in asks), labels
    assert same >= 40 and same + new == 120, (same, new)
    assert proc.stop() == 0


def test_a_request_that_would_not_wait_never_waits_after_a_crash(daemons: Daemons) -> None:
    """``wait=False`` means: granted now, or refused. In a pool where others wait, such
    a request is journaled as ``Queued`` and then ``Denied`` (two entries, two
    writes); kill -9 may keep any prefix of the writes, here the ``Queued`` one only
    (the WAL is cut after it, as a kill between the two writes leaves it). After
    the restart the request must not wait: it is decided at once (granted if it
    fits, else gone), and re-sending it with its token (the client library does so
    by itself after a lost reply) is answered as a ``wait=False`` request is."""
    proc = daemons.make("nowait", config="reattach_grace = 30\n").start()
    probe = Reserve(
        pool="b",
        resources={"cpu": 1000},
        binding="detached",
        label="probe",
        token="probe-token-0123456789ab",
    )
    with Client(proc.socket, reconnect=0) as c, Client(proc.socket, reconnect=0) as w:
        c.call(
            "pool.create",
            PoolCreate(name="b", resources={"cpu": ResourceSpec(capacity=1000)}, max_per_tenant=0),
        )
        c.reserve("b", cpu=1, binding="detached", wait=False)
        waiting = Reserve(
            pool="b", resources={"cpu": 1000}, wait=True, token="waiter-token-0123456789"
        )
        assert w.call("reserve", waiting).state == "pending"
        with pytest.raises(InsufficientError):
            c.call("reserve", probe)
        proc.kill9()
    wal = wal_segments(proc.state_dir)[-1]
    data = wal.read_bytes()
    last = entry_offsets(data)[-1]
    (length,) = struct.unpack_from(">I", data, last)
    (record,) = msgpack.unpackb(data[last + 8 : last + 8 + length])["r"]
    assert record["t"] == "denied" and record["reason"].startswith("held back"), record
    wal.write_bytes(data[:last])  # Queued(probe) kept, Denied(probe) not
    proc.start()
    with Client(proc.socket, reconnect=0) as c:
        assert "probe" not in [r.label for r in c.list(pool="b", pending=True)]
        with pytest.raises(InsufficientError):
            c.call("reserve", probe)
    assert proc.stop() == 0


def test_a_wait_answered_as_the_connection_closes_ends() -> None:
    """The reader thread may take the ``pending`` reply and then the end of the
    connection (the daemon died; ``reconnect=0``, or reconnecting gave up) before
    the caller's flow gets to track the lease. The wait must then end at once with
    UnavailableError, as waits tracked before the close do, not wait for a grant
    that can no longer come."""
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=True, cpu=1)))
    frame = sent(host, runner.next())
    reply = step(runner)
    assert isinstance(reply, core.Reply)
    host.reply(frame["id"], info(state="pending"))  # the reader takes the reply...
    host.session.close("resd closed the connection")  # ...then the end of the stream
    try:
        need = step(runner, reply.outcome())  # only now the flow goes on
    except UnavailableError:
        return  # the wait ended at once
    assert isinstance(need, core.Await)
    assert need.lease.ended == "closed", "the wait goes on in a closed session"
