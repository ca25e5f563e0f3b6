"""``resctl tenant add|list|show|set|remove`` (ops ``tenant.*``)."""

from __future__ import annotations

from typing import Annotated

import typer

from resctl.options import (
    ForceOpt,
    JsonOpt,
    SocketOpt,
    TenantNameOpt,
    build,
    parse_gids,
    parse_uids,
)
from resctl.render import tenant_detail, tenants_table
from resctl.session import Output, connect, guard
from resd_client.errors import InvalidError
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
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Change a tenant; only the given fields change."""
    out = Output(json_out)
    with guard(out):
        fields = {
            "name": name,
            "priority": priority,
            "owners": parse_uids(owner),
            "groups": parse_gids(group),
            "weight": weight,
        }
        if all(v is None for k, v in fields.items() if k != "name"):
            raise InvalidError(
                "nothing to change: give --priority, --owner, --group or --weight",
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
