"""The limit: a bare trio + msgpack server on a Unix socket that answers every request
at once, with resd's framing (``encode_frame`` / ``FrameDecoder`` from resd_client).

``python -m benchmarks.echo SOCKET`` serves until SIGTERM. It answers ``hello`` with a
HelloResult-shaped map, so the real ``resd_client.Client`` can talk to it, and every
other request with ``{"id": N, "ok": true, "result": {}}``. Like resd, each connection
has one reader and one writer task, and the writer batches what is queued into one send.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import trio

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


async def _connection(stream: trio.SocketStream) -> None:
    outbox, frames = trio.open_memory_channel[bytes](4096)
    decoder = FrameDecoder()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(_write, stream, frames)
        with outbox:
            while True:
                try:
                    data = await stream.receive_some(1 << 16)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    result = HELLO if frame.get("op") == "hello" else {}
                    await outbox.send(
                        encode_frame({"id": frame.get("id"), "ok": True, "result": result})
                    )


async def serve(path: str) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(512)
    listeners = [trio.SocketListener(sock)]
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, _connection, listeners)
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    os.unlink(path)


def main() -> None:
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    trio.run(serve, path)


if __name__ == "__main__":
    main()
