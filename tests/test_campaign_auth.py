"""Authorization with real uids (issue 10; SPEC §1, §3, §7), against a real resd.

The daemon knows a caller only by SO_PEERCRED, so these tests run clients in child
processes that really are other users: ``setpriv`` switches to uids 4242 and 4343
(no passwd entry: resd names them ``uid4242``) and 65534 (``nobody``) before the
client starts. resd runs as root with ``socket_mode = "0666"`` so they can reach it.
Each refused request must be refused with ``forbidden`` and change nothing that
any client can see (pools, tenants, reservations, queue, history).

Checked: every uid gets its own tenant on first use; a tenant with owners (or
groups) serves only them, and admins (root) act for anyone; release, renew, why,
attach and preempt of another tenant's reservation are refused; admin-only ops are
refused; a ``pid`` lease may follow only the caller's own processes; an
unprivileged uid cannot preempt what an admin holds, nor preempt in a pool whose
policy is ``preemption = off``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from resd_client import Client
from resd_client.protocol import PoolCreate, ResourceSpec, TenantAdd
from tests.campaign import visible_state, wire
from tests.conftest import DAEMON_ARGS, Proc, subprocess_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("setpriv") is None,
        reason="needs root and setpriv to run clients as other uids",
    ),
]

A, B, NOBODY = 4242, 4343, 65534
GROUP = 4545  # a group that is B's primary group in the group test
CONFIG = 'socket_mode = "0666"\nreattach_grace = 1\n'

#: the child: switch identity happened already (setpriv); run the requests given on
#: stdin as JSON ``[[op, args], ...]``; print the hello answer and every reply frame
AS_USER = """
import json, sys
import msgspec
from resd_client import Client
ops = json.loads(sys.stdin.read())
with Client(sys.argv[1], name="auth", reconnect=0) as c:
    replies = [c.call_raw(op, args) for op, args in ops]
    print(json.dumps({"hello": msgspec.to_builtins(c.hello), "replies": replies}))
"""


@dataclass
class Seen:
    hello: dict[str, Any]
    replies: list[dict[str, Any]]


class Auth:
    """A root resd that other uids can reach, and a way to be those uids."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.cases = 0
        self.refusals = 0

    def admin(self) -> Client:
        return Client(self.proc.socket, name="auth-admin", reconnect=0)

    def as_user(
        self, uid: int, ops: list[tuple[str, dict[str, Any]]], gid: int | None = None
    ) -> Seen:
        """Run ``ops`` as ``uid`` (group ``gid``, default the same number, no others)."""
        cmd = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid if gid is None else gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            AS_USER,
            self.proc.socket,
        ]
        done = subprocess.run(
            cmd,
            input=json.dumps(ops),
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        return Seen(out["hello"], out["replies"])

    def ok(self, uid: int, op: str, args: dict[str, Any], gid: int | None = None) -> Any:
        (reply,) = self.as_user(uid, [(op, args)], gid).replies
        assert reply["ok"], (uid, op, args, reply)
        self.cases += 1
        return reply["result"]

    def refused(
        self, uid: int, ops: list[tuple[str, dict[str, Any]]], gid: int | None = None
    ) -> list[dict[str, Any]]:
        """Each of ``ops`` as ``uid`` is refused with ``forbidden`` and changes nothing."""
        with self.admin() as c:
            before = visible_state(c)
        seen = self.as_user(uid, ops, gid)
        with self.admin() as c:
            after = visible_state(c)
        for (op, args), reply in zip(ops, seen.replies, strict=True):
            assert not reply["ok"], f"uid {uid} {op} {args} was allowed: {reply}"
            assert reply["error"]["code"] == "forbidden", (uid, op, args, reply)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        assert not changed, f"refused requests of uid {uid} changed {changed}"
        self.cases += len(ops)
        self.refusals += len(ops)
        errors: list[dict[str, Any]] = [r["error"] for r in seen.replies]
        return errors


@pytest.fixture(scope="module")
def auth(pytestconfig: pytest.Config) -> Iterator[Auth]:
    """One daemon for the module (each test uses its own pools and tenants)."""
    with tempfile.TemporaryDirectory(prefix="resd-auth-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)  # other uids must reach the socket inside
        config = tmp / "resd.toml"
        config.write_text(CONFIG)
        proc = Proc(
            socket=str(tmp / "resd.sock"),
            state_dir=str(tmp / "state"),
            args=[*DAEMON_ARGS, "--config", str(config)],
            log=tmp / "resd.log",
        )
        proc.start()
        try:
            run = Auth(proc)
            yield run
            assert proc.stop() == 0, proc.log_text()[-3000:]
            capture = pytestconfig.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                print(
                    f"\nauth campaign: {run.cases} requests as uids {A}, {B}, {NOBODY} checked"
                    f" ({run.refusals} refused with forbidden, each changing nothing)"
                )
        finally:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait(10)


def make_pool(c: Client, name: str, cores: int = 8, preemption: str = "off") -> None:
    c.call(
        "pool.create",
        PoolCreate(
            name=name,
            resources={"cpu": ResourceSpec(capacity=cores * 1000)},
            max_per_tenant=0,
            preemption=preemption,  # type: ignore[arg-type]
        ),
    )


def reserve(pool: str, cores: int = 1, **extra: Any) -> dict[str, Any]:
    return {"pool": pool, "resources": {"cpu": cores * 1000}, "binding": "detached", **extra}


def live(c: Client, pool: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in wire(c, "list", {"pool": pool})["reservations"]}


# --------------------------------------------------------------------------- tests


def test_each_uid_gets_its_own_tenant(auth: Auth) -> None:
    with auth.admin() as c:
        make_pool(c, "own")
    names = {A: "uid4242", B: "uid4343", NOBODY: "nobody"}
    for uid, name in names.items():
        seen = auth.as_user(uid, [("reserve", reserve("own"))])
        assert seen.hello["uid"] == uid and not seen.hello["admin"], seen.hello
        assert seen.hello["user_tenant"] == name, seen.hello
        (reply,) = seen.replies
        assert reply["ok"] and reply["result"]["tenant"] == name, reply
        assert reply["result"]["uid"] == uid
        auth.cases += 1
    with auth.admin() as c:
        tenants = {t["name"]: t for t in wire(c, "tenant.list", {})["tenants"]}
        for uid, name in names.items():
            assert tenants[name]["owners"] == [uid], tenants[name]
        held = live(c, "own")
        assert sorted(r["tenant"] for r in held.values()) == sorted(names.values())
    # One uid's tenant is not another's.
    auth.refused(A, [("reserve", reserve("own", tenant="uid4343"))])
    auth.refused(NOBODY, [("reserve", reserve("own", tenant="uid4242"))])


def test_tenant_owners_and_groups(auth: Auth) -> None:
    with auth.admin() as c:
        make_pool(c, "owned")
        c.call("tenant.add", TenantAdd(name="alpha", priority=5, owners=[A]))
        c.call("tenant.add", TenantAdd(name="beta", priority=5, groups=[GROUP]))
    mine = auth.ok(A, "reserve", reserve("owned", tenant="alpha"))
    assert mine["tenant"] == "alpha"
    auth.refused(B, [("reserve", reserve("owned", tenant="alpha"))])
    auth.refused(NOBODY, [("reserve", reserve("owned", tenant="alpha", wait=True, timeout=5))])
    # groups: the caller's groups (from the group database, else its gid) must meet them
    auth.ok(B, "reserve", reserve("owned", tenant="beta"), gid=GROUP)
    auth.refused(A, [("reserve", reserve("owned", tenant="beta"))])
    # an admin acts for anyone
    with auth.admin() as c:
        wire(c, "reserve", reserve("owned", tenant="alpha"))
        wire(c, "reserve", reserve("owned", tenant="beta"))
        assert sorted(r["tenant"] for r in live(c, "owned").values()) == [
            "alpha",
            "alpha",
            "beta",
            "beta",
        ]


def test_another_tenants_reservation_is_out_of_reach(auth: Auth) -> None:
    with auth.admin() as c:
        make_pool(c, "private", preemption="lower_priority")
        c.call("tenant.add", TenantAdd(name="gamma", priority=5, owners=[A]))
    token = "gamma-attach-token-0123456789"
    held = auth.ok(A, "reserve", reserve("private", tenant="gamma", ttl=600, token=token))
    rid = held["id"]
    errors = auth.refused(
        B,
        [
            ("release", {"id": rid}),
            ("renew", {"id": rid, "ttl": 5}),
            ("attach", {"token": token, "id": rid}),
            ("preempt", {"target": "gamma", "tenant": "gamma", "pool": "private"}),
            ("reserve", reserve("private", tenant="gamma", token=token)),
        ],
    )
    assert all("4343" in e["message"] or "gamma" in e["message"] for e in errors), errors
    # admin-only operations
    auth.refused(
        A,
        [
            ("pool.create", {"name": "mine", "resources": {"cpu": {"capacity": 1000}}}),
            ("pool.set", {"name": "private", "capacity": {"cpu": 1}}),
            ("pool.delete", {"name": "private", "force": True}),
            ("tenant.add", {"name": "delta", "priority": 10}),
            ("tenant.set", {"name": "gamma", "priority": 10}),
            ("tenant.set", {"name": "uid4242", "priority": 10}),
            ("tenant.remove", {"name": "gamma", "force": True}),
        ],
    )
    # the owner and an admin may
    renewed = auth.ok(A, "renew", {"id": rid, "ttl": 900})
    assert renewed["ttl"] == 900
    with auth.admin() as c:
        wire(c, "release", {"id": rid})
        assert rid not in live(c, "private")


def test_why_about_another_tenants_request_is_refused(auth: Auth) -> None:
    """``why`` tells a request's state, position and what it waits for (who holds
    what): only for its owner or an admin, like release and renew."""
    with auth.admin() as c:
        make_pool(c, "queue", cores=1)
        c.call("tenant.add", TenantAdd(name="eps", priority=5, owners=[A]))
    rid = auth.ok(A, "reserve", reserve("queue", tenant="eps"))["id"]
    assert auth.ok(A, "why", {"id": rid})["state"] == "active"
    auth.refused(B, [("why", {"id": rid})])


def test_pid_binding_follows_only_the_callers_processes(auth: Auth) -> None:
    with auth.admin() as c:
        make_pool(c, "pids")
    sleeper = subprocess.Popen(
        ["setpriv", f"--reuid={A}", f"--regid={A}", "--clear-groups", "sleep", "60"]
    )
    try:
        mine = os.getpid()  # root's process
        auth.refused(A, [("reserve", reserve("pids", binding="pid", pid=mine))])
        auth.refused(B, [("reserve", reserve("pids", binding="pid", pid=sleeper.pid))])
        got = auth.ok(A, "reserve", reserve("pids", binding="pid", pid=sleeper.pid))
        assert got["pid"] == sleeper.pid and got["binding"] == "pid"
        with auth.admin() as c:  # an admin may bind to anyone's process
            wire(c, "reserve", reserve("pids", binding="pid", pid=sleeper.pid))
            assert len(live(c, "pids")) == 2
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_unprivileged_uid_cannot_preempt_an_admin(auth: Auth) -> None:
    """Defaults never give an unprivileged uid the power to evict what an admin holds:
    its auto-created tenant does not outrank anything an admin made, so neither
    ``preempt`` nor automatic preemption reaches an admin's reservations."""
    with auth.admin() as c:
        make_pool(c, "shared", cores=2, preemption="lower_priority")
        c.call("tenant.add", TenantAdd(name="ops", priority=1, owners=[0]))
        wire(c, "reserve", reserve("shared", tenant="ops"))
        wire(c, "reserve", reserve("shared"))  # root's own auto-created tenant
        held = live(c, "shared")
    auth.refused(
        A,
        [
            ("preempt", {"target": "ops", "pool": "shared"}),
            ("preempt", {"target": "root"}),
        ],
    )
    with auth.admin() as c:
        before = visible_state(c)
    seen = auth.as_user(
        A,
        [
            ("reserve", reserve("shared", 2)),
            ("reserve", reserve("shared", 1, wait=True, timeout=0.3)),
        ],
    )
    codes = [r["error"]["code"] if not r["ok"] else r["result"]["state"] for r in seen.replies]
    assert codes[0] == "insufficient", seen.replies
    with auth.admin() as c:
        assert live(c, "shared").keys() == held.keys(), "an admin's lease was preempted"
        after = visible_state(c)
    assert before["reservations"] == after["reservations"]
    auth.cases += 2


def test_no_preemption_in_a_pool_where_it_is_off(auth: Auth) -> None:
    with auth.admin() as c:
        make_pool(c, "calm", cores=2, preemption="off")
        make_pool(c, "rough", cores=2, preemption="lower_priority")
        c.call("tenant.add", TenantAdd(name="hi", priority=9, owners=[A]))
        c.call("tenant.add", TenantAdd(name="lo", priority=2, owners=[B]))
    calm = auth.ok(B, "reserve", reserve("calm", 2, tenant="lo"))["id"]
    rough = auth.ok(B, "reserve", reserve("rough", 2, tenant="lo"))["id"]
    auth.refused(A, [("preempt", {"target": "lo", "tenant": "hi", "pool": "calm"})])
    # without a pool: only where preemption is allowed
    got = auth.ok(A, "preempt", {"target": "lo", "tenant": "hi"})
    assert [r["id"] for r in got["reservations"]] == [rough], got
    with auth.admin() as c:
        assert calm in live(c, "calm") and rough not in live(c, "rough")
    # nor automatically: a request that does not fit is refused, not granted by eviction
    (reply,) = auth.as_user(A, [("reserve", reserve("calm", 1, tenant="hi"))]).replies
    assert not reply["ok"] and reply["error"]["code"] == "insufficient", reply
    auth.cases += 1
    with auth.admin() as c:
        assert calm in live(c, "calm")
        # an admin may evict anywhere
        evicted = wire(c, "preempt", {"target": "lo", "tenant": "hi", "pool": "calm"})
        assert [r["id"] for r in evicted["reservations"]] == [calm]
