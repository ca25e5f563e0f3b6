"""The protocol module on its own: framing, typed (de)coding, request envelopes (SPEC §1)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import msgspec
import pytest

from resd_client import protocol as p
from resd_client.errors import (
    ErrorCode,
    InsufficientError,
    InternalError,
    InvalidError,
    NotFoundError,
    ResdError,
    UnsupportedVersionError,
    error_from_wire,
)

# ---------------------------------------------------------------------------- framing

FRAMES: list[dict[str, Any]] = [
    {},
    {"v": 1, "id": 1, "op": "hello", "args": {"version": 1, "client": "t"}},
    {"id": 2**63 - 1, "ok": True, "result": {"n": -(2**62), "f": 1.5, "b": b"\x00\xff"}},
    {"nested": {"list": [1, [2, [3, {"k": None}]]], "unicode": "gpü ✓"}},
    {"big": "x" * 70_000},
]


def decode_all(decoder: p.FrameDecoder) -> list[Any]:
    return list(decoder.frames())


@pytest.mark.parametrize("obj", FRAMES, ids=range(len(FRAMES)))
def test_frame_round_trip(obj: dict[str, Any]) -> None:
    data = p.encode_frame(obj)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    decoder = p.FrameDecoder()
    decoder.feed(data)
    assert decode_all(decoder) == [obj]
    assert decoder.pending == 0


def test_split_delivery_one_byte_at_a_time() -> None:
    data = b"".join(p.encode_frame(f) for f in FRAMES[:4])
    decoder = p.FrameDecoder()
    out: list[Any] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        out.extend(decoder.frames())
    assert out == FRAMES[:4]
    assert decoder.pending == 0


def test_partial_frame_yields_nothing_until_complete() -> None:
    data = p.encode_frame(FRAMES[1])
    decoder = p.FrameDecoder()
    decoder.feed(data[:2])
    assert decode_all(decoder) == []
    decoder.feed(data[2:-1])
    assert decode_all(decoder) == []
    assert decoder.pending == len(data) - 1
    decoder.feed(data[-1:])
    assert decode_all(decoder) == [FRAMES[1]]


def test_several_frames_in_one_feed_and_a_trailing_partial() -> None:
    data = b"".join(p.encode_frame(f) for f in FRAMES)
    tail = p.encode_frame({"later": True})
    decoder = p.FrameDecoder()
    decoder.feed(data + tail[:5])
    assert decode_all(decoder) == FRAMES
    assert decoder.pending == 5
    decoder.feed(tail[5:])
    assert decode_all(decoder) == [{"later": True}]


def test_frame_too_large_is_raised_from_the_header_alone() -> None:
    decoder = p.FrameDecoder(max_frame=1024)
    decoder.feed(struct.pack(">I", 1025))
    with pytest.raises(p.FrameTooLarge, match="1025"):
        decode_all(decoder)


def test_frame_of_exactly_max_is_accepted() -> None:
    decoder = p.FrameDecoder(max_frame=1024)
    obj = {"s": ""}
    obj["s"] = "x" * (1024 - len(p.pack(obj)) - 2)  # str8 header: 2 bytes instead of 1
    data = p.encode_frame(obj)
    assert len(data) == 4 + 1024
    decoder.feed(data)
    assert decode_all(decoder) == [obj]


def test_default_max_frame_is_one_mib() -> None:
    assert p.DEFAULT_MAX_FRAME == 1 << 20
    decoder = p.FrameDecoder()
    decoder.feed(struct.pack(">I", (1 << 20) + 1))
    with pytest.raises(p.FrameTooLarge):
        decode_all(decoder)


BAD_PAYLOADS = {
    "reserved byte": b"\xc1",
    "truncated": b"\x92\x01",
    "extra data": b"\x80\x80",
    "empty": b"",
    "bad utf-8": b"\xa2\xff\xfe",
    "int key": msgpack.packb({1: 2}),
    "array": msgpack.packb([1, 2]),
    "int": msgpack.packb(7),
    "str": msgpack.packb("x"),
    "nil": msgpack.packb(None),
    "too deep": b"\x91" * 100_000 + b"\xc0",
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_bad_frame_leaves_later_frames_readable(payload: bytes) -> None:
    decoder = p.FrameDecoder()
    decoder.feed(
        p.encode_frame({"n": 1})
        + struct.pack(">I", len(payload))
        + payload
        + p.encode_frame({"n": 2})
    )
    frames = decoder.frames()
    assert next(frames) == {"n": 1}
    with pytest.raises(p.BadFrame):
        next(frames)
    assert decode_all(decoder) == [{"n": 2}]
    assert decoder.pending == 0


def test_bad_frame_message_says_what_was_wrong() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(p.encode_frame([1]))
    with pytest.raises(p.BadFrame, match="map"):
        decode_all(decoder)
    decoder.feed(struct.pack(">I", 1) + b"\xc1")
    with pytest.raises(p.BadFrame, match="msgpack"):
        decode_all(decoder)


# --------------------------------------------------------------- typed round trips

USAGE = p.ResourceUsage(
    name="cpu",
    unit="millicores",
    capacity=8000,
    ratio=4.0,
    effective=32000,
    allocated=1500,
    available=30500,
)
POOL = p.PoolInfo(
    name="gpu-box",
    resources=[USAGE, msgspec.structs.replace(USAGE, name="memory", unit="bytes", ratio=1.0)],
    max_per_tenant=1,
    preemption="lower_priority",
    placement="spread",
    grace=30.0,
    labels={"zone": "a", "kind": "gpu"},
    created_at=1_800_000_000.25,
    active=2,
)
TENANT = p.TenantInfo(
    name="alice",
    priority=7,
    owners=[1000, 1001],
    groups=[50],
    weight=2.5,
    created_at=1_800_000_000.0,
    active=1,
)
RESERVATION = p.ReservationInfo(
    id="r-0123456789ab",
    tenant="alice",
    pool="gpu-box",
    resources={"cpu": 1500, "memory": 8 << 30, "gpu": 2},
    label="train",
    created_at=1_800_000_001.0,
    ttl=3600.0,
    expires_at=1_800_003_601.0,
    binding="session",
    reclaimable=True,
    state="active",
    uid=1000,
)
ENDED = msgspec.structs.replace(
    RESERVATION, ttl=None, expires_at=None, state="released", ended_at=1_800_000_500.5
)
HISTORY_EVENT = p.HistoryEvent(
    seq=42,
    at=1_800_000_002.0,
    kind="reserved",
    reservation=RESERVATION.id,
    tenant="alice",
    pool="gpu-box",
    resources={"cpu": 1500},
    detail="",
)
STATUS = p.Status(
    server_version="1.0.0",
    boot_id="b" * 32,
    started_at=1_800_000_000.0,
    pools=[POOL],
    tenants=3,
    active=2,
    connections=4,
)

DEVICE = p.DeviceUse(
    member="0",
    uuid="GPU-0",
    memory_total=80 << 30,
    memory_used=70 << 30,
    foreign=10 << 30,
    overuse=10 << 30,
    utilization=93,
    foreign_pids=[4242],
    at=1_800_000_004.0,
)
TOP = p.TopSnapshot(
    at=1_800_000_004.0,
    interval=2.0,
    rows=[
        p.TopRow(
            id="r-0123456789ab",
            tenant="alice",
            pool="host",
            state="active",
            label="train",
            priority=5,
            resources={"vram": 20 << 30},
            members={"gpu": ["0"]},
            pids=[100, 101],
            cpu_percent=150.5,
            rss=2 << 30,
            gpu_memory={"0": 30 << 30},
            gpu_utilization={"0": 93},
            marks={"overuse": "holds 30.0 GiB on gpu 0 where it reserved 20.0 GiB"},
            enforcement="framework",
            idle_for=0.0,
            created_at=1_800_000_000.0,
        )
    ],
    devices={"host": [DEVICE]},
)

SAMPLES: dict[type, list[Any]] = {
    p.HelloResult: [
        p.HelloResult(
            server_version="1.0.0",
            protocol=1,
            boot_id="abc",
            uid=1000,
            gid=1000,
            pid=4242,
            admin=False,
            user_tenant="alice",
        )
    ],
    p.PoolInfo: [POOL, msgspec.structs.replace(POOL, resources=[], labels={})],
    p.PoolList: [p.PoolList(pools=[POOL, POOL]), p.PoolList(pools=[])],
    p.Done: [p.Done(), p.Done(removed=3)],
    p.TenantInfo: [TENANT, msgspec.structs.replace(TENANT, owners=[], groups=[])],
    p.TenantList: [p.TenantList(tenants=[TENANT]), p.TenantList(tenants=[])],
    p.ReservationInfo: [RESERVATION, ENDED],
    p.Preempted: [p.Preempted(reservations=[RESERVATION]), p.Preempted(reservations=[])],
    p.ReservationList: [p.ReservationList(reservations=[RESERVATION, ENDED])],
    p.Status: [STATUS],
    p.History: [p.History(events=[HISTORY_EVENT]), p.History(events=[])],
    p.ExpiredEvent: [p.ExpiredEvent(reservation=ENDED)],
    p.ReleasedEvent: [
        p.ReleasedEvent(
            reservation=msgspec.structs.replace(ENDED, state="released", reason="tenant removed")
        )
    ],
    p.GrantedEvent: [p.GrantedEvent(reservation=RESERVATION)],
    p.DeniedEvent: [
        p.DeniedEvent(
            reservation_id="r-0123456789ab",
            error={"code": "timeout", "message": "gave up", "details": {"timeout": 1.5}},
        )
    ],
    p.ReclaimEvent: [p.ReclaimEvent(reservation=RESERVATION, by="bob", deadline=1_800_000_030.0)],
    p.WaitInfo: [
        p.WaitInfo(
            id="r-0123456789ab",
            state="pending",
            position=2,
            queued=5,
            reason="resources",
            message="held back",
            details={"held_for": "r-aaaaaaaaaaaa"},
        )
    ],
    p.PlanResult: [
        p.PlanResult(outcome="fits", pool="gpu", message="fits"),
        p.PlanResult(
            outcome="preempt", pool="gpu", message="evict", victims=[RESERVATION], grace=30.0
        ),
    ],
    p.PreemptedEvent: [
        p.PreemptedEvent(reservation=RESERVATION, by="bob", deadline=1_800_000_030.0),
        p.PreemptedEvent(reservation=ENDED, by="bob"),
    ],
    p.StateEvent: [p.StateEvent(pools=[POOL], active=2, at=1_800_000_003.0)],
    p.MarkedEvent: [
        p.MarkedEvent(
            reservation=RESERVATION,
            mark="overuse",
            on=True,
            detail="holds 30.0 GiB on gpu 0 where it reserved 20.0 GiB",
        ),
        p.MarkedEvent(reservation=RESERVATION, mark="idle", on=False),
    ],
    p.TopSnapshot: [TOP, p.TopSnapshot(at=1_800_000_004.0, interval=2.0, gpu_sampling="no GPUs")],
    p.TopEvent: [p.TopEvent(snapshot=TOP)],
    p.MetricsText: [
        p.MetricsText(text=""),
        p.MetricsText(text="# TYPE resd_queue_length gauge\nresd_queue_length 3.0\n"),
    ],
    p.ResizedEvent: [p.ResizedEvent(reservation=RESERVATION)],
    p.HostResources: [
        p.HostResources(
            pool="host",
            resources={
                "cpu": p.ResourceStatus(
                    capacity=64000,
                    effective_limit=128000,
                    allocated=4000,
                    available=124000,
                    oversub_ratio=2.0,
                    source="detected",
                    unit="millicores",
                )
            },
            gpus=[
                p.GpuStatus(
                    name="0",
                    index="0",
                    uuid="GPU-0",
                    model="H100",
                    numa="0",
                    memory_bytes=80 << 30,
                    vram_allocated=20 << 30,
                    whole=False,
                    holders=1,
                )
            ],
            allocations=[
                p.Allocation(
                    reservation_id=RESERVATION.id,
                    name="job",
                    tenant="alice",
                    cpu=4000,
                    memory_bytes=8 << 30,
                    disk_bytes=0,
                    network_bps=0,
                    disk_io_bps=0,
                    gpus=["0"],
                    vram_bytes=20 << 30,
                    other={"licenses": 1},
                )
            ],
            numa_cpus={"0": "0-27,56-83", "1": "28-55,84-111"},
        ),
        p.HostResources(pool="empty", resources={}, gpus=[], allocations=[]),
    ],
}


def test_every_result_and_event_type_has_a_sample() -> None:
    assert set(p.RESULTS.values()) | set(p.EVENTS.values()) <= SAMPLES.keys()


SAMPLE_CASES = [(cls, obj) for cls, objs in SAMPLES.items() for obj in objs]


@pytest.mark.parametrize(
    ("cls", "obj"), SAMPLE_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(SAMPLE_CASES)]
)
def test_result_round_trip_through_msgpack(cls: type, obj: Any) -> None:
    wire = p.to_wire(obj)
    assert isinstance(wire, dict)
    decoded = p.FrameDecoder()
    decoded.feed(p.encode_frame(p.reply_ok(9, obj)))
    (frame,) = decoded.frames()
    assert frame["id"] == 9 and frame["ok"] is True
    assert frame["result"] == wire
    assert p.from_wire(cls, frame["result"], "result") == obj
    assert p.from_value(cls, frame["result"], "result") == obj, "the client's C path agrees"


@pytest.mark.parametrize("cls", list(p.EVENTS.values()), ids=list(p.EVENTS))
def test_push_round_trip(cls: type) -> None:
    for event in SAMPLES[cls]:
        frame = msgpack.unpackb(p.pack(p.push(event)), raw=False)
        assert frame["event"] == p.EVENT_NAMES[cls]
        assert "id" not in frame
        assert p.decode_event(frame) == event


def test_decode_event_refuses_unknown_events() -> None:
    with pytest.raises(InvalidError, match="unknown event"):
        p.decode_event({"event": "reboot"})
    with pytest.raises(InvalidError):
        p.decode_event({"event": "expired", "reservation": {"id": 1}})


def test_results_are_checked_field_by_field() -> None:
    wire = p.to_wire(RESERVATION)
    with pytest.raises(InvalidError, match=r"result\.resources\.cpu: expected int, got str"):
        p.from_wire(p.ReservationInfo, {**wire, "resources": {"cpu": "1"}}, "result")
    missing = {k: v for k, v in wire.items() if k != "uid"}
    with pytest.raises(InvalidError, match=r"result\.uid: required field is missing"):
        p.from_wire(p.ReservationInfo, missing, "result")
    with pytest.raises(InvalidError, match="unknown field"):
        p.from_wire(p.ReservationInfo, {**wire, "extra": 1}, "result")
    for bad, says in [
        ({**wire, "resources": {"cpu": "1"}}, r"result\.resources\.cpu: expected int, got str"),
        ({**wire, "extra": 1}, "unknown field"),
        ({**wire, "ttl": float("nan")}, r"result\.ttl: must be a finite number"),
        ({**wire, "uid": 2**63}, r"result\.uid: .* is out of range"),
        ({**wire, "reclaimable": 1}, r"result\.reclaimable: expected bool, got int"),
    ]:  # the C path refuses the same and lets the reference path say why
        with pytest.raises(InvalidError, match=says):
            p.from_value(p.ReservationInfo, bad, "result")


# ------------------------------------------------------------ requests, both ways

ARG_SAMPLES: dict[str, Any] = {
    "hello": p.Hello(version=1, client="worker/1.0"),
    "pool.create": p.PoolCreate(
        name="gpu-box",
        resources={
            "cpu": p.ResourceSpec(capacity=8000, ratio=4.0),
            "gpu": p.ResourceSpec(capacity=2),
        },
        max_per_tenant=0,
        preemption="lower_priority",
        placement="spread",
        grace=10.0,
        labels={"zone": "a"},
    ),
    "pool.list": p.Empty(),
    "pool.show": p.PoolName(name="gpu-box"),
    "pool.set": p.PoolSet(
        name="gpu-box", capacity={"cpu": 4000}, ratios={"cpu": 2.0}, remove=["gpu"], grace=5.0
    ),
    "pool.delete": p.PoolDelete(name="gpu-box", force=True),
    "tenant.add": p.TenantAdd(name="alice", priority=7, owners=[1000], groups=[50], weight=2.0),
    "tenant.list": p.Empty(),
    "tenant.show": p.TenantName(name="alice"),
    "tenant.set": p.TenantSet(name="alice", priority=3),
    "tenant.remove": p.TenantRemove(name="alice"),
    "reserve": p.Reserve(
        pool="gpu-box",
        resources={"cpu": 1500, "memory": 8 << 30},
        tenant="alice",
        ttl=60.0,
        binding="session",
        label="train",
        reclaimable=True,
        token="k3Qx-0_secret-token-abcdef",
    ),
    "release": p.ReservationRef(id="r-0123456789ab"),
    "renew": p.Renew(id="r-0123456789ab", ttl=30.0),
    "preempt": p.Preempt(target="bob", tenant="alice", pool="gpu-box"),
    "list": p.ListReservations(pool="gpu-box"),
    "status": p.Empty(),
    "export": p.Export(since=1_800_000_000.0, tenant="alice"),
    "subscribe": p.Subscribe(topics=["state", "top"]),
    "register": p.Register(id="r-0123456789ab", pid=4242),
    "top": p.Empty(),
    "metrics": p.Empty(),
    "resize": p.Resize(
        id="r-0123456789ab",
        resources={"gpu": 1, "cpu": 2000},
        give_back={"gpu": ["3"]},
    ),
    "resources": p.ResourcesOf(pool="host"),
    "why": p.ReservationRef(id="r-0123456789ab"),
    "plan": p.Plan(request=p.Reserve(pool="gpu-box", resources={"gpu": 2}), priority=9),
    "attach": p.Attach(token="k3Qx-0_secret-token-abcdef", id="r-0123456789ab"),
}


def test_every_op_has_an_argument_sample() -> None:
    assert ARG_SAMPLES.keys() == p.OPS.keys()
    for op, args in ARG_SAMPLES.items():
        assert isinstance(args, p.OPS[op]), op


@pytest.mark.parametrize("op", list(ARG_SAMPLES))
def test_request_round_trip(op: str) -> None:
    decoder = p.FrameDecoder()
    decoder.feed(p.encode_frame(p.request(17, op, ARG_SAMPLES[op])))
    (frame,) = decoder.frames()
    assert frame["v"] == p.PROTOCOL_VERSION
    req = p.decode_request(frame)
    assert req == p.Request(id=17, op=op, args=ARG_SAMPLES[op])
    assert p.decode_request_fast(p.pack(p.request(17, op, ARG_SAMPLES[op]))) == req


def test_defaults_fill_in_and_ints_are_accepted_as_floats() -> None:
    req = p.decode_request(
        {
            "v": 1,
            "id": 1,
            "op": "reserve",
            "args": {"pool": "p", "resources": {"cpu": 1}, "ttl": 10},
        }
    )
    assert req.args == p.Reserve(pool="p", resources={"cpu": 1}, ttl=10.0)
    assert isinstance(req.args.ttl, float)
    assert p.decode_request({"v": 1, "id": 2, "op": "list"}).args == p.ListReservations()


def request_error(frame: dict[str, Any]) -> p.RequestError:
    with pytest.raises(p.RequestError) as info:
        p.decode_request(frame)
    return info.value


@pytest.mark.parametrize(
    ("frame", "error_type", "words"),
    [
        ({"v": 1, "id": 5, "op": "reserve", "args": {"pool": "p"}}, InvalidError, "resources"),
        ({"v": 1, "id": 5, "op": "tenant.add", "args": {}}, InvalidError, "args.name"),
        (
            {"v": 1, "id": 5, "op": "reserve", "args": {"pool": "p", "resources": {"cpu": 1.5}}},
            InvalidError,
            "args.resources.cpu",
        ),
        ({"v": 1, "id": 5, "op": "reserve", "args": []}, InvalidError, "args"),
        (
            {"v": 1, "id": 5, "op": "tenant.add", "args": {"name": "a", "priority": 11}},
            InvalidError,
            "priority",
        ),
        ({"v": 1, "id": 5, "op": "nope", "args": {}}, InvalidError, "nope"),
        ({"v": 1, "id": 5, "args": {}}, InvalidError, "op"),
        ({"v": 1, "id": 5, "op": "list", "args": {}, "x": 1}, InvalidError, "x"),
        ({"v": 2, "id": 5, "op": "list", "args": {}}, UnsupportedVersionError, "version"),
    ],
)
def test_decode_request_errors_carry_the_request_id(
    frame: dict[str, Any], error_type: type[ResdError], words: str
) -> None:
    exc = request_error(frame)
    assert exc.request_id == 5
    assert isinstance(exc.error, error_type)
    assert words in exc.error.message
    assert p.reply_error(exc.request_id, exc.error) == {
        "id": 5,
        "ok": False,
        "error": {
            "code": str(error_type.code),
            "message": exc.error.message,
            "details": exc.error.details,
        },
    }


def test_missing_version_is_refused_with_the_id() -> None:
    exc = request_error({"id": 5, "op": "list", "args": {}})
    assert exc.request_id == 5
    assert isinstance(exc.error, InvalidError | UnsupportedVersionError)


@pytest.mark.parametrize("rid", [None, "5", -1, True, 1.0, 2**63, [5]])
def test_decode_request_without_a_usable_id(rid: Any) -> None:
    frame: dict[str, Any] = {"v": 1, "op": "list", "args": {}}
    if rid is not None:
        frame["id"] = rid
    exc = request_error(frame)
    assert exc.request_id is None
    assert isinstance(exc.error, InvalidError)
    assert "id" in exc.error.message


def test_largest_request_id_is_accepted() -> None:
    assert p.decode_request({"v": 1, "id": 2**63 - 1, "op": "list"}).id == 2**63 - 1
    assert p.decode_request({"v": 1, "id": 0, "op": "list"}).id == 0


def deep(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("field", ["v", "op", "args", "id"])
def test_deeply_nested_envelope_values_give_request_errors(field: str) -> None:
    frame: dict[str, Any] = {"v": 1, "id": 5, "op": "list", "args": {}}
    frame[field] = deep(5000)
    exc = request_error(frame)
    assert isinstance(exc.error, InvalidError | UnsupportedVersionError)
    assert len(exc.error.message) < 2000


@pytest.mark.parametrize(
    ("op", "field"),
    [
        ("reserve", "binding"),
        ("reserve", "pool"),
        ("reserve", "resources"),
        ("pool.create", "placement"),
        ("pool.create", "preemption"),
        ("pool.create", "labels"),
        ("subscribe", "topics"),
    ],
)
def test_deeply_nested_arg_values_give_invalid(op: str, field: str) -> None:
    args = p.to_wire(ARG_SAMPLES[op])
    args[field] = deep(5000)
    exc = request_error({"v": 1, "id": 5, "op": op, "args": args})
    assert exc.request_id == 5
    assert isinstance(exc.error, InvalidError)
    assert f"args.{field}" in exc.error.message
    assert len(exc.error.message) < 2000


def test_error_messages_do_not_echo_huge_values() -> None:
    exc = request_error({"v": 1, "id": 5, "op": "x" * 100_000, "args": {}})
    assert len(exc.error.message) < 2000
    args = p.to_wire(ARG_SAMPLES["reserve"])
    args["binding"] = "y" * 100_000
    assert len(request_error({"v": 1, "id": 5, "op": "reserve", "args": args}).error.message) < 2000


@pytest.mark.parametrize("name", ["a", "gpu-box", "pool_1.x", "A" * 64, "0"])
def test_good_names(name: str) -> None:
    p.check_name("pool", name)


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "a b", "../x", "-x", ".x", "x/y", "x\n", "\nx", "pööl", "x\x00"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidError, match="pool name"):
        p.check_name("pool", name)


@pytest.mark.parametrize("rid", ["r-0123456789ab\n", "r-ABCDEF", "r-12345", "x-0123456789ab"])
def test_bad_reservation_ids(rid: str) -> None:
    with pytest.raises(InvalidError, match="reservation id"):
        p.check_reservation_id(rid)


# --------------------------------------------------------------------------- errors


def test_error_reply_round_trip_gives_the_same_exception() -> None:
    error = InsufficientError(
        "pool 'p' cannot fit",
        {"resources": {"cpu": {"requested": 2, "available": 1, "shortfall": 1}}},
    )
    frame = msgpack.unpackb(p.pack(p.reply_error(3, error)), raw=False)
    back = error_from_wire(frame["error"])
    assert type(back) is InsufficientError
    assert back.message == error.message and back.details == error.details
    assert back.code == ErrorCode.INSUFFICIENT


@pytest.mark.parametrize(
    ("junk", "expected"),
    [
        (None, InternalError),
        ("boom", InternalError),
        ({"code": "weird", "message": "m"}, InternalError),
        ({"code": "not_found", "message": 5, "details": []}, NotFoundError),
    ],
)
def test_error_from_wire_is_tolerant_of_junk(junk: Any, expected: type) -> None:
    error = error_from_wire(junk)
    assert type(error) is expected
    assert isinstance(error.message, str) and isinstance(error.details, dict)
