"""cgroup v2 limits for ``resctl run`` (SPEC §10, the ``cgroup`` enforcement level).

Three layers: the pure limits; the file mechanics on the real cgroup v2 hierarchy
where this test may write one (skipped with the reason otherwise); the daemon's
decisions (who is confined, journaled, replayed, ended, swept) on a directory tree
standing in for cgroupfs. The kernel killing a CMD over its memory reservation runs
where the hierarchy has the memory controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import structlog
import trio

from resd import cgroups
from resd.cgroups import CgroupJobs, CgroupTree, limits_for, needed, probe
from resd.config import Config, ConfigError, _validate
from resd.gpu_usage import stronger
from tests.conftest import DAEMON_ARGS, InProcess, Proc, resctl, run_argv, subprocess_env
from tests.wire import WireClient

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux cgroups")

GIB = 2**30


# ------------------------------------------------------------------ pure limits


def test_limits_from_a_reservation() -> None:
    assert limits_for({"cpu": 1500, "memory": 256 * 2**20}, {}) == {
        "cpu.max": "150000 100000",
        "memory.max": str(256 * 2**20),
        "memory.swap.max": "0",
    }
    assert limits_for({"cpu": 5}, {}) == {"cpu.max": "1000 100000"}, "the kernel's least quota"
    assert limits_for({"licenses": 2}, {"cores": ["3", "1", "x2"]}) == {"cpuset.cpus": "1,3"}
    assert needed({"cpu": 1, "gpu": 1}, {}) == {"cpu"}
    assert needed({"memory": 1}, {"cores": ["0"]}) == {"memory", "cpuset"}
    assert needed({"licenses": 1}, {"cores": []}) == set(), "nothing to limit: no cgroup"


def test_the_ladder_puts_cgroup_between_mps_and_framework() -> None:
    assert stronger("framework", "cgroup") == "cgroup"
    assert stronger("none", "cgroup") == stronger("watch", "cgroup") == "cgroup"
    assert stronger("mig", "cgroup") == "mig"
    assert stronger("mps", "cgroup") == "mps"


def test_cgroup_root_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match="cgroup_root: 'jobs' is not an absolute path"):
        _validate(Config(cgroup_root="jobs"))
    _validate(Config(cgroup_root="off"))


# ------------------------------------------------------------------ probing


def _fake_proc(tmp: Path, own: str, mount: Path) -> Path:
    proc = tmp / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/cgroup").write_text(f"0::{own}\n")
    (proc / "self/mountinfo").write_text(
        f"30 23 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw\n"
        "31 23 0:27 / /proc rw - proc proc rw\n"
    )
    return proc


def test_probe_says_why_there_are_no_limits(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        assert probe("off") is None
        assert probe(str(tmp_path)) is None  # not cgroupfs
        assert probe("", _fake_proc(tmp_path, "/", tmp_path / "cg")) is None
    reasons = [e["reason"] for e in logs if e["event"] == "cgroup_limits_off"]
    assert reasons[0] == "cgroup_root = off"
    assert reasons[1] == f"{tmp_path} is not a cgroup v2 directory"
    assert "runs in the root cgroup" in reasons[2] and "set cgroup_root" in reasons[2]
    assert [e["log_level"] for e in logs] == ["info"] * 3, "never an error"


# ------------------------------------------------------------------ the real hierarchy


def _cgroup2_mount() -> Path | None:
    try:
        return cgroups._mount(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None


@pytest.fixture
def real_base() -> Iterator[Path]:
    """A fresh directory of the real cgroup v2 hierarchy (removed after), or a skip
    saying why there is none."""
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    base = mount / f"resd-test-{uuid.uuid4().hex[:8]}"
    try:
        base.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {mount}: {exc.strerror}")
    try:
        yield base
    finally:
        for child in sorted(base.rglob("*"), key=lambda p: -len(p.parts)):
            if child.is_dir():
                _kill_and_remove(child)
        _kill_and_remove(base)


def _kill_and_remove(cgroup: Path) -> None:
    if (cgroup / "cgroup.kill").exists():
        (cgroup / "cgroup.kill").write_text("1")
    for _ in range(250):
        try:
            cgroup.rmdir()
            return
        except OSError:
            time.sleep(0.02)


def _cgroup_of(pid: int) -> str:
    return cgroups._own(Path(f"/proc/{pid}/cgroup").read_text()) or ""


async def test_place_kill_and_remove_on_the_real_hierarchy(
    real_base: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    tree = probe(str(real_base))
    assert tree is not None and tree.jobs == real_base / cgroups.JOBS
    mount = _cgroup2_mount()
    assert mount is not None
    limits = {
        k: v
        for k, v in limits_for({"cpu": 500, "memory": GIB}, {}).items()
        if k.split(".")[0] in tree.controllers
    }
    path = tree.place("r-000000000001", sleeper.pid, limits)
    assert _cgroup_of(sleeper.pid) == "/" + str(path.relative_to(mount))
    for name, value in limits.items():
        assert (path / name).read_text().split()[0] == value.split()[0], name
    assert tree.leftovers(["r-000000000001"]) == []
    assert tree.leftovers([]) == ["r-000000000001"]
    jobs = CgroupJobs(tree, pause=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)
        assert jobs.sweep([]) == ["r-000000000001"]
        with trio.fail_after(10):
            while path.exists():  # noqa: ASYNC110 - the kernel tells nobody
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert sleeper.wait(5) == -9, "what was left in the cgroup was killed"


# ------------------------------------------------------------------ the daemon's decisions


@attrs.frozen
class DirTree(CgroupTree):
    """A plain directory standing in for cgroupfs: interface files are written as
    regular files, and removal takes them along (cgroupfs's rmdir does that itself)."""

    def remove(self, rid: str) -> bool:
        shutil.rmtree(self.path_of(rid), ignore_errors=True)
        return True


@pytest.fixture
def dir_tree(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> DirTree:
    tree = DirTree(short_tmp / "cg", frozenset({"cpu", "memory", "cpuset"}))
    tree.jobs.mkdir(parents=True)
    monkeypatch.setattr(cgroups, "probe", lambda setting: tree)
    return tree


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


async def test_the_daemon_confines_journals_ends_and_sweeps(
    dir_tree: DirTree, sleeper: subprocess.Popen[bytes], inproc: InProcess
) -> None:
    # the fixture's daemon started before the tree was patched in: start it again
    inproc = await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    await c.ok(
        "pool.create",
        {
            "name": "p",
            "resources": {
                "cpu": {"capacity": 8000},
                "memory": {"capacity": 64 * GIB},
                "cores": {"kind": "set", "members": [{"name": str(i)} for i in range(8)]},
                "licenses": {"capacity": 4},
            },
            "max_per_tenant": 0,
        },
    )
    lease = await c.ok(
        "reserve",
        {"pool": "p", "resources": {"cpu": 1500, "memory": 256 * 2**20, "cores": 2}},
    )
    info = await c.ok("register", {"id": lease["id"], "pid": sleeper.pid, "confine": True})
    path = dir_tree.path_of(lease["id"])
    assert info["enforcement"] == "cgroup" and info["cgroup"] == str(path)
    assert (path / "cpu.max").read_text() == "150000 100000"
    assert (path / "memory.max").read_text() == str(256 * 2**20)
    assert (path / "cpuset.cpus").read_text() == ",".join(info["members"]["cores"])
    assert (path / "cgroup.procs").read_text() == str(sleeper.pid)

    plain = await c.ok("reserve", {"pool": "p", "resources": {"licenses": 1}})
    unconfined = await c.ok("register", {"id": plain["id"], "pid": sleeper.pid, "confine": True})
    assert unconfined["enforcement"] == "none" and unconfined["cgroup"] == "", "nothing to limit"
    asked_not = await c.ok("reserve", {"pool": "p", "resources": {"memory": GIB}})
    kept = await c.ok("register", {"id": asked_not["id"], "pid": sleeper.pid})
    assert kept["cgroup"] == "" and not dir_tree.path_of(asked_not["id"]).exists()

    (dir_tree.jobs / "r-0000000000ff").mkdir()  # a job whose lease ended while resd was away
    inproc = await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    listed = {r["id"]: r for r in (await c.ok("list"))["reservations"]}
    assert listed[lease["id"]]["enforcement"] == "cgroup", "replayed from the journal"
    assert listed[lease["id"]]["cgroup"] == str(path)
    with trio.fail_after(5):
        while (dir_tree.jobs / "r-0000000000ff").exists():  # noqa: ASYNC110
            await trio.sleep(0.01)  # swept
    assert path.exists(), "a live lease's job stays"

    await c.ok("release", {"id": lease["id"]})
    with trio.fail_after(5):
        while path.exists():  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert (dir_tree.base / cgroups.JOBS).is_dir()


async def test_a_gang_is_confined_as_one_lease(
    dir_tree: DirTree, sleeper: subprocess.Popen[bytes], inproc: InProcess
) -> None:
    inproc = await inproc.restart()
    c = await WireClient.connect(inproc.socket)
    for name in ("a", "b"):
        await c.ok("pool.create", {"name": name, "resources": {"memory": {"capacity": 8 * GIB}}})
    gang = await c.ok(
        "reserve",
        {
            "parts": [
                {"pool": "a", "resources": {"memory": GIB}},
                {"pool": "b", "resources": {"memory": 2 * GIB}},
            ]
        },
    )
    info = await c.ok("register", {"id": gang["id"], "pid": sleeper.pid, "confine": True})
    assert info["enforcement"] == "cgroup"
    assert (dir_tree.path_of(gang["id"]) / "memory.max").read_text() == str(3 * GIB)


# ------------------------------------------------------------------ the kernel's verdict


def _run(proc: Proc, options: list[str], cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """``resctl run --pool p OPTIONS -- CMD`` against ``proc``."""
    return subprocess.run(
        run_argv(proc, ["--pool", "p", *options], cmd),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.contextmanager
def _resd(real_base: Path, short_tmp: Path) -> Iterator[Proc]:
    """A real resd whose ``cgroup_root`` is ``real_base``, with a pool ``p``."""
    proc = Proc(
        socket=str(short_tmp / "resd.sock"),
        state_dir=str(short_tmp / "state"),
        args=DAEMON_ARGS,
        log=short_tmp / "resd.log",
        env={"RESD_CGROUP_ROOT": str(real_base)},
    ).start()
    try:
        resctl(proc, "pool", "create", "--name", "p", "--memory", "4G", "--cpu", "4")
        yield proc
    finally:
        assert proc.stop() == 0


@pytest.mark.slow
def test_resctl_run_over_its_memory_is_killed_by_the_kernel(
    real_base: Path, short_tmp: Path
) -> None:
    """The issue's check: ``resctl run --memory 256M -- python -c
    "bytearray(512*2**20)"`` is killed by the kernel where cgroups are writable."""
    with structlog.testing.capture_logs():
        tree = probe(str(real_base))
    if tree is None or "memory" not in tree.controllers:
        pytest.skip(
            f"the cgroup v2 hierarchy at {real_base.parent} has no memory controller for"
            " resd (a hybrid host keeps memory on cgroup v1)"
        )
    with _resd(real_base, short_tmp) as proc:
        hog = _run(proc, ["--memory", "256M"], [sys.executable, "-c", "bytearray(512*2**20)"])
        assert hog.returncode == 128 + 9, (hog.returncode, hog.stderr)
        fits = _run(proc, ["--memory", "256M"], [sys.executable, "-c", "bytearray(64*2**20)"])
        assert fits.returncode == 0, fits.stderr
    assert os.listdir(real_base / cgroups.JOBS) == [], "each job's cgroup went with its lease"


@pytest.mark.slow
def test_resctl_run_puts_cmd_in_its_cgroup_where_the_host_allows(
    real_base: Path, short_tmp: Path
) -> None:
    """Through the real resd and resctl: CMD starts inside its lease's cgroup with the
    lease's limits when the hierarchy has the controllers, and runs unconfined (one
    log line at start, ``enforcement`` unchanged) when it has not."""
    with structlog.testing.capture_logs():
        tree = probe(str(real_base))
    assert tree is not None
    confined = {"cpu", "memory"} <= tree.controllers
    with _resd(real_base, short_tmp) as proc:
        show = f"{sys.executable} -m resctl list --json --socket {proc.socket}"
        run = _run(
            proc,
            ["--cpu", "1.5", "--memory", "256M"],
            ["sh", "-c", f"echo $RESD_RESERVATION_ID; cat /proc/self/cgroup; {show}"],
        )
        assert run.returncode == 0, run.stderr
    own = next(line[3:] for line in run.stdout.splitlines() if line.startswith("0::"))
    rid = run.stdout.split()[0]
    listed, _ = json.JSONDecoder().raw_decode(run.stdout[run.stdout.index("[") :])
    shown = next(r for r in listed if r["id"] == rid)
    logged = [json.loads(line) for line in proc.log_text().splitlines() if line.startswith("{")]
    started = [e for e in logged if e["event"] in ("cgroup_limits", "cgroup_limits_off")]
    assert len(started) == 1, "one line at start says what resd can do"
    if confined:
        assert own.endswith(f"/{cgroups.JOBS}/{shown['id']}"), own
        assert shown["enforcement"] == "cgroup" and shown["cgroup"].endswith(shown["id"])
    else:
        assert cgroups.JOBS not in own
        assert shown["enforcement"] == "none" and shown["cgroup"] == ""
        assert started[0]["missing"], started[0]
