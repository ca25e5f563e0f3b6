"""Replay reads the lease-life records typed, straight into events (issue 14), and that
changes nothing it produces: the same events as the hand-written decoders make from
the records' maps, sharing the same names and maps; entries the typed reader cannot
read (other events, an older release's looser types, junk) go the old way."""

from __future__ import annotations

import gc
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
import trio
from hypothesis import given

from resd.config import Config
from resd.daemon import Daemon, _gc_paused
from resd.journal import Journal, JournalCorrupt
from resd.records import (
    EMPTY,
    RECORD,
    Ended,
    Event,
    Reservation,
    Reserved,
    Tenant,
    TenantSaved,
    decode,
    encode,
    shared_amounts,
)
from tests.test_journal import UNDECODABLE, frame, seg_path, segment
from tests.test_records_codec import by_map, hot_events
from tests.test_state_formats import FIXTURES, NAMES
from tests.test_state_formats import replay as replay_plainly

read_typed = msgspec.msgpack.Decoder(RECORD).decode


def as_map(event: Event) -> dict[str, Any]:
    record: dict[str, Any] = msgpack.unpackb(msgpack.packb(encode(event)), raw=False)
    return record


@given(hot_events)
def test_a_typed_record_is_the_event_its_map_is(event: Event) -> None:
    typed = read_typed(msgpack.packb(encode(event)))
    assert not isinstance(typed, dict)
    got, by_map_ = decode(typed), decode(as_map(event))
    assert got == by_map_ == event
    if isinstance(got, Reserved):
        r, expected = got.reservation, by_map_.reservation  # type: ignore[attr-defined]
        for name in ("tenant", "pool", "label", "binding", "session", "state", "enforcement"):
            assert getattr(r, name) is sys.intern(getattr(expected, name)), name
        assert r.resources is shared_amounts(expected.resources)
        for name in ("members", "values", "marks"):
            assert (getattr(r, name) is EMPTY) == (getattr(expected, name) is EMPTY), name
        for member in (m for names in r.members.values() for m in names):
            assert member is sys.intern(member)
    if isinstance(got, Ended):
        assert got.state is sys.intern(got.state) and got.reason is sys.intern(got.reason)


def test_a_typed_reservation_of_an_older_release_takes_the_defaults() -> None:
    old = {**by_map({"cpu": 10}), "created_at": 1700000000, "ttl": 60}  # ints for floats
    typed = read_typed(msgpack.packb({"reservation": old, "t": "reserved"}))
    got = decode(typed)
    assert got == decode({"reservation": old, "t": "reserved"})
    assert isinstance(got, Reserved)
    r = got.reservation
    assert type(r.created_at) is float and type(r.ttl) is float
    assert r.members is EMPTY and r.values is EMPTY and r.marks is EMPTY
    assert (r.state, r.enforcement, r.priority, r.procs, r.gang) == ("active", "none", 1, (), ())


def loose(lsn: int) -> list[dict[str, Any]]:
    """Records the hand-written decoders read but msgspec's strict types do not."""
    return [
        {"reservation": {**by_map({"cpu": 1}), "id": f"r-{lsn}", "uid": 1000.0}, "t": "reserved"},
        {"id": "r-x", "state": "released", "at": "12.5", "reason": "", "t": "ended"},
        {
            "reservation": {**by_map({"cpu": 1}), "id": f"r-{lsn}b", "reclaimable": 0},
            "t": "reserved",
        },
    ]


def write_log(state: Path, entries: list[tuple[str, list[Any]]]) -> None:
    journal = Journal(state, "never")
    journal.recover()
    for domain, records in entries:
        journal.append(domain, records)
    trio.run(journal.close)


def recovered(state: Path, records: Any = Any) -> list[tuple[int, str, list[Any]]]:
    got: list[tuple[int, str, list[Any]]] = []
    kwargs = {} if records is Any else {"records": records}
    Journal(state, "never").recover(lambda *entry: got.append(entry), **kwargs)
    return got


def test_the_journal_reads_what_it_can_typed_and_the_rest_as_maps(tmp_path: Path) -> None:
    r = Reservation(
        id="r-1",
        tenant="t",
        pool="p",
        resources={"cpu": 1},
        label="",
        created_at=1.0,
        ttl=None,
        expires_at=None,
        binding="detached",
        session="",
        reclaimable=False,
        uid=0,
    )
    entries: list[tuple[str, list[Any]]] = [
        ("pools", [encode(Reserved(r)), encode(Ended("r-1", "released", 2.0))]),
        ("tenants", [encode(TenantSaved(Tenant("t", 1)))]),  # not a typed record
        ("pools", loose(3)),
        ("pools", [encode(Reserved(r)), encode(TenantSaved(Tenant("u", 1)))]),  # mixed
        ("other", [1, "two", None]),  # not records at all
    ]
    write_log(tmp_path, entries)
    plain, typed = recovered(tmp_path), recovered(tmp_path, RECORD)
    assert [(lsn, d) for lsn, d, _ in typed] == [(lsn, d) for lsn, d, _ in plain]
    kinds = [{type(x) is dict for x in records} for _, _, records in typed]
    assert kinds == [{False}, {True}, {True}, {True}, {False}]
    assert typed[4] == plain[4] == (5, "other", [1, "two", None])
    for (_, _, a), (_, _, b) in zip(typed[:4], plain[:4], strict=True):
        assert [decode(x) for x in a] == [decode(x) for x in b]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (segment(frame(1, "d", []), UNDECODABLE, frame(2, "d", [])), "undecodable entry"),
        (segment(frame(1, "d", {"no": "list"}), frame(2, "d", [])), "wrong shape"),
        (segment(frame(1, "d", []), frame(1, "d", [])), "lsn 1 where 2 was expected"),
        (segment(frame(1, "d", []), frame(2, "d", {"no": "list"})), ""),  # torn tail
    ],
)
def test_typed_reading_refuses_what_plain_reading_refuses(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    outcomes = []
    for records in (Any, RECORD):
        seg_path(tmp_path, 1).write_bytes(content)
        if reason:
            with pytest.raises(JournalCorrupt, match=reason) as info:
                recovered(tmp_path, records)
            outcomes.append(str(info.value))
        else:
            outcomes.append(Journal(tmp_path, "never").recover(records=records).warnings)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("name", NAMES)
def test_the_daemon_replays_golden_state_into_the_plain_books(name: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(FIXTURES / name, state)
    plain = json.loads(json.dumps(replay_plainly(state)))
    daemon = Daemon(Config(state_dir=str(state), fsync="never"), handle_signals=False)
    journal = Journal(state, "never")
    pools, tenants, _fresh = daemon._recover(journal)
    trio.run(journal.close)
    assert json.loads(json.dumps(pools.snapshot())) == plain["pools"]
    assert json.loads(json.dumps(tenants.snapshot())) == plain["tenants"]


def test_collection_is_paused_inside_and_resumes_as_it_was() -> None:
    assert gc.isenabled()
    with _gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _gc_paused():
        raise RuntimeError("a replay that fails")
    assert gc.isenabled()
    gc.disable()
    try:
        with _gc_paused():
            pass
        assert not gc.isenabled(), "left off when it was off"
    finally:
        gc.enable()
