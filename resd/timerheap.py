"""Deadlines keyed by name, earliest first: the timer heap of the reaper, the
arbiter, the wait queue and the pool actor's orphans. Pure (no clock: deadlines
are numbers the owner compares with its own ``now``)."""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any

import attrs


@attrs.define(eq=False)
class TimerHeap:
    """Deadlines keyed by name; the earliest first. Re-adding a key supersedes it.

    Superseded and discarded entries stay in the heap and are skipped when popped
    (lazy deletion), so adding is O(log n); once they outnumber the live ones the heap
    is rebuilt from the live entries, so a released or renewed timer does not linger
    until its old deadline (amortized O(1) per discard).
    """

    _heap: list[tuple[float, int, str, Any]] = attrs.Factory(list)
    _live: dict[str, int] = attrs.Factory(dict)
    _seq: itertools.count[int] = attrs.Factory(itertools.count)

    def add(self, key: str, deadline: float, payload: Any = None) -> None:
        seq = next(self._seq)
        self._live[key] = seq
        heapq.heappush(self._heap, (deadline, seq, key, payload))
        self._compact()

    def discard(self, key: str) -> None:
        self._live.pop(key, None)
        self._compact()

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + 64:
            live = self._live
            self._heap = [e for e in self._heap if live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def __contains__(self, key: str) -> bool:
        return key in self._live

    @property
    def stored(self) -> int:
        """Entries in the heap, live or not (what the compaction bounds)."""
        return len(self._heap)

    def earliest(self) -> float:
        while self._heap and self._live.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else math.inf

    def pop_due(self, now: float) -> list[tuple[str, Any]]:
        due: list[tuple[str, Any]] = []
        while self.earliest() <= now:
            _, _, key, payload = heapq.heappop(self._heap)
            del self._live[key]
            due.append((key, payload))
        return due

    def __len__(self) -> int:
        return len(self._live)
