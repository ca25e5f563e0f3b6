"""What the GPUs really hold, sample by sample (SPEC §10): plain frozen values that
the NVML backends return and the reconciler will read. Nothing here touches NVML."""

from __future__ import annotations

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
