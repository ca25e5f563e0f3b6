"""The limit: a bare trio + msgpack server on a Unix socket that answers every request
at once, with resd's framing (``encode_frame`` / ``FrameDecoder`` from resd_client).

``python -m benchmarks.echo SOCKET`` serves until SIGTERM. It answers ``hello`` with a
HelloResult-shaped map, so the real ``resd_client.Client`` can talk to it, and every
other request with ``{"id": N, "ok": true, "result": {}}``. Like resd, each connection
has one reader and resd's ``Outbox``: a reply is written at once when the socket takes
it, and a writer task sends what it does not, batched.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
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


async def _connection(stream: trio.SocketStream) -> None:
    fd = stream.socket.fileno()
    outbox = Outbox(functools.partial(os.write, fd), 4096)
    decoder = FrameDecoder()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(outbox.drain, functools.partial(trio.lowlevel.wait_writable, fd))
        try:
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
                    try:
                        await outbox.send(
                            encode_frame({"id": frame.get("id"), "ok": True, "result": result})
                        )
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
        finally:
            outbox.close()


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
