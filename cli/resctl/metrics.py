"""``resctl metrics``: the daemon's Prometheus metrics through its socket.

The text is exactly what ``metrics_listen`` serves over HTTP, for hosts where no
port is opened: node_exporter's textfile collector reads it from a file, e.g.
``resctl metrics > /var/lib/node_exporter/resd.prom.$$ && mv ...``. ``--output``
writes that file atomically (a temporary file in the same directory, then a rename),
so the collector never reads half of it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from resctl.options import SocketOpt
from resctl.session import Output, connect, guard
from resd_client.protocol import Empty, MetricsText

OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Write to this file atomically (for node_exporter's textfile collector; "
        "name it *.prom) instead of standard output.",
    ),
]


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename; mode 0644 so the collector may
    read it. Raises OSError when the directory is not writable."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metrics(output: OutputOpt = None, socket: SocketOpt = None) -> None:
    """Print resd's Prometheus metrics (the text its metrics_listen endpoint serves)."""
    out = Output(False)
    with guard(out), connect(socket) as client:
        result: MetricsText = client.call("metrics", Empty())
    if output is None:
        sys.stdout.write(result.text)
        sys.stdout.flush()
        return
    try:
        write_atomically(output, result.text)
    except OSError as exc:
        typer.echo(f"resctl: cannot write {output}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
