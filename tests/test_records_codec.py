"""The hand-written codecs of the hot events write and read exactly what cattrs does:
the same msgpack bytes out, the same records back (from maps of today and of
releases before a field existed), and cattrs's own refusal for junk. Records share
their empty and their identical maps, which refuse to be changed in place."""

from __future__ import annotations

from typing import Any

import cattrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from resd.records import (
    EMPTY,
    TAGS,
    Ended,
    Event,
    Marked,
    Rebound,
    Registered,
    Renewed,
    Reservation,
    Reserved,
    Terminating,
    _generic,
    decode,
    encode,
    reservation_from_map,
    shared_amounts,
)

names = st.text("abcdefgh-0123456789", min_size=1, max_size=8)
floats = st.floats(min_value=0, max_value=2e9, allow_nan=False)
maybe_float = st.one_of(st.none(), floats)
maybe_int = st.one_of(st.none(), st.integers(1, 1 << 22))

reservations = st.builds(
    Reservation,
    id=names,
    tenant=names,
    pool=names,
    resources=st.dictionaries(names, st.integers(0, 1 << 40), max_size=3),
    label=st.text(max_size=5),
    created_at=floats,
    ttl=maybe_float,
    expires_at=maybe_float,
    binding=st.sampled_from(["session", "detached", "pid"]),
    session=st.text(max_size=5),
    reclaimable=st.booleans(),
    uid=st.integers(0, 1 << 20),
    state=st.sampled_from(["active", "terminating"]),
    deadline=maybe_float,
    members=st.dictionaries(names, st.lists(names, max_size=3).map(tuple), max_size=2),
    values=st.dictionaries(
        names,
        st.lists(st.tuples(st.integers(0, 99), st.integers(100, 200)), max_size=2).map(tuple),
        max_size=2,
    ),
    devices=st.lists(st.dictionaries(names, names, max_size=2), max_size=2).map(tuple),
    priority=st.integers(1, 10),
    pid=maybe_int,
    pid_start=maybe_float,
    reclaim=st.booleans(),
    token=st.text(max_size=5),
    peer=maybe_int,
    procs=st.lists(st.tuples(st.integers(1, 1 << 22), floats), max_size=2).map(tuple),
    enforcement=st.sampled_from(["none", "framework", "cgroup"]),
    cgroup=st.text(max_size=5),
    marks=st.dictionaries(st.sampled_from(["idle", "overuse"]), names),
    gang=st.lists(names, max_size=3).map(tuple),
)
hot_events = st.one_of(
    st.builds(Reserved, reservations),
    st.builds(Ended, names, st.sampled_from(["released", "expired", "preempted"]), floats, names),
    st.builds(Renewed, names, floats, floats, floats),
    st.builds(Terminating, names, floats, names, floats, st.booleans()),
    st.builds(Rebound, names, names, floats, maybe_int),
    st.builds(Registered, names, st.integers(1, 1 << 22), floats, floats, st.text(max_size=4)),
    st.builds(Marked, names, st.sampled_from(["idle", "overuse"]), st.booleans(), names, floats),
)


def by_cattrs(event: Event) -> dict[str, Any]:
    body: dict[str, Any] = _generic.unstructure(event)
    body["t"] = next(tag for tag, cls in TAGS.items() if cls is type(event))
    return body


def read_back(record: dict[str, Any]) -> Any:
    return msgpack.unpackb(msgpack.packb(record), raw=False, strict_map_key=False)


@given(hot_events)
def test_hot_events_are_written_and_read_as_cattrs_does(event: Event) -> None:
    written = encode(event)
    assert msgpack.packb(written) == msgpack.packb(by_cattrs(event))
    record = read_back(written)
    body = {k: v for k, v in record.items() if k != "t"}
    assert decode(record) == _generic.structure(body, type(event)) == event


def test_a_reservation_of_an_older_release_takes_the_defaults() -> None:
    """A map written before issue 9 (no token, peer, procs, ...) reads as cattrs reads it."""
    old = {
        "id": "r-000000000001",
        "tenant": "alice",
        "pool": "host",
        "resources": {"cpu": 2000},
        "label": "",
        "created_at": 1700000000,  # an int where a float is wanted: converted
        "ttl": 60,
        "expires_at": 1700000060.5,
        "binding": "detached",
        "session": "",
        "reclaimable": False,
        "uid": 1000,
        "members": {},
        "values": {"ports": [[30000, 30001]]},
    }
    mine, theirs = reservation_from_map(old), _generic.structure(old, Reservation)
    assert mine == theirs
    assert type(mine.created_at) is float and type(mine.ttl) is float
    assert mine.values == {"ports": ((30000, 30001),)}
    assert mine.members is EMPTY and mine.marks is EMPTY
    assert decode({"t": "ended", "id": "r-1", "state": "released", "at": 1}) == Ended(
        "r-1", "released", 1.0
    )


@pytest.mark.parametrize(
    "record",
    [
        {"t": "reserved", "reservation": {"id": "r-1"}},  # fields missing
        {"t": "reserved", "reservation": None},
        {"t": "ended", "id": "r-1", "state": "released", "at": "soon"},
        {"t": "renewed", "id": "r-1"},
    ],
)
def test_junk_is_refused_as_cattrs_refuses_it(record: dict[str, Any]) -> None:
    with pytest.raises(cattrs.BaseValidationError):
        decode(record)


def test_records_share_maps_that_refuse_changes() -> None:
    a, b = shared_amounts({"cpu": 10, "ports": 1}), shared_amounts({"cpu": 10, "ports": 1})
    assert a is b and a == {"cpu": 10, "ports": 1}
    assert shared_amounts({"ports": 1, "cpu": 10}) is not a  # order is kept, so not shared
    assert shared_amounts({}) is EMPTY
    for change in (
        lambda m: m.__setitem__("cpu", 1),
        lambda m: m.update(cpu=1),
        lambda m: m.pop("cpu"),
        lambda m: m.setdefault("x", 1),
        lambda m: m.clear(),
    ):
        with pytest.raises(TypeError):
            change(a)
        with pytest.raises(TypeError):
            change(EMPTY)
    assert a == {"cpu": 10, "ports": 1} and EMPTY == {}
    assert msgpack.packb(a) == msgpack.packb({"cpu": 10, "ports": 1})
    read = decode(read_back(encode(Reserved(reservation_from_map(by_map(a))))))
    assert isinstance(read, Reserved) and read.reservation.resources is a


def by_map(resources: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "r-1",
        "tenant": "t",
        "pool": "p",
        "resources": dict(resources),
        "label": "",
        "created_at": 1.0,
        "ttl": None,
        "expires_at": None,
        "binding": "detached",
        "session": "",
        "reclaimable": False,
        "uid": 0,
    }


QUEUED_ARGS = [
    {"pool": "p", "resources": {"cpu": 1000}, "wait": True},
    {
        "resources": {"vram": 20 << 30, "ports": 2},
        "members": {"disks": ["0", "3"]},
        "constraints": {"model": "H100"},
        "selector": {"zone": "a"},
        "contiguous": ["ports"],
        "placement": "spread",
        "tenant": "t",
        "ttl": 60.0,
        "deadline": 1_800_000_000.5,
        "token": "tok-0123456789abcdef",
        "label": "train",
        "wait": True,
        "timeout": 5.0,
    },
    {
        "parts": [
            {"pool": "a", "resources": {"gpu": 2}, "members": {"gpu": ["0", "3"]}},
            {"pool": "b", "resources": {"ports": 4}, "contiguous": ["ports"]},
        ],
        "wait": True,
    },
]


@pytest.mark.parametrize("raw", QUEUED_ARGS)
def test_a_queued_request_is_kept_as_to_wire_writes_it(raw: dict[str, Any]) -> None:
    """``Queued`` keeps a request's wire form; msgspec writes it (in C) with the same
    keys, order and values as ``to_wire``, so the journal's bytes are unchanged."""
    from resd_client.protocol import Reserve, from_wire, to_wire

    args = from_wire(Reserve, raw)
    assert msgpack.packb(_generic.unstructure(args)) == msgpack.packb(to_wire(args))
