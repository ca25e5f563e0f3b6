"""Pushes to clients, sent only once what they announce is durable.

A ``granted`` push is an acknowledgement like a reply: the client will act on it,
so it must not reach the client before the grant's journal record is on disk. The
pool actor cannot await, so it hands each push here with the journal sequence
number it depends on; one task sends them in order as the journal catches up. A
push that finds its connection's outbox full closes that connection (the client
re-attaches and learns the current state) rather than vanishing.
Since sequence numbers only grow, pushes to a connection keep their order, and a
group commit releases a whole batch at once.
"""

from __future__ import annotations

import math

import structlog
import trio

from resd.journal import Journal, JournalFailed
from resd.messages import Outbox

log = structlog.get_logger("resd.announcer")


class Announcer:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._send, self._recv = trio.open_memory_channel[tuple[int, Outbox, bytes]](math.inf)

    def push(self, outbox: Outbox, frame: bytes, lsn: int) -> None:
        """Send ``frame`` to ``outbox`` once journal entry ``lsn`` (0: none) is durable."""
        try:
            self._send.send_nowait((lsn, outbox, frame))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for lsn, outbox, frame in self._recv:
            while lsn:
                try:
                    await self.journal.wait_durable(lsn)
                    break
                except JournalFailed:  # durable again once the state is written anew
                    await self.journal.wait_synced()
                except RuntimeError as exc:  # the journal is closed: resd is stopping
                    log.warning("push_not_sent", error=str(exc))
                    break
            outbox.push(frame)  # a full outbox closes its connection
