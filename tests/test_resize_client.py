"""The client's side of resizing a lease (issue 12).

First sans I/O (``resd_client._core`` fed bytes by hand, as in
``test_reconnect_core``): the arguments, a resize done at once, a waiting resize
decided by a ``resized`` or ``denied`` push (in either order with its reply), its
cancellation, and what a lost connection does to it. Then the three clients
against a real daemon: a growth that waits is granted when another lease shrinks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from resd_client import Client, InsufficientError, InvalidError, TimeoutError_, UnavailableError
from resd_client import _core as core
from resd_client.asyncio import Client as AsyncioClient
from resd_client.errors import ConflictError, NotFoundError, QuotaExceededError
from resd_client.protocol import (
    DeniedEvent,
    GrantedEvent,
    MarkedEvent,
    PoolCreate,
    ReservationInfo,
    ResizedEvent,
    ResourceSpec,
    encode_frame,
    push,
    reply_ok,
)
from resd_client.trio import Client as TrioClient
from tests.conftest import Proc
from tests.test_reconnect_core import (
    RID,
    FakeHost,
    answer_resume,
    info,
    perform_reply,
    resume,
    sent,
    step,
)

WAITER = "r-00000000beef"
GROWN = {"cpu": 2000}


def grown(**changes: Any) -> ReservationInfo:
    return info(resources=GROWN, **changes)


def waiter() -> ReservationInfo:
    return info(WAITER, "pending", position=1, reason="resources")


def resized() -> bytes:
    return encode_frame(push(ResizedEvent(reservation=grown())))


def denied(error: Any) -> bytes:
    return encode_frame(push(DeniedEvent(reservation_id=WAITER, error=error.to_wire())))


# ------------------------------------------------------------------ arguments


def test_amounts_use_the_quantities_of_reserve() -> None:
    args = core.resize_args(
        RID,
        wait=True,
        cpu="1.5",
        memory="4G",
        gpu=0,
        resources={"ports": 3},
        give_back={"gpu": [3, "5"], "ports": "30005-30009"},
        timeout=60,
    )
    assert args.resources == {"cpu": 1500, "memory": 4 << 30, "gpu": 0, "ports": 3}
    assert args.give_back == {"gpu": ["3", "5"], "ports": ["30005-30009"]}
    assert (args.id, args.wait, args.timeout) == (RID, True, 60)
    reserved = core.reserve_args("p", wait=False, cpu="1.5", memory="4G")
    assert reserved.resources == {k: args.resources[k] for k in ("cpu", "memory")}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "at least one resource"),
        ({"cpu": -1}, "negative"),
        ({"memory": "4Q"}, "memory"),
        ({"cpu": 1, "timeout": 5}, "timeout applies only with wait"),
        ({"cpu": 1, "give_back": {"gpu": ["1"]}}, "give gpu's new amount"),
        ({"gpu": 1, "give_back": {"gpu": []}}, "name the members"),
    ],
)
def test_bad_arguments_are_refused_before_sending(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidError, match=match):
        core.resize_args(RID, wait=False, **options)
    with pytest.raises(InvalidError):
        core.resize_args("nope", wait=False, cpu=1)


def test_an_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ttl"):
        core.resize_args(RID, wait=False, cpu=1, ttl=5)


def test_resize_is_never_sent_twice_but_its_reply_is_applied_in_stream_order() -> None:
    assert "resize" not in core.RESENT
    assert "resize" in core.LEASE_REPLIES


# ------------------------------------------------------------- done at once


def test_a_resize_that_fits_updates_the_lease_and_returns_it() -> None:
    host = FakeHost()
    lease = host.lease()
    args = core.resize_args(RID, wait=False, cpu=2)
    runner = core.Runner(core.resize(host, args, lease))
    frame = sent(host, runner.next())
    assert (frame["op"], frame["args"]["resources"]) == ("resize", GROWN)
    reply = step(runner)
    host.reply(frame["id"], grown())
    assert perform_reply(runner, reply) is None
    assert runner.result == grown() and lease.info.resources == GROWN


def test_a_push_read_after_the_reply_is_not_undone_by_it() -> None:
    host = FakeHost()
    lease = host.lease()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=True, cpu=2), lease))
    frame = sent(host, runner.next())
    reply = step(runner)
    mark = MarkedEvent(reservation=grown(), mark="idle", on=True, detail="idle 1h")
    host.session.receive(encode_frame(reply_ok(frame["id"], grown())) + encode_frame(push(mark)))
    assert perform_reply(runner, reply) is None
    assert lease.marks == {"idle": "idle 1h"} and lease.info.resources == GROWN


def test_an_untracked_lease_object_gets_the_new_info_from_the_flow() -> None:
    host = FakeHost()
    lease = core.LeaseState(info(), threading.Event())  # not tracked by the session
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=False, cpu=2), lease))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.reply(frame["id"], grown())
    perform_reply(runner, reply)
    assert lease.info.resources == GROWN


@pytest.mark.parametrize(
    "error",
    [
        InsufficientError("cpu short by 1000", {"pool": "p"}),
        QuotaExceededError("over max", {"pool": "p"}),
        ConflictError("being preempted", {"id": RID}),
    ],
)
def test_a_refusal_is_raised_and_changes_nothing(error: Any) -> None:
    host = FakeHost()
    lease = host.lease()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=False, cpu=2), lease))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.refuse(frame["id"], error)
    with pytest.raises(type(error)):
        perform_reply(runner, reply)
    assert lease.info.resources == {"cpu": 1000}


# --------------------------------------------------------------- waiting


def queued(host: FakeHost, lease: Any = None, **options: Any) -> tuple[core.Runner[Any], Any]:
    """A waiting resize of RID to cpu=2 whose reply said it waits as WAITER; the
    runner and its ``AwaitResize``."""
    pending: list[ReservationInfo] = []
    args = core.resize_args(RID, wait=True, cpu=2, **options)
    runner = core.Runner(core.resize(host, args, lease, pending.append))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.reply(frame["id"], waiter())
    wait = perform_reply(runner, reply)
    assert isinstance(wait, core.AwaitResize) and wait.resizing.waiter == WAITER
    assert pending == [waiter()]
    return runner, wait


def test_a_waiting_resize_returns_when_the_resized_push_comes() -> None:
    host = FakeHost()
    lease = host.lease()
    runner, wait = queued(host, lease, timeout=30)
    assert wait.timeout == 31.0 and not wait.flag.is_set()
    host.session.receive(resized())
    assert wait.flag.is_set()
    assert step(runner, True) is None
    assert runner.result == grown() and lease.info.resources == GROWN
    assert host.pushes == [ResizedEvent(reservation=grown())]
    assert host.lease_events == [(RID, ResizedEvent(reservation=grown()))]
    assert lease.ended is None and not lease.pending


def test_a_resized_push_that_overtakes_the_reply_is_not_missed() -> None:
    host = FakeHost()
    lease = host.lease()
    pending: list[ReservationInfo] = []
    args = core.resize_args(RID, wait=True, cpu=2)
    runner = core.Runner(core.resize(host, args, lease, pending.append))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.session.receive(resized() + encode_frame(reply_ok(frame["id"], waiter())))
    wait = perform_reply(runner, reply)
    assert isinstance(wait, core.AwaitResize) and wait.flag.is_set()
    assert step(runner, True) is None and runner.result == grown()
    assert pending == [], "decided before anyone was told it waits"


def test_the_resized_push_of_an_untracked_lease_decides_the_wait_and_is_not_kept() -> None:
    """``resctl resize --wait`` holds no lease object: the push still decides it."""
    host = FakeHost()
    runner, _ = queued(host)
    host.session.receive(resized())
    assert step(runner, True) is None and runner.result == grown()
    lease = host.lease()  # tracking the lease later does not replay the push
    assert lease.info.resources == {"cpu": 1000}
    assert host.pushes == [ResizedEvent(reservation=grown())]


def test_a_resized_push_without_a_waiting_resize_updates_the_lease() -> None:
    host = FakeHost()
    lease = host.lease()
    host.session.receive(resized())
    assert lease.info.resources == GROWN and host.pushes == [ResizedEvent(reservation=grown())]


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError_(f"{WAITER} gave up after waiting 5s", {"id": WAITER}),
        NotFoundError(f"reservation {RID} is not active", {"id": RID}),
    ],
)
def test_a_denied_wait_raises_its_error_and_keeps_the_lease(error: Any) -> None:
    host = FakeHost()
    lease = host.lease()
    runner, wait = queued(host, lease, timeout=5)
    host.session.receive(denied(error))
    assert wait.flag.is_set()
    with pytest.raises(type(error), match=error.message):
        step(runner, True)
    assert lease.info.resources == {"cpu": 1000} and lease.ended is None
    assert [type(e) for e in host.pushes] == [DeniedEvent]


def test_a_denial_read_before_the_reply_is_not_missed() -> None:
    host = FakeHost()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=True, cpu=2, timeout=1)))
    frame = sent(host, runner.next())
    reply = step(runner)
    error = TimeoutError_("gave up", {"id": WAITER})
    host.session.receive(denied(error) + encode_frame(reply_ok(frame["id"], waiter())))
    wait = perform_reply(runner, reply)
    assert isinstance(wait, core.AwaitResize) and wait.flag.is_set()
    with pytest.raises(TimeoutError_, match="gave up"):
        step(runner, True)


def test_a_waiting_resize_that_fits_at_once_is_returned_at_once() -> None:
    host = FakeHost()
    lease = host.lease()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=True, cpu=2), lease))
    frame = sent(host, runner.next())
    reply = step(runner)
    host.reply(frame["id"], grown())
    assert perform_reply(runner, reply) is None and runner.result == grown()
    assert host.session._resizes == []


def cancelled(runner: core.Runner[Any], host: FakeHost) -> None:
    """The flow cancels WAITER (a ``release`` of the waiter, never of the lease)."""
    cancel = runner.next()
    assert isinstance(cancel, core.Send) and cancel.call.op == "release"
    (frame,) = [sent(host, cancel)]
    assert frame["args"] == {"id": WAITER}
    cancel_reply = step(runner)
    host.reply(frame["id"], info(WAITER, "cancelled"))
    runner.done(cancel_reply.outcome())


def test_a_wait_resd_never_decides_times_out_here_and_is_cancelled() -> None:
    host = FakeHost()
    runner, _ = queued(host, timeout=5)
    runner.done(False)  # the client's wait ran out: timeout + its reply timeout
    cancelled(runner, host)
    with pytest.raises(TimeoutError_, match=f"waiting as {WAITER}"):
        runner.next()
    assert host.session._resizes == []


def test_an_interrupted_wait_is_cancelled_at_the_daemon() -> None:
    host = FakeHost()
    lease = host.lease()
    runner, _ = queued(host, lease)
    runner.failed(KeyboardInterrupt())
    cancelled(runner, host)
    assert runner.cleaning
    with pytest.raises(KeyboardInterrupt):
        runner.next()
    assert lease.ended is None and lease.info.resources == {"cpu": 1000}


def test_an_interrupt_before_the_reply_cancels_the_wait_it_made() -> None:
    host = FakeHost()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=True, cpu=2)))
    frame = sent(host, runner.next())
    assert isinstance(step(runner), core.Reply)
    runner.failed(KeyboardInterrupt())
    again = runner.next()
    assert isinstance(again, core.Reply) and again.call.id == frame["id"]
    host.reply(frame["id"], waiter())
    runner.done(again.outcome())
    cancelled(runner, host)
    with pytest.raises(KeyboardInterrupt):
        runner.next()


def test_an_interrupt_before_a_reply_that_resized_releases_nothing() -> None:
    host = FakeHost()
    lease = host.lease()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=True, cpu=2), lease))
    frame = sent(host, runner.next())
    step(runner)
    runner.failed(KeyboardInterrupt())
    again = runner.next()
    assert isinstance(again, core.Reply)
    host.reply(frame["id"], grown())
    runner.done(again.outcome())
    with pytest.raises(KeyboardInterrupt):
        runner.next()  # no Send: the lease is not released
    assert lease.ended is None and lease.info.resources == GROWN


# --------------------------------------------------------- the connection


@pytest.mark.parametrize("wait", [False, True])
def test_a_lost_reply_raises_connection_lost_and_is_not_sent_again(wait: bool) -> None:
    host = FakeHost()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=wait, cpu=2)))
    sent(host, runner.next())
    reply = step(runner)
    host.session.disconnect("gone")
    with pytest.raises(core.ConnectionLost, match="may or may not have been made") as lost:
        perform_reply(runner, reply)
    assert lost.value.details == {"op": "resize", "sent": True}


@pytest.mark.parametrize("wait", [False, True])
def test_a_resize_never_written_is_sent_after_the_reconnection(wait: bool) -> None:
    host = FakeHost()
    runner = core.Runner(core.resize(host, core.resize_args(RID, wait=wait, cpu=2)))
    send = runner.next()
    host.session.disconnect("gone")
    assert isinstance(send, core.Send) and not host.session.sending(send.call)
    assert isinstance(perform_reply(runner, step(runner)), core.Reconnect)
    answer_resume(host, resume(host), {})
    again = sent(host, step(runner))
    assert again["op"] == "resize" and again["args"]["resources"] == GROWN
    reply = step(runner)
    host.reply(again["id"], grown())
    assert perform_reply(runner, reply) is None and runner.result == grown()


def test_a_wait_cut_short_by_the_connection_raises_connection_lost() -> None:
    host = FakeHost()
    lease = host.lease()
    runner, wait = queued(host, lease)
    host.session.disconnect("resd closed the connection")
    assert wait.flag.is_set()
    with pytest.raises(core.ConnectionLost, match="waited to grow") as lost:
        step(runner, True)
    assert lost.value.details["waiter"] == WAITER and lost.value.details["sent"] is True
    assert lease.ended is None, "the lease itself is re-attached as usual"


def test_a_wait_ends_when_the_session_closes() -> None:
    host = FakeHost()
    runner, wait = queued(host)
    host.session.close("client closed")
    assert wait.flag.is_set()
    with pytest.raises(UnavailableError, match="client closed"):
        step(runner, True)


def test_a_grant_of_another_request_does_not_decide_a_resize() -> None:
    host = FakeHost()
    runner, wait = queued(host)
    host.session.receive(encode_frame(push(GrantedEvent(reservation=info("r-000000000002")))))
    host.session.receive(encode_frame(push(ResizedEvent(reservation=info("r-000000000002")))))
    assert not wait.flag.is_set()
    host.session.receive(resized())
    assert step(runner, True) is None and runner.result == grown()


# ------------------------------------------------------- the three clients


def make_pool(client: Client) -> None:
    client.call(
        "pool.create",
        PoolCreate(name="p", resources={"cpu": ResourceSpec(capacity=4000)}, max_per_tenant=0),
    )


@pytest.fixture
def shrinker(resd_proc: Proc) -> Iterator[tuple[Client, str]]:
    """A sync admin client holding cpu=3 of the 4 in pool ``p``, and its lease id."""
    with Client(resd_proc.socket) as other:
        make_pool(other)
        held = other.reserve("p", cpu=3, binding="detached")
        yield other, held.id


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_sync_lease_resize_waits_until_another_lease_shrinks(
    resd_proc: Proc, shrinker: tuple[Client, str]
) -> None:
    other, theirs = shrinker
    with Client(resd_proc.socket) as client, client.reserve("p", cpu=1) as lease:
        with pytest.raises(InsufficientError, match="cannot grow"):
            lease.resize(cpu=2)
        queued_as: list[str] = []
        ready = threading.Event()

        def on_pending(w: ReservationInfo) -> None:
            queued_as.append(w.id)
            ready.set()

        def shrink() -> None:
            assert ready.wait(10)
            other.resize(theirs, cpu=2)

        helper = threading.Thread(target=shrink)
        helper.start()
        try:
            result = lease.resize(cpu=2, wait=True, timeout=20, on_pending=on_pending)
        finally:
            helper.join()
        assert result.resources == {"cpu": 2000} == lease.info.resources
        assert queued_as and queued_as[0] != lease.id
        assert any(isinstance(e, ResizedEvent) for e in client.events(timeout=0.5))
        shrunk = client.resize(lease.id, cpu="500m")
        assert shrunk.resources == {"cpu": 500} == lease.info.resources


@pytest.mark.slow
@pytest.mark.timeout(30)
async def test_trio_lease_resize_waits_until_another_lease_shrinks(
    resd_proc: Proc, shrinker: tuple[Client, str]
) -> None:
    other, theirs = shrinker
    async with TrioClient(resd_proc.socket) as client, client.reserve("p", cpu=1) as lease:
        waiting = trio.Event()
        results: list[ReservationInfo] = []

        async def grow() -> None:
            results.append(await lease.resize(cpu=2, wait=True, on_pending=lambda _: waiting.set()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(grow)
            await waiting.wait()
            await trio.to_thread.run_sync(lambda: other.resize(theirs, cpu=2))
        assert results[0].resources == {"cpu": 2000} == lease.info.resources
        # a cancelled wait is cancelled at the daemon
        with trio.move_on_after(0.3):
            await lease.resize(cpu=3, wait=True)
        assert other.list(pending=True) == []
        assert lease.info.resources == {"cpu": 2000}


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_asyncio_lease_resize_waits_until_another_lease_shrinks(
    resd_proc: Proc, shrinker: tuple[Client, str]
) -> None:
    other, theirs = shrinker

    async def scenario() -> ReservationInfo:
        async with AsyncioClient(resd_proc.socket) as client:
            lease = await client.reserve("p", cpu=1)
            waiting = asyncio.Event()
            grow = asyncio.ensure_future(
                lease.resize(cpu=2, wait=True, on_pending=lambda _: waiting.set())
            )
            await asyncio.wait_for(waiting.wait(), 10)
            await asyncio.to_thread(other.resize, theirs, cpu=2)
            result = await asyncio.wait_for(grow, 10)
            assert lease.info == result
            return result

    assert asyncio.run(scenario()).resources == {"cpu": 2000}
