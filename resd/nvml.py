"""NVIDIA GPUs through NVML: the only module that imports ``pynvml`` (nvidia-ml-py).

Exposes the ``NvmlBackend`` protocol (``devices() -> list[GpuDevice]``) and two
backends: ``PynvmlBackend`` asks the driver, ``StaticBackend`` returns a fixed list
(tests, and the devices of a ``gpus_file`` read by ``load_gpus_file``).

What can fail: every failure of the vendor library (nvidia-ml-py not installed,
``libnvidia-ml.so`` missing, driver not loaded, no permission, any ``NVMLError``,
or a binding that misbehaves) leaves ``PynvmlBackend.devices()`` as one exception,
``NvmlUnavailable(reason)``; nothing else escapes. Facts a driver may not support
(NUMA node, MIG mode) become ``None`` / ``False`` instead of failing the device.
NVML is initialised and shut down inside each ``devices()`` call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, Protocol, final

import attrs

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
    "StaticBackend",
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
