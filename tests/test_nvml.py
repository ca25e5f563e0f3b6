"""resd.nvml against a fake ``pynvml``: an 8 × H100 box, a mixed workstation, old
bindings that return bytes, and every way NVML can be unavailable."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import structlog.testing

from resd import nvml
from resd.config import Config
from resd.discovery import discover
from resd.inventory import GpuDevice
from resd.nvml import (
    NvmlUnavailable,
    PynvmlBackend,
    StaticBackend,
    device_to_json,
    load_gpus_file,
    normalize_bus_id,
)

GiB = 1024**3


# ------------------------------------------------------------------ a fake pynvml


class NVMLError(Exception):
    """Shaped like pynvml's: the subclasses are what callers catch."""


class NVMLError_NotSupported(NVMLError):  # pynvml's names
    pass


class NVMLError_FunctionNotFound(NVMLError):
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    def __str__(self) -> str:
        return "Driver Not Loaded"


class NVMLError_LibraryNotFound(NVMLError):
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


class NVMLError_NoPermission(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    def __str__(self) -> str:
        return "GPU is lost"


class NVMLError_NotFound(NVMLError):  # an empty MIG slot
    pass


MAX_MIG = 7  # what nvmlDeviceGetMaxMigDeviceCount says of an A100 / H100 in MIG mode


@attrs.define
class FakeMig:
    """A MIG device: a handle of its own, with its memory and processes."""

    uuid: str
    name: str
    memory: int
    used: int = 0
    compute: list[tuple[int, int | None]] = attrs.Factory(list)
    graphics: list[tuple[int, int | None]] = attrs.Factory(list)
    broken: str = ""  # the name of a call that fails on this MIG device


@attrs.define
class FakeGpu:
    uuid: str
    name: str
    memory: int
    bus_id: str  # NVML's form, 8-digit domain, upper case
    numa: int | None = None  # None: nvmlDeviceGetNumaNodeId is not supported
    mig: bool | None = False  # None: nvmlDeviceGetMigMode is not supported
    broken: str = ""  # the name of a call that fails on this device
    #: its MIG slots (in MIG mode); None or past the end: an empty slot
    mig_devices: list[FakeMig | None] = attrs.Factory(list)


@attrs.define
class Memory:
    total: int
    free: int = 0
    used: int = 0


@attrs.define
class PciInfo:
    busId: Any  # pynvml's field name
    domain: int = 0


class FakeNvml:
    """What resd.nvml uses of nvidia-ml-py, over a list of FakeGpu."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_DEVICE_MIG_DISABLE = 0

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: Exception | None = None,
        as_bytes: bool = False,
        numa_function: bool = True,
        shutdown_error: Exception | None = None,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.as_bytes = as_bytes
        self.shutdown_error = shutdown_error
        self.calls: list[str] = []
        self.live = False
        if numa_function:
            self.nvmlDeviceGetNumaNodeId = self._numa

    def _out(self, text: str) -> Any:
        return text.encode() if self.as_bytes else text

    def _device(self, handle: Any, call: str) -> FakeGpu | FakeMig:
        """The GPU or MIG device behind ``handle`` (the calls both answer)."""
        assert self.live, f"{call} outside nvmlInit/nvmlShutdown"
        device: FakeGpu | FakeMig = handle
        if device.broken == call:
            raise NVMLError_GpuIsLost()
        return device

    def _gpu(self, handle: Any, call: str) -> FakeGpu:
        gpu = self._device(handle, call)
        assert isinstance(gpu, FakeGpu), f"{call} on a MIG device"
        return gpu

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error
        self.live = True

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")
        self.live = False
        if self.shutdown_error is not None:
            raise self.shutdown_error

    def nvmlDeviceGetCount(self) -> int:
        assert self.live
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        assert self.live
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: Any) -> Any:
        return self._out(self._device(handle, "uuid").uuid)

    def nvmlDeviceGetName(self, handle: Any) -> Any:
        return self._out(self._device(handle, "name").name)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Memory:
        device = self._device(handle, "memory")
        used = device.used if isinstance(device, FakeMig) else 0
        return Memory(device.memory, device.memory - used, used)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        return MAX_MIG if self._gpu(handle, "mig_count").mig else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, slot: int) -> FakeMig:
        slots = self._gpu(handle, "mig_handle").mig_devices
        mig = slots[slot] if slot < len(slots) else None
        if mig is None:
            raise NVMLError_NotFound()
        return mig

    def _running(self, handle: Any, kind: str) -> list[Any]:
        device = self._device(handle, "procs")
        found = getattr(device, kind) if isinstance(device, FakeMig) else []
        return [SimpleNamespace(pid=pid, usedGpuMemory=memory) for pid, memory in found]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        return self._running(handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        return self._running(handle, "graphics")

    def nvmlDeviceGetPciInfo(self, handle: Any) -> PciInfo:
        return PciInfo(self._out(self._gpu(handle, "pci").bus_id))

    def _numa(self, handle: Any) -> int:
        gpu = self._gpu(handle, "numa")
        if gpu.numa is None:
            raise NVMLError_NotSupported()
        return gpu.numa

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        gpu = self._gpu(handle, "mig")
        if gpu.mig is None:
            raise NVMLError_NotSupported()
        return [int(gpu.mig), int(gpu.mig)]


def h100_box() -> list[FakeGpu]:
    """8 × H100 80 GiB: four on each NUMA node; MIG enabled on GPU 3."""
    buses = ["18", "2A", "3A", "5D", "9A", "AB", "BA", "DB"]
    return [
        FakeGpu(
            uuid=f"GPU-{i:08x}-1111-2222-3333-44445555666{i}",
            name="NVIDIA H100 80GB HBM3",
            memory=80 * GiB,
            bus_id=f"00000000:{bus}:00.0",
            numa=0 if i < 4 else 1,
            mig=i == 3,
        )
        for i, bus in enumerate(buses)
    ]


def mixed_box() -> list[FakeGpu]:
    """A workstation: two 24 GiB cards of different models, neither supports MIG."""
    return [
        FakeGpu("GPU-aaaa", "NVIDIA GeForce RTX 4090", 24 * GiB, "00000000:01:00.0", None, None),
        FakeGpu("GPU-bbbb", "NVIDIA RTX A5000", 24 * GiB, "00000000:41:00.0", None, None),
    ]


def use(monkeypatch: pytest.MonkeyPatch, fake: FakeNvml | None) -> FakeNvml | None:
    monkeypatch.setattr(nvml, "pynvml", fake)
    return fake


# ------------------------------------------------------------------ the real backend's logic


def test_eight_h100s(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeNvml(h100_box())
    use(monkeypatch, fake)
    devices = PynvmlBackend(sys_root=tmp_path).devices()
    assert [d.index for d in devices] == list(range(8))
    assert {d.name for d in devices} == {"NVIDIA H100 80GB HBM3"}
    assert all(d.memory_total == 80 * GiB for d in devices)
    assert [d.numa_node for d in devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.mig for d in devices] == [False, False, False, True, False, False, False, False]
    assert devices[1].pci_bus_id == "0000:2a:00.0"
    assert devices[0] == GpuDevice(
        index=0,
        uuid="GPU-00000000-1111-2222-3333-444455556660",
        name="NVIDIA H100 80GB HBM3",
        memory_total=80 * GiB,
        numa_node=0,
        pci_bus_id="0000:18:00.0",
        mig=False,
    )
    assert fake.calls == ["init", "shutdown"]


def sysfs(root: Path, bus_id: str, node: str) -> None:
    path = root / "bus" / "pci" / "devices" / bus_id
    path.mkdir(parents=True)
    (path / "numa_node").write_text(f"{node}\n")


def test_mixed_box_old_bindings_bytes_and_sysfs_numa(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Old bindings: bytes everywhere, no nvmlDeviceGetNumaNodeId, no MIG support."""
    sysfs(tmp_path, "0000:01:00.0", "0")
    sysfs(tmp_path, "0000:41:00.0", "-1")  # a single-node machine says -1
    fake = FakeNvml(mixed_box(), as_bytes=True, numa_function=False)
    use(monkeypatch, fake)
    devices = PynvmlBackend(sys_root=tmp_path).devices()
    assert devices == [
        GpuDevice(0, "GPU-aaaa", "NVIDIA GeForce RTX 4090", 24 * GiB, 0, "0000:01:00.0", False),
        GpuDevice(1, "GPU-bbbb", "NVIDIA RTX A5000", 24 * GiB, None, "0000:41:00.0", False),
    ]
    assert all(isinstance(d.uuid, str) and isinstance(d.name, str) for d in devices)
    assert fake.calls == ["init", "shutdown"]


def test_numa_not_supported_falls_back_to_sysfs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sysfs(tmp_path, "0000:01:00.0", "1")
    use(monkeypatch, FakeNvml(mixed_box()))  # GetNumaNodeId raises NotSupported
    devices = PynvmlBackend(sys_root=tmp_path).devices()
    assert [d.numa_node for d in devices] == [1, None]  # no sysfs entry for the second


def test_any_numa_error_falls_back_to_sysfs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The NUMA node is optional: an NVML error there never costs the device."""
    sysfs(tmp_path, "0000:3a:00.0", "0")
    gpus = h100_box()
    gpus[2].broken = "numa"
    use(monkeypatch, FakeNvml(gpus))
    devices = PynvmlBackend(sys_root=tmp_path).devices()
    assert [d.numa_node for d in devices] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (NVMLError_DriverNotLoaded(), "driver is not loaded"),
        (NVMLError_LibraryNotFound(), "libnvidia-ml.so not found"),
        (NVMLError_NoPermission(), "no permission"),
        (OSError("libnvidia-ml.so.1: cannot open shared object file"), "cannot open"),
    ],
)
def test_init_failure_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, error: Exception, words: str
) -> None:
    fake = FakeNvml(h100_box(), init_error=error)
    use(monkeypatch, fake)
    with pytest.raises(NvmlUnavailable) as info:
        PynvmlBackend().devices()
    assert words in info.value.reason
    assert info.value.reason.startswith("nvmlInit")
    assert fake.calls == ["init"]  # nothing to shut down


def test_failure_on_a_device_is_unavailable_and_shuts_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = h100_box()
    gpus[5].broken = "memory"
    fake = FakeNvml(gpus)
    use(monkeypatch, fake)
    with pytest.raises(NvmlUnavailable, match="GPU 5: GPU is lost"):
        PynvmlBackend().devices()
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize("call", ["uuid", "name", "pci", "mig"])
def test_any_call_failing_is_unavailable(monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    gpus = h100_box()
    gpus[2].broken = call
    fake = FakeNvml(gpus)
    use(monkeypatch, fake)
    with pytest.raises(NvmlUnavailable, match="GPU 2"):
        PynvmlBackend().devices()
    assert fake.calls[-1] == "shutdown"


def test_a_stray_exception_from_the_binding_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(h100_box())
    fake.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(TypeError("bad binding"))  # type: ignore[method-assign]
    use(monkeypatch, fake)
    with pytest.raises(NvmlUnavailable, match="bad binding"):
        PynvmlBackend().devices()
    assert fake.calls == ["init", "shutdown"]


def test_shutdown_failure_does_not_lose_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(mixed_box(), shutdown_error=NVMLError_GpuIsLost())
    use(monkeypatch, fake)
    assert len(PynvmlBackend().devices()) == 2
    assert fake.calls == ["init", "shutdown"]


def test_binding_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, None)
    with pytest.raises(NvmlUnavailable, match="not installed"):
        PynvmlBackend().devices()


def test_zero_devices_is_an_empty_list(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([])
    use(monkeypatch, fake)
    assert PynvmlBackend().devices() == []
    assert fake.calls == ["init", "shutdown"]


# ------------------------------------------------------------------ through discovery


def config(tmp_path: Path, **changes: Any) -> Config:
    return Config(state_dir=str(tmp_path / "state"), network_limit="1Gbps", **changes)


def test_discovery_uses_the_real_backend_by_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use(monkeypatch, FakeNvml(h100_box()))
    inventory = discover(config(tmp_path))
    assert len(inventory.gpus) == 8
    assert inventory.gpu_source == "detected"
    assert inventory.gpu_unavailable == ""


def test_discovery_without_nvml_has_no_gpus_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeNvml(h100_box(), init_error=NVMLError_DriverNotLoaded())
    use(monkeypatch, fake)
    with structlog.testing.capture_logs() as logs:
        inventory = discover(config(tmp_path))
    assert inventory.gpus == ()
    assert "driver is not loaded" in inventory.gpu_unavailable
    nvml_lines = [line for line in logs if "nvml" in line["event"]]
    assert len(nvml_lines) == 1
    assert nvml_lines[0]["log_level"] == "info"
    assert "driver is not loaded" in nvml_lines[0]["reason"]
    assert not [line for line in logs if line["log_level"] in ("warning", "error")]
    assert {f.resource for f in inventory.figures} >= {"cpu", "memory", "disk", "disk_io"}


def test_gpus_file_wins_over_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeNvml(h100_box())
    use(monkeypatch, fake)
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([device_to_json(d) for d in H100_STATIC[:2]]))
    inventory = discover(config(tmp_path, gpus_file=str(path)))
    assert inventory.gpus == H100_STATIC[:2]
    assert inventory.gpu_source == "configured"
    assert fake.calls == []  # NVML was not asked


# ------------------------------------------------------------------ static backend and file

H100_STATIC = tuple(
    GpuDevice(i, f"GPU-{i}", "NVIDIA H100 80GB HBM3", 80 * GiB, i // 4, f"0000:{i + 16:02x}:00.0")
    for i in range(8)
)


def test_static_backend_returns_its_devices() -> None:
    backend = StaticBackend(list(H100_STATIC))
    assert backend.devices() == list(H100_STATIC)
    backend.devices().clear()
    assert len(backend.devices()) == 8


def test_gpus_file_round_trip(tmp_path: Path) -> None:
    devices = [*H100_STATIC[:3], attrs.evolve(H100_STATIC[3], mig=True, numa_node=None)]
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([device_to_json(d) for d in devices]))
    assert load_gpus_file(path) == devices
    # what `resd detect --json` prints is accepted as it is
    path.write_text(json.dumps({"gpus": [device_to_json(d) for d in devices], "x": 1}))
    assert load_gpus_file(path) == devices


def test_gpus_file_sizes_defaults_and_order(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(
        json.dumps(
            [
                {"index": 1, "uuid": "GPU-b", "name": "NVIDIA RTX A5000", "memory": "24GiB"},
                {
                    "index": 0,
                    "uuid": "GPU-a",
                    "name": "NVIDIA GeForce RTX 4090",
                    "memory": "24G",
                    "numa": 0,
                    "pci_bus_id": "00000000:01:00.0",
                    "mig": False,
                },
            ]
        )
    )
    assert load_gpus_file(path) == [
        GpuDevice(0, "GPU-a", "NVIDIA GeForce RTX 4090", 24 * GiB, 0, "0000:01:00.0", False),
        GpuDevice(1, "GPU-b", "NVIDIA RTX A5000", 24 * GiB, None, "", False),
    ]


GOOD = {"index": 0, "uuid": "GPU-a", "name": "H100", "memory": "80G"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{**GOOD, "memory": "80X"}], r"entry 0: field 'memory': '80X' is not a size"),
        ([{**GOOD, "memory": "81920"}], r"entry 0: field 'memory': '81920' has no unit"),
        ([{**GOOD, "memory": 0}], r"field 'memory': 0 is not a positive number of bytes"),
        ([{**GOOD, "memory": None}], r"field 'memory'"),
        ([{k: v for k, v in GOOD.items() if k != "uuid"}], r"entry 0: field 'uuid': missing"),
        ([GOOD, {**GOOD, "index": True}], r"entry 1: field 'index': True is not a whole"),
        ([GOOD, {**GOOD, "index": -1}], r"entry 1: field 'index'"),
        ([GOOD, {**GOOD, "uuid": "GPU-b"}], r"entry 1: field 'index': 0 repeats entry 0"),
        ([GOOD, {**GOOD, "index": 1}], r"entry 1: field 'uuid': 'GPU-a' repeats entry 0"),
        ([{**GOOD, "name": ""}], r"field 'name'"),
        ([{**GOOD, "numa": -1}], r"field 'numa': -1 is not a NUMA node"),
        ([{**GOOD, "mig": "yes"}], r"field 'mig': 'yes' is not true or false"),
        ([{**GOOD, "pci_bus_id": 3}], r"field 'pci_bus_id'"),
        ([{**GOOD, "vram": "80G"}], r"field 'vram': unknown field; allowed: index"),
        ([GOOD, "GPU-b"], r"entry 1: expected an object"),
        ({"index": 0}, r"expected a JSON list of GPUs"),
    ],
)
def test_gpus_file_errors_name_entry_and_field(
    tmp_path: Path, entries: object, message: str
) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message) as info:
        load_gpus_file(path)
    assert str(path) in str(info.value)


def test_gpus_file_unreadable_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_gpus_file(tmp_path / "absent.json")
    path = tmp_path / "gpus.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_gpus_file(path)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("00000000:2A:00.0", "0000:2a:00.0"),
        ("0000:2a:00.0", "0000:2a:00.0"),
        ("00000001:C1:00.1", "0001:c1:00.1"),
        (" 0000:18:00.0 ", "0000:18:00.0"),
        ("", ""),
        ("not a bus", "not a bus"),
    ],
)
def test_normalize_bus_id(raw: str, normal: str) -> None:
    assert normalize_bus_id(raw) == normal
