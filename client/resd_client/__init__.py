"""Python client of resd; imports with only the standard library and msgpack.

``Client`` and ``Lease`` are the synchronous client (``resd_client._sync``).
``Part`` and ``GangPart`` are the two ways to give one part of a gang to
``reserve_gang`` (a ``protocol.Part`` in internal units, or a dict in the
quantities of ``reserve``).
``Disconnected`` and ``Reconnected`` are the notices every client puts among its
``events()`` while it reconnects after resd restarted; ``ConnectionLost`` (an
``UnavailableError``) is what a change whose reply was lost that way raises.
``TrioClient`` (``resd_client.trio.Client``) and ``AsyncioClient``
(``resd_client.asyncio.Client``) are the async clients; they are imported on first
use, so that ``import resd_client`` never imports trio or asyncio's client. The
errors and their codes are those of ``resd_client.errors``. ``limit_torch``
(``resd_client.frameworks``) applies a VRAM slice as PyTorch's memory fraction; it
imports torch only when called.
"""

from typing import TYPE_CHECKING, Any

from resd_client._core import ConnectionLost, Disconnected, GangPart, Reconnected
from resd_client._sync import Client, Lease
from resd_client._version import __version__
from resd_client.errors import (
    ConflictError,
    ErrorCode,
    ExistsError,
    ForbiddenError,
    InsufficientError,
    InternalError,
    InvalidError,
    NotFoundError,
    PreemptedError,
    QuotaExceededError,
    ResdError,
    TimeoutError_,
    UnavailableError,
    UnsupportedVersionError,
)
from resd_client.frameworks import limit_torch
from resd_client.protocol import Part

if TYPE_CHECKING:
    from resd_client.asyncio import AsyncioClient
    from resd_client.trio import TrioClient

_LAZY = {"TrioClient": "resd_client.trio", "AsyncioClient": "resd_client.asyncio"}


def __getattr__(name: str) -> Any:
    """``TrioClient`` and ``AsyncioClient``, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'resd_client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AsyncioClient",
    "Client",
    "ConflictError",
    "ConnectionLost",
    "Disconnected",
    "ErrorCode",
    "ExistsError",
    "ForbiddenError",
    "GangPart",
    "InsufficientError",
    "InternalError",
    "InvalidError",
    "Lease",
    "NotFoundError",
    "Part",
    "PreemptedError",
    "QuotaExceededError",
    "Reconnected",
    "ResdError",
    "TimeoutError_",
    "TrioClient",
    "UnavailableError",
    "UnsupportedVersionError",
    "__version__",
    "limit_torch",
]
