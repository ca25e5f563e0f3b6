"""``resctl tenant add|list|show|set|remove`` (ops ``tenant.*``).

``tenant set --pool P --min NAME=QTY,... --max NAME=QTY,...`` sets the tenant's
quota in pool P (SPEC §3): quantities are parsed as ``reserve``'s flags parse them
(``parse_quantity``: cpu in cores, memory and vram as sizes, gpu and other set
resources as counts), so the daemon gets internal units. ``--clear-min`` /
``--clear-max`` clear a side. Every flag is checked here before connecting and
refused with ``InvalidError`` (exit 2).
"""

from __future__ import annotations

from typing import Annotated, Final

import typer

from resctl.options import (
    ForceOpt,
    JsonOpt,
    SocketOpt,
    TenantNameOpt,
    build,
    parse_gids,
    parse_uids,
    resource_order,
)
from resctl.render import tenant_detail, tenants_table
from resctl.session import Output, connect, guard
from resd_client.errors import InvalidError, ResdError
from resd_client.protocol import (
    Done,
    Empty,
    TenantAdd,
    TenantInfo,
    TenantList,
    TenantName,
    TenantRemove,
    TenantSet,
)
from resd_client.quantity import check_resource_name, parse_quantity, render_quantity

app = typer.Typer(no_args_is_help=True, help="Register, inspect, change and remove tenants.")

OwnerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--owner",
        metavar="USER",
        help="User (name or uid) allowed to act as this tenant (repeatable).",
    ),
]
GroupOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--group",
        metavar="GROUP",
        help="Group (name or gid) whose members may act as this tenant (repeatable).",
    ),
]
WeightOpt = Annotated[
    float | None, typer.Option("--weight", metavar="W", help="Fair-share weight (default 1).")
]
_PRIORITY_HELP = "Priority from 1 (lowest) to 10 (highest)."


@app.command("add")
def add(
    name: TenantNameOpt,
    priority: Annotated[int, typer.Option("--priority", metavar="1-10", help=_PRIORITY_HELP)] = 5,
    owner: OwnerOpt = None,
    group: GroupOpt = None,
    weight: WeightOpt = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Register a tenant."""
    out = Output(json_out)
    with guard(out):
        args = build(
            TenantAdd,
            {
                "name": name,
                "priority": priority,
                "owners": parse_uids(owner),
                "groups": parse_gids(group),
                "weight": weight,
            },
        )
        with connect(socket) as client:
            tenant: TenantInfo = client.call("tenant.add", args)
        out.emit(tenant)
        out.line(f"added tenant {tenant.name} (priority {tenant.priority})")


@app.command("list")
def list_(json_out: JsonOpt = False, socket: SocketOpt = None) -> None:
    """List tenants, highest priority first."""
    out = Output(json_out)
    with guard(out), connect(socket) as client:
        result: TenantList = client.call("tenant.list", Empty())
        tenants = sorted(result.tenants, key=lambda t: (-t.priority, t.name))
        out.emit(TenantList(tenants=tenants))
        if tenants:
            out.show(tenants_table(tenants, plain=out.plain))
        else:
            out.line("no tenants")


@app.command("show")
def show(name: TenantNameOpt, json_out: JsonOpt = False, socket: SocketOpt = None) -> None:
    """Show one tenant."""
    out = Output(json_out)
    with guard(out):
        args = build(TenantName, {"name": name})
        with connect(socket) as client:
            tenant: TenantInfo = client.call("tenant.show", args)
        out.emit(tenant)
        out.show(tenant_detail(tenant, plain=out.plain))


QUOTA_FORM: Final = "NAME=QTY[,NAME=QTY...]"
QUOTA_EXAMPLE: Final = "cpu=8,gpu=2"
_QTY_HELP: Final = (
    "cpu in cores (8, 0.5) or millicores (500m); memory, vram, disk as sizes (64G, 512M);"
    " gpu and other resources as counts (2)"
)


def parse_quota_side(items: list[str] | None, flag: str) -> dict[str, int] | None:
    """``--min``/``--max`` values (``cpu=8,gpu=2``, repeatable) as internal-unit
    amounts, or None when the flag was not given.

    Quantities are parsed as ``reserve``'s flags parse them; zero is allowed (a max of
    0 forbids a resource). Raises InvalidError naming the flag for an empty value, a
    pair not of the form NAME=QTY, a bad resource name, a resource given twice, or a
    quantity that is negative or in an unknown unit (the message lists what is
    accepted).
    """
    if items is None:
        return None
    clear = f"--clear-{flag.removeprefix('--')}"
    out: dict[str, int] = {}
    for item in items:
        if not item.strip():
            raise InvalidError(
                f"{flag}: empty; give {QUOTA_FORM} (e.g. {QUOTA_EXAMPLE}), or {clear} to clear it",
                {"field": flag.lstrip("-"), "value": item},
            )
        for part in item.split(","):
            name, sep, value = (x.strip() for x in part.partition("="))
            if not sep or not name or not value:
                raise InvalidError(
                    f"{flag}: {part.strip()!r} is not of the form {QUOTA_FORM}"
                    f" (e.g. {QUOTA_EXAMPLE}); quantities: {_QTY_HELP}",
                    {"field": flag.lstrip("-"), "value": item},
                )
            try:
                check_resource_name(name)
                if name in out:
                    raise InvalidError(f"resource {name} is given twice", {"resource": name})
                out[name] = parse_quantity(name, value, allow_zero=True)
            except ResdError as exc:
                raise InvalidError(
                    f"{flag} {exc.message}",
                    {**exc.details, "field": flag.lstrip("-"), "value": item},
                ) from None
    return out


def quota_fields(
    *,
    pool: str | None,
    min_: list[str] | None,
    max_: list[str] | None,
    clear_min: bool,
    clear_max: bool,
) -> dict[str, object]:
    """The ``TenantSet`` quota fields (``pool``, ``min``, ``max``) of ``tenant set``'s
    flags; ``{}`` for a cleared side. Raises InvalidError for a bad ``--min``/``--max``
    (``parse_quota_side``), a side both given and cleared, a quota flag without
    ``--pool`` or ``--pool`` without one, and a min above the max given with it."""
    low = parse_quota_side(min_, "--min")
    high = parse_quota_side(max_, "--max")
    for flag, given, cleared in (("min", low, clear_min), ("max", high, clear_max)):
        if given is not None and cleared:
            raise InvalidError(
                f"give --{flag} or --clear-{flag}, not both", {"field": f"clear-{flag}"}
            )
    if clear_min:
        low = {}
    if clear_max:
        high = {}
    if pool is None:
        if low is not None or high is not None:
            raise InvalidError(
                "--min, --max, --clear-min and --clear-max set the quota in one pool:"
                " give --pool POOL too",
                {"field": "pool"},
            )
        return {}
    if low is None and high is None:
        raise InvalidError(
            f"--pool {pool}: give --min, --max, --clear-min or --clear-max to set the"
            " tenant's quota there",
            {"field": "pool"},
        )
    if low and high:
        for name in sorted(set(low) & set(high), key=resource_order):
            if low[name] > high[name]:
                raise InvalidError(
                    f"--min {name}={render_quantity(name, low[name])} is above"
                    f" --max {name}={render_quantity(name, high[name])}",
                    {"field": "min", "resource": name, "min": low[name], "max": high[name]},
                )
    return {"pool": pool, "min": low, "max": high}


@app.command("set")
def set_(
    name: TenantNameOpt,
    priority: Annotated[
        int | None, typer.Option("--priority", metavar="1-10", help=_PRIORITY_HELP)
    ] = None,
    owner: Annotated[
        list[str] | None,
        typer.Option(
            "--owner", metavar="USER", help="Replace the owners with these users (repeatable)."
        ),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(
            "--group", metavar="GROUP", help="Replace the groups with these (repeatable)."
        ),
    ] = None,
    weight: WeightOpt = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            metavar="POOL",
            help="The pool whose quota --min/--max/--clear-min/--clear-max set.",
        ),
    ] = None,
    min_: Annotated[
        list[str] | None,
        typer.Option(
            "--min",
            metavar=QUOTA_FORM,
            help=f"Guaranteed amounts in --pool, e.g. {QUOTA_EXAMPLE}: {_QTY_HELP}."
            " Replaces the whole min side (repeatable; 0 allowed). Above its min a"
            " tenant is borrowing, and may have it reclaimed by tenants within theirs.",
        ),
    ] = None,
    max_: Annotated[
        list[str] | None,
        typer.Option(
            "--max",
            metavar=QUOTA_FORM,
            help="Caps in --pool, e.g. gpu=6, in the same units as --min; a request past"
            " one is refused (quota_exceeded, exit 7) or waits. Replaces the whole max side"
            " (repeatable; 0 allowed).",
        ),
    ] = None,
    clear_min: Annotated[
        bool, typer.Option("--clear-min", help="Remove the tenant's min in --pool.")
    ] = False,
    clear_max: Annotated[
        bool, typer.Option("--clear-max", help="Remove the tenant's max in --pool.")
    ] = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Change a tenant; only the given fields change.

    A quota is set per pool: --pool P with --min and/or --max (each replaces that
    side; a side not given stays). Clear a side with --clear-min / --clear-max;
    clearing both removes the quota.
    """
    out = Output(json_out)
    with guard(out):
        fields = {
            "name": name,
            "priority": priority,
            "owners": parse_uids(owner),
            "groups": parse_gids(group),
            "weight": weight,
            **quota_fields(
                pool=pool, min_=min_, max_=max_, clear_min=clear_min, clear_max=clear_max
            ),
        }
        if all(v is None for k, v in fields.items() if k != "name"):
            raise InvalidError(
                "nothing to change: give --priority, --owner, --group, --weight,"
                " or --pool with --min/--max/--clear-min/--clear-max",
                {"field": "tenant.set"},
            )
        args = build(TenantSet, fields)
        with connect(socket) as client:
            tenant: TenantInfo = client.call("tenant.set", args)
        out.emit(tenant)
        out.line(f"updated tenant {tenant.name}")
        out.show(tenant_detail(tenant, plain=out.plain))


@app.command("remove")
def remove(
    name: TenantNameOpt,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Remove a tenant; with --force also release its active reservations."""
    out = Output(json_out)
    with guard(out):
        args = build(TenantRemove, {"name": name, "force": force})
        with connect(socket) as client:
            done: Done = client.call("tenant.remove", args)
        out.emit(done)
        released = f" (released {done.removed} reservation(s))" if done.removed else ""
        out.line(f"removed tenant {name}{released}")
