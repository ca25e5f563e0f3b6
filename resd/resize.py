"""Resizing a live lease in place (issue 12): pure decisions over the pool book.

``resize`` returns the events of giving lease ``id`` new amounts: ``[Resized]``
when it can, ``[Denied]`` (a business refusal, as ``PoolBook.reserve`` returns)
when growing does not fit, and raises for bad input. What the lease holds is
kept: a scalar grows by what is available; a set resource keeps its members and
adds free whole ones (on the NUMA node it already uses, when it can); a VRAM slice
grows on its own GPU (a MIG instance up to the instance); a range keeps its values
and adds the lowest free ones. Shrinking always succeeds and gives back what
``give_back`` names, else the last members or highest values. Quotas' max counts
the growth. TTL, binding and everything else stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from resd import quotas
from resd.holdings import GPU, VRAM, PoolHoldings, shortfall
from resd.intervals import IntervalSet, count, parse_values
from resd.pools import PoolBook
from resd.records import Capacity, PoolEvent, Reservation, Resized, Tenant
from resd_client.errors import ConflictError, InsufficientError, InvalidError, ResdError
from resd_client.protocol import Reserve


@attrs.define
class _Shape:
    """A lease's shape being changed: amounts, members, values, and what was said."""

    resources: dict[str, int]
    members: dict[str, tuple[str, ...]]
    values: dict[str, tuple[tuple[int, int], ...]]
    notes: list[str] = attrs.Factory(list)
    short: dict[str, dict[str, int]] = attrs.Factory(dict)


def resize(
    book: PoolBook,
    rid: str,
    targets: dict[str, int],
    give_back: dict[str, list[str]],
    now: float,
) -> list[PoolEvent]:
    """Events of giving ``rid`` the amounts ``targets`` (see the module docstring)."""
    r = book.reservation(rid)
    if r.state != "active":
        raise ConflictError(
            f"reservation {rid} is being preempted and cannot be resized",
            {"id": rid, "state": r.state},
        )
    if r.gang:
        raise InvalidError(
            f"{rid} is a gang; its parts cannot be resized (release it and reserve anew)",
            {"id": rid},
        )
    pool = book.pools[r.pool]
    holdings = book.holdings[r.pool]
    if VRAM in targets and GPU in targets:
        raise InvalidError("resize gpu or vram, not both", {"field": "resources"})
    if VRAM in targets and VRAM not in r.resources:
        raise InvalidError(
            f"{rid} holds no VRAM slice to resize; whole GPUs resize by gpu",
            {"field": "resources.vram"},
        )
    shape = _Shape(dict(r.resources), dict(r.members), dict(r.values))
    for name, target in sorted(targets.items()):
        if name == VRAM:
            _vram(shape, holdings, r, target)
            continue
        cap = pool.resources.get(name)
        if cap is None:
            raise InvalidError(
                f"pool {pool.name!r} has no resource {name}; it has {', '.join(pool.resources)}",
                {"unknown": [name], "allowed": list(pool.resources)},
            )
        before = r.resources.get(name, 0)
        if cap.kind == "scalar":
            if name in give_back:
                raise InvalidError(
                    f"give_back.{name}: {name} is a scalar; only its amount changes",
                    {"field": f"give_back.{name}"},
                )
            available = book.available(pool, name)
            if target - before > available:
                shape.short[name] = shortfall(target - before, available)
            _set_amount(shape, name, before, target)
        elif cap.kind == "set":
            _members(shape, holdings, name, before, target, give_back.get(name), pool.placement)
        else:
            _range(shape, holdings, cap, name, before, target, give_back.get(name))
    if not any(shape.resources.values()):
        raise InvalidError(f"resizing {rid} to nothing: release it instead", {"field": "resources"})
    refusal = _refusal(book, r, shape)
    if refusal is not None:
        request = Reserve(pool=r.pool, resources=dict(targets), tenant=r.tenant)
        return [book.denied(request, r.pool, Tenant(r.tenant, r.priority), now, refusal)]
    devices = tuple(holdings._labels(GPU, m) for m in shape.members.get(GPU, ()))
    return [
        Resized(
            rid,
            {k: v for k, v in shape.resources.items() if v},
            {k: v for k, v in shape.members.items() if v},
            {k: v for k, v in shape.values.items() if v},
            devices,
            now,
            "; ".join(shape.notes),
        )
    ]


def _set_amount(shape: _Shape, name: str, before: int, target: int, unit: str = "") -> None:
    if target != before:
        shape.resources[name] = target
        shape.notes.append(f"{name} {before}{unit} → {target}{unit}")


def _vram(shape: _Shape, holdings: PoolHoldings, r: Reservation, target: int) -> None:
    (member,) = r.members[GPU]
    m = holdings.members[GPU][member]
    before = r.resources[VRAM]
    if target == 0:
        raise InvalidError("a VRAM slice cannot shrink to 0: release the lease", {"field": "vram"})
    if m.labels.get("mig") == "instance":
        free = m.capacity - before  # the instance is held whole
    else:
        use = holdings.use[GPU][member]
        free = m.capacity - use.used - holdings.outside.get(member, 0)
    if target - before > free:
        shape.short[VRAM] = shortfall(target - before, max(free, 0))
    _set_amount(shape, VRAM, before, target, "B")


def _members(
    shape: _Shape,
    holdings: PoolHoldings,
    name: str,
    before: int,
    target: int,
    named: list[str] | None,
    policy: str,
) -> None:
    held = list(shape.members.get(name, ()))
    if VRAM in shape.resources and name == GPU:
        raise InvalidError(
            "a VRAM slice changes by vram, not by gpu", {"field": f"resources.{name}"}
        )
    if target < before:
        if named is not None:
            unknown = sorted(set(named) - set(held))
            if unknown or len(set(named)) != before - target:
                raise InvalidError(
                    f"give_back.{name}: name {before - target} of {', '.join(held)}"
                    f" (got {', '.join(named)})",
                    {"field": f"give_back.{name}", "held": held},
                )
            gone = [m for m in held if m in named]
        else:
            gone = held[target:]
        shape.members[name] = tuple(m for m in held if m not in gone)
        shape.notes.append(f"{name} gave back {', '.join(gone)}")
    elif target > before:
        if named is not None:
            raise InvalidError(
                f"give_back.{name}: {name} grows here, nothing is given back",
                {"field": f"give_back.{name}"},
            )
        picked = _pick_members(holdings, name, held, target - before, policy)
        if picked is None:
            free = sum(1 for u in holdings.use[name].values() if u.free_whole)
            shape.short[name] = shortfall(target - before, free)
        else:
            shape.members[name] = (*held, *picked)
            shape.notes.append(f"{name} added {', '.join(picked)}")
    shape.resources[name] = target


def _pick_members(
    holdings: PoolHoldings, name: str, held: Sequence[str], n: int, policy: str
) -> tuple[str, ...] | None:
    """``n`` free whole members, on the NUMA node of ``held`` when enough are."""
    free = [
        m
        for m in holdings.members[name].values()
        if holdings.use[name][m.name].free_whole and m.labels.get("mig") != "instance"
    ]
    if len(free) < n:
        return None
    numa = {holdings.members[name][m].labels.get("numa", "") for m in held}
    near = [m for m in free if m.labels.get("numa", "") in numa]
    chosen = near[:n] if len(near) >= n else free[:n]
    return tuple(m.name for m in chosen)


def _range(
    shape: _Shape,
    holdings: PoolHoldings,
    cap: Capacity,
    name: str,
    before: int,
    target: int,
    named: list[str] | None,
) -> None:
    held = IntervalSet(list(shape.values.get(name, ())))
    if target < before:
        if named is not None:
            gone = parse_values(named)
            if not all(held.contains(lo, hi) for lo, hi in gone) or count(gone) != before - target:
                raise InvalidError(
                    f"give_back.{name}: name {before - target} of the values held",
                    {"field": f"give_back.{name}"},
                )
        else:
            gone = _highest(held, before - target)
        for lo, hi in gone:
            held.remove(lo, hi)
        shape.notes.append(f"{name} gave back {_text(gone)}")
    elif target > before:
        picked = holdings.free[name].pick(target - before, contiguous=False, widest=False)
        if picked is None:
            shape.short[name] = shortfall(target - before, len(holdings.free[name]))
        else:
            for lo, hi in picked:
                held.add(lo, hi)
            shape.notes.append(f"{name} added {_text(picked)}")
    shape.values[name] = tuple(held)
    shape.resources[name] = target


def _highest(held: IntervalSet, n: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in reversed(list(held)):
        if n <= 0:
            break
        take = min(n, hi - lo + 1)
        out.append((hi - take + 1, hi))
        n -= take
    return out


def _text(intervals: Sequence[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in sorted(intervals))


def _refusal(book: PoolBook, r: Reservation, shape: _Shape) -> ResdError | None:
    if shape.short:
        text = "; ".join(
            f"{n} short by {s['shortfall']} (asked {s['requested']} more, {s['available']} free)"
            for n, s in sorted(shape.short.items())
        )
        return InsufficientError(
            f"{r.id} cannot grow in pool {r.pool!r}: {text}",
            {"pool": r.pool, "resources": shape.short},
        )
    pool = book.pools[r.pool]
    growth = {
        n: shape.resources.get(n, 0) - r.resources.get(n, 0)
        for n in shape.resources
        if shape.resources.get(n, 0) > r.resources.get(n, 0)
    }
    if growth and pool.quotas:
        holding = book.quota_use(r.pool, r.tenant)
        return quotas.over_max(pool, r.tenant, holding, Reserve(pool=r.pool, resources=growth))
    return None
