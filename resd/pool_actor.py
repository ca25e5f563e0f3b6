"""The pool actor: sole owner of the pool book, and of who to tell about it.

Every mutation is one synchronous step: decide events with the book, apply them,
append them to the journal, then derive the side effects (timers for the reaper
and arbiter, pushes to holders, a fresh ``state`` for subscribers). The reply
carries the journal sequence number the caller must await before answering its
client, so acknowledgement follows durability while the actor moves on.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import trio

from resd.actor import Actor
from resd.journal import Journal
from resd.messages import (
    Cancel,
    CheckReserve,
    CountActive,
    CreatePool,
    DeletePool,
    DoRelease,
    DoRenew,
    DoReserve,
    Expire,
    ExportHistory,
    FinishGrace,
    GetReservation,
    ListActive,
    ListPools,
    Outbox,
    PreemptTenant,
    ReleaseTenant,
    Schedule,
    SessionClosed,
    SetPool,
    ShowPool,
    ShowResources,
    Subscribe,
    TakeSnapshot,
    Unsubscribe,
)
from resd.pools import PoolBook, denial_error
from resd.records import (
    Denied,
    Ended,
    PoolEvent,
    Renewed,
    Reservation,
    Reserved,
    Terminating,
    encode,
)
from resd_client.protocol import (
    Done,
    ExpiredEvent,
    HistoryEvent,
    PoolInfo,
    PreemptedEvent,
    ReservationInfo,
    StateEvent,
    encode_frame,
    push,
)

log = structlog.get_logger("resd.pools")
DOMAIN = "pools"


def new_reservation_id() -> str:
    return "r-" + secrets.token_hex(6)


class PoolActor(Actor):
    name = "pool-actor"

    def __init__(
        self,
        book: PoolBook,
        journal: Journal,
        wall: Callable[[], float],
        reaper: Actor,
        arbiter: Actor,
        new_id: Callable[[], str] = new_reservation_id,
        snapshot_every: int = 100_000,
        snapshot_due: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self.book = book
        self.journal = journal
        self.wall = wall
        self.reaper = reaper
        self.arbiter = arbiter
        self.new_id = new_id
        self.snapshot_every = snapshot_every
        self.snapshot_due = snapshot_due
        self.holders: dict[str, Outbox] = {}
        self.subscribers: set[Outbox] = set()
        self._dirty = False
        self.handlers = {
            CreatePool: self._create_pool,
            SetPool: self._set_pool,
            DeletePool: self._delete_pool,
            ShowPool: lambda m: self.book.pool_info(self.book.pool(m.name)),
            ListPools: lambda m: self.book.pool_infos(),
            CheckReserve: lambda m: [p.name for p in self.book.check_request(m.args)],
            DoReserve: self._reserve,
            GetReservation: lambda m: self.book.reservation(m.id).info(),
            DoRelease: self._release,
            DoRenew: self._renew,
            Expire: lambda m: self._commit(self.book.expire(m.id, m.expires_at, self.wall())),
            PreemptTenant: self._preempt,
            FinishGrace: lambda m: self._commit(self.book.finish_grace(m.id, self.wall())),
            SessionClosed: self._session_closed,
            ListActive: self._list,
            ExportHistory: self._export,
            ShowResources: lambda m: self.book.resources_view(m.pool),
            Subscribe: self._subscribe,
            Unsubscribe: lambda m: self.subscribers.discard(m.outbox),
            CountActive: lambda m: len(self.book.of_tenant(m.tenant)),
            ReleaseTenant: self._release_tenant,
            TakeSnapshot: lambda m: (self.journal.last_lsn, self.book.snapshot()),
        }

    # --------------------------------------------------------------- startup

    def recover_effects(self) -> int:
        """After replay: end session leases of connections gone with the old process,
        and arm timers for every live reservation. Returns the journal lsn to await."""
        lsn = self._commit(
            self.book.end_sessions(None, self.wall(), "session closed (daemon restarted)")
        )
        for r in self.book.reservations.values():
            if r.expires_at is not None:
                self.reaper.tell(Schedule(r.id, r.expires_at))
            if r.state == "terminating" and r.deadline is not None:
                self.arbiter.tell(Schedule(r.id, r.deadline))
        return lsn

    # ------------------------------------------------------------- mutations

    def _commit(self, events: Sequence[PoolEvent]) -> int:
        """Apply, journal and announce ``events``; returns the lsn to await (0: none)."""
        if not events:
            return 0
        gone = {e.id: self.book.reservations[e.id] for e in events if isinstance(e, Ended)}
        self.book.apply(events)
        lsn = self.journal.append(DOMAIN, [encode(e) for e in events])
        for event in events:
            self._effects(event, gone)
        return lsn

    def _effects(self, event: PoolEvent, gone: dict[str, Reservation]) -> None:
        match event:
            case Reserved(reservation=r):
                log.info(
                    "reserved",
                    reservation=r.id,
                    tenant=r.tenant,
                    pool=r.pool,
                    resources=r.resources,
                )
                if r.expires_at is not None:
                    self.reaper.tell(Schedule(r.id, r.expires_at))
                self._dirty = True
            case Renewed(id=rid, expires_at=expires_at):
                log.info("renewed", reservation=rid, expires_at=expires_at)
                self.reaper.tell(Schedule(rid, expires_at))
            case Terminating(id=rid, deadline=deadline, by=by):
                log.info("preempting", reservation=rid, by=by, deadline=deadline)
                self.arbiter.tell(Schedule(rid, deadline))
                r = self.book.reservations[rid]
                self._notify(rid, PreemptedEvent(reservation=r.info(), by=by, deadline=deadline))
                self._dirty = True
            case Ended(id=rid, state=state, at=at, reason=reason):
                log.info(state, reservation=rid, reason=reason)
                self.reaper.tell(Cancel(rid))
                self.arbiter.tell(Cancel(rid))
                outbox = self.holders.pop(rid, None)
                if outbox is not None and state in ("expired", "preempted"):
                    info = gone[rid].info(state=state, ended_at=at)
                    note: Any = (
                        ExpiredEvent(reservation=info)
                        if state == "expired"
                        else PreemptedEvent(reservation=info, by=reason, deadline=None)
                    )
                    self._send(outbox, note)
                self._dirty = True
            case Denied():
                pass
            case _:
                self._dirty = True

    def _notify(self, rid: str, event: Any) -> None:
        outbox = self.holders.get(rid)
        if outbox is not None:
            self._send(outbox, event)

    @staticmethod
    def _send(outbox: Outbox, event: Any) -> None:
        try:
            outbox.send_nowait(encode_frame(push(event)))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # a client that does not read its pushes loses them, not the daemon

    def after_batch(self) -> None:
        if self.journal.entries_since_snapshot >= self.snapshot_every:
            self.snapshot_due()
        if self._dirty and self.subscribers:
            event = StateEvent(
                pools=self.book.pool_infos(), active=len(self.book.reservations), at=self.wall()
            )
            frame = encode_frame(push(event))
            for outbox in list(self.subscribers):
                try:
                    outbox.send_nowait(frame)
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    self.subscribers.discard(outbox)
        self._dirty = False

    # -------------------------------------------------------------- handlers

    def _create_pool(self, msg: CreatePool) -> tuple[PoolInfo, int]:
        lsn = self._commit(self.book.create_pool(msg.args, self.wall()))
        return self.book.pool_info(self.book.pools[msg.args.name]), lsn

    def _set_pool(self, msg: SetPool) -> tuple[PoolInfo, int]:
        lsn = self._commit(self.book.set_pool(msg.args))
        return self.book.pool_info(self.book.pools[msg.args.name]), lsn

    def _delete_pool(self, msg: DeletePool) -> tuple[Done, int]:
        events = self.book.delete_pool(msg.name, msg.force, self.wall())
        lsn = self._commit(events)
        return Done(removed=len(events) - 1), lsn

    def _reserve(self, msg: DoReserve) -> tuple[ReservationInfo, int]:
        events = self.book.reserve(
            msg.args,
            msg.tenant,
            uid=msg.peer.uid,
            session=msg.session,
            now=self.wall(),
            rid=self.new_id(),
        )
        lsn = self._commit(events)
        match events:
            case [Denied() as denied]:
                raise denial_error(denied)
            case [Reserved(reservation=r)]:
                if msg.outbox is not None:
                    self.holders[r.id] = msg.outbox
                return r.info(), lsn
        raise AssertionError(events)  # pragma: no cover

    def _release(self, msg: DoRelease) -> tuple[ReservationInfo, int]:
        info = self.book.reservation(msg.id).info(state="released")
        lsn = self._commit(self.book.release(msg.id, self.wall()))
        return info, lsn

    def _renew(self, msg: DoRenew) -> tuple[ReservationInfo, int]:
        lsn = self._commit(self.book.renew(msg.args, self.wall()))
        return self.book.reservation(msg.args.id).info(), lsn

    def _preempt(self, msg: PreemptTenant) -> tuple[list[ReservationInfo], int]:
        events = self.book.preempt(msg.target, msg.pool, msg.by, self.wall())
        victims = [
            self.book.reservations[e.id].info(state="preempted")
            for e in events
            if isinstance(e, Ended)
        ]
        lsn = self._commit(events)
        victims += [
            self.book.reservations[e.id].info() for e in events if isinstance(e, Terminating)
        ]
        return victims, lsn

    def _session_closed(self, msg: SessionClosed) -> int:
        for rid in [rid for rid, r in self.book.reservations.items() if r.session == msg.session]:
            self.holders.pop(rid, None)
        return self._commit(self.book.end_sessions(msg.session, self.wall(), "session closed"))

    def _release_tenant(self, msg: ReleaseTenant) -> int:
        now = self.wall()
        return self._commit(
            [
                Ended(r.id, "released", now, "tenant removed")
                for r in self.book.of_tenant(msg.tenant)
            ]
        )

    def _list(self, msg: ListActive) -> list[ReservationInfo]:
        return [
            r.info()
            for r in sorted(self.book.reservations.values(), key=lambda r: r.created_at)
            if (msg.pool is None or r.pool == msg.pool)
            and (msg.tenant is None or r.tenant == msg.tenant)
        ]

    def _export(self, msg: ExportHistory) -> list[HistoryEvent]:
        return [
            h
            for h in self.book.history
            if (msg.since is None or h.at >= msg.since)
            and (msg.tenant is None or h.tenant == msg.tenant)
        ]

    def _subscribe(self, msg: Subscribe) -> list[PoolInfo]:
        self.subscribers.add(msg.outbox)
        return self.book.pool_infos()
