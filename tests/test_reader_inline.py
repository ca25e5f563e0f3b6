"""Hot ops handled in the connection's reader task (fsync never or batch): a ``stop``
lets the request being handled finish and answer, and starts no request after it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import resd.server as server_mod
from tests.conftest import InProcess
from tests.wire import WireClient


async def test_stop_lets_a_request_handled_in_the_reader_finish_and_starts_no_other(
    inproc: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await WireClient.connect(inproc.socket)
    await admin.ok(
        "pool.create",
        {"name": "p", "resources": {"cpu": {"capacity": 8}}, "max_per_tenant": 0},
    )
    c = await WireClient.connect(inproc.socket)
    entered, gate = trio.Event(), trio.Event()
    real = server_mod.dispatch

    async def held(svc: Any, conn: Any, op: str, args: Any) -> Any:
        if op == "reserve":  # the reserve waits here, inside the reader's task
            entered.set()
            await gate.wait()
        return await real(svc, conn, op, args)

    monkeypatch.setattr(server_mod, "dispatch", held)
    await c.send({"v": 1, "id": 5, "op": "reserve", "args": {"pool": "p", "resources": {"cpu": 1}}})
    await entered.wait()
    await c.send({"v": 1, "id": 6, "op": "status", "args": {}})  # arrives after the stop
    server = inproc.daemon.server
    assert server is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.stop, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    reply = await c.reply_to(5)
    assert reply["ok"] and reply["result"]["state"] == "active", reply
    try:
        after = await c.next_frame()
    except trio.BrokenResourceError:  # closed with the status request unread: a reset
        after = None
    assert after is None, f"no request is started after the stop: {after}"
