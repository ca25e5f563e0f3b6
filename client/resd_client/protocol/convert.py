"""The protocol's message base and the type-checking converter (SPEC §1).

Every protocol type is a ``Message``: a frozen msgspec Struct, so that the daemon
and the client decode and validate a whole message in one pass in C (``Int`` and
``Float`` carry the range and finiteness rules into that pass). ``from_wire`` is
the reference decoder the fast path falls back to whenever msgspec refuses a
message, so that every error a client sees names the field, what was expected and
what came, as the bad-input table says: it builds a message from a decoded msgpack map,
checking every field for type, range and size and refusing unknown fields, then
runs the type's own ``check``; ``to_wire`` turns one back into plain values.
Each type's checks are compiled once, on first use, into a closure.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, TypeVar, Union

import msgspec

from resd_client.errors import InvalidError
from resd_client.protocol.checks import show
from resd_client.quantity import MAX_QUANTITY

#: the largest finite float: NaN and ±inf fail ``Float``'s bounds
_MAX_FLOAT: Final = 1.7976931348623157e308
#: an integer field: within ±MAX_QUANTITY
Int = Annotated[int, msgspec.Meta(ge=-MAX_QUANTITY, le=MAX_QUANTITY)]
#: a float field: finite
Float = Annotated[float, msgspec.Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every protocol type: frozen, keyword-only, unknown fields refused.
    A type may define ``check()`` for rules across fields; decoding runs it."""


def is_message(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Message)


_NESTED: dict[type, tuple[str, ...]] = {}


def _holds_message(tp: Any) -> bool:
    return is_message(tp) or any(_holds_message(a) for a in typing.get_args(tp))


def _nested(cls: type) -> tuple[str, ...]:
    """The fields of ``cls`` whose type may hold a message (checked depth first)."""
    names = _NESTED.get(cls)
    if names is None:
        hints = typing.get_type_hints(cls)
        names = _NESTED[cls] = tuple(
            f.name for f in msgspec.structs.fields(cls) if _holds_message(hints[f.name])
        )
    return names


_CHECKS: dict[type, bool] = {}


def _messages_in(tp: Any) -> list[type]:
    """The message types a field of type ``tp`` may hold."""
    if is_message(tp):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _messages_in(arg)]


def has_checks(cls: type) -> bool:
    """Whether ``check_tree`` has anything to run on a ``cls``: a ``check()`` of its
    own, or of a message type it may hold (most results have none)."""
    found = _CHECKS.get(cls)
    if found is None:
        _CHECKS[cls] = False  # while looking: a type that holds itself adds nothing
        hints = typing.get_type_hints(cls)
        found = _CHECKS[cls] = callable(getattr(cls, "check", None)) or any(
            has_checks(m) for name in _nested(cls) for m in _messages_in(hints[name])
        )
    return found


def check_tree(obj: Any) -> None:
    """Run ``check()`` of a decoded message and of every message inside it, inner
    ones first (as ``from_wire`` does while it builds them)."""
    if isinstance(obj, Message):
        for name in _nested(type(obj)):
            check_tree(getattr(obj, name))
        check = getattr(obj, "check", None)
        if check is not None:
            check()
    elif isinstance(obj, list):
        for item in obj:
            check_tree(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            check_tree(item)


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
    if is_message(tp):
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
    if is_message(tp):
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
            (f.name, _converter(hints[f.name]), f.required) for f in msgspec.structs.fields(cls)
        )
    return fields


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


def from_value(cls: type[T], value: Any, path: str = "args") -> T:
    """``from_wire``'s result, built in one pass in C by msgspec from a decoded
    map (then the ``check()`` rules); anything msgspec refuses goes through
    ``from_wire`` for the error that names the field. What the client does with
    every reply and push."""
    try:
        obj = msgspec.convert(value, cls)
        check_tree(obj)
    except Exception:  # msgspec's ValidationError, a check's InvalidError
        return from_wire(cls, value, path)
    return obj


_NAMES: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = frozenset(name for name, _, _ in _fields_of(cls))
    return names


def _wire_names(cls: type) -> tuple[str, ...] | None:
    names = _WIRE_NAMES.get(cls)
    if names is None and is_message(cls):
        names = _WIRE_NAMES[cls] = tuple(f.name for f in msgspec.structs.fields(cls))
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
