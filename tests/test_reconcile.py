"""The pure judge (resd/reconcile.py): marks, memory outside the ledger, CPU rates
and idle time, observation by observation, with no daemon and no clock."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import given

from resd.gpu_usage import GpuProcess, GpuSample
from resd.reconcile import DeviceRef, Judge, LeaseView, Observation, ProcInfo

GiB = 1 << 30
DEVICES = [DeviceRef("p", "0", "GPU-0", 80 * GiB), DeviceRef("p", "1", "GPU-1", 80 * GiB)]


def sample(index: int, used: dict[int, int], other: int = 0, util: int | None = 0) -> GpuSample:
    return GpuSample(
        index,
        f"GPU-{index}",
        80 * GiB,
        sum(used.values()) + other,
        util,
        tuple(GpuProcess(p, b) for p, b in used.items()),
    )


def view(rid: str = "r-1", roots: tuple[int, ...] = (100,), **kw: Any) -> LeaseView:
    base: dict[str, Any] = dict(
        id=rid,
        tenant="t",
        pool="p",
        state="active",
        label="",
        priority=1,
        uid=1000,
        created_at=0.0,
        resources={"vram": 20 * GiB},
        members={"gpu": ("0",)},
        roots=roots,
        work=roots,
        reserved={"GPU-0": 20 * GiB},
    )
    base.update(kw)
    return LeaseView(**base)


def procs(*items: tuple[int, int, float]) -> dict[int, ProcInfo]:
    return {pid: ProcInfo(pid, ppid, 1.0, 1000, cpu, 0) for pid, ppid, cpu in items}


def test_outside_is_foreign_plus_overuse_plus_margin() -> None:
    judge = Judge(margin=GiB)
    obs = Observation(
        10.0,
        [sample(0, {101: 30 * GiB, 999: 5 * GiB}, other=GiB), sample(1, {})],
        procs((100, 1, 0.0), (101, 100, 0.0)),
    )
    verdict = judge.step(obs, [view()], DEVICES)
    # foreign: 5 GiB (pid 999) + 1 GiB (no pid); over-use: 30 - 20; margin 1
    assert verdict.outside == {"p": {"0": 6 * GiB + 10 * GiB + GiB, "1": GiB}}
    d0, _ = verdict.devices["p"]
    assert (d0.foreign, d0.overuse, d0.foreign_pids) == (6 * GiB, 10 * GiB, [999])
    assert "holds 30.0 GiB on gpu 0 where it reserved 20.0 GiB" in verdict.marks["r-1"]["overuse"]
    assert [f.pid for f in verdict.foreign] == []  # 999 is not in the process table


def test_without_samples_overuse_marks_stand_and_nothing_is_outside() -> None:
    judge = Judge()
    obs = Observation(1.0, None, {}, "driver gone")
    verdict = judge.step(obs, [view(marks={"overuse": "seen before"})], DEVICES)
    assert verdict.marks["r-1"] == {"overuse": "seen before"}
    assert verdict.outside == {} and not verdict.sampled


def test_a_process_seen_first_counts_busy_then_its_rate() -> None:
    judge = Judge()
    lease = view(idle_after=60.0)
    first = judge.step(Observation(0.0, [sample(0, {})], procs((100, 1, 5.0))), [lease], DEVICES)
    assert first.rows[0].cpu_percent == 100.0 and first.rows[0].idle_for == 0.0
    second = judge.step(Observation(2.0, [sample(0, {})], procs((100, 1, 6.0))), [lease], DEVICES)
    assert second.rows[0].cpu_percent == 50.0
    idle = judge.step(Observation(4.0, [sample(0, {})], procs((100, 1, 6.0))), [lease], DEVICES)
    assert idle.rows[0].idle_for == 0.0  # idle from now on
    later = judge.step(Observation(70.0, [sample(0, {})], procs((100, 1, 6.0))), [lease], DEVICES)
    assert later.rows[0].idle_for == 66.0 and "idle" in later.marks["r-1"]


def test_gpu_utilization_keeps_a_lease_busy() -> None:
    judge = Judge()
    lease = view(idle_after=60.0)
    for t in range(0, 100, 2):
        verdict = judge.step(
            Observation(float(t), [sample(0, {}, util=3)], procs((100, 1, 0.0))), [lease], DEVICES
        )
    assert verdict.marks["r-1"] == {} and verdict.rows[0].idle_for == 0.0


def test_a_lease_without_gpus_is_never_idle() -> None:
    judge = Judge()
    lease = view(idle_after=60.0, reserved={}, members={}, resources={"cpu": 1000})
    for t in range(0, 200, 10):
        verdict = judge.step(Observation(float(t), [], {}), [lease], DEVICES)
    assert verdict.marks["r-1"] == {}


def test_terminate_targets_are_the_work_trees_and_gpu_processes() -> None:
    judge = Judge()
    lease = view(roots=(100, 200), work=(200,))
    table = procs((100, 1, 0.0), (200, 100, 0.0), (201, 200, 0.0), (300, 1, 0.0))
    verdict = judge.step(Observation(1.0, [sample(0, {300: GiB})], table), [lease], DEVICES)
    assert [p.pid for p in verdict.processes["r-1"]] == [200, 201]  # not the waiting resctl
    assert verdict.rows[0].pids == [100, 200, 201]


@given(
    st.lists(
        st.tuples(st.sampled_from([101, 102, 999]), st.integers(0, 40 * GiB)),
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 4 * GiB),
)
def test_every_used_byte_is_the_ledger_s_or_outside(use: list[tuple[int, int]], other: int) -> None:
    """Held by leases within their reservations + outside == what the GPU uses."""
    judge = Judge()
    leases = [
        view("r-1", (101,), reserved={"GPU-0": 20 * GiB}),
        view("r-2", (102,), reserved={"GPU-0": 10 * GiB}),
    ]
    table = procs((101, 1, 0.0), (102, 1, 0.0), (999, 1, 0.0))
    s = sample(0, dict(use), other=other)
    verdict = judge.step(Observation(1.0, [s], table), leases, DEVICES[:1])
    held = {"r-1": dict(use).get(101, 0), "r-2": dict(use).get(102, 0)}
    entitled = min(held["r-1"], 20 * GiB) + min(held["r-2"], 10 * GiB)
    assert entitled + verdict.outside["p"]["0"] == s.memory_used
