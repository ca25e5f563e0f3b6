"""The envelopes around ops and events (SPEC §1).

Requests ``{"v":1,"id":N,"op":...,"args":{...}}`` decode into a ``Request``
whose ``args`` is one of the frozen types in ``OPS``; every field is checked for
type, range and size, and unknown fields are refused. Replies
``{"id":N,"ok":true,"result":{...}}`` / ``{"id":N,"ok":false,"error":...}`` and
pushes ``{"event":name, ...}`` are built by ``reply_ok``, ``reply_error`` and
``push``. A client reads a successful reply with ``decode_ok`` (its ``result``
stays msgpack until ``decode_result`` gives it its op's type) and everything
else as a plain map.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgpack
import msgspec

from resd_client.errors import InvalidError, ResdError, UnsupportedVersionError
from resd_client.protocol.checks import show
from resd_client.protocol.convert import (
    Int,
    Message,
    _as_map,
    check_tree,
    from_value,
    from_wire,
    has_checks,
)
from resd_client.protocol.events import EVENT_NAMES, EVENTS
from resd_client.protocol.ops import OPS
from resd_client.protocol.results import RESULTS

PROTOCOL_VERSION: Final = 1


class Request(Message, frozen=True):
    id: Int
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


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """A request as the fast path reads it: ``args`` left as raw bytes until the op
    says which type they are."""

    v: int = -1
    id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = -1
    op: str = ""
    args: msgspec.Raw = msgspec.Raw(b"\x80")  # an empty map, as the slow path's default


_ENVELOPE: Final = msgspec.msgpack.Decoder(_Envelope)
_ARGS: Final[dict[str, msgspec.msgpack.Decoder[Any]]] = {
    op: msgspec.msgpack.Decoder(cls) for op, cls in OPS.items()
}


def decode_request_fast(payload: bytes) -> Request | None:
    """A well-formed request, decoded and validated in one pass by msgspec, then
    its ``check()`` rules; None for anything msgspec or a check refuses — the
    caller then decodes it the reference way (``unpack`` + ``decode_request``),
    whose error names the field, so every bad input gets the same answer either
    way. Never raises."""
    try:
        env = _ENVELOPE.decode(payload)
        decoder = _ARGS.get(env.op)
        if decoder is None or env.v != PROTOCOL_VERSION or env.id < 0:
            return None
        args = decoder.decode(env.args)
        check_tree(args)
    except Exception:  # msgspec's DecodeError/ValidationError, a check's InvalidError
        return None
    return Request(id=env.id, op=env.op, args=args)


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
    return from_value(cls, body, "event")


class OkReply(msgspec.Struct):
    """A successful reply as a client reads it: ``result`` left as msgpack bytes
    until the caller asks for its type (``decode_result``); fields it does not know
    are ignored, as in a map."""

    id: int
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"\xc0")  # a reply without one has nil
    #: only to tell a push (a map with ``event``) from a reply
    event: Any = msgspec.UNSET


_OK: Final = msgspec.msgpack.Decoder(OkReply)
_RESULTS: Final[dict[str, msgspec.msgpack.Decoder[Any]]] = {
    op: msgspec.msgpack.Decoder(cls) for op, cls in RESULTS.items()
}


def decode_ok(payload: bytes) -> OkReply | None:
    """A frame that is ``{"id": N, "ok": true, ...}``, read in one pass in C without
    its result; None for anything else (an error reply, a push, a bad frame): the
    caller reads those as a plain map (``unpack``). Never raises."""
    try:
        reply = _OK.decode(payload)
    except msgspec.DecodeError:  # ValidationError too: not that shape
        return None
    return reply if reply.ok is True and reply.event is msgspec.UNSET else None


def decode_result(op: str, result: msgspec.Raw) -> Any:
    """The ``RESULTS[op]`` of a reply's raw ``result``, decoded and validated in one
    pass by msgspec, then its ``check()`` rules; anything refused is decoded again
    the reference way (``from_wire``) for the error that names the field, as
    ``from_value`` does. Raises InvalidError; KeyError for an op without a result
    type."""
    decoder = _RESULTS.get(op)
    if decoder is not None:
        try:
            value = decoder.decode(result)
            if has_checks(RESULTS[op]):
                check_tree(value)
        except Exception:  # msgspec's DecodeError/ValidationError, a check's InvalidError
            pass
        else:
            return value
    return from_wire(RESULTS[op], decode_plain(result), "result")


def decode_plain(data: bytes | msgspec.Raw) -> Any:
    """Plain values of msgpack ``data`` that msgspec already read whole (a reply, or
    its result): keys that are not strings are let through, for ``from_wire`` to
    name; never raises for such data."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
