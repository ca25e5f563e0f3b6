"""``resctl reserve --part ... --part ...`` and ``resctl run --part ... -- CMD`` (issue 12).

First without a daemon: parsing and validating ``--part`` (each part's items, a
gang's size, the flags ``--part`` replaces), rendering a gang (one line per part;
one row in ``list``), and the grace ``run`` gives a gang's CMD. Then end to end: a
gang across two pools reserved by ``resctl`` and by the sync client, listed as one
lease, released whole, and ``resctl run`` giving CMD the GPUs of every part.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import pytest
from typer.testing import CliRunner

from resctl.main import app
from resctl.options import gang_fields, parse_part, reserve_fields_of
from resctl.render import make_console, part_line, reservation_lines, reservations_table
from resctl.run import lease_grace
from resd_client import Client
from resd_client.errors import InvalidError, NotFoundError
from resd_client.protocol import Empty, PoolName, ReservationInfo
from tests.conftest import Proc, resctl, subprocess_env

GIB = 1 << 30
NOW = 1_800_000_000.0


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        app, [*args], env={"NO_COLOR": None, "RESD_SOCKET": "/nonexistent/resd.sock"}
    )
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("pool=a,gpu=2", {"pool": "a", "resources": {"gpu": 2}}),
        ("pool=b,cpu=4,memory=8G", {"pool": "b", "resources": {"cpu": 4000, "memory": 8 * GIB}}),
        (" pool = b , cpu = 500m ", {"pool": "b", "resources": {"cpu": 500}}),
        ("pool=a,vram=20G", {"pool": "a", "resources": {"vram": 20 * GIB}}),
        ("pool=a,licenses=3", {"pool": "a", "resources": {"licenses": 3}}),
        ("pool=a,members.gpu=0+3", {"pool": "a", "members": {"gpu": ["0", "3"]}}),
        (
            "pool=p,ports=2,members.ports=30000-30009+30020",
            {
                "pool": "p",
                "resources": {"ports": 2},
                "members": {"ports": ["30000-30009", "30020"]},
            },
        ),
        (
            "pool=a,gpu=1,gpu-model=NVIDIA H100 80GB HBM3,numa=1",
            {
                "pool": "a",
                "resources": {"gpu": 1},
                "constraints": {"model": "NVIDIA H100 80GB HBM3", "numa": "1"},
            },
        ),
    ],
)
def test_a_part_is_parsed_into_the_wire_map_of_a_part(text: str, part: dict[str, Any]) -> None:
    assert parse_part(text) == {"resources": {}, "members": {}, "constraints": {}, **part}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("gpu=2", "name the part's pool"),
        ("pool=a", "ask for at least one resource"),
        ("pool=a,,gpu=1", "'' is not of the form KEY=VALUE"),
        ("pool=a,gpu", "'gpu' is not of the form KEY=VALUE"),
        ("pool=a,gpu=", "'gpu=' is not of the form KEY=VALUE"),
        ("pool=a,pool=b,gpu=1", "gives pool twice; give each part its own --part"),
        ("pool=a,cpu=1,cpu=2", "gives cpu twice"),
        ("pool=a,gpu=x", "gpu: 'x' is not a quantity"),
        ("pool=a,gpu=-1", "gpu: must be greater than zero"),
        ("pool=a,gpu=0", "gpu: must be greater than zero"),
        ("pool=a,memory=8Q", "memory"),
        ("pool=a,GPU=1", "resource name 'GPU' is not valid"),
        ("pool=a,members.GPU=1", "resource name 'GPU' is not valid"),
        ("pool=a,members.gpu=0++1", "members.gpu: '0\\+\\+1' has an empty member; join"),
        ("pool=A b,gpu=1", "pool name 'A b' is not valid"),
        ("pool=a,numa=x", "numa: 'x' is not a NUMA node number"),
        ("pool=a,gpu=1,vram=2G", "not both"),
    ],
)
def test_a_bad_part_is_refused_naming_it(text: str, match: str) -> None:
    with pytest.raises(InvalidError, match=match) as caught:
        parse_part(text)
    assert caught.value.message.startswith(f"--part {text!r}: ")


def test_a_gang_has_two_to_sixteen_parts() -> None:
    with pytest.raises(InvalidError, match="2 to 16 parts, got 1; for one pool use --pool"):
        gang_fields(["pool=a,gpu=1"], {})
    with pytest.raises(InvalidError, match="got 17"):
        gang_fields(["pool=a,gpu=1"] * 17, {})
    fields = gang_fields(["pool=a,gpu=1"] * 16, {"placement": "spread"})
    assert len(fields["parts"]) == 16 and fields["placement"] == "spread"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"pool": "a"}, "--pool"),
        ({"cpu": "1", "res": ["ports=2"]}, "--cpu, --res"),
        ({"member": ["gpu=0"]}, "--member"),
        ({"gpu_model": "H100", "numa": "0"}, "--gpu-model, --numa"),
        ({"selector": ["zone=a"]}, "--selector"),
        ({"contiguous": ["ports"]}, "--contiguous"),
    ],
)
def test_part_is_exclusive_with_the_flags_it_replaces(flags: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidError, match=f"do not combine it with {named};") as caught:
        reserve_fields_of({"part": ["pool=a,gpu=1", "pool=b,cpu=1"], **flags})
    assert caught.value.details["field"] == "part"


def test_reserve_fields_of_gives_a_gang_or_a_plain_request() -> None:
    gang = reserve_fields_of({"part": ["pool=a,gpu=1", "pool=b,cpu=1"], "placement": None})
    assert [p["pool"] for p in gang["parts"]] == ["a", "b"]
    assert "pool" not in gang and "resources" not in gang
    plain = reserve_fields_of({"cpu": "1", "part": None})
    assert plain["pool"] == "host" and plain["resources"] == {"cpu": 1000}
    with pytest.raises(InvalidError, match="--placement: 'random'"):
        reserve_fields_of({"part": ["pool=a,gpu=1", "pool=b,cpu=1"], "placement": "random"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reserve", "--part", "pool=a,gpu=1"], "a gang has 2 to 16 parts, got 1"),
        (
            ["reserve", "--part", "pool=a,gpu=1", "--part", "pool=b,cpu=1", "--cpu", "2"],
            "do not combine it with --cpu",
        ),
        (["reserve", "--part", "pool=a,gpu=1", "--part", "cpu=1"], "name the part's pool"),
        (
            ["reserve", "--part", "pool=a,gpu=1", "--part", "pool=b,cpu=1", "--timeout", "5"],
            "--timeout: only a waiting request",
        ),
        (
            ["run", "--part", "pool=a,gpu=x", "--part", "pool=b,cpu=1", "--", "true"],
            "--part 'pool=a,gpu=x': gpu: 'x' is not a quantity",
        ),
        (["run", "--part", "pool=a,gpu=1", "--pool", "a", "--", "true"], "--pool"),
    ],
)
def test_bad_parts_exit_2_before_connecting(argv: list[str], message: str) -> None:
    code, stdout, stderr = invoke(*argv)
    assert code == 2, (stdout, stderr)
    assert message in stderr and "invalid" in stderr


@pytest.mark.parametrize("command", ["reserve", "run"])
def test_help_explains_part(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    text = " ".join(result.stdout.split())
    assert "--part" in text and "pool=NAME (required)" in text
    assert "members.RES=M1+M2" in text and "--contiguous has no part form" in text


# ----------------------------------------------------------------- rendering


def reservation(**fields: Any) -> ReservationInfo:
    values: dict[str, Any] = {
        "id": "r-0123456789ab",
        "tenant": "t1",
        "pool": "a",
        "resources": {"cpu": 1000},
        "label": "",
        "created_at": NOW,
        "ttl": None,
        "expires_at": None,
        "binding": "detached",
        "reclaimable": False,
        "state": "active",
        "uid": 1000,
    }
    values.update(fields)
    return ReservationInfo(**values)


def gang() -> ReservationInfo:
    a = reservation(resources={"gpu": 2}, members={"gpu": ["0", "1"]})
    b = reservation(id="r-0123456789ab.1", pool="b", resources={"cpu": 4000, "memory": 8 * GIB})
    return reservation(
        pool="a,b",
        resources={"gpu": 2, "cpu": 4000, "memory": 8 * GIB},
        members={"gpu": ["0", "1"]},
        label="train",
        parts=[a, b],
    )


def test_a_gang_is_its_lease_line_and_one_indented_line_per_part() -> None:
    lines = reservation_lines(gang(), NOW)
    assert lines == [
        "r-0123456789ab active tenant=t1 pool=a,b cpu=4,memory=8GiB,gpu=2"
        " assigned=gpu:0,1 label=train",
        "  r-0123456789ab pool=a gpu=2 assigned=gpu:0,1",
        "  r-0123456789ab.1 pool=b cpu=4,memory=8GiB",
    ]
    assert part_line(gang().parts[1]) == lines[2]
    assert reservation_lines(reservation(), NOW) == ["r-0123456789ab active tenant=t1 pool=a cpu=1"]


def test_list_shows_a_gang_as_one_row() -> None:
    stream = io.StringIO()
    make_console(stream, plain=True).print(reservations_table([gang()], NOW, plain=True))
    header, *rows = stream.getvalue().splitlines()
    assert header.split()[:3] == ["ID", "TENANT", "POOL"] and len(rows) == 1
    assert rows[0].split()[:3] == ["r-0123456789ab", "t1", "a,b"]


class GraceClient:
    """``client.call("pool.show", ...)`` answering from a table of graces."""

    def __init__(self, graces: dict[str, float]) -> None:
        self.graces = graces
        self.asked: list[str] = []

    def call(self, op: str, args: PoolName) -> Any:
        assert op == "pool.show"
        self.asked.append(args.name)
        if args.name not in self.graces:
            raise NotFoundError(f"no pool {args.name}")
        return type("Info", (), {"grace": self.graces[args.name]})()


def test_run_gives_a_gang_the_longest_grace_of_its_pools() -> None:
    client = GraceClient({"a": 5.0, "b": 30.0})
    assert lease_grace(client, gang()) == 30.0  # type: ignore[arg-type]
    assert client.asked == ["a", "b"]  # never "a,b"
    assert lease_grace(GraceClient({"a": 5.0}), reservation()) == 5.0  # type: ignore[arg-type]
    assert lease_grace(GraceClient({}), gang()) == 0.0  # type: ignore[arg-type]


# ------------------------------------------------------------- end to end


def make_pools(proc: Proc) -> None:
    resctl(proc, "pool", "create", "--name", "a", "--set", "gpu=0,1,2,3", "--max-per-tenant", "0")
    resctl(
        proc,
        "pool",
        "create",
        "--name",
        "b",
        "--set",
        "gpu=4,5,6,7",
        "--cpu",
        "8",
        "--memory",
        "16G",
        "--max-per-tenant",
        "0",
    )


def listed(proc: Proc) -> list[dict[str, Any]]:
    leases: list[dict[str, Any]] = json.loads(resctl(proc, "list", "--json").stdout)["reservations"]
    return leases


def allocated(client: Client) -> dict[str, dict[str, int]]:
    pools = client.call("pool.list", Empty()).pools
    return {p.name: {r.name: r.allocated for r in p.resources if r.allocated} for p in pools}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_gang_across_two_pools_end_to_end(resd_proc: Proc) -> None:
    make_pools(resd_proc)
    out = resctl(
        resd_proc,
        "reserve",
        "--part",
        "pool=a,gpu=2",
        "--part",
        "pool=b,cpu=4,memory=8G",
        "--ttl",
        "5m",
        "--label",
        "train",
    ).stdout.splitlines()
    rid = out[0].split()[0]
    assert "pool=a,b" in out[0] and "label=train" in out[0]
    assert out[1:] == [
        f"  {rid} pool=a gpu=2 assigned=gpu:0,1",
        f"  {rid}.1 pool=b cpu=4,memory=8GiB",
    ]

    with Client(resd_proc.socket) as client:
        lease = client.reserve_gang(
            [{"pool": "a", "gpu": 1}, {"pool": "b", "members": {"gpu": [6]}, "cpu": 1}],
            binding="detached",
        )
        assert lease.env["CUDA_VISIBLE_DEVICES"] == "2,6"
        leases = listed(resd_proc)
        assert sorted(r["id"] for r in leases) == sorted([rid, lease.id])  # one row each
        assert {r["pool"] for r in leases} == {"a,b"}
        assert all(len(r["parts"]) == 2 for r in leases)
        table = resctl(resd_proc, "list").stdout.splitlines()
        assert len(table) == 3 and all(row.split()[2] == "a,b" for row in table[1:])
        assert allocated(client) == {
            "a": {"gpu": 3},
            "b": {"cpu": 5000, "memory": 8 * GIB, "gpu": 1},
        }

        refused = resctl(
            resd_proc, "reserve", "--part", "pool=a,gpu=1", "--part", "pool=b,cpu=100", check=False
        )
        assert refused.returncode == 6 and "parts[1]: pool 'b'" in refused.stderr
        assert len(listed(resd_proc)) == 2  # nothing half-held

        released = resctl(resd_proc, "release", "--id", rid).stdout
        assert released.strip() == f"{rid} released"
        lease.release()
        assert listed(resd_proc) == [] and allocated(client) == {"a": {}, "b": {}}

        shown = json.loads(
            resctl(
                resd_proc, "reserve", "--json", "--part", "pool=a,gpu=1", "--part", "pool=b,cpu=1"
            ).stdout
        )
        assert shown["pool"] == "a,b" and shown["resources"] == {"gpu": 1, "cpu": 1000}
        assert [p["id"] for p in shown["parts"]] == [shown["id"], shown["id"] + ".1"]
        resctl(resd_proc, "release", "--id", shown["id"])

        ran = subprocess.run(
            [
                sys.executable,
                "-m",
                "resctl",
                "run",
                "--socket",
                resd_proc.socket,
                "--part",
                "pool=a,gpu=2",
                "--part",
                "pool=b,members.gpu=5+7,cpu=1",
                "--",
                "sh",
                "-c",
                "echo $CUDA_VISIBLE_DEVICES; echo $RESD_POOL",
            ],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split() == ["0,1,5,7", "a,b"]
        said = ran.stderr.splitlines()
        assert "pool=a,b" in said[0] and said[1].startswith("resctl:   r-")
        assert said[2].endswith("pool=b cpu=1,gpu=2 assigned=gpu:5,7")
        assert listed(resd_proc) == [] and allocated(client) == {"a": {}, "b": {}}
