"""The actor base: one message at a time, in order, whether a message goes through
the mailbox or (when the actor is parked with nothing queued) is handled in the
asker's task; timers re-armed either way."""

from __future__ import annotations

import math
from typing import Any

import trio
import trio.testing

from resd.actor import Actor
from resd_client.errors import InternalError, NotFoundError


class Recorder(Actor):
    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.deadline = math.inf
        self.fired: list[float] = []
        self.batches = 0
        self.handlers = {str: self._text, int: self._alarm, bytes: self._boom}

    def _text(self, message: str) -> str:
        self.seen.append(message)
        if message == "missing":
            raise NotFoundError("no such thing")
        return message.upper()

    def _alarm(self, seconds: int) -> None:
        self.deadline = trio.current_time() + seconds

    def _boom(self, message: bytes) -> None:
        raise RuntimeError("a bug")

    def next_deadline(self) -> float:
        return self.deadline

    def on_deadline(self) -> None:
        self.fired.append(trio.current_time())
        self.deadline = math.inf

    def after_batch(self) -> None:
        self.batches += 1


async def test_ask_after_tell_keeps_the_order() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        actor.tell("first")  # handed to the parked loop, not yet handled
        assert await actor.ask("second") == "SECOND"
        assert actor.seen == ["first", "second"]
        await trio.testing.wait_all_tasks_blocked()
        assert await actor.ask("third") == "THIRD"  # parked and empty: handled inline
        assert actor.seen == ["first", "second", "third"]
        nursery.cancel_scope.cancel()


async def test_errors_reach_the_asker_inline_or_not() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(2):
            try:
                await actor.ask("missing")
            except NotFoundError as exc:
                assert exc.message == "no such thing"
            else:  # pragma: no cover
                raise AssertionError("no error")
            try:
                await actor.ask(b"x")
            except InternalError as exc:
                assert "RuntimeError: a bug" in exc.message
            actor.tell("queued")  # the second round goes through the mailbox
        nursery.cancel_scope.cancel()


async def test_an_inline_message_that_sets_a_deadline_rearms_the_loop(
    mock_clock: trio.testing.MockClock,
) -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await actor.ask(5)  # handled inline while the loop sleeps with no deadline
        await trio.sleep(10)
        assert actor.fired == [start + 5]
        nursery.cancel_scope.cancel()
