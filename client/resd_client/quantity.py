"""Quantities: parse what people type into integers in internal units, and back.

Pure standard library, shared by the daemon, ``resctl`` and the client library, so
that ``8G`` means the same thing everywhere (SPEC §2).

Internal units: ``cpu`` in millicores; ``memory``, ``vram``, ``disk`` in bytes;
``net`` and ``disk_io`` in bytes per second; ``gpu`` and any custom resource in
whole counts.

Byte sizes use binary multiples whatever the spelling (``K``/``KB``/``KiB`` are all
1024), as hypeman's datasize does and as ``docker -m 8g`` does; a plain number of
bytes-sized resources is MiB, as resgate's ``--memory 8192``.

Bandwidth tells bits from bytes by the unit letter, as link speeds are written: a
lower-case ``b`` or ``bit`` is bits per second with decimal multiples (``10Gbps``,
``10Gb/s``, ``10Gbit/s`` are all 1.25e9 B/s; ``bps`` in any case but ``Bps`` is bits,
as hypeman's ``ParseBandwidth``); an upper-case ``B``, ``Bps`` or no unit letter is
bytes per second with binary multiples, like every byte size (``125MB/s``,
``125MBps``, ``125M/s`` are 125 MiB/s). ``Ki``/``Mi``/``Gi``... before a bit unit
make binary bit multiples (``1Gibit/s`` = 2**30 bits/s). The prefix letter's case
does not matter, and ``/s`` or ``ps`` may be left off. Bits round down to whole
bytes.
"""

from __future__ import annotations

import enum
import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Final

from resd_client.errors import InvalidError


class Unit(enum.Enum):
    MILLICORES = "millicores"
    BYTES = "bytes"
    BANDWIDTH = "bytes/s"
    COUNT = "count"


UNITS: Final[dict[str, Unit]] = {
    "cpu": Unit.MILLICORES,
    "memory": Unit.BYTES,
    "vram": Unit.BYTES,
    "disk": Unit.BYTES,
    "net": Unit.BANDWIDTH,
    "disk_io": Unit.BANDWIDTH,
    "gpu": Unit.COUNT,
}

RESOURCE_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Quantities beyond this are refused: it keeps msgpack ints in 64 bits.
MAX_QUANTITY: Final = 2**62

_BINARY: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "p": 1024**5,
    "e": 1024**6,
}
_DECIMAL_BITS: Final[dict[str, int]] = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_NUMBER: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z/]*)\s*$", re.IGNORECASE)
_PREFIXES: Final = "kmgtpe"
_BANDWIDTH_UNIT: Final = re.compile(
    r"^(?P<prefix>[kmgtpe]?)(?P<iec>i?)(?P<unit>bits?|b|)(?P<per>/s|ps|)$", re.IGNORECASE
)


def unit_of(resource: str) -> Unit:
    """The unit a resource is counted in; custom resources count whole items."""
    return UNITS.get(resource, Unit.COUNT)


def check_resource_name(resource: object) -> str:
    """Return ``resource`` if it is a valid resource name, else raise InvalidError."""
    if not isinstance(resource, str) or not RESOURCE_NAME.fullmatch(resource):
        raise InvalidError(
            f"resource name {resource!r} is not valid: use 1-32 lowercase letters, digits"
            " or '_', starting with a letter (e.g. cpu, memory, gpu, licenses)",
            {"field": "resource", "value": repr(resource)},
        )
    return resource


def _split(resource: str, text: str, hint: str) -> tuple[Decimal, str]:
    """The number and the unit suffix of ``text``, the suffix in the case it was typed."""
    match = _NUMBER.match(text)
    if not match:
        raise InvalidError(
            f"{resource}: {text!r} is not a quantity; {hint}",
            {"resource": resource, "value": text},
        )
    try:
        return Decimal(match.group(1)), match.group(2)
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise InvalidError(
            f"{resource}: {text!r} is not a number", {"resource": resource}
        ) from None


def _byte_suffix(suffix: str) -> int | None:
    suffix = suffix.removesuffix("ib").removesuffix("i") if suffix.endswith(("ib", "i")) else suffix
    if suffix.endswith("b") and len(suffix) == 2:
        suffix = suffix[0]
    return _BINARY.get(suffix)


_HINTS: Final[dict[Unit, str]] = {
    Unit.MILLICORES: "use cores like 4 or 1.5, or millicores like 500m",
    Unit.BYTES: "use a number of MiB (8192) or a size like 512M, 8G, 8GiB, 1T",
    Unit.BANDWIDTH: (
        "use bits per second like 10Gbps, 10Gb/s or 100Mbit/s,"
        " or bytes per second like 1GB/s, 125MBps"
    ),
    Unit.COUNT: "use a whole number like 3",
}


def parse_quantity(resource: str, value: object, *, allow_zero: bool = False) -> int:
    """Parse ``value`` (str, int or float) for ``resource`` into internal units.

    Raises InvalidError naming the resource, the bad value and what is accepted;
    negative, fractional-count and (unless ``allow_zero``) zero amounts are refused.
    """
    kind = type(value)
    if kind is int or kind is str:  # a client asks for the same amounts again and again
        return _parse_cached(resource, value, allow_zero)
    return _parse(resource, value, allow_zero)


@functools.lru_cache(maxsize=256, typed=True)
def _parse_cached(resource: str, value: int | str, allow_zero: bool) -> int:
    """``_parse`` of an exact int or str (equal ones parse alike; a float is not
    cached: ``-0.0 == 0.0``, yet only one is negative). Refusals are not cached."""
    return _parse(resource, value, allow_zero)


def _parse(resource: str, value: object, allow_zero: bool) -> int:
    unit = unit_of(resource)
    hint = _HINTS[unit]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidError(
            f"{resource}: expected a quantity, got {type(value).__name__}; {hint}",
            {"resource": resource},
        )
    text = repr(value) if isinstance(value, float) else str(value)
    if text.strip().startswith("-") or (isinstance(value, (int, float)) and value < 0):
        raise InvalidError(f"{resource}: {text} is negative; {hint}", {"resource": resource})
    number, typed_suffix = _split(resource, text, hint)
    suffix = typed_suffix.lower()
    if unit is Unit.MILLICORES:
        if suffix == "m":
            amount = number
        elif suffix == "":
            amount = number * 1000
        else:
            raise InvalidError(
                f"{resource}: unknown suffix in {text!r}; {hint}", {"resource": resource}
            )
    elif unit is Unit.BYTES:
        mult = (1024**2) if suffix == "" else _byte_suffix(suffix)
        if mult is None:
            raise InvalidError(
                f"{resource}: unknown unit in {text!r}; {hint}", {"resource": resource}
            )
        amount = number * mult
    elif unit is Unit.BANDWIDTH:
        amount = _bandwidth(resource, number, typed_suffix, text, hint)
    else:
        if suffix:
            raise InvalidError(
                f"{resource}: unknown unit in {text!r}; {hint}", {"resource": resource}
            )
        amount = number
    if amount != amount.to_integral_value():
        smallest = {Unit.MILLICORES: "1m", Unit.COUNT: "1"}.get(unit, "1 byte")
        raise InvalidError(
            f"{resource}: {text!r} is finer than the smallest unit ({smallest}); {hint}",
            {"resource": resource, "value": text},
        )
    result = int(amount)
    if result == 0 and not allow_zero:
        raise InvalidError(
            f"{resource}: must be greater than zero, got {text!r}", {"resource": resource}
        )
    if result > MAX_QUANTITY:
        raise InvalidError(f"{resource}: {text!r} is too large", {"resource": resource})
    return result


def _bandwidth(resource: str, number: Decimal, suffix: str, text: str, hint: str) -> Decimal:
    """Bytes per second from a bandwidth; ``suffix`` keeps its case (``b`` vs ``B``)."""
    match = _BANDWIDTH_UNIT.match(suffix)
    if not match or (match["iec"] and not match["prefix"]):
        raise InvalidError(f"{resource}: unknown unit in {text!r}; {hint}", {"resource": resource})
    power = _PREFIXES.index(match["prefix"].lower()) + 1 if match["prefix"] else 0
    unit, per = match["unit"], match["per"]
    bits = unit == "b" or unit.lower() in ("bit", "bits") or (unit == "B" and per == "PS")
    if not bits:
        return number * Decimal(1024) ** power
    mult = Decimal(1024 if match["iec"] else 1000) ** power
    return (number * mult / 8).to_integral_value(rounding="ROUND_FLOOR")


def parse_bandwidth(text: str) -> int:
    """hypeman's ParseBandwidth: ``10Gbps`` → 1_250_000_000, ``1GB/s`` → 1_073_741_824.

    Unlike hypeman, ``10Gb/s`` is bits too (see the module docstring).
    """
    return parse_quantity("net", text, allow_zero=True)


def _trim(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


_BYTE_UNITS: Final = (
    ("PiB", 1024**5),
    ("TiB", 1024**4),
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
)
_BIT_UNITS: Final = (("Tbps", 10**12), ("Gbps", 10**9), ("Mbps", 10**6), ("Kbps", 10**3))


def _exact_in_units(amount: int, units: tuple[tuple[str, int], ...], base: str) -> str | None:
    """The largest unit that shows ``amount`` exactly with at most two decimals and a
    short number; the base unit below the smallest; None if no unit is exact."""
    for name, mult in units:
        if abs(amount) >= mult and (amount * 100) % mult == 0 and abs(amount) // mult < 100_000:
            return f"{_trim(amount / mult)}{name}"
    if abs(amount) < units[-1][1]:
        return f"{amount}{base}"
    return None


def _in_units(amount: int, units: tuple[tuple[str, int], ...], base: str) -> str:
    """``_exact_in_units``; failing that, the largest unit, rounded (display only)."""
    exact = _exact_in_units(amount, units, base)
    if exact is not None:
        return exact
    for name, mult in units:
        if abs(amount) >= mult:
            return f"{_trim(amount / mult)}{name}"
    return f"{amount}{base}"  # pragma: no cover - _exact_in_units took small amounts


def render_quantity(resource: str, amount: int) -> str:
    """Human form of an internal amount (``1.5``, ``20GiB``, ``10Gbps``, ``1GiB/s``, ``3``).

    Exact amounts render so that ``parse_quantity`` gives them back; bandwidths always
    do (``net`` in bits when that is exact, else, like ``disk_io``, in bytes).
    """
    unit = unit_of(resource)
    if unit is Unit.MILLICORES:
        if amount % 1000 == 0:
            return str(amount // 1000)
        if amount % 10 == 0 and amount > 1000:
            return _trim(amount / 1000)
        return f"{amount}m"
    if unit is Unit.BYTES:
        return render_bytes(amount)
    if unit is Unit.BANDWIDTH:
        if resource == "net":  # links are sold in bits per second
            bits = _exact_in_units(amount * 8, _BIT_UNITS, "bps")
            if bits is not None:
                return bits
        return (_exact_in_units(amount, _BYTE_UNITS, "B") or f"{amount}B") + "/s"
    return str(amount)


def render_bytes(amount: int) -> str:
    return _in_units(amount, _BYTE_UNITS, "B")
