"""Logs (``resd/logs.py``): every line about a request carries its bound context,
nothing a request does routinely is logged above debug, and the JSON renderer
writes one object per line, a traceback included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
import trio
import trio.testing
from structlog.contextvars import bind_contextvars, merge_contextvars
from structlog.testing import capture_logs
from structlog.typing import EventDict

from resd.actor import Actor
from tests.conftest import InProcess, subprocess_env
from tests.wire import WireClient

log = structlog.get_logger("tests.logs")
REQUEST_KEYS = ("op", "request", "conn", "peer_uid", "peer_pid")


@contextmanager
def captured() -> Iterator[list[EventDict]]:
    """Every line logged meanwhile, with the context bound where it was logged."""
    with capture_logs(processors=[merge_contextvars]) as lines:
        yield lines


def named(lines: list[EventDict], event: str) -> list[EventDict]:
    return [line for line in lines if line["event"] == event]


def ask(tenant: str, cpu: int, **extra: Any) -> dict[str, Any]:
    return {"pool": "p", "tenant": tenant, "resources": {"cpu": cpu}, **extra}


async def setup(c: WireClient) -> None:
    await c.ok(
        "pool.create",
        {
            "name": "p",
            "resources": {"cpu": {"capacity": 8000}},
            "max_per_tenant": 0,
            "preemption": "lower_priority",
            "grace": 30.0,
        },
    )
    await c.ok("tenant.add", {"name": "low", "priority": 2})
    await c.ok("tenant.add", {"name": "high", "priority": 9})


def check_request_line(line: EventDict) -> None:
    """A line logged while a request was handled names the request and its peer."""
    missing = [key for key in REQUEST_KEYS if key not in line]
    assert not missing, f"{line['event']} lacks {missing}: {line}"
    assert line["peer_uid"] == os.getuid() and line["peer_pid"] == os.getpid(), line


async def test_routine_requests_log_their_context_at_debug_only(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin)
    c = await WireClient.connect(inproc.socket)
    with captured() as lines:
        r = await c.ok("reserve", ask("low", 2000, ttl=60.0))
        await c.ok("renew", {"id": r["id"], "ttl": 120.0})
        await c.ok("list")
        await c.ok("why", {"id": r["id"]})
        bad = await c.request("reserve", ask("low", 1000, pool="nope"))
        assert bad["error"]["code"] == "not_found", bad
        unknown = await c.request("renew", {"id": "r-000000000000", "ttl": 5.0})
        assert unknown["error"]["code"] == "not_found"
        await c.send({"v": 1, "id": 77, "op": "release", "args": {"id": 5}})  # bad args
        assert (await c.reply_to(77))["error"]["code"] == "invalid"
        # waiting: queued, granted when r goes, and a wait that times out
        w = await c.ok("reserve", ask("low", 7000, wait=True))
        assert w["state"] == "pending"
        await c.ok("release", {"id": r["id"]})
        assert (await c.push())["event"] == "granted"
        t = await c.ok("reserve", ask("low", 2000, wait=True, timeout=5.0))
        assert (await c.push())["error"]["code"] == "timeout"
        await c.ok("release", {"id": w["id"]})
        other = await WireClient.connect(inproc.socket)
        await other.aclose()
        await trio.testing.wait_all_tasks_blocked()

    loud = [line for line in lines if line["log_level"] != "debug"]
    assert not loud, f"logged above debug for routine requests: {loud}"
    in_requests = [line for line in lines if "request" in line]
    ops = {line["op"] for line in in_requests}
    assert ops == {"reserve", "renew", "list", "why", "release", "hello"}
    for line in in_requests:
        check_request_line(line)
    # each request ends with one line: handled, or refused with the client's error code
    outcomes = [
        (line["event"], line["op"], line.get("code"))
        for line in in_requests
        if line["event"] in ("handled", "refused") and line["op"] != "hello"
    ]
    assert outcomes == [
        ("handled", "reserve", None),
        ("handled", "renew", None),
        ("handled", "list", None),
        ("handled", "why", None),
        ("refused", "reserve", "not_found"),
        ("refused", "renew", "not_found"),
        ("refused", "release", "invalid"),
        ("handled", "reserve", None),
        ("handled", "release", None),
        ("handled", "reserve", None),
        ("handled", "release", None),
    ]
    # lines of requests about a reservation name it and its tenant
    about = [
        line
        for line in in_requests
        if line["op"] in ("reserve", "renew", "release") and "code" not in line
    ]
    assert {line["reservation"] for line in about} == {r["id"], w["id"], t["id"]}
    assert all(line["tenant"] == "low" for line in about), about
    for event in ("reserved", "renewed", "released"):
        assert named(about, event)[0]["reservation"] == r["id"]
    (refused,) = [line for line in in_requests if line["op"] == "reserve" and "code" in line]
    assert refused["tenant"] == "low" and "reservation" not in refused
    # what happened later to a waiter names it, not a request
    for event, rid in (("granted", w["id"]), ("wait_ended", t["id"])):
        (line,) = named(lines, event)
        assert (line["reservation"], line["tenant"]) == (rid, "low") and "op" not in line
    # the connection's own lines carry its peer too
    (connected, *_) = named(lines, "connected")
    assert connected["peer_pid"] == os.getpid() and "op" not in connected


async def test_a_request_handled_in_the_readers_task_leaves_no_keys_behind(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    """With fsync never, reserve and release run in the connection's reader task (no
    task of their own): the keys they bind must not stay on the connection's lines."""
    admin = await WireClient.connect(inproc.socket)
    await setup(admin)
    c = await WireClient.connect(inproc.socket)
    with captured() as lines:
        r = await c.ok("reserve", {"pool": "p", "resources": {"cpu": 1000}})  # no tenant named
        await c.ok("release", {"id": r["id"]})
        await c.aclose()
        await trio.testing.wait_all_tasks_blocked()
    (reserved,) = named(lines, "reserved")
    assert reserved["op"] == "reserve" and reserved["tenant"] == r["tenant"], reserved
    (gone,) = named(lines, "disconnected")
    left = {"op", "request", "reservation", "tenant"} & gone.keys()
    assert not left, f"the connection's own line kept {left}: {gone}"


async def test_a_preemption_names_its_cause_and_its_victim(
    inproc: InProcess, mock_clock: trio.testing.MockClock
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await setup(admin)
    holder = await WireClient.connect(inproc.socket)
    victim = await holder.ok("reserve", ask("low", 8000))
    boss = await WireClient.connect(inproc.socket)
    with captured() as lines:
        queued = await boss.ok("reserve", ask("high", 6000, wait=True))
        assert queued["state"] == "pending"
        assert (await holder.push())["reservation"]["state"] == "terminating"
        assert (await boss.push())["event"] == "granted"  # the grace ended: a timer
        assert (await holder.push())["reservation"]["state"] == "preempted"

    # the request's own lines (queued, handled) and the eviction it caused
    (preempting,) = named(lines, "preempting")
    check_request_line(preempting)
    assert preempting["op"] == "reserve" and preempting["log_level"] == "info"
    assert (preempting["reservation"], preempting["tenant"]) == (victim["id"], "low")
    (line,) = named(lines, "queued")
    check_request_line(line)
    assert (line["reservation"], line["tenant"]) == (queued["id"], "high")
    assert line["request"] == preempting["request"] and line["conn"] == preempting["conn"]
    # the end of the grace and the grant it allowed: no request caused them
    (preempted,) = named(lines, "preempted")
    assert preempted["log_level"] == "info" and "op" not in preempted
    assert (preempted["reservation"], preempted["tenant"]) == (victim["id"], "low")
    (granted,) = named(lines, "granted")
    assert granted["log_level"] == "debug" and "op" not in granted
    assert (granted["reservation"], granted["tenant"]) == (queued["id"], "high")
    loud = {line["event"] for line in lines if line["log_level"] != "debug"}
    assert loud == {"preempting", "preempted"}, "a preemption is the operator's news"


class _Recorder(Actor):
    """Logs each message it handles, and each batch."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.handlers = {str: lambda message: log.debug("handled", message=message)}

    def after_batch(self) -> None:
        log.debug("batch_done")


async def test_an_actor_handles_a_message_in_its_senders_context() -> None:
    """Whether the handler runs in the actor's task (the mailbox) or the caller's (the
    fast path of ``ask``), its lines carry the sender's bound keys; a batch's end
    carries none."""
    actor = _Recorder()

    async def request(op: str) -> None:
        bind_contextvars(op=op)  # this task's own context
        if op == "told":
            actor.tell(op)
        else:
            await actor.ask(op)

    with captured() as lines:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "queued")  # the actor is not running: the mailbox
            nursery.start_soon(request, "told")
            await trio.testing.wait_all_tasks_blocked()
            await nursery.start(actor.run)
            await trio.testing.wait_all_tasks_blocked()
            await request("fast")  # the actor is parked: handled in this task
            nursery.cancel_scope.cancel()

    handled = {line["message"]: line.get("op") for line in named(lines, "handled")}
    assert handled == {"queued": "queued", "told": "told", "fast": "fast"}
    batches = named(lines, "batch_done")
    assert len(batches) == 2 and all("op" not in line for line in batches), batches


CHILD = """
import structlog
from resd.logs import configure

configure("auto", "info")
log = structlog.get_logger("child")
structlog.contextvars.bind_contextvars(op="reserve", reservation="r-1")
try:
    raise ValueError("two\\nlines")
except ValueError:
    log.exception("handler_failed")
log.debug("hidden")
log.info("shown", n=1)
"""


def run_child(tmp: Path, journal: bool) -> list[str]:
    """Run ``CHILD`` with stderr to a file (not a TTY: JSON); its lines."""
    out = tmp / "stderr.log"
    with out.open("wb") as err:
        env = subprocess_env()
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", CHILD], env=env, stderr=err, check=True, timeout=30)
    return out.read_text().splitlines()


def test_json_lines_hold_a_traceback_in_one_line(tmp_path: Path) -> None:
    first, second = run_child(tmp_path, journal=False)  # the debug line is filtered out
    failed, shown = json.loads(first), json.loads(second)
    assert failed["event"] == "handler_failed" and failed["level"] == "error"
    assert failed["timestamp"].endswith("Z")
    assert (failed["op"], failed["reservation"]) == ("reserve", "r-1")
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert failed["exception"].rstrip().endswith("ValueError: two\nlines")
    assert shown["event"] == "shown" and shown["level"] == "info" and shown["n"] == 1


def test_journald_gets_each_lines_priority(tmp_path: Path) -> None:
    lines = run_child(tmp_path, journal=True)
    assert [line[:4] for line in lines] == ["<3>{", "<6>{"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["handler_failed", "shown"]
