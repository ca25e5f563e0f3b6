"""Error codes, the exceptions that carry them, and the CLI exit codes they map to.

This is the one place where an error code is defined. The daemon raises these
exceptions inside its core; the protocol turns them into error replies; the client
turns error replies back into the same exception classes; ``resctl`` exits with
``exit_code``.

Hierarchy::

    ResdError                  (code, message, details)
    ├── InvalidError           invalid            exit 2
    ├── NotFoundError          not_found          exit 3
    ├── ExistsError            exists             exit 4
    ├── ConflictError          conflict           exit 5
    ├── InsufficientError      insufficient       exit 6
    ├── QuotaExceededError     quota_exceeded     exit 7
    ├── ForbiddenError         forbidden          exit 8
    ├── TimeoutError_          timeout            exit 9
    ├── PreemptedError         preempted          exit 10
    ├── UnsupportedVersionError unsupported_version exit 11
    ├── UnavailableError       unavailable        exit 12   (also: no daemon listening)
    └── InternalError          internal           exit 13
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Final


class ErrorCode(enum.StrEnum):
    """Stable error codes of the wire protocol (SPEC §1)."""

    INVALID = "invalid"
    NOT_FOUND = "not_found"
    EXISTS = "exists"
    CONFLICT = "conflict"
    INSUFFICIENT = "insufficient"
    QUOTA_EXCEEDED = "quota_exceeded"
    FORBIDDEN = "forbidden"
    TIMEOUT = "timeout"
    PREEMPTED = "preempted"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ResdError(Exception):
    """Base of every error resd reports; carries a code, a message and details."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    exit_code: ClassVar[int] = 13

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_wire(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"


class InvalidError(ResdError):
    code = ErrorCode.INVALID
    exit_code = 2


class NotFoundError(ResdError):
    code = ErrorCode.NOT_FOUND
    exit_code = 3


class ExistsError(ResdError):
    code = ErrorCode.EXISTS
    exit_code = 4


class ConflictError(ResdError):
    code = ErrorCode.CONFLICT
    exit_code = 5


class InsufficientError(ResdError):
    """Details: ``{"resources": {name: {"requested", "available", "shortfall"}}}``."""

    code = ErrorCode.INSUFFICIENT
    exit_code = 6


class QuotaExceededError(ResdError):
    code = ErrorCode.QUOTA_EXCEEDED
    exit_code = 7


class ForbiddenError(ResdError):
    code = ErrorCode.FORBIDDEN
    exit_code = 8


class TimeoutError_(ResdError):
    code = ErrorCode.TIMEOUT
    exit_code = 9


class PreemptedError(ResdError):
    code = ErrorCode.PREEMPTED
    exit_code = 10


class UnsupportedVersionError(ResdError):
    code = ErrorCode.UNSUPPORTED_VERSION
    exit_code = 11


class UnavailableError(ResdError):
    code = ErrorCode.UNAVAILABLE
    exit_code = 12


class InternalError(ResdError):
    code = ErrorCode.INTERNAL
    exit_code = 13


ERRORS: Final[dict[ErrorCode, type[ResdError]]] = {
    cls.code: cls
    for cls in (
        InvalidError,
        NotFoundError,
        ExistsError,
        ConflictError,
        InsufficientError,
        QuotaExceededError,
        ForbiddenError,
        TimeoutError_,
        PreemptedError,
        UnsupportedVersionError,
        UnavailableError,
        InternalError,
    )
}


def error_from_wire(error: Any) -> ResdError:
    """Rebuild the typed exception from a reply's ``error`` map (tolerant of junk)."""
    if not isinstance(error, dict):
        return InternalError(f"malformed error reply: {error!r}")
    try:
        code = ErrorCode(str(error.get("code")))
    except ValueError:
        code = ErrorCode.INTERNAL
    message = error.get("message")
    details = error.get("details")
    return ERRORS[code](
        message if isinstance(message, str) else str(message),
        details if isinstance(details, dict) else {},
    )
