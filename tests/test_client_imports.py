"""The client library works with only the standard library, msgpack and msgspec (its
compiled codec; SPEC §1, issue 14).

Worker processes import ``resd_client`` without the daemon's dependencies. A child
interpreter blocks trio, psutil, pynvml, typer, rich, attrs, cattrs, structlog and
PyYAML with a meta-path finder, then talks to a real daemon.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Proc, subprocess_env

BLOCKED = [
    "trio",
    "psutil",
    "pynvml",
    "typer",
    "rich",
    "attrs",
    "cattrs",
    "structlog",
    "yaml",
    "torch",
    "jax",
]

CHILD = r"""
import json, sys

BLOCKED = set(json.loads(sys.argv[2]))


class Blocker:
    hits = []

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            Blocker.hits.append(name)
            raise ImportError(f"{name} is blocked: the client must not need it")
        return None


sys.meta_path.insert(0, Blocker())
already = set(sys.modules)

# the blocker works
try:
    import trio  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the import blocker does not work")
Blocker.hits.clear()

import resd_client
import resd_client.protocol
from resd_client import Client, InsufficientError
from resd_client.protocol import PoolCreate, ResourceSpec

out = {}
with Client(sys.argv[1], name="imports-test") as client:
    out["user_tenant"] = client.hello.user_tenant
    client.call(
        "pool.create",
        PoolCreate(
            name="w",
            resources={"cpu": ResourceSpec(capacity=4000), "memory": ResourceSpec(capacity=8 << 30)},
            max_per_tenant=0,
        ),
    )
    lease = client.reserve("w", cpu="1.5", memory="1G", ttl=60)
    out["lease"] = {"id": lease.id, "resources": lease.info.resources, "binding": lease.info.binding}
    out["listed"] = [r.id for r in client.list(pool="w")]
    try:
        client.reserve("w", cpu=8, wait=False)
    except InsufficientError as exc:
        out["insufficient"] = exc.details
    lease.release()
    out["ended"] = lease.ended
    out["after_release"] = [r.id for r in client.list(pool="w")]
    out["status_active"] = client.status().active

new = {m.partition(".")[0] for m in set(sys.modules) - already}
out["blocked_loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
out["blocked_attempts"] = sorted(set(Blocker.hits))
out["third_party"] = sorted(
    m for m in new if m not in sys.stdlib_module_names and not m.startswith("_")
)
print(json.dumps(out))
"""


def run_child(socket: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, socket, json.dumps(BLOCKED)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_client_works_without_daemon_dependencies(resd_proc: Proc) -> None:
    out = run_child(resd_proc.socket)
    assert out["blocked_loaded"] == []
    third_party = out["third_party"]
    assert isinstance(third_party, list)
    # cython_runtime is the pseudo-module of msgpack's compiled extension;
    # msgspec imports typing_extensions when it is installed
    allowed = {"msgpack", "msgspec", "resd_client", "cython_runtime", "typing_extensions"}
    assert set(third_party) <= allowed, third_party
    lease = out["lease"]
    assert isinstance(lease, dict)
    assert lease["resources"] == {"cpu": 1500, "memory": 1 << 30}
    assert lease["binding"] == "session"
    assert out["listed"] == [lease["id"]]
    assert out["insufficient"] == {
        "pool": "w",
        "resources": {"cpu": {"requested": 8000, "available": 2500, "shortfall": 5500}},
    }
    assert out["ended"] == "released"
    assert out["after_release"] == []
    assert out["status_active"] == 0


def test_blocker_catches_a_daemon_import() -> None:
    """The check can fail: importing the daemon package pulls in blocked modules."""
    code = CHILD.replace(
        "import resd_client.protocol\n", "import resd_client.protocol\nimport resd.ops\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent/resd.sock", json.dumps(BLOCKED)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "is blocked" in result.stderr
