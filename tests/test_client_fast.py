"""The client's cheap paths give what the reference paths give: a successful reply
read without its result (``decode_ok``) and typed on demand (``decode_result``, the
same value and the same errors as ``from_value``); everything else still read as a
map; quantities parsed once per distinct value; the sync client's ``Signal``
behaving as a set-once ``threading.Event``."""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import msgspec
import pytest

from resd_client import _core as core
from resd_client._sync import Signal
from resd_client.errors import InsufficientError, InvalidError
from resd_client.protocol import (
    RESULTS,
    GrantedEvent,
    Plan,
    PoolCreate,
    ReservationInfo,
    Reserve,
    decode_ok,
    decode_result,
    encode_frame,
    from_value,
    pack,
    push,
    reply_error,
    reply_ok,
    to_wire,
)
from resd_client.protocol.convert import has_checks
from resd_client.quantity import _parse, parse_quantity
from tests.test_reconnect_core import RID, FakeHost, info


def frame(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def result_of(payload: bytes) -> msgspec.Raw:
    reply = decode_ok(payload)
    assert reply is not None
    return reply.result


# ------------------------------------------------------------------ decode_ok


def test_decode_ok_reads_a_success_and_leaves_its_result_as_bytes() -> None:
    payload = pack(reply_ok(7, info()))
    reply = decode_ok(payload)
    assert reply is not None and reply.id == 7
    assert msgpack.unpackb(reply.result) == to_wire(info())


@pytest.mark.parametrize(
    "payload",
    [
        pack(reply_error(3, InsufficientError("no"))),  # an error reply
        pack(push(GrantedEvent(reservation=info()))),  # a push
        frame(event="granted", id=1, ok=True, result={}),  # a push, whatever else it has
        frame(id=True, ok=True, result={}),  # an id that is not an integer
        frame(id=1, ok=1, result={}),  # ok that is not true
        frame(ok=True, result={}),  # no id
        msgpack.packb([1, 2]),  # not a map
        b"\xc1",  # not msgpack
        b"",
    ],
)
def test_decode_ok_leaves_everything_else_to_the_map_path(payload: bytes) -> None:
    assert decode_ok(payload) is None


# -------------------------------------------------------------- decode_result


def test_decode_result_is_what_from_value_gives() -> None:
    wire = to_wire(info(members={"gpu": ["0", "3"]}, values={"ports": [[30000, 30009]]}))
    wire["created_at"] = 100  # an integer where a float goes, as msgpack may carry it
    typed = decode_result("reserve", result_of(frame(id=1, ok=True, result=wire)))
    assert typed == from_value(ReservationInfo, wire, "result")
    assert typed.members == {"gpu": ["0", "3"]} and typed.created_at == 100.0


def test_decode_result_refuses_fields_it_does_not_know_as_from_value_does() -> None:
    wire = to_wire(info())
    wire["new_in_a_later_daemon"] = 1
    with pytest.raises(InvalidError) as slow:
        from_value(ReservationInfo, wire, "result")
    with pytest.raises(InvalidError) as fast:
        decode_result("reserve", result_of(frame(id=1, ok=True, result=wire)))
    assert fast.value.message == slow.value.message
    assert fast.value.details == slow.value.details


@pytest.mark.parametrize(
    "result",
    [
        None,
        {**to_wire(info()), "state": 5},
        {**to_wire(info()), "uid": 2**63},
        {**to_wire(info()), "created_at": "yesterday"},
        {k: v for k, v in to_wire(info()).items() if k != "id"},
        {**to_wire(info()), "resources": {"cpu": b"1"}},
        [1, 2],
    ],
)
def test_a_bad_result_gets_the_reference_error(result: Any) -> None:
    with pytest.raises(InvalidError) as slow:
        from_value(ReservationInfo, result, "result")
    with pytest.raises(InvalidError) as fast:
        decode_result("reserve", result_of(frame(id=1, ok=True, result=result)))
    assert (fast.value.message, fast.value.details) == (slow.value.message, slow.value.details)


def test_a_result_with_keys_that_are_not_strings_names_the_field() -> None:
    result = {**to_wire(info()), "resources": {1: 1000}}
    with pytest.raises(InvalidError, match=r"result\.resources: keys must be strings"):
        decode_result("reserve", result_of(frame(id=1, ok=True, result=result)))


def test_an_op_without_a_result_type_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        decode_result("ping", result_of(frame(id=1, ok=True, result={})))


def test_has_checks_finds_checks_of_the_type_and_of_what_it_holds() -> None:
    assert has_checks(Reserve) and has_checks(PoolCreate)
    assert has_checks(Plan)  # only through the Reserve it holds
    assert not has_checks(ReservationInfo)  # holds itself (parts): looked at once
    assert not any(has_checks(cls) for cls in RESULTS.values())


# --------------------------------------------------- the session reads replies


def test_a_success_an_error_and_a_push_each_reach_their_place() -> None:
    host = FakeHost()
    lease = host.lease(state="pending")
    ok, _ = host.session.ask("renew", None, threading.Event())
    refused, _ = host.session.ask("reserve", None, threading.Event())
    data = (
        encode_frame(push(GrantedEvent(reservation=info())))
        + encode_frame(reply_ok(ok.id, info(ttl=90.0)))
        + encode_frame(reply_error(refused.id, InsufficientError("full")))
    )
    host.session.receive(data)
    assert not lease.pending and lease.info.ttl == 90.0  # the renew reply was applied
    assert ok.done.is_set() and ok.result() == info(ttl=90.0)
    assert ok.reply_frame() == {"id": ok.id, "ok": True, "result": to_wire(info(ttl=90.0))}
    with pytest.raises(InsufficientError, match="full"):
        refused.result()
    assert [type(p) for p in host.pushes] == [GrantedEvent]


def test_a_frame_split_across_reads_is_read_once_whole() -> None:
    host = FakeHost()
    call, _ = host.session.ask("release", None, threading.Event())
    data = encode_frame(reply_ok(call.id, info(state="released")))
    for i in range(len(data)):
        host.session.receive(data[i : i + 1])
    assert call.result() == info(state="released")


def test_a_pair_runs_through_the_flows() -> None:
    host = FakeHost()
    args = core.reserve_args("p", wait=False, cpu=1, tenant="t")
    runner = core.Runner(core.reserve(host, args))
    send = runner.next()
    assert isinstance(send, core.Send) and host.session.sending(send.call)
    host.session.receive(encode_frame(reply_ok(send.call.id, info())))
    reply = (runner.done(None), runner.next())[1]
    assert isinstance(reply, core.Reply)
    runner.done(reply.outcome())
    assert runner.next() is None
    lease = runner.result
    assert lease.id == RID and host.session.lease(RID) is lease and lease.token


# ------------------------------------------------------------------ quantities


@pytest.mark.parametrize(
    ("resource", "value", "allow_zero"),
    [
        ("cpu", 1, False),
        ("cpu", "1.5", False),
        ("cpu", "500m", False),
        ("memory", "8G", False),
        ("memory", 8192, False),
        ("net", "10Gbps", False),
        ("gpu", 2, False),
        ("cpu", 0, True),
        ("cpu", "0", True),
    ],
)
def test_a_cached_quantity_is_the_parsed_one(resource: str, value: Any, allow_zero: bool) -> None:
    expected = _parse(resource, value, allow_zero)
    for _ in range(2):
        assert parse_quantity(resource, value, allow_zero=allow_zero) == expected


def test_equal_values_of_other_types_are_not_taken_from_the_cache() -> None:
    assert parse_quantity("cpu", 1) == 1000
    with pytest.raises(InvalidError, match="got bool"):
        parse_quantity("cpu", True)
    assert parse_quantity("cpu", 0.0, allow_zero=True) == 0
    with pytest.raises(InvalidError, match="negative"):
        parse_quantity("cpu", -0.0, allow_zero=True)


def test_a_refusal_is_raised_every_time() -> None:
    for _ in range(2):
        with pytest.raises(InvalidError, match="must be greater than zero"):
            parse_quantity("cpu", 0)
        with pytest.raises(InvalidError, match="not a quantity"):
            parse_quantity("memory", "lots")


# ---------------------------------------------------------------------- Signal


def test_a_signal_is_a_set_once_event() -> None:
    signal = Signal()
    assert not signal.is_set()
    assert signal.wait(0.01) is False
    signal.set()
    signal.set()  # a second set changes nothing
    assert signal.is_set() and signal.wait(0) and signal.wait() and signal.wait(5)


def test_a_set_signal_wakes_every_waiter() -> None:
    signal = Signal()
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(signal.wait(10))) for _ in range(4)]
    for t in waiters:
        t.start()
    time.sleep(0.05)
    signal.set()
    for t in waiters:
        t.join(5)
    assert woke == [True] * 4


def _set_and_wait(signal: Signal, start: threading.Barrier) -> None:
    start.wait()
    signal.set()
    assert signal.wait(1)


def test_racing_sets_leave_a_signal_set() -> None:
    for _ in range(50):
        signal = Signal()
        start = threading.Barrier(3)
        threads = [threading.Thread(target=_set_and_wait, args=(signal, start)) for _ in range(2)]
        for t in threads:
            t.start()
        start.wait()
        assert signal.wait(5)
        for t in threads:
            t.join(5)
