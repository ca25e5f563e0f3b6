"""Pushes to clients, sent only once what they announce is durable.

A ``granted`` push is an acknowledgement like a reply: the client will act on it,
so it must not reach the client before the grant's journal record is on disk. The
pool actor cannot await, so it hands each push here with the journal sequence
number it depends on. A push whose record is already durable, with nothing held
before it, goes into its connection's outbox at once; the others are held, in
order, and the journal's durability listener (``Journal.on_durable``) puts every
push that became durable into its outbox in the same step that wakes the
requests waiting for that fsync: no task in between, so a ``granted`` push leaves
as soon as the flusher thread reports its fsync. A push that finds its
connection's outbox full closes that connection (the client re-attaches and
learns the current state) rather than vanishing.

Since sequence numbers only grow, pushes to a connection keep their order, and a
group commit releases a whole batch at once. After a failed fsync they wait for
the resync (the journal tells the listener then too); what is still held when the
journal closes is dropped with its connections.
"""

from __future__ import annotations

from collections import deque

from resd.journal import Journal
from resd.messages import Outbox


class Announcer:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._held: deque[tuple[int, Outbox, bytes]] = deque()
        journal.on_durable(self._release)

    def push(self, outbox: Outbox, frame: bytes, lsn: int) -> None:
        """Send ``frame`` to ``outbox`` once journal entry ``lsn`` (0: none) is durable."""
        if not self._held and self.journal.is_durable(lsn):
            outbox.push(frame)  # a full outbox closes its connection
        else:
            self._held.append((lsn, outbox, frame))
            self.journal.want_durable(lsn)  # fsync'ed now, not by the background syncer

    def _release(self) -> None:
        held = self._held
        while held and self.journal.is_durable(held[0][0]):
            _, outbox, frame = held.popleft()
            outbox.push(frame)
