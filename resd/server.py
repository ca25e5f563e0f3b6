"""The Unix socket server: listener → one task per connection → one task per request.

Each connection has a reader (bytes → frames → requests), a writer that drains the
connection's outbox (replies and pushes, several frames per write), and the peer's
identity from SO_PEERCRED. Per-connection work is bounded: a request holds one of
``max_pending`` slots until its reply is in the outbox, and the outbox holds at most
``OUTBOX_FRAMES``; when the slots are taken the reader stops reading, so a client
that sends without reading waits on itself and costs the daemon a bounded amount
of memory. A push that finds the outbox full closes the connection (its leases
wait for re-attachment) rather than being dropped. Malformed input gets an
``invalid`` error and the connection goes on; only an oversized frame closes it.
When the connection ends, the pool actor is told so that session-bound
reservations are released (or, after an overflow, kept for re-attachment).
"""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import socket
import struct

import attrs
import structlog
import trio

from resd import messages as m
from resd.ops import HANDLERS, Conn, Services
from resd.tenants import Peer
from resd_client.errors import (
    InternalError,
    InvalidError,
    ResdError,
    UnavailableError,
    UnsupportedVersionError,
)
from resd_client.protocol import (
    PROTOCOL_VERSION,
    BadFrame,
    FrameDecoder,
    FrameTooLarge,
    Request,
    RequestError,
    decode_request,
    encode_frame,
    reply_error,
    reply_ok,
)

log = structlog.get_logger("resd.server")
OUTBOX_FRAMES = 4096


@attrs.define(eq=False)
class Limits:
    max_frame: int = 1 << 20
    max_connections: int = 1024
    max_pending: int = 64


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
        self.read_scope = trio.CancelScope()
        #: the whole connection; cancelled when it overflows
        self.scope = trio.CancelScope()
        #: it was closed because a push found its outbox full
        self.overflowed = False
        #: requests in flight on this connection, replies not yet queued included; the
        #: reader waits when none is free
        self.slots = trio.Semaphore(max_pending)

    def overflow(self) -> None:
        """Called by an actor whose push found the outbox full: close the connection."""
        if not self.overflowed:
            self.overflowed = True
            log.warning("closing_unread_connection", conn=self.conn.id, outbox=OUTBOX_FRAMES)
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
        """Accept until ``stop``; returns when every connection has finished."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accept_scope:
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._run_connection, sock)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting and reading; wait up to ``grace`` for in-flight requests."""
        self._stopping = True
        self._accept_scope.cancel()
        for c in list(self._connections):
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
        channel, frames = trio.open_memory_channel[bytes](OUTBOX_FRAMES)
        conn = _Connection(stream, self.limits.max_pending)
        outbox = m.Outbox(channel, conn.overflow)
        conn.conn = Conn(f"{self.svc.boot_id[:8]}-{next(self._ids)}", peer, outbox)
        if len(self._connections) >= self.limits.max_connections:
            error = UnavailableError(f"too many connections (limit {self.limits.max_connections})")
            with trio.move_on_after(1):
                await stream.send_all(encode_frame(reply_error(None, error)))
            await stream.aclose()
            return
        self._connections.add(conn)
        if self._idle.is_set():
            self._idle = trio.Event()
        log.debug("connected", conn=conn.conn.id, uid=peer.uid, pid=peer.pid)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, stream, frames)
                    async with trio.open_nursery() as handlers:
                        await self._read(conn, handlers)
                    channel.close()
        finally:
            # Closed by resd itself (stopping for a restart, or an overflow): its
            # client's leases wait for it to re-attach.
            why = "it did not read its pushes" if conn.overflowed else "resd stopped"
            orphan = conn.overflowed or self._stopping
            self.svc.pools.tell(m.SessionClosed(conn.conn.id, orphan=orphan, why=why))
            self.svc.pools.tell(m.Unsubscribe(outbox))
            channel.close()
            self._connections.discard(conn)
            if not self._connections:
                self._idle.set()
            with trio.CancelScope(shield=True):
                await stream.aclose()
            log.debug("disconnected", conn=conn.conn.id)

    @staticmethod
    async def _write(stream: trio.SocketStream, frames: trio.MemoryReceiveChannel[bytes]) -> None:
        with frames:
            try:
                async for frame in frames:
                    batch = [frame]
                    while True:
                        try:
                            batch.append(frames.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await stream.send_all(b"".join(batch))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; the reader sees EOF

    async def _read(self, c: _Connection, handlers: trio.Nursery) -> None:
        decoder = FrameDecoder(self.limits.max_frame)
        with c.read_scope:
            if self._stopping:
                return
            while True:
                try:
                    data = await c.stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                decoder.feed(data)
                while True:
                    try:
                        for frame in decoder.frames():
                            await self._on_frame(c, frame, handlers)
                        break
                    except BadFrame as exc:
                        await self._send(c, reply_error(None, InvalidError(str(exc))))
                    except FrameTooLarge as exc:
                        await self._send(
                            c, reply_error(None, InvalidError(f"{exc}; closing the connection"))
                        )
                        return

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
            await self._send(c, reply_error(exc.request_id, exc.error))
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
        if not c.greeted:
            if req.op != "hello":
                await self._send(
                    c, reply_error(req.id, InvalidError("the first request must be hello"))
                )
                return
            if req.args.version != PROTOCOL_VERSION:
                error = UnsupportedVersionError(
                    f"protocol version {req.args.version} is not supported; this daemon speaks {PROTOCOL_VERSION}",
                    {"supported": [PROTOCOL_VERSION]},
                )
                await self._send(c, reply_error(req.id, error))
                return
            c.greeted = True
        elif req.op == "hello":
            await self._send(
                c, reply_error(req.id, InvalidError("hello was already sent on this connection"))
            )
            return
        await c.slots.acquire()  # backpressure: stop reading while max_pending are in flight
        handlers.start_soon(self._handle, c, req)

    async def _handle(self, c: _Connection, req: Request) -> None:
        """Run one request; its slot is free again only once its reply is queued."""
        try:
            try:
                result = await HANDLERS[req.op](self.svc, c.conn, req.args)
                frame = reply_ok(req.id, result)
            except ResdError as exc:
                frame = reply_error(req.id, exc)
            except Exception as exc:
                log.exception("handler_failed", op=req.op)
                frame = reply_error(
                    req.id, InternalError(f"{req.op} failed: {type(exc).__name__}: {exc}")
                )
            await self._send(c, frame)
        finally:
            c.slots.release()


__all__ = ["Limits", "Server", "admin_gid_of", "peer_of"]
