"""The Unix socket server: listener → one task per connection → one task per request
(except the hot ops, which run in the connection's reader when they cannot wait).

Each connection has a reader (bytes → frames → requests), an outbox that writes
replies and pushes to the socket at once when it takes them, with a writer task for
what it does not (several frames per write), and the peer's identity from
SO_PEERCRED. Per-connection work is bounded: a request holds one of ``max_pending``
slots until its reply is in the outbox, and the outbox holds at most
``OUTBOX_FRAMES``; when the slots are taken the reader stops reading, so a client
that sends without reading waits on itself and costs the daemon a bounded amount of
memory. A push that finds the outbox full closes the connection (its leases
wait for re-attachment) rather than being dropped. Malformed input gets an
``invalid`` error and the connection goes on; only an oversized frame closes it.
When the connection ends, the pool actor is told so that session-bound
reservations are released (or, after an overflow, kept for re-attachment).

Hostile or broken peers (SPEC §7): a connection is admitted by ``admission`` (the
global ``max_connections``, its last ``admin_reserved_connections`` for admins
only, ``max_connections_per_uid`` for everyone else) or gets an ``unavailable``
frame naming the limit and is closed. It must say ``hello`` within
``handshake_timeout``, and once part of a frame has arrived the rest must come
within ``read_timeout``; a connection that stalls is closed (an idle one between
frames is not: it may hold leases for days). ``accept`` failing for lack of file
descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off and
retries instead of ending the daemon; open connections are served meanwhile.

Log context (``resd.logs``): a connection's task binds ``conn``, ``peer_uid`` and
``peer_pid`` with ``structlog.contextvars``, and each request's task adds ``op``,
``request`` and the ``reservation`` and ``tenant`` its arguments name; tasks get
a copy of their spawner's context, so the bindings stay in the task that made
them and need no reset.
"""

from __future__ import annotations

import collections
import errno
import functools
import grp
import itertools
import math
import os
import pwd
import socket
import struct

import attrs
import structlog
import trio
from structlog.contextvars import bind_contextvars, unbind_contextvars

from resd import messages as m
from resd.ops import Conn, Services, dispatch, named_in
from resd.tenants import Peer
from resd_client.errors import (
    InternalError,
    InvalidError,
    ResdError,
    UnavailableError,
    UnsupportedVersionError,
)
from resd_client.protocol import (
    OPS,
    PROTOCOL_VERSION,
    BadFrame,
    FrameDecoder,
    FrameTooLarge,
    Request,
    RequestError,
    decode_request,
    decode_request_fast,
    encode_frame,
    reply_error,
    reply_ok,
    unpack,
)

log = structlog.get_logger("resd.server")
OUTBOX_FRAMES = 4096
#: ``accept`` errors that mean the process or host is out of descriptors or kernel
#: memory for now (trio's ``serve_listeners`` list): wait and retry, never exit
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``accept`` errors about one connection that died in the backlog: retry at once
ACCEPT_IGNORED_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR})
#: back-off after a capacity error: the first delay, doubled up to the cap (seconds)
ACCEPT_BACKOFF_FIRST = 0.01
ACCEPT_BACKOFF_CAP = 1.0
#: at most one warning per limit this often about refused connections (seconds)
REFUSAL_LOG_INTERVAL = 10.0
#: ops whose handlers wait for nothing but the actors' short steps and the journal:
#: when the journal answers at once (fsync never or batch) they run in the reader's
#: own task, without a task per request; a waiting reserve waits by push, not here
INLINE_OPS = frozenset({"reserve", "release", "renew"})


@attrs.define(eq=False)
class Limits:
    """What one connection, one uid and all connections may hold (config keys of the
    same names; checked in ``resd.config``)."""

    max_frame: int = 1 << 20
    max_connections: int = 1024
    max_pending: int = 64
    max_connections_per_uid: int = 256
    admin_reserved_connections: int = 16
    handshake_timeout: float = 5.0
    read_timeout: float = 30.0


def admission(limits: Limits, peer: Peer, total: int, of_uid: int) -> UnavailableError | None:
    """Whether one more connection from ``peer`` may open when ``total`` are open,
    ``of_uid`` of them from its uid; the refusal to send it otherwise (pure).

    Admins (root, the daemon's uid, the admin group) are bound only by
    ``max_connections``: the last ``admin_reserved_connections`` are theirs, so an
    operator can always get in while users fill the rest, and a user's
    ``max_connections_per_uid`` keeps one user from taking it all.
    """
    if total >= limits.max_connections:
        return UnavailableError(
            f"too many connections: max_connections is {limits.max_connections}",
            {"limit": "max_connections", "value": limits.max_connections},
        )
    if peer.admin:
        return None
    if of_uid >= limits.max_connections_per_uid:
        return UnavailableError(
            f"too many connections from uid {peer.uid}: "
            f"max_connections_per_uid is {limits.max_connections_per_uid}",
            {
                "limit": "max_connections_per_uid",
                "value": limits.max_connections_per_uid,
                "uid": peer.uid,
            },
        )
    reserved = limits.admin_reserved_connections
    if total >= limits.max_connections - reserved:
        return UnavailableError(
            f"too many connections: the last {reserved} of max_connections "
            f"{limits.max_connections} are kept for admins (admin_reserved_connections)",
            {"limit": "admin_reserved_connections", "value": reserved},
        )
    return None


def peer_of(sock: trio.socket.SocketType, daemon_uid: int, admin_gid: int | None) -> Peer:
    """Identity of the process at the other end, from the kernel (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    try:
        user = pwd.getpwuid(uid).pw_name
        groups = tuple(os.getgrouplist(user, gid))
    except KeyError:
        user, groups = f"uid{uid}", (gid,)
    admin = uid == 0 or uid == daemon_uid or (admin_gid is not None and admin_gid in groups)
    return Peer(uid=uid, gid=gid, pid=pid, user=user, groups=groups, admin=admin)


def admin_gid_of(group: str) -> int | None:
    """The admin group's gid from a name or a number; None when unset."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("admin_group_unknown", group=group)
        return None


class _Connection:
    conn: Conn  # set right after: its outbox needs this object's ``overflow``

    def __init__(self, stream: trio.SocketStream, max_pending: int) -> None:
        self.stream = stream
        self.greeted = False
        #: the reader's scope; ``stop`` cancels it only while the reader waits in a
        #: receive (``in_receive``): a request being handled in the reader goes on, and
        #: the reader looks at ``Server._stopping`` before each frame
        self.read_scope = trio.CancelScope()
        self.in_receive = False
        #: the reader's deadline: ``handshake_timeout`` until ``hello``, then
        #: ``read_timeout`` while it waits for the rest of a frame, else none
        self.stall_scope = trio.CancelScope()
        #: the whole connection; cancelled when it overflows or stalls
        self.scope = trio.CancelScope()
        #: it was closed because a push found its outbox full
        self.overflowed = False
        #: why it was closed for stalling (no hello in time, a frame left half-sent)
        self.stalled: str | None = None
        #: requests in flight on this connection, replies not yet queued included; the
        #: reader waits when none is free
        self.slots = trio.Semaphore(max_pending)

    def overflow(self) -> None:
        """Called by an actor whose push found the outbox full: close the connection
        (the connection's task logs it, in its own context)."""
        self.overflowed = True
        self.scope.cancel()


class Server:
    def __init__(
        self,
        svc: Services,
        limits: Limits,
        *,
        admin_gid: int | None = None,
        daemon_uid: int | None = None,
    ) -> None:
        self.svc = svc
        self.limits = limits
        self.admin_gid = admin_gid
        self.daemon_uid = os.getuid() if daemon_uid is None else daemon_uid
        self._ids = itertools.count(1)
        self._connections: set[_Connection] = set()
        self._per_uid: collections.Counter[int] = collections.Counter()
        #: limit → (when its last warning was logged, refusals since)
        self._refusals: dict[str, tuple[float, int]] = {}
        self._accept_scope = trio.CancelScope()
        self._stopping = False
        self._idle = trio.Event()
        self._idle.set()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until ``stop``; returns when every connection has finished.

        Out of descriptors or kernel memory (``ACCEPT_CAPACITY_ERRNOS``), it waits
        (10 ms, doubling to 1 s) and tries again, with one warning per episode; the
        connections waiting in the backlog are accepted once descriptors are free.
        Other accept errors are raised.
        """
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accept_scope:
                delay: float | None = None  # set while out of capacity
                since, retries = 0.0, 0
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:
                        if exc.errno in ACCEPT_IGNORED_ERRNOS:
                            continue
                        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                            raise
                        if delay is None:
                            since, retries, delay = trio.current_time(), 0, ACCEPT_BACKOFF_FIRST
                            log.warning(
                                "accept_backing_off",
                                error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                                detail=os.strerror(exc.errno or 0),
                                connections=len(self._connections),
                            )
                        else:
                            delay = min(delay * 2, ACCEPT_BACKOFF_CAP)
                        retries += 1
                        await trio.sleep(delay)
                        continue
                    if delay is not None:
                        log.warning(
                            "accept_recovered",
                            after_s=round(trio.current_time() - since, 3),
                            retries=retries,
                            connections=len(self._connections),
                        )
                        delay = None
                    nursery.start_soon(self._run_connection, sock)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting and reading; wait up to ``grace`` for in-flight requests."""
        self._stopping = True
        self._accept_scope.cancel()
        for c in list(self._connections):
            if c.in_receive:
                c.read_scope.cancel()
        with trio.move_on_after(grace):
            await self._idle.wait()

    async def _run_connection(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        try:
            peer = peer_of(sock, self.daemon_uid, self.admin_gid)
        except OSError as exc:
            log.warning("peercred_failed", error=str(exc))
            await stream.aclose()
            return
        conn = _Connection(stream, self.limits.max_pending)
        fd = sock.fileno()  # non-blocking (trio's); CPython ignores SIGPIPE: a gone peer is EPIPE
        outbox = m.Outbox(functools.partial(os.write, fd), OUTBOX_FRAMES, conn.overflow)
        conn.conn = Conn(f"{self.svc.boot_id[:8]}-{next(self._ids)}", peer, outbox)
        bind_contextvars(conn=conn.conn.id, peer_uid=peer.uid, peer_pid=peer.pid)  # this task's
        refusal = admission(self.limits, peer, len(self._connections), self._per_uid[peer.uid])
        if refusal is not None:
            self._log_refusal(refusal, peer)
            with trio.move_on_after(1):
                try:
                    await stream.send_all(encode_frame(reply_error(None, refusal)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await stream.aclose()
            return
        self._connections.add(conn)
        self._per_uid[peer.uid] += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        log.debug("connected")
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        outbox.drain, functools.partial(trio.lowlevel.wait_writable, fd)
                    )
                    async with trio.open_nursery() as handlers:
                        await self._read(conn, handlers)
                    outbox.close()
        finally:
            # Closed by resd itself (stopping for a restart, or an overflow): its
            # client's leases wait for it to re-attach.
            if conn.overflowed:
                why = "it did not read its pushes"
                log.warning("closing_unread_connection", outbox=OUTBOX_FRAMES)
            else:
                why = conn.stalled or "resd stopped"
            orphan = conn.overflowed or conn.stalled is not None or self._stopping
            self.svc.pools.tell(m.SessionClosed(conn.conn.id, orphan=orphan, why=why))
            self.svc.pools.tell(m.Unsubscribe(outbox))
            self.svc.reconciler.unsubscribe(outbox)
            outbox.close()
            self._connections.discard(conn)
            self._per_uid[peer.uid] -= 1
            if self._per_uid[peer.uid] <= 0:
                del self._per_uid[peer.uid]
            if not self._connections:
                self._idle.set()
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log.debug("disconnected")

    def _log_refusal(self, refusal: UnavailableError, peer: Peer) -> None:
        """Warn about refused connections at most once per ``REFUSAL_LOG_INTERVAL``
        per limit (a client retrying in a loop must not flood the log)."""
        limit = str(refusal.details.get("limit", "?"))
        now = trio.current_time()
        last, count = self._refusals.get(limit, (-math.inf, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals[limit] = (last, count + 1)
            return
        self._refusals[limit] = (now, 0)
        log.warning(
            "connection_refused",
            limit=limit,
            value=refusal.details.get("value"),
            connections=len(self._connections),
            of_uid=self._per_uid[peer.uid],
            refused_since_last=count,
        )

    async def _read(self, c: _Connection, handlers: trio.Nursery) -> None:
        """Read frames until EOF or ``stop``. Before ``hello`` everything (reading and
        answering) must fit in ``handshake_timeout``; after it, only waiting for the
        rest of a frame is timed (``read_timeout`` from when the frame began, so a
        trickle does not extend it). A stall cancels the whole connection."""
        decoder = FrameDecoder(self.limits.max_frame)
        c.stall_scope.deadline = trio.current_time() + self.limits.handshake_timeout
        with c.read_scope, c.stall_scope:
            await self._read_frames(c, decoder, handlers)
        if c.stall_scope.cancelled_caught:
            self._stall(c, decoder.pending)

    async def _read_frames(
        self, c: _Connection, decoder: FrameDecoder, handlers: trio.Nursery
    ) -> None:
        partial_since: float | None = None  # when the frame now half-read began
        while not self._stopping:
            # Setting a scope's deadline costs trio some work: only when it changes.
            if c.greeted and partial_since is not None:
                c.stall_scope.deadline = partial_since + self.limits.read_timeout
            c.in_receive = True  # (one scope for all receives: a scope per receive costs)
            try:
                data = await c.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                c.in_receive = False
            if not data:
                return
            if c.greeted and partial_since is not None:
                c.stall_scope.deadline = math.inf  # handling frames is not a stall
            decoder.feed(data)
            whole = 0
            while True:
                try:
                    for payload in decoder.payloads():
                        if self._stopping:  # stop: no new request is started
                            return
                        whole += 1
                        req = decode_request_fast(payload)
                        if req is None:  # refused by the fast path: say why, the slow way
                            await self._on_frame(c, unpack(payload), handlers)
                        else:
                            await self._on_request(c, req, handlers)
                    break
                except BadFrame as exc:
                    whole += 1
                    await self._refuse(c, None, InvalidError(str(exc)))
                except FrameTooLarge as exc:
                    await self._refuse(c, None, InvalidError(f"{exc}; closing the connection"))
                    return
            if not decoder.pending:
                partial_since = None
            elif whole or partial_since is None:
                partial_since = trio.current_time()

    def _stall(self, c: _Connection, pending: int) -> None:
        """Close a connection that did not say hello in time, or left a frame half-sent."""
        if c.greeted:
            c.stalled = (
                f"it sent part of a frame and not the rest within {self.limits.read_timeout:g}s"
            )
            event, limit = "read_timeout", self.limits.read_timeout
        else:
            c.stalled = f"it did not say hello within {self.limits.handshake_timeout:g}s"
            event, limit = "handshake_timeout", self.limits.handshake_timeout
        log.info(event, limit_s=limit, pending=pending)
        c.scope.cancel()

    async def _refuse(
        self, c: _Connection, request_id: int | None, error: ResdError, op: object = None
    ) -> None:
        """Answer a frame refused before any handler runs: the client's error, so a
        debug line (``request`` and ``op`` only when the frame had them right)."""
        known: dict[str, object] = {} if request_id is None else {"request": request_id}
        if isinstance(op, str) and op in OPS:
            known["op"] = op
        log.debug("refused", **known, code=str(error.code), error=error.message)
        await self._send(c, reply_error(request_id, error))

    async def _send(self, c: _Connection, frame: dict[str, object]) -> None:
        try:
            await c.conn.outbox.send(encode_frame(frame))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _on_frame(
        self, c: _Connection, frame: dict[str, object], handlers: trio.Nursery
    ) -> None:
        try:
            req = decode_request(frame)
        except RequestError as exc:
            await self._refuse(c, exc.request_id, exc.error, frame.get("op"))
            return
        except Exception as exc:  # a decoding bug must cost one frame, not the daemon
            log.exception("decode_failed")
            await self._send(
                c,
                reply_error(
                    None, InternalError(f"could not decode the request: {type(exc).__name__}")
                ),
            )
            return
        await self._on_request(c, req, handlers)

    async def _on_request(self, c: _Connection, req: Request, handlers: trio.Nursery) -> None:
        if not c.greeted:
            if req.op != "hello":
                await self._refuse(
                    c, req.id, InvalidError("the first request must be hello"), req.op
                )
                return
            if req.args.version != PROTOCOL_VERSION:
                error = UnsupportedVersionError(
                    f"protocol version {req.args.version} is not supported; this daemon speaks {PROTOCOL_VERSION}",
                    {"supported": [PROTOCOL_VERSION]},
                )
                await self._refuse(c, req.id, error, req.op)
                return
            c.greeted = True
            c.stall_scope.deadline = math.inf  # what follows hello may wait for slots
        elif req.op == "hello":
            again = InvalidError("hello was already sent on this connection")
            await self._refuse(c, req.id, again, req.op)
            return
        if req.op in INLINE_OPS and not self.svc.journal.waits_for_fsync:
            bind_contextvars(op=req.op, request=req.id, **named_in(req.args))
            try:
                await self._answer(c, req)
            finally:  # the reader's own context binds none of a request's keys
                unbind_contextvars("op", "request", "reservation", "tenant")
            return
        try:  # a free slot is taken without a trip through the scheduler
            c.slots.acquire_nowait()
        except trio.WouldBlock:  # backpressure: stop reading while max_pending are in flight
            await c.slots.acquire()
        if self._stopping:  # stopped while waiting for the slot
            c.slots.release()
            return
        handlers.start_soon(self._handle, c, req)

    async def _handle(self, c: _Connection, req: Request) -> None:
        """Run one request in its own task; its slot is free again only once its reply
        is queued. The request's log keys are bound in this task."""
        bind_contextvars(op=req.op, request=req.id, **named_in(req.args))
        try:
            await self._answer(c, req)
        finally:
            c.slots.release()

    async def _answer(self, c: _Connection, req: Request) -> None:
        """Dispatch ``req`` and queue its reply (an error reply if it fails)."""
        try:
            result = await dispatch(self.svc, c.conn, req.op, req.args)
            frame = reply_ok(req.id, result)
        except ResdError as exc:
            frame = reply_error(req.id, exc)
        except Exception as exc:
            log.exception("handler_failed")
            frame = reply_error(
                req.id, InternalError(f"{req.op} failed: {type(exc).__name__}: {exc}")
            )
        await self._send(c, frame)


__all__ = ["Limits", "Server", "admin_gid_of", "admission", "peer_of"]
