"""Bounds from SPEC §7: connection count and requests in flight per connection."""

from __future__ import annotations

import trio

from resd_client.protocol import PROTOCOL_VERSION, encode_frame
from tests.conftest import InProcess
from tests.wire import WireClient


async def test_connections_beyond_the_limit_are_refused(inproc: InProcess) -> None:
    await inproc.restart(max_connections=2)
    a = await WireClient.connect(inproc.socket)
    b = await WireClient.connect(inproc.socket)
    c = await WireClient.connect(inproc.socket, hello=False)
    frame = await c.next_frame()
    assert frame is not None and frame["ok"] is False
    assert frame["error"]["code"] == "unavailable"
    assert "too many connections" in frame["error"]["message"]
    assert await c.next_frame() is None  # closed
    await b.aclose()
    await trio.sleep(0.01)
    d = await WireClient.connect(inproc.socket)  # a slot is free again
    assert (await d.ok("status"))["connections"] == 2
    assert (await a.ok("status"))["connections"] == 2


async def test_many_pipelined_requests_are_all_answered(inproc: InProcess) -> None:
    """More requests than max_pending: the reader waits for slots, nothing is dropped."""
    await inproc.restart(max_pending=4)
    c = await WireClient.connect(inproc.socket)
    burst = b"".join(
        encode_frame({"v": PROTOCOL_VERSION, "id": i, "op": "status", "args": {}})
        for i in range(100, 300)
    )
    await c.send_raw(burst)
    for i in range(100, 300):
        reply = await c.reply_to(i)
        assert reply["ok"], reply
