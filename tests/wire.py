"""A raw trio protocol client for tests: send any bytes, read frames and pushes."""

from __future__ import annotations

import itertools
from typing import Any

import trio

from resd_client.protocol import PROTOCOL_VERSION, FrameDecoder, encode_frame


class WireClient:
    opened: list[WireClient] = []

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_frame=64 << 20)
        self.ids = itertools.count(1)
        self.pushes: list[dict[str, Any]] = []
        self.replies: dict[Any, dict[str, Any]] = {}

    @classmethod
    async def connect(cls, path: str, hello: bool = True) -> WireClient:
        stream = await trio.open_unix_socket(path)
        client = cls(stream)
        cls.opened.append(client)
        if hello:
            reply = await client.request("hello", {"version": PROTOCOL_VERSION, "client": "tests"})
            assert reply["ok"], reply
        return client

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, frame: Any) -> None:
        await self.stream.send_all(encode_frame(frame))

    async def next_frame(self) -> dict[str, Any] | None:
        """The next frame of any kind; None at EOF."""
        while True:
            for frame in self.decoder.frames():
                return frame  # type: ignore[no-any-return]
            data = await self.stream.receive_some(1 << 16)
            if not data:
                return None
            self.decoder.feed(data)

    async def reply_to(self, rid: Any) -> dict[str, Any]:
        while rid not in self.replies:
            frame = await self.next_frame()
            assert frame is not None, f"connection closed before the reply to {rid}"
            if "event" in frame:
                self.pushes.append(frame)
            else:
                self.replies[frame.get("id")] = frame
        return self.replies.pop(rid)

    async def request(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = next(self.ids)
        await self.send({"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": args or {}})
        return await self.reply_to(rid)

    async def ok(self, op: str, args: dict[str, Any] | None = None) -> Any:
        reply = await self.request(op, args)
        assert reply["ok"], reply
        return reply["result"]

    async def push(self) -> dict[str, Any]:
        while not self.pushes:
            frame = await self.next_frame()
            assert frame is not None, "connection closed while waiting for a push"
            if "event" in frame:
                self.pushes.append(frame)
            else:
                self.replies[frame.get("id")] = frame
        return self.pushes.pop(0)

    async def aclose(self) -> None:
        await self.stream.aclose()

    @classmethod
    async def close_all(cls) -> None:
        for client in cls.opened:
            await client.stream.aclose()
        cls.opened.clear()
