"""One behavioural suite for the three clients — sync ``Client``, ``resd_client.trio``
and ``resd_client.asyncio`` — against one real daemon.

Each scenario is written once as a coroutine over ``Api``, a small face of the
client under test whose every call is awaitable. The sync face never suspends, so a
sync scenario is driven by stepping the coroutine on the test's (main) thread; the
trio and asyncio faces run it in ``trio.run`` / ``asyncio.run``. The other side of a
scenario (a holder that releases, a higher-priority tenant that waits) is a sync
admin client, used directly or from a helper thread. Synchronisation polls the
daemon with a deadline; there are no fixed sleeps.

At the end, pure tests of ``_core``: pushes that overtake the reply they belong to,
and the cleanup of an interrupted wait, step by step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from resd_client import Client, Lease, TimeoutError_
from resd_client import _core as core
from resd_client._sync import Signal
from resd_client.asyncio import Client as AsyncioClient
from resd_client.protocol import (
    Export,
    GrantedEvent,
    PoolCreate,
    Preempt,
    PreemptedEvent,
    ReservationInfo,
    Reserve,
    ResourceSpec,
    StateEvent,
    TenantAdd,
    encode_frame,
    push,
    reply_ok,
)
from resd_client.trio import Client as TrioClient
from tests.conftest import Proc, subprocess_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]

T = TypeVar("T")
FLAVOURS = ("sync", "trio", "asyncio")
#: where a sync client's thread blocks while it waits
WAITS = (Signal.wait.__code__, threading.Condition.wait.__code__)
_names = itertools.count(1)


# ------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[Proc]:
    """One real resd for the module; each test makes its own pool and tenants."""
    with tempfile.TemporaryDirectory(prefix="resd-") as d:
        tmp = Path(d)
        proc = Proc(
            socket=str(tmp / "resd.sock"),
            state_dir=str(tmp / "state"),
            args=["--no-host-pool", "--fsync", "never", "--log-format", "json"],
            log=tmp / "resd.log",
        ).start()
        try:
            yield proc
        finally:
            assert proc.stop() == 0, proc.log_text()


@pytest.fixture
def admin(daemon: Proc) -> Iterator[Client]:
    with Client(daemon.socket, name="suite-admin") as client:
        yield client


def make_pool(admin: Client, cpu: int = 4, **policies: Any) -> str:
    name = f"p{next(_names)}"
    resources = {"cpu": ResourceSpec(capacity=cpu * 1000)}
    admin.call(
        "pool.create", PoolCreate(name=name, resources=resources, max_per_tenant=0, **policies)
    )
    return name


def make_tenants(admin: Client, **priorities: int) -> dict[str, str]:
    """Tenants with these priorities, under fresh names: role → tenant name."""
    n = next(_names)
    for role, priority in priorities.items():
        admin.call("tenant.add", TenantAdd(name=f"{role}{n}", priority=priority))
    return {role: f"{role}{n}" for role in priorities}


def pending(admin: Client, pool: str) -> list[ReservationInfo]:
    return admin.list(pool=pool, pending=True)


class Background:
    """``fn()`` on a helper thread; ``join`` returns its result or raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the helper thread is stuck"
        if self.error is not None:
            raise self.error
        return self.result


# -------------------------------------------------------------- the three faces


class SyncApi:
    """The sync client; its coroutines never suspend."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def reserve(self, pool: str, **kw: Any) -> Any:
        return self.client.reserve(pool, **kw)

    @contextlib.asynccontextmanager
    async def held(self, pool: str, **kw: Any) -> AsyncIterator[Any]:
        with self.client.reserve(pool, **kw) as lease:
            yield lease

    async def try_reserve(self, pool: str, **kw: Any) -> Any:
        return self.client.try_reserve(pool, **kw)

    async def request(self, args: Reserve) -> Any:
        return self.client.request(args)

    async def why(self, reservation_id: str) -> Any:
        return self.client.why(reservation_id)

    async def plan(self, pool: str, **kw: Any) -> Any:
        return self.client.plan(pool, **kw)

    async def release(self, lease: Any) -> None:
        lease.release()

    async def renew(self, lease: Any, ttl: float) -> None:
        lease.renew(ttl)

    async def list(self, **kw: Any) -> list[ReservationInfo]:
        return self.client.list(**kw)

    async def status(self) -> Any:
        return self.client.status()

    async def subscribe(self) -> Any:
        return self.client.subscribe()

    async def next_event(self) -> Any:
        return next(iter(self.client.events(5.0)), None)

    async def wait(self, event: threading.Event, limit: float = 10.0) -> bool:
        return event.wait(limit)

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)  # noqa: ASYNC251 - the sync face blocks: it never suspends

    async def interrupted_reserve(self, queued: Callable[[], bool], pool: str, **kw: Any) -> bool:
        """Ctrl-C (SIGINT to the main thread) once the request is queued and this
        thread blocks in the wait; True if the reserve raised KeyboardInterrupt."""
        main = threading.main_thread()
        assert threading.current_thread() is main

        def blocked() -> bool:  # in the wait of a Signal (or of a threading.Event)
            frame = sys._current_frames().get(main.ident or 0)
            return frame is not None and frame.f_code in WAITS

        def interrupt() -> None:
            wait_for(queued, 5.0, "the request to queue")
            wait_for(blocked, 5.0, "the main thread to wait")
            signal.pthread_kill(main.ident or 0, signal.SIGINT)

        helper = Background(interrupt)
        try:
            self.client.reserve(pool, **kw)
        except KeyboardInterrupt:
            return True
        finally:
            helper.join()
        return False


class TrioApi:
    def __init__(self, client: TrioClient) -> None:
        self.client = client

    async def reserve(self, pool: str, **kw: Any) -> Any:
        return await self.client.reserve(pool, **kw)

    def held(self, pool: str, **kw: Any) -> Any:
        return self.client.reserve(pool, **kw)

    async def try_reserve(self, pool: str, **kw: Any) -> Any:
        return await self.client.try_reserve(pool, **kw)

    async def request(self, args: Reserve) -> Any:
        return await self.client.request(args)

    async def why(self, reservation_id: str) -> Any:
        return await self.client.why(reservation_id)

    async def plan(self, pool: str, **kw: Any) -> Any:
        return await self.client.plan(pool, **kw)

    async def release(self, lease: Any) -> None:
        await lease.release()

    async def renew(self, lease: Any, ttl: float) -> None:
        await lease.renew(ttl)

    async def list(self, **kw: Any) -> list[ReservationInfo]:
        return await self.client.list(**kw)

    async def status(self) -> Any:
        return await self.client.status()

    async def subscribe(self) -> Any:
        return await self.client.subscribe()

    async def next_event(self) -> Any:
        with trio.fail_after(5):
            async for event in self.client.events():
                return event
        return None

    async def wait(self, event: threading.Event, limit: float = 10.0) -> bool:
        return await trio.to_thread.run_sync(event.wait, limit)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def interrupted_reserve(self, queued: Callable[[], bool], pool: str, **kw: Any) -> bool:
        """Cancel the waiting reserve's scope once it is queued."""
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_when_queued() -> None:
                    await trio.to_thread.run_sync(wait_for, queued, 5.0, "the request to queue")
                    scope.cancel()

                nursery.start_soon(cancel_when_queued)
                await self.client.reserve(pool, **kw)
        return scope.cancelled_caught


class AsyncioApi(TrioApi):
    """Same calls as trio's; asyncio's own threads, sleeps and cancellation."""

    async def next_event(self) -> Any:
        async with asyncio.timeout(5):
            async for event in self.client.events():
                return event
        return None

    async def wait(self, event: threading.Event, limit: float = 10.0) -> bool:
        return await asyncio.to_thread(event.wait, limit)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def interrupted_reserve(self, queued: Callable[[], bool], pool: str, **kw: Any) -> bool:
        """Cancel the waiting reserve's task once it is queued."""
        task = asyncio.ensure_future(self.client.reserve(pool, **kw))
        await asyncio.to_thread(wait_for, queued, 5.0, "the request to queue")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False


Api = Any  # SyncApi | TrioApi | AsyncioApi: scenarios use what they have in common
Scenario = Callable[..., Coroutine[Any, Any, T]]


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (the sync face) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("a sync scenario suspended")


def run(flavour: str, socket: str, scenario: Scenario[T], *args: Any) -> T:
    """``scenario(api, *args)`` with a fresh client of ``flavour``."""
    if flavour == "sync":
        with Client(socket, name="suite") as client:
            return drive(scenario(SyncApi(client), *args))

    async def with_trio() -> T:
        async with TrioClient(socket, name="suite") as client:
            return await scenario(TrioApi(client), *args)

    async def with_asyncio() -> T:
        async with AsyncioClient(socket, name="suite") as client:
            return await scenario(AsyncioApi(client), *args)  # type: ignore[arg-type]

    if flavour == "trio":
        return trio.run(with_trio)
    return asyncio.run(with_asyncio())


async def eventually(api: Api, check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await api.sleep(0.02)


flavours = pytest.mark.parametrize("flavour", FLAVOURS)


# -------------------------------------------------------------------- scenarios


async def reserve_and_release(api: Api, admin: Client) -> None:
    pool = make_pool(admin)
    await api.subscribe()
    lease = await api.reserve(pool, cpu="1.5", ttl=60, label="job")
    assert lease.info.state == "active" and lease.info.resources == {"cpu": 1500}
    assert lease.info.binding == "session" and lease.info.label == "job"
    assert lease.env["RESD_CPU"] == "1.5" and lease.env["RESD_RESERVATION_ID"] == lease.id
    assert lease.assigned == {} and not lease.reclaim_requested
    assert isinstance(await api.next_event(), StateEvent)
    assert [r.id for r in await api.list(pool=pool)] == [lease.id]
    before = lease.info.expires_at
    await api.renew(lease, 120)
    assert lease.info.expires_at > before
    assert (await api.status()).active >= 1
    await api.release(lease)
    assert lease.ended == "released"
    assert await api.list(pool=pool) == []
    async with api.held(pool, cpu=4) as held:
        assert [r.id for r in admin.list(pool=pool)] == [held.id]
    assert held.ended == "released" and admin.list(pool=pool) == []


@flavours
def test_reserve_and_release(flavour: str, daemon: Proc, admin: Client) -> None:
    run(flavour, daemon.socket, reserve_and_release, admin)


async def wait_until_granted(api: Api, admin: Client) -> None:
    pool = make_pool(admin)
    holder = admin.reserve(pool, cpu=3)

    def release_when_queued() -> None:
        wait_for(lambda: bool(pending(admin, pool)), 5, "a waiter")
        admin.release(holder.id)

    releaser = Background(release_when_queued)
    lease = await api.reserve(pool, cpu=2, timeout=10)
    releaser.join()
    assert lease.info.state == "active" and lease.ended is None
    assert [r.id for r in admin.list(pool=pool)] == [lease.id]
    assert pending(admin, pool) == []


@flavours
def test_a_wait_is_granted_when_another_lease_releases(
    flavour: str, daemon: Proc, admin: Client
) -> None:
    run(flavour, daemon.socket, wait_until_granted, admin)


async def why_and_plan(api: Api, admin: Client) -> None:
    pool = make_pool(admin)
    holder = admin.reserve(pool, cpu=4)
    waiter = Background(lambda: admin.reserve(pool, cpu=2, timeout=10))
    wait_for(lambda: bool(pending(admin, pool)), 5, "a waiter")
    (queued,) = pending(admin, pool)
    why = await api.why(queued.id)
    assert why.state == "pending" and why.position == 1 and why.reason == "resources"
    assert why.details["resources"]["cpu"]["shortfall"] == 2000
    plan = await api.plan(pool, cpu=1)
    assert plan.outcome == "wait" and plan.pool == pool
    admin.release(holder.id)
    assert waiter.join().info.state == "active"
    lease = await api.request(core.reserve_args(pool, wait=False, cpu=1, binding="detached"))
    assert lease.info.binding == "detached" and lease.info.state == "active"
    await api.release(lease)


@flavours
def test_why_plan_and_a_prebuilt_request(flavour: str, daemon: Proc, admin: Client) -> None:
    run(flavour, daemon.socket, why_and_plan, admin)


async def wait_times_out(api: Api, admin: Client) -> None:
    pool = make_pool(admin)
    admin.reserve(pool, cpu=4)
    with pytest.raises(TimeoutError_) as timed_out:
        await api.reserve(pool, cpu=1, timeout=0.2)
    assert timed_out.value.details["timeout"] == 0.2
    assert await api.list(pool=pool, pending=True) == []


@flavours
def test_a_wait_times_out_and_leaves_nothing_queued(
    flavour: str, daemon: Proc, admin: Client
) -> None:
    run(flavour, daemon.socket, wait_times_out, admin)


async def interrupted_wait(api: Api, admin: Client) -> None:
    pool = make_pool(admin)
    holder = admin.reserve(pool, cpu=4)
    assert await api.interrupted_reserve(lambda: bool(pending(admin, pool)), pool, cpu=1)
    assert await api.list(pool=pool, pending=True) == [], "the wait was cancelled"
    admin.release(holder.id)
    assert admin.list(pool=pool) == [], "nobody was granted after the release"


@flavours
def test_an_interrupted_wait_leaves_nothing_queued(
    flavour: str, daemon: Proc, admin: Client
) -> None:
    run(flavour, daemon.socket, interrupted_wait, admin)


async def reclaim(api: Api, admin: Client) -> None:
    pool = make_pool(admin, preemption="lower_priority", grace=5.0)
    tenants = make_tenants(admin, low=2, high=8)
    asked = threading.Event()
    lease = await api.reserve(
        pool, cpu=4, tenant=tenants["low"], reclaimable=True, on_reclaim=lambda _: asked.set()
    )
    boss = Background(lambda: admin.reserve(pool, cpu=4, tenant=tenants["high"], timeout=10))
    assert await api.wait(asked), "on_reclaim ran"
    assert lease.reclaim_requested and lease.info.state == "terminating"
    assert lease.preempt_deadline is not None and lease.preempt_deadline > time.time() + 3
    await api.release(lease)
    assert lease.ended == "released"
    granted = boss.join()
    assert granted.info.state == "active" and granted.info.tenant == tenants["high"]
    kinds = [h.kind for h in admin.call("export", Export(tenant=tenants["low"])).events]
    assert kinds[-1] == "released" and "preempted" not in kinds, "nobody was killed"


@flavours
def test_reclaim_asks_and_a_release_in_grace_ends_released(
    flavour: str, daemon: Proc, admin: Client
) -> None:
    run(flavour, daemon.socket, reclaim, admin)


async def preempted_and_expired(api: Api, admin: Client) -> None:
    pool = make_pool(admin, grace=0.2)
    tenants = make_tenants(admin, low=2, high=8)
    lease = await api.reserve(pool, cpu=1, tenant=tenants["low"])
    seen: list[Any] = []
    ended = threading.Event()

    def on_event(event: Any) -> None:
        seen.append(event)
        if lease.ended:
            ended.set()

    lease.on_event = on_event
    admin.call("preempt", Preempt(target=tenants["low"], tenant=tenants["high"]))
    assert await api.wait(ended)
    assert lease.ended == "preempted" and lease.info.state == "preempted"
    assert [type(e) for e in seen] == [PreemptedEvent, PreemptedEvent]
    assert seen[0].reservation.state == "terminating" and seen[0].deadline is not None
    assert lease.preempt_deadline == seen[0].deadline

    expired = threading.Event()
    short = await api.reserve(pool, cpu=1, ttl=0.3)
    short.on_event = lambda event: expired.set()
    assert await api.wait(expired, 5.0) or short.ended == "expired"
    assert short.ended == "expired" and short.info.state == "expired"


@flavours
def test_preempted_and_expired_pushes_reach_the_lease(
    flavour: str, daemon: Proc, admin: Client
) -> None:
    run(flavour, daemon.socket, preempted_and_expired, admin)


async def pid_binding(api: Api, admin: Client, child: subprocess.Popen[bytes]) -> None:
    pool = make_pool(admin)
    lease = await api.reserve(pool, cpu=1, pid=child.pid)
    assert lease.info.binding == "pid" and lease.info.pid == child.pid
    child.kill()
    child.wait(5)

    async def gone() -> bool:
        return lease.id not in {r.id for r in await api.list(pool=pool)}

    await eventually(api, gone, "the lease of the killed process to end")


@flavours
def test_a_pid_bound_lease_ends_with_its_process(flavour: str, daemon: Proc, admin: Client) -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        run(flavour, daemon.socket, pid_binding, admin, child)
    finally:
        child.kill()
        child.wait(5)


async def try_reserve(api: Api, admin: Client) -> None:
    pool = make_pool(admin)
    admin.reserve(pool, cpu=3)
    assert await api.try_reserve(pool, cpu=2) is None
    assert await api.list(pool=pool, pending=True) == []
    lease = await api.try_reserve(pool, cpu=1)
    assert lease is not None and lease.info.state == "active"


@flavours
def test_try_reserve_returns_none_instead_of_waiting(
    flavour: str, daemon: Proc, admin: Client
) -> None:
    run(flavour, daemon.socket, try_reserve, admin)


# ------------------------------------------------------------ client specifics


def test_a_sync_on_reclaim_callback_may_release(daemon: Proc, admin: Client) -> None:
    """Callbacks run off the reader thread: a blocking call in one does not deadlock."""
    pool = make_pool(admin, preemption="lower_priority", grace=5.0)
    tenants = make_tenants(admin, low=2, high=8)
    released = threading.Event()

    def give_back(lease: Lease) -> None:
        lease.release()
        released.set()

    with Client(daemon.socket) as client:
        lease = client.reserve(
            pool, cpu=4, tenant=tenants["low"], reclaimable=True, on_reclaim=give_back
        )
        granted = admin.reserve(pool, cpu=4, tenant=tenants["high"], timeout=10)
        assert granted.info.state == "active"
        assert released.wait(10)
        assert lease.reclaim_requested and lease.ended == "released"


def test_importing_resd_client_imports_no_async_library() -> None:
    code = (
        "import json, sys, resd_client\n"
        "before = sorted(m for m in ('trio', 'asyncio') if m in sys.modules)\n"
        "from resd_client import TrioClient, AsyncioClient\n"
        "import resd_client.trio, resd_client.asyncio\n"
        "assert TrioClient is resd_client.trio.Client\n"
        "assert AsyncioClient is resd_client.asyncio.Client\n"
        "print(json.dumps(before))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# ------------------------------------------------------------------- the core


def info(rid: str, state: str) -> ReservationInfo:
    return ReservationInfo(
        id=rid,
        tenant="t",
        pool="p",
        resources={"cpu": 1000},
        label="",
        created_at=0.0,
        ttl=None,
        expires_at=None,
        binding="session",
        reclaimable=False,
        state=state,
        uid=0,
    )


class FakeHost:
    """A client without I/O: flags are threading.Events, nothing is sent."""

    timeout = 1.0

    def __init__(self) -> None:
        self.pushes: list[Any] = []
        self.session = core.Session(
            on_push=self.pushes.append, on_lease=lambda lease, event: None, on_close=lambda: None
        )

    def _new_flag(self) -> threading.Event:
        return threading.Event()

    def _new_lease(self, info: ReservationInfo, on_reclaim: Any) -> core.LeaseState:
        return core.LeaseState(info, threading.Event(), on_reclaim)

    def reply(self, call: core.Call, result: Any) -> None:
        self.session.receive(encode_frame(reply_ok(call.id, result)))


def test_a_grant_that_overtakes_its_pending_reply_is_kept() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=True, cpu=1)))
    send = runner.next()
    assert isinstance(send, core.Send) and send.call.op == "reserve"
    runner.done(None)
    reply = runner.next()
    assert isinstance(reply, core.Reply)
    rid = "r-0123456789ab"
    # the daemon pushed the grant before the caller read its pending reply
    host.session.receive(encode_frame(push(GrantedEvent(reservation=info(rid, "active")))))
    host.reply(send.call, info(rid, "pending"))
    runner.done(reply.outcome())
    assert runner.next() is None, "granted already: no wait"
    lease = runner.result
    assert lease.info.state == "active" and not lease.pending
    assert [type(e) for e in host.pushes] == [GrantedEvent]


def test_an_interrupted_wait_is_cancelled_at_the_daemon() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=True, cpu=1)))
    send = runner.next()
    assert isinstance(send, core.Send)
    runner.done(None)
    reply = runner.next()
    assert isinstance(reply, core.Reply)
    rid = "r-0123456789ab"
    host.reply(send.call, info(rid, "pending"))
    runner.done(reply.outcome())
    wait = runner.next()
    assert isinstance(wait, core.Await) and wait.timeout is None
    runner.failed(KeyboardInterrupt())
    cancel = runner.next()
    assert isinstance(cancel, core.Send) and cancel.call.op == "release" and runner.cleaning
    runner.done(None)
    cancel_reply = runner.next()
    assert isinstance(cancel_reply, core.Reply)
    host.reply(cancel.call, info(rid, "cancelled"))
    runner.done(cancel_reply.outcome())
    with pytest.raises(KeyboardInterrupt):
        runner.next()
    assert wait.lease.ended == "cancelled" and host.session.lease(rid) is None


def test_an_interrupt_before_the_reply_releases_what_it_got() -> None:
    host = FakeHost()
    runner = core.Runner(core.reserve(host, core.reserve_args("p", wait=False, cpu=1)))
    send = runner.next()
    assert isinstance(send, core.Send)
    runner.done(None)
    assert isinstance(runner.next(), core.Reply)
    runner.failed(KeyboardInterrupt())
    again = runner.next()
    assert isinstance(again, core.Reply) and again.call is send.call
    host.reply(send.call, info("r-0123456789ab", "active"))
    runner.done(again.outcome())
    release = runner.next()
    assert isinstance(release, core.Send) and release.call.op == "release"
