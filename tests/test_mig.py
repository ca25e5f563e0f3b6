"""MIG instances as members of the ``gpu`` set (issue 11, the ``mig`` rung of the
enforcement ladder): NVML's MIG devices through a fake nvidia-ml-py, the GPU file,
the host pool's members, and placement that takes instances whole. Also VRAM
admission against use outside the ledger (``PoolHoldings.outside``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from resd import nvml
from resd.discovery import gpu_members, host_pool_resources
from resd.gpu_usage import GpuProcess, GpuSample
from resd.inventory import GpuDevice, HostInventory, MigInstance
from resd.nvml import NvmlUnavailable, PynvmlBackend, device_to_json, load_gpus_file
from resd.records import Denied
from tests.test_holdings import Reserver, book_with
from tests.test_nvml import FakeGpu, FakeMig, FakeNvml, GiB, NVMLError_NotSupported

H100 = "NVIDIA H100 80GB HBM3"


def mig_box() -> list[FakeGpu]:
    """GPU 0 whole; GPU 1 in MIG mode with 1g.10gb in slot 0, slot 1 empty, 3g.40gb in
    slot 2 and 2g.20gb in slot 3."""
    return [
        FakeGpu("GPU-0", H100, 80 * GiB, "00000000:18:00.0", 0),
        FakeGpu(
            "GPU-1",
            H100,
            80 * GiB,
            "00000000:2A:00.0",
            0,
            mig=True,
            mig_devices=[
                FakeMig("MIG-a", f"{H100} MIG 1g.10gb", 10 * GiB),
                None,
                FakeMig("MIG-b", f"{H100} MIG 3g.40gb", 40 * GiB),
                FakeMig("MIG-c", f"{H100} MIG 2g.20gb", 20 * GiB),
            ],
        ),
    ]


INSTANCES = (
    MigInstance("MIG-a", 10 * GiB, "1g.10gb", 0),
    MigInstance("MIG-b", 40 * GiB, "3g.40gb", 2),
    MigInstance("MIG-c", 20 * GiB, "2g.20gb", 3),
)


def backend(monkeypatch: pytest.MonkeyPatch, fake: FakeNvml) -> PynvmlBackend:
    monkeypatch.setattr(nvml, "pynvml", fake)
    return PynvmlBackend()


# ------------------------------------------------------------------ NVML


def test_a_mig_gpu_lists_its_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(mig_box())
    plain, mig = backend(monkeypatch, fake).devices()
    assert plain.mig_instances == ()
    assert mig.mig and mig.memory_total == 80 * GiB
    assert mig.mig_instances == INSTANCES
    assert fake.calls == ["init", "shutdown"]


def test_old_bindings_give_bytes_and_names_without_a_profile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = mig_box()
    slots = gpus[1].mig_devices
    assert slots[0] is not None and slots[2] is not None
    slots[0].name = "Some MIG device"  # no profile to be read from it
    slots[2].broken = "name"  # the name is only a label: its failure costs nothing
    gpus[1].mig_devices.append(FakeMig("MIG-d", f"{H100} MIG 1c.2g.20gb", 10 * GiB))
    _plain, mig = backend(monkeypatch, FakeNvml(gpus, as_bytes=True)).devices()
    assert [(m.uuid, m.profile, m.index) for m in mig.mig_instances] == [
        ("MIG-a", "", 0),
        ("MIG-b", "", 2),
        ("MIG-c", "2g.20gb", 3),
        ("MIG-d", "1c.2g.20gb", 4),  # a compute instance's profile
    ]


def test_a_driver_or_binding_without_mig_devices_lists_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(mig_box())
    fake.nvmlDeviceGetMaxMigDeviceCount = None  # type: ignore[assignment,method-assign]
    assert backend(monkeypatch, fake).devices()[1].mig_instances == ()

    def unsupported(handle: Any) -> int:
        raise NVMLError_NotSupported()

    fake = FakeNvml(mig_box())
    fake.nvmlDeviceGetMaxMigDeviceCount = unsupported  # type: ignore[method-assign]
    devices = backend(monkeypatch, fake).devices()
    assert devices[1].mig and devices[1].mig_instances == ()


@pytest.mark.parametrize("call", ["uuid", "memory"])
def test_a_mig_device_that_fails_is_unavailable(monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    """Like any device's facts, an instance's uuid and memory are not optional."""
    gpus = mig_box()
    slot = gpus[1].mig_devices[3]
    assert slot is not None
    slot.broken = call
    fake = FakeNvml(gpus)
    with pytest.raises(NvmlUnavailable, match="GPU 1: GPU is lost"):
        backend(monkeypatch, fake).devices()
    assert fake.calls == ["init", "shutdown"]


def test_a_mig_gpu_is_sampled_per_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = mig_box()
    a, _empty, b, c = gpus[1].mig_devices
    assert a is not None and b is not None and c is not None
    a.used, a.compute = 6 * GiB, [(4242, 5 * GiB)]
    b.used, b.graphics = 2 * GiB, [(5000, None)]
    samples = backend(monkeypatch, FakeNvml(gpus)).sample()
    assert [(s.index, s.uuid) for s in samples] == [
        (0, "GPU-0"),
        (1, "MIG-a"),
        (1, "MIG-b"),
        (1, "MIG-c"),
    ]
    assert samples[1] == GpuSample(
        1, "MIG-a", 10 * GiB, 6 * GiB, None, (GpuProcess(4242, 5 * GiB),)
    )
    assert samples[2] == GpuSample(1, "MIG-b", 40 * GiB, 2 * GiB, None, (GpuProcess(5000, None),))
    assert samples[3].memory_used == 0 and samples[3].processes == ()


def test_a_mig_gpu_without_instances_is_not_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = mig_box()
    gpus[1].mig_devices = []
    assert [s.uuid for s in backend(monkeypatch, FakeNvml(gpus)).sample()] == ["GPU-0"]


# ------------------------------------------------------------------ the GPU file

MIG_GPU = GpuDevice(1, "GPU-1", H100, 80 * GiB, 0, "0000:2a:00.0", True, INSTANCES)


def test_gpus_file_round_trips_mig_instances(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    plain = GpuDevice(0, "GPU-0", H100, 80 * GiB, 0, "0000:18:00.0")
    path.write_text(json.dumps([device_to_json(plain), device_to_json(MIG_GPU)]))
    assert load_gpus_file(path) == [plain, MIG_GPU]


def test_gpus_file_mig_instances_defaults_and_sizes(tmp_path: Path) -> None:
    """An older file (``mig`` without ``mig_instances``) reads as a GPU without any."""
    path = tmp_path / "gpus.json"
    entry = {"index": 0, "uuid": "GPU-0", "name": H100, "memory": "80G", "mig": True}
    path.write_text(json.dumps([entry]))
    assert load_gpus_file(path)[0].mig_instances == ()
    instances = [{"uuid": "MIG-a", "memory": "10G"}, {"uuid": "MIG-b", "memory": 20 * GiB}]
    path.write_text(json.dumps([{**entry, "mig_instances": instances}]))
    assert load_gpus_file(path)[0].mig_instances == (
        MigInstance("MIG-a", 10 * GiB, "", 0),
        MigInstance("MIG-b", 20 * GiB, "", 1),
    )


GPU = {"index": 0, "uuid": "GPU-a", "name": "H100", "memory": "80G", "mig": True}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**GPU, "mig_instances": {}}, r"field 'mig_instances': \{\} is not a list"),
        (
            {**GPU, "mig": False, "mig_instances": [{"uuid": "MIG-a", "memory": "10G"}]},
            r"field 'mig_instances': only a GPU in MIG mode",
        ),
        ({**GPU, "mig_instances": ["MIG-a"]}, r"field 'mig_instances\[0\]': expected an object"),
        (
            {**GPU, "mig_instances": [{"memory": "10G"}]},
            r"field 'mig_instances\[0\]\.uuid': missing",
        ),
        (
            {**GPU, "mig_instances": [{"uuid": "MIG-a", "memory": "10X"}]},
            r"field 'mig_instances\[0\]\.memory': '10X' is not a size",
        ),
        (
            {**GPU, "mig_instances": [{"uuid": "MIG-a", "memory": "90G"}]},
            r"field 'mig_instances\[0\]\.memory': .* more than the GPU's memory",
        ),
        (
            {**GPU, "mig_instances": [{"uuid": "MIG-a", "memory": "10G", "profile": 1}]},
            r"field 'mig_instances\[0\]\.profile': 1 is not a string",
        ),
        (
            {**GPU, "mig_instances": [{"uuid": "MIG-a", "memory": "10G", "vram": 1}]},
            r"field 'mig_instances\[0\]\.vram': unknown field",
        ),
        (
            {
                **GPU,
                "mig_instances": [
                    {"uuid": "MIG-a", "memory": "10G", "index": 1},
                    {"uuid": "MIG-b", "memory": "10G"},
                ],
            },
            r"field 'mig_instances\[1\]\.index': 1 repeats mig_instances\[0\]",
        ),
        (
            {
                **GPU,
                "mig_instances": [
                    {"uuid": "MIG-a", "memory": "10G"},
                    {"uuid": "MIG-a", "memory": "10G"},
                ],
            },
            r"field 'mig_instances\[1\]\.uuid': 'MIG-a' repeats field 'mig_instances\[0\]\.uuid'",
        ),
        (
            {**GPU, "processes": {"1": "1G"}},
            r"field 'processes': a GPU in MIG mode is used through its instances",
        ),
    ],
)
def test_gpus_file_mig_errors_name_entry_and_field(
    tmp_path: Path, entry: dict[str, Any], message: str
) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message) as info:
        load_gpus_file(path)
    assert f"{path}: entry 0" in str(info.value)


def test_a_mig_uuid_may_not_repeat_another_gpus(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    other = {"index": 1, "uuid": "GPU-b", "name": "H100", "memory": "80G"}
    mig = {**GPU, "mig_instances": [{"uuid": "GPU-b", "memory": "10G"}]}
    path.write_text(json.dumps([other, mig]))
    with pytest.raises(ValueError, match=r"entry 1: field 'mig_instances\[0\]\.uuid'.*entry 0"):
        load_gpus_file(path)


# ------------------------------------------------------------------ members of the host pool


def inventory(*gpus: GpuDevice) -> HostInventory:
    return HostInventory(figures=(), gpus=gpus)


PLAIN = GpuDevice(0, "GPU-0", H100, 80 * GiB, 0, "0000:18:00.0")


def test_mig_instances_are_members_instead_of_their_gpu() -> None:
    members = host_pool_resources(inventory(PLAIN, MIG_GPU), {})["gpu"]["members"]
    assert [(m["name"], m["capacity"]) for m in members] == [
        ("0", 80 * GiB),
        ("1-mig0", 10 * GiB),
        ("1-mig2", 40 * GiB),
        ("1-mig3", 20 * GiB),
    ]
    assert members[0]["labels"]["mig"] == "off"
    assert members[2]["labels"] == {
        "index": "1",
        "uuid": "MIG-b",
        "model": H100,
        "numa": "0",
        "pci_bus": "0000:2a:00.0",
        "mig": "instance",
        "parent": "1",
        "profile": "3g.40gb",
    }


def test_a_mig_gpu_without_instances_offers_nothing_and_says_so() -> None:
    bare = GpuDevice(1, "GPU-1", H100, 80 * GiB, mig=True)
    with structlog.testing.capture_logs() as logs:
        assert gpu_members(bare) == []
        resources = host_pool_resources(inventory(bare), {})
    assert "gpu" not in resources  # a set needs members
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
        "mig_gpu_without_instances"
    ] * 2


# ------------------------------------------------------------------ placement


def mig_pool(*gpus: GpuDevice) -> Reserver:
    members = host_pool_resources(inventory(*gpus), {})["gpu"]["members"]
    return Reserver(book_with(p={"resources": {"gpu": {"kind": "set", "members": members}}}))


def test_vram_takes_the_smallest_instance_that_fits_whole() -> None:
    take = mig_pool(PLAIN, MIG_GPU)
    r = take(pool="p", resources={"vram": 15 * GiB})
    assert r.members == {"gpu": ("1-mig3",)}  # 20G: the smallest that holds 15G
    (device,) = r.devices
    assert (device["uuid"], device["mig"], device["memory"]) == ("MIG-c", "instance", str(20 * GiB))
    rows = {m.name: m for m in take.book.holdings["p"].member_usage("gpu")}
    assert rows["1-mig3"].whole and rows["1-mig3"].allocated == 20 * GiB
    # an instance, though larger, beats a slice of a GPU (the hardware enforces it)
    assert take(pool="p", resources={"vram": 15 * GiB}).members == {"gpu": ("1-mig2",)}
    assert take(pool="p", resources={"vram": 15 * GiB}).members == {"gpu": ("0",)}  # a slice
    assert take(pool="p", resources={"vram": 5 * GiB}).members == {"gpu": ("1-mig0",)}
    assert not rows["0"].whole
    take.release(r.id)
    assert take(pool="p", resources={"vram": 18 * GiB}).members == {"gpu": ("1-mig3",)}


def test_an_instance_is_never_sliced() -> None:
    take = mig_pool(MIG_GPU)
    assert take(pool="p", resources={"vram": 2 * GiB}).members == {"gpu": ("1-mig0",)}
    assert take(pool="p", resources={"vram": 2 * GiB}).members == {"gpu": ("1-mig3",)}
    assert take(pool="p", resources={"vram": 2 * GiB}).members == {"gpu": ("1-mig2",)}
    denied = take(pool="p", resources={"vram": 2 * GiB})
    assert isinstance(denied, Denied) and denied.code == "insufficient"
    assert denied.details["resources"]["vram"]["available"] == 0
    denied = mig_pool(MIG_GPU)(pool="p", resources={"vram": 41 * GiB})
    assert isinstance(denied, Denied)
    assert denied.details["resources"]["vram"]["available"] == 40 * GiB


def test_whole_gpus_skip_instances_unless_asked_for() -> None:
    take = mig_pool(PLAIN, MIG_GPU)
    assert take(pool="p", resources={"gpu": 1}).members == {"gpu": ("0",)}
    denied = take(pool="p", resources={"gpu": 1})
    assert isinstance(denied, Denied)
    assert denied.details["resources"]["gpu"]["available"] == 0
    r = take(pool="p", resources={"gpu": 2}, constraints={"mig": "instance"})
    assert r.members == {"gpu": ("1-mig0", "1-mig2")}
    r = take(pool="p", members={"gpu": ["1-mig3"]})
    assert r.members == {"gpu": ("1-mig3",)}
    assert r.devices[0]["uuid"] == "MIG-c"


def test_devices_carry_each_members_memory() -> None:
    take = mig_pool(PLAIN)
    r = take(pool="p", resources={"gpu": 1})
    assert r.devices[0]["memory"] == str(80 * GiB)


# ------------------------------------------------------------------ use outside the ledger


def test_vram_is_admitted_against_use_outside_the_ledger() -> None:
    second = GpuDevice(2, "GPU-2", H100, 80 * GiB, 0, "0000:3a:00.0")
    take = mig_pool(PLAIN, second)
    take.book.holdings["p"].outside = {"0": 60 * GiB}  # a foreign process on GPU 0
    assert take(pool="p", resources={"vram": 40 * GiB}).members == {"gpu": ("2",)}
    assert take(pool="p", resources={"vram": 40 * GiB}).members == {"gpu": ("2",)}
    denied = take(pool="p", resources={"vram": 40 * GiB})
    assert isinstance(denied, Denied)
    assert denied.details["resources"]["vram"]["available"] == 20 * GiB
    assert take(pool="p", resources={"vram": 20 * GiB}).members == {"gpu": ("0",)}


def test_outside_use_never_makes_free_memory_negative() -> None:
    take = mig_pool(PLAIN)
    take.book.holdings["p"].outside = {"0": 100 * GiB}
    denied = take(pool="p", resources={"vram": GiB})
    assert isinstance(denied, Denied)
    assert denied.details["resources"]["vram"]["available"] == 0


def test_outside_use_leaves_instances_and_whole_gpus_alone() -> None:
    take = mig_pool(PLAIN, MIG_GPU)
    take.book.holdings["p"].outside = {"0": 80 * GiB, "1-mig0": 10 * GiB}
    assert take(pool="p", resources={"vram": 5 * GiB}).members == {"gpu": ("1-mig0",)}
    assert take(pool="p", resources={"gpu": 1}).members == {"gpu": ("0",)}
