"""The resd client for trio: ``async with Client(path) as client:``.

The client's reader task lives in a nursery that the ``async with`` block opens, so
the client is used within that block (structured concurrency; there is no
``connect`` without one). Reconnecting after resd restarts happens in that reader
task, so it too ends with the block. Everything else, ``Lease`` included, is the shared async
API of ``resd_client._async``::

    async with Client() as client:
        async with client.reserve(cpu=2, memory="8G", timeout=600) as lease:
            ...  # lease.env, lease.assigned, lease.reclaim_requested

Importing this module imports trio; ``import resd_client`` does not.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from resd_client._async import AsyncClient, AsyncFlag, Lease, LeaseRequest, Stream
from resd_client._core import ConnectionLost, Disconnected, Reconnected

T = TypeVar("T")


class _SocketStream:
    """trio's stream, its failures raised as OSError; a send is never left half
    done by a cancellation (it is shielded, for at most ``send_timeout``)."""

    def __init__(self, sock: socket.socket, send_timeout: float) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._send_timeout = send_timeout

    async def send_all(self, data: bytes) -> None:
        with trio.move_on_after(self._send_timeout, shield=True) as scope:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise OSError(str(exc) or type(exc).__name__) from exc
        if scope.cancelled_caught:
            raise OSError(f"sending took longer than {self._send_timeout:g}s")

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            return bytes(await self._stream.receive_some(max_bytes))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise OSError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class Client(AsyncClient):
    """resd client for trio; use it as ``async with Client(socket_path) as client``."""

    _stack: contextlib.AsyncExitStack | None = None
    _nursery: trio.Nursery | None = None

    def _new_flag(self) -> AsyncFlag:
        return trio.Event()

    def _new_lock(self) -> trio.Lock:
        return trio.Lock()

    async def _wait(self, flag: AsyncFlag, limit: float | None) -> bool:
        with trio.move_on_after(math.inf if limit is None else limit):
            await flag.wait()
        return flag.is_set()

    async def _within(self, limit: float, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            with trio.fail_after(limit):
                return await fn()
        except trio.TooSlowError:
            raise OSError(f"resd did not answer within {limit:g}s") from None

    async def _sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def _now(self) -> float:
        return trio.current_time()

    async def _shielded(self, fn: Callable[[], Awaitable[T]]) -> T:
        with trio.CancelScope(shield=True):
            result = await fn()
        return result

    async def _wrap(self, sock: socket.socket) -> Stream:
        return _SocketStream(sock, self.timeout)

    async def _start(self, stream: Stream) -> None:
        """The reader (and its reconnections) run in the client's own nursery."""
        self._stack = contextlib.AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._nursery.start_soon(self._read_loop, stream)

    async def _end(self) -> None:
        stack, self._stack = self._stack, None
        if stack is None or self._nursery is None:
            return
        self._nursery.cancel_scope.cancel()
        await stack.aclose()


TrioClient = Client

__all__ = [
    "Client",
    "ConnectionLost",
    "Disconnected",
    "Lease",
    "LeaseRequest",
    "Reconnected",
    "TrioClient",
]
