"""``resctl resize`` (issue 12): its flags refused before connecting, then against
a real daemon — a growth that fits, one that waits and is granted when another
lease shrinks, a shrink that names what it gives back, a refused growth's exit
code, and Ctrl-C cancelling a wait."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from resctl.main import app
from resctl.reservations import resize_request
from resd_client.errors import InvalidError
from tests.conftest import Proc, resctl, subprocess_env, wait_for

RID = "r-0123456789ab"


def invoke(*args: str, socket: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, [*args, "--socket", socket], env={"NO_COLOR": None, "RESD_SOCKET": None}
    )
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def missing_socket(tmp_path: Path) -> str:
    return str(tmp_path / "no-daemon" / "resd.sock")


# ------------------------------------------------------------ flags, no daemon


def test_flags_become_a_resize_in_internal_units() -> None:
    args = resize_request(
        RID,
        cpu="1.5",
        memory="4G",
        res=["ports=0"],
        give_back=["ports=30005-30009", "ports=30001"],
        wait=True,
        timeout="2m",
    )
    assert args.resources == {"cpu": 1500, "memory": 4 << 30, "ports": 0}
    assert args.give_back == {"ports": ["30005-30009", "30001"]}
    assert (args.id, args.wait, args.timeout) == (RID, True, 120.0)
    assert resize_request(RID, gpu="2").give_back == {}
    with pytest.raises(InvalidError, match="say what to resize"):
        resize_request(RID)


BAD_FLAGS = [
    ([], "say what to resize: --cpu, --memory, --gpu, --vram or --res"),
    (["--cpu", "-1"], "--cpu: '-1' is negative"),
    (["--res", "ports=-3"], "--res ports: '-3' is negative"),
    (["--cpu", "lots"], "cpu"),
    (["--res", "ports"], "--res: 'ports' is not of the form NAME=QTY"),
    (["--cpu", "1", "--res", "cpu=2"], "resource cpu is given twice"),
    (["--gpu", "1", "--vram", "20G"], "give --gpu or --vram, not both"),
    (
        ["--cpu", "1", "--give-back", "gpu=3"],
        "--give-back gpu: give gpu's new amount too (--gpu N)",
    ),
    (
        ["--cpu", "1", "--give-back", "ports=30001"],
        "--give-back ports: give ports's new amount too (--res ports=N)",
    ),
    (["--gpu", "1", "--give-back", "gpu"], "--give-back: 'gpu' is not of the form NAME=M1,M2"),
    (["--gpu", "1", "--give-back", "gpu=2,,3"], "has an empty member"),
    (["--gpu", "1", "--give-back", "gpu=2", "--give-back", "gpu=2"], "2 named more than once"),
    (["--cpu", "1", "--timeout", "5"], "--timeout: only a waiting request has one"),
    (["--cpu", "1", "--wait", "--timeout", "soon"], "timeout: 'soon' is not a duration"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_exit_2_before_connecting(
    flags: list[str], message: str, missing_socket: str
) -> None:
    code, stdout, stderr = invoke("resize", "--id", RID, *flags, socket=missing_socket)
    assert code == 2, stderr
    assert stderr.startswith("resctl: invalid: ") and message in stderr, stderr
    assert stdout == ""


def test_a_bad_id_is_refused_and_the_id_is_required(missing_socket: str) -> None:
    code, _, stderr = invoke("resize", "--id", "nope", "--cpu", "1", socket=missing_socket)
    assert code == 2 and stderr.startswith("resctl: invalid: ")
    code, _, stderr = invoke("resize", "--cpu", "1", socket=missing_socket)
    assert code == 2 and "--id" in stderr


def test_a_bad_flag_with_json_prints_the_error_map(missing_socket: str) -> None:
    code, stdout, _ = invoke("resize", "--id", RID, "--json", socket=missing_socket)
    assert code == 2 and json.loads(stdout)["error"]["details"]["field"] == "resources"


def test_no_daemon_is_unavailable(missing_socket: str) -> None:
    code, _, stderr = invoke("resize", "--id", RID, "--cpu", "1", socket=missing_socket)
    assert code == 12 and "no resd daemon is listening" in stderr


def test_resize_is_in_the_help() -> None:
    result = CliRunner().invoke(app, ["resize", "--help"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0
    for flag in ("--id", "--cpu", "--gpu", "--vram", "--res", "--give-back", "--wait"):
        assert flag in result.stdout


# ----------------------------------------------------------- a real daemon


def reserve(proc: Proc, *flags: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        resctl(proc, "reserve", "--pool", "p", *flags, "--json").stdout
    )
    return info


def resize(proc: Proc, rid: str, *flags: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(resctl(proc, "resize", "--id", rid, *flags, "--json").stdout)
    return info


def pending(proc: Proc) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(resctl(proc, "list", "--pending", "--json").stdout)[
        "reservations"
    ]
    return listed


def start(proc: Proc, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "resctl", *args, "--socket", proc.socket],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def pool(resd_proc: Proc) -> Proc:
    resctl(
        resd_proc,
        "pool",
        "create",
        "--name",
        "p",
        "--cpu",
        "4",
        "--set",
        "gpu=0,1,2,3",
        "--range",
        "ports=30000-30009",
        "--max-per-tenant",
        "0",
    )
    return resd_proc


@pytest.mark.slow
def test_a_growth_that_fits_prints_the_new_amounts(pool: Proc) -> None:
    rid = reserve(pool, "--cpu", "1", "--gpu", "1")["id"]
    line = resctl(pool, "resize", "--id", rid, "--cpu", "2", "--gpu", "2").stdout
    assert line.split()[:2] == [rid, "active"]
    assert "cpu=2,gpu=2" in line and "assigned=gpu:0,1" in line
    listed = json.loads(resctl(pool, "list", "--json").stdout)["reservations"]
    assert listed[0]["resources"] == {"cpu": 2000, "gpu": 2}


@pytest.mark.slow
def test_a_shrink_gives_back_what_it_names(pool: Proc) -> None:
    rid = reserve(pool, "--gpu", "3", "--res", "ports=10")["id"]
    info = resize(
        pool,
        rid,
        "--gpu",
        "2",
        "--give-back",
        "gpu=1",
        "--res",
        "ports=5",
        "--give-back",
        "ports=30005-30009",
    )
    assert info["resources"] == {"gpu": 2, "ports": 5}
    assert info["members"]["gpu"] == ["0", "2"]
    assert info["values"]["ports"] == [[30000, 30004]]
    again = reserve(pool, "--gpu", "2", "--res", "ports=5")  # what was given back is free
    assert sorted(again["members"]["gpu"]) == ["1", "3"]
    assert again["values"]["ports"] == [[30005, 30009]]


@pytest.mark.slow
def test_a_refused_growth_exits_6_and_changes_nothing(pool: Proc) -> None:
    rid = reserve(pool, "--cpu", "3")["id"]
    result = resctl(pool, "resize", "--id", rid, "--cpu", "5", check=False)
    assert result.returncode == 6, result.stderr
    assert result.stderr.startswith("resctl: insufficient: ") and "cpu short by" in result.stderr
    assert result.stdout == ""
    bad = resctl(pool, "resize", "--id", rid, "--cpu", "0", check=False)
    assert bad.returncode == 2 and "release it instead" in bad.stderr
    missing = resctl(pool, "resize", "--id", "r-000000000000", "--cpu", "1", check=False)
    assert missing.returncode == 3
    listed = json.loads(resctl(pool, "list", "--json").stdout)["reservations"]
    assert listed[0]["resources"] == {"cpu": 3000}


@pytest.mark.slow
def test_a_waiting_growth_is_granted_when_another_lease_shrinks(pool: Proc) -> None:
    mine = reserve(pool, "--cpu", "1")["id"]
    theirs = reserve(pool, "--cpu", "3")["id"]
    waiting = start(pool, "resize", "--id", mine, "--cpu", "3", "--wait", "--timeout", "20")
    try:
        wait_for(lambda: len(pending(pool)) == 1, 10, "the resize to queue")
        assert resize(pool, theirs, "--cpu", "1")["resources"] == {"cpu": 1000}
        stdout, stderr = waiting.communicate(timeout=20)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, stderr
    assert f"{mine} cannot grow yet; waiting as " in stderr
    assert stdout.split()[:2] == [mine, "active"] and "cpu=3" in stdout
    assert pending(pool) == []
    history = json.loads(resctl(pool, "export", "--format", "json").stdout)
    kinds = [h["kind"] for h in history if h["reservation"] == mine]
    assert kinds == ["reserved", "resized"]


@pytest.mark.slow
def test_ctrl_c_cancels_a_waiting_growth(pool: Proc) -> None:
    mine = reserve(pool, "--cpu", "1")["id"]
    reserve(pool, "--cpu", "3")
    waiting = start(pool, "resize", "--id", mine, "--cpu", "2", "--wait")
    try:
        wait_for(lambda: len(pending(pool)) == 1, 10, "the resize to queue")
        waiting.send_signal(signal.SIGINT)
        _, stderr = waiting.communicate(timeout=10)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 130, stderr
    assert pending(pool) == []
    listed = {r["id"]: r for r in json.loads(resctl(pool, "list", "--json").stdout)["reservations"]}
    assert listed[mine]["resources"] == {"cpu": 1000}
