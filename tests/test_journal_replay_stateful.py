"""Memory and disk always agree: a hypothesis state machine drives the real pool
actor (its handlers, its scheduling pass) through pool changes, reservations,
waits, releases, expiries, preemptions, disconnects and re-attachments — some of
them refused, some of them hitting a journal that refuses the entry — and after
every step checks that the book rebuilt from the journal, and the book loaded from
a snapshot, equal the live one."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from resd import messages as m
from resd.journal import JournalFailed
from resd.pool_actor import PoolActor
from resd.pools import PoolBook
from resd.records import Tenant, decode
from resd.tenants import Peer
from resd.timers import Arbiter, Reaper
from resd_client.errors import ResdError
from resd_client.protocol import Attach, PoolCreate, PoolSet, Reserve, from_wire

TENANTS = [Tenant("low", 2, created_at=1.0), Tenant("high", 8, created_at=2.0)]
PEER = Peer(uid=1000, gid=1000, pid=1, user="u")
SESSIONS = ["c-1", "c-2", "c-3"]


class MemoryJournal:
    """The journal's append, kept in memory as it would be read back; ``fail``
    makes the next append refuse."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, list[Any]]] = []
        self.fail = False

    def append(self, domain: str, records: list[Any]) -> int:
        if self.fail:
            self.fail = False
            raise JournalFailed("injected write failure")
        data = msgpack.packb(records, use_bin_type=True)
        self.entries.append((domain, msgpack.unpackb(data, raw=False, strict_map_key=False)))
        return len(self.entries)

    @property
    def last_lsn(self) -> int:
        return len(self.entries)

    entries_since_snapshot = 0


def view(book: PoolBook) -> dict[str, Any]:
    """Everything a book holds, derived indexes included. Reservations by id: the
    order of the book's dict is not part of its state (preemption's dry runs move
    leases to its end; every listing sorts)."""
    snapshot = book.snapshot()
    snapshot["reservations"] = {r["id"]: r for r in snapshot["reservations"]}
    return {
        "snapshot": snapshot,
        "allocated": {p: {k: v for k, v in a.items() if v} for p, a in book.allocated.items()},
        "by_session": book.by_session,
        "by_token": book.by_token,
        "tenant_live": dict(book.tenant_live),
        "held": {p: sorted(h.free) for p, h in book.holdings.items()},
    }


class BookAndJournalAgree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1_800_000_000.0
        self.journal = MemoryJournal()
        wall = lambda: self.now  # noqa: E731 - the actor reads the test's clock
        self.actor = PoolActor(PoolBook(), self.journal, wall, Reaper(wall), Arbiter(wall))  # type: ignore[arg-type]
        self.actor.clock = wall  # its retry timers run outside trio here
        self.ids: list[str] = []
        self.tokens: list[str] = []
        self.internal: list[str] = []

    def ask(self, message: Any) -> Any:
        try:
            result = self.actor.handlers[type(message)](message)
        except ResdError:
            result = None
        self.actor.after_batch()
        self.now += 1.0
        return result

    @rule()
    def fail_next_append(self) -> None:
        self.journal.fail = True

    @rule(
        name=st.sampled_from(["p", "q"]),
        preemption=st.sampled_from(["off", "lower_priority"]),
        grace=st.sampled_from([0.0, 5.0]),
    )
    def create_pool(self, name: str, preemption: str, grace: float) -> None:
        args = from_wire(
            PoolCreate,
            {
                "name": name,
                "resources": {
                    "cpu": {"capacity": 4},
                    "disks": {"kind": "set", "members": [{"name": "a"}, {"name": "b"}]},
                    "ports": {"kind": "range", "lo": 10, "hi": 12},
                },
                "max_per_tenant": 0,
                "preemption": preemption,
                "grace": grace,
            },
        )
        self.ask(m.CreatePool(args))

    @rule(
        name=st.sampled_from(["p", "q"]),
        change=st.sampled_from(
            [
                {"remove": ["disks"]},
                {"remove": ["ports"]},
                {"remove": ["cpu"]},
                {"capacity": {"cpu": 2}},
                {"capacity": {"cpu": 8}},
                {"ratios": {"cpu": 0.5}},
                {"remove": ["disks"], "capacity": {"disks": 3}},
            ]
        ),
    )
    def set_pool(self, name: str, change: dict[str, Any]) -> None:
        self.ask(m.SetPool(from_wire(PoolSet, {"name": name, **change})))

    @rule(name=st.sampled_from(["p", "q"]), force=st.booleans())
    def delete_pool(self, name: str, force: bool) -> None:
        self.ask(m.DeletePool(name, force))

    @rule(
        pool=st.sampled_from(["p", "q"]),
        tenant=st.sampled_from(TENANTS),
        cpu=st.integers(0, 3),
        disks=st.integers(0, 2),
        ports=st.integers(0, 2),
        wait=st.booleans(),
        session=st.sampled_from(SESSIONS),
        binding=st.sampled_from(["session", "detached"]),
        ttl=st.sampled_from([None, 3.0]),
    )
    def reserve(
        self,
        pool: str,
        tenant: Tenant,
        cpu: int,
        disks: int,
        ports: int,
        wait: bool,
        session: str,
        binding: str,
        ttl: float | None,
    ) -> None:
        resources = {k: v for k, v in (("cpu", cpu), ("disks", disks), ("ports", ports)) if v}
        if not resources:
            return
        token = f"token-{len(self.tokens):012d}"
        args = Reserve(
            pool=pool,
            resources=resources,
            wait=wait,
            binding=binding,  # type: ignore[arg-type]
            ttl=ttl,
            token=token,
        )
        info = self.ask(m.DoReserve(args, tenant, PEER, session))
        if info is not None:
            self.ids.append(info[0].id)
            self.tokens.append(token)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.ids:
            self.ask(m.DoRelease(data.draw(st.sampled_from(self.ids))))

    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        if self.ids:
            from resd_client.protocol import Renew

            self.ask(m.DoRenew(Renew(id=data.draw(st.sampled_from(self.ids)), ttl=3.0)))

    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        live = [r for r in self.actor.book.reservations.values() if r.expires_at is not None]
        if live:
            r = data.draw(st.sampled_from(live))
            self.now = max(self.now, r.expires_at or 0.0)
            self.ask(m.Expire(r.id, r.expires_at or 0.0))

    @rule(data=st.data())
    def finish_grace(self, data: st.DataObject) -> None:
        ending = [r for r in self.actor.book.reservations.values() if r.state == "terminating"]
        if ending:
            self.ask(m.FinishGrace(data.draw(st.sampled_from(ending)).id))

    @rule(pool=st.sampled_from([None, "p"]))
    def preempt(self, pool: str | None) -> None:
        self.ask(m.PreemptTenant("low", pool, "high"))

    @rule(session=st.sampled_from(SESSIONS))
    def session_closed(self, session: str) -> None:
        self.ask(m.SessionClosed(session))

    @rule(data=st.data(), session=st.sampled_from(SESSIONS))
    def attach(self, data: st.DataObject, session: str) -> None:
        if self.tokens:
            token = data.draw(st.sampled_from(self.tokens))
            self.ask(m.DoAttach(Attach(token=token), PEER.uid, session))

    @rule(tenant=st.sampled_from(TENANTS), force=st.booleans())
    def remove_tenant(self, tenant: Tenant, force: bool) -> None:
        self.ask(m.ReleaseTenant(tenant, force))
        self.ask(m.ForgetTenant(tenant))

    @invariant()
    def replay_equals_memory(self) -> None:
        live = view(self.actor.book)
        replayed = PoolBook()
        for domain, records in self.journal.entries:
            assert domain == "pools"
            replayed.apply([decode(r) for r in records])  # type: ignore[misc]
        assert view(replayed) == live
        assert view(PoolBook.from_snapshot(self.actor.book.snapshot())) == live

    @invariant()
    def the_queue_is_the_journaled_one(self) -> None:
        assert set(self.actor.queue.waiters) == set(self.actor.book.waiting)


BookAndJournalAgree.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBookAndJournalAgree = BookAndJournalAgree.TestCase


def test_an_expiry_the_journal_refuses_is_retried_on_the_actors_clock() -> None:
    """Found by this machine: a refused expiry is queued for a retry on the actor's
    timer clock; driven outside trio, that is the test's clock (it raised before)."""
    machine = BookAndJournalAgree()
    machine.create_pool(name="q", preemption="off", grace=0.0)
    machine.reserve(
        pool="q",
        tenant=Tenant("low", 2),
        cpu=0,
        disks=0,
        ports=1,
        wait=False,
        session="c-1",
        binding="session",
        ttl=3.0,
    )
    (r,) = machine.actor.book.reservations.values()
    machine.fail_next_append()
    assert r.expires_at is not None
    machine.ask(m.Expire(r.id, r.expires_at))  # refused: nothing changes, a retry is due
    assert r.id in machine.actor.book.reservations
    assert len(machine.actor._later) == 1
    machine.replay_equals_memory()


def test_a_refusal_the_journal_cannot_record_leaves_no_waiter_behind() -> None:
    """Found by this machine: a request that will not wait joins the queue for one
    pass; when its denial could not be journaled it stayed there, waiting in memory
    but not in the journal."""
    machine = BookAndJournalAgree()
    machine.create_pool(name="q", preemption="lower_priority", grace=0.0)
    ask = {
        "pool": "q",
        "tenant": Tenant("low", 2),
        "cpu": 0,
        "disks": 0,
        "ports": 2,
        "wait": False,
        "session": "c-1",
        "binding": "session",
        "ttl": None,
    }
    machine.reserve(**ask)
    machine.fail_next_append()
    machine.reserve(**ask)  # refused; its denial is not journaled
    machine.the_queue_is_the_journaled_one()
    machine.replay_equals_memory()


def test_a_dry_run_leaves_the_book_as_it_was() -> None:
    """Preemption's dry runs (``PoolBook.without``) take leases out and put them back:
    the book holds what it held (only its dict's order moved, which is no part of its
    state; the machine above found a replay differing from memory in that order)."""
    book = PoolBook()
    book.apply(
        book.create_pool(
            from_wire(
                PoolCreate,
                {"name": "p", "resources": {"cpu": {"capacity": 8}}, "max_per_tenant": 0},
            ),
            1.0,
        )
    )
    tenant = Tenant("t", 1, created_at=1.0)
    for i, rid in enumerate(("r-a", "r-b", "r-c")):
        args = from_wire(Reserve, {"pool": "p", "resources": {"cpu": 1}})
        book.apply(book.reserve(args, tenant, uid=0, session="", now=2.0 + i, rid=rid))
    before = view(book)
    with book.without(["r-a", "r-b"]):
        assert "r-a" not in book.reservations
    assert list(book.reservations) == ["r-c", "r-a", "r-b"]  # the dict's order moved
    assert view(book) == before
