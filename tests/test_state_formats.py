"""Old state directories always replay (SPEC §5, §9): the golden directories in
tests/fixtures/state, each made by a real resd of its day, load into the books
that resd dumped then, and a daemon starts on them and serves what they hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from resd.journal import Journal
from resd.pools import PoolBook
from resd.records import decode
from resd.tenants import TenantBook
from tests.conftest import InProcess
from tests.wire import WireClient

FIXTURES = Path(__file__).parent / "fixtures" / "state"
NAMES = ["v1-wal-only", "v1-snapshot", "v2-wal-only", "v2-snapshot"]


def replay(state_dir: Path) -> dict[str, Any]:
    books: dict[str, Any] = {}

    def load(snapshots: dict[str, tuple[int, Any]]) -> None:
        books["pools"] = PoolBook.from_snapshot(
            snapshots["pools"][1] if "pools" in snapshots else None
        )
        books["tenants"] = TenantBook.from_snapshot(
            snapshots["tenants"][1] if "tenants" in snapshots else None
        )

    def apply(_lsn: int, domain: str, records: list[Any]) -> None:
        books[domain].apply([decode(r) for r in records])

    Journal(state_dir, "never").recover(apply, on_snapshot=load)
    return {"pools": books["pools"].snapshot(), "tenants": books["tenants"].snapshot()}


def as_old(value: Any, old: Any) -> Any:
    """``value`` with only the keys ``old`` has: fields added later keep defaults."""
    if isinstance(old, dict) and isinstance(value, dict):
        return {k: as_old(value[k], old[k]) for k in old if k in value}
    if isinstance(old, list) and isinstance(value, list):
        return [as_old(v, o) for v, o in zip(value, old, strict=False)]
    return value


@pytest.mark.parametrize("name", NAMES)
def test_golden_state_replays_to_the_books_it_held(name: str, tmp_path: Path) -> None:
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    state = tmp_path / "state"
    shutil.copytree(FIXTURES / name, state)
    got = json.loads(json.dumps(replay(state)))
    assert as_old(got, expected) == expected
    assert len(got["pools"]["reservations"]) == len(expected["pools"]["reservations"])


@pytest.mark.parametrize("name", NAMES)
async def test_a_daemon_starts_on_golden_state(name: str, inproc: InProcess) -> None:
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    state = Path(inproc.daemon.config.state_dir)
    await WireClient.close_all()
    inproc.daemon.request_stop()
    await inproc.daemon.stopped.wait()
    shutil.rmtree(state)
    shutil.copytree(FIXTURES / name, state)
    await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    # What was due while the directory lay here (grace periods, TTLs, waits) ended at
    # start, with a history event; everything else is served as it was.
    listed = {r["id"] for r in (await c.ok("list"))["reservations"]}
    pending = {r["id"] for r in (await c.ok("list", {"pending": True}))["reservations"]}
    last = {e["reservation"]: e["kind"] for e in (await c.ok("export", {}))["events"]}
    for r in expected["pools"]["reservations"]:
        assert r["id"] in listed or last[r["id"]] in ("preempted", "expired", "released"), r
    for w in expected["pools"].get("waiting", []):
        assert w["id"] in pending or w["id"] in listed or last[w["id"]] == "denied", w
    assert listed | pending, "something is still served"
    tenants = {t["name"] for t in (await c.ok("tenant.list"))["tenants"]}
    assert tenants == {t["name"] for t in expected["tenants"]["tenants"]}
