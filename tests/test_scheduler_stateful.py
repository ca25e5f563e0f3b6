"""The pure scheduler (resd/scheduler.py) under a hypothesis state machine.

No actor, no journal, no sockets: the machine queues requests of tenants of
several priorities, releases and finishes graces, and drives scheduling passes by
applying each step's events to the book itself, as the pool actor does after
journaling them. After every pass: no pool is over capacity, no GPU has two
holders, and no waiter is left waiting while it fits and nobody ranked above it
needs the same resources (no idle capacity, no starvation of the head).
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resd import quotas, resize, scheduler
from resd.pools import PoolBook
from resd.records import Ended, Reserved, Resized, Tenant, Terminating
from resd.waiting import Waiter, WaitQueue, touched
from resd_client.errors import InvalidError
from resd_client.protocol import PoolCreate, Reserve, from_wire

POOL = "p"
CPU = 8000
GPUS = 4
TENANTS = {name: Tenant(name, priority) for name, priority in (("lo", 1), ("mid", 5), ("hi", 9))}


class Scheduling(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = PoolBook()
        self.queue = WaitQueue()
        self.now = 1000.0
        self.ids = itertools.count()

    @rule(preempting=st.booleans(), grace=st.sampled_from([0.0, 5.0]), with_quotas=st.booleans())
    @precondition(lambda self: not self.book.pools)
    def create(self, preempting: bool, grace: float, with_quotas: bool) -> None:
        args = from_wire(
            PoolCreate,
            {
                "name": POOL,
                "resources": {
                    "cpu": {"capacity": CPU},
                    "gpu": {
                        "kind": "set",
                        "members": [{"name": str(i), "capacity": 80 << 30} for i in range(GPUS)],
                    },
                },
                "max_per_tenant": 0,
                "preemption": "lower_priority" if preempting else "off",
                "grace": grace,
            },
        )
        self.book.apply(self.book.create_pool(args, self.now))
        if with_quotas:  # lo is guaranteed half the CPUs, mid capped at 2 GPUs, hi 2 GPUs
            self.book.apply(self.book.set_quota(POOL, "lo", {"cpu": 4000}, None))
            self.book.apply(self.book.set_quota(POOL, "mid", None, {"gpu": 2}))
            self.book.apply(self.book.set_quota(POOL, "hi", {"gpu": 2}, {"gpu": 3}))

    @rule(
        tenant=st.sampled_from(sorted(TENANTS)),
        cpu=st.sampled_from([0, 1000, 3000, 8000]),
        gpu=st.integers(0, 3),
        vram=st.sampled_from([0, 0, 30 << 30]),
    )
    @precondition(lambda self: self.book.pools)
    def enqueue(self, tenant: str, cpu: int, gpu: int, vram: int) -> None:
        resources = {k: v for k, v in (("cpu", cpu), ("gpu", gpu), ("vram", vram)) if v}
        if not resources or (gpu and vram):
            return
        self._queue(
            tenant, from_wire(Reserve, {"pool": POOL, "resources": resources, "wait": True})
        )

    def _queue(self, tenant: str, args: Reserve, resize_of: str = "") -> None:
        w = Waiter(
            resize_of=resize_of,
            id=f"r-{next(self.ids):012x}",
            args=args,
            tenant=TENANTS[tenant],
            uid=0,
            session="",
            outbox=None,
            pools=(POOL,),
            keys=touched([POOL], args),
            arrived=self.now,
            seq=self.queue.next_seq(),
        )
        self.queue.add(w, None)

    @rule(
        tenant=st.sampled_from(sorted(TENANTS)),
        cpu=st.sampled_from([1000, 4000]),
        gpu=st.integers(1, 3),
    )
    @precondition(lambda self: self.book.pools)
    def enqueue_gang(self, tenant: str, cpu: int, gpu: int) -> None:
        """A gang of two asks in the one pool: CPUs, and whole GPUs."""
        parts = [
            {"pool": POOL, "resources": {"cpu": cpu}},
            {"pool": POOL, "resources": {"gpu": gpu}},
        ]
        args = from_wire(Reserve, {"parts": parts, "wait": True})
        self._queue(tenant, args)

    @rule(borrower=st.sampled_from(["mid", "hi"]))
    @precondition(lambda self: self.book.pools)
    def contend(self, borrower: str) -> None:
        """A borrower takes every CPU, then lo asks for part of its guarantee."""
        self.enqueue(borrower, 8000, 0, 0)
        self.schedule()
        self.enqueue("lo", 3000, 0, 0)

    @rule(data=st.data(), cpu=st.sampled_from([0, 1000, 2000, 6000]), wait=st.booleans())
    @precondition(lambda self: self.book.reservations)
    def resize(self, data: st.DataObject, cpu: int, wait: bool) -> None:
        """Change a lease's CPUs in place: done at once when it fits (one record, the
        rest kept), else refused or, with wait, queued to grow later."""
        live = [r for r in self.book.reservations.values() if r.state == "active" and not r.gang]
        if not live:
            return
        r = data.draw(st.sampled_from(sorted(live, key=lambda r: r.id)))
        try:
            events = resize.resize(self.book, r.id, {"cpu": cpu}, {}, self.now)
        except InvalidError:
            return  # e.g. resized to nothing
        if isinstance(events[0], Resized):
            self.book.apply(events)
            after = self.book.reservations[r.id]
            assert after.members == r.members and after.expires_at == r.expires_at
            assert after.resources.get("cpu", 0) == cpu
        elif wait:
            args = from_wire(Reserve, {"pool": POOL, "resources": {"cpu": cpu}, "wait": True})
            self._queue(r.tenant if r.tenant in TENANTS else "lo", args, resize_of=r.id)

    @rule(data=st.data())
    @precondition(lambda self: self.book.reservations)
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.book.reservations)))
        self.book.apply(self.book.gang_whole(self.book.release(rid, self.now)))

    @rule()
    def finish_graces(self) -> None:
        self.now += 10
        for r in [r for r in self.book.reservations.values() if r.state == "terminating"]:
            if r.id in self.book.reservations:  # its gang may have ended with a sibling
                self.book.apply(self.book.gang_whole(self.book.finish_grace(r.id, self.now)))

    @rule()
    @precondition(lambda self: self.book.pools)
    def schedule(self) -> None:
        granted: set[str] = set()
        for step in scheduler.run_pass(self.book, self.queue, self.now, granted.__contains__):
            match step:
                case scheduler.Grant(waiter=w, events=events) if w.resize_of:
                    assert isinstance(events[0], Resized) and events[0].id == w.resize_of
                    self.book.apply(events)
                    self.queue.remove(w.id)
                    granted.add(w.id)
                case scheduler.Grant(waiter=w, events=events):
                    assert isinstance(events[0], Reserved) and events[0].reservation.id == w.id
                    assert len(events) == max(1, len(w.args.parts)), "a gang all at once"
                    self.book.apply(events)
                    self.queue.remove(w.id)
                    granted.add(w.id)
                case scheduler.Evict(waiter=w, events=events, reclaim=reclaim):
                    victims = [self.book.reservations[e.id] for e in events]
                    if reclaim:  # from borrowers, whatever their priority
                        pool = self.book.pools[POOL]
                        held = {v.tenant: self.book.quota_use(POOL, v.tenant) for v in victims}
                        needs = {"gpu" if n == "vram" else n for n in quotas.asked(w.args)}
                        assert quotas.borrowers_first(pool, victims, held, needs), "not borrowing"
                        assert quotas.within_min(
                            pool, w.tenant.name, self.book.quota_use(POOL, w.tenant.name), w.args
                        )
                    else:
                        assert all(v.priority < w.tenant.priority for v in victims), "only lower"
                    assert all(isinstance(e, Ended | Terminating) for e in events)
                    self.book.apply(self.book.gang_whole(events))
                case scheduler.Drop(waiter=w):
                    self.queue.remove(w.id)
        self.check_no_idle_capacity()

    def check_no_idle_capacity(self) -> None:
        """A waiter that fits now was held back for one ranked above it; one within
        its min that borrowers could make room for is having them reclaimed."""
        order = self.queue.ordered(self.book.usage_at(self.now))
        for i, w in enumerate(order):
            ahead = [a for a in order[:i] if a.keys & w.keys]
            events = scheduler.decide(self.book, w, self.now)
            if isinstance(events[0], Reserved):
                assert ahead, f"{w.id} fits but waits"
            elif not ahead and w.reason != "reclaiming":
                plan = scheduler.reclaim_plan(self.book, w.args, w.tenant, self.now)
                assert plan is None, f"{w.id} could reclaim {plan} but waits: {w.message}"

    @invariant()
    def gangs_whole(self) -> None:
        for r in self.book.reservations.values():
            assert all(part in self.book.reservations for part in r.gang), f"{r.id} half held"

    @invariant()
    def within_max(self) -> None:
        if not self.book.pools:
            return
        pool = self.book.pools[POOL]
        for tenant, quota in pool.quotas.items():
            used = self.book.quota_use(POOL, tenant)
            for name, cap in quota.max.items():
                assert used.get(name, 0) <= cap, (tenant, name, used, cap)

    @invariant()
    def within_capacity(self) -> None:
        if not self.book.pools:
            return
        pool = self.book.pools[POOL]
        assert self.book.used(pool, "cpu") <= CPU
        holders: dict[str, set[str]] = {}
        for r in self.book.reservations.values():
            for m in r.members.get("gpu", ()):
                holders.setdefault(m, set()).add(r.id)
        whole = {
            r.id for r in self.book.reservations.values() if "gpu" in r.resources and r.members
        }
        for member, ids in holders.items():
            assert len(ids & whole) <= 1 and (not ids & whole or len(ids) == 1), member


TestScheduling = Scheduling.TestCase
TestScheduling.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
