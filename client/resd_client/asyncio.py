"""The resd client for asyncio: ``async with Client(path) as client:``, or
``client = await Client.connect(path)`` ... ``await client.close()``.

The reader is one ``asyncio`` task, started on connect and stopped on close.
Everything else, ``Lease`` included, is the shared async API of
``resd_client._async``::

    async with Client() as client:
        async with client.reserve(cpu=2, memory="8G", timeout=600) as lease:
            ...  # lease.env, lease.assigned, lease.reclaim_requested
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from resd_client._async import AsyncClient, AsyncFlag, Lease, LeaseRequest, Stream
from resd_client._core import ConnectionLost, Disconnected, Reconnected

T = TypeVar("T")


class _SocketStream:
    """asyncio's reader and writer as one stream (their failures are OSErrors)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def send_all(self, data: bytes) -> None:
        self._writer.write(data)  # buffered whole: a cancelled drain splits no frame
        await self._writer.drain()

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._reader.read(max_bytes)

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass


class Client(AsyncClient):
    """resd client for asyncio."""

    _task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        name: str = "resd_client",
        timeout: float = 30.0,  # noqa: ASYNC109 - each reply's limit, kept by the client
        reconnect: float | None = None,
    ) -> Client:
        """A connected client; ``await client.close()`` when done."""
        client = cls(socket_path, name=name, timeout=timeout, reconnect=reconnect)
        await client.open()
        return client

    def _new_flag(self) -> AsyncFlag:
        return asyncio.Event()

    def _new_lock(self) -> asyncio.Lock:
        return asyncio.Lock()

    async def _wait(self, flag: AsyncFlag, limit: float | None) -> bool:
        try:
            async with asyncio.timeout(limit):
                await flag.wait()
        except TimeoutError:
            return False
        return True

    async def _within(self, limit: float, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(limit):
                return await fn()
        except TimeoutError:
            raise OSError(f"resd did not answer within {limit:g}s") from None

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _shielded(self, fn: Callable[[], Awaitable[T]]) -> T:
        task: asyncio.Future[T] = asyncio.ensure_future(fn())
        cancelled: asyncio.CancelledError | None = None
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            if not task.cancelled():
                task.exception()  # retrieved: the cancellation wins
            raise cancelled
        return task.result()

    async def _wrap(self, sock: socket.socket) -> Stream:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return _SocketStream(reader, writer)

    async def _start(self, stream: Stream) -> None:
        """The reader (and its reconnections) is one task, stopped by ``close``."""
        self._task = asyncio.get_running_loop().create_task(
            self._read_loop(stream), name="resd-client-reader"
        )

    async def _end(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})


AsyncioClient = Client

__all__ = [
    "AsyncioClient",
    "Client",
    "ConnectionLost",
    "Disconnected",
    "Lease",
    "LeaseRequest",
    "Reconnected",
]
