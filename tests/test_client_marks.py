"""The client's side of GPU truth (SPEC §10), sans I/O: ``marked`` pushes reach the
lease, ``top`` pushes reach ``events()``, ``subscribe`` topics survive a
reconnection, ``register`` and ``top`` are plain requests, and a push this client
does not understand never breaks it."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resd_client import _core as core
from resd_client.errors import InvalidError
from resd_client.protocol import (
    Empty,
    FrameDecoder,
    GrantedEvent,
    MarkedEvent,
    TopEvent,
    TopRow,
    TopSnapshot,
    encode_frame,
    push,
    reply_ok,
)
from tests.test_reconnect_core import (
    HELLO_RESULT,
    RID,
    STATUS,
    FakeHost,
    answer_resume,
    info,
    perform_reply,
    resume,
    sent,
    step,
)

OVERUSE = "30 GiB on gpu 0 where 20 GiB reserved"


def snapshot() -> TopSnapshot:
    row = TopRow(
        id=RID, tenant="t", pool="p", state="active", label="", priority=5, resources={"cpu": 1}
    )
    return TopSnapshot(at=10.0, interval=2.0, rows=[row])


def mark(on: bool, name: str = "overuse", detail: str = OVERUSE, **changes: Any) -> MarkedEvent:
    return MarkedEvent(reservation=info(**changes), mark=name, on=on, detail=detail)


def test_a_marked_push_puts_the_mark_on_the_lease_and_reaches_events() -> None:
    host = FakeHost()
    lease = host.lease()
    event = mark(True)
    host.session.receive(encode_frame(push(event)))
    assert lease.marks == {"overuse": OVERUSE}
    assert host.pushes == [event]
    assert host.lease_events == [(RID, event)]
    assert lease.ended is None and not lease.pending


def test_taking_a_mark_off_keeps_the_others() -> None:
    host = FakeHost()
    lease = host.lease()
    host.session.receive(encode_frame(push(mark(True, "idle", "idle for 1h"))))
    host.session.receive(encode_frame(push(mark(True))))
    assert lease.marks == {"idle": "idle for 1h", "overuse": OVERUSE}
    # the daemon's reservation may or may not say so already: the event decides
    host.session.receive(encode_frame(push(mark(False, marks={"overuse": OVERUSE}))))
    assert lease.marks == {"idle": "idle for 1h"}
    host.session.receive(encode_frame(push(mark(True, "idle", "idle 2h", marks={"idle": "x"}))))
    assert lease.marks == {"idle": "idle 2h"}
    host.session.receive(encode_frame(push(mark(False, "idle", marks={"idle": "x"}))))
    assert lease.marks == {}


def test_a_newer_info_replaces_the_marks() -> None:
    host = FakeHost()
    lease = host.lease()
    host.session.receive(encode_frame(push(mark(True))))
    host.session.updated(info(marks={}))
    assert lease.marks == {}


def test_a_marked_push_before_the_lease_is_tracked_is_applied_when_it_is() -> None:
    host = FakeHost()
    host.session.receive(encode_frame(push(mark(True))))
    lease = host.lease()
    assert lease.marks == {"overuse": OVERUSE}


def test_a_marked_push_on_a_wait_does_not_settle_it() -> None:
    host = FakeHost()
    lease = host.lease("pending")
    host.session.receive(encode_frame(push(mark(True, state="pending"))))
    assert lease.pending and not lease._settled.is_set()
    host.session.receive(encode_frame(push(GrantedEvent(reservation=info()))))
    assert lease._settled.is_set()


def test_top_pushes_reach_events() -> None:
    host = FakeHost()
    event = TopEvent(snapshot=snapshot())
    host.session.receive(encode_frame(push(event)))
    assert host.pushes == [event]
    assert host.lease_events == []


@pytest.mark.parametrize(
    "frame",
    [
        {"event": "newfangled", "reservation": {"id": RID}},
        {"event": ["not", "a", "name"]},
        {"event": None},
        {"event": "top", "snapshot": {"at": 1.0, "interval": 2.0, "extra": 1}},
        {"event": "marked", "reservation": "junk", "mark": "idle", "on": True},
    ],
)
def test_a_push_this_client_does_not_understand_is_skipped(frame: dict[str, Any]) -> None:
    host = FakeHost()
    lease = host.lease()
    host.session.receive(encode_frame(frame))
    event = mark(True)
    host.session.receive(encode_frame(push(event)))  # the stream goes on
    assert host.pushes == [event] and lease.marks == {"overuse": OVERUSE}
    assert host.session.closed is None


# ---------------------------------------------------------------- subscribe


def subscribed(host: FakeHost, *topics: str) -> None:
    runner = core.Runner(core.subscribe(host, topics))
    frame = sent(host, runner.next())
    assert frame["op"] == "subscribe" and frame["args"] == {"topics": list(topics)}
    reply = step(runner)
    host.reply(frame["id"], STATUS)
    assert perform_reply(runner, reply) is None and runner.result == STATUS


def test_subscribe_defaults_to_state_as_before() -> None:
    host = FakeHost()
    runner = core.Runner(core.subscribe(host))
    assert sent(host, runner.next())["args"] == {"topics": ["state"]}


@pytest.mark.parametrize(
    ("topics", "resubscribed"),
    [
        (["top"], [["top"]]),
        (["state", "top"], [["state", "top"]]),
        (["top", "state"], [["state", "top"]]),
    ],
)
def test_a_resumption_subscribes_again_to_the_same_topics(
    topics: list[str], resubscribed: list[list[str]]
) -> None:
    host = FakeHost()
    subscribed(host, *topics)
    host.session.disconnect("gone")
    requests = resume(host)
    again = [f["args"]["topics"] for f in requests if f["op"] == "subscribe"]
    assert again == resubscribed
    answer_resume(host, requests, {})
    assert host.pushes[-1] == core.Reconnected(1)


def test_topics_of_several_subscribes_add_up() -> None:
    host = FakeHost()
    subscribed(host, "state")
    subscribed(host, "top")
    assert host.session.topics == ("state", "top")
    host.session.disconnect("gone")
    (again,) = [f["args"] for f in resume(host) if f["op"] == "subscribe"]
    assert again == {"topics": ["state", "top"]}


def test_a_refused_subscribe_is_not_renewed() -> None:
    host = FakeHost()
    call, _ = host.session.ask("subscribe", core.subscribe_args("top"), threading.Event())
    host.refuse(call.id, InvalidError("unknown topic"))
    assert not host.session.subscribed
    host.session.disconnect("gone")
    assert [f["op"] for f in resume(host)] == ["hello"]


@pytest.mark.parametrize(
    ("topics", "message"), [(["tops"], "'tops' is not allowed"), ([], "at least one")]
)
def test_bad_topics_are_refused_before_sending(topics: list[str], message: str) -> None:
    host = FakeHost()
    with pytest.raises(InvalidError, match=message):
        core.Runner(core.subscribe(host, topics)).next()


def test_one_topic_may_be_given_as_a_string() -> None:
    assert core.subscribe_args("top").topics == ["top"]


# ------------------------------------------------------------- register, top


def test_register_updates_the_tracked_lease() -> None:
    host = FakeHost()
    lease = host.lease()
    runner = core.Runner(core.register(host, RID, 4242))
    frame = sent(host, runner.next())
    assert (frame["op"], frame["args"]) == ("register", {"id": RID, "pid": 4242, "confine": False})
    reply = step(runner)
    host.reply(frame["id"], info(processes=[4242]))
    assert perform_reply(runner, reply) is None
    assert runner.result.processes == [4242] and lease.info.processes == [4242]


@pytest.mark.parametrize("op", sorted(core.LEASE_REPLIES))
def test_a_lease_reply_read_before_a_push_does_not_undo_it(op: str) -> None:
    """The reply and a ``marked`` push come in one read: the flow that resumes after
    both must not put the reply's older info back."""
    host = FakeHost()
    lease = host.lease()
    flow = core.register(host, RID, 7) if op == "register" else core.renew(host, RID, None)
    runner = core.Runner(flow)
    frame = sent(host, runner.next())
    reply = step(runner)
    host.session.receive(
        encode_frame(reply_ok(frame["id"], info(processes=[7]))) + encode_frame(push(mark(True)))
    )
    assert perform_reply(runner, reply) is None
    assert runner.result.marks == {} and lease.marks == {"overuse": OVERUSE}


@pytest.mark.parametrize(("rid", "pid"), [("nope", 1), (RID, 0), (RID, -5)])
def test_register_checks_its_arguments_before_sending(rid: str, pid: int) -> None:
    host = FakeHost()
    with pytest.raises(InvalidError):
        core.Runner(core.register(host, rid, pid)).next()


@pytest.mark.parametrize("op", ["register", "top"])
def test_register_and_top_are_sent_again_after_a_lost_reply(op: str) -> None:
    assert op in core.RESENT


def test_top_returns_the_snapshot() -> None:
    host = FakeHost()
    runner = core.Runner(core.top(host))
    frame = sent(host, runner.next())
    assert (frame["op"], frame["args"]) == ("top", {})
    reply = step(runner)
    host.reply(frame["id"], snapshot())
    assert perform_reply(runner, reply) is None
    assert runner.result == snapshot()


def test_an_empty_subscribe_args_counts_as_state() -> None:
    """A raw ``call("subscribe", Empty())`` (older code) subscribes to ``state``."""
    host = FakeHost()
    call, _ = host.session.ask("subscribe", Empty(), threading.Event())
    host.reply(call.id, STATUS)
    assert host.session.topics == ("state",)


# ------------------------------------------- the three clients, on a fake daemon


class FakeDaemon:
    """A thread that answers one connection as resd would: ``hello``, ``subscribe``
    (then one ``top`` push), ``register`` (then an unknown push and a ``marked``
    one, read in the same chunk as the reply), ``reserve``, ``release`` and ``top``;
    ends when the client closes."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.asked: list[tuple[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        decoder = FrameDecoder()
        with conn:
            while data := conn.recv(1 << 16):
                decoder.feed(data)
                for frame in decoder.frames():
                    self.asked.append((frame["op"], frame["args"]))
                    conn.sendall(b"".join(encode_frame(f) for f in self._answer(frame)))

    def _answer(self, frame: dict[str, Any]) -> list[Any]:
        rid, op, args = frame["id"], frame["op"], frame["args"]
        if op == "hello":
            return [reply_ok(rid, HELLO_RESULT)]
        if op == "subscribe":
            return [reply_ok(rid, STATUS), push(TopEvent(snapshot=snapshot()))]
        if op == "reserve":
            return [reply_ok(rid, info())]
        if op == "register":
            registered = info(processes=[args["pid"]])
            return [
                reply_ok(rid, registered),
                {"event": "from-the-future", "x": 1},
                push(mark(True, processes=[args["pid"]])),
            ]
        if op == "top":
            return [reply_ok(rid, snapshot())]
        assert op == "release", op
        return [reply_ok(rid, info(state="released"))]

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(short_tmp / "resd.sock")
    yield fake
    fake.close()


def check_conversation(fake: FakeDaemon, events: list[Any]) -> None:
    ops = [op for op, _ in fake.asked]
    assert ops[:5] == ["hello", "subscribe", "top", "reserve", "register"]
    assert fake.asked[1][1] == {"topics": ["top"]}
    assert fake.asked[4][1] == {"id": RID, "pid": 4242, "confine": False}
    assert events[0] == TopEvent(snapshot=snapshot())
    assert events[1] == mark(True, processes=[4242])


def test_the_sync_client(daemon: FakeDaemon) -> None:
    from resd_client import Client

    with Client(daemon.path, reconnect=0) as client:
        client.subscribe(["top"])
        assert client.top() == snapshot()
        lease = client.reserve("p", cpu=1, wait=False)
        lease.register(4242)
        assert lease.info.processes == [4242]
        events = list(itertools.islice(client.events(timeout=5), 2))
        assert lease.marks == {"overuse": OVERUSE}
        lease.release()
    check_conversation(daemon, events)


async def _converse(client_cls: Any, path: str) -> list[Any]:
    """The same conversation through either async client (their APIs are one)."""
    async with client_cls(path, reconnect=0) as client:
        await client.subscribe(["top"])
        assert await client.top() == snapshot()
        lease = await client.reserve("p", cpu=1, wait=False)
        await lease.register(4242)
        events = []
        async for event in client.events():
            events.append(event)
            if len(events) == 2:
                break
        assert lease.marks == {"overuse": OVERUSE}
        assert (await client.register(RID, 4242)).processes == [4242]
        return events


async def test_the_trio_client(daemon: FakeDaemon) -> None:
    from resd_client.trio import Client

    check_conversation(daemon, await _converse(Client, daemon.path))


def test_the_asyncio_client(daemon: FakeDaemon) -> None:
    from resd_client.asyncio import Client

    check_conversation(daemon, asyncio.run(_converse(Client, daemon.path)))
