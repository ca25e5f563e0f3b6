"""The arbiter's choice of victims (SPEC §4): the fewest, ties by the order rule,
exact up to the search bound and still fitting past it. Pure: on a PoolBook."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resd import preemption
from resd.pools import PoolBook
from resd.records import Reservation, Reserved, Tenant
from resd_client.protocol import PoolCreate, Reserve, from_wire

GiB = 1 << 30
BOSS = Tenant("boss", 9)
IDS = itertools.count(1)


def book_with(resources: dict[str, Any]) -> PoolBook:
    book = PoolBook()
    spec = {"name": "p", "resources": resources, "max_per_tenant": 0}
    spec["preemption"] = "lower_priority"
    book.apply(book.create_pool(from_wire(PoolCreate, spec), 0.0))
    return book


def gpus(n: int, vram: int = 8 * GiB, mig: int = 0) -> dict[str, Any]:
    members = [{"name": str(i), "capacity": vram} for i in range(n)]
    members += [
        {"name": f"{n}-mig{i}", "capacity": vram // 4, "labels": {"mig": "instance"}}
        for i in range(mig)
    ]
    return {"kind": "set", "members": members}


def hold(
    book: PoolBook,
    resources: dict[str, Any],
    priority: int = 1,
    at: float = 1.0,
    reclaimable: bool = False,
    **extra: Any,
) -> Reservation | None:
    rid = f"r-{next(IDS):06x}"
    resources = {k: v for k, v in resources.items() if v}
    args = from_wire(
        Reserve, {"pool": "p", "resources": resources, "reclaimable": reclaimable, **extra}
    )
    events = book.reserve(
        args, Tenant(f"t{priority}", priority), uid=0, session="", now=at, rid=rid
    )
    book.apply(events)
    return events[0].reservation if isinstance(events[0], Reserved) else None


def ask(resources: dict[str, Any], **extra: Any) -> Reserve:
    return from_wire(Reserve, {"pool": "p", "resources": resources, **extra})


def fits_without(book: PoolBook, args: Reserve, gone: Sequence[Reservation]) -> bool:
    with book.without(r.id for r in gone):
        events = book.reserve(args, BOSS, uid=0, session="", now=100.0, rid="r-ffffff")
    return isinstance(events[0], Reserved)


def brute(book: PoolBook, args: Reserve, ranked: list[Reservation]) -> list[Reservation] | None:
    """The first fitting set by size, then in combinations order: the definition."""
    for k in range(1, len(ranked) + 1):
        for combo in itertools.combinations(ranked, k):
            if fits_without(book, args, combo):
                return list(combo)
    return None


def state(book: PoolBook) -> dict[str, Any]:
    """The snapshot, its reservations in id order (a dry run may re-insert them)."""
    snap = book.snapshot()
    snap["reservations"] = sorted(snap["reservations"], key=lambda r: r["id"])
    return snap


def choose(
    book: PoolBook,
    args: Reserve,
    budget: int = preemption.FIT_BUDGET,
    steps: int = preemption.STEP_BUDGET,
) -> list[Reservation] | None:
    ranked = preemption.rank(book.active_in("p"), BOSS.priority)
    pool = book.pools["p"]
    return preemption.choose(book, args, BOSS, pool, 100.0, ranked, budget=budget, steps=steps)


# ------------------------------------------------------------------ examples


def test_two_two_one_one_one_evicts_two() -> None:
    book = book_with({"cpu": {"capacity": 7}})
    big = [hold(book, {"cpu": 2}, at=1.0), hold(book, {"cpu": 2}, at=2.0)]
    for at in (3.0, 4.0, 5.0):
        hold(book, {"cpu": 1}, at=at)
    plan = preemption.plan(book, ask({"cpu": 4}), BOSS, 100.0)
    assert plan.outcome == "preempt"
    assert list(plan.victims) == big[::-1], "two leases of 2 (youngest first), not 1+1+2"


def test_the_bound_spares_most_fit_checks() -> None:
    book = book_with({"cpu": {"capacity": 7}})
    for cpu in (2, 2, 1, 1, 1):
        hold(book, {"cpu": cpu})
    ranked = preemption.rank(book.active_in("p"), BOSS.priority)
    calls: list[int] = []

    def fits(chosen: Sequence[Reservation]) -> bool:
        calls.append(len(chosen))
        return fits_without(book, ask({"cpu": 4}), chosen)

    need = [4]
    chosen = preemption.fewest(
        ranked, fits, needs=[need], frees=lambda r: [r.resources["cpu"]], monotone=True
    )
    assert chosen is not None and [r.resources["cpu"] for r in chosen] == [2, 2]
    assert calls == [5, 2], "all of them, then the one pair that frees 4"


def test_the_bound_serves_other_predicates() -> None:
    """As quota reclaim uses it: fit, and a condition of its own (here: spare one
    lease), which all of the candidates together need not meet."""
    book = book_with({"cpu": {"capacity": 7}})
    spared, other = hold(book, {"cpu": 2}, at=1.0), hold(book, {"cpu": 2}, at=2.0)
    ones = [hold(book, {"cpu": 1}, at=at) for at in (3.0, 4.0, 5.0)]
    args = ask({"cpu": 4})
    ranked = preemption.rank(book.active_in("p"), BOSS.priority)
    needs, frees = preemption.bound(book, args, book.pools["p"], ranked)

    def fits(chosen: Sequence[Reservation]) -> bool:
        return spared not in chosen and fits_without(book, args, chosen)

    chosen = preemption.fewest(ranked, fits, needs=needs, frees=frees)
    assert chosen == [ones[2], ones[1], other]
    assert preemption.fewest(ranked, fits, needs=needs, frees=frees, monotone=True) is None


def test_ties_go_reclaimable_first_then_lowest_priority_then_youngest() -> None:
    book = book_with({"cpu": {"capacity": 8}})
    old1 = hold(book, {"cpu": 2}, priority=1, at=1.0)
    young1 = hold(book, {"cpu": 2}, priority=1, at=2.0)
    prio2 = hold(book, {"cpu": 2}, priority=2, at=3.0)
    lendable = hold(book, {"cpu": 2}, priority=3, at=0.5, reclaimable=True)
    assert choose(book, ask({"cpu": 2})) == [lendable]
    assert choose(book, ask({"cpu": 4})) == [lendable, young1]
    assert choose(book, ask({"cpu": 6})) == [lendable, young1, old1]
    assert choose(book, ask({"cpu": 8})) == [lendable, young1, old1, prio2]
    assert lendable is not None
    book.apply(book.release(lendable.id, 5.0))
    assert choose(book, ask({"cpu": 6})) == [young1, old1], "lowest priority first"
    plan = preemption.plan(book, ask({"cpu": 6}), Tenant("t2", 2), 100.0)
    assert plan.outcome == "preempt" and list(plan.victims) == [young1, old1]


def test_a_bigger_lease_beats_two_smaller_ones_ranked_before_it() -> None:
    book = book_with({"cpu": {"capacity": 6}})
    big = hold(book, {"cpu": 4}, priority=2)
    small = [hold(book, {"cpu": 1}, priority=1, at=at) for at in (1.0, 2.0)]
    assert all(small)
    assert choose(book, ask({"cpu": 4})) == [big]


def test_gpus_held_by_slices_count_only_when_every_holder_goes() -> None:
    book = book_with({"cpu": {"capacity": 64}, "gpu": gpus(2)})
    # binpack fills gpu 0 first; ages interleave the two GPUs' holders in the ranking
    a, b, c, d = (hold(book, {"vram": 4 * GiB}, at=at) for at in (1.0, 3.0, 2.0, 4.0))
    assert [r.members["gpu"] if r else () for r in (a, b, c, d)] == [("0",), ("0",), ("1",), ("1",)]
    whole = ask({"gpu": 1})
    assert choose(book, whole) == [d, c], "d with b frees no GPU; d with c frees gpu 1"
    assert choose(book, whole) == brute(book, whole, preemption.rank(book.active_in("p"), 9))


def test_sliced_gpus_cost_a_few_fit_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve slices on three GPUs; freeing one GPU takes its four holders. Only the
    sets that hold every slice of one GPU reach ``reserve``."""
    book = book_with({"gpu": gpus(3)})
    for i in range(12):  # binpack fills gpu 0, then 1, then 2; ages interleave them
        assert hold(book, {"vram": 2 * GiB}, at=float((i % 3) * 4 + i // 3))
    reserve = PoolBook.reserve
    calls = []

    def counted(self: PoolBook, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return reserve(self, *args, **kwargs)

    for args in (ask({"gpu": 1}), ask({"gpu": 2}), ask({"vram": 7 * GiB})):
        calls.clear()
        monkeypatch.setattr(PoolBook, "reserve", counted)
        chosen = choose(book, args)
        monkeypatch.setattr(PoolBook, "reserve", reserve)
        assert chosen == brute(book, args, preemption.rank(book.active_in("p"), 9))
        assert chosen is not None and len({r.members["gpu"] for r in chosen}) == len(chosen) // 4
        assert len(calls) == 2, "all of them, then the answer"


def test_many_members_to_free_use_the_coarse_bound() -> None:
    book = book_with({"gpu": gpus(10)})
    held = [hold(book, {"gpu": 1}, at=float(i)) for i in range(10)]
    args = ask({"gpu": 4})  # C(10, 4) = 210 choices of GPUs: more than MAX_WAYS
    chosen = choose(book, args)
    assert chosen == held[:-5:-1], "the four youngest"
    assert chosen == brute(book, args, preemption.rank(book.active_in("p"), 9))


def test_named_members_and_ranges() -> None:
    book = book_with({"gpu": gpus(3), "port": {"kind": "range", "lo": 100, "hi": 109}})
    g0 = hold(book, {"gpu": 1}, at=1.0)
    g12 = hold(book, {"gpu": 2}, at=2.0)
    ports = [hold(book, {"port": n}, at=3.0 + i) for i, n in enumerate((4, 3, 3))]
    assert g0 and g12 and all(ports)
    assert choose(book, ask({"gpu": 1}, members={"gpu": ["0"]})) == [g0]
    assert choose(book, ask({"port": 4})) == [ports[0]], "one range of 4, youngest-first ties"
    assert choose(book, ask({"port": 7})) == [ports[2], ports[0]]


def test_none_when_even_every_candidate_is_not_enough() -> None:
    book = book_with({"cpu": {"capacity": 8}})
    hold(book, {"cpu": 4}, priority=1)
    hold(book, {"cpu": 4}, priority=9)
    assert choose(book, ask({"cpu": 5})) is None
    assert preemption.fewest([], lambda _: True) is None


def test_past_the_budget_the_greedy_rule_still_fits() -> None:
    book = book_with({"cpu": {"capacity": 7}})
    for cpu in (2, 2, 1, 1, 1):
        hold(book, {"cpu": cpu}, at=float(len(book.reservations)))
    args = ask({"cpu": 4})
    tiny = choose(book, args, budget=0)
    assert tiny is not None and fits_without(book, args, tiny)
    assert sorted(r.resources["cpu"] for r in tiny) == [1, 1, 2], "greedy: prefix, pruned"
    assert choose(book, args, steps=0) == tiny
    exact = choose(book, args)
    assert exact is not None and len(exact) == 2


def test_generic_chooser_without_a_bound() -> None:
    weights = [3, 1, 1, 2, 2, 5]
    calls = 0

    def fits(chosen: Sequence[int]) -> bool:
        nonlocal calls
        calls += 1
        return sum(weights[i] for i in chosen) >= 6

    assert preemption.fewest(range(6), fits) == [0, 5], "first pair in combinations order"
    assert calls == 6 + 5, "every single, then pairs up to (0, 5)"
    for monotone in (True, False):
        calls = 0
        greedy = preemption.fewest(range(6), fits, budget=3, monotone=monotone)
        assert greedy is not None and sum(weights[i] for i in greedy) >= 6
        assert calls <= 3 + 3 * 6
    assert preemption.fewest(range(6), lambda c: sum(weights[i] for i in c) > 14) is None


def test_a_predicate_that_is_not_monotone() -> None:
    """Quota reclaim: room, but no tenant below its min — evicting more can break it."""
    weights = [3, 1, 1, 2, 2, 5]

    def fits(chosen: Sequence[int]) -> bool:
        return sum(weights[i] for i in chosen) >= 4 and 5 not in chosen and len(chosen) < 4

    assert preemption.fewest(range(6), fits, monotone=True) is None, "all of them do not fit"
    assert preemption.fewest(range(6), fits) == [0, 1]
    assert preemption.fewest(range(6), fits, budget=2) == [0, 1], "greedy: prefix, pruned"
    assert preemption.fewest(range(6), lambda c: len(c) == 6) == [0, 1, 2, 3, 4, 5]
    assert preemption.fewest(range(6), lambda c: c == [4], budget=2) == [4], "singles first"
    assert preemption.fewest(range(6), lambda c: c == [1, 3], budget=8) is None, "no prefix"


# -------------------------------------------------------------- properties

LEASE = st.one_of(
    st.fixed_dictionaries({"cpu": st.integers(1, 4)}),
    st.fixed_dictionaries({"cpu": st.integers(1, 3), "port": st.integers(1, 3)}),
    st.fixed_dictionaries({"cpu": st.integers(0, 3), "gpu": st.integers(1, 2)}),
    st.fixed_dictionaries({"vram": st.sampled_from([GiB, 2 * GiB, 3 * GiB, 5 * GiB])}),
    st.fixed_dictionaries({"port": st.integers(1, 4)}),
)
REQUEST = st.one_of(
    st.fixed_dictionaries({"cpu": st.integers(2, 12)}),
    st.fixed_dictionaries({"cpu": st.integers(1, 8), "port": st.integers(1, 8)}),
    st.fixed_dictionaries({"cpu": st.integers(1, 8), "gpu": st.integers(1, 3)}),
    st.fixed_dictionaries({"gpu": st.integers(1, 4)}),
    st.fixed_dictionaries({"vram": st.sampled_from([2 * GiB, 4 * GiB, 7 * GiB])}),
    st.fixed_dictionaries({"port": st.integers(1, 8), "cpu": st.integers(0, 4)}),
)


@st.composite
def scenes(draw: st.DrawFn) -> tuple[PoolBook, Reserve]:
    book = book_with(
        {
            "cpu": {"capacity": draw(st.integers(4, 12))},
            "gpu": gpus(draw(st.integers(1, 3)), mig=draw(st.integers(0, 2))),
            "port": {"kind": "range", "lo": 0, "hi": draw(st.integers(3, 9))},
        }
    )
    for i in range(draw(st.integers(3, 10))):
        hold(
            book,
            draw(LEASE),
            priority=draw(st.integers(1, 10)),
            at=float(draw(st.integers(0, 3))) + i / 100,
            reclaimable=draw(st.booleans()),
        )
    resources = draw(REQUEST)
    extra: dict[str, Any] = {}
    if "port" in resources and draw(st.booleans()):
        extra["contiguous"] = ["port"]
    if "gpu" in resources and draw(st.booleans()):
        extra["constraints"] = {"mig": "instance"}
    return book, ask({k: v for k, v in resources.items() if v}, **extra)


@given(scenes())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_choice_is_the_first_of_the_fewest(scene: tuple[PoolBook, Reserve]) -> None:
    book, args = scene
    assume(not fits_without(book, args, []))
    ranked = preemption.rank(book.active_in("p"), BOSS.priority)
    before = state(book)
    chosen = choose(book, args)
    assert state(book) == before, "choosing changes nothing"
    expected = brute(book, args, ranked)
    assert chosen == expected
    with mock.patch.object(preemption, "MAX_WAYS", 1):  # the coarse bound: still exact
        assert choose(book, args) == expected
    greedy = choose(book, args, budget=0)
    if expected is None:
        assert greedy is None
        return
    assert greedy is not None and fits_without(book, args, greedy)
    assert len(greedy) >= len(expected)
    for r in greedy:
        assert not fits_without(book, args, [g for g in greedy if g is not r]), "pruned"


@pytest.mark.parametrize("steps", [0, 1, 5, 40])
def test_any_step_budget_still_fits(steps: int) -> None:
    book = book_with({"cpu": {"capacity": 12}, "gpu": gpus(2)})
    for i, cpu in enumerate((2, 2, 1, 1, 1, 3, 2)):
        hold(book, {"cpu": cpu}, priority=1 + i % 3, at=float(i))
    hold(book, {"vram": 6 * GiB}, at=9.0)
    hold(book, {"vram": 6 * GiB}, at=9.5)
    for args in (ask({"cpu": 7}), ask({"gpu": 1, "cpu": 5}), ask({"vram": 7 * GiB})):
        chosen = choose(book, args, steps=steps)
        assert chosen is not None and fits_without(book, args, chosen)
