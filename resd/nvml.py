"""NVIDIA GPUs through NVML: the only module that imports ``pynvml`` (nvidia-ml-py).

Exposes the ``NvmlBackend`` protocol (``devices() -> list[GpuDevice]`` at discovery,
``sample() -> list[GpuSample]`` for what the GPUs hold now) and four backends:
``PynvmlBackend`` asks the driver, ``StaticBackend`` returns a fixed list (the devices
of a ``gpus_file`` read by ``load_gpus_file``; nothing in use), ``FileBackend``
re-reads a GPU file at every sample (live use that a test or another agent writes),
and ``ScriptedBackend`` plays scripted per-process usage timelines, so that
everything built on samples is tested without a GPU.

MIG: a GPU in MIG mode lists its MIG devices as ``GpuDevice.mig_instances``, and
``sample()`` reports one ``GpuSample`` per MIG instance instead of the GPU (its
``uuid`` the instance's, ``index`` the parent's, ``utilization`` None: NVML does not
measure instances); a GPU in MIG mode with no instances is not sampled at all.

The GPU file (``load_gpus_file``, ``FileBackend``) is a JSON list of objects (or
``{"gpus": [...]}``, as ``resd detect --json`` prints), one per GPU:

- ``index`` (int >= 0), ``uuid``, ``name``, ``memory`` (bytes as a JSON number, or a
  size string like ``"80G"``): required;
- ``numa`` (int or null), ``pci_bus_id``, ``mig`` (bool): optional;
- ``mig_instances`` (only with ``"mig": true``): a list of objects with ``uuid``,
  ``memory``, and optionally ``profile`` (``"1g.10gb"``) and ``index`` (the MIG
  device index; default: the position in the list);
- live use, read by ``FileBackend.sample`` (and checked by ``load_gpus_file``):
  ``processes`` (an object pid string → bytes or size string), ``used`` (bytes or
  size string; default: the sum of ``processes``) and ``utilization`` (0-100 or
  null). A GPU in MIG mode gives ``processes`` and ``used`` per instance instead.

What can fail: every failure of the vendor library (nvidia-ml-py not installed,
``libnvidia-ml.so`` missing, driver not loaded, no permission, any ``NVMLError``,
or a binding that misbehaves) leaves ``PynvmlBackend.devices()`` as one exception,
``NvmlUnavailable(reason)``; nothing else escapes. Facts a driver may not support
(NUMA node, MIG mode, MIG devices, a MIG profile name) become ``None`` / ``False`` /
none / ``""`` instead of failing the device; an empty MIG slot is normal.
NVML is initialised and shut down inside each ``devices()`` call; ``sample()``, called
every few seconds, keeps it initialised between calls and starts again after a
failure. A device whose utilization or process list the driver does not support gets
``None`` / no processes rather than failing the sample. ``FileBackend`` turns a
missing, unreadable or bad file into ``NvmlUnavailable`` too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, Protocol, final

import attrs

from resd.gpu_usage import GpuProcess, GpuSample
from resd.inventory import GpuDevice, MigInstance
from resd_client.quantity import parse_quantity

try:
    import pynvml
except ImportError:  # a dependency, but a broken install must mean "no GPUs", not a crash
    pynvml = None

__all__ = [
    "FileBackend",
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
_EMPTY_SLOT: Final = _OPTIONAL_ERRORS | {"NVMLError_NotFound"}  # no MIG device there
#: "NVIDIA H100 80GB HBM3 MIG 1g.10gb" (also "1c.3g.40gb", "1g.10gb+me")
_PROFILE: Final = re.compile(r"\bMIG\s+(\d+[cg]\.[\w.+-]+)\s*$")
_BUS_ID: Final = re.compile(r"^([0-9a-f]{1,8}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


def _reason(stage: str, exc: BaseException) -> str:
    name = type(exc).__name__
    detail = _FRIENDLY.get(name) or str(exc) or name
    return f"{stage}: {detail}"


def _optional(lib: Any, name: str, *args: object, absent: frozenset[str] = _OPTIONAL_ERRORS) -> Any:
    """``lib.<name>(*args)``, or None when the binding lacks the call or the driver
    answers with one of the ``absent`` errors; any other failure propagates."""
    call = getattr(lib, name, None)
    if call is None:
        return None
    try:
        return call(*args)
    except Exception as exc:
        if type(exc).__name__ in absent:
            return None
        raise


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
        mig = self._mig(lib, handle)
        return GpuDevice(
            index=index,
            uuid=_text(lib.nvmlDeviceGetUUID(handle)),
            name=_text(lib.nvmlDeviceGetName(handle)),
            memory_total=int(lib.nvmlDeviceGetMemoryInfo(handle).total),
            numa_node=self._numa_node(lib, handle, bus_id),
            pci_bus_id=bus_id,
            mig=mig,
            mig_instances=self._instances(lib, handle) if mig else (),
        )

    @staticmethod
    def _instances(lib: Any, handle: object) -> tuple[MigInstance, ...]:
        return tuple(
            MigInstance(
                uuid=_text(lib.nvmlDeviceGetUUID(mig)),
                memory_total=int(lib.nvmlDeviceGetMemoryInfo(mig).total),
                profile=_profile(lib, mig),
                index=slot,
            )
            for slot, mig in _mig_handles(lib, handle)
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
                samples.extend(self._samples(lib, index))
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

    def _samples(self, lib: Any, index: int) -> list[GpuSample]:
        """The GPU, or in MIG mode each of its MIG instances (no utilization: NVML
        does not measure instances)."""
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        if self._mig(lib, handle):
            return [
                self._sample(lib, index, mig, utilization=None)
                for _slot, mig in _mig_handles(lib, handle)
            ]
        return [self._sample(lib, index, handle, self._utilization(lib, handle))]

    def _sample(self, lib: Any, index: int, handle: object, utilization: int | None) -> GpuSample:
        memory = lib.nvmlDeviceGetMemoryInfo(handle)
        return GpuSample(
            index=index,
            uuid=_text(lib.nvmlDeviceGetUUID(handle)),
            memory_total=int(memory.total),
            memory_used=int(memory.used),
            utilization=utilization,
            processes=self._processes(lib, handle),
        )

    @staticmethod
    def _utilization(lib: Any, handle: object) -> int | None:
        rates = _optional(lib, "nvmlDeviceGetUtilizationRates", handle)
        return None if rates is None else int(rates.gpu)

    @staticmethod
    def _processes(lib: Any, handle: object) -> tuple[GpuProcess, ...]:
        """Compute and graphics processes, one entry per pid (a process in both lists
        counts once, with the larger figure)."""
        used: dict[int, int | None] = {}
        for name in (
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
        ):
            for proc in _optional(lib, name, handle) or ():
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
        mode = _optional(lib, "nvmlDeviceGetMigMode", handle)  # None: bindings older than MIG
        if mode is None:
            return False
        current, _pending = mode
        return bool(current == getattr(lib, "NVML_DEVICE_MIG_ENABLE", 1))


def _mig_handles(lib: Any, handle: object) -> list[tuple[int, object]]:
    """(MIG device index, handle) of each MIG device of a GPU in MIG mode; empty slots
    are skipped, and a binding or driver without the MIG calls has none."""
    slots = _optional(lib, "nvmlDeviceGetMaxMigDeviceCount", handle) or 0
    found = []
    for slot in range(int(slots)):
        mig = _optional(
            lib, "nvmlDeviceGetMigDeviceHandleByIndex", handle, slot, absent=_EMPTY_SLOT
        )
        if mig is not None:
            found.append((slot, mig))
    return found


def _profile(lib: Any, mig: object) -> str:
    """The profile in a MIG device's name ("... MIG 1g.10gb" → "1g.10gb"), or "" when
    the name does not say or cannot be read (it only labels the member)."""
    try:
        name = _text(lib.nvmlDeviceGetName(mig))
    except Exception as exc:
        if not _is_nvml_error(lib, exc):
            raise
        return ""
    match = _PROFILE.search(name)
    return match.group(1) if match else ""


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

_LIVE: Final = ("used", "utilization", "processes")
_FIELDS: Final = (
    *("index", "uuid", "name", "memory", "numa", "pci_bus_id", "mig", "mig_instances"),
    *_LIVE,
)
_REQUIRED: Final = ("index", "uuid", "name", "memory")
_MIG_FIELDS: Final = ("uuid", "memory", "profile", "index", "used", "processes")
_MIG_REQUIRED: Final = ("uuid", "memory")
_PID: Final = re.compile(r"^[1-9][0-9]{0,9}$")
_SIZE_HINT: Final = 'use bytes as a JSON number (85899345920) or a size string like "80G"'

#: (field, problem) → the ValueError that names the file, the entry and the field
Bad = Callable[[str, str], ValueError]


def device_to_json(device: GpuDevice) -> dict[str, Any]:
    """The JSON form ``load_gpus_file`` reads (memory in bytes; no live use)."""
    return {
        "index": device.index,
        "uuid": device.uuid,
        "name": device.name,
        "memory": device.memory_total,
        "numa": device.numa_node,
        "pci_bus_id": device.pci_bus_id,
        "mig": device.mig,
        "mig_instances": [
            {"index": m.index, "uuid": m.uuid, "memory": m.memory_total, "profile": m.profile}
            for m in device.mig_instances
        ],
    }


def load_gpus_file(path: Path) -> list[GpuDevice]:
    """Read a JSON list of GPUs (or ``{"gpus": [...]}``, as ``resd detect --json`` prints).

    Each entry: ``index`` (int >= 0), ``uuid``, ``name``, ``memory`` (bytes as a JSON
    number, or a size string like ``"80G"``) required; ``numa`` (int or null),
    ``pci_bus_id``, ``mig`` (bool) and ``mig_instances`` (with ``"mig": true``: objects
    with ``uuid``, ``memory``, optional ``profile`` and ``index``) optional. The live
    fields ``processes`` (pid string → bytes or size), ``used`` (bytes or size; default
    the sum of ``processes``) and ``utilization`` (0-100 or null), per GPU or, in MIG
    mode, per instance (no ``utilization`` there), are checked here and read by
    ``FileBackend.sample``. Returns the devices sorted by index.

    Raises ValueError naming the file, the entry and the field.
    """
    return [entry.device for entry in _read(path)]


@attrs.frozen
class _Live:
    """The live fields of one file entry (a GPU, or a MIG instance)."""

    used: int | None = None  # None: the sum of the processes
    utilization: int | None = None
    processes: tuple[GpuProcess, ...] = ()

    def sample(self, index: int, uuid: str, total: int) -> GpuSample:
        used = sum(p.used_memory or 0 for p in self.processes) if self.used is None else self.used
        return GpuSample(index, uuid, total, used, self.utilization, self.processes)


@attrs.frozen
class _Entry:
    """One GPU of the file and its live use (per MIG instance, in MIG mode)."""

    device: GpuDevice
    live: _Live
    instances: tuple[_Live, ...] = ()  # in the order of device.mig_instances

    def samples(self) -> list[GpuSample]:
        """As the real backend samples: the GPU, or each of its MIG instances."""
        d = self.device
        if not d.mig:
            return [self.live.sample(d.index, d.uuid, d.memory_total)]
        return [
            live.sample(d.index, m.uuid, m.memory_total)
            for m, live in zip(d.mig_instances, self.instances, strict=True)
        ]


@final
@attrs.frozen
class FileBackend:
    """GPUs and what they hold, as a GPU file says (format in the module docstring),
    re-read at every call: an end-to-end test scripts per-process use by replacing
    the file (atomically, by rename), and a host whose GPUs another agent measures
    feeds resd the same way. A missing, unreadable or bad file raises NvmlUnavailable
    naming the file, the entry and the field, like a driver that went away."""

    path: Path = attrs.field(converter=Path)

    def devices(self) -> list[GpuDevice]:
        return [entry.device for entry in self._read()]

    def sample(self) -> list[GpuSample]:
        return [sample for entry in self._read() for sample in entry.samples()]

    def _read(self) -> list[_Entry]:
        try:
            return _read(self.path)
        except ValueError as exc:
            raise NvmlUnavailable(str(exc)) from None


def _read(path: Path) -> list[_Entry]:
    """Parse and check the whole file (ValueError naming file, entry and field)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and "gpus" in data:
        data = data["gpus"]
    if not isinstance(data, list):
        raise ValueError(f'{path}: expected a JSON list of GPUs (or {{"gpus": [...]}})')
    entries = [_entry(path, pos, entry) for pos, entry in enumerate(data)]
    _check_unique(path, [entry.device for entry in entries])
    return sorted(entries, key=lambda entry: entry.device.index)


def _check_unique(path: Path, devices: list[GpuDevice]) -> None:
    """No GPU index twice; no uuid (of a GPU or a MIG instance) twice."""
    seen: dict[tuple[str, object], tuple[int, str]] = {}
    for pos, d in enumerate(devices):
        keys = [("index", d.index, "index"), ("uuid", d.uuid, "uuid")] + [
            ("uuid", m.uuid, f"mig_instances[{i}].uuid") for i, m in enumerate(d.mig_instances)
        ]
        for kind, value, field in keys:
            first, first_field = seen.setdefault((kind, value), (pos, field))
            if (first, first_field) != (pos, field):
                other = f"entry {first}" if first != pos else f"field '{first_field}'"
                raise ValueError(f"{path}: entry {pos}: field '{field}': {value!r} repeats {other}")


def _entry(path: Path, pos: int, entry: object) -> _Entry:
    where = f"{path}: entry {pos}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(_REQUIRED)}")

    def bad(field: str, problem: str) -> ValueError:
        return ValueError(f"{where}: field '{field}': {problem}")

    _check_fields(entry, _FIELDS, _REQUIRED, bad)
    index = _index(entry["index"], bad)
    numa = entry.get("numa")
    if numa is not None and (isinstance(numa, bool) or not isinstance(numa, int) or numa < 0):
        raise bad("numa", f"{numa!r} is not a NUMA node (a whole number >= 0, or null)")
    bus = entry.get("pci_bus_id", "")
    if not isinstance(bus, str):
        raise bad("pci_bus_id", f"{bus!r} is not a string like '0000:17:00.0'")
    mig = entry.get("mig", False)
    if not isinstance(mig, bool):
        raise bad("mig", f"{mig!r} is not true or false")
    memory = _size(entry["memory"], "memory", bad, least=1)
    if mig and (live := [f for f in _LIVE if f in entry]):
        raise bad(live[0], "a GPU in MIG mode is used through its instances (mig_instances)")
    instances = _instances(entry.get("mig_instances", []), mig, memory, bad)
    device = GpuDevice(
        index=index,
        uuid=_string(entry, "uuid", bad),
        name=_string(entry, "name", bad),
        memory_total=memory,
        numa_node=numa,
        pci_bus_id=normalize_bus_id(bus),
        mig=mig,
        mig_instances=tuple(m for m, _live in instances),
    )
    return _Entry(device, _live(entry, memory, bad), tuple(live for _m, live in instances))


def _instances(raw: object, mig: bool, memory: int, bad: Bad) -> list[tuple[MigInstance, _Live]]:
    if not isinstance(raw, list):
        raise bad("mig_instances", f"{raw!r} is not a list of MIG instances")
    if raw and not mig:
        raise bad("mig_instances", 'only a GPU in MIG mode ("mig": true) has MIG instances')
    found: list[tuple[MigInstance, _Live]] = []
    slots: dict[int, int] = {}
    for pos, item in enumerate(raw):
        field = f"mig_instances[{pos}]"
        if not isinstance(item, dict):
            raise bad(field, f"expected an object with {', '.join(_MIG_REQUIRED)}")
        inner = _within(bad, field)
        _check_fields(item, _MIG_FIELDS, _MIG_REQUIRED, inner)
        slot = _index(item.get("index", pos), inner)
        if slot in slots:
            raise inner("index", f"{slot} repeats mig_instances[{slots[slot]}]")
        slots[slot] = pos
        size = _size(item["memory"], "memory", inner, least=1)
        if size > memory:
            raise inner("memory", f"{size} bytes is more than the GPU's memory ({memory})")
        profile = item.get("profile", "")
        if not isinstance(profile, str):
            raise inner("profile", f"{profile!r} is not a string like '1g.10gb'")
        instance = MigInstance(_string(item, "uuid", inner), size, profile.strip(), slot)
        found.append((instance, _live(item, size, inner)))
    return found


def _live(entry: dict[str, Any], memory: int, bad: Bad) -> _Live:
    processes = _processes(entry.get("processes", {}), bad)
    used = entry.get("used")
    if used is not None:
        used = _size(used, "used", bad, least=0)
    utilization = entry.get("utilization")
    if utilization is not None and (
        isinstance(utilization, bool)
        or not isinstance(utilization, int)
        or not 0 <= utilization <= 100
    ):
        raise bad("utilization", f"{utilization!r} is not a percentage (0-100, or null)")
    in_use = sum(p.used_memory or 0 for p in processes) if used is None else used
    if in_use > memory:
        field = "processes" if used is None else "used"
        raise bad(field, f"{in_use} bytes in use is more than the memory ({memory})")
    return _Live(used, utilization, processes)


def _processes(raw: object, bad: Bad) -> tuple[GpuProcess, ...]:
    if not isinstance(raw, dict):
        raise bad("processes", f'{raw!r} is not an object of pid → bytes, like {{"4242": "20G"}}')
    found = []
    for pid, amount in raw.items():
        if not _PID.match(pid):
            raise bad("processes", f"{pid!r} is not a process id")
        found.append(GpuProcess(int(pid), _size(amount, f"processes.{pid}", bad, least=0)))
    return tuple(sorted(found, key=lambda p: p.pid))


def _within(bad: Bad, prefix: str) -> Bad:
    """Errors for the fields of a nested object: ``mig_instances[1].memory``."""
    return lambda field, problem: bad(f"{prefix}.{field}", problem)


def _check_fields(
    entry: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...], bad: Bad
) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise bad(unknown[0], f"unknown field; allowed: {', '.join(allowed)}")
    for field in required:
        if field not in entry:
            raise bad(field, "missing")


def _index(raw: object, bad: Bad) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise bad("index", f"{raw!r} is not a whole number >= 0")
    return raw


def _string(entry: dict[str, Any], field: str, bad: Bad) -> str:
    value = entry[field]
    if not isinstance(value, str) or not value.strip():
        raise bad(field, f"{value!r} is not a non-empty string")
    return value.strip()


def _size(raw: object, field: str, bad: Bad, *, least: int) -> int:
    """Bytes, as a JSON number or a size string ("80G"), at least ``least``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif not isinstance(raw, str):
        raise bad(field, f"{raw!r} is not a size; {_SIZE_HINT}")
    elif raw.strip().isdigit():  # a bare number string would mean MiB elsewhere in resd
        raise bad(field, f"{raw!r} has no unit; {_SIZE_HINT}")
    else:
        try:
            value = parse_quantity("vram", raw)
        except Exception:
            raise bad(field, f"{raw!r} is not a size; {_SIZE_HINT}") from None
    if value < least:
        kind = "a positive number of bytes" if least > 0 else "a number of bytes >= 0"
        raise bad(field, f"{raw} is not {kind}")
    return value
