"""Choosing preemption victims (SPEC §4): pure decisions over the pool book.

A request that does not fit a pool with ``preemption = lower_priority`` may evict
reservations of strictly lower priority. Candidates are ranked reclaimable first,
then lowest priority, then youngest (``rank``). Nothing is evicted when the request
fits already, when reservations already terminating will make room (the preemptor
just waits for them), or when even every candidate together would not make room.
Fit is decided by the same ``PoolBook.reserve`` that grants, on the book with the
candidates hypothetically removed (``PoolBook.without``), so sets, ranges, VRAM
slices and placement all count. Fit in a pool is monotone: evicting more never
makes a request fit less.

**The fewest victims.** The victims are the fewest candidates that make room and,
among equally few, the set first in lexicographic order of ranking positions (the
order of ``itertools.combinations`` over the ranked list), so the order rule
decides ties. ``fewest`` tries sizes 1, 2, … in turn and, within a size, the
combinations in that order; a size is tried only once every smaller set has
failed, so the first set that fits is the answer. Most combinations never cost a
fit check: one is skipped without calling ``reserve`` only when a *necessary*
condition of fitting fails, computed once per plan from what is missing:

* a scalar resource: the amounts the set frees must cover ``requested −
  available`` (allocation sums are additive, so this is exact);
* a range resource: likewise in values (a named or contiguous request needs at
  least that many free values too);
* a set resource (``gpu=N``): ``N − free`` more members must come free, and a busy
  member comes free only when all its holders (whole or slices) go; so for each
  choice of which members (at most ``MAX_WAYS`` choices; past that, every busy
  member counts ``1/h`` to each of its ``h`` holders), every holder of them must be
  in the set. Named members: every holder of each busy named member;
* ``vram=B``: for some GPU, the slices the set frees there must cover what that GPU
  lacks (capacity less slices less bytes held outside the ledger), or the set must
  hold that GPU or a big enough MIG instance whole.

A set must meet all the resources' conditions for one choice of GPU or members.
The search is also branch-and-bound: a partial combination that, with the most the
remaining candidates could give, cannot meet any choice ends its branch, and sizes
below what even the largest gifts could cover are skipped outright. Skipping a set
that cannot fit never loses the answer, so up to the bound the choice is exact.

**The bound.** At most ``FIT_BUDGET`` (256) fit checks and ``STEP_BUDGET``
(10,000) combinations looked at, per pool and plan. Measured on pools of tens of
leases, a fit check costs 40–100 µs and a step about 2 µs, so the exact search
costs at most some 45 ms. On what a host holds (scalars, whole GPUs, VRAM slices;
tens of leases) it needs a handful of fit checks and under 200 steps: a plan takes
under 1.5 ms at 20 candidates, under 3.5 ms at 50 and 2–20 ms at 200 (the greedy
rule alone took up to 1, 4 and 40 ms). What exhausts the bound is a shortfall in
two scalars at once from leases rich in one or the other (a two-dimensional
knapsack: 19 ms at 50 candidates, 26 ms at 200) or a request with nothing to prune
by. Past the bound the choice falls back to the greedy rule: the first single
candidate that makes room (unless every single is known not to), else the shortest
prefix of the ranking that does, pruned of every member the others make
unnecessary (at most 3n more fit checks; minimal by inclusion, not always the
fewest).

``fewest`` takes an explicit candidate list and fit predicate (and, optionally, the
bound), so quota reclaim uses the same chooser on its own candidates and its own
predicate, which need not be monotone.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import attrs

from resd.holdings import GPU, VRAM, MemberUse, PoolHoldings
from resd.intervals import count, parse_values
from resd.pools import PoolBook
from resd.records import Pool, Reservation, Reserved, Tenant
from resd_client.protocol import Reserve

T = TypeVar("T")

#: fit checks (dry runs of ``PoolBook.reserve``) the exact search may make per pool
FIT_BUDGET = 256
#: combinations (search nodes) the exact search may look at per pool
STEP_BUDGET = 10_000
#: ways of fitting (which GPUs or members to free) the bound tells apart at most
MAX_WAYS = 64


@attrs.frozen
class Plan:
    """``fits``: grantable now; ``wait``: terminating reservations will make room;
    ``preempt``: evicting ``victims`` in ``pool`` makes room; ``never``: no eviction
    of lower priorities can."""

    outcome: str
    pool: str
    victims: tuple[Reservation, ...] = ()
    grace: float = 0.0


def _fits(book: PoolBook, args: Reserve, tenant: Tenant, pool: Pool, now: float) -> bool:
    events = book.reserve(args, tenant, uid=0, session="", now=now, rid="r-000000", pools=[pool])
    return isinstance(events[0], Reserved)


def fits_without(
    book: PoolBook, args: Reserve, tenant: Tenant, pool: Pool, now: float, rids: Iterable[str]
) -> bool:
    """Would ``args`` fit ``pool`` were ``rids`` gone? A dry run; changes nothing."""
    with book.without(rids):
        return _fits(book, args, tenant, pool, now)


def rank(live: Iterable[Reservation], priority: int) -> list[Reservation]:
    """The active reservations below ``priority``, in the order victims are taken:
    reclaimable first, then lowest priority, then youngest (then by id, so that the
    order never depends on the book's dict order, which dry runs shuffle)."""
    return sorted(
        (r for r in live if r.state == "active" and r.priority < priority),
        key=lambda r: (not r.reclaimable, r.priority, -r.created_at, r.id),
    )


def plan(book: PoolBook, args: Reserve, tenant: Tenant, now: float) -> Plan:
    """What granting ``args`` for ``tenant`` (at ``tenant.priority``) would take."""
    pools = book.check_request(args)
    for pool in pools:
        if _fits(book, args, tenant, pool, now):
            return Plan("fits", pool.name)
    if book.never_fits(args, pools) is not None:
        return Plan("never", pools[0].name)
    best: Plan | None = None
    for pool in pools:
        if pool.preemption != "lower_priority":
            continue
        live = book.active_in(pool.name)
        leaving = [r.id for r in live if r.state == "terminating"]
        if leaving and fits_without(book, args, tenant, pool, now, leaving):
            return Plan("wait", pool.name, tuple(r for r in live if r.state == "terminating"))
        victims = choose(book, args, tenant, pool, now, rank(live, tenant.priority), leaving)
        if victims is not None and (best is None or len(victims) < len(best.victims)):
            best = Plan("preempt", pool.name, tuple(victims), pool.grace)
    if best is not None:
        return best
    return Plan(
        "never" if any(p.preemption == "lower_priority" for p in pools) else "wait", pools[0].name
    )


def choose(
    book: PoolBook,
    args: Reserve,
    tenant: Tenant,
    pool: Pool,
    now: float,
    ranked: Sequence[Reservation],
    leaving: Sequence[str] = (),
    *,
    budget: int = FIT_BUDGET,
    steps: int = STEP_BUDGET,
) -> list[Reservation] | None:
    """The fewest of ``ranked`` (reservations in ``pool``, in victim order) whose
    eviction, with ``leaving`` gone too, makes ``args`` fit ``pool``; None when not
    even all of them would. Whatever the pool's preemption policy: callers decide
    whether it applies. Changes nothing."""
    if not ranked:
        return None
    needs, frees = bound(book, args, pool, ranked, leaving)

    def fits(chosen: Sequence[Reservation]) -> bool:
        return fits_without(book, args, tenant, pool, now, [*leaving, *(r.id for r in chosen)])

    return fewest(ranked, fits, needs=needs, frees=frees, budget=budget, steps=steps, monotone=True)


#: what must be freed for one way of fitting: component → amount
_Way = dict[int, int]


def bound(
    book: PoolBook,
    args: Reserve,
    pool: Pool,
    ranked: Sequence[Reservation],
    leaving: Sequence[str] = (),
) -> tuple[list[list[int]], Callable[[Reservation], list[int]]]:
    """``fewest``'s ``needs`` and ``frees`` for evicting some of ``ranked`` (with
    ``leaving`` gone) to fit ``args`` in ``pool``: the necessary conditions of the
    module docstring. Valid for any predicate that implies that fit."""
    with book.without(leaving):
        return _shortage(book, args, pool, ranked)


def _shortage(
    book: PoolBook, args: Reserve, pool: Pool, ranked: Sequence[Reservation]
) -> tuple[list[list[int]], Callable[[Reservation], list[int]]]:
    """The ways ``args`` could come to fit ``pool`` (each says what must be freed of
    each component) and what each candidate gives back of each component. No ways:
    no bound."""
    ids = {r.id for r in ranked}
    components: list[dict[str, int]] = []  # component → candidate → what it gives

    def component(gives: dict[str, int]) -> int:
        components.append(gives)
        return len(components) - 1

    holdings = book.holdings[pool.name]
    forms: list[tuple[list[_Way], list[_Way]]] = []  # per resource: precise, coarse
    for name in dict.fromkeys([*args.resources, *args.members]):
        if name == VRAM:
            forms.append((_vram_ways(holdings, args.resources[name], ids, component), [{}]))
            continue
        cap = pool.resources[name]
        if cap.kind == "scalar":
            c = component({r.id: r.resources.get(name, 0) for r in ranked})
            scalar = [{c: args.resources[name] - book.available(pool, name)}]
            forms.append((scalar, scalar))
        elif cap.kind == "range":
            named = name in args.members
            wanted = count(parse_values(args.members[name])) if named else args.resources[name]
            c = component({r.id: count(r.values.get(name, ())) for r in ranked})
            values = [{c: wanted - len(holdings.free[name])}]
            forms.append((values, values))
        else:
            forms.append(_member_ways(holdings.use[name], args, name, ids, component))
    chosen = [precise for precise, _ in forms]
    while math.prod(map(len, chosen)) > MAX_WAYS:
        j = max(range(len(chosen)), key=lambda j: len(chosen[j]))
        chosen[j] = forms[j][1]
    ways = [{c: w for way in combo for c, w in way.items()} for combo in itertools.product(*chosen)]
    used = sorted({c for way in ways for c in way})
    needs = [[way.get(c, 0) for c in used] for way in ways]
    return needs, lambda r: [components[c].get(r.id, 0) for c in used]


def _holders(use: MemberUse) -> set[str]:
    return {use.whole} if use.whole is not None else set(use.slices)


def _member_ways(
    use: dict[str, MemberUse],
    args: Reserve,
    name: str,
    ids: set[str],
    component: Callable[[dict[str, int]], int],
) -> tuple[list[_Way], list[_Way]]:
    """Ways for a set resource: each names the busy members to free (all their
    holders must go); coarse: the members' shares of the module docstring."""
    holders = {m: _holders(u) for m, u in use.items()}
    if name in args.members:
        busy = [m for m in dict.fromkeys(args.members[name]) if holders[m]]
        if not all(holders[m] <= ids for m in busy):
            return [], []
        named = {component(dict.fromkeys(holders[m], 1)): len(holders[m]) for m in busy}
        return [named], [named]
    short = args.resources[name] - sum(1 for h in holders.values() if not h)
    if short <= 0:
        return [{}], [{}]
    freeable = {m: h for m, h in holders.items() if h and h <= ids}
    if short > len(freeable):
        return [], []
    scale = math.lcm(*map(len, freeable.values()))
    shares = {rid: sum(scale // len(h) for h in freeable.values() if rid in h) for rid in ids}
    coarse = [{component(shares): short * scale}]
    if math.comb(len(freeable), short) > MAX_WAYS:
        return coarse, coarse
    each = {m: component(dict.fromkeys(h, 1)) for m, h in freeable.items()}
    ways = []
    for group in itertools.combinations(freeable, short):
        way = {each[m]: len(freeable[m]) for m in group}
        if short > 1:  # their sum too: it bounds what the picks left give jointly
            held = Counter(rid for m in group for rid in freeable[m])
            way[component(dict(held))] = sum(held.values())
        ways.append(way)
    return ways, coarse


def _vram_ways(
    holdings: PoolHoldings, amount: int, ids: set[str], component: Callable[[dict[str, int]], int]
) -> list[_Way]:
    """Ways for ``vram=amount``: one per GPU that could hold the slice, saying which
    bytes of it (or which whole holder) must be freed. Mirrors ``PoolHoldings._slice``:
    a MIG instance (``mig=instance``) of at least ``amount`` bytes is taken whole; a
    plain GPU not held whole is sliced against its capacity less its slices and the
    bytes held outside the ledger."""
    ways: list[_Way] = []
    for m, member in holdings.members.get(GPU, {}).items():
        use = holdings.use[GPU][m]
        if member.capacity <= 0:
            continue
        if member.labels.get("mig") == "instance":  # never sliced: held whole or free
            if member.capacity < amount:
                continue
            if use.whole is None:
                ways.append({})
            elif use.whole in ids:
                ways.append({component({use.whole: 1}): 1})
            continue
        room = member.capacity - holdings.outside.get(m, 0)
        if use.whole is not None:
            if room >= amount and use.whole in ids:
                ways.append({component({use.whole: 1}): 1})
            continue
        short = amount - (room - use.used)
        freeable = {rid: b for rid, b in use.slices.items() if rid in ids}
        if sum(freeable.values()) >= short:
            ways.append({component(freeable): short} if short > 0 else {})
    return ways


# ------------------------------------------------------------ the generic chooser


class _OverBudget(Exception):
    pass


def fewest(
    ranked: Sequence[T],
    fits: Callable[[Sequence[T]], bool],
    *,
    needs: Sequence[Sequence[int]] = (),
    frees: Callable[[T], Sequence[int]] | None = None,
    budget: int = FIT_BUDGET,
    steps: int = STEP_BUDGET,
    monotone: bool = False,
) -> list[T] | None:
    """The smallest non-empty subset of ``ranked`` for which ``fits`` holds, first
    in lexicographic order of positions among equally small ones; None when there
    is none. ``fits`` is given the chosen candidates in ranking order.

    ``monotone`` says that a superset of a fitting set always fits (true of fit in
    a pool, not of "fits and keeps every tenant at its min"): then one check of all
    of ``ranked`` settles the None case, and all of ``ranked`` never needs a check.

    ``needs`` and ``frees`` are an optional cheap bound: a set is only checked when,
    for at least one vector of ``needs`` (a way of fitting), the sum of ``frees(c)``
    over its members reaches it in every component; the bound must be a necessary
    condition of ``fits``. No ``needs``, or a way that needs nothing: no bound.

    Past ``budget`` calls of ``fits`` or ``steps`` combinations looked at, the
    greedy rule of the module docstring decides instead: still a fitting set (for
    a predicate that is not monotone, None when no prefix of the ranking fits)."""
    n = len(ranked)
    if n == 0 or (monotone and not fits(list(ranked))):
        return None
    sparse = [[(j, w) for j, w in enumerate(need) if w > 0] for need in needs]
    if not sparse or not all(sparse):
        sparse = []
    used = sorted({j for way in sparse for j, _ in way})
    where = {j: i for i, j in enumerate(used)}
    ways = tuple(tuple((where[j], w) for j, w in way) for way in sparse)
    gives: list[tuple[int, ...]] = []
    for c in ranked:
        given = frees(c) if frees is not None and used else ()
        gives.append(tuple(given[j] for j in used))
    search = _Search(gives, ways, calls=budget - monotone, steps=steps)
    done = search.too_few()  # sizes known to hold no fitting set
    try:
        for k in range(done + 1, n + 1):
            if monotone and k == n:
                return list(ranked)
            for combo in search.combinations(k):
                chosen = [ranked[i] for i in combo]
                search.spend_call()
                if fits(chosen):
                    return chosen
            done = k
        return None
    except _OverBudget:
        return _greedy(ranked, fits, search, singles=done == 0, monotone=monotone)


@attrs.define(eq=False)
class _Search:
    """Combinations of candidate positions, by size then lexicographically, that
    pass the bound; counts what it spends and raises _OverBudget past it."""

    gives: list[tuple[int, ...]]
    #: ways of fitting: (component, amount it needs) pairs; none: no bound
    ways: tuple[tuple[tuple[int, int], ...], ...]
    calls: int
    steps: int

    def spend_call(self) -> None:
        self.calls -= 1
        if self.calls < 0:
            raise _OverBudget

    def passes(self, got: Sequence[int]) -> bool:
        for way in self.ways:  # plain loops: this is the search's inner step
            for j, w in way:
                if got[j] < w:
                    break
            else:
                return True
        return not self.ways

    def too_few(self) -> int:
        """The largest size of which no set passes the bound, since even the largest
        gifts of each component together fall short (0 without a bound)."""
        if not self.ways:
            return 0
        columns = [sorted(column, reverse=True) for column in zip(*self.gives, strict=True)]
        got = [0] * len(columns)
        for k, row in enumerate(zip(*columns, strict=True)):
            got = [g + x for g, x in zip(got, row, strict=True)]
            if self.passes(got):
                return k  # size k + 1 may pass
        return len(self.gives)

    def enough(self, positions: Iterable[int]) -> bool:
        got = [0] * len(self.gives[0]) if self.gives else []
        for i in positions:
            got = [a + b for a, b in zip(got, self.gives[i], strict=True)]
        return self.passes(got)

    def combinations(self, k: int) -> Iterator[tuple[int, ...]]:
        n = len(self.gives)
        if not self.ways:
            for combo in itertools.combinations(range(n), k):
                self._step()
                yield combo
            return
        tops = self._tops(k)
        yield from self._extend((), tuple(0 for _ in self.gives[0]), 0, k, tops)

    def _extend(
        self,
        combo: tuple[int, ...],
        got: tuple[int, ...],
        start: int,
        k: int,
        tops: list[list[tuple[int, ...]]],
    ) -> Iterator[tuple[int, ...]]:
        left = k - len(combo)
        if left == 0:
            yield combo
            return
        passes, gives = self.passes, self.gives
        for i in range(start, len(gives) - left + 1):
            self._step()
            if not passes([g + b for g, b in zip(got, tops[i][left], strict=True)]):
                return  # later starts have fewer and smaller candidates left
            more = tuple([g + x for g, x in zip(got, gives[i], strict=True)])
            if passes([g + b for g, b in zip(more, tops[i + 1][left - 1], strict=True)]):
                yield from self._extend((*combo, i), more, i + 1, k, tops)

    def _tops(self, k: int) -> list[list[tuple[int, ...]]]:
        """``tops[i][m]``: per component, the most that ``m`` (≤ k) of the
        candidates from position ``i`` on can give."""
        n, width = len(self.gives), len(self.gives[0])
        largest: list[list[int]] = [[] for _ in range(width)]  # negated, ascending
        empty = tuple(0 for _ in range(width))
        tops: list[list[tuple[int, ...]]] = [[empty] * (k + 1) for _ in range(n + 1)]
        for i in range(n - 1, -1, -1):
            sums = []
            for r in range(width):
                bisect.insort(largest[r], -self.gives[i][r])
                del largest[r][k:]
                sums.append([0, *itertools.accumulate(-x for x in largest[r])])
            tops[i] = [tuple(s[min(m, len(s) - 1)] for s in sums) for m in range(k + 1)]
        return tops

    def _step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _OverBudget


def _greedy(
    ranked: Sequence[T],
    fits: Callable[[Sequence[T]], bool],
    bound: _Search,
    *,
    singles: bool,
    monotone: bool,
) -> list[T] | None:
    """The first single candidate that fits (unless every single is known not to),
    else the shortest fitting prefix of the ranking, pruned of every member the
    others make unnecessary; None when no prefix fits (``monotone``: all of
    ``ranked`` is known to)."""

    def ok(positions: list[int]) -> bool:
        return bound.enough(positions) and fits([ranked[i] for i in positions])

    n = len(ranked)
    if singles:
        for i in range(n):
            if ok([i]):
                return [ranked[i]]
    chosen: list[int] = []
    for i in range(n):
        chosen.append(i)
        if (monotone and i == n - 1) or ok(chosen):
            break
    else:
        return None
    for i in reversed(chosen[:-1]):
        rest = [c for c in chosen if c != i]
        if ok(rest):
            chosen = rest
    return [ranked[i] for i in chosen]
