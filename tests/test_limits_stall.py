"""Stalled connections are closed (SPEC §7, issue 10): a connection must say hello
within ``handshake_timeout``, and the rest of a frame must follow its first bytes
within ``read_timeout``; one idle between frames is kept however long. On trio's
MockClock with the in-process daemon, so the timeouts cost no real time."""

from __future__ import annotations

import struct

import trio
import trio.testing

from resd_client.protocol import PROTOCOL_VERSION, encode_frame
from tests.conftest import InProcess
from tests.wire import WireClient

TOKEN = "tok-" + "s" * 28
HELLO = {"v": PROTOCOL_VERSION, "id": 1, "op": "hello", "args": {"version": PROTOCOL_VERSION}}


async def closed_after(c: WireClient) -> float:
    """Seconds (trio time) until the daemon closes ``c``; frames meanwhile are dropped.
    (A close with bytes unread resets the connection.)"""
    start = trio.current_time()
    with trio.fail_after(86_400):  # trio time: a MockClock jumps there at once
        try:
            while await c.next_frame() is not None:
                pass
        except trio.BrokenResourceError:
            pass
    return trio.current_time() - start


async def test_a_connection_that_never_says_hello_is_closed_after_the_handshake_timeout(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket, hello=False)
    assert 5.0 <= await closed_after(c) < 5.1
    admin = await WireClient.connect(inproc.socket)
    assert (await admin.ok("status"))["connections"] == 1


async def test_the_handshake_timeout_covers_half_a_hello_and_requests_before_hello(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    await inproc.restart(handshake_timeout=1.5)
    half = await WireClient.connect(inproc.socket, hello=False)
    await half.send_raw(encode_frame(HELLO)[:7])
    chatty = await WireClient.connect(inproc.socket, hello=False)

    async def keep_asking() -> None:  # requests before hello are refused, not a handshake
        for i in range(100):
            await chatty.send({"v": PROTOCOL_VERSION, "id": i, "op": "status", "args": {}})
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_asking)
        assert 1.5 <= await closed_after(half) < 1.6
        frame = await chatty.next_frame()
        assert frame is not None and "first request must be hello" in frame["error"]["message"]
        assert await closed_after(chatty) < 1.6
        nursery.cancel_scope.cancel()


async def test_a_greeted_connection_may_stay_idle_for_days(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await trio.sleep(3 * 86_400)
    assert (await c.ok("status"))["connections"] == 1


async def test_half_a_frame_is_closed_after_the_read_timeout(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    c = await WireClient.connect(inproc.socket)
    await trio.sleep(100)  # idle first: the timeout starts with the frame
    await c.send_raw(encode_frame({"v": PROTOCOL_VERSION, "id": 9, "op": "status"})[:3])
    assert 30.0 <= await closed_after(c) < 30.1


async def test_a_trickle_does_not_extend_the_read_timeout(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    await inproc.restart(read_timeout=10.0)
    c = await WireClient.connect(inproc.socket)
    await c.send_raw(struct.pack(">I", 1000))
    start = trio.current_time()

    async def trickle() -> None:
        while True:
            await trio.sleep(1)
            try:
                await c.send_raw(b"\x80")
            except trio.BrokenResourceError:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        await closed_after(c)
        assert 10.0 <= trio.current_time() - start < 10.1
        nursery.cancel_scope.cancel()


async def test_each_frame_gets_its_own_read_timeout(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """A frame completed late but in time, then the next one begun in the same
    write: the clock restarts for that one."""
    c = await WireClient.connect(inproc.socket)
    first = encode_frame({"v": PROTOCOL_VERSION, "id": 2, "op": "status", "args": {}})
    second = encode_frame({"v": PROTOCOL_VERSION, "id": 3, "op": "status", "args": {}})
    await c.send_raw(first[:5])
    await trio.sleep(25)
    await c.send_raw(first[5:] + second[:5])
    assert (await c.reply_to(2))["ok"]
    await trio.sleep(25)  # 50 s after the first frame began, 25 s into the second
    await c.send_raw(second[5:])
    assert (await c.reply_to(3))["ok"]


async def test_waiting_for_a_request_slot_is_not_a_stall(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """hello and requests pipelined in one write, the only slot held by a waiting
    reserve for longer than both timeouts: the connection stays."""
    await inproc.restart(max_pending=1, handshake_timeout=1.0, read_timeout=1.0)
    admin = await WireClient.connect(inproc.socket)
    await admin.ok("pool.create", {"name": "p", "resources": {"cpu": {"capacity": 1000}}})
    held = await admin.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})
    c = await WireClient.connect(inproc.socket, hello=False)
    wait = {"pool": "p", "resources": {"cpu": 1000}, "wait": True}
    await c.send_raw(
        encode_frame(HELLO)
        + encode_frame({"v": PROTOCOL_VERSION, "id": 2, "op": "reserve", "args": wait})
        + encode_frame({"v": PROTOCOL_VERSION, "id": 3, "op": "status", "args": {}})
    )
    assert (await c.reply_to(1))["ok"]
    await trio.sleep(60)
    await admin.ok("release", {"id": held["id"]})
    assert (await c.reply_to(2))["ok"]
    assert (await c.reply_to(3))["ok"]


async def test_a_stalled_connection_leaves_its_session_leases_to_reattach(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """resd closed it, as for an overflow: its client (maybe paused mid-write) may
    reconnect and re-attach within ``reattach_grace``."""
    c = await WireClient.connect(inproc.socket)
    await c.ok("pool.create", {"name": "p", "resources": {"cpu": {"capacity": 4000}}})
    ask = {"pool": "p", "resources": {"cpu": 1000}, "binding": "session", "token": TOKEN}
    lease = await c.ok("reserve", ask)
    await c.send_raw(b"\x00\x00")
    assert 30.0 <= await closed_after(c) < 30.1
    d = await WireClient.connect(inproc.socket)
    assert [r["id"] for r in (await d.ok("list"))["reservations"]] == [lease["id"]]
    back = await d.ok("attach", {"token": TOKEN, "id": lease["id"]})
    assert back["state"] == "active"
