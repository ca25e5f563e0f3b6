"""What the GPUs really hold, sample by sample (SPEC §10): plain frozen values that
the NVML backends return and the reconciler will read. Nothing here touches NVML."""

from __future__ import annotations

from typing import Final

import attrs


@attrs.frozen
class GpuProcess:
    """A process with a context on a GPU. ``used_memory`` in bytes; None when the
    driver does not say (no permission, or a driver model that does not count it)."""

    pid: int
    used_memory: int | None = None


@attrs.frozen
class GpuSample:
    """One device at one moment: memory in bytes, ``utilization`` in percent (None
    when the device does not report it), and the processes on it."""

    index: int
    uuid: str
    memory_total: int
    memory_used: int
    utilization: int | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_total - self.memory_used)

    def used_by(self, pid: int) -> int:
        """Bytes ``pid`` holds here (0 when it is not here or the driver does not say)."""
        return sum(p.used_memory or 0 for p in self.processes if p.pid == pid)


# ------------------------------------------------------------------- attribution


@attrs.frozen
class LeaseGpus:
    """What attribution needs of one live lease: the processes whose trees are its
    own (a ``pid`` lease's process, a session lease's peer, the CMD of a
    ``resctl run``), and the bytes it reserved on each device (by uuid; a whole GPU
    reserves all of its memory)."""

    id: str
    roots: tuple[int, ...]
    reserved: dict[str, int] = attrs.Factory(dict)


@attrs.frozen
class Overuse:
    """A lease's processes hold ``used`` bytes on ``device`` where it reserved
    ``reserved`` (0: the device is not assigned to it at all)."""

    device: str
    used: int
    reserved: int


@attrs.frozen
class LeaseUsage:
    id: str
    #: device uuid → bytes its processes hold there
    used: dict[str, int] = attrs.Factory(dict)
    #: its processes seen on a GPU
    pids: tuple[int, ...] = ()
    overuse: tuple[Overuse, ...] = ()


@attrs.frozen
class Attribution:
    """Who holds what, from one sample: per lease, and ``foreign`` (device uuid →
    bytes, and the pids) for processes of no lease."""

    leases: dict[str, LeaseUsage]
    foreign: dict[str, int]
    foreign_pids: dict[str, tuple[int, ...]]


def attribute(
    samples: list[GpuSample], leases: list[LeaseGpus], parent: dict[int, int]
) -> Attribution:
    """Attribute every GPU process to a lease (pure: the process tree is an argument).

    A process belongs to its nearest ancestor (itself included) that is a root of some
    lease; a root may hold several leases (one worker, two slices): its processes'
    use of a device is then judged against what all of them reserved there together,
    charged to those that have the device (or, when none has it, to all of them) in
    proportion to what they reserved there, so every byte is counted once, and an
    over-use is flagged on each of them.
    ``parent`` maps pid → parent pid; a pid missing from it has no known ancestors.
    Over-use: more than reserved on a device, or any use of a device not reserved.
    """
    by_root: dict[int, list[LeaseGpus]] = {}
    for lease in leases:
        for root in lease.roots:
            by_root.setdefault(root, []).append(lease)
    used: dict[str, dict[str, int]] = {lease.id: {} for lease in leases}
    pids: dict[str, set[int]] = {lease.id: set() for lease in leases}
    group_use: dict[tuple[int, str], int] = {}  # (root, device) → bytes
    foreign: dict[str, int] = {}
    foreign_pids: dict[str, list[int]] = {}
    for sample in samples:
        for proc in sample.processes:
            owner = _owning_root(proc.pid, by_root, parent)
            memory = proc.used_memory or 0
            if owner is None:
                foreign[sample.uuid] = foreign.get(sample.uuid, 0) + memory
                foreign_pids.setdefault(sample.uuid, []).append(proc.pid)
                continue
            group = by_root[owner]
            holders = [g for g in group if sample.uuid in g.reserved] or group
            group_use[(owner, sample.uuid)] = group_use.get((owner, sample.uuid), 0) + memory
            for lease, share in zip(holders, _shares(memory, holders, sample.uuid), strict=True):
                pids[lease.id].add(proc.pid)
                used[lease.id][sample.uuid] = used[lease.id].get(sample.uuid, 0) + share
    over: dict[str, list[Overuse]] = {lease.id: [] for lease in leases}
    for (root, device), bytes_used in sorted(group_use.items()):
        group = by_root[root]
        reserved = sum(g.reserved.get(device, 0) for g in group)
        if bytes_used > reserved:
            holders = [g for g in group if device in g.reserved] or group
            for lease in holders:
                over[lease.id].append(Overuse(device, bytes_used, reserved))
    return Attribution(
        leases={
            lease.id: LeaseUsage(
                lease.id, used[lease.id], tuple(sorted(pids[lease.id])), tuple(over[lease.id])
            )
            for lease in leases
        },
        foreign=foreign,
        foreign_pids={uuid: tuple(sorted(p)) for uuid, p in foreign_pids.items()},
    )


def _shares(memory: int, holders: list[LeaseGpus], device: str) -> list[int]:
    """``memory`` split over ``holders`` by what each reserved on ``device`` (evenly
    when none did); the remainder goes to the first, so the parts add up."""
    weights = [h.reserved.get(device, 0) for h in holders]
    if not any(weights):
        weights = [1] * len(holders)
    parts = [memory * w // sum(weights) for w in weights]
    parts[0] += memory - sum(parts)
    return parts


def _owning_root(pid: int, roots: dict[int, list[LeaseGpus]], parent: dict[int, int]) -> int | None:
    """The nearest ancestor of ``pid`` (itself included) that is a lease root."""
    seen: set[int] = set()
    while pid not in seen:  # a cycle (a stale, reused table) must end too
        if pid in roots:
            return pid
        seen.add(pid)
        up = parent.get(pid)
        if up is None or up == pid:
            return None
        pid = up
    return None


# ------------------------------------------------------------------- enforcement


#: the enforcement levels, strongest first (SPEC §10)
LADDER: Final = ("mig", "mps", "cgroup", "framework", "watch", "none")


def stronger(level: str, other: str) -> str:
    """The stronger of two enforcement levels: a cgroup confining a lease's CMD
    outranks framework caps and watching, but not MIG or MPS limits."""
    return min(level, other, key=LADDER.index)


def enforcement_of(
    binding: str, devices: tuple[dict[str, str], ...], resources: dict[str, int], mps: bool
) -> str:
    """The strongest guard the host gives a reservation (SPEC §10), decided at grant:
    ``mig`` when it holds MIG instances (the hardware caps its memory); ``watch`` for
    a ``pid`` lease (its process runs already, with whatever environment it had);
    ``mps`` for a VRAM slice on a host whose MPS daemon pins device memory per
    client; ``framework`` for other GPU leases (CUDA_VISIBLE_DEVICES and the
    frameworks' memory caps in the lease's environment); ``none`` without a GPU."""
    if not devices:
        return "none"
    if any(d.get("mig") == "instance" for d in devices):
        return "mig"
    if binding == "pid":
        return "watch"
    if "vram" in resources and mps:
        return "mps"
    return "framework"
