"""Shared option types and the parsers that turn flag strings into typed values.

Everything here is pure and raises ``InvalidError`` (exit 2) on bad input, so a
flag is refused with the same message shape the daemon would use, before any
connection is made. The ``Annotated`` aliases keep flag spellings and help texts
identical across commands.
"""

from __future__ import annotations

import grp
import math
import pwd
import re
from datetime import datetime
from typing import Annotated, Any, Final, TypeVar

import typer

from resd_client.errors import InvalidError
from resd_client.protocol import from_wire
from resd_client.quantity import check_resource_name, parse_quantity

T = TypeVar("T")

# ------------------------------------------------------------------ option types

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON and nothing else on stdout.")
]
SocketOpt = Annotated[
    str | None,
    typer.Option(
        "--socket",
        metavar="PATH",
        help="Daemon socket (default: $RESD_SOCKET, then the user socket, then /run/resd/resd.sock).",
    ),
]
CpuOpt = Annotated[
    str | None,
    typer.Option("--cpu", metavar="QTY", help="CPU: cores (4, 1.5) or millicores (500m)."),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option("--memory", metavar="QTY", help="Memory: MiB (8192) or a size (8G, 512M, 1T)."),
]
GpuOpt = Annotated[str | None, typer.Option("--gpu", metavar="N", help="Whole GPU devices.")]
ResOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--res",
        metavar="NAME=QTY",
        help="Any resource by name, e.g. vram=20G, disk=500G, net=10Gbps, licenses=3 (repeatable).",
    ),
]
PoolNameOpt = Annotated[str, typer.Option("--name", metavar="POOL", help="Pool name.")]
TenantNameOpt = Annotated[str, typer.Option("--name", metavar="TENANT", help="Tenant name.")]
ReservationIdOpt = Annotated[str, typer.Option("--id", metavar="ID", help="Reservation id (r-…).")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Also release the active reservations it holds.")
]

# ------------------------------------------------------------------- validation


def build(cls: type[T], fields: dict[str, Any]) -> T:
    """Build a protocol args value through the protocol's own decoder and checks.

    ``None`` values are left out so that the protocol's defaults apply. Raises
    InvalidError exactly as the daemon would for the same fields.
    """
    return from_wire(cls, {k: v for k, v in fields.items() if v is not None}, "")


# ----------------------------------------------------------------- quantities

_ORDER: Final = ("cpu", "memory", "gpu", "vram", "disk", "net", "disk_io")


def resource_order(name: str) -> tuple[int, str]:
    """Sort key: the well-known resources first, in the spec's order, then by name."""
    return (_ORDER.index(name), "") if name in _ORDER else (len(_ORDER), name)


def split_pair(text: str, what: str, form: str, example: str) -> tuple[str, str]:
    """Split ``KEY=VALUE``; raises InvalidError naming the flag, its form and an example."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise InvalidError(
            f"{what}: {text!r} is not of the form {form} (e.g. {example})",
            {"field": what, "value": text},
        )
    return key, value


def parse_resources(
    *,
    cpu: str | None = None,
    memory: str | None = None,
    gpu: str | None = None,
    res: list[str] | None = None,
    allow_zero: bool = False,
) -> dict[str, int]:
    """Internal-unit amounts from ``--cpu/--memory/--gpu`` and ``--res NAME=QTY`` flags.

    Raises InvalidError for a malformed pair, a bad name or quantity, or a resource
    given twice.
    """
    out: dict[str, int] = {}
    pairs: list[tuple[str, str]] = [
        (name, value)
        for name, value in (("cpu", cpu), ("memory", memory), ("gpu", gpu))
        if value is not None
    ]
    pairs += [split_pair(item, "--res", "NAME=QTY", "vram=20G") for item in res or []]
    for name, value in pairs:
        check_resource_name(name)
        if name in out:
            raise InvalidError(f"resource {name} is given twice", {"resource": name})
        if value.strip().startswith("-"):
            raise InvalidError(
                f"{name}: must be greater than zero, got {value!r}", {"resource": name}
            )
        out[name] = parse_quantity(name, value, allow_zero=allow_zero)
    return out


def parse_ratios(items: list[str] | None) -> dict[str, float]:
    """``--oversub NAME=RATIO`` flags as a map; raises InvalidError."""
    out: dict[str, float] = {}
    for item in items or []:
        name, value = split_pair(item, "--oversub", "NAME=RATIO", "cpu=4")
        check_resource_name(name)
        try:
            ratio = float(value)
        except ValueError:
            raise InvalidError(
                f"--oversub {name}: {value!r} is not a number", {"resource": name}
            ) from None
        if not math.isfinite(ratio):
            raise InvalidError(f"--oversub {name}: must be a finite number", {"resource": name})
        out[name] = ratio
    return out


def parse_labels(items: list[str] | None) -> dict[str, str] | None:
    """``--label K=V`` flags as a map, or None when none were given; raises InvalidError."""
    if items is None:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, value = split_pair(item, "--label", "KEY=VALUE", "zone=a")
        out[key] = value
    return out


# ---------------------------------------------------------------------- times

_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]+)")
_UNIT_SECONDS: Final[dict[str, float]] = {
    "ms": 0.001,
    "s": 1,
    "sec": 1,
    "m": 60,
    "min": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
}


def parse_duration(text: str, what: str) -> float:
    """Seconds from ``300``, ``1.5``, ``90s``, ``10m``, ``2h``, ``1d`` or ``1h30m``.

    A plain number may be negative or zero (the protocol's range checks say what is
    allowed); raises InvalidError for anything that is not a duration.
    """
    raw = text.strip().lower()
    try:
        value = float(raw)
    except ValueError:
        value = _parse_units(raw, text, what)
    if not math.isfinite(value):
        raise InvalidError(f"{what}: must be a finite number of seconds", {"field": what})
    return value


def _parse_units(raw: str, text: str, what: str) -> float:
    compact = raw.replace(" ", "")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != pos or match.group(2) not in _UNIT_SECONDS:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(compact):
        raise InvalidError(
            f"{what}: {text!r} is not a duration; use seconds (300) or 90s, 10m, 2h, 1d, 1h30m",
            {"field": what, "value": text},
        )
    return total


def parse_since(text: str, now: float) -> float:
    """Unix seconds from an ISO-8601 time, unix seconds, or a duration ago (``2h``).

    Naive ISO times are local time. Raises InvalidError when ``text`` is none of
    these, or when the result is negative or in the future.
    """
    raw = text.strip()
    result: float
    try:
        result = float(raw)
    except ValueError:
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            try:
                result = now - _parse_units(raw.lower(), text, "--since")
            except InvalidError:
                raise InvalidError(
                    f"--since: {text!r} is not a time; use an ISO-8601 time "
                    "(2026-01-31T12:00:00), unix seconds (1767225600) or a duration ago "
                    "(90s, 10m, 2h, 1d)",
                    {"field": "since", "value": text},
                ) from None
        else:
            result = (when if when.tzinfo else when.astimezone()).timestamp()
    if not math.isfinite(result) or result < 0:
        raise InvalidError(f"--since: {text!r} is before 1970", {"field": "since"})
    if result > now + 1:
        raise InvalidError(f"--since: {text!r} is in the future", {"field": "since"})
    return result


# ---------------------------------------------------------------- identities


def parse_uids(items: list[str] | None) -> list[int] | None:
    """``--owner`` values (uids or user names) as uids; raises InvalidError."""
    return None if items is None else [_lookup(v, "owner", _uid) for v in items]


def parse_gids(items: list[str] | None) -> list[int] | None:
    """``--group`` values (gids or group names) as gids; raises InvalidError."""
    return None if items is None else [_lookup(v, "group", _gid) for v in items]


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _lookup(value: str, what: str, resolve: Any) -> int:
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        number: int = resolve(value)
    except KeyError:
        kind = "user" if what == "owner" else "group"
        raise InvalidError(
            f"--{what}: no {kind} named {value!r} on this host; give a name or a numeric id",
            {"field": what, "value": value},
        ) from None
    return number


def user_name(uid: int) -> str:
    """The user name of ``uid``, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group name of ``gid``, or the number when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def require_choice(value: str, what: str, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``; raises InvalidError listing them."""
    if value not in allowed:
        raise InvalidError(
            f"{what}: {value!r} is not supported; use one of {', '.join(allowed)}",
            {"field": what, "allowed": list(allowed)},
        )
    return value
