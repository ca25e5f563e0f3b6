"""The environment a worker gets for a reservation (pure; standard library only).

``lease_env(info)`` maps a granted ``ReservationInfo`` to environment variables,
for ``Lease.env`` / ``Lease.environment()`` and for ``resctl run``:

=========================  ===================================================
``RESD_RESERVATION_ID``    the reservation id (``r-…``)
``RESD_POOL``              the pool it was granted in
``RESD_TENANT``            the tenant that holds it
``RESD_EXPIRES_AT``        unix seconds it expires at (only with a ttl)
``RESD_GPUS``              GPU member names, comma-separated (``""``: none)
``CUDA_VISIBLE_DEVICES``   the GPUs' indices (``devices[i]["index"]``, else the
                           member name) or, with ``gpu_ids="uuid"``, their
                           UUIDs (``devices[i]["uuid"]``, else the index);
                           ``""`` when no GPU was reserved, so that a CUDA
                           program sees none rather than all
``CUDA_DEVICE_ORDER``      ``PCI_BUS_ID`` when GPUs are given by index: resd's
                           indices are NVML's (nvidia-smi's), which follow the
                           PCI bus; CUDA's own default order may differ
``RESD_VRAM_BYTES``        the VRAM slice, in bytes (only with ``vram``)
``RESD_CPU``               CPU cores as a decimal (``"1.5"``)
``RESD_MEMORY_BYTES``      memory in bytes
``RESD_<NAME>``            any other resource's amount in its internal unit
                           (bytes, bytes/s or a count)
``RESD_<NAME>_VALUES``     a range resource's values: ``30000-30009,30020``
``RESD_<NAME>_MEMBERS``    a set resource's (other than ``gpu``) member names
=========================  ===================================================

The fixed names win over a custom resource whose ``RESD_<NAME>`` would collide.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Final, Literal

from resd_client.protocol import ReservationInfo

GpuIds = Literal["index", "uuid"]
GPU_IDS: Final[tuple[str, ...]] = ("index", "uuid")

GPU: Final = "gpu"
VRAM: Final = "vram"
CPU: Final = "cpu"
MEMORY: Final = "memory"


def cores(millicores: int) -> str:
    """``1500`` → ``"1.5"``, ``4000`` → ``"4"``, ``1`` → ``"0.001"`` (never an exponent)."""
    text = format(Decimal(millicores) / 1000, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def render_values(intervals: Sequence[Sequence[int]]) -> str:
    """``[[30000, 30009], [30020, 30020]]`` → ``"30000-30009,30020"``."""
    return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in intervals)


def assigned(info: ReservationInfo) -> dict[str, list[str] | list[list[int]]]:
    """What was assigned: set member names and range intervals, by resource."""
    out: dict[str, list[str] | list[list[int]]] = {}
    for name, names in info.members.items():
        out[name] = list(names)
    for name, intervals in info.values.items():
        out[name] = [[lo, hi] for lo, hi in intervals]
    return out


def gpu_ids(info: ReservationInfo, kind: GpuIds = "index") -> list[str]:
    """The reserved GPUs as CUDA_VISIBLE_DEVICES wants them, in member order."""
    if kind not in GPU_IDS:
        raise ValueError(f"gpu_ids must be one of {', '.join(GPU_IDS)}, got {kind!r}")
    by_name = {d.get("name", ""): d for d in info.devices}
    out = []
    for name in info.members.get(GPU, []):
        labels = by_name.get(name, {})
        index = labels.get("index") or name
        out.append((labels.get("uuid") or index) if kind == "uuid" else index)
    return out


def lease_env(info: ReservationInfo, gpu_ids_as: GpuIds = "index") -> dict[str, str]:
    """Environment variables for a worker running on ``info`` (see the module doc)."""
    env: dict[str, str] = {}
    counted = {**info.resources}
    for name, names in info.members.items():
        counted.setdefault(name, len(names))
    for name, intervals in info.values.items():
        counted.setdefault(name, sum(hi - lo + 1 for lo, hi in intervals))
    for name, amount in sorted(counted.items()):
        if name in (GPU, VRAM, CPU, MEMORY):
            continue
        key = f"RESD_{name.upper()}"
        env[key] = str(amount)
        if name in info.values:
            env[f"{key}_VALUES"] = render_values(info.values[name])
        elif name in info.members:
            env[f"{key}_MEMBERS"] = ",".join(info.members[name])
    if CPU in info.resources:
        env["RESD_CPU"] = cores(info.resources[CPU])
    if MEMORY in info.resources:
        env["RESD_MEMORY_BYTES"] = str(info.resources[MEMORY])
    if VRAM in info.resources:
        env["RESD_VRAM_BYTES"] = str(info.resources[VRAM])
    env["RESD_GPUS"] = ",".join(info.members.get(GPU, []))
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids(info, gpu_ids_as))
    if gpu_ids_as == "index" and info.members.get(GPU):
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if info.expires_at is not None:
        env["RESD_EXPIRES_AT"] = f"{info.expires_at:.3f}"
    env["RESD_RESERVATION_ID"] = info.id
    env["RESD_POOL"] = info.pool
    env["RESD_TENANT"] = info.tenant
    return env


__all__ = ["GPU_IDS", "GpuIds", "assigned", "cores", "gpu_ids", "lease_env", "render_values"]
