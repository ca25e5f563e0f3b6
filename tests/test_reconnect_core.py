"""The sans-I/O side of reconnecting (``resd_client._core``), fed bytes by hand.

A ``Host`` without I/O drives flows step by step; the session's frames are decoded
to see what a client would send, and replies are encoded as the daemon would send
them. No socket, no daemon, no clock: these run in milliseconds.
"""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import pytest

from resd_client import _core as core
from resd_client.errors import (
    ConflictError,
    ForbiddenError,
    InvalidError,
    NotFoundError,
    ResdError,
    TimeoutError_,
    UnavailableError,
)
from resd_client.protocol import (
    TOKEN,
    DeniedEvent,
    Empty,
    ExpiredEvent,
    FrameDecoder,
    GrantedEvent,
    Hello,
    HelloResult,
    PoolName,
    PreemptedEvent,
    ReclaimEvent,
    ReleasedEvent,
    ReservationInfo,
    ReservationList,
    Status,
    encode_frame,
    push,
    reply_error,
    reply_ok,
)

RID = "r-0123456789ab"
HELLO = Hello(version=1, client="tests")


def info(rid: str = RID, state: str = "active", **changes: Any) -> ReservationInfo:
    fields: dict[str, Any] = {
        "id": rid,
        "tenant": "t",
        "pool": "p",
        "resources": {"cpu": 1000},
        "label": "job",
        "created_at": 100.0,
        "ttl": 60.0,
        "expires_at": 160.0,
        "binding": "session",
        "reclaimable": False,
        "state": state,
        "uid": 0,
    }
    fields.update(changes)
    return ReservationInfo(**fields)


HELLO_RESULT = HelloResult(
    server_version="9.9",
    protocol=1,
    boot_id="b2",
    uid=0,
    gid=0,
    pid=1,
    admin=True,
    user_tenant="root",
)
STATUS = Status(
    server_version="9.9",
    boot_id="b2",
    started_at=0.0,
    pools=[],
    tenants=0,
    active=0,
    connections=1,
)


class FakeHost:
    """A client without I/O: flags are threading.Events, frames are decoded."""

    timeout = 1.0

    def __init__(self) -> None:
        self.pushes: list[Any] = []
        self.lease_events: list[tuple[str, Any]] = []
        self.session = core.Session(
            on_push=self.pushes.append,
            on_lease=lambda lease, event: self.lease_events.append((lease.id, event)),
            on_close=lambda: None,
        )

    def _new_flag(self) -> threading.Event:
        return threading.Event()

    def _new_lease(self, info: ReservationInfo, on_reclaim: Any) -> core.LeaseState:
        return core.LeaseState(info, threading.Event(), on_reclaim)

    def lease(self, state: str = "active", rid: str = RID, token: str | None = None) -> Any:
        lease = self._new_lease(info(rid, state), None)
        lease.token = token or f"tok-{rid}-0123456789"
        return self.session.track(lease)

    def reply(self, call_id: int, result: Any) -> None:
        self.session.receive(encode_frame(reply_ok(call_id, result)))

    def refuse(self, call_id: int, error: ResdError) -> None:
        self.session.receive(encode_frame(reply_error(call_id, error)))


def frames(data: bytes) -> list[dict[str, Any]]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder.frames())


def step(runner: core.Runner[Any], value: Any = None) -> Any:
    runner.done(value)
    return runner.next()


def perform_reply(runner: core.Runner[Any], need: core.Reply) -> Any:
    """What a client does with a ``Reply`` whose call is done: the outcome, or the
    error thrown into the flow."""
    assert need.call.done.is_set()
    try:
        value = need.outcome()
    except BaseException as exc:
        runner.failed(exc)
        return runner.next()
    return step(runner, value)


def sent(host: FakeHost, need: Any) -> dict[str, Any]:
    """Perform a ``Send`` as a client would (when the session allows); its frame."""
    assert isinstance(need, core.Send)
    assert host.session.sending(need.call)
    (frame,) = frames(need.data)
    return frame


def resume(host: FakeHost, attempt: int = 1) -> list[dict[str, Any]]:
    return frames(host.session.resume(HELLO, attempt))


def answer_resume(host: FakeHost, requests: list[dict[str, Any]], attach: dict[str, Any]) -> None:
    """Reply to a resumption: hello and subscribe succeed, each attach gets what
    ``attach`` maps its reservation id to (a ReservationInfo or a ResdError)."""
    for frame in requests:
        if frame["op"] == "hello":
            host.reply(frame["id"], HELLO_RESULT)
        elif frame["op"] == "subscribe":
            host.reply(frame["id"], STATUS)
        else:
            outcome = attach[frame["args"]["id"]]
            if isinstance(outcome, ResdError):
                host.refuse(frame["id"], outcome)
            else:
                host.reply(frame["id"], outcome)


# ------------------------------------------------------------------ the token


def test_every_reserve_carries_a_token_that_the_lease_keeps() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=False, cpu=1)))
    frame = sent(host, runner.next())
    token = frame["args"]["token"]
    assert isinstance(token, str) and TOKEN.fullmatch(token)
    reply = step(runner)
    host.reply(frame["id"], info())
    assert perform_reply(runner, reply) is None
    assert runner.result.token == token


def test_a_token_given_by_the_caller_is_kept() -> None:
    host = FakeHost()
    args = core.reserve_args("p", wait=False, cpu=1)
    args = msgspec.structs.replace(args, token="x" * 20)
    runner = core.Runner(core.reserve(host, args))
    assert sent(host, runner.next())["args"]["token"] == "x" * 20


# ----------------------------------------------------------- disconnected


def test_disconnect_fails_calls_as_lost_and_keeps_every_lease() -> None:
    host = FakeHost()
    active = host.lease("active", "r-00000000000a")
    waiting = host.lease("pending", "r-00000000000b")
    call, _ = host.session.ask("status", Empty(), threading.Event())
    host.session.disconnect("resd closed the connection")
    assert call.done.is_set() and call.lost == "resd closed the connection"
    with pytest.raises(core.ConnectionLost, match="lost before the reply to status"):
        call.result()
    assert host.session.disconnected and host.session.closed is None
    assert not host.session.back.is_set()
    assert active.ended is None and waiting.pending and not waiting._settled.is_set()
    assert set(host.session.leases()) == {active, waiting}
    assert host.pushes == [core.Disconnected("resd closed the connection")]
    with pytest.raises(core.ConnectionLost):
        host.session.ask("status", Empty(), threading.Event())
    host.session.disconnect("again")  # a failed attempt: no second notice
    assert host.pushes == [core.Disconnected("resd closed the connection")]


def test_a_lost_call_is_unavailable_and_retryable_and_the_runner_is_not_cleaning() -> None:
    host = FakeHost()
    runner = core.Runner(core.status(host))
    sent(host, runner.next())
    reply = step(runner)
    host.session.disconnect("gone")
    wait = perform_reply(runner, reply)
    assert isinstance(wait, core.Reconnect) and wait.flag is host.session.back
    assert not runner.cleaning, "a lost reply is no interruption: a retry is not shielded"
    assert issubclass(core.ConnectionLost, UnavailableError)


def test_close_while_disconnected_wakes_the_waiters_with_unavailable() -> None:
    host = FakeHost()
    waiting = host.lease("pending")
    host.session.disconnect("gone")
    runner = core.Runner(core.status(host))
    wait = runner.next()
    assert isinstance(wait, core.Reconnect)
    host.session.close("gone; gave up reconnecting after 1s (3 attempts)")
    assert wait.flag.is_set()
    runner.done(None)
    with pytest.raises(UnavailableError, match="gave up reconnecting"):
        runner.next()
    assert waiting.ended == "closed" and isinstance(waiting.error, UnavailableError)


# ------------------------------------------------------------------ resuming


def test_resume_sends_hello_subscribe_and_one_attach_per_lease_with_a_token() -> None:
    host = FakeHost()
    call, _ = host.session.ask("subscribe", Empty(), threading.Event())
    host.reply(call.id, STATUS)
    assert host.session.subscribed
    a = host.lease("active", "r-00000000000a", token="A" * 16)
    host.lease("pending", "r-00000000000b", token="B" * 16)
    raw = core.LeaseState(info("r-00000000000c", binding="detached"), threading.Event())
    host.session.track(raw)  # no token: a detached lease made by a raw call
    epoch = host.session.epoch
    host.session.disconnect("gone")
    requests = resume(host)
    assert host.session.epoch == epoch + 1 and host.session.resuming
    assert [f["op"] for f in requests] == ["hello", "subscribe", "attach", "attach"]
    assert requests[0]["args"] == {"version": 1, "client": "tests"}
    assert [f["args"] for f in requests[2:]] == [
        {"token": "A" * 16, "id": "r-00000000000a"},
        {"token": "B" * 16, "id": "r-00000000000b"},
    ]
    answer_resume(
        host,
        requests,
        {a.id: info(a.id), "r-00000000000b": info("r-00000000000b", "pending", position=2)},
    )
    assert not host.session.resuming and host.session.disconnected is None
    assert host.session.back.is_set() and host.session.hello == HELLO_RESULT
    assert host.pushes[-1] == core.Reconnected(1)
    assert raw.ended is None, "a detached lease lives on without being re-attached"
    assert host.session.lease("r-00000000000b").info.position == 2  # type: ignore[union-attr]


def test_a_stale_call_of_the_old_connection_is_not_written_on_the_new_one() -> None:
    host = FakeHost()
    call, _ = host.session.ask("status", Empty(), threading.Event())
    host.session.disconnect("gone")
    answer_resume(host, resume(host), {})
    assert not host.session.sending(call) and not call.sent


def test_resume_keeps_at_most_a_window_of_attaches_in_flight() -> None:
    host = FakeHost()
    n = core.RESUME_WINDOW + 10
    leases = [host.lease("active", f"r-{i:012x}") for i in range(n)]
    host.session.disconnect("gone")
    first = resume(host)
    assert [f["op"] for f in first].count("attach") == core.RESUME_WINDOW - 1
    assert host.session.resume_frames() == b"", "the window is full"
    answer_resume(host, first, {x.id: info(x.id) for x in leases})
    more = frames(host.session.resume_frames())
    assert len(more) == 11 and host.session.resuming
    answer_resume(host, more, {x.id: info(x.id) for x in leases})
    assert not host.session.resuming and host.pushes[-1] == core.Reconnected(1)


def test_a_resume_cut_short_starts_over_on_the_next_connection() -> None:
    host = FakeHost()
    lease = host.lease("pending")
    host.session.disconnect("gone")
    first = resume(host, 1)
    host.reply(first[0]["id"], HELLO_RESULT)
    host.session.receive(b"\x00\x00")  # half a frame, then the connection ends
    host.session.disconnect("reconnecting failed: reset")
    assert host.session.disconnected == "gone" and not host.session.resuming
    second = resume(host, 2)
    answer_resume(host, second, {RID: info(RID, "active")})
    assert lease.info.state == "active" and host.pushes[-1] == core.Reconnected(2)


def test_hello_refused_on_resume_closes_the_session() -> None:
    host = FakeHost()
    host.lease("pending")
    host.session.disconnect("gone")
    requests = resume(host)
    host.refuse(requests[0]["id"], UnavailableError("protocol 1 is no longer spoken"))
    assert host.session.closed is not None and "refused the reconnection" in host.session.closed
    assert host.session.back.is_set()


# -------------------------------------------------- what attach replies mean


def resumed(lease_state: str, reply: Any, **lease: Any) -> tuple[FakeHost, core.LeaseState]:
    """A lease in ``lease_state`` (with ``lease`` attributes) resumed with ``reply``."""
    host = FakeHost()
    held = host.lease(lease_state)
    for name, value in lease.items():
        setattr(held, name, value)
    host.session.disconnect("gone")
    host.pushes.clear()
    answer_resume(host, resume(host), {RID: reply})
    assert host.pushes[-1] == core.Reconnected(1)
    host.pushes.pop()
    return host, held


def test_a_wait_granted_meanwhile_is_settled_as_granted() -> None:
    host, lease = resumed("pending", info(state="active"))
    assert lease._settled.is_set() and lease.info.state == "active" and lease.ended is None
    assert [type(e) for e in host.pushes] == [GrantedEvent]
    assert [type(e) for _, e in host.lease_events] == [GrantedEvent]
    assert lease._outcome() is lease


def test_a_wait_still_queued_stays_queued_with_its_new_place() -> None:
    host, lease = resumed("pending", info(state="pending", position=1, reason="resources"))
    assert lease.pending and not lease._settled.is_set() and lease.info.position == 1
    assert host.pushes == []


def test_an_active_lease_takes_the_new_info_without_an_event() -> None:
    host, lease = resumed("active", info(state="active", expires_at=999.0))
    assert lease.info.expires_at == 999.0 and host.pushes == [] and lease.ended is None


def test_a_preemption_begun_meanwhile_is_a_notice_with_its_deadline() -> None:
    host, lease = resumed("active", info(state="terminating", deadline=500.0, reason="high"))
    (event,) = host.pushes
    assert isinstance(event, PreemptedEvent) and event.deadline == 500.0 and event.by == "high"
    assert lease.preempt_deadline == 500.0 and lease.ended is None


def test_a_reclaim_begun_meanwhile_is_a_reclaim_notice() -> None:
    host, lease = resumed(
        "active", info(state="terminating", reclaimable=True, deadline=500.0, reason="high")
    )
    (event,) = host.pushes
    assert isinstance(event, ReclaimEvent) and event.deadline == 500.0
    assert lease.reclaim_requested and lease.preempt_deadline == 500.0


def test_a_known_preemption_is_not_told_twice() -> None:
    host, lease = resumed(
        "active", info(state="terminating", deadline=500.0), preempt_deadline=500.0
    )
    assert host.pushes == [] and lease.info.state == "terminating"


def test_a_wait_granted_and_preempted_meanwhile_is_granted_then_told() -> None:
    host, lease = resumed("pending", info(state="terminating", deadline=500.0))
    assert [type(e) for e in host.pushes] == [GrantedEvent, PreemptedEvent]
    assert lease._outcome() is lease and lease.preempt_deadline == 500.0


HISTORY = {"ended_at": 150.0, "label": "", "ttl": None, "binding": ""}


def test_an_expiry_meanwhile_ends_the_lease_as_expired() -> None:
    host, lease = resumed("active", info(state="expired", reason="ttl", **HISTORY))
    (event,) = host.pushes
    assert isinstance(event, ExpiredEvent) and lease.ended == "expired"
    # what history does not know is kept from what the lease knew
    assert lease.info.label == "job" and lease.info.ttl == 60.0 and lease.info.ended_at == 150.0
    assert host.session.lease(RID) is None


def test_a_preemption_ended_meanwhile_ends_the_lease_as_preempted() -> None:
    host, lease = resumed("active", info(state="preempted", reason="preempted by hi", **HISTORY))
    (event,) = host.pushes
    assert isinstance(event, PreemptedEvent) and event.deadline is None
    assert event.by == "preempted by hi" and lease.ended == "preempted"


@pytest.mark.parametrize("state", ["released", "cancelled"])
def test_a_release_meanwhile_ends_the_lease_as_released(state: str) -> None:
    reason = "not re-attached within 60s after resd restarted"
    host, lease = resumed("active", info(state=state, reason=reason, **HISTORY))
    (event,) = host.pushes
    assert isinstance(event, ReleasedEvent) and event.reservation.reason == reason
    assert lease.ended == "released" and lease.error is None


def test_a_wait_denied_meanwhile_fails_with_its_reason() -> None:
    reason = f"{RID} gave up after waiting 5s: cpu short"
    host, lease = resumed("pending", info(state="denied", reason=reason, **HISTORY))
    (event,) = host.pushes
    assert isinstance(event, DeniedEvent) and lease.ended == "denied"
    with pytest.raises(TimeoutError_, match="gave up after waiting"):
        lease._outcome()


def test_a_wait_granted_and_expired_meanwhile_does_not_return_a_dead_lease() -> None:
    host, lease = resumed("pending", info(state="expired", **HISTORY))
    assert lease.ended == "expired" and [type(e) for e in host.pushes] == [ExpiredEvent]
    with pytest.raises(UnavailableError, match="before its grant reached this client"):
        lease._outcome()


@pytest.mark.parametrize(
    "error", [NotFoundError("no lease has this attach token"), ForbiddenError("not yours")]
)
def test_a_lease_resd_no_longer_knows_is_lost(error: ResdError) -> None:
    host, lease = resumed("active", error)
    (event,) = host.pushes
    assert isinstance(event, ReleasedEvent) and lease.ended == "released"
    assert event.reservation.reason.startswith("lost while the connection to resd was down")
    assert error.message in event.reservation.reason


def test_a_session_lease_without_a_token_is_lost_on_resume() -> None:
    host = FakeHost()
    raw = host.session.track(core.LeaseState(info(), threading.Event()))
    host.session.disconnect("gone")
    requests = resume(host)
    assert [f["op"] for f in requests] == ["hello"]
    answer_resume(host, requests, {})
    assert raw.ended == "released" and "no attach token" in raw.info.reason


def test_a_push_after_the_attach_reply_wins_and_a_late_reply_changes_nothing() -> None:
    host = FakeHost()
    a = host.lease("pending", "r-00000000000a")
    b = host.lease("active", "r-00000000000b")
    host.session.disconnect("gone")
    requests = resume(host)
    hello, attach_a, attach_b = requests
    host.reply(hello["id"], HELLO_RESULT)
    host.reply(attach_a["id"], info(a.id, "pending"))
    host.session.receive(encode_frame(push(GrantedEvent(reservation=info(a.id, "active")))))
    # b expired right after it was re-attached; its reply was written before the push
    host.session.receive(encode_frame(push(ExpiredEvent(reservation=info(b.id, "expired")))))
    host.reply(attach_b["id"], info(b.id, "active"))
    assert a.info.state == "active" and a._settled.is_set()
    assert b.ended == "expired" and b.info.state == "expired"
    assert host.pushes[-1] == core.Reconnected(1)


def test_a_released_push_ends_the_lease_and_fails_a_wait() -> None:
    host = FakeHost()
    active = host.lease("active", "r-00000000000a")
    waiting = host.lease("pending", "r-00000000000b")
    for lease in (active, waiting):
        gone = info(lease.id, "released", reason="released by an admin")
        host.session.receive(encode_frame(push(ReleasedEvent(reservation=gone))))
    assert active.ended == "released" and active.error is None
    assert waiting.ended == "released"
    with pytest.raises(UnavailableError, match="released by an admin"):
        waiting._outcome()
    assert host.session.leases() == []


# --------------------------------------------------------------------- flows


def test_a_reserve_whose_reply_was_lost_is_sent_again_with_the_same_token() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=False, cpu=1)))
    first = sent(host, runner.next())
    reply = step(runner)
    host.session.disconnect("gone")
    wait = perform_reply(runner, reply)
    assert isinstance(wait, core.Reconnect)
    answer_resume(host, resume(host), {})
    assert wait.flag.is_set()
    again = sent(host, step(runner))
    assert again["op"] == "reserve" and again["args"] == first["args"]
    assert again["id"] != first["id"]
    reply = step(runner)
    host.reply(again["id"], info())
    assert perform_reply(runner, reply) is None
    assert runner.result.token == first["args"]["token"] and runner.result.info.state == "active"


def test_a_reserve_never_written_is_sent_after_the_reconnection() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=False, cpu=1)))
    send = runner.next()
    assert isinstance(send, core.Send)
    host.session.disconnect("gone")
    assert not host.session.sending(send.call), "not written on a dead connection"
    reply = step(runner)
    assert isinstance(perform_reply(runner, reply), core.Reconnect)


def test_a_waiting_reserve_keeps_waiting_across_a_reconnection() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=True, cpu=1, timeout=30)))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.reply(frame["id"], info(state="pending"))
    wait = perform_reply(runner, reply)
    assert isinstance(wait, core.Await) and wait.timeout == 31.0
    host.session.disconnect("gone")
    assert not wait.lease._settled.is_set()
    answer_resume(host, resume(host), {RID: info(state="pending")})
    assert not wait.lease._settled.is_set()
    host.session.disconnect("gone again")
    answer_resume(host, resume(host, 3), {RID: info(state="active")})
    assert wait.lease._settled.is_set()
    assert step(runner, True) is None
    assert runner.result.info.state == "active"
    assert [type(e) for e in host.pushes if not isinstance(e, core.Disconnected)] == [
        core.Reconnected,
        GrantedEvent,
        core.Reconnected,
    ]


def test_an_interrupted_wait_while_disconnected_is_forgotten_not_waited_on() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=True, cpu=1)))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.reply(frame["id"], info(state="pending"))
    wait = perform_reply(runner, reply)
    assert isinstance(wait, core.Await)
    host.session.disconnect("gone")
    runner.failed(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        runner.next()  # no Send, no Reconnect: the cleanup does not wait for resd
    assert wait.lease.ended == "cancelled" and host.session.leases() == []


@pytest.mark.parametrize("op", ["release", "renew", "list", "status", "why"])
def test_read_only_and_idempotent_requests_are_sent_again(op: str) -> None:
    host = FakeHost()
    flows = {
        "release": lambda: core.release(host, RID),
        "renew": lambda: core.renew(host, RID, 60.0),
        "list": lambda: core.listing(host, None, None, False),
        "status": lambda: core.status(host),
        "why": lambda: core.why(host, RID),
    }
    runner = core.Runner(flows[op]())
    first = sent(host, runner.next())
    reply = step(runner)
    host.session.disconnect("gone")
    assert isinstance(perform_reply(runner, reply), core.Reconnect)
    answer_resume(host, resume(host), {})
    again = sent(host, step(runner))
    assert again["op"] == first["op"] == op and again["args"] == first["args"]


def test_a_change_whose_reply_was_lost_says_it_may_or_may_not_have_been_made() -> None:
    host = FakeHost()
    runner = core.Runner(core.call(host, "pool.delete", PoolName(name="p")))
    sent(host, runner.next())
    reply = step(runner)
    host.session.disconnect("gone")
    with pytest.raises(core.ConnectionLost, match="may or may not have been made") as lost:
        perform_reply(runner, reply)
    assert lost.value.details == {"op": "pool.delete", "sent": True}


def test_a_change_never_written_is_sent_after_the_reconnection() -> None:
    host = FakeHost()
    runner = core.Runner(core.call(host, "pool.delete", PoolName(name="p")))
    send = runner.next()
    host.session.disconnect("gone")
    assert isinstance(send, core.Send) and not host.session.sending(send.call)
    assert isinstance(perform_reply(runner, step(runner)), core.Reconnect)
    answer_resume(host, resume(host), {})
    assert sent(host, step(runner))["op"] == "pool.delete"


def test_release_of_a_lease_resd_forgot_counts_as_released() -> None:
    host = FakeHost()
    lease = host.lease("active")
    runner = core.Runner(core.release_lease(host, lease))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.session.disconnect("gone")
    perform_reply(runner, reply)
    answer_resume(host, resume(host), {RID: info()})
    again = sent(host, step(runner))
    reply = step(runner)
    host.refuse(again["id"], NotFoundError(f"reservation {RID} is not active"))
    assert perform_reply(runner, reply) is None
    assert frame["op"] == "release" and lease.ended == "released"


def test_release_without_waiting_forgets_the_lease_while_disconnected() -> None:
    host = FakeHost()
    lease = host.lease("active")
    host.session.disconnect("gone")
    runner = core.Runner(core.release_lease(host, lease, wait=False))
    with pytest.raises(core.ConnectionLost):
        runner.next()
    assert host.session.leases() == [] and lease.ended is None


def test_hello_is_never_sent_again() -> None:
    host = FakeHost()
    runner = core.Runner(core.call(host, "hello", HELLO))
    sent(host, runner.next())
    reply = step(runner)
    host.session.disconnect("gone")
    with pytest.raises(core.ConnectionLost):
        perform_reply(runner, reply)


def test_a_list_reply_after_the_reconnection_is_the_result() -> None:
    host = FakeHost()
    runner = core.Runner(core.listing(host, None, None, False))
    host.session.disconnect("gone")
    wait = runner.next()
    assert isinstance(wait, core.Reconnect)
    answer_resume(host, resume(host), {})
    frame = sent(host, step(runner))
    reply = step(runner)
    host.reply(frame["id"], ReservationList(reservations=[info()]))
    assert perform_reply(runner, reply) is None
    assert [r.id for r in runner.result] == [RID]


def test_try_reserve_still_returns_none_on_a_conflict() -> None:
    host = FakeHost()
    runner = core.Runner(
        core.try_reserve(core.reserve(host, core.reserve_args("p", wait=False, cpu=1)))
    )
    frame = sent(host, runner.next())
    reply = step(runner)
    host.refuse(frame["id"], ConflictError("one per tenant"))
    assert perform_reply(runner, reply) is None and runner.result is None


# ------------------------------------------------------------ client settings


def test_the_reconnect_limit_comes_from_the_argument_the_environment_or_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from resd_client._sync import DEFAULT_RECONNECT, backoff, reconnect_limit

    monkeypatch.delenv("RESD_RECONNECT", raising=False)
    assert reconnect_limit(None) == DEFAULT_RECONNECT == 120.0
    assert reconnect_limit(0) == 0
    monkeypatch.setenv("RESD_RECONNECT", "2.5")
    assert reconnect_limit(None) == 2.5 and reconnect_limit(7) == 7
    monkeypatch.setenv("RESD_RECONNECT", "soon")
    with pytest.raises(InvalidError, match="RESD_RECONNECT"):
        reconnect_limit(None)
    with pytest.raises(InvalidError):
        reconnect_limit(-1)
    delays = backoff()
    assert [next(delays) for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_refusal_with_no_id_is_the_reason_the_connection_ended() -> None:
    """resd refuses a connection (too many from this uid) with an error frame that has
    no id, then closes: the client says why, not just that it closed."""
    host = FakeHost()
    error = UnavailableError("too many connections from uid 1000")
    host.session.receive(encode_frame(reply_error(None, error)))
    host.session.close("resd closed the connection")
    assert host.session.closed == (
        "resd closed the connection: unavailable: too many connections from uid 1000"
    )
