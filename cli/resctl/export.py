"""``resctl export``: reservation history as JSON or CSV (op ``export``), or the
pools as Slurm or Kueue configuration for the move to a cluster (``resctl.scaleout``).

``history_json`` and ``history_csv`` are pure; the command validates every flag
before connecting (a flag of another format is refused), fetches what the format
needs, then writes stdout or ``--output``.
"""

from __future__ import annotations

import csv
import io
import json
import socket as socketlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Final

import typer

from resctl.options import (
    JsonOpt,
    SocketOpt,
    build,
    parse_since,
    require_choice,
    resource_order,
)
from resctl.scaleout import check_node_name, kueue_manifests, slurm_config
from resctl.session import Output, connect, guard
from resd_client import Client
from resd_client.errors import InvalidError
from resd_client.protocol import (
    Empty,
    Export,
    History,
    HistoryEvent,
    HostResources,
    PoolInfo,
    PoolList,
    PoolName,
    ResourcesOf,
    TenantList,
    to_wire,
)

HISTORY_FORMATS: Final = ("json", "csv")
FORMATS: Final = (*HISTORY_FORMATS, "slurm", "kueue")
#: flag → the formats it applies to; given with another it is refused (exit 2)
FLAG_FORMATS: Final = {
    "--since": HISTORY_FORMATS,
    "--tenant": HISTORY_FORMATS,
    "--pool": ("slurm", "kueue"),
    "--node-name": ("slurm",),
}
#: CSV columns: the fields of ``HistoryEvent``, in order.
CSV_FIELDS: Final = HistoryEvent.__struct_fields__
EXIT_LOCAL_IO: Final = 1


def csv_resources(resources: dict[str, int]) -> str:
    """``cpu=4000;memory=8589934592``: internal units, exact, well-known names first."""
    return ";".join(f"{name}={resources[name]}" for name in sorted(resources, key=resource_order))


def history_csv(events: Sequence[HistoryEvent]) -> str:
    """CSV text with a header row of the HistoryEvent fields."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for event in events:
        row = []
        for name in CSV_FIELDS:
            value = getattr(event, name)
            row.append(csv_resources(value) if name == "resources" else value)
        writer.writerow(row)
    return buf.getvalue()


def history_json(events: Sequence[HistoryEvent]) -> str:
    """A JSON list of history event maps."""
    return json.dumps([to_wire(e) for e in events], ensure_ascii=False, indent=2) + "\n"


def export(
    fmt_name: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="json|csv|slurm|kueue",
            help="json or csv: reservation history; slurm: the pool as slurm.conf and"
            " gres.conf lines; kueue: pools and tenants as Kueue objects (YAML).",
        ),
    ] = "json",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", help="Write here instead of stdout."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="TIME",
            help="History: only events at or after TIME: ISO-8601, unix seconds, or ago"
            " (90s, 10m, 2h, 1d).",
        ),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", metavar="TENANT", help="History: only this tenant's events."),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool",
            metavar="POOL",
            help="slurm: the pool to describe (default host); kueue: only this pool (default all).",
        ),
    ] = None,
    node_name: Annotated[
        str | None,
        typer.Option(
            "--node-name",
            metavar="NAME",
            help="slurm: the node's name (default this host's short name).",
        ),
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Export reservation history (reserved, released, expired, preempted, ...), or
    the pools as Slurm or Kueue configuration (docs/scale-out.md)."""
    out = Output(json_out)
    with guard(out):
        fmt = require_choice(fmt_name.lower(), "--format", FORMATS)
        given = {"--since": since, "--tenant": tenant, "--pool": pool, "--node-name": node_name}
        for flag, value in given.items():
            if value is not None and fmt not in FLAG_FORMATS[flag]:
                raise InvalidError(
                    f"{flag} applies only to --format {' or '.join(FLAG_FORMATS[flag])}, not {fmt}",
                    {"field": flag, "format": fmt},
                )
        if fmt in HISTORY_FORMATS:
            since_ts = None if since is None else parse_since(since, time.time())
            args = build(Export, {"since": since_ts, "tenant": tenant})
            with connect(socket) as client:
                history: History = client.call("export", args)
            text = history_csv(history.events) if fmt == "csv" else history_json(history.events)
            done = f"wrote {len(history.events)} event(s) to {output}"
            summary: dict[str, object] = {"events": len(history.events)}
        elif fmt == "slurm":
            node = check_node_name(node_name or socketlib.gethostname().partition(".")[0])
            of = build(ResourcesOf, {"pool": pool})
            with connect(socket) as client:
                view: HostResources = client.call("resources", of)
            text = slurm_config(view, node)
            done = f"wrote the Slurm configuration of pool {view.pool} to {output}"
            summary = {"pool": view.pool, "node": node}
        else:
            only = None if pool is None else build(PoolName, {"name": pool})
            with connect(socket) as client:
                pools = _pools(client, only)
                tenants: TenantList = client.call("tenant.list", Empty())
            text = kueue_manifests(pools, tenants.tenants)
            done = f"wrote Kueue objects for {len(pools)} pool(s) to {output}"
            summary = {"pools": len(pools), "tenants": len(tenants.tenants)}
        if output is None or str(output) == "-":
            sys.stdout.write(text)
            return
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            out.warn(f"cannot write {output}: {exc.strerror or exc}")
            raise typer.Exit(EXIT_LOCAL_IO) from None
        out.emit({"output": str(output), "format": fmt, **summary})
        out.line(done)


def _pools(client: Client, only: PoolName | None) -> list[PoolInfo]:
    """Every pool, or only the one named (NotFoundError when there is none)."""
    if only is not None:
        info: PoolInfo = client.call("pool.show", only)
        return [info]
    listed: PoolList = client.call("pool.list", Empty())
    return listed.pools
