"""Fuzz campaign (issue 10; SPEC §1, §7): a million fuzzed frames against a real resd.

Frames are random bytes, every op's sample request (``tests.test_protocol.
ARG_SAMPLES``) mutated in structure (values of every type and size swapped in, keys
dropped and added, ops and envelopes garbled) or in its bytes (bits flipped, bytes
inserted, cut, repeated), truncated payloads, msgpack oddities (ext types, invalid
UTF-8, non-string keys, headers announcing gigabytes), deep nesting, huge length
prefixes (which close the connection by design) and streams that end mid-frame.
A few are valid requests, so the handlers behind the decoder run too. They go out
in batches over several connections at once; after each batch a ``status`` request
must be answered, so a hung daemon fails fast.

What must hold: the daemon never dies, never answers ``internal`` (a bug) and
never closes a connection except after a frame over ``max_frame`` or at the
client's end of stream; afterwards its RSS and open file descriptors are back near
where they were, and it still answers ``status`` and a plain reserve/release with
consistent books.

The long version (1,000,000 frames) runs with ``-m campaign``; 20,000 by default.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import trio

from resd_client import Client
from resd_client.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    PoolCreate,
    ResourceSpec,
    TenantAdd,
    encode_frame,
    to_wire,
)
from tests.campaign import check_books, daemon_usage, wire
from tests.conftest import Daemons, Proc
from tests.test_protocol import ARG_SAMPLES

pytestmark = [pytest.mark.slow]

#: history kept small so that memory growth means a leak, not a full history
CONFIG = "history_limit = 500\n"
CONNECTIONS = 4
BATCH = 200
SENTINEL = (1 << 62) + 12345  # the first id of the campaign's own ``status`` requests
HEADER = struct.Struct(">I")

# ------------------------------------------------------------------ the generator

INTERESTING: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    7,
    255,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    0.0,
    -0.0,
    0.5,
    1.5,
    1e308,
    -1e308,
    5e-324,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "a",
    "x" * 300,
    "ü" * 80,
    "\x00",
    "../../etc/passwd",
    "alice",
    "bob",
    "gpu-box",
    "host",
    "cpu",
    "gpu",
    "session",
    "detached",
    "pid",
    "lower_priority",
    "r-0123456789ab",
    "k3Qx-0_secret-token-abcdef",
    b"",
    b"\xff" * 16,
    [],
    [1, 2, 3],
    ["gpu"],
    {},
    {"cpu": 1},
    {"cpu": -5},
    {"": None},
    {"gpu": ["0", "1-3"]},
    msgpack.ExtType(5, b"ext"),
    msgpack.Timestamp(1, 2),
]

#: map keys other than strings (msgpack can write them; the protocol refuses them)
ODD_KEYS: list[Any] = [1, -1, None, True, 1.5, b"v", ""]

#: raw payloads msgpack will not produce by itself
CRAFTED: list[bytes] = [
    b"\xdd\xff\xff\xff\xff",  # an array of 4 G elements, with none
    b"\xdf\xff\xff\xff\xff",  # a map of 4 G pairs
    b"\xdb\xff\xff\xff\xffab",  # a 4 GB string
    b"\xc6\x7f\xff\xff\xff",  # a 2 GB bin
    b"\xc9\x7f\xff\xff\xff\x01",  # a 2 GB ext
    b"\xc1",  # the one byte msgpack never uses
    b"\x81\xa2op\xa2\xff\xfe",  # {"op": invalid UTF-8}
    b"\x82\xa2op\xa6status\xa2op\xa4list",  # duplicate keys
    b"\x81\x01\x02",  # {1: 2}
    b"\x81\xc0\x01",  # {nil: 1}
    b"\x81\xc4\x01v\x01",  # {b"v": 1}
    b"\x81\x91\x01\x01",  # {[1]: 1}
    b"\x84\xa1v\x01\xa2id\x05\xa2op\xa6status\xa4args\xd6\xff\x00\x00\x00\x01",  # args: timestamp
    b"\x84\xa1v\x01\xa2id\xcf\xff\xff\xff\xff\xff\xff\xff\xff\xa2op\xa6status\xa4args\x80",
    b"\x84\xa1v\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\xa2id\x01\xa2op\xa6status\xa4args\x80",
    b"\x80",  # {}
    b"",
]
#: bytes worth writing over others: headers of big containers, nil, the unused byte
HOT_BYTES = b"\x00\xff\xc0\xc1\xc2\xc3\xcc\xcd\xce\xcf\xd0\xd3\xd9\xda\xdb\xdc\xdd\xde\xdf\xc7\xc8\xc9\xd4\xd8\x90\x80\xa0\x7f"


@dataclass(frozen=True)
class Frame:
    """One fuzzed frame: its bytes, and whether the daemon will close the stream after it
    (``closes``) or the stream is left mid-frame (``ends``: we stop writing)."""

    data: bytes
    kind: str
    closes: bool = False
    ends: bool = False


class Fuzzer:
    """Makes fuzzed frames from a seed (reproducible)."""

    def __init__(self, seed: int, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.rng = random.Random(seed)
        self.max_frame = max_frame
        self.samples = {op: to_wire(args) for op, args in ARG_SAMPLES.items()}
        self.ops = sorted(self.samples)
        names: set[str] = {"v", "id", "op", "args", "version", "client", "bogus"}
        for args in self.samples.values():
            names |= set(args)
        self.keys = sorted(names)
        kinds: list[tuple[str, float, Callable[[], Frame]]] = [
            ("valid", 0.08, self.valid),
            ("structure", 0.36, self.structure),
            ("bytes", 0.25, self.bytes_),
            ("truncated", 0.08, self.truncated),
            ("random", 0.08, self.random_bytes),
            ("crafted", 0.07, self.crafted),
            ("deep", 0.01, self.deep),
            ("wide", 0.004, self.wide),
            ("huge-length", 0.004, self.huge_length),
            ("eof-mid-frame", 0.002, self.eof_mid_frame),
        ]
        self.makers = [k[2] for k in kinds]
        self.weights = list(itertools.accumulate(k[1] for k in kinds))

    def frame(self) -> Frame:
        (make,) = self.rng.choices(self.makers, cum_weights=self.weights)
        return make()

    # ------------------------------------------------------------ pieces

    def rid(self) -> Any:
        r = self.rng.random()
        if r < 0.8:
            return self.rng.randrange(1 << 20)
        return self.rng.choice(INTERESTING)

    def envelope(self, op: str | None = None) -> dict[Any, Any]:
        op = op or self.rng.choice(self.ops)
        return {
            "v": PROTOCOL_VERSION,
            "id": self.rid(),
            "op": op,
            "args": copy.deepcopy(self.samples[op]),
        }

    def value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if r < 0.6 or depth > 3:
            return copy.deepcopy(self.rng.choice(INTERESTING))  # mutate() changes it in place
        if r < 0.7:
            return self.rng.randint(-(2**63), 2**64 - 1)  # what msgpack can write
        if r < 0.8:
            return "".join(
                chr(self.rng.randrange(0x20, 0x250)) for _ in range(self.rng.randrange(40))
            )
        if r < 0.9:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(5))]
        return {
            self.rng.choice(self.keys): self.value(depth + 1) for _ in range(self.rng.randrange(5))
        }

    def mutate(self, node: Any, depth: int = 0) -> Any:
        """``node`` with one thing changed somewhere inside it."""
        rng = self.rng
        if isinstance(node, dict) and node and rng.random() < 0.7 and depth < 6:
            key = rng.choice(list(node))
            r = rng.random()
            if r < 0.55:
                node[key] = self.mutate(node[key], depth + 1)
            elif r < 0.7:
                del node[key]
            elif r < 0.85:
                node[rng.choice(self.keys)] = self.value()
            else:
                new = rng.choice(ODD_KEYS) if rng.random() < 0.3 else f"{key}x"
                node[new] = node.pop(key)
            return node
        if isinstance(node, list) and node and rng.random() < 0.7 and depth < 6:
            i = rng.randrange(len(node))
            node[i] = self.mutate(node[i], depth + 1)
            return node
        return self.value()

    def pack(self, obj: Any) -> bytes | None:
        try:
            packed: bytes = msgpack.packb(obj, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            return None  # e.g. an int key msgpack cannot write
        return packed

    def framed(self, payload: bytes, kind: str) -> Frame:
        return Frame(HEADER.pack(len(payload)) + payload, kind)

    # ------------------------------------------------------------ kinds

    def valid(self) -> Frame:
        return Frame(encode_frame(self.envelope()), "valid")

    def structure(self) -> Frame:
        env = self.envelope()
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            env = self.mutate(env)
        payload = self.pack(env)
        return self.framed(payload, "structure") if payload is not None else self.random_bytes()

    def bytes_(self) -> Frame:
        payload = bytearray(encode_frame(self.envelope())[HEADER.size :])
        rng = self.rng
        for _ in range(rng.choice((1, 1, 2, 3, 5))):
            r = rng.random()
            at = rng.randrange(len(payload) + 1)
            if r < 0.3 and payload:
                payload[min(at, len(payload) - 1)] ^= 1 << rng.randrange(8)
            elif r < 0.55 and payload:
                payload[min(at, len(payload) - 1)] = rng.choice(HOT_BYTES)
            elif r < 0.7:
                payload[at:at] = rng.randbytes(rng.randrange(1, 9))
            elif r < 0.85:
                del payload[at : at + rng.randrange(1, 9)]
            else:
                end = min(len(payload), at + rng.randrange(1, 32))
                payload[at:at] = payload[at:end] * rng.randrange(1, 4)
        return self.framed(bytes(payload), "bytes")

    def truncated(self) -> Frame:
        payload = encode_frame(self.envelope())[HEADER.size :]
        return self.framed(payload[: self.rng.randrange(len(payload))], "truncated")

    def random_bytes(self) -> Frame:
        return self.framed(self.rng.randbytes(self.rng.randrange(65)), "random")

    def crafted(self) -> Frame:
        payload = self.rng.choice(CRAFTED)
        if self.rng.random() < 0.5:  # as the value of a field of a request
            env = self.envelope()
            raw = {k: self.pack(v) or b"\xc0" for k, v in env.items()}
            args = env["args"] if isinstance(env["args"], dict) else {}
            field_ = self.rng.choice(list(args) or ["args"])
            inner = {k: self.pack(v) or b"\xc0" for k, v in args.items()}
            inner[field_] = payload
            raw["args"] = raw_map(inner)
            payload = raw_map(raw)
        return self.framed(payload, "crafted")

    def deep(self) -> Frame:
        depth = self.rng.choice((100, 1_000, 5_000, 20_000, 100_000) * 3 + (300_000,))
        opener = self.rng.choice((b"\x91", b"\x81\xa1a", b"\xdc\x00\x01"))
        nested = opener * depth + b"\xc0"
        env = self.envelope()
        items = {k: self.pack(v) or b"\xc0" for k, v in env.items()}
        items["args" if self.rng.random() < 0.7 else "id"] = nested
        return self.framed(raw_map(items) if self.rng.random() < 0.8 else nested, "deep")

    def wide(self) -> Frame:
        env = self.envelope("reserve")
        n = self.rng.choice((1_000, 30_000))
        if self.rng.random() < 0.5:
            env["args"]["resources"] = {f"r{i}": i for i in range(n)}
        else:
            env["args"]["label"] = "x" * (n * 20)
        return Frame(encode_frame(env), "wide")

    def huge_length(self) -> Frame:
        length = self.rng.choice((self.max_frame + 1, 1 << 24, (1 << 32) - 1))
        return Frame(HEADER.pack(length) + self.rng.randbytes(16), "huge-length", closes=True)

    def eof_mid_frame(self) -> Frame:
        payload = encode_frame(self.envelope())[HEADER.size :]
        return Frame(HEADER.pack(len(payload) + 100) + payload, "eof-mid-frame", ends=True)


def raw_map(items: dict[str, bytes]) -> bytes:
    """A msgpack map whose values are already-encoded bytes."""
    head = (
        bytes([0x80 | len(items)]) if len(items) < 16 else b"\xde" + struct.pack(">H", len(items))
    )
    return head + b"".join(msgpack.packb(k) + v for k, v in items.items())


# ------------------------------------------------------------------ the campaign


@dataclass
class Tally:
    frames: int = 0
    bytes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    closed_by_daemon: int = 0
    unexpected_closes: list[str] = field(default_factory=list)


class Campaign:
    """Several connections, each sending batches of fuzzed frames then a ``status``."""

    def __init__(self, proc: Proc, total: int, seed: int) -> None:
        self.proc = proc
        self.total = total
        self.fuzzer = Fuzzer(seed)
        self.tally = Tally()
        self.ids = itertools.count(SENTINEL)
        self.rss: list[tuple[int, int]] = []  # (frames sent, daemon RSS)

    def batch(self) -> list[Frame]:
        frames: list[Frame] = []
        while len(frames) < BATCH and self.tally.frames < self.total:
            f = self.fuzzer.frame()
            frames.append(f)
            self.tally.frames += 1
            self.tally.bytes += len(f.data)
            self.tally.kinds[f.kind] += 1
            if f.closes or f.ends:
                break
        return frames

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sample)
            async with trio.open_nursery() as workers:
                for _ in range(CONNECTIONS):
                    workers.start_soon(self.worker)
            nursery.cancel_scope.cancel()

    async def sample(self) -> None:
        """The daemon's RSS every second, to tell a leak (growing all along) from a
        heap that grew once."""
        assert self.proc.proc is not None
        while True:
            rss, _ = daemon_usage(self.proc.proc.pid)
            self.rss.append((self.tally.frames, rss))
            await trio.sleep(1)

    async def worker(self) -> None:
        while self.tally.frames < self.total:
            await self.connection()

    async def connection(self) -> None:
        """One connection: hello, then batches until the budget is spent or the
        connection ends. A few connections skip hello: they send one batch (answered
        ``invalid``: hello must come first) and close, well within the handshake
        timeout."""
        stream = await trio.open_unix_socket(self.proc.socket)
        self.tally.connections += 1
        greeted = self.fuzzer.rng.random() < 0.97
        answered: dict[int, trio.Event] = {}
        eof = trio.Event()
        expect_close = False

        async def read() -> None:
            decoder = FrameDecoder(max_frame=64 << 20)
            while True:
                try:
                    data = await stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    eof.set()
                    for event in answered.values():
                        event.set()
                    return
                decoder.feed(data)
                for frame in decoder.frames():
                    self.count(frame, answered, greeted)

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(read)
            if greeted:
                hello = {"v": 1, "id": 0, "op": "hello", "args": {"version": 1, "client": "fuzz"}}
                await stream.send_all(encode_frame(hello))
            while self.tally.frames < self.total and not eof.is_set():
                frames = self.batch()
                last = frames[-1]
                data = b"".join(f.data for f in frames)
                if last.closes or last.ends:
                    expect_close = last.closes
                    await self.send(stream, data, eof)
                    break
                rid = next(self.ids)
                answered[rid] = trio.Event()
                await self.send(stream, data + encode_frame(status(rid)), eof)
                with trio.fail_after(30):
                    await answered[rid].wait()
                if eof.is_set():
                    self.tally.unexpected_closes.append(repr([f.data[:200] for f in frames]))
                    break
                del answered[rid]
                if not greeted:
                    break
            if not eof.is_set() and not expect_close:
                await stream.send_eof()
            with trio.fail_after(30):
                await eof.wait()
            nursery.cancel_scope.cancel()
        self.tally.closed_by_daemon += expect_close

    async def send(self, stream: trio.SocketStream, data: bytes, eof: trio.Event) -> None:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            eof.set()  # the daemon closed first (after a frame over max_frame)

    def count(self, frame: dict[str, Any], answered: dict[int, trio.Event], greeted: bool) -> None:
        if "event" in frame:
            self.tally.replies["push"] += 1
            return
        rid = frame.get("id")
        if isinstance(rid, int) and rid in answered:
            assert frame.get("ok") or not greeted, f"status after a batch failed: {frame}"
            answered[rid].set()
            return
        if frame.get("ok"):
            self.tally.replies["ok"] += 1
        else:
            code = frame.get("error", {}).get("code", "?")
            self.tally.replies[code] += 1
            assert code != "internal", f"the daemon hit a bug: {frame}"


def status(rid: int) -> dict[str, Any]:
    return {"v": 1, "id": rid, "op": "status", "args": {}}


def setup_state(proc: Proc) -> None:
    """The pool and tenants the samples name, so mutated requests reach the handlers."""
    with Client(proc.socket, reconnect=0) as c:
        c.call(
            "pool.create",
            PoolCreate(
                name="gpu-box",
                resources={"cpu": ResourceSpec(capacity=64_000), "gpu": ResourceSpec(capacity=8)},
                max_per_tenant=0,
                preemption="lower_priority",
            ),
        )
        c.call("tenant.add", TenantAdd(name="alice", priority=7))
        c.call("tenant.add", TenantAdd(name="bob", priority=3))


def settle(proc: Proc, fds: int, timeout: float = 10.0) -> tuple[int, int]:
    """The daemon's (RSS, fds) once its fd count is back to ``fds`` (connections
    closed), or whatever it is after ``timeout``."""
    assert proc.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        usage = daemon_usage(proc.proc.pid)
        if usage[1] <= fds or time.monotonic() > deadline:
            return usage
        time.sleep(0.05)


def fuzz(daemons: Daemons, total: int, capsys: pytest.CaptureFixture[str]) -> Tally:
    proc = daemons.make("fuzz", config=CONFIG).start()
    assert proc.proc is not None
    setup_state(proc)
    seed = int(time.time()) % 100_000
    time.sleep(0.3)  # the setup connection is closed on the daemon's side too
    rss0, fds0 = daemon_usage(proc.proc.pid)
    run = Campaign(proc, total, seed)
    started = time.monotonic()
    trio.run(run.run)
    seconds = time.monotonic() - started
    assert proc.proc.poll() is None, f"resd died: {proc.log_text()[-3000:]}"
    rss1, fds1 = settle(proc, fds0)
    t = run.tally
    peak = max([rss for _, rss in run.rss] + [rss1])
    quarters = [run.rss[len(run.rss) * q // 4 - 1] for q in (1, 2, 3, 4)] if run.rss else []
    growth = ", ".join(f"{n:,}: {rss / 2**20:.1f} MiB" for n, rss in quarters)
    with capsys.disabled():
        print(
            f"\nfuzz campaign: {t.frames} frames ({t.bytes >> 20} MiB) in {seconds:.1f}s"
            f" = {t.frames / seconds:,.0f} frames/s over {t.connections} connections"
            f" (seed {seed}); crashes 0, internal errors 0;"
            f" closed by the daemon after an oversized frame {t.closed_by_daemon};"
            f" RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB (peak {peak / 2**20:.1f};"
            f" by frames sent: {growth}), fds {fds0} -> {fds1};"
            f" kinds {dict(t.kinds)}; replies {dict(t.replies)}"
        )
    assert not t.unexpected_closes, t.unexpected_closes[:3]
    assert fds1 <= fds0, f"fds {fds0} -> {fds1}"
    assert rss1 - rss0 < 48 << 20, f"RSS {rss0 >> 20} -> {rss1 >> 20} MiB"
    # Still serving, with consistent books; the log has no error and no traceback.
    with Client(proc.socket, reconnect=0) as c:
        assert c.status().boot_id
        c.call(
            "pool.create",
            PoolCreate(name="after-fuzz", resources={"cpu": ResourceSpec(capacity=4000)}),
        )
        lease = c.reserve("after-fuzz", cpu="1", binding="detached", wait=False)
        assert lease.id in {r.id for r in c.list()}
        lease.release()
        check_books(wire(c, "pool.list", {})["pools"], wire(c, "list", {})["reservations"])
    log = proc.log_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]
    assert proc.stop() == 0, proc.log_text()[-3000:]
    return t


@pytest.mark.timeout(120)
def test_fuzz_campaign_short(daemons: Daemons, capsys: pytest.CaptureFixture[str]) -> None:
    tally = fuzz(daemons, 20_000, capsys)
    assert tally.replies["invalid"] > 10_000


@pytest.mark.campaign
@pytest.mark.timeout(3600)
def test_fuzz_campaign_a_million_frames(
    daemons: Daemons, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = fuzz(daemons, 1_000_000, capsys)
    assert tally.replies["invalid"] > 500_000
    assert tally.closed_by_daemon > 100
