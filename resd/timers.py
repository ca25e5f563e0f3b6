"""The TTL reaper and the preemption arbiter: actors that act when a deadline comes.

Both keep a ``TimerHeap`` and sleep until its earliest deadline or their next
message, whichever comes first; nothing polls. Deadlines arrive as wall-clock
times (what is persisted) and are turned into trio time once, on arrival, so a
``MockClock`` drives them in tests. When a timer fires they tell the pool actor,
which decides whether it still applies (a renewed TTL makes an old timer stale).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from resd.actor import Actor
from resd.messages import Cancel, Expire, FinishGrace, Schedule
from resd.timerheap import TimerHeap


class _TimerActor(Actor):
    def __init__(self, wall: Callable[[], float]) -> None:
        super().__init__()
        self.wall = wall
        self.timers = TimerHeap()
        self.pool_actor: Actor | None = None
        self.handlers = {Schedule: self._schedule, Cancel: self._cancel}

    def _schedule(self, msg: Schedule) -> None:
        delay = max(0.0, msg.at - self.wall())
        self.timers.add(msg.id, trio.current_time() + delay, msg.at)

    def _cancel(self, msg: Cancel) -> None:
        self.timers.discard(msg.id)

    def next_deadline(self) -> float:
        return self.timers.earliest()

    def on_deadline(self) -> None:
        assert self.pool_actor is not None
        for key, at in self.timers.pop_due(trio.current_time()):
            self.pool_actor.tell(self.fire(key, at))

    def fire(self, key: str, at: float) -> object:
        raise NotImplementedError


class Reaper(_TimerActor):
    """Expires reservations when their TTL elapses."""

    name = "reaper"

    def fire(self, key: str, at: float) -> object:
        return Expire(key, at)


class Arbiter(_TimerActor):
    """Ends grace periods of preempted reservations (victim choice comes with waiting)."""

    name = "arbiter"

    def fire(self, key: str, at: float) -> object:
        return FinishGrace(key)
