"""Python client of resd; imports with only the standard library and msgpack."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("resd")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

from resd_client._sync import Client, Lease
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

__all__ = [
    "Client",
    "ConflictError",
    "ErrorCode",
    "ExistsError",
    "ForbiddenError",
    "InsufficientError",
    "InternalError",
    "InvalidError",
    "Lease",
    "NotFoundError",
    "PreemptedError",
    "QuotaExceededError",
    "ResdError",
    "TimeoutError_",
    "UnavailableError",
    "UnsupportedVersionError",
    "__version__",
]
