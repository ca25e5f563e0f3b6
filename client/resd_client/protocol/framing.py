"""Framing: a 4-byte big-endian length, then one msgpack map (SPEC §1).

``FrameDecoder`` takes bytes as they arrive and yields decoded maps; an oversized
length raises ``FrameTooLarge`` (the connection must close), undecodable bytes
raise ``BadFrame`` (the framing is intact, the connection may go on).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Final

import msgpack
import msgspec

from resd_client.protocol.convert import _as_map

DEFAULT_MAX_FRAME: Final = 1 << 20
_HEADER: Final = struct.Struct(">I")


class FrameTooLarge(Exception):
    """A frame announced more bytes than allowed; the stream cannot be resynchronised."""


class BadFrame(Exception):
    """One frame's payload was not a msgpack map; the stream itself is intact."""


_ENCODER: Final = msgspec.msgpack.Encoder()


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj``; protocol messages inside are packed as maps (by
    msgspec, in C, without a plain-value copy first). What msgspec does not encode
    (msgpack's own ext types, which tests send to see them refused) goes through
    msgpack."""
    try:
        return _ENCODER.encode(obj)
    except TypeError:
        packed: bytes = msgpack.packb(obj, use_bin_type=True, default=_as_map)
        return packed


def unpack(payload: bytes) -> dict[str, Any]:
    """One frame's payload as a plain map: the reference decoding, whose errors
    (``BadFrame``) the bad-input rules name."""
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadFrame(f"frame is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise BadFrame(f"frame must be a msgpack map, got {type(value).__name__}")
    return value


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
        for payload in self.payloads():
            yield unpack(payload)

    def payloads(self) -> Iterator[bytes]:
        """Yield each complete frame's payload, undecoded (for a typed decoder).

        Raises FrameTooLarge when a header exceeds ``max_frame``.
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
            yield payload
