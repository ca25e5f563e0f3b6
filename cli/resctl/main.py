"""The ``resctl`` application: the command table, ``status`` and ``version``.

Each command lives in the module named for what it manages (``pools``,
``tenants``, ``reservations``, ``export``, ``watch``, ``top``); this module only mounts
them, so the whole command surface can be read here. Command lines of resgate
work unchanged with ``resctl`` in its place.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from resctl import export, metrics, pools, reservations, run, tenants, top, waiting, watch
from resctl.options import JsonOpt, SocketOpt
from resctl.render import status_view
from resctl.session import Output, connect, guard, set_default_socket
from resd_client import __version__ as CLIENT_VERSION
from resd_client.errors import ResdError
from resd_client.protocol import Empty, Status

app = typer.Typer(
    name="resctl",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    help="Reserve CPU, memory, GPUs and named resources from the resd daemon.",
    epilog="Exit codes: 0 ok, 2 invalid, 3 not_found, 4 exists, 5 conflict, 6 insufficient, "
    "7 quota_exceeded, 8 forbidden, 9 timeout, 10 preempted, 11 unsupported_version, "
    "12 unavailable, 13 internal.",
)


@app.callback()
def _root(
    ctx: typer.Context,
    socket: Annotated[
        str | None,
        typer.Option(
            "--socket",
            metavar="PATH",
            help="Daemon socket for the command that follows (as `docker -H`); the"
            " command's own --socket wins. Default: $RESD_SOCKET, then the user socket,"
            " then /run/resd/resd.sock.",
        ),
    ] = None,
) -> None:
    """Reserve CPU, memory, GPUs and named resources from the resd daemon."""
    set_default_socket(ctx, socket)


app.add_typer(pools.app, name="pool")
app.add_typer(tenants.app, name="tenant")
app.command("reserve")(reservations.reserve)
app.command("unreserve")(reservations.unreserve)
app.command("release")(reservations.release)
app.command("renew")(reservations.renew)
app.command("resize")(reservations.resize)
app.command("preempt")(reservations.preempt)
app.command("list")(reservations.list_)
app.command("resources")(reservations.resources)
app.command("why")(waiting.why)
app.command("plan")(waiting.plan)
app.command("export")(export.export)
app.command("watch")(watch.watch)
app.command("top")(top.top)
app.command(
    "run",
    cls=run.RunCommand,
    context_settings={"allow_interspersed_args": False},
)(run.run)
app.command("metrics")(metrics.metrics)


@app.command("status")
def status(json_out: JsonOpt = False, socket: SocketOpt = None) -> None:
    """Daemon version, uptime, counts, utilization of every pool, and each sampled
    GPU's live use (used/total, foreign) with the pool's over-use and idle marks."""
    out = Output(json_out)
    with guard(out), connect(socket) as client:
        result: Status = client.call("status", Empty())
        out.emit(result)
        out.show(
            status_view(
                server_version=result.server_version,
                boot_id=result.boot_id,
                started_at=result.started_at,
                pools=result.pools,
                tenants=result.tenants,
                active=result.active,
                connections=result.connections,
                now=time.time(),
                plain=out.plain,
            )
        )


@app.command("version")
def version(json_out: JsonOpt = False, socket: SocketOpt = None) -> None:
    """Versions of resctl and of the daemon, and whether they match."""
    out = Output(json_out)
    daemon: str | None = None
    problem: ResdError | None = None
    try:
        with connect(socket) as client:
            daemon = client.hello.server_version
    except ResdError as exc:
        problem = exc
    out.emit(
        {
            "client": CLIENT_VERSION,
            "daemon": daemon,
            "match": daemon == CLIENT_VERSION,
            "error": None if problem is None else problem.to_wire(),
        }
    )
    out.line(f"resctl {CLIENT_VERSION}")
    if problem is not None:
        out.line(f"resd   not reachable ({problem.code}: {problem.message})")
    else:
        out.line(f"resd   {daemon}")
        if daemon != CLIENT_VERSION:
            out.line(f"note: resctl {CLIENT_VERSION} and resd {daemon} are different versions")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="resctl")


if __name__ == "__main__":
    main()
