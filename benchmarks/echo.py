"""The limit: a bare trio + msgpack server on a Unix socket that answers every request
at once, with resd's framing (``encode_frame`` / ``FrameDecoder`` from resd_client).

``python -m benchmarks.echo SOCKET [--writer-task]`` serves until SIGTERM. It answers
``hello`` with a HelloResult-shaped map, so the real ``resd_client.Client`` can talk to
it, and every other request with ``{"id": N, "ok": true, "result": {}}``.

Like resd, each connection has one reader and resd's ``Outbox``: a reply is written at
once when the socket takes it, and a writer task sends what it does not, batched. With
``--writer-task`` every reply goes through a memory channel to a writer task instead,
as resd's replies did until the outbox wrote directly (issue 14): kept as a reference
point, so that a ratio against the limit of that design can still be read.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from resd.messages import Outbox
from resd_client.protocol import FrameDecoder, encode_frame

HELLO: dict[str, Any] = {
    "server_version": "echo",
    "protocol": 1,
    "boot_id": "echo",
    "uid": 0,
    "gid": 0,
    "pid": 0,
    "admin": True,
    "user_tenant": "echo",
}

Send = Callable[[bytes], Awaitable[None]]


async def _answer(stream: trio.SocketStream, send: Send) -> None:
    """Read frames until EOF and ``send`` each one's reply."""
    decoder = FrameDecoder()
    while True:
        try:
            data = await stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if not data:
            return
        decoder.feed(data)
        for frame in decoder.frames():
            result = HELLO if frame.get("op") == "hello" else {}
            try:
                await send(encode_frame({"id": frame.get("id"), "ok": True, "result": result}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _with_outbox(stream: trio.SocketStream) -> None:
    fd = stream.socket.fileno()
    outbox = Outbox(functools.partial(os.write, fd), 4096)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(outbox.drain, functools.partial(trio.lowlevel.wait_writable, fd))
        try:
            await _answer(stream, outbox.send)
        finally:
            outbox.close()


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
            pass


async def _with_writer_task(stream: trio.SocketStream) -> None:
    channel, frames = trio.open_memory_channel[bytes](4096)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(_write, stream, frames)
        with channel:
            await _answer(stream, channel.send)


async def serve(path: str, writer_task: bool = False) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(512)
    listeners = [trio.SocketListener(sock)]
    handler = _with_writer_task if writer_task else _with_outbox
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handler, listeners)
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", help="Unix socket path to serve on (replaced if present)")
    parser.add_argument(
        "--writer-task", action="store_true", help="reply through a writer task (reference)"
    )
    args = parser.parse_args()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    trio.run(serve, args.socket, args.writer_task)


if __name__ == "__main__":
    main()
