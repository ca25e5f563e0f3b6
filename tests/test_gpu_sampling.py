"""Sampling what the GPUs hold (SPEC §10, issue 11's first layer): the real
backend's use of NVML, over a fake nvidia-ml-py, and the scripted backend that
lets everything built on samples be tested without a GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resd import nvml
from resd.gpu_usage import GpuProcess, GpuSample, LeaseGpus, Overuse, attribute
from resd.inventory import GpuDevice
from resd.nvml import NvmlUnavailable, PynvmlBackend, ScriptedBackend, StaticBackend, Usage
from tests.test_nvml import (
    FakeNvml,
    GiB,
    Memory,
    NVMLError_GpuIsLost,
    NVMLError_NotSupported,
    h100_box,
)

NOT_AVAILABLE = (1 << 64) - 1  # what old bindings hand back for "not available"


class SamplingNvml(FakeNvml):
    """FakeNvml plus what ``sample`` reads: memory in use, utilization, processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.used: dict[int, int] = {}
        self.util: dict[int, int | None] = {}
        self.compute: dict[int, list[tuple[int, int | None]]] = {}
        self.graphics: dict[int, list[tuple[int, int | None]]] = {}
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        super().nvmlInit()

    def _index(self, handle: Any, call: str) -> int:
        return self.gpus.index(self._gpu(handle, call))

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Memory:
        gpu = self._gpu(handle, "memory")
        used = self.used.get(self.gpus.index(gpu), 0)
        return Memory(gpu.memory, gpu.memory - used, used)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        util = self.util.get(self._index(handle, "util"), 0)
        if util is None:
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=util, memory=0)

    def _procs(self, table: dict[int, list[tuple[int, int | None]]], handle: Any) -> list[Any]:
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=memory)
            for pid, memory in table.get(self._index(handle, "procs"), [])
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return self._procs(self.compute, handle)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        return self._procs(self.graphics, handle)


def backend(monkeypatch: pytest.MonkeyPatch, fake: SamplingNvml) -> PynvmlBackend:
    monkeypatch.setattr(nvml, "pynvml", fake)
    return PynvmlBackend()


def test_a_sample_reads_memory_utilization_and_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SamplingNvml(h100_box()[:2])
    fake.used = {0: 30 * GiB}
    fake.util = {0: 87, 1: None}  # GPU 1 does not report utilization
    fake.compute = {0: [(4242, 20 * GiB), (4343, None)]}
    fake.graphics = {0: [(4242, 20 * GiB), (5000, NOT_AVAILABLE)]}  # 4242 in both lists
    b = backend(monkeypatch, fake)
    first, second = b.sample()
    assert first == GpuSample(
        index=0,
        uuid=h100_box()[0].uuid,
        memory_total=80 * GiB,
        memory_used=30 * GiB,
        utilization=87,
        processes=(GpuProcess(4242, 20 * GiB), GpuProcess(4343, None), GpuProcess(5000, None)),
    )
    assert first.memory_free == 50 * GiB and first.used_by(4242) == 20 * GiB
    assert first.used_by(1) == 0
    assert second.utilization is None and second.processes == ()


def test_sampling_keeps_nvml_initialised_and_starts_again_after_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = h100_box()[:1]
    fake = SamplingNvml(gpus)
    b = backend(monkeypatch, fake)
    for _ in range(3):
        b.sample()
    assert fake.inits == 1 and fake.live, "one init for many samples"
    gpus[0].broken = "memory"
    with pytest.raises(NvmlUnavailable, match="GPU 0: GPU is lost"):
        b.sample()
    assert not fake.live, "shut down after the failure"
    gpus[0].broken = ""
    assert len(b.sample()) == 1 and fake.inits == 2
    b.close()
    assert not fake.live


def test_sampling_without_nvml_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvml, "pynvml", None)
    with pytest.raises(NvmlUnavailable, match="not installed"):
        PynvmlBackend().sample()
    fake = SamplingNvml(h100_box(), init_error=NVMLError_GpuIsLost())
    with pytest.raises(NvmlUnavailable, match="nvmlInit"):
        backend(monkeypatch, fake).sample()


DEVICES = (
    GpuDevice(index=0, uuid="GPU-a", name="H100", memory_total=80 * GiB),
    GpuDevice(index=1, uuid="GPU-b", name="H100", memory_total=80 * GiB),
)


def test_a_scripted_timeline_unfolds_on_its_clock() -> None:
    now = [0.0]
    b = ScriptedBackend(
        DEVICES,
        [
            Usage(at=5.0, device=0, processes={100: 30 * GiB}, utilization=90),
            Usage(at=1.0, device=0, processes={100: 10 * GiB}, utilization=40, other=GiB),
            Usage(at=2.0, device=1, processes={999: 60 * GiB}),  # foreign, say
            Usage(at=9.0, device=0),  # the process is gone
        ],
        clock=lambda: now[0],
    )
    assert [s.memory_used for s in b.sample()] == [0, 0]
    now[0] = 1.5
    first, second = b.sample()
    assert (first.memory_used, first.utilization, first.used_by(100)) == (11 * GiB, 40, 10 * GiB)
    assert second.memory_used == 0
    now[0] = 6.0
    first, second = b.sample()
    assert (first.used_by(100), first.utilization, second.used_by(999)) == (30 * GiB, 90, 60 * GiB)
    now[0] = 10.0
    assert b.sample()[0].processes == ()
    b.failing = "the driver went away"
    with pytest.raises(NvmlUnavailable, match="went away"):
        b.sample()


def test_configured_gpus_are_seen_idle() -> None:
    assert [s.memory_used for s in StaticBackend(DEVICES).sample()] == [0, 0]


# ------------------------------------------------------------------- attribution


def sample(uuid: str, *procs: tuple[int, int | None], total: int = 80 * GiB) -> GpuSample:
    return GpuSample(
        index=0,
        uuid=uuid,
        memory_total=total,
        memory_used=sum(m or 0 for _, m in procs),
        processes=tuple(GpuProcess(p, m) for p, m in procs),
    )


def test_processes_are_attributed_to_the_lease_of_their_nearest_root() -> None:
    # 10 (a resctl run's CMD) → 11 → 12 (a dataloader worker); 20 is a pid lease;
    # 30 nobody's; 40's parent chain loops (a stale table) and reaches no root
    parent = {11: 10, 12: 11, 10: 1, 20: 1, 30: 1, 40: 41, 41: 40}
    leases = [
        LeaseGpus("r-run", roots=(10,), reserved={"GPU-a": 20 * GiB}),
        LeaseGpus("r-pid", roots=(20,), reserved={"GPU-b": 80 * GiB}),
    ]
    got = attribute(
        [
            sample("GPU-a", (12, 30 * GiB), (30, 5 * GiB), (40, GiB)),
            sample("GPU-b", (20, 10 * GiB), (11, 2 * GiB)),
        ],
        leases,
        parent,
    )
    run, pid = got.leases["r-run"], got.leases["r-pid"]
    assert run.used == {"GPU-a": 30 * GiB, "GPU-b": 2 * GiB} and run.pids == (11, 12)
    assert run.overuse == (
        Overuse("GPU-a", 30 * GiB, 20 * GiB),  # more than its slice
        Overuse("GPU-b", 2 * GiB, 0),  # a device it does not hold
    )
    assert pid.used == {"GPU-b": 10 * GiB} and pid.overuse == ()
    assert got.foreign == {"GPU-a": 6 * GiB} and got.foreign_pids == {"GPU-a": (30, 40)}


def test_leases_of_one_process_are_judged_together_per_device() -> None:
    """One worker holding two 20 GiB slices of GPU-a may use 40 GiB there."""
    leases = [
        LeaseGpus("r-1", roots=(7,), reserved={"GPU-a": 20 * GiB}),
        LeaseGpus("r-2", roots=(7,), reserved={"GPU-a": 20 * GiB}),
        LeaseGpus("r-3", roots=(7,), reserved={"GPU-b": 10 * GiB}),
    ]
    fine = attribute([sample("GPU-a", (7, 40 * GiB))], leases, {})
    assert all(u.overuse == () for u in fine.leases.values())
    assert fine.leases["r-1"].used == fine.leases["r-2"].used == {"GPU-a": 20 * GiB}
    assert fine.leases["r-3"].used == {}, "charged to the leases that hold the device"
    over = attribute([sample("GPU-a", (7, 41 * GiB))], leases, {})
    assert over.leases["r-1"].overuse == (Overuse("GPU-a", 41 * GiB, 40 * GiB),)
    assert over.leases["r-3"].overuse == ()


@given(
    procs=st.lists(
        st.tuples(st.integers(1, 30), st.sampled_from(["GPU-a", "GPU-b"]), st.integers(0, 10)),
        max_size=20,
    ),
    parents=st.dictionaries(st.integers(1, 30), st.integers(1, 30), max_size=30),
    roots=st.lists(st.integers(1, 30), max_size=6),  # a root may hold several leases
    reserve=st.lists(st.sampled_from([None, "GPU-a", "GPU-b"]), min_size=6, max_size=6),
)
def test_every_byte_is_either_some_lease_s_or_foreign(
    procs: list[tuple[int, str, int]],
    parents: dict[int, int],
    roots: list[int],
    reserve: list[str | None],
) -> None:
    samples = [
        sample(uuid, *[(p, m * GiB) for p, u, m in procs if u == uuid])
        for uuid in ("GPU-a", "GPU-b")
    ]
    leases = [
        LeaseGpus(f"r-{i}", roots=(r,), reserved={} if d is None else {d: (i + 1) * GiB})
        for i, (r, d) in enumerate(zip(roots, reserve, strict=False))
    ]
    got = attribute(samples, leases, parents)
    for s in samples:
        charged = sum(u.used.get(s.uuid, 0) for u in got.leases.values())
        assert charged + got.foreign.get(s.uuid, 0) == s.memory_used
    for usage in got.leases.values():
        for o in usage.overuse:
            assert o.used > o.reserved
