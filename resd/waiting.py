"""Queued requests (SPEC §4 "Waiting"): who waits, in what order, for what.

A waiter is a request that did not fit and asked to wait. Its ``Waiting`` record
is journaled (``Queued``), so after a restart it is put back in its place and
waits for its client to re-attach (SPEC §9); the ``Waiter`` here adds what only
the live daemon knows (the connection to push to, the reason it waits). The
queue is ranked by priority (highest first), then deadline (earliest first, none
last), then fair share (the tenant's decayed usage ÷ its weight, see
``resd/fairshare.py``), then arrival. It also indexes which (pool, resource) pairs waiters touch, so that a
request or a release that concerns none of them skips the queue entirely.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from resd.holdings import GPU, VRAM
from resd.records import Reservation, Tenant, Waiting
from resd.timerheap import TimerHeap
from resd_client.protocol import ReservationInfo, Reserve

if TYPE_CHECKING:  # the live queue pushes to connections; the rules need no trio
    from resd.messages import Outbox

Key = tuple[str, str]


def touched(pools: Iterable[str], args: Reserve) -> frozenset[Key]:
    """The (pool, resource) pairs a request competes for; a VRAM slice competes for
    the GPU set it is cut from."""
    if args.parts:  # a gang: each part competes in its own pool
        return frozenset(k for part in args.parts for k in touched([part.pool], part.request()))
    names = {GPU if n == VRAM else n for n in (*args.resources, *args.members)}
    return frozenset((p, n) for p in pools for n in names)


@attrs.define(eq=False)
class Waiter:
    id: str
    args: Reserve
    tenant: Tenant
    uid: int
    session: str
    outbox: Outbox | None
    pools: tuple[str, ...]
    keys: frozenset[Key]
    arrived: float
    seq: int
    pid: tuple[int, float] | None = None
    #: the session peer's process (a session lease's attribution root)
    peer: int | None = None
    #: a waiting resize: the lease it grows
    resize_of: str = ""
    #: wall time its ``timeout`` passes
    timeout_at: float | None = None
    position: int = 0
    reason: str = "resources"
    message: str = "waiting for resources"
    details: dict[str, Any] = attrs.Factory(dict)

    @classmethod
    def of(cls, record: Waiting, outbox: Outbox | None = None) -> Waiter:
        """The live waiter of a journaled ``record``."""
        pid = (
            None
            if record.pid is None or record.pid_start is None
            else (record.pid, record.pid_start)
        )
        return cls(
            id=record.id,
            args=record.args,
            tenant=record.tenant,
            uid=record.uid,
            session=record.session,
            outbox=outbox,
            pools=record.pools,
            keys=touched(record.pools, record.args),
            arrived=record.arrived,
            seq=record.seq,
            pid=pid,
            peer=record.peer,
            resize_of=record.resize_of,
            timeout_at=record.timeout_at,
        )

    def record(self) -> Waiting:
        return Waiting(
            id=self.id,
            args=self.args,
            tenant=self.tenant,
            uid=self.uid,
            session=self.session,
            pools=self.pools,
            arrived=self.arrived,
            seq=self.seq,
            timeout_at=self.timeout_at,
            pid=None if self.pid is None else self.pid[0],
            pid_start=None if self.pid is None else self.pid[1],
            peer=self.peer,
            resize_of=self.resize_of,
        )

    def rank(self, usage: Mapping[str, float]) -> tuple[int, float, float, int]:
        fair = usage.get(self.tenant.name, 0.0) / self.tenant.weight if self.tenant.weight else 0.0
        deadline = math.inf if self.args.deadline is None else self.args.deadline
        return (-self.tenant.priority, deadline, fair, self.seq)

    def waits_for(self, reason: str, message: str, details: dict[str, Any]) -> None:
        self.reason, self.message, self.details = reason, message, details

    def info(self) -> ReservationInfo:
        a = self.args
        asked = dict(a.resources)
        for part in a.parts:  # a gang asks for its parts' amounts together
            for name, amount in part.resources.items():
                asked[name] = asked.get(name, 0) + amount
        return ReservationInfo(
            id=self.id,
            tenant=self.tenant.name,
            pool=self.pools[0] if len(self.pools) == 1 else ",".join(self.pools),
            resources=asked,
            label=a.label,
            created_at=self.arrived,
            ttl=a.ttl,
            expires_at=None,
            binding=a.binding,
            reclaimable=a.reclaimable,
            state="pending",
            uid=self.uid,
            members={k: list(v) for k, v in a.members.items()},
            priority=self.tenant.priority,
            pid=None if self.pid is None else self.pid[0],
            position=self.position,
            reason=self.reason,
        )


@attrs.define(eq=False)
class WaitQueue:
    waiters: dict[str, Waiter] = attrs.Factory(dict)
    #: (pool, resource) → how many waiters touch it
    keys: Counter[Key] = attrs.Factory(Counter)
    #: (pool, tenant) → how many of the tenant's waiters may go there (a waiter held
    #: up by ``max_per_tenant`` waits for its own tenant's release)
    tenants: Counter[Key] = attrs.Factory(Counter)
    #: waiter id → trio time its timeout passes
    timeouts: TimerHeap = attrs.Factory(TimerHeap)
    _seq: itertools.count[int] = attrs.Factory(itertools.count)

    def __len__(self) -> int:
        return len(self.waiters)

    def next_seq(self) -> int:
        return next(self._seq)

    def continue_after(self, seq: int) -> None:
        """Number later arrivals after ``seq`` (the last one recovered)."""
        self._seq = itertools.count(max(seq + 1, next(self._seq)))

    def add(self, w: Waiter, timeout_at: float | None) -> None:
        self.waiters[w.id] = w
        self.keys.update(w.keys)
        self.tenants.update((p, w.tenant.name) for p in w.pools)
        if timeout_at is not None:
            self.timeouts.add(w.id, timeout_at)

    def remove(self, rid: str) -> Waiter | None:
        w = self.waiters.pop(rid, None)
        if w is not None:
            _drop(self.keys, w.keys)
            _drop(self.tenants, [(p, w.tenant.name) for p in w.pools])
            self.timeouts.discard(rid)
        return w

    def touches(self, keys: Iterable[Key]) -> bool:
        return any(k in self.keys for k in keys)

    def concerns(self, r: Reservation) -> bool:
        """Could ``r`` ending let a waiter go? Only if it frees something a waiter
        touches, or it was held by the tenant of a waiter in its pool."""
        if (r.pool, r.tenant) in self.tenants:
            return True
        return any(
            (r.pool, GPU if n == VRAM else n) in self.keys for n in (*r.resources, *r.members)
        )

    def ordered(self, usage: Callable[[str], float]) -> list[Waiter]:
        """Waiters in rank order; ``usage(tenant)`` is its decayed fair-share usage."""
        table = {n: usage(n) for n in {w.tenant.name for w in self.waiters.values()}}
        return sorted(self.waiters.values(), key=lambda w: w.rank(table))

    def of_session(self, session: str) -> list[Waiter]:
        return [w for w in self.waiters.values() if w.session == session]


def _drop(counter: Counter[Any], items: Iterable[Any]) -> None:
    for item in items:
        counter[item] -= 1
        if counter[item] <= 0:
            del counter[item]
