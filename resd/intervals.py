"""A set of integers stored as sorted, disjoint, inclusive intervals.

Range resources (ports 30000–30999, VLAN ids) keep their free values here, so a
range of a million values costs a few list entries, not a million objects. Pure
and synchronous; every method is O(number of intervals) or better.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator

Interval = tuple[int, int]


class IntervalSet:
    def __init__(self, intervals: Iterable[Interval] = ()) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        self._count = 0
        for lo, hi in intervals:
            self.add(lo, hi)

    def __iter__(self) -> Iterator[Interval]:
        return iter(zip(self._lo, self._hi, strict=True))

    def __len__(self) -> int:
        """How many values (not intervals) the set holds."""
        return self._count

    def __repr__(self) -> str:
        return f"IntervalSet({list(self)})"

    def longest(self) -> int:
        return max((hi - lo + 1 for lo, hi in self), default=0)

    def contains(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._lo, lo) - 1
        return i >= 0 and self._hi[i] >= hi

    def add(self, lo: int, hi: int) -> None:
        """Put ``lo..hi`` back; it must not overlap what is there. Merges neighbours."""
        if lo > hi:
            raise ValueError(f"empty interval {lo}..{hi}")
        i = bisect.bisect_left(self._lo, lo)
        if (i > 0 and self._hi[i - 1] >= lo) or (i < len(self._lo) and self._lo[i] <= hi):
            raise ValueError(f"{lo}..{hi} overlaps free values")
        self._count += hi - lo + 1
        if i > 0 and self._hi[i - 1] == lo - 1:
            i -= 1
            lo = self._lo[i]
            del self._lo[i], self._hi[i]
        if i < len(self._lo) and self._lo[i] == hi + 1:
            hi = self._hi[i]
            del self._lo[i], self._hi[i]
        self._lo.insert(i, lo)
        self._hi.insert(i, hi)

    def remove(self, lo: int, hi: int) -> None:
        """Take ``lo..hi`` out; every value must be present (ValueError otherwise)."""
        i = bisect.bisect_right(self._lo, lo) - 1
        if i < 0 or self._hi[i] < hi:
            raise ValueError(f"{lo}..{hi} is not free")
        a, b = self._lo[i], self._hi[i]
        del self._lo[i], self._hi[i]
        self._count -= hi - lo + 1
        if hi < b:
            self._lo.insert(i, hi + 1)
            self._hi.insert(i, b)
        if a < lo:
            self._lo.insert(i, a)
            self._hi.insert(i, lo - 1)

    def pick(self, n: int, *, contiguous: bool, widest: bool = False) -> list[Interval] | None:
        """Which values to take for ``n``, without taking them; None if they are not there.

        Not contiguous: the lowest free values. Contiguous: the narrowest free run that
        fits (best fit, keeps long runs for long requests), or with ``widest`` the
        widest one (spreads requests apart); its lowest values either way.
        """
        if n <= 0 or n > self._count:
            return None
        if contiguous:
            runs = [(hi - lo + 1, lo) for lo, hi in self if hi - lo + 1 >= n]
            if not runs:
                return None
            _, lo = max(runs) if widest else min(runs)
            return [(lo, lo + n - 1)]
        out: list[Interval] = []
        left = n
        for lo, hi in self:
            take = min(left, hi - lo + 1)
            out.append((lo, lo + take - 1))
            left -= take
            if not left:
                break
        return out


def parse_values(texts: Iterable[str]) -> list[Interval]:
    """``["30001", "30005-30009"]`` → ``[(30001, 30001), (30005, 30009)]``; ValueError."""
    out: list[Interval] = []
    for text in texts:
        lo_text, sep, hi_text = text.strip().partition("-")
        if not lo_text.isdigit() or (sep and not hi_text.isdigit()):
            raise ValueError(f"{text!r} is not a value like 30001 or a range like 30005-30009")
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
        if lo > hi:
            raise ValueError(f"{text!r}: the range runs backwards")
        out.append((lo, hi))
    out.sort()
    for (_, a_hi), (b_lo, _) in itertools.pairwise(out):
        if b_lo <= a_hi:
            raise ValueError("named values overlap")
    return out


def count(intervals: Iterable[Interval]) -> int:
    return sum(hi - lo + 1 for lo, hi in intervals)
