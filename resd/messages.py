"""Messages between actors. Frozen values; each names who sends it and who handles it.

``Outbox`` is a connection's bounded mailbox of encoded frames: actors push events
to a client by handing frames to it, which never waits (it writes to the socket only
what the socket takes at once).
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from resd.records import Tenant
from resd.tenants import Peer
from resd_client.protocol import (
    Attach,
    PoolCreate,
    PoolSet,
    Renew,
    Reserve,
    Resize,
    TenantAdd,
    TenantSet,
)


@attrs.define(eq=False)
class Outbox:
    """A connection's frames on their way to its socket (replies and pushes).

    A frame is written at once, without a task switch, when nothing is queued before
    it and the socket takes it (the common case: one reply per request); what the
    socket does not take waits in the queue for the connection's writer task
    (``drain``), which writes it when the socket is writable again, several frames
    per write. The queue holds at most ``limit`` frames.

    Replies wait for room (``send``): the connection's reader stops meanwhile, so a
    client that does not read is throttled, not buffered without bound. Pushes come
    from actors, which cannot wait: a push that finds the queue full calls
    ``overflow`` (the server closes the connection, keeping its leases for
    re-attachment), so a notice is never dropped silently.

    ``write`` takes bytes without blocking and returns how many it took (raising
    ``BlockingIOError`` when none fit, ``OSError`` when the peer is gone), as
    ``os.write`` on a non-blocking socket does.
    """

    write: Callable[[bytes | memoryview], int]
    limit: int
    overflow: Callable[[], None] = lambda: None
    _queue: collections.deque[bytes] = attrs.field(init=False, factory=collections.deque)
    _closed: bool = attrs.field(init=False, default=False)  # no more frames accepted
    _broken: bool = attrs.field(init=False, default=False)  # the peer is gone
    _busy: bool = attrs.field(init=False, default=False)  # the writer holds a batch
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)  # the writer's
    _room: trio.lowlevel.ParkingLot = attrs.field(init=False, factory=trio.lowlevel.ParkingLot)

    def push(self, frame: bytes) -> bool:
        """Queue a push without waiting; False if the connection is gone or overflowed."""
        if self._closed:
            return False
        if len(self._queue) >= self.limit:
            self.overflow()
            return False
        self._put(frame)
        return not self._broken

    async def send(self, frame: bytes) -> None:
        """Queue a reply, waiting for room; raises trio.ClosedResourceError or
        trio.BrokenResourceError when the connection is gone."""
        while not self._closed and len(self._queue) >= self.limit:
            await self._room.park()
        if self._broken:
            raise trio.BrokenResourceError("the peer is gone")
        if self._closed:
            raise trio.ClosedResourceError("the connection is closing")
        self._put(frame)

    def close(self) -> None:
        """Accept no more frames; ``drain`` returns once the queue is written."""
        self._closed = True
        self._wake.set()
        self._room.unpark_all()

    def _put(self, frame: bytes) -> None:
        if self._broken:
            return
        if not self._queue and not self._busy:
            taken = self._try_write(frame)
            if taken == len(frame):
                return
            frame = frame[taken:]
        self._queue.append(frame)
        self._wake.set()

    def _try_write(self, data: bytes | memoryview) -> int:
        try:
            return self.write(data)
        except BlockingIOError:
            return 0
        except OSError:  # the client went away; its reader sees EOF
            self._gone()
            return len(data)

    def _gone(self) -> None:
        self._broken = self._closed = True
        self._queue.clear()
        self._wake.set()
        self._room.unpark_all()

    async def drain(self, writable: Callable[[], Awaitable[None]]) -> None:
        """The writer task: write what is queued, waiting for ``writable`` (the socket
        has room) as often as needed, until the outbox is closed and empty or the
        peer is gone. A batch is written whole before the next is taken, so at most
        one batch and ``limit`` frames are held."""
        while True:
            while not self._queue:
                if self._closed:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
            await writable()
            batch = memoryview(b"".join(self._queue))
            self._queue.clear()
            self._room.unpark_all()
            self._busy = True
            try:
                while True:
                    batch = batch[self._try_write(batch) :]
                    if not batch or self._broken:
                        break
                    await writable()
            finally:
                self._busy = False
            if self._broken:
                return


# ----------------------------------------------------------- to the pool actor


@attrs.frozen
class CreatePool:
    args: PoolCreate


@attrs.frozen
class SetPool:
    args: PoolSet


@attrs.frozen
class DeletePool:
    name: str
    force: bool


@attrs.frozen
class ShowPool:
    name: str


@attrs.frozen
class ListPools:
    pass


@attrs.frozen
class DoReserve:
    args: Reserve
    tenant: Tenant
    peer: Peer
    session: str
    outbox: Outbox | None = attrs.field(eq=False, default=None)
    #: ``pid`` binding: the process and its start time, checked by the caller
    pid: tuple[int, float] | None = None


@attrs.frozen
class CheckReserve:
    """Is the request well-formed for its pool? Asked before the tenant is resolved,
    so a bad request does not create the caller's tenant."""

    args: Reserve


@attrs.frozen
class DoRelease:
    """Release (or cancel, if it waits) ``id``. ``uid``: the caller, who must have
    made it, unless None (an admin, or a caller already checked against its
    tenant's owners); otherwise the actor answers ``OwnerCheck``."""

    id: str
    uid: int | None = None
    #: the connection asking (its own leases are not pushed a ``released``)
    session: str = ""


@attrs.frozen
class DoRenew:
    args: Renew
    uid: int | None = None


@attrs.frozen
class DoResize:
    """Resize lease ``args.id`` for caller ``uid`` (None: may act on it); a waiting
    resize is pushed its outcome on ``outbox``."""

    args: Resize
    uid: int | None
    session: str
    outbox: Outbox | None = attrs.field(eq=False, default=None)


@attrs.frozen
class OwnerCheck:
    """Answer to DoRelease/DoRenew: the caller did not make the reservation; it may
    still act if it may act as ``tenant`` (the registry knows)."""

    tenant: str


@attrs.frozen
class Expire:
    """From the reaper: ``id``'s TTL timer for ``expires_at`` fired."""

    id: str
    expires_at: float


@attrs.frozen
class PreemptTenant:
    """``by`` evicts ``target`` (in ``pool``); not ``admin``: only where the pools'
    policy allows preemption."""

    target: str
    pool: str | None
    by: str
    admin: bool = True


@attrs.frozen
class ProcessExited:
    """From the process watcher: ``id``'s bound process ``pid`` (started at
    ``start``) is gone."""

    id: str
    pid: int
    start: float


@attrs.frozen
class WhyWaiting:
    """Why ``id`` waits; ``uid`` as for ``DoRelease`` (its owner, or checked)."""

    id: str
    uid: int | None = None


@attrs.frozen
class PlanRequest:
    """Dry run of ``args`` for ``tenant`` (whose priority may be overridden)."""

    args: Reserve
    tenant: Tenant


@attrs.frozen
class FinishGrace:
    """From the arbiter: ``id``'s grace period is over."""

    id: str


@attrs.frozen
class SessionClosed:
    """Connection ``session`` ended. ``orphan``: resd closed it (``why``: it is
    stopping, or the client did not read its pushes), so its session leases and
    waiters wait ``reattach_grace`` for their client to re-attach instead of ending
    at once."""

    session: str
    orphan: bool = False
    why: str = ""


@attrs.frozen
class DoAttach:
    """Re-bind the lease or waiter of ``args.token`` to connection ``session``;
    ``uid`` None: an admin (any holder's token is accepted)."""

    args: Attach
    uid: int | None
    session: str
    outbox: Outbox | None = attrs.field(eq=False, default=None)
    #: the connection's peer process (a session lease's attribution root)
    peer: int | None = None


@attrs.frozen
class ListActive:
    pool: str | None = None
    tenant: str | None = None
    pending: bool = False
    idle: bool = False


@attrs.frozen
class ShowResources:
    pool: str


@attrs.frozen
class ExportHistory:
    since: float | None
    tenant: str | None


@attrs.frozen
class Subscribe:
    outbox: Outbox = attrs.field(eq=False)


@attrs.frozen
class Unsubscribe:
    outbox: Outbox = attrs.field(eq=False)


@attrs.frozen
class CountActive:
    tenant: str


@attrs.frozen
class ReleaseTenant:
    """Before ``tenant`` (this very one: name and ``created_at``) is removed: refuse
    if it holds reservations and not ``force``; else release them, cancel its
    waiters, and refuse its requests still on their way (``ForgetTenant`` undoes
    that if the removal fails)."""

    tenant: Tenant
    force: bool


@attrs.frozen
class ForgetTenant:
    tenant: Tenant


@attrs.frozen
class TakeSnapshot:
    pass


@attrs.frozen
class Recover:
    """Once, at start after replay: restore the queue, orphan the session leases and
    waiters of the previous process, arm timers. Answers the lsn to await."""


# ------------------------------------------------------- to the tenant registry


@attrs.frozen
class Resolve:
    name: str | None
    peer: Peer


@attrs.frozen
class PeekTenant:
    """Like ``Resolve`` but never creates the caller's tenant: answers
    ``(tenant, made)``, ``made`` true when the tenant does not exist yet and
    ``tenant`` is what ``Resolve`` would create."""

    name: str | None
    peer: Peer


@attrs.frozen
class AddTenant:
    args: TenantAdd
    peer: Peer


@attrs.frozen
class SetTenant:
    args: TenantSet
    peer: Peer


@attrs.frozen
class RemoveTenant:
    name: str
    peer: Peer


@attrs.frozen
class GetTenant:
    name: str


@attrs.frozen
class ListTenants:
    pass


# --------------------------------------------------------- to the timer actors


@attrs.frozen
class Schedule:
    """Reaper: expire ``id`` at wall time ``at``. Arbiter: end ``id``'s grace at ``at``."""

    id: str
    at: float


@attrs.frozen
class Cancel:
    id: str


# ------------------------------------------------------- to the process watcher


@attrs.frozen
class Watch:
    """Tell the pool actor when process ``pid`` started at ``start`` exits."""

    id: str
    pid: int
    start: float


@attrs.frozen
class Unwatch:
    id: str


# --------------------------------------------------------------------- quotas


@attrs.frozen
class SetQuota:
    """Set ``tenant``'s quota in ``pool`` (a side None stays; ``{}`` clears it)."""

    pool: str
    tenant: str
    min: dict[str, int] | None
    max: dict[str, int] | None


@attrs.frozen
class TenantStanding:
    """Per tenant (only ``tenant`` when given): its quotas by pool, its decayed
    fair-share usage, and that usage's part of all tenants'."""

    tenant: str | None = None


# ------------------------------------------------------------------ GPU truth


@attrs.frozen
class DoRegister:
    """Add process ``pid`` (started at ``start``) to lease ``id``; ``uid`` None: an
    admin (any lease), else the caller, who must hold it. ``confine``: in a cgroup
    with the lease's limits, where the host allows."""

    id: str
    pid: int
    start: float
    uid: int | None
    confine: bool = False


@attrs.frozen
class GpuLeases:
    """For the reconciler: live leases as ``LeaseView``s (all, or those a sample of
    processes ``pids`` concerns; see ``gpu_policy.lease_views``) and every pool GPU
    with a uuid as a ``DeviceRef``."""

    pids: frozenset[int] | None = None


@attrs.frozen
class GpuReport:
    """The reconciler's verdict on one sample (``reconcile.Verdict``) at wall ``at``."""

    verdict: Any = attrs.field(eq=False)
    at: float = 0.0
