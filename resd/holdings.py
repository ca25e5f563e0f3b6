"""Who holds which member of a set and which values of a range, in one pool, and
where a new request should go (SPEC §2 kinds, §4 placement).

Pure and synchronous. ``PoolHoldings.place`` decides without changing anything;
``hold``/``unhold`` record a decision the pool book has journaled. Rules:

* ``gpu=N`` (any set resource ``=N``) takes N members that nobody holds in any way;
  ``vram=B`` takes B bytes of one GPU that is not held whole. A member with slices
  cannot be taken whole, and a whole member cannot be sliced.
* MIG instances (members labelled ``mig=instance``) are never sliced: ``vram=B``
  takes the smallest free instance of at least B bytes, whole, before it slices a
  plain GPU (the hardware enforces an instance; a slice is kept by honour).
  ``gpu=N`` takes instances only when the request names them or constrains
  ``mig=instance``.
* ``outside`` (member → bytes held outside the ledger: foreign processes, over-use,
  set from live GPU samples) is taken off a plain GPU's free bytes for new slices.
* ``constraints`` (e.g. ``model=H100``, ``numa=0``) filter set members by label.
* Two or more whole members prefer one NUMA node when one has enough free.
* Policies: ``binpack`` fills what is already used (the fullest GPU that fits a
  slice, the smallest NUMA group that fits, the narrowest free run of a range);
  ``spread`` and ``least_used`` go to the emptiest (``least_used`` breaks ties by
  the fewest holders).
* Range requests take the lowest free values, or one contiguous run, or the named
  values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import attrs

from resd.intervals import IntervalSet, count, parse_values
from resd.records import Capacity, Member, Pool, Reservation
from resd_client.errors import InvalidError
from resd_client.protocol import MemberUsage, Reserve

GPU = "gpu"
VRAM = "vram"
_DIGITS = re.compile(r"(\d+)")


def _order(name: str) -> tuple[int | str, ...]:
    """Natural order: "2" before "10", and "2-mig0" before "10-mig0"."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(name)))


def _is_mig(member: Member) -> bool:
    """A MIG instance: isolated by the hardware, so held only whole."""
    return member.labels.get("mig") == "instance"


@attrs.define(eq=False)
class MemberUse:
    whole: str | None = None
    slices: dict[str, int] = attrs.Factory(dict)

    @property
    def used(self) -> int:
        return sum(self.slices.values())

    @property
    def free_whole(self) -> bool:
        return self.whole is None and not self.slices


@attrs.frozen
class Placement:
    members: dict[str, tuple[str, ...]]
    values: dict[str, tuple[tuple[int, int], ...]]
    devices: tuple[dict[str, str], ...]
    counts: dict[str, int]  # what the set/range requests amount to (for allocation sums)


@attrs.define(eq=False)
class PoolHoldings:
    """Set and range state of one pool; scalar sums live in the pool book."""

    members: dict[str, dict[str, Member]] = attrs.Factory(dict)
    use: dict[str, dict[str, MemberUse]] = attrs.Factory(dict)
    free: dict[str, IntervalSet] = attrs.Factory(dict)
    #: GPU member → bytes held outside the ledger (foreign processes, over-use), as
    #: the daemon last saw them; new slices are admitted against what is left
    outside: dict[str, int] = attrs.Factory(dict)

    @classmethod
    def of(cls, pool: Pool) -> PoolHoldings:
        h = cls()
        for name, cap in pool.resources.items():
            if cap.kind == "set":
                h.members[name] = {
                    m.name: m for m in sorted(cap.members, key=lambda m: _order(m.name))
                }
                h.use[name] = {m.name: MemberUse() for m in cap.members}
            elif cap.kind == "range" and cap.capacity > 0:
                h.free[name] = IntervalSet([(cap.lo, cap.hi)])
            elif cap.kind == "range":
                h.free[name] = IntervalSet()
        return h

    # ------------------------------------------------------------ validation

    @staticmethod
    def check(pool: Pool, args: Reserve) -> None:
        """Refuse requests that make no sense for this pool's resources (InvalidError)."""
        for name in list(args.resources) + list(args.members):
            cap = _resource(pool, name)
            if name in args.members and cap.kind == "scalar":
                raise InvalidError(
                    f"{name} is a scalar resource; it has no named members", {"resource": name}
                )
        for name in args.contiguous:
            if _resource(pool, name).kind != "range":
                raise InvalidError(
                    f"contiguous: {name} is not a range resource", {"resource": name}
                )
        if args.constraints and not any(
            _resource(pool, n).kind == "set" or n == VRAM for n in [*args.resources, *args.members]
        ):
            raise InvalidError(
                "constraints apply to set members (e.g. gpu); none is requested",
                {"field": "constraints"},
            )
        for name, names in args.members.items():
            cap = pool.resources[name]
            amount = args.resources.get(name)
            if cap.kind == "set":
                unknown = sorted(set(names) - {m.name for m in cap.members})
                if unknown:
                    raise InvalidError(
                        f"{name} has no member {', '.join(unknown)}; it has {', '.join(m.name for m in cap.members)}",
                        {"resource": name, "unknown": unknown},
                    )
                wanted = len(set(names))
            else:
                try:
                    intervals = parse_values(names)
                except ValueError as exc:
                    raise InvalidError(f"members.{name}: {exc}", {"resource": name}) from None
                if any(lo < cap.lo or hi > cap.hi for lo, hi in intervals):
                    raise InvalidError(
                        f"members.{name}: values must lie in {cap.lo}-{cap.hi}", {"resource": name}
                    )
                wanted = count(intervals)
            if amount is not None and amount != wanted:
                raise InvalidError(
                    f"{name}: asked for {amount} but named {wanted}", {"resource": name}
                )

    # -------------------------------------------------------------- placement

    def place(
        self, pool: Pool, args: Reserve, policy: str
    ) -> tuple[Placement | None, dict[str, dict[str, int]]]:
        """Where ``args``' set and range parts go, or per-resource shortfalls."""
        members: dict[str, tuple[str, ...]] = {}
        values: dict[str, tuple[tuple[int, int], ...]] = {}
        counts: dict[str, int] = {}
        short: dict[str, dict[str, int]] = {}
        devices: tuple[dict[str, str], ...] = ()
        names = dict.fromkeys([*args.resources, *args.members])
        for name in names:
            cap = pool.resources.get(name) if name != VRAM else pool.resources.get(GPU)
            if name == VRAM:
                chosen, available = self._slice(args.resources[VRAM], args.constraints, policy)
                if chosen is None:
                    short[VRAM] = shortfall(args.resources[VRAM], available)
                else:
                    members[GPU] = (chosen,)
                    devices = (self._labels(GPU, chosen),)
                continue
            assert cap is not None
            if cap.kind == "set":
                picked, available = self._whole(name, args, policy)
                wanted = (
                    len(set(args.members[name])) if name in args.members else args.resources[name]
                )
                if picked is None:
                    short[name] = shortfall(wanted, available)
                else:
                    members[name] = picked
                    counts[name] = len(picked)
                    if name == GPU:
                        devices = tuple(self._labels(GPU, m) for m in picked)
            elif cap.kind == "range":
                taken, available = self._range(name, args, policy)
                wanted = (
                    count(parse_values(args.members[name]))
                    if name in args.members
                    else args.resources[name]
                )
                if taken is None:
                    short[name] = shortfall(wanted, available)
                else:
                    values[name] = tuple(taken)
                    counts[name] = count(taken)
        if short:
            return None, short
        return Placement(members, values, devices, counts), {}

    def _candidates(self, resource: str, constraints: dict[str, str]) -> list[Member]:
        return [
            m
            for m in self.members[resource].values()
            if all(m.labels.get(k) == v for k, v in constraints.items())
        ]

    def _whole(self, name: str, args: Reserve, policy: str) -> tuple[tuple[str, ...] | None, int]:
        use = self.use[name]
        if name in args.members:
            wanted = sorted(set(args.members[name]), key=_order)
            named_free = [m for m in wanted if use[m].free_whole]
            return (tuple(wanted) if len(named_free) == len(wanted) else None), len(named_free)
        n = args.resources[name]
        mig_ok = args.constraints.get("mig") == "instance"
        free = [
            m
            for m in self._candidates(name, args.constraints)
            if use[m.name].free_whole and (mig_ok or not _is_mig(m))
        ]
        if len(free) < n:
            return None, len(free)
        if n >= 2:
            groups: dict[str, list[Member]] = {}
            for m in free:
                groups.setdefault(m.labels.get("numa", ""), []).append(m)
            fitting = [g for g in groups.values() if len(g) >= n]
            if fitting:
                pick = (max if policy != "binpack" else min)(fitting, key=len)
                return tuple(m.name for m in pick[:n]), len(free)
        return tuple(m.name for m in free[:n]), len(free)

    def _slice(
        self, amount: int, constraints: dict[str, str], policy: str
    ) -> tuple[str | None, int]:
        """The member for ``amount`` bytes of VRAM (the smallest free MIG instance that
        holds it, else a slice of a plain GPU by ``policy``), and the most any one
        member could give (for the shortfall)."""
        if GPU not in self.members:
            return None, 0
        candidates = [m for m in self._candidates(GPU, constraints) if m.capacity > 0]
        instances = [m for m in candidates if _is_mig(m) and self.use[GPU][m.name].free_whole]
        available = max((m.capacity for m in instances), default=0)
        fitting = [m for m in instances if m.capacity >= amount]
        if fitting:
            return min(fitting, key=lambda m: (m.capacity, _order(m.name))).name, available
        best: tuple[Any, ...] | None = None
        chosen: str | None = None
        for m in candidates:
            u = self.use[GPU][m.name]
            if u.whole is not None or _is_mig(m):
                continue
            free = max(0, m.capacity - u.used - self.outside.get(m.name, 0))
            available = max(available, free)
            if free < amount:
                continue
            order = _order(m.name)
            if policy == "binpack":
                key: tuple[Any, ...] = (free, order)
            elif policy == "least_used":
                key = (len(u.slices), -free, order)
            else:
                key = (-free, order)
            if best is None or key < best:
                best, chosen = key, m.name
        return chosen, available

    def _range(
        self, name: str, args: Reserve, policy: str
    ) -> tuple[list[tuple[int, int]] | None, int]:
        free = self.free[name]
        if name in args.members:
            wanted = parse_values(args.members[name])
            ok = all(free.contains(lo, hi) for lo, hi in wanted)
            return (wanted if ok else None), len(free)
        n = args.resources[name]
        contiguous = name in args.contiguous
        picked = free.pick(n, contiguous=contiguous, widest=policy != "binpack")
        available = free.longest() if contiguous else len(free)
        return picked, available

    def _labels(self, resource: str, member: str) -> dict[str, str]:
        """What a reservation's ``devices`` (and so the lease's env) say of a member;
        ``memory`` (bytes, when known) lets clients turn a slice into a fraction."""
        m = self.members[resource][member]
        memory = {"memory": str(m.capacity)} if m.capacity > 0 else {}
        return {"name": m.name, **m.labels, **memory}

    # ---------------------------------------------------------------- holding

    def hold(self, r: Reservation) -> None:
        for name, names in r.members.items():
            for m in names:
                u = self.use[name][m]
                if VRAM in r.resources and name == GPU and not _is_mig(self.members[name][m]):
                    u.slices[r.id] = r.resources[VRAM]
                else:
                    u.whole = r.id
        for name, intervals in r.values.items():
            for lo, hi in intervals:
                self.free[name].remove(lo, hi)

    def unhold(self, r: Reservation) -> None:
        for name, names in r.members.items():
            for m in names:
                u = self.use[name][m]
                u.slices.pop(r.id, None)
                if u.whole == r.id:
                    u.whole = None
        for name, intervals in r.values.items():
            for lo, hi in intervals:
                self.free[name].add(lo, hi)

    def busy(self, resource: str) -> bool:
        if resource in self.use:
            return any(not u.free_whole for u in self.use[resource].values())
        if resource in self.free:
            return False  # checked by the caller through allocation sums
        return False

    # ----------------------------------------------------------------- views

    def member_usage(self, resource: str) -> list[MemberUsage]:
        out = []
        for m in self.members.get(resource, {}).values():
            u = self.use[resource][m.name]
            out.append(
                MemberUsage(
                    name=m.name,
                    capacity=m.capacity,
                    allocated=m.capacity if u.whole else u.used,
                    whole=u.whole is not None,
                    holders=(1 if u.whole else 0) + len(u.slices),
                    labels=dict(m.labels),
                )
            )
        return out

    def vram(self) -> tuple[int, int]:
        """(total, in use) VRAM of the GPU set: slices plus GPUs held whole."""
        total = used = 0
        for m in self.members.get(GPU, {}).values():
            u = self.use[GPU][m.name]
            total += m.capacity
            used += m.capacity if u.whole else u.used
        return total, used


def _resource(pool: Pool, name: str) -> Capacity:
    if name == VRAM:
        gpu = pool.resources.get(GPU)
        if gpu is None or not gpu.sliceable:
            raise InvalidError(
                f"pool {pool.name!r} has no GPUs with known memory, so vram cannot be reserved",
                {"resource": VRAM},
            )
        return gpu
    cap = pool.resources.get(name)
    if cap is None:
        raise InvalidError(
            f"pool {pool.name!r} has no resource {name}; it has {', '.join(pool.resources) or 'none'}",
            {"unknown": [name], "allowed": list(pool.resources)},
        )
    return cap


def shortfall(requested: int, available: int) -> dict[str, int]:
    return {
        "requested": requested,
        "available": max(available, 0),
        "shortfall": requested - max(available, 0),
    }


def members_of(specs: Iterable[Any]) -> tuple[Member, ...]:
    return tuple(Member(s.name, s.capacity, dict(s.labels)) for s in specs)
