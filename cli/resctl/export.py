"""``resctl export``: reservation history as JSON or CSV (op ``export``).

``history_json`` and ``history_csv`` are pure; the command validates every flag
before connecting, fetches the events, then writes stdout or ``--output``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
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
from resctl.session import Output, connect, guard
from resd_client.protocol import Export, History, HistoryEvent, to_wire

FORMATS: Final = ("json", "csv")
#: CSV columns: the fields of ``HistoryEvent``, in order.
CSV_FIELDS: Final = tuple(f.name for f in dataclasses.fields(HistoryEvent))
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
        str, typer.Option("--format", metavar="json|csv", help="Output format: json or csv.")
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
            help="Only events at or after TIME: ISO-8601, unix seconds, or ago (90s, 10m, 2h, 1d).",
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", metavar="TENANT", help="Only this tenant's events.")
    ] = None,
    json_out: JsonOpt = False,
    socket: SocketOpt = None,
) -> None:
    """Export reservation history (reserved, released, expired, preempted, ...)."""
    out = Output(json_out)
    with guard(out):
        fmt = require_choice(fmt_name.lower(), "--format", FORMATS)
        since_ts = None if since is None else parse_since(since, time.time())
        args = build(Export, {"since": since_ts, "tenant": tenant})
        with connect(socket) as client:
            history: History = client.call("export", args)
        text = history_csv(history.events) if fmt == "csv" else history_json(history.events)
        if output is None or str(output) == "-":
            sys.stdout.write(text)
            return
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            out.warn(f"cannot write {output}: {exc.strerror or exc}")
            raise typer.Exit(EXIT_LOCAL_IO) from None
        out.emit({"output": str(output), "format": fmt, "events": len(history.events)})
        out.line(f"wrote {len(history.events)} event(s) to {output}")
