"""The connection outbox: frames go to the socket at once when it takes them, the rest
through the writer task in order, bounded, and a gone peer is noticed."""

from __future__ import annotations

import functools
import os
import socket

import pytest
import trio
import trio.testing

from resd.messages import Outbox


class Socket:
    """A socket stand-in whose free room the test sets; it records what it took."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.taken = bytearray()
        self.writes = 0
        self.gone = False
        self.has_room = trio.Event()

    def write(self, data: bytes | memoryview) -> int:
        self.writes += 1
        if self.gone:
            raise BrokenPipeError(32, "Broken pipe")
        if self.room == 0:
            raise BlockingIOError
        n = min(self.room, len(data))
        self.taken += bytes(data[:n])
        self.room -= n
        return n

    def free(self, room: int) -> None:
        self.room += room
        self.has_room.set()

    async def writable(self) -> None:
        while self.room == 0:
            self.has_room = trio.Event()
            await self.has_room.wait()


async def test_a_frame_the_socket_takes_is_written_at_once_without_the_writer() -> None:
    sock = Socket(room=100)
    box = Outbox(sock.write, 4)
    assert box.push(b"pushed")
    await box.send(b"reply")
    assert bytes(sock.taken) == b"pushedreply"
    assert sock.writes == 2


async def test_what_the_socket_does_not_take_goes_later_in_order() -> None:
    sock = Socket(room=3)
    box = Outbox(sock.write, 8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.drain, sock.writable)
        await box.send(b"first")  # 3 bytes now, 2 queued
        assert box.push(b"second")  # behind the queue, not written past it
        await box.send(b"third")
        assert bytes(sock.taken) == b"fir"
        sock.free(5)
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(sock.taken) == b"firstsec"
        sock.free(100)
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(sock.taken) == b"firstsecondthird"
        box.close()
    assert not box.push(b"late"), "a closed outbox takes nothing"


async def test_a_full_queue_makes_replies_wait_and_pushes_overflow() -> None:
    sock = Socket(room=0)
    overflowed = []
    box = Outbox(sock.write, 2, lambda: overflowed.append(True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.drain, sock.writable)
        await box.send(b"a")
        await box.send(b"b")
        sent = []

        async def reply() -> None:
            await box.send(b"c")
            sent.append(True)

        nursery.start_soon(reply)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent, "a reply waits for room"
        assert not box.push(b"notice") and overflowed == [True]
        sock.free(1)  # the writer takes "ab" as one batch; room for the waiting reply
        await trio.testing.wait_all_tasks_blocked()
        assert sent
        sock.free(100)
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(sock.taken) == b"abc"
        box.close()


async def test_a_batch_is_written_whole_before_frames_queued_meanwhile() -> None:
    sock = Socket(room=0)
    box = Outbox(sock.write, 100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.drain, sock.writable)
        for frame in (b"1", b"2"):
            await box.send(frame)
        sock.free(1)
        await trio.testing.wait_all_tasks_blocked()  # writer holds "12", wrote "1"
        await box.send(b"3")
        assert box.push(b"4")
        sock.free(100)
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(sock.taken) == b"1234"
        box.close()


async def test_a_gone_peer_refuses_further_frames_and_ends_the_writer() -> None:
    sock = Socket(room=100)
    box = Outbox(sock.write, 4)
    sock.gone = True
    assert not box.push(b"notice")
    with pytest.raises(trio.BrokenResourceError):
        await box.send(b"reply")
    with trio.fail_after(1):
        await box.drain(sock.writable)  # returns at once


async def test_close_lets_the_writer_finish_what_is_queued() -> None:
    sock = Socket(room=0)
    box = Outbox(sock.write, 4)
    await box.send(b"last words")
    box.close()
    with pytest.raises(trio.ClosedResourceError):
        await box.send(b"after close")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.drain, sock.writable)
        await trio.testing.wait_all_tasks_blocked()
        sock.free(100)
    assert bytes(sock.taken) == b"last words"


async def test_on_a_real_socket_pair_a_client_that_stops_reading_fills_then_drains() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        fd = a.fileno()
        box = Outbox(functools.partial(os.write, fd), 10_000)
        frame = b"x" * 4096
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.drain, functools.partial(trio.lowlevel.wait_writable, fd))
            for _ in range(200):  # ~800 KiB: more than the kernel buffers hold
                await box.send(frame)
            got = 0
            b.setblocking(False)
            with trio.fail_after(10):
                while got < 200 * len(frame):
                    await trio.lowlevel.wait_readable(b)
                    got += len(b.recv(1 << 20))
            box.close()
        assert got == 200 * len(frame)
