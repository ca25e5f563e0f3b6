"""Applying a VRAM slice inside a framework: the ``framework`` enforcement level.

JAX reads its cap from the environment (``resd_client.env`` sets it); PyTorch has no
such variable, so ``limit_torch()`` applies the slice as PyTorch's per-process
memory fraction, in one line at the top of a training script::

    from resd_client import limit_torch

    limit_torch()  # under `resctl run --vram 20G`: reads RESD_VRAM_FRACTION

torch is imported only when ``limit_torch`` runs, so ``import resd_client`` never
needs it. PyTorch's caching allocator then fails an allocation past the fraction
with its usual out-of-memory error; memory outside that allocator (the CUDA context,
other libraries) is not counted, which is what the reconciler's over-use check is
for.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any, Final

from resd_client._core import LeaseState
from resd_client.env import gpu_ids, vram_fraction
from resd_client.protocol import ReservationInfo

FRACTION_ENV: Final = "RESD_VRAM_FRACTION"


def limit_torch(
    lease_or_info: LeaseState | ReservationInfo | None = None,
    environ: Mapping[str, str] = os.environ,
) -> float | None:
    """Cap PyTorch's CUDA memory on each visible device of the lease at its slice.

    With a lease (or its ``ReservationInfo``), the fraction is its ``vram`` ÷ its
    GPU's memory; this process must see the lease's GPUs as CUDA devices 0..n-1,
    i.e. run with the lease's ``CUDA_VISIBLE_DEVICES`` set before CUDA started,
    or the cap would land on other GPUs. With no argument, the fraction is
    ``RESD_VRAM_FRACTION`` (set by ``resctl run`` and ``lease.env``) and it applies
    to every visible device. Returns the fraction applied, or None when there is
    nothing to cap (whole GPUs, no slice, a daemon too old to report GPU memory):
    then torch is not touched.

    Raises ``ImportError`` without torch, ``RuntimeError`` when torch sees no CUDA
    device, fewer than the lease holds, or other GPUs than the lease's, and
    ``ValueError`` for a ``RESD_VRAM_FRACTION`` that is not a number in (0, 1].
    """
    if lease_or_info is None:
        fraction = _fraction_from(environ)
        count = None
    else:
        info = lease_or_info if isinstance(lease_or_info, ReservationInfo) else lease_or_info.info
        fraction = vram_fraction(info)
        count = len(info.members.get("gpu", []))
        if fraction is not None:
            _check_visible(info, environ)
    if fraction is None:
        return None
    cuda = _torch_cuda()
    visible = cuda.device_count()
    if count is not None and visible < count:
        raise RuntimeError(
            f"limit_torch: PyTorch sees {visible} CUDA devices, the lease holds {count}"
        )
    for device in range(visible if count is None else count):
        cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def _fraction_from(environ: Mapping[str, str]) -> float | None:
    text = environ.get(FRACTION_ENV, "")
    if not text:
        return None
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise ValueError(f"{FRACTION_ENV} must be a number in (0, 1], got {text!r}")
    return fraction


def _check_visible(info: ReservationInfo, environ: Mapping[str, str]) -> None:
    """The lease's GPUs must be this process's CUDA devices 0..n-1 (by index or uuid)."""
    seen = environ.get("CUDA_VISIBLE_DEVICES")
    wanted = {",".join(gpu_ids(info, "index")), ",".join(gpu_ids(info, "uuid"))}
    if seen not in wanted:
        raise RuntimeError(
            f"limit_torch: this process sees CUDA_VISIBLE_DEVICES={seen!r}, not the lease's "
            f"GPUs ({' or '.join(sorted(wanted))}); start it with lease.env or under resctl run"
        )


def _torch_cuda() -> Any:
    """``torch.cuda``, imported now; raises when torch or CUDA is missing."""
    try:
        torch = importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError("limit_torch needs PyTorch, which is not installed") from exc
    cuda: Any = torch.cuda
    if not cuda.is_available():
        raise RuntimeError("limit_torch: PyTorch sees no CUDA device (torch.cuda.is_available())")
    return cuda


__all__ = ["FRACTION_ENV", "limit_torch"]
