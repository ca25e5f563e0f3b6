"""``resctl pool create|list|show|set|delete`` (ops ``pool.*``)."""

from __future__ import annotations

import typing
from typing import Annotated

import typer

from resctl.options import (
    CpuOpt,
    ForceOpt,
    GpuOpt,
    JsonOpt,
    MemoryOpt,
    PoolNameOpt,
    ResOpt,
    SocketOpt,
    build,
    parse_duration,
    parse_labels,
    parse_ratios,
    parse_resources,
    require_choice,
    split_pair,
)
from resctl.render import capacity_summary, pool_detail, pools_table, utilization_table
from resctl.session import Output, connect, guard
from resd_client.errors import InvalidError
from resd_client.protocol import (
    MAX_IDLE_AFTER,
    Done,
    Empty,
    OverusePolicy,
    Placement,
    PoolCreate,
    PoolDelete,
    PoolInfo,
    PoolList,
    PoolName,
    PoolSet,
    Preemption,
)

app = typer.Typer(no_args_is_help=True, help="Create, inspect, change and delete pools.")

OversubOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--oversub",
        metavar="NAME=RATIO",
        help="Oversubscription ratio of a resource: effective = capacity × ratio (repeatable).",
    ),
]
PreemptionOpt = Annotated[
    str | None,
    typer.Option("--preemption", metavar="off|lower_priority", help="Automatic preemption policy."),
]
PlacementOpt = Annotated[
    str | None,
    typer.Option(
        "--placement", metavar="binpack|spread|least_used", help="How members are chosen."
    ),
]
GraceOpt = Annotated[
    str | None,
    typer.Option(
        "--grace",
        metavar="SECONDS",
        help="Seconds a preempted holder keeps its resources (300, 5m).",
    ),
]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option("--label", metavar="K=V", help="Pool label (repeatable)."),
]
OveruseOpt = Annotated[
    str | None,
    typer.Option(
        "--overuse",
        metavar="warn|terminate",
        help="What resd does with a lease whose processes use more GPU memory than it"
        " reserved (or a GPU not assigned to it): mark it, or also end its processes"
        " after the grace (default: warn).",
    ),
]
IdleAfterOpt = Annotated[
    str | None,
    typer.Option(
        "--idle-after",
        metavar="DURATION",
        help="Mark a GPU lease idle after its GPUs and processes were idle this long"
        " (30m, 2h, at most 30d); 0 or off: never (the default).",
    ),
]
AdoptForeignOpt = Annotated[
    bool | None,
    typer.Option(
        "--adopt-foreign/--no-adopt-foreign",
        help="Record GPU memory held by processes of no lease as a reservation of the"
        " unmanaged tenant (default: only show it and keep it out of new grants).",
    ),
]
MaxPerTenantOpt = Annotated[
    int | None,
    typer.Option(
        "--max-per-tenant",
        metavar="N",
        help="Active reservations one tenant may hold here; 0 = unlimited.",
    ),
]


def _grace(value: str | None) -> float | None:
    return None if value is None else parse_duration(value, "grace")


def parse_idle_after(value: str | None) -> float | None:
    """``--idle-after``: seconds, 0 for ``0``/``off``, None when not given. Raises
    InvalidError for what is not a duration or lies outside 0 to 30 days."""
    if value is None:
        return None
    if value.strip().lower() == "off":
        return 0.0
    seconds = parse_duration(value, "--idle-after")
    if not 0 <= seconds <= MAX_IDLE_AFTER:
        raise InvalidError(
            f"--idle-after: {value!r} is out of range; use off (or 0) or a duration"
            f" up to {MAX_IDLE_AFTER / 86400:g}d",
            {"field": "idle_after", "value": value},
        )
    return seconds


def choice(value: str | None, flag: str, allowed: object) -> str | None:
    """``value`` if it is one of the ``Literal`` type ``allowed``'s values (None: not
    given); raises InvalidError listing them."""
    return None if value is None else require_choice(value, flag, typing.get_args(allowed))


def gpu_policy(
    overuse: str | None, idle_after: str | None, adopt_foreign: bool | None
) -> dict[str, object]:
    """The ``PoolCreate``/``PoolSet`` fields of the GPU policy flags (SPEC §10); None
    for a flag not given. Raises InvalidError for a bad ``--overuse`` or ``--idle-after``."""
    return {
        "overuse": choice(overuse, "--overuse", OverusePolicy),
        "idle_after": parse_idle_after(idle_after),
        "adopt_foreign": adopt_foreign,
    }


def parse_kinds(ranges: list[str] | None, sets: list[str] | None) -> dict[str, dict[str, object]]:
    """``--range ports=30000-30999`` and ``--set disks=a,b`` as pool resource specs."""
    out: dict[str, dict[str, object]] = {}
    for item in ranges or []:
        name, span = split_pair(item, "--range", "NAME=LO-HI", "ports=30000-30999")
        lo, sep, hi = span.partition("-")
        if not (sep and lo.strip().isdigit() and hi.strip().isdigit()):
            raise InvalidError(
                f"--range {item!r}: use NAME=LO-HI, e.g. ports=30000-30999", {"field": "range"}
            )
        out[name] = {"kind": "range", "lo": int(lo), "hi": int(hi)}
    for item in sets or []:
        name, members = split_pair(item, "--set", "NAME=M1,M2", "disks=nvme0,nvme1")
        names = [m.strip() for m in members.split(",") if m.strip()]
        out[name] = {"kind": "set", "members": [{"name": m} for m in names]}
    return out


@app.command("create")
def create(
    name: PoolNameOpt,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    res: ResOpt = None,
    oversub: OversubOpt = None,
    max_per_tenant: Annotated[
        int,
        typer.Option(
            "--max-per-tenant",
            metavar="N",
            help="Active reservations one tenant may hold here; 0 = unlimited.",
        ),
    ] = 1,
    preemption: Annotated[
        str,
        typer.Option(
            "--preemption", metavar="off|lower_priority", help="Automatic preemption policy."
        ),
    ] = "off",
    placement: Annotated[
        str,
        typer.Option(
            "--placement", metavar="binpack|spread|least_used", help="How members are chosen."
        ),
    ] = "binpack",
    grace: GraceOpt = None,
    overuse: OveruseOpt = None,
    idle_after: IdleAfterOpt = None,
    adopt_foreign: AdoptForeignOpt = None,
    label: LabelOpt = None,
    range_: Annotated[
        list[str] | None,
        typer.Option(
            "--range",
            metavar="NAME=LO-HI",
            help="A range resource of integers, e.g. ports=30000-30999 (repeatable).",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="NAME=M1,M2",
            help="A set resource of named members, e.g. disks=nvme0,nvme1 (repeatable).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Create a pool with the given capacities and policies."""
    out = Output(json_out)
    with guard(out):
        capacity = parse_resources(cpu=cpu, memory=memory, gpu=gpu, res=res, allow_zero=True)
        kinds = parse_kinds(range_, set_)
        clash = sorted(set(kinds) & set(capacity))
        if clash:
            raise InvalidError(f"{', '.join(clash)}: given twice", {"field": "resources"})
        ratios = parse_ratios(oversub)
        unknown = sorted(set(ratios) - set(capacity))
        if unknown:
            raise InvalidError(
                f"--oversub {', '.join(unknown)}: the pool has no such resource; give its capacity too",
                {"field": "oversub", "unknown": unknown},
            )
        args = build(
            PoolCreate,
            {
                "name": name,
                "resources": {
                    **{
                        k: {"capacity": v, "ratio": ratios.get(k, 1.0)} for k, v in capacity.items()
                    },
                    **kinds,
                },
                "max_per_tenant": max_per_tenant,
                "preemption": preemption,
                "placement": placement,
                "grace": _grace(grace),
                "labels": parse_labels(label),
                **gpu_policy(overuse, idle_after, adopt_foreign),
            },
        )
        with connect(socket) as client:
            pool: PoolInfo = client.call("pool.create", args)
        out.emit(pool)
        out.line(f"created pool {pool.name}: {capacity_summary(pool)}")


@app.command("list")
def list_(json_out: JsonOpt = False, socket: SocketOpt = None) -> None:
    """List all pools with their policies and utilization."""
    out = Output(json_out)
    with guard(out), connect(socket) as client:
        result: PoolList = client.call("pool.list", Empty())
        out.emit(result)
        if not result.pools:
            out.line("no pools")
            return
        out.show(pools_table(result.pools, plain=out.plain))
        out.line("")
        out.show(utilization_table(result.pools, plain=out.plain))


@app.command("show")
def show(name: PoolNameOpt, json_out: JsonOpt = False, socket: SocketOpt = None) -> None:
    """Show one pool: policies, and per resource capacity, ratio and usage."""
    out = Output(json_out)
    with guard(out):
        args = build(PoolName, {"name": name})
        with connect(socket) as client:
            pool: PoolInfo = client.call("pool.show", args)
        out.emit(pool)
        out.show(pool_detail(pool, plain=out.plain))


@app.command("set")
def set_(
    name: PoolNameOpt,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    res: ResOpt = None,
    oversub: OversubOpt = None,
    remove_res: Annotated[
        list[str] | None,
        typer.Option("--remove-res", metavar="NAME", help="Drop a resource (repeatable)."),
    ] = None,
    max_per_tenant: MaxPerTenantOpt = None,
    preemption: PreemptionOpt = None,
    placement: PlacementOpt = None,
    grace: GraceOpt = None,
    overuse: OveruseOpt = None,
    idle_after: IdleAfterOpt = None,
    adopt_foreign: AdoptForeignOpt = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", metavar="K=V", help="Replace the pool's labels with these (repeatable)."
        ),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Change a pool; only the given fields change (resource flags set capacities)."""
    out = Output(json_out)
    with guard(out):
        fields = {
            "name": name,
            "capacity": parse_resources(cpu=cpu, memory=memory, gpu=gpu, res=res, allow_zero=True),
            "ratios": parse_ratios(oversub),
            "remove": remove_res or [],
            "max_per_tenant": max_per_tenant,
            "preemption": choice(preemption, "--preemption", Preemption),
            "placement": choice(placement, "--placement", Placement),
            "grace": _grace(grace),
            "labels": parse_labels(label),
            **gpu_policy(overuse, idle_after, adopt_foreign),
        }
        if all(v in (None, {}, []) for k, v in fields.items() if k != "name"):
            raise InvalidError(
                "nothing to change: give a resource, --oversub, --remove-res or a policy flag",
                {"field": "pool.set"},
            )
        args = build(PoolSet, fields)
        with connect(socket) as client:
            pool: PoolInfo = client.call("pool.set", args)
        out.emit(pool)
        out.line(f"updated pool {pool.name}")
        out.show(pool_detail(pool, plain=out.plain))


@app.command("delete")
def delete(
    name: PoolNameOpt, force: ForceOpt = False, json_out: JsonOpt = False, socket: SocketOpt = None
) -> None:
    """Delete a pool; with --force also release its active reservations."""
    out = Output(json_out)
    with guard(out):
        args = build(PoolDelete, {"name": name, "force": force})
        with connect(socket) as client:
            done: Done = client.call("pool.delete", args)
        out.emit(done)
        released = f" (released {done.removed} reservation(s))" if done.removed else ""
        out.line(f"deleted pool {name}{released}")
