"""NVIDIA GPUs through NVML: the only module that imports ``pynvml`` (nvidia-ml-py).

Exposes the ``NvmlBackend`` protocol (``devices() -> list[GpuDevice]`` at discovery,
``sample() -> list[GpuSample]`` for what the GPUs hold now) and three backends:
``PynvmlBackend`` asks the driver, ``StaticBackend`` returns a fixed list (the devices
of a ``gpus_file`` read by ``load_gpus_file``; nothing in use), and
``ScriptedBackend`` plays scripted per-process usage timelines, so that everything
built on samples is tested without a GPU.

What can fail: every failure of the vendor library (nvidia-ml-py not installed,
``libnvidia-ml.so`` missing, driver not loaded, no permission, any ``NVMLError``,
or a binding that misbehaves) leaves ``PynvmlBackend.devices()`` as one exception,
``NvmlUnavailable(reason)``; nothing else escapes. Facts a driver may not support
(NUMA node, MIG mode) become ``None`` / ``False`` instead of failing the device.
NVML is initialised and shut down inside each ``devices()`` call; ``sample()``, called
every few seconds, keeps it initialised between calls and starts again after a
failure. A device whose utilization or process list the driver does not support gets
``None`` / no processes rather than failing the sample.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, Protocol, final

import attrs

from resd.gpu_usage import GpuProcess, GpuSample
from resd.inventory import GpuDevice
from resd_client.quantity import parse_quantity

try:
    import pynvml
except ImportError:  # a dependency, but a broken install must mean "no GPUs", not a crash
    pynvml = None

__all__ = [
    "NvmlBackend",
    "NvmlUnavailable",
    "PynvmlBackend",
    "ScriptedBackend",
    "StaticBackend",
    "Usage",
    "device_to_json",
    "load_gpus_file",
    "normalize_bus_id",
]


class NvmlUnavailable(Exception):
    """NVML cannot list GPUs here; ``reason`` says why (for one log line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NvmlBackend(Protocol):
    def devices(self) -> list[GpuDevice]:
        """The host's GPUs in index order; raises NvmlUnavailable and nothing else."""
        ...

    def sample(self) -> list[GpuSample]:
        """What each GPU holds now, in index order; raises NvmlUnavailable and nothing else."""
        ...


# NVML error classes (by name, so any binding version or a test double maps the same).
_FRIENDLY: Final[dict[str, str]] = {
    "NVMLError_LibraryNotFound": "libnvidia-ml.so not found (no NVIDIA driver installed)",
    "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded",
    "NVMLError_NoPermission": "no permission to query the NVIDIA driver",
    "NVMLError_InsufficientPermissions": "no permission to query the NVIDIA driver",
    "NVMLError_Uninitialized": "NVML is not initialised",
}
_OPTIONAL_ERRORS: Final = frozenset({"NVMLError_NotSupported", "NVMLError_FunctionNotFound"})
_BUS_ID: Final = re.compile(r"^([0-9a-f]{1,8}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


def _reason(stage: str, exc: BaseException) -> str:
    name = type(exc).__name__
    detail = _FRIENDLY.get(name) or str(exc) or name
    return f"{stage}: {detail}"


def _text(value: object) -> str:
    """Old bindings return ``bytes`` where new ones return ``str``."""
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode("utf-8", "replace")
    return str(value)


def normalize_bus_id(bus_id: str) -> str:
    """NVML's ``00000000:17:00.0`` → the kernel's ``0000:17:00.0`` (lower case).

    Anything that is not a PCI address is returned stripped and lower-cased.
    """
    text = bus_id.strip().lower()
    match = _BUS_ID.match(text)
    if not match:
        return text
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):04x}:{bus}:{device}.{function}"


@final
class PynvmlBackend:
    """The GPUs the NVIDIA driver reports, through nvidia-ml-py.

    ``sys_root`` is where sysfs is mounted: the NUMA node is read from
    ``<sys_root>/bus/pci/devices/<bus id>/numa_node`` when NVML cannot tell it.
    """

    def __init__(self, sys_root: Path = Path("/sys")) -> None:
        self.sys_root = sys_root
        self._sampling = False  # NVML is initialised for sample()

    def devices(self) -> list[GpuDevice]:
        """Init NVML, describe every device, shut NVML down (always, once init worked).

        Raises NvmlUnavailable for any failure of the library or the driver.
        """
        lib: Any = pynvml
        if lib is None:
            raise NvmlUnavailable("nvidia-ml-py (pynvml) is not installed")
        try:
            lib.nvmlInit()
        except Exception as exc:  # any NVMLError, OSError from ctypes: all mean "no NVML"
            raise NvmlUnavailable(_reason("nvmlInit", exc)) from None
        stage = "nvmlDeviceGetCount"
        try:
            count = int(lib.nvmlDeviceGetCount())
            found = []
            for index in range(count):
                stage = f"GPU {index}"
                found.append(self._device(lib, index))
            return found
        except Exception as exc:  # the vendor boundary: nothing but NvmlUnavailable leaves
            raise NvmlUnavailable(_reason(stage, exc)) from None
        finally:
            try:
                lib.nvmlShutdown()
            except Exception:  # shutting down cannot change what was found
                pass

    def _device(self, lib: Any, index: int) -> GpuDevice:
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        pci = lib.nvmlDeviceGetPciInfo(handle)
        raw_bus = getattr(pci, "busId", None) or getattr(pci, "busIdLegacy", "")
        bus_id = normalize_bus_id(_text(raw_bus))
        return GpuDevice(
            index=index,
            uuid=_text(lib.nvmlDeviceGetUUID(handle)),
            name=_text(lib.nvmlDeviceGetName(handle)),
            memory_total=int(lib.nvmlDeviceGetMemoryInfo(handle).total),
            numa_node=self._numa_node(lib, handle, bus_id),
            pci_bus_id=bus_id,
            mig=self._mig(lib, handle),
        )

    def sample(self) -> list[GpuSample]:
        """Memory, utilization and processes of every device. NVML stays initialised
        between calls (a sample every few seconds); after any failure it is shut down
        and initialised again at the next call. Raises NvmlUnavailable and nothing else.
        """
        lib: Any = pynvml
        if lib is None:
            raise NvmlUnavailable("nvidia-ml-py (pynvml) is not installed")
        if not self._sampling:
            try:
                lib.nvmlInit()
            except Exception as exc:  # any NVMLError, OSError from ctypes: all mean "no NVML"
                raise NvmlUnavailable(_reason("nvmlInit", exc)) from None
            self._sampling = True
        stage = "nvmlDeviceGetCount"
        try:
            samples = []
            for index in range(int(lib.nvmlDeviceGetCount())):
                stage = f"GPU {index}"
                samples.append(self._sample(lib, index))
            return samples
        except Exception as exc:  # the vendor boundary: nothing but NvmlUnavailable leaves
            self.close()
            raise NvmlUnavailable(_reason(stage, exc)) from None

    def close(self) -> None:
        """Shut NVML down if ``sample`` left it initialised."""
        if self._sampling:
            self._sampling = False
            try:
                pynvml.nvmlShutdown()
            except Exception:  # nothing to do about it
                pass

    def _sample(self, lib: Any, index: int) -> GpuSample:
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        memory = lib.nvmlDeviceGetMemoryInfo(handle)
        return GpuSample(
            index=index,
            uuid=_text(lib.nvmlDeviceGetUUID(handle)),
            memory_total=int(memory.total),
            memory_used=int(memory.used),
            utilization=self._utilization(lib, handle),
            processes=self._processes(lib, handle),
        )

    @staticmethod
    def _utilization(lib: Any, handle: object) -> int | None:
        try:
            return int(lib.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:
            if type(exc).__name__ in _OPTIONAL_ERRORS:
                return None
            raise

    @staticmethod
    def _processes(lib: Any, handle: object) -> tuple[GpuProcess, ...]:
        """Compute and graphics processes, one entry per pid (a process in both lists
        counts once, with the larger figure)."""
        used: dict[int, int | None] = {}
        for name in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            get = getattr(lib, name, None)
            if get is None:
                continue
            try:
                found = get(handle)
            except Exception as exc:
                if type(exc).__name__ in _OPTIONAL_ERRORS:
                    continue
                raise
            for proc in found:
                memory = getattr(proc, "usedGpuMemory", None)
                memory = None if memory is None or memory >= 1 << 63 else int(memory)
                pid = int(proc.pid)
                before = used.get(pid)
                used[pid] = memory if before is None else max(before, memory or 0)
        return tuple(GpuProcess(pid, memory) for pid, memory in sorted(used.items()))

    def _numa_node(self, lib: Any, handle: object, bus_id: str) -> int | None:
        get = getattr(lib, "nvmlDeviceGetNumaNodeId", None)
        if get is not None:
            try:
                node = int(get(handle))
            except Exception as exc:
                if not _is_nvml_error(lib, exc):
                    raise
            else:
                if node >= 0:
                    return node
        return self._sysfs_numa_node(bus_id)

    def _sysfs_numa_node(self, bus_id: str) -> int | None:
        if not _BUS_ID.match(bus_id):
            return None
        try:
            node = int(
                (self.sys_root / "bus" / "pci" / "devices" / bus_id / "numa_node").read_text()
            )
        except (OSError, ValueError):
            return None
        return node if node >= 0 else None

    @staticmethod
    def _mig(lib: Any, handle: object) -> bool:
        get = getattr(lib, "nvmlDeviceGetMigMode", None)
        if get is None:  # bindings older than MIG
            return False
        try:
            current, _pending = get(handle)
        except Exception as exc:
            if type(exc).__name__ in _OPTIONAL_ERRORS:
                return False
            raise
        return bool(current == getattr(lib, "NVML_DEVICE_MIG_ENABLE", 1))


def _is_nvml_error(lib: Any, exc: Exception) -> bool:
    base = getattr(lib, "NVMLError", None)
    return isinstance(base, type) and isinstance(exc, base)


def _device_tuple(devices: Iterable[GpuDevice]) -> tuple[GpuDevice, ...]:
    return tuple(devices)


@final
@attrs.frozen
class StaticBackend:
    """A backend that returns fixed devices: tests, and the devices of a ``gpus_file``."""

    fixed: tuple[GpuDevice, ...] = attrs.field(converter=_device_tuple)

    def devices(self) -> list[GpuDevice]:
        return list(self.fixed)

    def sample(self) -> list[GpuSample]:
        """Configured GPUs cannot be asked: nothing is seen in use."""
        return [_idle(d) for d in self.fixed]


def _idle(device: GpuDevice) -> GpuSample:
    return GpuSample(device.index, device.uuid, device.memory_total, 0, 0)


@attrs.frozen
class Usage:
    """One step of a scripted timeline: from ``at`` (seconds on the backend's clock)
    device ``device`` shows these ``processes`` (pid → bytes), ``utilization``
    percent, and ``other`` bytes used by nobody listed (a driver's own, say)."""

    at: float
    device: int
    processes: dict[int, int] = attrs.Factory(dict)
    utilization: int = 0
    other: int = 0


def _usage_tuple(steps: Iterable[Usage]) -> tuple[Usage, ...]:
    return tuple(sorted(steps, key=lambda u: u.at))


@final
@attrs.define
class ScriptedBackend:
    """Fixed devices whose usage follows a script: each device shows its latest step
    whose ``at`` has come (on ``clock``), idle before its first. A test drives the
    clock (trio's, usually) and the reconciler sees the timeline unfold."""

    fixed: tuple[GpuDevice, ...] = attrs.field(converter=_device_tuple)
    script: tuple[Usage, ...] = attrs.field(converter=_usage_tuple, default=())
    clock: Callable[[], float] = lambda: 0.0
    #: a reason to raise NvmlUnavailable with (a driver that went away), or ""
    failing: str = ""

    def devices(self) -> list[GpuDevice]:
        return list(self.fixed)

    def sample(self) -> list[GpuSample]:
        if self.failing:
            raise NvmlUnavailable(self.failing)
        now = self.clock()
        samples = []
        for device in self.fixed:
            steps = [u for u in self.script if u.device == device.index and u.at <= now]
            if not steps:
                samples.append(_idle(device))
                continue
            step = steps[-1]
            samples.append(
                GpuSample(
                    index=device.index,
                    uuid=device.uuid,
                    memory_total=device.memory_total,
                    memory_used=min(device.memory_total, sum(step.processes.values()) + step.other),
                    utilization=step.utilization,
                    processes=tuple(GpuProcess(p, m) for p, m in sorted(step.processes.items())),
                )
            )
        return samples


# ------------------------------------------------------------------ the GPU file

_FIELDS: Final = ("index", "uuid", "name", "memory", "numa", "pci_bus_id", "mig")
_REQUIRED: Final = ("index", "uuid", "name", "memory")


def device_to_json(device: GpuDevice) -> dict[str, Any]:
    """The JSON form ``load_gpus_file`` reads (memory in bytes)."""
    return {
        "index": device.index,
        "uuid": device.uuid,
        "name": device.name,
        "memory": device.memory_total,
        "numa": device.numa_node,
        "pci_bus_id": device.pci_bus_id,
        "mig": device.mig,
    }


def load_gpus_file(path: Path) -> list[GpuDevice]:
    """Read a JSON list of GPUs (or ``{"gpus": [...]}``, as ``resd detect --json`` prints).

    Each entry: ``index`` (int >= 0), ``uuid``, ``name``, ``memory`` (bytes as a JSON
    number, or a size string like ``"80G"``) required; ``numa`` (int or null),
    ``pci_bus_id`` and ``mig`` (bool) optional. Returns the devices sorted by index.

    Raises ValueError naming the file, the entry and the field.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and "gpus" in data:
        data = data["gpus"]
    if not isinstance(data, list):
        raise ValueError(f'{path}: expected a JSON list of GPUs (or {{"gpus": [...]}})')
    devices = [_entry(path, pos, entry) for pos, entry in enumerate(data)]
    for attr, label in (("index", "index"), ("uuid", "uuid")):
        seen: dict[object, int] = {}
        for pos, device in enumerate(devices):
            value = getattr(device, attr)
            if value in seen:
                raise ValueError(
                    f"{path}: entry {pos}: field '{label}': {value!r} repeats entry {seen[value]}"
                )
            seen[value] = pos
    return sorted(devices, key=lambda d: d.index)


def _entry(path: Path, pos: int, entry: object) -> GpuDevice:
    where = f"{path}: entry {pos}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(_REQUIRED)}")

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"{where}: field '{field}': {problem}")

    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise bad(unknown[0], f"unknown field; allowed: {', '.join(_FIELDS)}")
    for field in _REQUIRED:
        if field not in entry:
            raise bad(field, "missing")
    index = entry["index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise bad("index", f"{index!r} is not a whole number >= 0")
    for field in ("uuid", "name"):
        if not isinstance(entry[field], str) or not entry[field].strip():
            raise bad(field, f"{entry[field]!r} is not a non-empty string")
    numa = entry.get("numa")
    if numa is not None and (isinstance(numa, bool) or not isinstance(numa, int) or numa < 0):
        raise bad("numa", f"{numa!r} is not a NUMA node (a whole number >= 0, or null)")
    bus = entry.get("pci_bus_id", "")
    if not isinstance(bus, str):
        raise bad("pci_bus_id", f"{bus!r} is not a string like '0000:17:00.0'")
    mig = entry.get("mig", False)
    if not isinstance(mig, bool):
        raise bad("mig", f"{mig!r} is not true or false")
    return GpuDevice(
        index=index,
        uuid=entry["uuid"].strip(),
        name=entry["name"].strip(),
        memory_total=_memory(entry["memory"], bad),
        numa_node=numa,
        pci_bus_id=normalize_bus_id(bus),
        mig=mig,
    )


def _memory(raw: object, bad: Callable[[str, str], ValueError]) -> int:
    hint = 'use bytes as a JSON number (85899345920) or a size string like "80G"'
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw <= 0:
            raise bad("memory", f"{raw} is not a positive number of bytes")
        return raw
    if not isinstance(raw, str):
        raise bad("memory", f"{raw!r} is not a size; {hint}")
    if raw.strip().isdigit():  # a bare number string would mean MiB elsewhere in resd
        raise bad("memory", f"{raw!r} has no unit; {hint}")
    try:
        return parse_quantity("vram", raw)
    except Exception:
        raise bad("memory", f"{raw!r} is not a size; {hint}") from None
