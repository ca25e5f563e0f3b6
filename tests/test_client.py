"""The sync client against a real daemon: leases, typed errors, sessions, identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from resd_client import (
    Client,
    ConflictError,
    Disconnected,
    InsufficientError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from resd_client.errors import ErrorCode
from resd_client.protocol import Empty, PoolCreate, ResourceSpec, TenantAdd
from tests.conftest import Proc, subprocess_env

pytestmark = pytest.mark.slow


def make_pool(client: Client, name: str = "p", max_per_tenant: int = 0, **caps: int) -> None:
    resources = {
        k: ResourceSpec(capacity=v) for k, v in (caps or {"cpu": 4000, "licenses": 2}).items()
    }
    client.call(
        "pool.create", PoolCreate(name=name, resources=resources, max_per_tenant=max_per_tenant)
    )


def test_lease_lifecycle(resd_proc: Proc) -> None:
    with Client(resd_proc.socket) as client:
        make_pool(client)
        assert client.hello.admin and client.hello.user_tenant
        with client.reserve(
            "p", cpu="1.5", resources={"licenses": 1}, ttl=60, label="job"
        ) as lease:
            assert lease.info.resources == {"cpu": 1500, "licenses": 1}
            assert lease.info.binding == "session" and lease.info.label == "job"
            assert [r.id for r in client.list()] == [lease.id]
            before = lease.info.expires_at
            time.sleep(0.01)
            lease.renew(120)
            assert lease.info.expires_at is not None and before is not None
            assert lease.info.expires_at > before
        assert lease.ended == "released"
        assert client.list() == []
        status = client.status()
        assert status.active == 0 and status.pools[0].name == "p"


def test_typed_errors_carry_code_and_details(resd_proc: Proc) -> None:
    with Client(resd_proc.socket) as client:
        make_pool(client, max_per_tenant=1)
        with pytest.raises(InsufficientError) as short:
            client.reserve("p", cpu=5, wait=False)
        assert short.value.code == ErrorCode.INSUFFICIENT
        assert short.value.details["resources"]["cpu"] == {
            "requested": 5000,
            "available": 4000,
            "shortfall": 1000,
        }
        lease = client.reserve("p", cpu=1)
        with pytest.raises(ConflictError) as conflict:
            client.reserve("p", cpu=1, wait=False)
        assert conflict.value.details["existing"] == [lease.id]
        assert client.try_reserve("p", cpu=1) is None
        with pytest.raises(NotFoundError):
            client.reserve("nope", cpu=1)
        with pytest.raises(InvalidError, match="licenses"):
            client.reserve("p", resources={"licenses": "1.5"})
        with pytest.raises(InvalidError, match="has no resource"):
            client.reserve("p", gpu=1)
        with pytest.raises(NotFoundError):
            client.release("r-000000000000")


def test_session_leases_end_with_the_connection(resd_proc: Proc) -> None:
    with Client(resd_proc.socket) as admin:
        make_pool(admin)
        worker = Client(resd_proc.socket)
        session = worker.reserve("p", cpu=1)
        detached = worker.reserve("p", cpu=1, binding="detached")
        worker.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(admin.list()) != 1:
            time.sleep(0.01)
        assert [r.id for r in admin.list()] == [detached.id]
        assert session.id not in {r.id for r in admin.list()}


def test_killed_worker_process_releases_its_lease(resd_proc: Proc) -> None:
    with Client(resd_proc.socket) as admin:
        make_pool(admin)
        script = textwrap.dedent(f"""
            import sys, time
            from resd_client import Client
            c = Client({resd_proc.socket!r})
            lease = c.reserve("p", cpu=2)
            print(lease.id, flush=True)
            time.sleep(60)
        """)
        child = subprocess.Popen(
            [sys.executable, "-c", script], env=subprocess_env(), stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            rid = child.stdout.readline().strip()
            assert [r.id for r in admin.list()] == [rid]
            child.kill()
            child.wait(10)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and admin.list():
                time.sleep(0.005)
            assert admin.list() == []
        finally:
            child.kill()
            child.wait(10)
            if child.stdout:
                child.stdout.close()


def test_expired_push_reaches_the_lease(resd_proc: Proc) -> None:
    with Client(resd_proc.socket) as client:
        make_pool(client)
        seen = threading.Event()
        lease = client.reserve("p", cpu=1, ttl=0.2)
        lease.on_event = lambda event: seen.set()
        assert seen.wait(10) or lease.ended == "expired"
        assert lease.ended == "expired"
        assert lease.info.state == "expired"


def test_concurrent_threads_share_one_client(resd_proc: Proc) -> None:
    with Client(resd_proc.socket) as client:
        make_pool(client, cpu=100_000)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(20):
                    client.reserve("p", cpu="100m").release()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert client.list() == []


def test_daemon_gone_is_unavailable(resd_proc: Proc) -> None:
    """``reconnect=0``: the session closes when the daemon goes (the old behaviour)."""
    client = Client(resd_proc.socket, reconnect=0)
    resd_proc.stop()
    with pytest.raises(UnavailableError):
        client.status()
    client.close()
    with pytest.raises(UnavailableError, match="no resd daemon is listening"):
        Client(resd_proc.socket)


def test_daemon_gone_for_good_is_unavailable_once_reconnecting_gives_up(
    resd_proc: Proc,
) -> None:
    client = Client(resd_proc.socket, reconnect=0.5)
    t0 = time.monotonic()  # the 0.5 s start when the client sees the EOF, during stop()
    resd_proc.stop()
    with pytest.raises(UnavailableError, match=r"gave up reconnecting after 0\.5s"):
        client.status()
    assert 0.4 < time.monotonic() - t0 < 5
    assert client.closed
    assert [type(e) for e in client.events(0.1)] == [Disconnected]  # then the end
    client.close()


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_identity_comes_from_the_kernel(short_tmp: Path) -> None:
    """A non-admin uid may not create pools, act for others' tenants or release their leases."""
    short_tmp.chmod(0o755)
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=["--no-host-pool", "--log-format", "json"],
        log=short_tmp / "resd.log",
        env={"RESD_SOCKET_MODE": "0666"},
    )
    proc.start()
    try:
        with Client(proc.socket) as admin:
            make_pool(admin, cpu=8000)
            admin.call("tenant.add", TenantAdd(name="private", owners=[0]))
            admin.call("tenant.add", TenantAdd(name="open"))
            root_lease = admin.reserve("p", cpu=1, binding="detached", tenant="open")
            script = textwrap.dedent(f"""
                import os, json
                from resd_client import Client, ResdError
                from resd_client.protocol import PoolCreate, ResourceSpec
                # the interpreter may live under /root: import everything first
                os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
                out = {{}}
                c = Client({proc.socket!r})
                out["hello"] = [c.hello.uid, c.hello.admin, c.hello.user_tenant]
                def attempt(name, fn):
                    try:
                        fn(); out[name] = "ok"
                    except ResdError as e:
                        out[name] = e.code
                attempt("pool", lambda: c.call("pool.create", PoolCreate(name="x", resources={{"cpu": ResourceSpec(capacity=1)}})))
                attempt("private", lambda: c.reserve("p", cpu=1, tenant="private"))
                attempt("open", lambda: c.reserve("p", cpu=1, tenant="open"))
                attempt("own", lambda: c.reserve("p", cpu=1, binding="detached"))
                attempt("release_other", lambda: c.release({root_lease.id!r}))
                print(json.dumps(out))
            """)
            result = subprocess.run(
                [sys.executable, "-c", script],
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 0, result.stderr
            out = json.loads(result.stdout)
            assert out["hello"][0] == NOBODY and out["hello"][1] is False
            assert out["pool"] == "forbidden"
            assert out["private"] == "forbidden"
            assert out["open"] == "ok"
            assert out["own"] == "ok"
            assert out["release_other"] == "ok"  # tenant "open" has no owners: anyone may act as it
            own = [r for r in admin.list() if r.uid == NOBODY and r.tenant == out["hello"][2]]
            assert len(own) == 1
            tenants = {t.name: t for t in admin.call("tenant.list", Empty()).tenants}
            assert tenants[out["hello"][2]].owners == [NOBODY]
    finally:
        assert proc.stop() == 0
