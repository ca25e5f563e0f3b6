"""The wire protocol of resd, in one place both sides use (SPEC §1).

A bring-your-own-I/O module in the manner of h11: it turns bytes into frames and
frames into typed, validated messages, and back, without touching a socket or a
clock. Standard library plus msgpack only, so worker processes can import it.

* Framing: a 4-byte big-endian length, then one msgpack map. ``FrameDecoder``
  takes bytes as they arrive and yields decoded maps; an oversized length raises
  ``FrameTooLarge`` (the connection must close), undecodable bytes raise
  ``BadFrame`` (the framing is intact, the connection may go on).
* Requests ``{"v":1,"id":N,"op":...,"args":{...}}`` decode into a ``Request``
  whose ``args`` is one of the frozen types in ``OPS``; every field is checked for
  type, range and size, and unknown fields are refused.
* Replies ``{"id":N,"ok":true,"result":{...}}`` / ``{"id":N,"ok":false,"error":...}``
  and pushes ``{"event":name, ...}`` are built by ``reply_ok``, ``reply_error``
  and ``push``.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, Union

import msgpack

from resd_client.errors import InvalidError, ResdError, UnsupportedVersionError
from resd_client.quantity import MAX_QUANTITY, check_resource_name

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 1 << 20
_HEADER: Final = struct.Struct(">I")

NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MEMBER: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_LABEL: Final = 256
MAX_TTL: Final = 10 * 365 * 86400.0
MAX_GRACE: Final = 86400.0
#: the longest ``idle_after`` (30 days)
MAX_IDLE_AFTER: Final = 30 * 86400.0
MAX_PRIORITY: Final = 10
MIN_PRIORITY: Final = 1

Binding = Literal["detached", "session", "pid"]
Preemption = Literal["off", "lower_priority"]
Placement = Literal["binpack", "spread", "least_used"]
#: what resd does with a lease whose processes use more GPU memory than it reserved
OverusePolicy = Literal["warn", "terminate"]
#: the strongest guard the host gives a reservation (SPEC §10), strongest first
Enforcement = Literal["mig", "mps", "cgroup", "framework", "watch", "none"]
ReservationState = Literal[
    "pending", "active", "terminating", "released", "expired", "preempted", "cancelled"
]
MAX_WAIT: Final = 30 * 86400.0


# --------------------------------------------------------------------------- framing


class FrameTooLarge(Exception):
    """A frame announced more bytes than allowed; the stream cannot be resynchronised."""


class BadFrame(Exception):
    """One frame's payload was not a msgpack map; the stream itself is intact."""


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj``; protocol dataclasses inside are packed as maps."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True, default=_as_map)
    return packed


def encode_frame(obj: Any) -> bytes:
    payload = pack(obj)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame splitter: ``feed`` bytes, iterate ``frames()``."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buf)

    def frames(self) -> Iterator[Any]:
        """Yield each complete frame's decoded value.

        Raises FrameTooLarge when a header exceeds ``max_frame`` and BadFrame when a
        payload is not msgpack or not a map (that frame is consumed; later frames
        can still be read).
        """
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise FrameTooLarge(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame}"
                )
            end = _HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            try:
                value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            except Exception as exc:  # msgpack raises several unrelated types
                raise BadFrame(f"frame is not valid msgpack: {type(exc).__name__}") from None
            if not isinstance(value, dict):
                raise BadFrame(f"frame must be a msgpack map, got {type(value).__name__}")
            yield value


# ------------------------------------------------------------------ typed decoding

T = TypeVar("T")
Converter = Callable[[Any, str], Any]
_CONVERTERS: dict[Any, Converter] = {}
#: dataclass → its fields: (name, converter, required)
_FIELDS: dict[type, tuple[tuple[str, Converter, bool], ...]] = {}
_WIRE_NAMES: dict[type, tuple[str, ...]] = {}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "nil"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"map of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "map"
    return getattr(tp, "__name__", str(tp))


def _converter(tp: Any) -> Converter:
    """The checking converter for protocol type ``tp``, built once per type.

    Decoding is on the daemon's hot path, so each type's checks are compiled to a
    closure the first time it is seen; error messages are built only on failure.
    """
    conv = _CONVERTERS.get(tp)
    if conv is None:
        conv = _CONVERTERS[tp] = _compile(tp)
    return conv


def _compile(tp: Any) -> Converter:
    if tp is Any:
        return lambda value, path: value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(arms) < len(typing.get_args(tp))
        convs = [_converter(a) for a in arms]

        def union(value: Any, path: str) -> Any:
            if value is None and nullable:
                return None
            for conv in convs:
                try:
                    return conv(value, path)
                except InvalidError:
                    continue
            raise _type_error(path, tp, value)

        if nullable and len(convs) == 1:
            (only,) = convs

            def optional(value: Any, path: str) -> Any:
                if value is None:
                    return None
                try:
                    return only(value, path)
                except InvalidError:
                    if isinstance(value, dict | list) or _is_scalar_of(arms[0], value):
                        raise  # the right shape with a bad inside: say what inside
                    raise _type_error(path, tp, value) from None

            return optional
        return union
    if origin is Literal:
        allowed = frozenset(typing.get_args(tp))

        def literal(value: Any, path: str) -> Any:
            if isinstance(value, str) and value in allowed:
                return value
            raise InvalidError(
                f"{path}: {show(value)} is not allowed; expected one of {_type_name(tp)}",
                {"field": path, "allowed": list(typing.get_args(tp))},
            )

        return literal
    if tp is type(None):

        def none(value: Any, path: str) -> Any:
            if value is None:
                return None
            raise _type_error(path, tp, value)

        return none
    if tp is bool:

        def boolean(value: Any, path: str) -> Any:
            if value is True or value is False:
                return value
            raise _type_error(path, tp, value)

        return boolean
    if tp is int:

        def integer(value: Any, path: str) -> Any:
            if type(value) is int:
                if -MAX_QUANTITY <= value <= MAX_QUANTITY:
                    return value
                raise InvalidError(f"{path}: {value} is out of range", {"field": path})
            raise _type_error(path, tp, value)

        return integer
    if tp is float:

        def real(value: Any, path: str) -> Any:
            kind = type(value)
            if kind is float or kind is int:
                as_float = float(value)
                if as_float - as_float != 0.0:  # nan or ±inf
                    raise InvalidError(f"{path}: must be a finite number", {"field": path})
                return as_float
            raise _type_error(path, tp, value)

        return real
    if tp is str:

        def text(value: Any, path: str) -> Any:
            if type(value) is str:
                return value
            raise _type_error(path, tp, value)

        return text
    if origin is list:
        item = _converter(typing.get_args(tp)[0])

        def array(value: Any, path: str) -> Any:
            if type(value) is not list:
                raise _type_error(path, tp, value)
            return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

        return array
    if origin is dict:
        entry = _converter(typing.get_args(tp)[1])

        def mapping(value: Any, path: str) -> Any:
            if type(value) is not dict:
                raise _type_error(path, tp, value)
            out = {}
            for k, v in value.items():
                if type(k) is not str:
                    raise InvalidError(f"{path}: keys must be strings", {"field": path})
                out[k] = entry(v, f"{path}.{k}")
            return out

        return mapping
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls = tp
        return lambda value, path: from_wire(cls, value, path)
    raise TypeError(f"protocol type {tp!r} is not supported")  # a bug in this module


def _is_scalar_of(tp: Any, value: Any) -> bool:
    return tp in (int, float, str, bool) and isinstance(value, tp)


def _fields_of(cls: type) -> tuple[tuple[str, Converter, bool], ...]:
    fields = _FIELDS.get(cls)
    if fields is None:
        hints = typing.get_type_hints(cls)
        fields = _FIELDS[cls] = tuple(
            (
                f.name,
                _converter(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        )
    return fields


def show(value: Any, limit: int = 64) -> str:
    """A short, safe rendering of a client-sent value for an error message.

    Containers are named by type only: their repr could be huge or nest deeper
    than Python's recursion limit.
    """
    if value is None or isinstance(value, bool | int | float | str | bytes):
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return f"a {type(value).__name__}"


def _type_error(path: str, tp: Any, value: Any) -> InvalidError:
    got = "nil" if value is None else type(value).__name__
    return InvalidError(
        f"{path}: expected {_type_name(tp)}, got {got}",
        {"field": path, "expected": _type_name(tp), "got": got},
    )


def from_wire(cls: type[T], value: Any, path: str = "args") -> T:
    """Build and check a protocol type from a decoded msgpack map.

    Raises InvalidError naming the field, what was expected and what came; unknown
    fields are refused so that typos are not silently ignored.
    """
    if type(value) is not dict:
        raise _type_error(path, cls, value)
    fields = _fields_of(cls)
    if not _field_names(cls).issuperset(value):
        names = [name for name, _, _ in fields]
        unknown = sorted(str(k) for k in value if k not in names)
        raise InvalidError(
            f"{path}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(names) or 'none'}",
            {"field": path, "unknown": unknown, "allowed": names},
        )
    kwargs: dict[str, Any] = {}
    prefix = f"{path}." if path else ""
    for name, conv, required in fields:
        if name in value:
            kwargs[name] = conv(value[name], prefix + name)
        elif required:
            raise InvalidError(
                f"{path}.{name}: required field is missing", {"field": f"{path}.{name}"}
            )
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


_NAMES: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = frozenset(name for name, _, _ in _fields_of(cls))
    return names


def _wire_names(cls: type) -> tuple[str, ...] | None:
    names = _WIRE_NAMES.get(cls)
    if names is None and dataclasses.is_dataclass(cls):
        names = _WIRE_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def to_wire(obj: Any) -> Any:
    """Plain msgpack-ready value of a protocol type (nested types become maps)."""
    if obj is None or isinstance(obj, str | int | float):
        return obj
    names = _wire_names(type(obj))
    if names is not None:
        return {n: to_wire(getattr(obj, n)) for n in names}
    if isinstance(obj, list | tuple):
        return [to_wire(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    return obj


def _as_map(obj: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: protocol types become maps
    (one level; msgpack recurses), so replies are packed without a ``to_wire`` copy."""
    names = _wire_names(type(obj))
    if names is None:
        raise TypeError(f"cannot pack {type(obj).__name__}")
    return {n: getattr(obj, n) for n in names}


# ------------------------------------------------------------------------ checks


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


# ------------------------------------------------------------------ request types


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    version: int
    client: str = ""

    def check(self) -> None:
        if len(self.client) > 128:
            raise InvalidError("client name is longer than 128 characters", {"field": "client"})


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberSpec:
    """A member of a set resource: a name, an optional sliceable capacity, attributes."""

    name: str
    capacity: int = 0
    labels: dict[str, str] = field(default_factory=dict)


ResourceKind = Literal["scalar", "range", "set"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSpec:
    """One resource of a pool (SPEC §2 kinds).

    ``scalar``: ``capacity`` in internal units, times ``ratio``. ``range``: the
    integers ``lo``..``hi``. ``set``: ``members`` (a GPU set's members carry their
    VRAM as capacity, which makes ``vram`` requests possible).
    """

    capacity: int | None = None
    ratio: float = 1.0
    kind: ResourceKind = "scalar"
    lo: int = 0
    hi: int | None = None
    members: list[MemberSpec] = field(default_factory=list)
    source: Literal["detected", "configured"] = "configured"

    def check_as(self, name: str) -> None:
        if self.kind == "scalar":
            if self.capacity is None:
                raise InvalidError(
                    f"args.resources.{name}.capacity: a scalar resource needs a capacity",
                    {"field": f"args.resources.{name}.capacity"},
                )
            if self.members or self.hi is not None:
                raise InvalidError(
                    f"args.resources.{name}: a scalar resource has no members or range",
                    {"resource": name},
                )
            return
        if self.ratio != 1.0:
            raise InvalidError(
                f"resources.{name}: only scalar resources can be oversubscribed (ratio must be 1)",
                {"resource": name},
            )
        if self.kind == "range":
            if self.hi is None or self.hi < self.lo or self.lo < 0 or self.hi - self.lo >= 1 << 32:
                raise InvalidError(
                    f"resources.{name}: a range needs 0 <= lo <= hi and at most 2^32 values",
                    {"resource": name, "lo": self.lo, "hi": self.hi},
                )
            if self.members:
                raise InvalidError(f"resources.{name}: a range has no members", {"resource": name})
            return
        if self.hi is not None:
            raise InvalidError(
                f"resources.{name}: a set has members, not a range", {"resource": name}
            )
        if not 1 <= len(self.members) <= 4096:
            raise InvalidError(
                f"resources.{name}: a set needs 1 to 4096 members", {"resource": name}
            )
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise InvalidError(f"resources.{name}: member names must be unique", {"resource": name})
        for m in self.members:
            if not MEMBER.fullmatch(m.name):
                raise InvalidError(
                    f"resources.{name}: member name {show(m.name)} is not valid (1-64 letters, digits, '.', '_', '-', ':')",
                    {"resource": name},
                )
            if m.capacity < 0:
                raise InvalidError(
                    f"resources.{name}.{m.name}: capacity must be >= 0", {"resource": name}
                )
            check_labels(m.labels)

    @property
    def size(self) -> int:
        """How many units the resource holds (members, values, or the capacity)."""
        if self.kind == "set":
            return len(self.members)
        if self.kind == "range":
            return (self.hi if self.hi is not None else self.lo) - self.lo + 1
        return self.capacity or 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolCreate:
    name: str
    resources: dict[str, ResourceSpec]
    max_per_tenant: int = 1
    preemption: Preemption = "off"
    placement: Placement = "binpack"
    grace: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    overuse: OverusePolicy = "warn"
    idle_after: float = 0.0
    adopt_foreign: bool = False

    def check(self) -> None:
        check_name("pool", self.name)
        check_idle_after(self.idle_after)
        for k, v in self.resources.items():
            v.check_as(k)
            check_ratio(k, v.ratio)
        check_amounts({k: v.size for k, v in self.resources.items()}, allow_zero=True)
        if "vram" in self.resources:
            raise InvalidError(
                "resources.vram: VRAM is not a resource of its own; give the gpu set members their memory as capacity",
                {"resource": "vram"},
            )
        check_max_per_tenant(self.max_per_tenant)
        check_grace(self.grace)
        check_labels(self.labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSet:
    """Change a pool; only the fields given change. ``remove`` drops resources."""

    name: str
    capacity: dict[str, int] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    max_per_tenant: int | None = None
    preemption: Preemption | None = None
    placement: Placement | None = None
    grace: float | None = None
    labels: dict[str, str] | None = None
    overuse: OverusePolicy | None = None
    idle_after: float | None = None
    adopt_foreign: bool | None = None

    def check(self) -> None:
        check_name("pool", self.name)
        if self.idle_after is not None:
            check_idle_after(self.idle_after)
        check_amounts(self.capacity, allow_zero=True, what="capacity")
        for k, r in self.ratios.items():
            check_resource_name(k)
            check_ratio(k, r)
        for k in self.remove:
            check_resource_name(k)
        if self.max_per_tenant is not None:
            check_max_per_tenant(self.max_per_tenant)
        if self.grace is not None:
            check_grace(self.grace)
        if self.labels is not None:
            check_labels(self.labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolName:
    name: str

    def check(self) -> None:
        check_name("pool", self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolDelete:
    name: str
    force: bool = False

    def check(self) -> None:
        check_name("pool", self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Empty:
    """Arguments of ops that take none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantAdd:
    name: str
    priority: int = 5
    owners: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    weight: float = 1.0

    def check(self) -> None:
        check_name("tenant", self.name)
        check_priority(self.priority)
        check_ids("owners", self.owners)
        check_ids("groups", self.groups)
        if not 0 < self.weight <= 1000:
            raise InvalidError(
                f"weight must be > 0 and <= 1000, got {self.weight:g}", {"field": "weight"}
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantName:
    name: str

    def check(self) -> None:
        check_name("tenant", self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantSet:
    name: str
    priority: int | None = None
    owners: list[int] | None = None
    groups: list[int] | None = None
    weight: float | None = None
    #: quota in ``pool`` (SPEC §3): ``min`` guaranteed, ``max`` cap, per resource in
    #: internal units (a set resource counts members); each given map replaces that
    #: side of the quota, ``{}`` clears it
    pool: str | None = None
    min: dict[str, int] | None = None
    max: dict[str, int] | None = None

    def check(self) -> None:
        check_name("tenant", self.name)
        if self.pool is None and (self.min is not None or self.max is not None):
            raise InvalidError("min and max are per pool: give the pool too", {"field": "pool"})
        if self.pool is not None:
            check_name("pool", self.pool)
            if self.min is None and self.max is None:
                raise InvalidError(
                    f"pool {self.pool!r}: give min and/or max to set the tenant's quota there",
                    {"field": "min"},
                )
        for side, amounts in (("min", self.min), ("max", self.max)):
            if amounts is not None:
                check_amounts(amounts, allow_zero=True, what=side)
        for name, low in (self.min or {}).items():
            high = (self.max or {}).get(name)
            if high is not None and low > high:
                raise InvalidError(
                    f"min {name} {low} is above max {name} {high}",
                    {"field": f"min.{name}", "min": low, "max": high},
                )
        if self.priority is not None:
            check_priority(self.priority)
        if self.owners is not None:
            check_ids("owners", self.owners)
        if self.groups is not None:
            check_ids("groups", self.groups)
        if self.weight is not None and not 0 < self.weight <= 1000:
            raise InvalidError(
                f"weight must be > 0 and <= 1000, got {self.weight:g}", {"field": "weight"}
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantRemove:
    name: str
    force: bool = False

    def check(self) -> None:
        check_name("tenant", self.name)


#: the most parts one gang may have
MAX_PARTS: Final = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class Part:
    """One part of a gang: what one pool is asked for."""

    pool: str
    resources: dict[str, int] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)
    constraints: dict[str, str] = field(default_factory=dict)
    contiguous: list[str] = field(default_factory=list)

    def request(self, base: Reserve | None = None) -> Reserve:
        """This part as a plain request (with ``base``'s tenant, ttl, binding, ...)."""
        return dataclasses.replace(
            base or Reserve(),
            pool=self.pool,
            resources=dict(self.resources),
            members={k: list(v) for k, v in self.members.items()},
            constraints=dict(self.constraints),
            contiguous=list(self.contiguous),
            parts=[],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Reserve:
    """Reserve ``resources`` (internal units) in ``pool`` as ``tenant``.

    ``tenant`` defaults to the caller's Unix user name; ``ttl`` in seconds, none for
    no expiry; ``binding`` ``session`` releases when this connection closes.
    """

    pool: str | None = None
    resources: dict[str, int] = field(default_factory=dict)
    tenant: str | None = None
    ttl: float | None = None
    binding: Binding = "detached"
    label: str = ""
    reclaimable: bool = False
    members: dict[str, list[str]] = field(default_factory=dict)
    contiguous: list[str] = field(default_factory=list)
    constraints: dict[str, str] = field(default_factory=dict)
    selector: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None
    wait: bool = False
    timeout: float | None = None
    deadline: float | None = None
    pid: int | None = None
    #: the attach token: a secret the client chooses for this request (SPEC §9).
    #: Presenting it again (``attach``, or this same ``reserve`` retried after a lost
    #: reply) re-binds the lease or waiter to the presenting connection.
    token: str | None = None
    #: a gang (SPEC §4): several parts granted all or nothing as one lease; then the
    #: parts say pool and amounts, and ``pool``/``resources``/``members``/
    #: ``constraints``/``contiguous``/``selector`` stay empty
    parts: list[Part] = field(default_factory=list)

    def check(self) -> None:
        if self.parts:
            self._check_gang()
        else:
            self._check_ask()
        self._check_common()

    def _check_gang(self) -> None:
        if self.pool or self.resources or self.members or self.constraints:
            raise InvalidError(
                "parts: a gang gives each part's pool and amounts; leave pool, resources,"
                " members and constraints empty",
                {"field": "parts"},
            )
        if self.contiguous or self.selector:
            raise InvalidError(
                "parts: contiguous and constraints go in each part; a gang has no selector",
                {"field": "parts"},
            )
        if not 2 <= len(self.parts) <= MAX_PARTS:
            raise InvalidError(
                f"parts: a gang has 2 to {MAX_PARTS} parts, got {len(self.parts)}",
                {"field": "parts"},
            )
        for i, part in enumerate(self.parts):
            try:
                part.request()._check_ask()
            except InvalidError as exc:
                raise InvalidError(
                    f"parts[{i}]: {exc.message}", {**exc.details, "part": i}
                ) from None

    def _check_common(self) -> None:
        check_token(self.token)
        if self.tenant is not None:
            check_name("tenant", self.tenant)
        check_wait("timeout", self.timeout)
        if self.timeout is not None and not self.wait:
            raise InvalidError(
                "timeout: only a waiting request (wait) has one", {"field": "timeout"}
            )
        if self.deadline is not None and not 0 < self.deadline < 2**33:
            raise InvalidError(
                "deadline: give a Unix time in seconds",
                {"field": "deadline", "value": self.deadline},
            )
        check_pid(self.pid)
        if self.pid is not None and self.binding != "pid":
            raise InvalidError("pid: only a pid binding names a process", {"field": "pid"})
        check_ttl(self.ttl)
        check_label(self.label)

    def _check_ask(self) -> None:
        """What one pool is asked for (a plain request, or one part of a gang)."""
        if self.pool is not None:
            check_name("pool", self.pool)
        # A resource named in ``members`` may leave its count at 0 (the names say it);
        # every other amount must be positive.
        counted = {k: v for k, v in self.resources.items() if k not in self.members}
        if counted or not self.members:
            check_amounts(counted, allow_zero=False)
        check_amounts(
            {k: v for k, v in self.resources.items() if k in self.members}, allow_zero=True
        )
        if not self.resources and not self.members:
            raise InvalidError(
                "resources: ask for at least one resource (e.g. cpu, memory, gpu)",
                {"field": "resources"},
            )
        for name, values in self.members.items():
            check_resource_name(name)
            if not 1 <= len(values) <= 4096 or any(not MEMBER.fullmatch(v) for v in values):
                raise InvalidError(
                    f"members.{name}: give 1 to 4096 member names or values like 30001 or 30005-30009",
                    {"field": f"members.{name}"},
                )
        for name in self.contiguous:
            check_resource_name(name)
            if name not in self.resources:
                raise InvalidError(f"contiguous: {name} is not requested", {"field": "contiguous"})
        if "gpu" in self.resources and "vram" in self.resources:
            raise InvalidError(
                "ask for whole GPUs (gpu) or a slice of one (vram), not both",
                {"field": "resources"},
            )
        check_labels(self.constraints, "constraints")
        check_labels(self.selector, "selector")
        if self.pool is not None and self.selector:
            raise InvalidError("give a pool or a label selector, not both", {"field": "selector"})


RESERVATION_ID: Final = re.compile(r"^r-[0-9a-f]{6,32}$")
TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationRef:
    id: str

    def check(self) -> None:
        check_reservation_id(self.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Renew:
    """Extend a reservation: its new expiry is now + ``ttl`` (default: its own ttl)."""

    id: str
    ttl: float | None = None

    def check(self) -> None:
        check_reservation_id(self.id)
        check_ttl(self.ttl)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resize:
    """Change a lease's amounts in place: ``resources`` gives the new amount of each
    resource named (internal units; a set or range resource a count; 0 gives it all
    back); the rest stays. Shrinking always succeeds: ``give_back`` names which set
    members (``{"gpu": ["3"]}``) or range values (``{"ports": ["30005-30009"]}``)
    go, else the last ones do. Growing is granted at once if it fits, else refused —
    or, with ``wait``, queued while the lease keeps what it holds (``timeout``
    seconds at most); the holder then gets a ``resized`` push. TTL and binding do
    not change."""

    id: str
    resources: dict[str, int]
    give_back: dict[str, list[str]] = field(default_factory=dict)
    wait: bool = False
    timeout: float | None = None

    def check(self) -> None:
        check_reservation_id(self.id)
        if not self.resources:
            raise InvalidError(
                "resources: name at least one resource and its new amount",
                {"field": "resources"},
            )
        check_amounts(self.resources, allow_zero=True)
        for name, values in self.give_back.items():
            check_resource_name(name)
            if not values:
                raise InvalidError(
                    f"give_back.{name}: name the members or values to give back",
                    {"field": f"give_back.{name}"},
                )
            if name not in self.resources and not (name == "gpu" and "vram" in self.resources):
                raise InvalidError(
                    f"give_back.{name}: give {name}'s new amount in resources too",
                    {"field": f"give_back.{name}"},
                )
        check_wait("timeout", self.timeout)
        if self.timeout is not None and not self.wait:
            raise InvalidError("timeout applies only with wait", {"field": "timeout"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ResizedEvent:
    """A waiting resize of the holder's lease was granted: ``reservation`` has its
    new amounts."""

    reservation: ReservationInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class Attach:
    """Re-bind the lease or waiter made with ``token`` to this connection (after a
    reconnect). ``id``: the reservation the client knew, so that one that ended while
    it was away is reported (its final state) instead of ``not_found``."""

    token: str
    id: str | None = None

    def check(self) -> None:
        check_token(self.token)
        if self.id is not None:
            check_reservation_id(self.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Preempt:
    target: str
    tenant: str | None = None
    pool: str | None = None

    def check(self) -> None:
        check_name("tenant", self.target)
        if self.tenant is not None:
            check_name("tenant", self.tenant)
        if self.pool is not None:
            check_name("pool", self.pool)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListReservations:
    """Active reservations, or with ``pending`` the queued requests in queue order."""

    pool: str | None = None
    tenant: str | None = None
    pending: bool = False
    #: only leases marked idle (``idle_after``)
    idle: bool = False

    def check(self) -> None:
        if self.pending and self.idle:
            raise InvalidError(
                "pending and idle cannot be combined: a waiting request holds no GPU",
                {"field": "idle"},
            )
        if self.pool is not None:
            check_name("pool", self.pool)
        if self.tenant is not None:
            check_name("tenant", self.tenant)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Dry run of ``request`` at ``priority`` (default: its tenant's): would it fit,
    wait, or evict whom? Changes nothing."""

    request: Reserve
    priority: int | None = None

    def check(self) -> None:
        if self.priority is not None:
            check_priority(self.priority)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourcesOf:
    """hypeman's GET /resources for one pool (the discovered ``host`` by default)."""

    pool: str = "host"

    def check(self) -> None:
        check_name("pool", self.pool)


@dataclass(frozen=True, slots=True, kw_only=True)
class Export:
    since: float | None = None
    tenant: str | None = None

    def check(self) -> None:
        if self.tenant is not None:
            check_name("tenant", self.tenant)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    """Ask for ``state`` pushes (a fresh status after every change)."""

    topics: list[Literal["state", "top"]] = field(default_factory=lambda: ["state"])

    def check(self) -> None:
        if not self.topics:
            raise InvalidError("topics: name at least one of state, top", {"field": "topics"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Register:
    """Add process ``pid`` (and its descendants) to lease ``id``'s processes, for GPU
    attribution (SPEC §10): ``resctl run`` registers its CMD. The process must be
    alive and belong to the caller's uid (or the caller be an admin). ``confine``:
    also put it in a cgroup limited to the lease's CPU and memory, where the host
    allows (``enforcement`` then says ``cgroup``; otherwise it runs unconfined)."""

    id: str
    pid: int
    confine: bool = False

    def check(self) -> None:
        check_reservation_id(self.id)
        check_pid(self.pid)


#: op name → argument type. The daemon's dispatch table must cover exactly these.
OPS: Final[dict[str, type]] = {
    "hello": Hello,
    "pool.create": PoolCreate,
    "pool.list": Empty,
    "pool.show": PoolName,
    "pool.set": PoolSet,
    "pool.delete": PoolDelete,
    "tenant.add": TenantAdd,
    "tenant.list": Empty,
    "tenant.show": TenantName,
    "tenant.set": TenantSet,
    "tenant.remove": TenantRemove,
    "reserve": Reserve,
    "release": ReservationRef,
    "renew": Renew,
    "preempt": Preempt,
    "list": ListReservations,
    "status": Empty,
    "export": Export,
    "subscribe": Subscribe,
    "resources": ResourcesOf,
    "why": ReservationRef,
    "plan": Plan,
    "attach": Attach,
    "register": Register,
    "top": Empty,
    "resize": Resize,
    "metrics": Empty,
}


# ------------------------------------------------------------------- result types


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloResult:
    server_version: str
    protocol: int
    boot_id: str
    uid: int
    gid: int
    pid: int
    admin: bool
    user_tenant: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberUsage:
    name: str
    capacity: int
    allocated: int
    whole: bool
    holders: int
    labels: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceUsage:
    """One resource of a pool, hypeman's shape: effective = capacity × ratio."""

    name: str
    unit: str
    capacity: int
    ratio: float
    effective: int
    allocated: int
    available: int
    kind: str = "scalar"
    source: str = "configured"
    lo: int | None = None
    hi: int | None = None
    members: list[MemberUsage] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolInfo:
    name: str
    resources: list[ResourceUsage]
    max_per_tenant: int
    preemption: str
    placement: str
    grace: float
    labels: dict[str, str]
    created_at: float
    active: int
    overuse: str = "warn"
    idle_after: float = 0.0
    adopt_foreign: bool = False
    #: live GPU figures from the last sample (empty when nothing is sampled)
    devices: list[DeviceUse] = field(default_factory=list)
    #: how many leases carry each mark now (``overuse``, ``idle``)
    marks: dict[str, int] = field(default_factory=dict)
    #: tenant → its quota here and what it holds
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaInfo:
    """A tenant's quota in one pool and what it holds there now (internal units; a
    set resource counts members). Above ``min`` it is borrowing."""

    min: dict[str, int] = field(default_factory=dict)
    max: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantInfo:
    name: str
    priority: int
    owners: list[int]
    groups: list[int]
    weight: float
    created_at: float
    active: int = 0
    #: pool → its quota there (``tenant show``)
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)
    #: fair share: its decayed usage (dominant-share seconds, SPEC §4) and that
    #: usage's part of all tenants' (0 to 1)
    usage: float = 0.0
    share: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationInfo:
    id: str
    tenant: str
    pool: str
    resources: dict[str, int]
    label: str
    created_at: float
    ttl: float | None
    expires_at: float | None
    binding: str
    reclaimable: bool
    state: str
    uid: int
    ended_at: float | None = None
    members: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[list[int]]] = field(default_factory=dict)
    devices: list[dict[str, str]] = field(default_factory=list)
    priority: int = 0
    pid: int | None = None
    #: for a ``pending`` request: its place in the queue (1 = head) and why it waits;
    #: for one that ended: why
    position: int = 0
    reason: str = ""
    #: for a ``terminating`` lease: when its grace ends
    deadline: float | None = None
    #: the strongest guard the host gives it (SPEC §10): mig, mps, cgroup, framework,
    #: watch, none
    enforcement: str = "none"
    #: the cgroup its registered processes run in (CPU / memory limits), "" when none
    cgroup: str = ""
    #: ``overuse`` / ``idle`` → what was seen, while the mark stands
    marks: dict[str, str] = field(default_factory=dict)
    #: processes registered to it (``register``), besides its pid / session peer
    processes: list[int] = field(default_factory=list)
    #: a gang's parts (one per pool ask), all granted and ended together; the lease's
    #: own amounts, members and devices are theirs together
    parts: list[ReservationInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEvent:
    seq: int
    at: float
    kind: str
    reservation: str
    tenant: str
    pool: str
    resources: dict[str, int]
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceStatus:
    """hypeman's ResourceStatus: effective_limit = capacity × oversub_ratio,
    available = effective_limit − allocated (internal units, see ``unit``)."""

    capacity: int
    effective_limit: int
    allocated: int
    available: int
    oversub_ratio: float
    source: str
    unit: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceUse:
    """One GPU (or MIG instance) as the last sample saw it: ``member`` is its name in
    the pool's ``gpu`` set; ``foreign`` the bytes held by no lease's processes
    (unmanaged work, the driver's own); ``overuse`` bytes leases hold beyond what they
    reserved here; ``utilization`` percent (None: not reported)."""

    member: str
    uuid: str
    memory_total: int
    memory_used: int
    foreign: int
    overuse: int = 0
    utilization: int | None = None
    foreign_pids: list[int] = field(default_factory=list)
    at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuStatus:
    """One GPU of the pool's ``gpu`` set: its memory and who holds it."""

    name: str
    index: str
    uuid: str
    model: str
    numa: str
    memory_bytes: int
    vram_allocated: int
    whole: bool
    holders: int
    #: live, from the last sample (None when it is not sampled)
    memory_used: int | None = None
    foreign_bytes: int = 0
    utilization: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Allocation:
    """hypeman's AllocationBreakdown, per reservation (cpu in millicores)."""

    reservation_id: str
    name: str
    tenant: str
    cpu: int
    memory_bytes: int
    disk_bytes: int
    network_bps: int
    disk_io_bps: int
    gpus: list[str]
    vram_bytes: int
    other: dict[str, int]
    #: live GPU memory its processes hold (from the last sample), and its marks
    vram_used_bytes: int = 0
    marks: dict[str, str] = field(default_factory=dict)


#: the kernel's cpulist form of a set of CPUs: ``0-27,56-83``
CPU_LIST: Final = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


@dataclass(frozen=True, slots=True, kw_only=True)
class HostResources:
    pool: str
    resources: dict[str, ResourceStatus]
    gpus: list[GpuStatus]
    allocations: list[Allocation]
    #: tenant → its quota in this pool and what it holds (resd's addition)
    quotas: dict[str, QuotaInfo] = field(default_factory=dict)
    #: NUMA node (as ``GpuStatus.numa``) → the host's CPUs on it, in ``CPU_LIST``
    #: form; nodes the daemon could not read are absent, and so is the whole map
    #: from daemons before it (what ``resctl export --format slurm`` needs for
    #: gres.conf ``Cores=``)
    numa_cpus: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolList:
    pools: list[PoolInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantList:
    tenants: list[TenantInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationList:
    reservations: list[ReservationInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    server_version: str
    boot_id: str
    started_at: float
    pools: list[PoolInfo]
    tenants: int
    active: int
    connections: int


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    events: list[HistoryEvent]


@dataclass(frozen=True, slots=True, kw_only=True)
class Done:
    """Result of ops that report only success."""

    removed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Preempted:
    reservations: list[ReservationInfo]


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitInfo:
    """Why a request waits: ``reason`` is ``resources`` (``details.resources`` has the
    per-resource shortfall, or ``details.held_for`` the waiter ahead that needs the
    same resources), ``conflict``, ``preemption_pending`` (``details.victims``) or
    ``none`` (it is not waiting; ``state`` says what it is)."""

    id: str
    state: str
    position: int
    queued: int
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanResult:
    """``fits``: granted at once; ``wait``: would queue; ``preempt``: would evict
    ``victims`` (after ``grace`` seconds); ``reclaim``: would take ``victims`` back
    from borrowers (the tenant asks within its quota's min); ``never``: cannot fit
    even so."""

    outcome: Literal["fits", "wait", "preempt", "reclaim", "never"]
    pool: str
    message: str
    victims: list[ReservationInfo] = field(default_factory=list)
    grace: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopRow:
    """One lease as ``resctl top`` shows it: what it reserved and what its processes
    use now. ``cpu_percent`` is of one core (200.0 = two cores busy); ``rss`` bytes;
    ``gpu_memory`` / ``gpu_utilization`` by gpu member name; ``idle_for`` seconds its
    GPUs and processes have been idle (0: busy, or not a GPU lease)."""

    id: str
    tenant: str
    pool: str
    state: str
    label: str
    priority: int
    resources: dict[str, int]
    members: dict[str, list[str]] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    cpu_percent: float = 0.0
    rss: int = 0
    gpu_memory: dict[str, int] = field(default_factory=dict)
    gpu_utilization: dict[str, int] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)
    enforcement: str = "none"
    idle_for: float = 0.0
    created_at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TopSnapshot:
    """Every lease's live use at ``at``, sampled every ``interval`` seconds;
    ``devices`` per pool (pool → its GPUs); ``gpu_sampling`` says why GPUs are not
    sampled ("" when they are)."""

    at: float
    interval: float
    rows: list[TopRow] = field(default_factory=list)
    devices: dict[str, list[DeviceUse]] = field(default_factory=dict)
    gpu_sampling: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsText:
    """The daemon's Prometheus metrics in the text exposition format, as its
    HTTP endpoint serves them (for node_exporter's textfile collector)."""

    text: str


#: op name → result type; the client decodes replies through this.
RESULTS: Final[dict[str, type]] = {
    "hello": HelloResult,
    "pool.create": PoolInfo,
    "pool.list": PoolList,
    "pool.show": PoolInfo,
    "pool.set": PoolInfo,
    "pool.delete": Done,
    "tenant.add": TenantInfo,
    "tenant.list": TenantList,
    "tenant.show": TenantInfo,
    "tenant.set": TenantInfo,
    "tenant.remove": Done,
    "reserve": ReservationInfo,
    "release": ReservationInfo,
    "renew": ReservationInfo,
    "preempt": Preempted,
    "list": ReservationList,
    "status": Status,
    "export": History,
    "subscribe": Status,
    "resources": HostResources,
    "why": WaitInfo,
    "plan": PlanResult,
    "attach": ReservationInfo,
    "register": ReservationInfo,
    "top": TopSnapshot,
    "resize": ReservationInfo,
    "metrics": MetricsText,
}


# -------------------------------------------------------------------- push events


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpiredEvent:
    reservation: ReservationInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class PreemptedEvent:
    reservation: ReservationInfo
    by: str
    deadline: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantedEvent:
    """A waiting request was granted; ``reservation`` is now active."""

    reservation: ReservationInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class DeniedEvent:
    """A waiting request left the queue ungranted (timeout, pool gone, cancelled);
    ``error`` is a wire error map (code, message, details)."""

    reservation_id: str
    error: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReclaimEvent:
    """A reclaimable lease is asked to give its resources back by ``deadline``;
    releasing in time ends it as ``released``, not ``preempted``."""

    reservation: ReservationInfo
    by: str
    deadline: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleasedEvent:
    """The lease was released by someone other than its holder (an admin, a deleted
    pool or removed tenant, or resd when it was not re-attached in time after a
    restart); ``reservation.reason`` says why."""

    reservation: ReservationInfo


@dataclass(frozen=True, slots=True, kw_only=True)
class StateEvent:
    """Pools after a change; pushed to ``subscribe``rs, coalesced per actor turn."""

    pools: list[PoolInfo]
    active: int
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkedEvent:
    """The reconciler put a mark on the lease (``on``) or took it off: ``mark`` is
    ``overuse`` (its processes hold more GPU memory than it reserved, or use a GPU
    not assigned to it) or ``idle``; ``detail`` says what was seen."""

    reservation: ReservationInfo
    mark: str
    on: bool
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TopEvent:
    """A new sample for ``top`` subscribers."""

    snapshot: TopSnapshot


#: event name → push type.
EVENTS: Final[dict[str, type]] = {
    "granted": GrantedEvent,
    "denied": DeniedEvent,
    "reclaim": ReclaimEvent,
    "expired": ExpiredEvent,
    "preempted": PreemptedEvent,
    "released": ReleasedEvent,
    "state": StateEvent,
    "marked": MarkedEvent,
    "top": TopEvent,
    "resized": ResizedEvent,
}
EVENT_NAMES: Final[dict[type, str]] = {v: k for k, v in EVENTS.items()}


# ---------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    id: int
    op: str
    args: Any


class RequestError(Exception):
    """A request could not be decoded; ``id`` is set when the envelope had one."""

    def __init__(self, request_id: int | None, error: ResdError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


def decode_request(frame: dict[str, Any]) -> Request:
    """Check the envelope and decode ``args``; raises RequestError."""
    rid = frame.get("id")
    request_id = (
        rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63 else None
    )
    if request_id is None:
        raise RequestError(
            None, InvalidError("request.id: expected a non-negative integer", {"field": "id"})
        )
    version = frame.get("v")
    if version != PROTOCOL_VERSION:
        raise RequestError(
            request_id,
            UnsupportedVersionError(
                f"protocol version {show(version)} is not supported; this daemon speaks {PROTOCOL_VERSION}",
                {"supported": [PROTOCOL_VERSION]},
            ),
        )
    unknown = sorted(str(k) for k in frame if k not in ("v", "id", "op", "args"))
    if unknown:
        raise RequestError(
            request_id,
            InvalidError(f"request: unknown field(s) {', '.join(unknown)}", {"unknown": unknown}),
        )
    op = frame.get("op")
    cls = OPS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise RequestError(
            request_id,
            InvalidError(
                f"unknown op {show(op)}; known ops: {', '.join(OPS)}",
                {"field": "op", "allowed": list(OPS)},
            ),
        )
    try:
        args: Any = from_wire(cls, frame.get("args", {}), "args")
    except ResdError as exc:
        raise RequestError(request_id, exc) from None
    return Request(id=request_id, op=op, args=args)  # type: ignore[arg-type]


def request(request_id: int, op: str, args: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op, "args": args}  # see pack()


def reply_ok(request_id: int, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}  # pack() maps dataclasses


def reply_error(request_id: int | None, error: ResdError) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": error.to_wire()}


def push(event: Any) -> dict[str, Any]:
    body: dict[str, Any] = _as_map(event)  # one level; pack() maps what is nested
    body["event"] = EVENT_NAMES[type(event)]
    return body


def decode_event(frame: dict[str, Any]) -> Any:
    """Typed push event from a frame with an ``event`` key; raises InvalidError."""
    body = dict(frame)
    name = body.pop("event")
    cls = EVENTS.get(name)
    if cls is None:
        raise InvalidError(f"unknown event {show(name)}", {"event": show(name)})
    return from_wire(cls, body, "event")
