"""What host discovery found: plain frozen values, shared by discovery, the daemon
and ``resd detect``. Discovery fills them; nothing here touches the machine."""

from __future__ import annotations

from typing import Literal

import attrs

Source = Literal["detected", "configured"]


@attrs.frozen
class Figure:
    """One scalar capacity of the host, in internal units (see resd_client.quantity)."""

    resource: str
    capacity: int
    source: Source
    #: where the figure came from, for people: "/proc/cpuinfo", "eth0 (default route)", ...
    detail: str = ""


@attrs.frozen
class MigInstance:
    """A MIG device of a GPU in MIG mode: a hardware-isolated slice that CUDA sees as
    a GPU of its own (by ``uuid``, ``MIG-...``). ``index`` is its MIG device index
    within the parent; ``profile`` the instance profile (``1g.10gb``) or ""."""

    uuid: str
    memory_total: int  # bytes
    profile: str = ""
    index: int = 0


@attrs.frozen
class GpuDevice:
    """One GPU as NVML (or a configured GPU file) describes it. In MIG mode its work
    runs only in ``mig_instances`` (none listed: it cannot run work at all)."""

    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    numa_node: int | None = None
    pci_bus_id: str = ""
    mig: bool = False
    mig_instances: tuple[MigInstance, ...] = ()


@attrs.frozen
class HostInventory:
    figures: tuple[Figure, ...]
    gpus: tuple[GpuDevice, ...] = ()
    gpu_source: Source = "detected"
    #: why NVML listed no GPUs ("" when it answered, or GPUs came from a file)
    gpu_unavailable: str = ""

    def figure(self, resource: str) -> Figure | None:
        return next((f for f in self.figures if f.resource == resource), None)
