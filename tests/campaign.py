"""Shared pieces of the campaigns (``tests/test_campaign_*.py``, issue 10).

A campaign is a long run against real ``resd`` processes (kill -9 under load,
fuzzed frames, other uids) with a short version in the default run. This module
holds what more than one campaign needs (``visible_state``, ``check_books``,
``daemon_usage``) and the crash campaign's load client, which runs in child
processes (``python -c "from tests.campaign import crash_client; ..."``): that is why
it imports only the standard library and the client library at top level.

The load client's log is the campaign's ground truth. Each client does one thing at
a time and writes a line before it asks (lower case: an *intent*) and after the
daemon acknowledged it (upper case: an *outcome*); an intent without an outcome is
the request that was in flight when the daemon died. ``Ledger`` reads every log
back; ``test_campaign_crash`` checks the restarted daemon against it.
"""

from __future__ import annotations

import os
import random
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgspec

from resd_client import (
    Client,
    ConnectionLost,
    Lease,
    NotFoundError,
    Reconnected,
    ResdError,
    UnavailableError,
)
from resd_client._core import reserve_args
from resd_client.protocol import PoolSet, Preempt, TenantAdd, TenantSet

CORE = 1000  # millicores

# ------------------------------------------------------------ what a client can see


def wire(client: Client, op: str, args: Any) -> Any:
    """The wire result of ``op`` (plain maps); raises AssertionError on an error reply."""
    frame = client.call_raw(op, args)
    assert frame.get("ok"), frame
    return frame["result"]


def visible_state(client: Client) -> dict[str, Any]:
    """Everything a request could change, as clients see it (for "changes nothing")."""
    return {
        "pools": wire(client, "pool.list", {})["pools"],
        # fair-share usage grows by itself while leases are held: not a change
        "tenants": [
            {k: v for k, v in t.items() if k not in ("usage", "share")}
            for t in wire(client, "tenant.list", {})["tenants"]
        ],
        "reservations": wire(client, "list", {})["reservations"],
        "pending": wire(client, "list", {"pending": True})["reservations"],
        "history": wire(client, "export", {})["events"],
    }


def check_books(pools: list[dict[str, Any]], live: list[dict[str, Any]]) -> int:
    """Each scalar resource of each pool: ``allocated`` is the sum of what its live
    reservations hold, never more than ``effective``, and ``available`` the rest.
    Only meaningful when nothing changes between the two reads. Returns how many
    (pool, resource) books were checked."""
    held: dict[tuple[str, str], int] = {}
    for r in live:
        for name, amount in r["resources"].items():
            held[r["pool"], name] = held.get((r["pool"], name), 0) + amount
    checked = 0
    for pool in pools:
        for res in pool["resources"]:
            if res.get("kind", "scalar") != "scalar":
                continue
            where = f"pool {pool['name']} resource {res['name']}"
            assert res["allocated"] == held.get((pool["name"], res["name"]), 0), (where, res)
            assert res["allocated"] <= res["effective"], (where, res)
            assert res["available"] == res["effective"] - res["allocated"], (where, res)
            checked += 1
    return checked


def daemon_usage(pid: int) -> tuple[int, int]:
    """(RSS in bytes, open file descriptors) of process ``pid``."""
    import psutil  # test-only dependency; the load client never needs it

    p = psutil.Process(pid)
    return int(p.memory_info().rss), int(p.num_fds())


# ----------------------------------------------------------- the crash load client

#: pools of the crash campaign: ``a`` allows preemption (with a grace), ``b`` is
#: small, never preempts and makes requests queue
POOL_A, POOL_B = "a", "b"
CAPACITY = {POOL_A: 16 * CORE, POOL_B: 4 * CORE}
CAPACITY_CHOICES = {POOL_A: [12, 16, 20, 24], POOL_B: [3, 4, 5, 6]}
#: client indices: 0..5 live for one cycle (``reconnect=0``: they die with the
#: daemon), 6 and 7 for the whole campaign (they reconnect and re-attach)
TRANSIENT = range(6)
RECONNECTING = (6, 7)
POOL_SETTER, TENANT_KEEPER = 0, 1
PREEMPTORS = (4, 5)


def priority_of(index: int) -> int:
    """Tenant ``t<index>``'s priority: all distinct, so queue order is stable."""
    return 1 + index


@dataclass
class _Held:
    lease: Lease | None  # None: adopted from an earlier client of the same tenant
    binding: str
    ttl: float | None


class _LoadClient:
    """One load client: a loop of random mutating operations, each logged."""

    def __init__(self, argv: list[str]) -> None:
        sock, out, index, seed, reconnect, pause = argv
        self.index = int(index)
        self.tenant = f"t{self.index}"
        self.rng = random.Random(int(seed))
        self.reconnecting = float(reconnect) > 0
        self.pause = Path(pause)
        self.log: TextIO = open(out, "a")  # noqa: SIM115 - open for the process's life
        self.label = f"c{self.index}.{seed}"
        self.seq = 0
        self.held: dict[str, _Held] = {}
        self.sock, self.reconnect = sock, float(reconnect)
        self.note("S", os.getpid())

    def note(self, *parts: object) -> None:
        self.log.write(" ".join(str(p) for p in parts) + "\n")
        self.log.flush()

    def run(self) -> None:
        try:
            self.client = Client(
                self.sock, name=f"crash-{self.index}", timeout=10, reconnect=self.reconnect
            )
            if not self.reconnecting:
                for r in self.client.list(tenant=self.tenant):
                    if r.binding == "detached":
                        self.held[r.id] = _Held(None, "detached", r.ttl)
                        self.note("A", r.id)
            deadline = time.monotonic() + (3600 if self.reconnecting else 120)
            while time.monotonic() < deadline:
                if self.reconnecting and self._paused():
                    return
                self.step()
        except UnavailableError as exc:
            self.note("U", str(exc).replace("\n", " ")[:200])

    def fatal(self, exc: ResdError) -> bool:
        """Whether ``exc`` ends this client: the daemon is gone and it does not
        reconnect (or gave up)."""
        return isinstance(exc, UnavailableError) and (not self.reconnecting or self.client.closed)

    def _paused(self) -> bool:
        """Between operations: note reconnections and leases that ended meanwhile;
        while the pause file exists, note its content once and idle. True: stop."""
        last = ""
        while True:
            for event in self.client.events(timeout=0):
                if isinstance(event, Reconnected):
                    self.note("C", event.attempts)
            for rid, h in list(self.held.items()):
                if h.lease is not None and h.lease.ended is not None:
                    self.note("L", rid, h.lease.ended, h.lease.info.reason.replace(" ", "_"))
                    del self.held[rid]
            try:
                word = self.pause.read_text()
            except FileNotFoundError:
                return False
            if word == "stop":
                self.client.close()
                return True
            if word != last:
                self.note("Z", word)
                last = word
            time.sleep(0.01)

    def step(self) -> None:
        roll = self.rng.random()
        limit = 4 if self.reconnecting else 5
        if self.index == POOL_SETTER and roll < 0.08:
            self.set_capacity()
        elif self.index == TENANT_KEEPER and roll < 0.08:
            self.tenant_change()
        elif self.index in PREEMPTORS and roll < 0.04:
            self.preempt()
        elif self.held and (len(self.held) >= limit or roll < 0.4):
            if self.rng.random() < 0.25 and any(h.ttl for h in self.held.values()):
                self.renew()
            else:
                self.release()
        else:
            self.reserve()

    def reserve(self) -> None:
        rng = self.rng
        weights = [0.2, 0.6, 0.2] if self.reconnecting else [0.6, 0.25, 0.15]
        binding = rng.choices(["detached", "session", "pid"], weights)[0]
        pool = POOL_A if rng.random() < 0.6 else POOL_B
        wait = rng.random() < 0.3
        ttl = None if rng.random() < 0.6 else round(rng.uniform(1.5, 6.0), 2)
        cores = rng.choice([1, 1, 2])
        self.seq += 1
        label = f"{self.label}.{self.seq}"
        token = secrets.token_urlsafe(18)
        args = msgspec.structs.replace(
            reserve_args(
                pool,
                wait=wait,
                cpu=cores,
                tenant=self.tenant,
                ttl=ttl,
                binding=binding,
                label=label,
                reclaimable=rng.random() < 0.2,
                timeout=round(rng.uniform(0.3, 1.5), 2) if wait else None,
                pid=os.getpid() if binding == "pid" else None,
            ),
            token=token,
        )
        self.note("q", label, token, binding, pool, cores * CORE, ttl or "-", int(wait))
        try:
            lease = self.client.request(args)
        except ResdError as exc:
            if self.fatal(exc):
                raise
            self.note("F", label, exc.code)
            return
        self.held[lease.id] = _Held(lease, binding, ttl)
        expires = lease.info.expires_at
        self.note("R", lease.id, label, binding, pool, cores * CORE, expires or "-")

    def release(self) -> None:
        rid = self.rng.choice(list(self.held))
        del self.held[rid]
        self.note("p", rid)
        try:
            self.client.release(rid)
        except NotFoundError:
            self.note("G", rid, "not_found")
            return
        except ConnectionLost:
            self.note("G", rid, "lost")
            return
        except ResdError as exc:
            if self.fatal(exc):
                raise
            self.note("F", rid, exc.code)
            return
        self.note("X", rid)

    def renew(self) -> None:
        rid = self.rng.choice([r for r, h in self.held.items() if h.ttl])
        ttl = round(self.rng.uniform(1.5, 6.0), 2)
        self.note("n", rid, ttl)
        try:
            info = self.client.renew(rid, ttl)
        except NotFoundError:
            del self.held[rid]
            self.note("G", rid, "not_found")
            return
        except ConnectionLost:
            self.note("G", rid, "lost")
            return
        except ResdError as exc:
            if self.fatal(exc):
                raise
            self.note("F", rid, exc.code)
            return
        self.held[rid].ttl = ttl
        self.note("N", rid, info.expires_at)

    def set_capacity(self) -> None:
        pool = self.rng.choice([POOL_A, POOL_B])
        cap = self.rng.choice(CAPACITY_CHOICES[pool]) * CORE
        self.note("k", pool, cap)
        try:
            self.client.call("pool.set", PoolSet(name=pool, capacity={"cpu": cap}))
        except ResdError as exc:
            if self.fatal(exc):
                raise
            self.note("F", pool, exc.code)
            return
        self.note("K", pool, cap)

    def tenant_change(self) -> None:
        """Add a tenant of this client's own, or change one's priority."""
        prio = self.rng.randint(1, 10)
        mine = [
            t.name for t in self.client.call("tenant.list", {}).tenants if t.name.startswith("x")
        ]
        if mine and self.rng.random() < 0.5:
            name = self.rng.choice(mine)
            self.note("y", name, prio)
            op, done = "tenant.set", "Y"
            args: TenantSet | TenantAdd = TenantSet(name=name, priority=prio)
        else:
            self.seq += 1
            name = f"x{self.label.replace('.', '-')}-{self.seq}"
            self.note("a", name, prio)
            op, done = "tenant.add", "T"
            args = TenantAdd(name=name, priority=prio)
        try:
            self.client.call(op, args)
        except ResdError as exc:
            if self.fatal(exc):
                raise
            self.note("F", name, exc.code)
            return
        self.note(done, name, prio)

    def preempt(self) -> None:
        target = f"t{self.rng.randrange(self.index)}"
        self.note("e", target)
        try:
            got = self.client.call(
                "preempt", Preempt(target=target, tenant=self.tenant, pool=POOL_A)
            )
        except ResdError as exc:
            if self.fatal(exc):
                raise
            self.note("F", target, exc.code)
            return
        for r in got.reservations:
            self.note("V", r.id, r.state)
        self.note("E", target, len(got.reservations))


def crash_client(argv: list[str] | None = None) -> None:
    """Entry point of a load client process: ``SOCK OUT INDEX SEED RECONNECT PAUSE``."""
    _LoadClient(sys.argv[1:] if argv is None else argv).run()


# ------------------------------------------------------------------ reading logs


@dataclass(frozen=True)
class Ask:
    """A ``reserve`` as a client sent it (its ``q`` line)."""

    label: str
    token: str
    binding: str
    pool: str
    cpu: int
    ttl: float | None
    wait: bool
    log: str  # which log (process) sent it
    index: int


@dataclass(frozen=True)
class Ack:
    """An acknowledged reservation (its ``R`` line)."""

    id: str
    label: str
    binding: str
    pool: str
    cpu: int
    index: int
    reconnecting: bool


@dataclass
class Ledger:
    """Everything every load client (and the driver) logged, across all cycles."""

    asks: dict[str, Ask] = field(default_factory=dict)  # label -> ask
    resolved: dict[str, str] = field(default_factory=dict)  # label -> "R" | error code
    acks: dict[str, Ack] = field(default_factory=dict)  # id -> ack
    expires: dict[str, float] = field(default_factory=dict)  # id -> last acked expiry
    renew_unsure: set[str] = field(default_factory=set)  # a renew with no known outcome
    release_sent: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)  # acknowledged releases
    victims: dict[str, str] = field(default_factory=dict)  # id -> log that got it
    #: per pool / tenant: acknowledged values and later intents, in order
    capacity: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    priority: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    #: the open intent of each log at its end (the request in flight), if any
    in_flight: dict[str, list[str]] = field(default_factory=dict)
    ended_seen: list[tuple[str, str, str]] = field(default_factory=list)  # (id, how, why)
    reconnections: dict[str, int] = field(default_factory=dict)
    acknowledged: int = 0  # outcome lines: acknowledged changes

    @classmethod
    def read(cls, logs: Iterable[Path]) -> Ledger:
        ledger = cls()
        for path in logs:
            ledger._read_one(path)
        return ledger

    def _read_one(self, path: Path) -> None:
        name = path.stem
        index = int(name[1:].split("-")[0]) if name[0] in "cr" else -1
        reconnecting = name.startswith("r")
        open_intent: list[str] | None = None
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines()
        if text and not text.endswith("\n"):
            lines = lines[:-1]  # a line cut by the kill of its writer
        for line in lines:
            w = line.split()
            kind = w[0]
            # A refused release released nothing. (One re-sent after a lost reply may say
            # not_found because the first attempt did it: that one counts as sent.) A
            # refused renew proves nothing about an earlier one whose answer was lost:
            # only an acknowledged renew (N) says what the expiry is.
            if open_intent is not None and (open_intent[0], kind) == ("p", "F"):
                self.release_sent.discard(w[1])
            if kind in ("q", "p", "n", "k", "a", "y", "e"):
                open_intent = w
            elif kind in ("R", "F", "X", "G", "N", "K", "T", "Y", "E"):
                open_intent = None
            if kind == "q":
                ttl = None if w[6] == "-" else float(w[6])
                self.asks[w[1]] = Ask(
                    w[1], w[2], w[3], w[4], int(w[5]), ttl, w[7] == "1", name, index
                )
            elif kind == "R":
                self.acks[w[1]] = Ack(w[1], w[2], w[3], w[4], int(w[5]), index, reconnecting)
                self.resolved[w[2]] = "R"
                if w[6] != "-":
                    self.expires[w[1]] = float(w[6])
                self.acknowledged += 1
            elif kind == "F":
                self.resolved.setdefault(w[1], w[2])
            elif kind == "p":
                self.release_sent.add(w[1])
            elif kind == "X":
                self.released.add(w[1])
                self.acknowledged += 1
            elif kind == "n":
                self.renew_unsure.add(w[1])
            elif kind == "N":
                self.expires[w[1]] = float(w[2])
                self.renew_unsure.discard(w[1])
                self.acknowledged += 1
            elif kind in ("k", "K"):
                self.capacity.setdefault(w[1], []).append((kind, int(w[2])))
                self.acknowledged += kind == "K"
            elif kind in ("a", "y", "T", "Y"):
                self.priority.setdefault(w[1], []).append((kind, int(w[2])))
                self.acknowledged += kind in ("T", "Y")
            elif kind == "V":
                self.victims[w[1]] = name
            elif kind == "E":
                self.acknowledged += 1
            elif kind == "L":
                self.ended_seen.append((w[1], w[2], w[3] if len(w) > 3 else ""))
            elif kind == "C":
                self.reconnections[name] = self.reconnections.get(name, 0) + 1
        if open_intent is not None:
            self.in_flight[name] = open_intent

    @staticmethod
    def allowed(history: list[tuple[str, int]]) -> set[int]:
        """Values a setting may hold now: the last acknowledged one and any asked for
        after it (those requests' fate is unknown)."""
        last = max((i for i, (kind, _) in enumerate(history) if kind.isupper()), default=-1)
        return {v for _, v in history[max(last, 0) :]}


def ordered_subsequence(before: list[str], after: list[str]) -> Iterator[str]:
    """The ids present in both lists whose relative order differs (none: same order)."""
    common = set(before) & set(after)
    a = [x for x in before if x in common]
    b = [x for x in after if x in common]
    for x, y in zip(a, b, strict=True):
        if x != y:
            yield x
