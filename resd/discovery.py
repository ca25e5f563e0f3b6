"""What this host has: CPUs, memory, disk, network, disk I/O and GPUs (SPEC §2–§3).

The source of the first ``host`` pool and of ``resd detect``; the model is hypeman's
resources package. Each figure is measured where the machine can tell
(``detected``) or taken from the configuration (``configured``):

- ``cpu``: ``processor`` lines of ``/proc/cpuinfo`` (else ``os.cpu_count()``), in
  millicores;
- ``memory``: ``MemTotal`` of ``/proc/meminfo``;
- ``disk``: ``disk_limit``, else ``statvfs`` of the state directory;
- ``net``: ``network_limit``, else the link speed of the default route's NIC (else
  the fastest NIC that is up); left out when no link reports a speed;
- ``disk_io``: ``disk_io_limit`` (always configured, as hypeman);
- GPUs: the devices of ``gpus_file``, else NVML (``resd.nvml``). NVML being
  unavailable means no GPUs and one info log line, never an error;
- NUMA nodes' CPU lists (``numa_cpus``): ``/sys/devices/system/node/node<N>/cpulist``,
  read at each ``resources`` request rather than at start, so CPUs brought online
  later are seen. They are what ``resctl export --format slurm`` writes as a GPU's
  ``Cores=``.

This module owns ``psutil``; ``resd.nvml`` owns NVML. A figure that cannot be found
is left out rather than guessed. Bad configured values raise ConfigError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import psutil
import structlog

from resd.config import Config, ConfigError, check_limit
from resd.inventory import Figure, GpuDevice, HostInventory, Source
from resd.nvml import (
    NvmlBackend,
    NvmlUnavailable,
    PynvmlBackend,
    StaticBackend,
    device_to_json,
    load_gpus_file,
)
from resd_client.errors import InvalidError
from resd_client.protocol import CPU_LIST
from resd_client.quantity import parse_quantity, render_quantity

__all__ = ["LinkStat", "describe", "discover", "host_pool_resources", "numa_cpus"]

log = structlog.get_logger("resd.discovery")

_PROCESSOR: Final = re.compile(r"^processor\s*:", re.MULTILINE)
_MEMTOTAL: Final = re.compile(r"^MemTotal:\s*(\d+)\s*kB", re.MULTILINE)
_RTF_UP: Final = 0x1
_NODE_DIR: Final = re.compile(r"node(\d+)")


class LinkStat(Protocol):
    """What discovery needs of ``psutil.net_if_stats()`` values."""

    @property
    def isup(self) -> bool: ...

    @property
    def speed(self) -> int: ...  # Mbit/s; 0 when the driver does not say


def _psutil_links() -> Mapping[str, LinkStat]:
    try:
        return psutil.net_if_stats()  # type: ignore[no-any-return]
    except OSError:
        return {}


def discover(
    config: Config,
    backend: NvmlBackend | None = None,
    proc_root: Path = Path("/proc"),
    *,
    links: Callable[[], Mapping[str, LinkStat]] = _psutil_links,
) -> HostInventory:
    """Measure the host. ``backend`` defaults to the real NVML backend; ``gpus_file``
    in ``config`` overrides both. ``links`` stands in for ``psutil.net_if_stats``.

    Raises ConfigError for a bad ``disk_limit``, ``network_limit``,
    ``disk_io_limit`` or ``gpus_file``; NVML failures only mean no GPUs.
    """
    figures = [_cpu(proc_root), _memory(proc_root), _disk(config)]
    net = _net(config, proc_root, links)
    if net is not None:
        figures.append(net)
    try:
        disk_io = parse_quantity("disk_io", config.disk_io_limit)
    except InvalidError as exc:
        raise ConfigError(f"disk_io_limit: {exc}") from None
    figures.append(Figure("disk_io", disk_io, "configured", "disk_io_limit"))
    gpus, gpu_source, unavailable = _gpus(config, backend)
    inventory = HostInventory(tuple(figures), gpus, gpu_source, unavailable)
    log.info(
        "host_discovered",
        figures={
            f.resource: f"{render_quantity(f.resource, f.capacity)} ({f.source}: {f.detail})"
            for f in inventory.figures
        },
        gpus=len(gpus),
        gpu_source=gpu_source,
    )
    return inventory


def _cpu(proc_root: Path) -> Figure:
    path = proc_root / "cpuinfo"
    try:
        count = len(_PROCESSOR.findall(path.read_text(errors="replace")))
    except OSError:
        count = 0
    if count:
        return Figure("cpu", count * 1000, "detected", f"{path} ({count} processors)")
    count = os.cpu_count() or 1
    return Figure("cpu", count * 1000, "detected", f"os.cpu_count() ({count})")


def _memory(proc_root: Path) -> Figure:
    path = proc_root / "meminfo"
    try:
        match = _MEMTOTAL.search(path.read_text(errors="replace"))
    except OSError:
        match = None
    if match:
        return Figure("memory", int(match.group(1)) * 1024, "detected", f"{path} MemTotal")
    return Figure("memory", int(psutil.virtual_memory().total), "detected", "psutil")


def _disk(config: Config) -> Figure:
    limit = check_limit("disk_limit", "disk", config.disk_limit)
    if limit is not None:
        return Figure("disk", limit, "configured", "disk_limit")
    probe = config.state_path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return Figure("disk", st.f_blocks * st.f_frsize, "detected", f"statvfs {probe}")


def _net(
    config: Config, proc_root: Path, links: Callable[[], Mapping[str, LinkStat]]
) -> Figure | None:
    limit = check_limit("network_limit", "net", config.network_limit)
    if limit is not None:
        return Figure("net", limit, "configured", "network_limit")
    stats = links()
    for nic in _default_route_nics(proc_root):
        stat = stats.get(nic)
        if stat is not None and stat.isup and stat.speed > 0:
            return Figure("net", _mbps(stat.speed), "detected", f"{nic} (default route)")
    candidates = [
        (stat.speed, nic)
        for nic, stat in stats.items()
        if stat.isup and stat.speed > 0 and not _loopback(nic, stat)
    ]
    if not candidates:
        log.info("network_speed_unknown", detail="no link reports a speed; set network_limit")
        return None
    speed, nic = max(candidates)
    return Figure("net", _mbps(speed), "detected", f"{nic} (fastest link)")


def _mbps(speed: int) -> int:
    return speed * 1_000_000 // 8


def _loopback(nic: str, stat: LinkStat) -> bool:
    return nic == "lo" or "loopback" in str(getattr(stat, "flags", ""))


def _default_route_nics(proc_root: Path) -> list[str]:
    """NICs of the IPv4 default routes that are up, lowest metric first."""
    try:
        lines = (proc_root / "net" / "route").read_text(errors="replace").splitlines()
    except OSError:
        return []
    routes: list[tuple[int, str]] = []
    # Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        try:
            up, metric = int(fields[3], 16) & _RTF_UP, int(fields[6])
        except ValueError:
            continue
        if up:
            routes.append((metric, fields[0]))
    return [nic for _metric, nic in sorted(routes)]


def _gpus(config: Config, backend: NvmlBackend | None) -> tuple[tuple[GpuDevice, ...], Source, str]:
    source: Source = "detected"
    if config.gpus_file:
        try:
            backend = StaticBackend(load_gpus_file(Path(config.gpus_file)))
        except ValueError as exc:
            raise ConfigError(f"gpus_file: {exc}") from None
        source = "configured"
    try:
        devices = (backend or PynvmlBackend()).devices()
    except NvmlUnavailable as exc:
        log.info("nvml_unavailable", reason=exc.reason, detail="no GPUs in the host inventory")
        return (), source, exc.reason
    return tuple(devices), source, ""


def numa_cpus(sys_root: Path = Path("/sys")) -> dict[str, str]:
    """NUMA node → the CPUs on it, in the kernel's cpulist form (``{"0": "0-27,56-83"}``).

    A node whose list cannot be read, is empty (a memory-only node) or is not in
    cpulist form is left out, and a host without NUMA information gives ``{}``:
    callers omit what is unknown rather than guess. Never raises.
    """
    try:
        entries = list((sys_root / "devices" / "system" / "node").iterdir())
    except OSError:
        return {}
    found: dict[int, str] = {}
    for entry in entries:
        match = _NODE_DIR.fullmatch(entry.name)
        if match is None:
            continue
        try:
            cpus = (entry / "cpulist").read_text().strip()
        except OSError:
            continue
        if CPU_LIST.fullmatch(cpus):
            found[int(match.group(1))] = cpus
    return {str(node): found[node] for node in sorted(found)}


def host_pool_resources(
    inventory: HostInventory, oversub: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """The ``resources`` of the ``host`` pool: ``{name: {capacity, ratio, source}}``.

    Ratios come from ``oversub`` (hypeman's defaults in the config), 1.0 for others.
    GPUs become the ``gpu`` set (see ``gpu_members``). A set is never oversubscribed.
    """
    resources: dict[str, dict[str, Any]] = {
        f.resource: {
            "capacity": f.capacity,
            "ratio": oversub.get(f.resource, 1.0),
            "source": f.source,
        }
        for f in inventory.figures
    }
    members = [m for g in inventory.gpus for m in gpu_members(g)]
    if members:  # a set needs members: MIG GPUs without instances offer none
        resources["gpu"] = {"kind": "set", "source": inventory.gpu_source, "members": members}
    return resources


def gpu_members(gpu: GpuDevice) -> list[dict[str, Any]]:
    """A GPU as members of the ``gpu`` set (labels that ``resctl run`` turns into env).

    A plain GPU is one member named by its index, its memory the capacity (so
    ``vram`` slices can be reserved), labelled with uuid, model, NUMA node, PCI bus
    id and MIG mode. A GPU in MIG mode runs work only in its MIG instances, so each
    instance is a member instead: named ``<index>-mig<MIG device index>`` (member
    names cannot hold "/"), its memory the capacity, labelled like its parent plus
    ``mig=instance``, its own ``uuid``, ``parent`` (the GPU's index) and ``profile``.
    A GPU in MIG mode without instances offers nothing (logged).
    """
    labels = {
        "index": str(gpu.index),
        "uuid": gpu.uuid,
        "model": gpu.name,
        "numa": "" if gpu.numa_node is None else str(gpu.numa_node),
        "pci_bus": gpu.pci_bus_id,
        "mig": "on" if gpu.mig else "off",
    }
    if not gpu.mig:
        return [{"name": str(gpu.index), "capacity": gpu.memory_total, "labels": labels}]
    if not gpu.mig_instances:
        log.warning(
            "mig_gpu_without_instances",
            gpu=gpu.index,
            uuid=gpu.uuid,
            detail="a GPU in MIG mode runs work only in MIG instances; create some",
        )
    return [
        {
            "name": f"{gpu.index}-mig{m.index}",
            "capacity": m.memory_total,
            "labels": {
                **labels,
                "mig": "instance",
                "uuid": m.uuid,
                "parent": str(gpu.index),
                "profile": m.profile,
            },
        }
        for m in gpu.mig_instances
    ]


def describe(inventory: HostInventory, oversub: Mapping[str, float]) -> dict[str, Any]:
    """What ``resd detect --json`` prints: each resource's capacity, source, ratio and
    effective limit (capacity × ratio, rounded down, as the pool computes it), and
    the GPUs in the form ``gpus_file`` reads."""
    details = {f.resource: f.detail for f in inventory.figures}
    details["gpu"] = "gpus_file" if inventory.gpu_source == "configured" else "NVML"
    resources = {}
    for name, spec in host_pool_resources(inventory, oversub).items():
        capacity = spec.get("capacity", len(spec.get("members", ())))  # a set counts members
        ratio = spec.get("ratio", 1.0)
        resources[name] = {
            "capacity": capacity,
            "source": spec["source"],
            "oversub_ratio": ratio,
            "effective_limit": int(capacity * ratio),
            "detail": details.get(name, ""),
        }
    return {
        "resources": resources,
        "gpus": [device_to_json(d) for d in inventory.gpus],
        "gpu_source": inventory.gpu_source,
        "gpu_unavailable": inventory.gpu_unavailable,
    }
