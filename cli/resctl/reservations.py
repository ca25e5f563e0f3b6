"""Reservation commands: ``reserve``, ``unreserve``/``release``, ``renew``, ``resize``,
``preempt``, ``list`` and ``resources``."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from resctl.options import (
    ContiguousOpt,
    CpuOpt,
    DeadlineOpt,
    GpuModelOpt,
    GpuOpt,
    JsonOpt,
    MemberOpt,
    MemoryOpt,
    NumaOpt,
    PartOpt,
    PidOpt,
    PlacementOpt,
    ReservationIdArg,
    ReservationIdOpt,
    ReservePoolOpt,
    ResOpt,
    SelectorOpt,
    SocketOpt,
    VramOpt,
    WaitOpt,
    WaitTimeoutOpt,
    build,
    parse_deadline,
    parse_duration,
    parse_resources,
    reservation_id_of,
    reserve_fields_of,
    split_pair,
)
from resctl.render import (
    host_resources_view,
    pending_table,
    reservation_line,
    reservation_lines,
    reservations_table,
    waiting_line,
)
from resctl.session import Output, connect, guard
from resd_client.errors import InvalidError
from resd_client.protocol import (
    HostResources,
    ListReservations,
    Preempt,
    Preempted,
    Renew,
    ReservationInfo,
    ReservationList,
    ReservationRef,
    Reserve,
    Resize,
    ResourcesOf,
)
from resd_client.quantity import check_resource_name

TenantOpt = Annotated[
    str | None,
    typer.Option("--tenant", metavar="TENANT", help="Act as this tenant (default: your user's)."),
]
PoolFilterOpt = Annotated[
    str | None, typer.Option("--pool", metavar="POOL", help="Only this pool.")
]
TtlOpt = Annotated[
    str | None,
    typer.Option("--ttl", metavar="SECONDS", help="Expire after this long (300, 5m, 2h)."),
]


LabelOpt = Annotated[
    str, typer.Option("--label", metavar="TEXT", help="Free-form note shown in lists.")
]
ReclaimableOpt = Annotated[
    bool,
    typer.Option("--reclaimable", help="May be taken back first when capacity is needed."),
]


def _ttl(value: str | None) -> float | None:
    return None if value is None else parse_duration(value, "ttl")


def reserve(
    ctx: typer.Context,
    tenant: TenantOpt = None,
    pool: ReservePoolOpt = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    vram: VramOpt = None,
    res: ResOpt = None,
    member: MemberOpt = None,
    contiguous: ContiguousOpt = None,
    gpu_model: GpuModelOpt = None,
    numa: NumaOpt = None,
    selector: SelectorOpt = None,
    placement: PlacementOpt = None,
    part: PartOpt = None,
    ttl: TtlOpt = None,
    label: LabelOpt = "",
    reclaimable: ReclaimableOpt = False,
    wait: WaitOpt = False,
    timeout: WaitTimeoutOpt = None,
    deadline: DeadlineOpt = None,
    pid: PidOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Reserve resources until released, expired or preempted; prints the id first.

    With --wait it queues when it does not fit and returns once granted. With --part
    (twice or more) it reserves a gang: every part or none, as one lease (one id
    releases it all), printed with one indented line per part."""
    out = Output(json_out)
    with guard(out):
        args = build(
            Reserve,
            {
                **reserve_fields_of(ctx.params),
                "tenant": tenant,
                "ttl": _ttl(ttl),
                "binding": "detached" if pid is None else "pid",
                "pid": pid,
                "label": label,
                "reclaimable": reclaimable,
                **wait_fields(wait, timeout, deadline),
            },
        )
        with connect(socket) as client:
            info = client.request(args, on_pending=lambda w: out.warn(waiting_line(w))).info
        out.emit(info)
        for line in reservation_lines(info, time.time()):
            out.line(line)


def wait_fields(wait: bool, timeout: str | None, deadline: str | None) -> dict[str, Any]:
    """The ``Reserve`` fields of ``--wait``/``--no-wait``, ``--timeout``, ``--deadline``."""
    if timeout is not None and not wait:
        raise InvalidError("--timeout: only a waiting request has one", {"field": "timeout"})
    return {
        "wait": wait,
        "timeout": None if timeout is None else parse_duration(timeout, "timeout"),
        "deadline": None if deadline is None else parse_deadline(deadline, time.time()),
    }


def unreserve(
    id_arg: ReservationIdArg = None,
    reservation_id: ReservationIdOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Release a reservation now."""
    out = Output(json_out)
    with guard(out):
        args = build(ReservationRef, {"id": reservation_id_of(id_arg, reservation_id)})
        with connect(socket) as client:
            info: ReservationInfo = client.call("release", args)
        out.emit(info)
        out.line(f"{info.id} released")


def release(
    id_arg: ReservationIdArg = None,
    reservation_id: ReservationIdOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Release a reservation now (alias of unreserve)."""
    unreserve(id_arg, reservation_id, json_out, socket)


def renew(
    id_arg: ReservationIdArg = None,
    reservation_id: ReservationIdOpt = None,
    ttl: Annotated[
        str | None,
        typer.Option(
            "--ttl", metavar="SECONDS", help="New time to live from now (default: its own ttl)."
        ),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Extend a reservation's expiry to now + ttl."""
    out = Output(json_out)
    with guard(out):
        args = build(Renew, {"id": reservation_id_of(id_arg, reservation_id), "ttl": _ttl(ttl)})
        with connect(socket) as client:
            info: ReservationInfo = client.call("renew", args)
        out.emit(info)
        for line in reservation_lines(info, time.time()):
            out.line(line)


GiveBackOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--give-back",
        metavar="NAME=M1,M2",
        help="When a set or range resource shrinks, give back exactly these members"
        " (gpu=3) or values (ports=30005-30009) instead of the last ones (repeatable).",
    ),
]
#: the flag that gives each well-known resource's amount (others: ``--res NAME=QTY``)
_AMOUNT_FLAGS = ("cpu", "memory", "gpu", "vram")


def _amount_flag(name: str) -> str:
    return f"--{name} N" if name in _AMOUNT_FLAGS else f"--res {name}=N"


def resize_amounts(
    cpu: str | None, memory: str | None, gpu: str | None, vram: str | None, res: list[str] | None
) -> dict[str, int]:
    """The new amounts of ``resctl resize`` (internal units; 0 allowed). Raises
    InvalidError when none is given, for a negative or bad quantity, a resource given
    twice, or both --gpu and --vram."""
    given: list[tuple[str, str | None]] = [
        (f"--{n}", v) for n, v in zip(_AMOUNT_FLAGS, (cpu, memory, gpu, vram), strict=True)
    ]
    given += [
        (f"--res {name}", qty)
        for name, qty in (split_pair(i, "--res", "NAME=QTY", "ports=8") for i in res or [])
    ]
    for flag, value in given:
        if value is not None and value.strip().startswith("-"):
            raise InvalidError(
                f"{flag}: {value!r} is negative; give the new amount (0 gives it all back)",
                {"field": flag.split()[-1].lstrip("-"), "value": value},
            )
    amounts = parse_resources(cpu=cpu, memory=memory, gpu=gpu, vram=vram, res=res, allow_zero=True)
    if not amounts:
        raise InvalidError(
            "say what to resize: --cpu, --memory, --gpu, --vram or --res NAME=QTY, each"
            " with the new amount (0 gives that resource all back)",
            {"field": "resources"},
        )
    if "gpu" in amounts and "vram" in amounts:
        raise InvalidError(
            "give --gpu or --vram, not both: whole GPUs resize by --gpu, a VRAM slice by --vram",
            {"field": "resources"},
        )
    return amounts


def parse_give_back(items: list[str] | None, amounts: dict[str, int]) -> dict[str, list[str]]:
    """``--give-back NAME=M1,M2`` flags as ``{name: [M1, M2]}`` (a name given again
    adds to its list). Raises InvalidError for a malformed pair or name, an empty or
    repeated member, or a resource whose new amount is not given."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, value = split_pair(item, "--give-back", "NAME=M1,M2", "gpu=3")
        check_resource_name(name)
        values = [v.strip() for v in value.split(",")]
        if any(not v for v in values):
            raise InvalidError(
                f"--give-back {name}: {value!r} has an empty member; separate members or"
                " values with commas (gpu=2,3 or ports=30005-30009)",
                {"field": "give_back", "resource": name},
            )
        out.setdefault(name, []).extend(values)
    for name, values in out.items():
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise InvalidError(
                f"--give-back {name}: {', '.join(twice)} named more than once",
                {"field": "give_back", "resource": name},
            )
        if name not in amounts and not (name == "gpu" and "vram" in amounts):
            raise InvalidError(
                f"--give-back {name}: give {name}'s new amount too ({_amount_flag(name)})",
                {"field": "give_back", "resource": name},
            )
    return out


def resize_request(
    reservation_id: str,
    *,
    cpu: str | None = None,
    memory: str | None = None,
    gpu: str | None = None,
    vram: str | None = None,
    res: list[str] | None = None,
    give_back: list[str] | None = None,
    wait: bool = False,
    timeout: str | None = None,
) -> Resize:
    """The checked ``Resize`` of ``resctl resize``'s flags; raises InvalidError."""
    amounts = resize_amounts(cpu, memory, gpu, vram, res)
    returned = parse_give_back(give_back, amounts)
    fields = wait_fields(wait, timeout, None)
    return build(
        Resize,
        {
            "id": reservation_id,
            "resources": amounts,
            "give_back": returned or None,
            "wait": wait,
            "timeout": fields["timeout"],
        },
    )


def resize(
    id_arg: ReservationIdArg = None,
    reservation_id: ReservationIdOpt = None,
    cpu: CpuOpt = None,
    memory: MemoryOpt = None,
    gpu: GpuOpt = None,
    vram: VramOpt = None,
    res: ResOpt = None,
    give_back: GiveBackOpt = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="When growing does not fit now, wait for room, keeping what the lease"
            " holds (Ctrl-C cancels the wait).",
        ),
    ] = False,
    timeout: WaitTimeoutOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Change a lease's amounts in place; prints it with its new amounts.

    Each flag gives a resource's new amount (0 gives it all back); the others stay,
    and so do the TTL and binding. Shrinking always succeeds: the last GPUs or
    values go, or those --give-back names. Growing that does not fit fails (exit 6,
    or 7 past a quota's max) unless --wait."""
    out = Output(json_out)
    with guard(out):
        rid = reservation_id_of(id_arg, reservation_id)
        args = resize_request(
            rid,
            cpu=cpu,
            memory=memory,
            gpu=gpu,
            vram=vram,
            res=res,
            give_back=give_back,
            wait=wait,
            timeout=timeout,
        )
        with connect(socket) as client:
            info = client.request_resize(
                args,
                on_pending=lambda w: out.warn(f"{rid} cannot grow yet; {waiting_line(w)}"),
            )
        out.emit(info)
        out.line(reservation_line(info, time.time()))


def preempt(
    target: Annotated[
        str, typer.Option("--target", metavar="TENANT", help="Tenant whose reservations to evict.")
    ],
    tenant: Annotated[
        str | None,
        typer.Option(
            "--tenant",
            metavar="TENANT",
            help="Preempt as this tenant; needs a strictly higher priority (default: your user's).",
        ),
    ] = None,
    pool: PoolFilterOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Evict all active reservations of a lower-priority tenant (or those in --pool)."""
    out = Output(json_out)
    with guard(out):
        args = build(Preempt, {"target": target, "tenant": tenant, "pool": pool})
        with connect(socket) as client:
            result: Preempted = client.call("preempt", args)
        out.emit(result)
        count = len(result.reservations)
        out.line(f"preempted {count} reservation(s) of {target}")
        if count:
            out.show(reservations_table(result.reservations, time.time(), plain=out.plain))


def list_(
    pool: PoolFilterOpt = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", metavar="TENANT", help="Only this tenant.")
    ] = None,
    pending: Annotated[
        bool,
        typer.Option("--pending", help="List queued requests instead, in queue order."),
    ] = False,
    idle: Annotated[
        bool,
        typer.Option(
            "--idle", help="Only leases marked idle (their GPUs unused for the pool's idle_after)."
        ),
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """List active reservations (or, with --pending, the requests waiting for room).

    A MARKS column shows OVERUSE and IDLE marks when any lease has one; --json has
    each lease's marks, enforcement level and registered processes."""
    out = Output(json_out)
    with guard(out):
        args = build(
            ListReservations, {"pool": pool, "tenant": tenant, "pending": pending, "idle": idle}
        )
        with connect(socket) as client:
            result: ReservationList = client.call("list", args)
        out.emit(result)
        table = pending_table if pending else reservations_table
        if result.reservations:
            out.show(table(result.reservations, time.time(), plain=out.plain))
        else:
            kind = "idle" if idle else "active"
            out.line("no waiting requests" if pending else f"no {kind} reservations")


ResourcesPoolOpt = Annotated[
    str | None,
    typer.Option("--pool", metavar="POOL", help="The pool to show (default: host)."),
]


def resources(
    pool: ResourcesPoolOpt = None, json_out: JsonOpt = False, socket: SocketOpt = None
) -> None:
    """hypeman's GET /resources for one pool: per resource capacity, effective limit,
    allocated and available, then its GPUs and allocations."""
    out = Output(json_out)
    with guard(out):
        args = build(ResourcesOf, {"pool": pool})
        with connect(socket) as client:
            view: HostResources = client.call("resources", args)
        out.emit(view)
        out.show(host_resources_view(view, plain=out.plain))
