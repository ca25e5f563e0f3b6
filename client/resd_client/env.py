"""The environment a worker gets for a reservation (pure; standard library only).

``lease_env(info)`` maps a granted ``ReservationInfo`` to environment variables,
for ``Lease.env`` / ``Lease.environment()`` and for ``resctl run``:

======================================  ======================================
``RESD_RESERVATION_ID``                 the reservation id (``r-…``)
``RESD_POOL``                           the pool it was granted in
``RESD_TENANT``                         the tenant that holds it
``RESD_EXPIRES_AT``                     unix seconds it expires at (only with
                                        a ttl)
``RESD_GPUS``                           GPU member names, comma-separated
                                        (``""``: none)
``CUDA_VISIBLE_DEVICES``                the GPUs' indices (``devices[i]["index"]``,
                                        else the member name) or, with
                                        ``gpu_ids="uuid"``, their UUIDs
                                        (``devices[i]["uuid"]``, else the index);
                                        a MIG instance always by its ``MIG-…``
                                        uuid, the only name CUDA takes for it;
                                        ``""`` when no GPU was reserved, so that a
                                        CUDA program sees none rather than all
``CUDA_DEVICE_ORDER``                   ``PCI_BUS_ID`` when a GPU is given by
                                        index: resd's indices are NVML's
                                        (nvidia-smi's), which follow the PCI bus;
                                        CUDA's own default order may differ
``RESD_VRAM_BYTES``                     the VRAM slice, in bytes (only with
                                        ``vram``)
``RESD_VRAM_FRACTION``                  the slice's share of the GPU's memory
                                        (``vram`` ÷ the ``memory`` label), rounded
                                        down to 3 decimals (at least ``0.001``):
                                        ``"0.25"``; for any framework, and read by
                                        ``resd_client.limit_torch()``
``XLA_CLIENT_MEM_FRACTION``             the same number, the cap JAX reads
``XLA_PYTHON_CLIENT_MEM_FRACTION``      (its older name, for JAX before the
                                        rename)
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``    only with enforcement ``mps``: the slice
                                        per visible device in whole MiB, rounded
                                        down: ``"0=20480M"`` (device = CUDA
                                        ordinal, 0 for the first visible GPU)
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``   only with enforcement ``mps``: the share,
                                        rounded up to a whole percent (1–100)
``RESD_CPU``                            CPU cores as a decimal (``"1.5"``)
``RESD_MEMORY_BYTES``                   memory in bytes
``RESD_<NAME>``                         any other resource's amount in its
                                        internal unit (bytes, bytes/s or a count)
``RESD_<NAME>_VALUES``                  a range resource's values:
                                        ``30000-30009,30020``
``RESD_<NAME>_MEMBERS``                 a set resource's (other than ``gpu``)
                                        member names
======================================  ======================================

The fixed names win over a custom resource whose ``RESD_<NAME>`` would collide.

The GPU caps are the ``mps`` and ``framework`` levels of the enforcement ladder
(SPEC §10). The framework caps are set for every VRAM slice, whatever
``info.enforcement`` says, because a cap a stronger level already enforces costs
nothing; whole GPUs get none, nor does a slice whose device has no ``memory``
label (an older daemon), since its share is unknown. ``PYTORCH_CUDA_ALLOC_CONF`` is
left alone: none of its options caps memory (``resd_client.limit_torch`` does).
``XLA_PYTHON_CLIENT_PREALLOCATE`` is left alone too: JAX's allocator keeps to the
fraction whether it preallocates it or grows into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction
from math import ceil, floor
from typing import Final, Literal

from resd_client.protocol import ReservationInfo

GpuIds = Literal["index", "uuid"]
GPU_IDS: Final[tuple[str, ...]] = ("index", "uuid")

GPU: Final = "gpu"
VRAM: Final = "vram"
CPU: Final = "cpu"
MEMORY: Final = "memory"

MIB: Final = 1 << 20
#: what holds ``vram_fraction``: resd's own name, and JAX's (both spellings: newer
#: JAX reads ``XLA_CLIENT_MEM_FRACTION``, older only the ``XLA_PYTHON_CLIENT_`` one)
FRACTION_KEYS: Final = (
    "RESD_VRAM_FRACTION",
    "XLA_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
)
#: the ``mig`` label of a member that is a MIG instance (not a whole GPU)
MIG_INSTANCE: Final = "instance"


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


def _gpu_labels(info: ReservationInfo) -> list[tuple[str, dict[str, str]]]:
    """Each GPU member's name and labels (``{}`` when unknown), in member (CUDA) order."""
    by_name = {d.get("name", ""): d for d in info.devices}
    return [(name, by_name.get(name, {})) for name in info.members.get(GPU, [])]


def _cuda_id(name: str, labels: dict[str, str], kind: GpuIds) -> str:
    index = labels.get("index") or name
    if labels.get("mig") == MIG_INSTANCE or kind == "uuid":
        return labels.get("uuid") or index
    return index


def gpu_ids(info: ReservationInfo, kind: GpuIds = "index") -> list[str]:
    """The reserved GPUs as CUDA_VISIBLE_DEVICES wants them, in member order.

    A MIG instance is named by its uuid whatever ``kind`` is: CUDA takes MIG
    devices by uuid only. Raises ``ValueError`` for an unknown ``kind``.
    """
    if kind not in GPU_IDS:
        raise ValueError(f"gpu_ids must be one of {', '.join(GPU_IDS)}, got {kind!r}")
    return [_cuda_id(name, labels, kind) for name, labels in _gpu_labels(info)]


def vram_share(info: ReservationInfo) -> Fraction | None:
    """The VRAM slice's share of its GPU's memory (at most 1), or None: whole GPUs,
    or a device without a ``memory`` label (an older daemon), or no GPU at all.

    Over several devices, the largest one's memory decides: the smallest share,
    so that a cap from it stays within the slice on every device.
    """
    vram = info.resources.get(VRAM)
    labels = [labels for _, labels in _gpu_labels(info)]
    if not vram or not labels:
        return None
    try:
        memory = max(int(label["memory"]) for label in labels)
    except (KeyError, ValueError):
        return None
    return min(Fraction(vram, memory), Fraction(1)) if memory > 0 else None


def vram_fraction(info: ReservationInfo) -> float | None:
    """``vram_share`` rounded down to 3 decimals, at least 0.001 (a fraction of 0
    would forbid every allocation), as ``RESD_VRAM_FRACTION`` holds it."""
    share = vram_share(info)
    return None if share is None else max(1, floor(share * 1000)) / 1000


def _gpu_caps(info: ReservationInfo) -> dict[str, str]:
    """The ``mps`` and ``framework`` caps of a VRAM slice (see the module doc)."""
    share = vram_share(info)
    fraction = vram_fraction(info)
    env = {key: str(fraction) for key in FRACTION_KEYS} if fraction is not None else {}
    vram = info.resources.get(VRAM)
    gpus = info.members.get(GPU, [])
    if info.enforcement == "mps" and vram and gpus:
        limit = f"{max(1, vram // MIB)}M"
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(f"{i}={limit}" for i in range(len(gpus)))
        if share is not None:  # 0 < share <= 1, so 1..100
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(ceil(share * 100))
    return env


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
    env.update(_gpu_caps(info))
    env["RESD_GPUS"] = ",".join(info.members.get(GPU, []))
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids(info, gpu_ids_as))
    if gpu_ids_as == "index" and any(
        labels.get("mig") != MIG_INSTANCE for _, labels in _gpu_labels(info)
    ):
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if info.expires_at is not None:
        env["RESD_EXPIRES_AT"] = f"{info.expires_at:.3f}"
    env["RESD_RESERVATION_ID"] = info.id
    env["RESD_POOL"] = info.pool
    env["RESD_TENANT"] = info.tenant
    return env


__all__ = [
    "GPU_IDS",
    "GpuIds",
    "assigned",
    "cores",
    "gpu_ids",
    "lease_env",
    "render_values",
    "vram_fraction",
    "vram_share",
]
