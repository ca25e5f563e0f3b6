"""The pool actor: sole owner of the pool book and the wait queue, and of who to
tell about them.

Every mutation is one synchronous step: decide events with the book (which checks
everything and raises before anything changes), append them to the journal, apply
them, then derive the side effects (timers for the reaper and arbiter, process
watches, pushes to holders, a fresh ``state`` for subscribers). If the journal
refuses the entry nothing has changed in memory either, and the requester gets
``unavailable``. The reply carries the journal sequence number the caller must
await before answering its client, so acknowledgement follows durability while
the actor moves on; pushes wait for durability in the announcer.

Surviving restarts (SPEC §9): waiters are journaled (``Queued``). After a restart,
and when resd closes a connection that does not read its pushes, session leases
and waiters that carry an attach token become *orphans* for ``reattach_grace``
seconds: they keep their resources, TTLs and places in the queue, and a client
presenting the token (``attach``, or the same ``reserve`` again) re-binds them to
its new connection (``Rebound``). An orphan not re-attached in time is released
(a waiter: denied) with a history event that says so.

Waiting (SPEC §4): a request that does not fit and may wait joins the queue. After
any batch that freed something a waiter touches, the actor drives one pass of the
pure scheduler (``resd/scheduler.py``), journaling and applying each step it
decides: grants, evictions, waiters that can wait no more.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import signal
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog
import trio

from resd import cgroups, gpu_policy, preemption, resize, scheduler
from resd.actor import Actor
from resd.announcer import Announcer
from resd.cgroups import CgroupJobs
from resd.journal import Journal
from resd.messages import (
    Cancel,
    CheckReserve,
    CountActive,
    CreatePool,
    DeletePool,
    DoAttach,
    DoRegister,
    DoRelease,
    DoRenew,
    DoReserve,
    DoResize,
    Expire,
    ExportHistory,
    FinishGrace,
    ForgetTenant,
    GpuLeases,
    GpuReport,
    ListActive,
    ListPools,
    Outbox,
    OwnerCheck,
    PlanRequest,
    PreemptTenant,
    ProcessExited,
    Recover,
    ReleaseTenant,
    Schedule,
    SessionClosed,
    SetPool,
    SetQuota,
    ShowPool,
    ShowResources,
    Subscribe,
    TakeSnapshot,
    TenantStanding,
    Unsubscribe,
    Unwatch,
    Watch,
    WhyWaiting,
)
from resd.metrics import Metrics
from resd.pools import PoolBook, denial_error
from resd.procwatch import signal_processes
from resd.reconcile import ProcInfo
from resd.records import (
    Denied,
    Ended,
    Marked,
    PoolEvent,
    Queued,
    Rebound,
    Registered,
    Renewed,
    Reservation,
    Reserved,
    Resized,
    Tenant,
    Terminating,
    journal_events,
)
from resd.timerheap import TimerHeap
from resd.waiting import Waiter, WaitQueue, touched
from resd_client.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ResdError,
    TimeoutError_,
    UnavailableError,
)
from resd_client.protocol import (
    Attach,
    DeniedEvent,
    DeviceUse,
    Done,
    ExpiredEvent,
    GrantedEvent,
    HistoryEvent,
    MarkedEvent,
    PlanResult,
    PoolInfo,
    PreemptedEvent,
    QuotaInfo,
    ReclaimEvent,
    ReleasedEvent,
    ReservationInfo,
    Reserve,
    ResizedEvent,
    StateEvent,
    WaitInfo,
    encode_frame,
    push,
)

log = structlog.get_logger("resd.pools")
DOMAIN = "pools"
#: seconds before a change the journal refused (a full disk) is tried again
RETRY_AFTER = 1.0


def new_reservation_id() -> str:
    return "r-" + secrets.token_hex(6)


class Holders:
    """Whom to push news of a reservation to: the connection that made it, while it
    is open. Indexed both ways so a closing connection forgets all its entries and
    an ending reservation its one, whatever the binding."""

    def __init__(self) -> None:
        self._outbox: dict[str, tuple[str, Outbox]] = {}
        self._of_connection: dict[str, set[str]] = {}
        #: connection → its (connection, outbox) entry, one tuple that all its
        #: reservations share (a connection may hold a hundred thousand)
        self._entry: dict[str, tuple[str, Outbox]] = {}

    def add(self, rid: str, connection: str, outbox: Outbox) -> None:
        entry = self._entry.get(connection)
        if entry is None or entry[1] is not outbox:
            entry = self._entry[connection] = (connection, outbox)
        self._outbox[rid] = entry
        self._of_connection.setdefault(connection, set()).add(rid)

    def get(self, rid: str) -> Outbox | None:
        entry = self._outbox.get(rid)
        return None if entry is None else entry[1]

    def drop(self, rid: str) -> tuple[str, Outbox] | None:
        """Forget ``rid``; returns (its connection, the outbox) if it had one."""
        entry = self._outbox.pop(rid, None)
        if entry is None:
            return None
        connection, _ = entry
        mine = self._of_connection[connection]
        mine.discard(rid)
        if not mine:
            del self._of_connection[connection]
            self._entry.pop(connection, None)
        return entry

    def drop_connection(self, connection: str) -> None:
        self._entry.pop(connection, None)
        for rid in self._of_connection.pop(connection, ()):
            del self._outbox[rid]

    def __len__(self) -> int:
        return len(self._outbox)


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
        announcer: Announcer | None = None,
        watcher: Any = None,
        reattach_grace: float = 0.0,
        metrics: Metrics | None = None,
        cgroups: CgroupJobs | None = None,
    ) -> None:
        """``metrics``: counts evictions, ends and waits (None: nothing counted);
        ``cgroups``: where ``resctl run`` confines CMD (None: the host cannot)."""
        super().__init__()
        self.book = book
        self.journal = journal
        self.wall = wall
        self.reaper = reaper
        self.arbiter = arbiter
        self.new_id = new_id
        self.snapshot_every = snapshot_every
        self.snapshot_due = snapshot_due
        self.announcer = announcer
        #: tells the process watcher (``Watch``/``Unwatch``); None: pid bindings are
        #: recorded but not watched (unit tests)
        self.watcher = watcher
        self.reattach_grace = reattach_grace
        self.metrics = metrics
        self.cgroups = cgroups
        #: the clock of its timers (trio's; a test driving handlers outside trio
        #: gives its own)
        self.clock: Callable[[], float] = trio.current_time
        self.holders = Holders()
        self.subscribers: set[Outbox] = set()
        self.queue = WaitQueue()
        #: leases and waiters waiting to be re-attached → trio time they are given up
        self.orphans = TimerHeap()
        #: tenants being removed (name → created_at): their requests in flight are refused
        self._removed: dict[str, float] = {}
        #: the connection whose own release is being committed (it gets no push)
        self._releaser: str | None = None
        #: messages to handle again because the journal refused them (key → message)
        self._later = TimerHeap()
        self._later_ids = itertools.count()
        self._dirty = False
        self._queue_dirty = False
        #: the waiter whose own reserve call is being answered (gets a reply, no push)
        self._replying: str | None = None
        #: leases ended for over-use → their processes, SIGKILLed when the grace ends
        self._doomed: dict[str, tuple[tuple[ProcInfo, ...], int]] = {}
        self.handlers = {
            CreatePool: self._create_pool,
            SetPool: self._set_pool,
            DeletePool: self._delete_pool,
            ShowPool: lambda m: self.book.pool_info(self.book.pool(m.name)),
            ListPools: lambda m: self.book.pool_infos(),
            CheckReserve: lambda m: [p.name for p in self.book.check_request(m.args)],
            DoReserve: self._reserve,
            DoRelease: self._release,
            DoRenew: self._renew,
            Expire: lambda m: self._or_later(
                m, lambda: self._commit(self.book.expire(m.id, m.expires_at, self.wall()))
            ),
            PreemptTenant: self._preempt,
            FinishGrace: lambda m: self._or_later(
                m, lambda: self._commit(self.book.finish_grace(m.id, self.wall()))
            ),
            SessionClosed: lambda m: self._or_later(m, lambda: self._session_closed(m)),
            DoAttach: self._attach,
            Recover: lambda m: self._recover(),
            ProcessExited: lambda m: self._or_later(
                m,
                lambda: self._commit(self.book.process_exited(m.id, m.pid, m.start, self.wall())),
            ),
            WhyWaiting: self._why,
            PlanRequest: self._plan,
            ListActive: self._list,
            ExportHistory: self._export,
            ShowResources: lambda m: self.book.resources_view(m.pool),
            Subscribe: self._subscribe,
            Unsubscribe: lambda m: self.subscribers.discard(m.outbox),
            CountActive: lambda m: len(self.book.of_tenant(m.tenant)),
            ReleaseTenant: self._release_tenant,
            ForgetTenant: self._forget_tenant,
            TakeSnapshot: lambda m: (self.journal.last_lsn, self.book.snapshot()),
            DoRegister: self._register,
            DoResize: self._resize,
            SetQuota: lambda m: (
                None,
                self._commit(self.book.set_quota(m.pool, m.tenant, m.min, m.max)),
            ),
            TenantStanding: self._tenant_standing,
            GpuLeases: lambda m: gpu_policy.lease_views(self.book, m.pids),
            GpuReport: self._gpu_report,
        }

    # --------------------------------------------------------------- startup

    def _recover(self) -> int:
        """After replay: put waiters back in the queue, make orphans of session leases
        and waiters (their connections died with the old process), and arm timers for
        every live reservation. Returns the journal lsn to await."""
        for record in sorted(self.book.waiting.values(), key=lambda w: w.seq):
            w = Waiter.of(record)
            self.queue.add(w, self._trio_at(w.timeout_at))
            self.queue.continue_after(w.seq)
        sessions = {*self.book.by_session, *(w.session for w in self.queue.waiters.values())}
        lsn = 0
        for session in sorted(sessions):
            closed = SessionClosed(session, orphan=True, why="daemon restarted")
            try:  # a full disk must not stop the start: tried again until it goes
                lsn = max(
                    lsn, self._or_later(closed, functools.partial(self._session_closed, closed))
                )
            except UnavailableError as exc:
                log.error("recovery_deferred", conn=session, error=exc.message)
        for r in self.book.reservations.values():
            if r.expires_at is not None:
                self.reaper.tell(Schedule(r.id, r.expires_at))
            if r.state == "terminating" and r.deadline is not None:
                self.arbiter.tell(Schedule(r.id, r.deadline))
            if r.pid is not None and r.pid_start is not None and self.watcher is not None:
                self.watcher.tell(Watch(r.id, r.pid, r.pid_start))
        self._queue_dirty = bool(self.queue)
        return lsn

    def _trio_at(self, wall_at: float | None) -> float | None:
        """The trio time of wall time ``wall_at``."""
        if wall_at is None:
            return None
        return self.clock() + max(0.0, wall_at - self.wall())

    def _orphan_session(self, session: str, why: str) -> int:
        """Connection ``session`` is gone without its client having asked: its session
        leases and waiters that carry a token wait ``reattach_grace`` to be
        re-attached; the others end now. Returns the lsn to await."""
        keep = self.reattach_grace > 0
        orphaned = 0
        for w in self.queue.of_session(session):
            w.outbox = None
            if keep and w.args.token:
                self.orphans.add(w.id, self.clock() + self.reattach_grace)
                orphaned += 1
            else:
                self._end_waiter(
                    w, UnavailableError(f"the connection closed while waiting ({why})")
                )
        self.holders.drop_connection(session)
        ended: list[PoolEvent] = []
        for rid in sorted(self.book.by_session.get(session, ())):
            if keep and self.book.reservations[rid].token:
                self.orphans.add(rid, self.clock() + self.reattach_grace)
                orphaned += 1
            else:
                ended.append(Ended(rid, "released", self.wall(), f"session closed ({why})"))
        if orphaned:
            log.info("orphaned", conn=session, why=why, held=orphaned, grace=self.reattach_grace)
        return self._commit(ended)

    def _abandon(self, rid: str) -> None:
        """An orphan's grace is over: release it (a waiter: deny it)."""
        why = f"not re-attached within {self.reattach_grace:g}s"
        w = self.queue.waiters.get(rid)
        if w is not None:
            self._end_waiter(w, UnavailableError(f"{rid} was {why}", {"id": rid}))
        elif rid in self.book.reservations:
            self._commit([Ended(rid, "released", self.wall(), why)])

    # ------------------------------------------------------------- mutations

    def _commit(self, events: Sequence[PoolEvent]) -> int:
        """Journal, apply and announce decided ``events``; returns the lsn to await
        (0: none). Raises UnavailableError, with nothing changed, if the journal
        refuses them."""
        if not events:
            return 0
        events = self.book.gang_whole(events)  # a gang's parts go together, always
        gone = {e.id: self.book.reservations[e.id] for e in events if isinstance(e, Ended)}
        lsn = journal_events(self.journal, DOMAIN, events)
        self.book.apply(events)
        for event in events:
            self._effects(event, gone, lsn)
        if self.queue and any(
            not isinstance(e, Ended | Reserved | Renewed | Terminating | Denied | Queued | Rebound)
            or (isinstance(e, Ended) and self.queue.concerns(gone[e.id]))
            for e in events
        ):
            self._queue_dirty = True
        return lsn

    def _effects(self, event: PoolEvent, gone: dict[str, Reservation], lsn: int) -> None:
        match event:
            case Reserved(reservation=r):
                log.debug(
                    "reserved",
                    reservation=r.id,
                    tenant=r.tenant,
                    pool=r.pool,
                    resources=r.resources,
                )
                if r.expires_at is not None:
                    self.reaper.tell(Schedule(r.id, r.expires_at))
                if r.pid is not None and r.pid_start is not None and self.watcher is not None:
                    self.watcher.tell(Watch(r.id, r.pid, r.pid_start))
                self._dirty = True
            case Renewed(id=rid, expires_at=expires_at):
                tenant = self.book.reservations[rid].tenant
                log.debug("renewed", reservation=rid, tenant=tenant, expires_at=expires_at)
                self.reaper.tell(Schedule(rid, expires_at))
            case Terminating(id=rid, deadline=deadline, by=by, reclaim=reclaim):
                info = self.book.reservations[rid].info()
                log.info(
                    "preempting",
                    reservation=rid,
                    tenant=info.tenant,
                    by=by,
                    deadline=deadline,
                    reclaim=reclaim,
                )
                self.arbiter.tell(Schedule(rid, deadline))
                if self.metrics is not None:
                    self.metrics.evicted(info.pool, by)
                self._notify(
                    rid,
                    ReclaimEvent(reservation=info, by=by, deadline=deadline)
                    if reclaim
                    else PreemptedEvent(reservation=info, by=by, deadline=deadline),
                    lsn,
                )
                self._dirty = True
            case Ended(id=rid, state=state, at=at, reason=reason):
                # Ends are routine (history has them all); a preemption is news.
                (log.info if state == "preempted" else log.debug)(
                    state, reservation=rid, tenant=gone[rid].tenant, reason=reason
                )
                if self.metrics is not None:
                    if state == "preempted" and gone[rid].state != "terminating":  # no grace
                        self.metrics.evicted(gone[rid].pool, reason)
                    self.metrics.lease_ended(gone[rid].pool, state)
                # Only actors that hold a timer or a watch for it are told.
                if gone[rid].expires_at is not None:
                    self.reaper.tell(Cancel(rid))
                if gone[rid].state == "terminating":
                    self.arbiter.tell(Cancel(rid))
                if gone[rid].pid is not None and self.watcher is not None:
                    self.watcher.tell(Unwatch(rid))
                self.orphans.discard(rid)
                if self.cgroups is not None:
                    self.cgroups.ended(rid)
                doomed = self._doomed.pop(rid, None)
                if doomed is not None:
                    signal_processes(doomed[0], signal.SIGKILL, doomed[1])
                holder = self.holders.drop(rid)
                # The holder is told, unless this is its own release (its reply tells it).
                if holder is not None and (state != "released" or holder[0] != self._releaser):
                    info = gone[rid].info(state=state, ended_at=at)
                    note: Any
                    if state == "expired":
                        note = ExpiredEvent(reservation=info)
                    elif state == "preempted":
                        note = PreemptedEvent(reservation=info, by=reason, deadline=None)
                    else:
                        note = ReleasedEvent(
                            reservation=msgspec.structs.replace(info, reason=reason)
                        )
                    self._push(holder[1], note, lsn)
                self._dirty = True
            case Marked(id=rid, mark=mark, on=on, detail=detail):
                info = self.book.reservations[rid].info()
                (log.warning if on else log.info)(
                    "marked" if on else "unmarked",
                    reservation=rid,
                    tenant=info.tenant,
                    mark=mark,
                    detail=detail,
                )
                self._notify(
                    rid, MarkedEvent(reservation=info, mark=mark, on=on, detail=detail), lsn
                )
                self._dirty = True
            case Denied() | Queued() | Rebound() | Registered():
                pass
            case _:
                self._dirty = True

    def _notify(self, rid: str, event: Any, lsn: int) -> None:
        outbox = self.holders.get(rid)
        if outbox is not None:
            self._push(outbox, event, lsn)

    def _push(self, outbox: Outbox, event: Any, lsn: int) -> None:
        frame = encode_frame(push(event))
        if self.announcer is None:
            outbox.push(frame)
        else:
            self.announcer.push(outbox, frame, lsn)

    def next_deadline(self) -> float:
        return min(self.queue.timeouts.earliest(), self.orphans.earliest(), self._later.earliest())

    def on_deadline(self) -> None:
        now = self.clock()
        for _, message in self._later.pop_due(now):
            try:
                self.handlers[type(message)](message)  # refused again: it is re-queued
            except ResdError as exc:
                log.debug("retry_failed", message=type(message).__name__, error=exc.message)
        for rid, _ in self.orphans.pop_due(now):
            try:
                self._abandon(rid)
            except UnavailableError:
                self.orphans.add(rid, now + RETRY_AFTER)
        for rid, _ in self.queue.timeouts.pop_due(now):
            w = self.queue.waiters.get(rid)
            if w is None or w.args.timeout is None:
                continue
            try:
                self._end_waiter(
                    w,
                    TimeoutError_(
                        f"{rid} gave up after waiting {w.args.timeout:g}s: {w.message}",
                        {"id": rid, "timeout": w.args.timeout, "reason": w.reason, **w.details},
                    ),
                )
            except UnavailableError:
                self.queue.timeouts.add(rid, now + RETRY_AFTER)

    def _or_later(self, message: Any, step: Callable[[], Any]) -> Any:
        """Run ``step`` for a message that no requester retries (a timer fired, a
        connection ended); if the journal refuses it, handle ``message`` again in
        ``RETRY_AFTER`` seconds, so a full disk delays an expiry but never loses it."""
        try:
            return step()
        except UnavailableError:
            key = f"{type(message).__name__}:{next(self._later_ids)}"
            self._later.add(key, self.clock() + RETRY_AFTER, message)
            raise

    def after_batch(self) -> None:
        while self._queue_dirty:
            try:
                self._schedule()
            except UnavailableError as exc:  # the journal refused: try again next batch
                log.error("schedule_failed", error=exc.message)
                break
        if self.journal.entries_since_snapshot >= self.snapshot_every:
            self.snapshot_due()
        if self._dirty and self.subscribers:
            event = StateEvent(
                pools=self.book.pool_infos(), active=len(self.book.reservations), at=self.wall()
            )
            frame = encode_frame(push(event))
            for outbox in list(self.subscribers):
                if not outbox.push(frame):  # gone, or closed for not reading
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
        args, now = msg.args, self.wall()
        if args.token is not None and args.token in self.book.by_token:
            # The same request again (its reply was lost with a connection): re-attach.
            uid = None if msg.peer.admin else msg.peer.uid
            return self._attach(
                DoAttach(Attach(token=args.token), uid, msg.session, msg.outbox, msg.peer.pid)
            )
        if self._removed.get(msg.tenant.name) == msg.tenant.created_at:
            raise NotFoundError(
                f"tenant {msg.tenant.name!r} was removed", {"tenant": msg.tenant.name}
            )
        pools = [p.name for p in self.book.check_request(args)]
        w = Waiter(
            id=self.new_id(),
            args=args,
            tenant=msg.tenant,
            uid=msg.peer.uid,
            session=msg.session,
            outbox=msg.outbox,
            pools=tuple(pools),
            keys=touched(pools, args),
            arrived=now,
            seq=self.queue.next_seq(),
            pid=msg.pid,
            peer=msg.peer.pid or None,
            timeout_at=None if args.timeout is None else now + args.timeout,
        )
        if not self.queue.touches(w.keys):
            # Nobody waits for what this request needs: decide it directly.
            events = scheduler.decide(self.book, w, now)
            if isinstance(events[0], Reserved):
                return self._granted_now(w, events)
            w.waits_for(*scheduler.waiting_reason(denial_error(events[0])))
            if not args.wait and not scheduler.preemptible(self.book, w):
                self._commit(events)
                raise denial_error(events[0])
        impossible = self.book.never_fits(args, tenant=msg.tenant.name)
        if impossible is not None:  # waiting would be forever
            self._commit([self.book.denied(args, pools[0], w.tenant, now, impossible)])
            raise impossible
        if args.wait:
            self._commit([Queued(w.record())])
        # A request that will not wait joins the queue only for this one pass (it may
        # preempt for itself): never journaled, so a crash cannot bring it back waiting.
        self.queue.add(w, self._trio_at(w.timeout_at))
        self._replying = w.id
        try:
            self._schedule()
        except BaseException:
            if not args.wait:
                self.queue.remove(w.id)
            raise
        finally:
            self._replying = None
        r = self.book.reservations.get(w.id)
        if r is not None:
            return self.book.lease_info(r.id), self.journal.last_lsn
        if not args.wait:
            error = scheduler.error_of(w)
            w.outbox = None  # the reply tells it
            try:
                self._end_waiter(w, error)
            finally:  # never journaled as waiting: gone even if its denial is not journaled
                self.queue.remove(w.id)
            raise error
        log.debug("queued", reservation=w.id, tenant=w.tenant.name, position=w.position)
        return w.info(), self.journal.last_lsn

    def _granted_now(self, w: Waiter, events: list[PoolEvent]) -> tuple[ReservationInfo, int]:
        lsn = self._commit(events)
        if w.outbox is not None:
            self.holders.add(w.id, w.session, w.outbox)
        return self.book.lease_info(w.id), lsn

    # ------------------------------------------------------------------ queue

    def _schedule(self) -> None:
        """Drive one pass of the pure scheduler (``resd/scheduler.py``): commit each
        step it decides, then let it go on against the changed book. A step the
        journal refuses ends the pass (UnavailableError); the next batch retries."""
        self._queue_dirty = False
        if not self.queue:
            return
        granted: set[str] = set()
        steps = scheduler.run_pass(self.book, self.queue, self.wall(), granted.__contains__)
        try:
            for step in steps:
                match step:
                    case scheduler.Grant(waiter=w, events=events):
                        self._grant(w, events)
                        granted.add(w.id)
                    case scheduler.Evict(events=events):
                        self._commit(events)
                    case scheduler.Drop(waiter=w, error=error):
                        self._end_waiter(w, error)
        finally:
            steps.close()

    def _grant(self, w: Waiter, events: list[PoolEvent]) -> None:
        if w.resize_of:
            lsn = self._commit(events)
            self.queue.remove(w.id)
            waited = round(self.wall() - w.arrived, 3)
            log.debug("resized", reservation=w.resize_of, tenant=w.tenant.name, waited=waited)
            if w.outbox is not None:
                info = self.book.reservations[w.resize_of].info()
                self._push(w.outbox, ResizedEvent(reservation=info), lsn)
            return
        info, lsn = self._granted_now(w, events)
        self.queue.remove(w.id)
        if w.args.binding != "session":
            self.orphans.discard(w.id)  # a detached or pid lease needs no connection
        waited = self.wall() - w.arrived
        if self.metrics is not None:
            self.metrics.waited(info.pool, waited)
        log.debug("granted", reservation=w.id, tenant=w.tenant.name, waited=round(waited, 3))
        if w.outbox is not None and w.id != self._replying:
            self._push(w.outbox, GrantedEvent(reservation=info), lsn)

    def _end_waiter(self, w: Waiter, error: ResdError) -> int:
        """Take ``w`` out of the queue ungranted: record the denial, tell it why."""
        denied = self.book.denied(w.args, w.pools[0], w.tenant, self.wall(), error, w.id)
        lsn = self._commit([denied])
        self.queue.remove(w.id)
        self.orphans.discard(w.id)
        self._queue_dirty = True
        log.debug(
            "wait_ended",
            reservation=w.id,
            tenant=w.tenant.name,
            code=str(error.code),
            error=error.message,
        )
        if w.outbox is not None:
            self._push(w.outbox, DeniedEvent(reservation_id=w.id, error=error.to_wire()), lsn)
        return lsn

    def _tenant_standing(
        self, msg: TenantStanding
    ) -> dict[str, tuple[dict[str, QuotaInfo], float, float]]:
        usage = self.book.fair.usages(self.wall())
        total = sum(usage.values())
        names = (
            {msg.tenant}
            if msg.tenant
            else {t for p in self.book.pools.values() for t in p.quotas} | set(usage)
        )
        return {
            t: (
                self.book.tenant_quotas(t),
                usage.get(t, 0.0),
                usage.get(t, 0.0) / total if total else 0.0,
            )
            for t in sorted(names)
        }

    def _resize(self, msg: DoResize) -> tuple[ReservationInfo, int] | OwnerCheck:
        """Resize a lease now, or queue the growth (``wait``): the reply is then the
        waiting request (cancel it by releasing its id) and the holder is pushed
        ``resized`` when it is granted."""
        check = self._owner_check(msg.args.id, msg.uid)
        if check is not None:
            return check
        args, now = msg.args, self.wall()
        events = resize.resize(self.book, args.id, args.resources, args.give_back, now)
        if isinstance(events[0], Resized):
            lsn = self._commit(events)
            return self.book.reservations[args.id].info(), lsn
        if not args.wait:
            raise denial_error(events[0])
        r = self.book.reservations[args.id]
        request = Reserve(
            pool=r.pool,
            resources=dict(args.resources),
            tenant=r.tenant,
            wait=True,
            timeout=args.timeout,
        )
        w = Waiter(
            id=self.new_id(),
            args=request,
            tenant=Tenant(r.tenant, r.priority),
            uid=r.uid,
            session=msg.session,
            outbox=msg.outbox,
            pools=(r.pool,),
            keys=touched([r.pool], request),
            arrived=now,
            seq=self.queue.next_seq(),
            resize_of=r.id,
            timeout_at=None if args.timeout is None else now + args.timeout,
        )
        w.waits_for(*scheduler.waiting_reason(denial_error(events[0])))
        lsn = self._commit([Queued(w.record())])
        self.queue.add(w, self._trio_at(w.timeout_at))
        self._queue_dirty = True
        log.debug("resize_queued", reservation=r.id, tenant=r.tenant, waiter=w.id)
        order = self.queue.ordered(self.book.usage_at(now))
        return msgspec.structs.replace(w.info(), position=order.index(w) + 1), lsn

    def _register(self, msg: DoRegister) -> tuple[ReservationInfo, int] | OwnerCheck:
        check = self._owner_check(msg.id, msg.uid)
        if check is not None:
            return check
        now = self.wall()
        events = self.book.register(msg.id, msg.pid, msg.start, now)
        if events and msg.confine:
            cgroup = self._confine(msg.id, msg.pid)
            if cgroup:
                events = self.book.register(msg.id, msg.pid, msg.start, now, cgroup)
        lsn = self._commit(events)  # unjournaled, a confined CMD stays so till its end
        return self.book.reservation(msg.id).info(), lsn

    def _confine(self, rid: str, pid: int) -> str:
        """Put ``pid`` in lease ``rid``'s cgroup with the lease's CPU and memory limits;
        "" when the host cannot (no delegated cgroup v2, a controller missing, nothing
        to limit) — CMD then runs unconfined, never refused."""
        if self.cgroups is None:
            return ""
        r = self.book.lease_info(rid)
        wanted = cgroups.needed(r.resources, r.members)
        missing = self.cgroups.tree.missing(wanted)
        if not wanted or missing:
            log.debug("not_confined", reservation=rid, missing=sorted(missing))
            return ""
        try:
            path = self.cgroups.tree.place(rid, pid, cgroups.limits_for(r.resources, r.members))
        except cgroups.CgroupError as exc:
            log.warning("not_confined", reservation=rid, pid=pid, error=str(exc))
            return ""
        return str(path)

    def _gpu_report(self, msg: GpuReport) -> None:
        """Act on the reconciler's verdict (SPEC §10): journal changed marks,
        terminate over-users whose pool says so (SIGTERM now, SIGKILL when the grace
        ends), ask idle reclaimable leases back, adopt foreign use, and let waiters
        try again when memory held outside the ledger shrank."""
        seen = _figures(self.book.live_devices)
        decision = gpu_policy.decide(self.book, msg.verdict, self.wall(), self.new_id())
        try:
            self._commit(decision.events)
        except UnavailableError as exc:  # a full disk: the next sample decides again
            log.error("gpu_report_not_journaled", error=exc.message)
            return
        for rid, procs in decision.terminate.items():
            lease = self.book.reservations[rid]
            sent = signal_processes(procs, signal.SIGTERM, lease.uid)
            log.warning("overuse_terminating", reservation=rid, tenant=lease.tenant, signalled=sent)
        for rid, procs in decision.doomed.items():
            r = self.book.reservations.get(rid)
            if r is not None and r.state == "terminating":
                self._doomed[rid] = (procs, r.uid)
        if decision.outside_changed:
            self._queue_dirty = True
        if seen != _figures(self.book.live_devices):
            self._dirty = True

    def _owner_check(self, rid: str, uid: int | None) -> OwnerCheck | None:
        """Whether the caller (``uid``) must be checked against the tenant's owners."""
        if uid is None:
            return None
        w = self.queue.waiters.get(rid)
        if w is not None:
            return None if uid == w.uid else OwnerCheck(w.tenant.name)
        r = self.book.reservation(rid)
        return None if uid == r.uid else OwnerCheck(r.tenant)

    def _release(self, msg: DoRelease) -> tuple[ReservationInfo, int] | OwnerCheck:
        check = self._owner_check(msg.id, msg.uid)
        if check is not None:
            return check
        w = self.queue.waiters.get(msg.id)
        if w is not None:
            info = w.info()
            lsn = self._end_waiter(w, ConflictError(f"request {w.id} was cancelled", {"id": w.id}))
            return msgspec.structs.replace(info, state="cancelled"), lsn
        info = self.book.lease_info(msg.id, state="released")
        self._releaser = msg.session
        try:
            lsn = self._commit(self.book.release(msg.id, self.wall()))
        finally:
            self._releaser = None
        return info, lsn

    def _renew(self, msg: DoRenew) -> tuple[ReservationInfo, int] | OwnerCheck:
        check = self._owner_check(msg.args.id, msg.uid)
        if check is not None:
            return check
        lsn = self._commit(self.book.renew(msg.args, self.wall()))
        return self.book.lease_info(msg.args.id), lsn

    def _preempt(self, msg: PreemptTenant) -> tuple[list[ReservationInfo], int]:
        events = self.book.preempt(msg.target, msg.pool, msg.by, self.wall(), admin=msg.admin)
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
        if msg.orphan:
            return self._orphan_session(msg.session, msg.why)
        for w in self.queue.of_session(msg.session):
            w.outbox = None
            self._end_waiter(w, ConflictError("the connection closed while waiting", {"id": w.id}))
        self.holders.drop_connection(msg.session)
        return self._commit(self.book.end_sessions(msg.session, self.wall(), "session closed"))

    def _attach(self, msg: DoAttach) -> tuple[ReservationInfo, int]:
        """Re-bind the lease or waiter of ``msg.args.token`` to ``msg.session``; one
        that already ended is reported from history (its final state)."""
        rid = self.book.by_token.get(msg.args.token)
        if rid is None:
            return self._ended_info(msg.args.id), 0
        w = self.queue.waiters.get(rid)
        holder = w.uid if w is not None else self.book.reservations[rid].uid
        if msg.uid is not None and msg.uid != holder:
            raise ForbiddenError(
                f"{rid} belongs to uid {holder}; uid {msg.uid} may not attach to it", {"id": rid}
            )
        lsn = self._commit(self.book.rebind(rid, msg.session, self.wall(), msg.peer))
        self.orphans.discard(rid)
        tenant = w.tenant.name if w is not None else self.book.reservations[rid].tenant
        log.info("reattached", reservation=rid, tenant=tenant, conn=msg.session)
        if w is not None:
            w.session, w.outbox, w.peer = msg.session, msg.outbox, msg.peer
            order = self.queue.ordered(self.book.usage_at(self.wall()))
            return msgspec.structs.replace(w.info(), position=order.index(w) + 1), lsn
        self.holders.drop(rid)
        if msg.outbox is not None:
            self.holders.add(rid, msg.session, msg.outbox)
        return self.book.lease_info(rid), lsn

    def _ended_info(self, rid: str | None) -> ReservationInfo:
        """How ``rid`` ended, from history; raises NotFoundError when it is unknown."""
        h = None if rid is None else self.book.last_event(rid)
        if rid is None or h is None:
            raise NotFoundError(
                "no lease or waiting request has this attach token"
                + ("" if rid is None else f", and {rid} is not in the history"),
                {"id": rid},
            )
        state = h.kind if h.kind in ("released", "expired", "preempted", "denied") else "released"
        return ReservationInfo(
            id=rid,
            tenant=h.tenant,
            pool=h.pool,
            resources=dict(h.resources),
            label="",
            created_at=0.0,
            ttl=None,
            expires_at=None,
            binding="",
            reclaimable=False,
            state=state,
            uid=-1,
            ended_at=h.at,
            reason=h.detail,
        )

    def _release_tenant(self, msg: ReleaseTenant) -> tuple[int, int]:
        """Returns (reservations released, lsn); see ``ReleaseTenant``."""
        name = msg.tenant.name
        live = self.book.of_tenant(name)
        if live and not msg.force:
            raise ConflictError(
                f"tenant {name!r} holds {len(live)} active reservation(s); release them or use --force",
                {"tenant": name, "active": len(live)},
            )
        ended = [Ended(r.id, "released", self.wall(), "tenant removed") for r in live]
        lsn = self._commit([*ended, *self.book.drop_quotas(name)])
        self._removed[name] = msg.tenant.created_at
        for w in [w for w in self.queue.waiters.values() if w.tenant.name == name]:
            lsn = max(lsn, self._end_waiter(w, NotFoundError(f"tenant {name!r} was removed")))
        return len(live), lsn

    def _forget_tenant(self, msg: ForgetTenant) -> None:
        if self._removed.get(msg.tenant.name) == msg.tenant.created_at:
            del self._removed[msg.tenant.name]

    def _list(self, msg: ListActive) -> list[ReservationInfo]:
        if msg.pending:
            return [
                msgspec.structs.replace(w.info(), position=position)
                for position, w in enumerate(self.queue.ordered(self.book.usage_at(self.wall())), 1)
                if (msg.pool is None or msg.pool in w.pools)
                and (msg.tenant is None or w.tenant.name == msg.tenant)
            ]
        return [
            self.book.lease_info(r.id)
            for r in sorted(self.book.reservations.values(), key=lambda r: r.created_at)
            if (not r.gang or r.gang[0] == r.id)  # a gang is one lease
            and (msg.pool is None or msg.pool in self.book.pools_of(r))
            and (msg.tenant is None or r.tenant == msg.tenant)
            and (not msg.idle or "idle" in r.marks)
        ]

    def _export(self, msg: ExportHistory) -> list[HistoryEvent]:
        return [
            h
            for h in self.book.history
            if (msg.since is None or h.at >= msg.since)
            and (msg.tenant is None or h.tenant == msg.tenant)
        ]

    def _why(self, msg: WhyWaiting) -> tuple[WaitInfo, int] | OwnerCheck:
        check = self._owner_check(msg.id, msg.uid)
        if check is not None:
            return check
        return self._wait_info(msg.id), 0

    def _wait_info(self, rid: str) -> WaitInfo:
        w = self.queue.waiters.get(rid)
        if w is None:
            r = self.book.reservation(rid)
            return WaitInfo(
                id=r.id,
                state=r.state,
                position=0,
                queued=len(self.queue),
                reason="none",
                message=f"{r.id} is {r.state}, not waiting",
            )
        order = self.queue.ordered(self.book.usage_at(self.wall()))
        return WaitInfo(
            id=w.id,
            state="pending",
            position=order.index(w) + 1,
            queued=len(order),
            reason=w.reason,
            message=w.message,
            details=dict(w.details),
        )

    def _plan(self, msg: PlanRequest) -> PlanResult:
        now = self.wall()
        plan = preemption.plan(self.book, msg.args, msg.tenant, now)
        if plan.outcome not in ("fits", "never"):  # a tenant within its min reclaims first
            plan = scheduler.reclaim_plan(self.book, msg.args, msg.tenant, now) or plan
        victims = [v.info() for v in plan.victims]
        ids = ", ".join(v.id for v in plan.victims)
        match plan.outcome:
            case "fits":
                text = f"fits in pool {plan.pool!r} now; nothing would be evicted"
            case "preempt":
                text = (
                    f"would evict {len(victims)} lower-priority reservation(s) in pool"
                    f" {plan.pool!r} ({ids}), after a grace of {plan.grace:g}s"
                )
            case "reclaim":
                text = (
                    f"would reclaim {len(victims)} reservation(s) from borrowers in pool"
                    f" {plan.pool!r} ({ids}), after a grace of {plan.grace:g}s: the tenant"
                    " asks within its min"
                )
            case "wait" if victims:
                text = (
                    f"would wait for {ids}, already being preempted, to give back their resources"
                )
            case "wait":
                text = (
                    f"does not fit in pool {plan.pool!r} now and its preemption is off;"
                    " it would wait for releases"
                )
            case _:
                text = (
                    f"even evicting every lower-priority reservation in pool {plan.pool!r}"
                    " would not make room; it would wait for releases"
                )
        return PlanResult(
            outcome=plan.outcome,  # type: ignore[arg-type]
            pool=plan.pool,
            message=text,
            victims=victims,
            grace=plan.grace,
        )

    def _subscribe(self, msg: Subscribe) -> list[PoolInfo]:
        self.subscribers.add(msg.outbox)
        return self.book.pool_infos()


def _figures(devices: dict[str, list[DeviceUse]]) -> list[tuple[Any, ...]]:
    """What a ``state`` subscriber sees of live GPU figures (not the sample time)."""
    return [
        (pool, d.member, d.memory_used, d.foreign, d.overuse, d.utilization)
        for pool, ds in sorted(devices.items())
        for d in ds
    ]
