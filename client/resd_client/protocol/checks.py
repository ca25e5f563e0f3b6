"""Field checks shared by the protocol's message types (SPEC §1).

Each ``check_*`` raises InvalidError naming the field and the rule it broke; the
limits and name patterns they enforce live here too, so the CLI can check a
value the same way before it is sent. ``show`` renders a client-sent value
safely for any error message.
"""

from __future__ import annotations

import re
from typing import Any, Final

from resd_client.errors import InvalidError
from resd_client.quantity import check_resource_name

NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MEMBER: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_LABEL: Final = 256
MAX_TTL: Final = 10 * 365 * 86400.0
MAX_GRACE: Final = 86400.0
#: the longest ``idle_after`` (30 days)
MAX_IDLE_AFTER: Final = 30 * 86400.0
MAX_PRIORITY: Final = 10
MIN_PRIORITY: Final = 1
MAX_WAIT: Final = 30 * 86400.0

RESERVATION_ID: Final = re.compile(r"^r-[0-9a-f]{6,32}$")
TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]{16,128}$")

#: the kernel's cpulist form of a set of CPUs: ``0-27,56-83``
CPU_LIST: Final = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def show(value: Any, limit: int = 64) -> str:
    """A short, safe rendering of a client-sent value for an error message.

    Containers are named by type only: their repr could be huge or nest deeper
    than Python's recursion limit.
    """
    if value is None or isinstance(value, bool | int | float | str | bytes):
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return f"a {type(value).__name__}"


def check_name(what: str, value: str) -> None:
    if not NAME.fullmatch(value):
        raise InvalidError(
            f"{what} name {show(value)} is not valid: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit",
            {"field": what, "value": show(value)},
        )


def check_priority(value: int) -> None:
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidError(
            f"priority {value} is out of range: use {MIN_PRIORITY} (lowest) to {MAX_PRIORITY} (highest)",
            {"field": "priority", "value": value, "min": MIN_PRIORITY, "max": MAX_PRIORITY},
        )


def check_ttl(value: float | None) -> None:
    if value is not None and not 0 < value <= MAX_TTL:
        raise InvalidError(
            f"ttl {value:g} is not valid: use seconds greater than 0 and at most {MAX_TTL:g}",
            {"field": "ttl", "value": value},
        )


def check_amounts(resources: dict[str, int], *, allow_zero: bool, what: str = "resources") -> None:
    if not allow_zero and not resources:
        raise InvalidError(
            f"{what}: ask for at least one resource (e.g. cpu, memory, gpu)", {"field": what}
        )
    for name, amount in resources.items():
        check_resource_name(name)
        if amount < 0 or (amount == 0 and not allow_zero):
            raise InvalidError(
                f"{what}.{name}: must be greater than zero, got {amount}",
                {"field": f"{what}.{name}", "value": amount},
            )


def check_label(value: str) -> None:
    if len(value) > MAX_LABEL:
        raise InvalidError(f"label is longer than {MAX_LABEL} characters", {"field": "label"})


def check_labels(labels: dict[str, str], what: str = "labels") -> None:
    if len(labels) > 64:
        raise InvalidError(f"{what}: at most 64 labels", {"field": what})
    for k, v in labels.items():
        check_name(f"{what} key", k)
        if len(v) > MAX_LABEL:
            raise InvalidError(
                f"{what}.{k}: longer than {MAX_LABEL} characters", {"field": f"{what}.{k}"}
            )


def check_ratio(name: str, ratio: float) -> None:
    if not 0 < ratio <= 1000:
        raise InvalidError(
            f"oversubscription ratio for {name} must be > 0 and <= 1000, got {ratio:g}",
            {"field": f"ratios.{name}", "value": ratio},
        )


def check_grace(value: float) -> None:
    if not 0 <= value <= MAX_GRACE:
        raise InvalidError(
            f"grace must be 0 to {MAX_GRACE:g} seconds, got {value:g}", {"field": "grace"}
        )


def check_idle_after(value: float) -> None:
    if not 0 <= value <= MAX_IDLE_AFTER:
        raise InvalidError(
            f"idle_after must be 0 (off) to {MAX_IDLE_AFTER:g} seconds, got {value:g}",
            {"field": "idle_after", "value": value},
        )


def check_max_per_tenant(value: int) -> None:
    if not 0 <= value <= 1_000_000:
        raise InvalidError(
            f"max_per_tenant must be 0 (unlimited) or a positive count, got {value}",
            {"field": "max_per_tenant", "value": value},
        )


def check_wait(what: str, value: float | None) -> None:
    if value is not None and not 0 <= value <= MAX_WAIT:
        raise InvalidError(
            f"{what} {value:g} is not valid: use 0 to {MAX_WAIT:g} seconds",
            {"field": what, "value": value},
        )


def check_pid(value: int | None) -> None:
    if value is not None and not 1 <= value < 2**22:
        raise InvalidError(
            f"pid {value} is not a valid process id", {"field": "pid", "value": value}
        )


def check_ids(what: str, values: list[int]) -> None:
    for v in values:
        if not 0 <= v < 2**32:
            raise InvalidError(f"{what}: {v} is not a valid id", {"field": what})


def check_token(value: str | None) -> None:
    if value is not None and not TOKEN.fullmatch(value):
        raise InvalidError(
            "token: give 16 to 128 characters of A-Z, a-z, 0-9, _ and - (a random secret,"
            " e.g. secrets.token_urlsafe(24))",
            {"field": "token"},
        )


def check_reservation_id(value: str) -> None:
    if not RESERVATION_ID.fullmatch(value):
        raise InvalidError(
            f"reservation id {show(value)} is not valid: ids look like r-1a2b3c4d5e6f",
            {"field": "id", "value": show(value)},
        )
