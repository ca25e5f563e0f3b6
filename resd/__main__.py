"""``resd``: run the daemon in the foreground (systemd runs it the same way).

``resd detect`` prints what host discovery finds (the future ``host`` pool) and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from resd.config import FSYNC_MODES, ConfigError, load
from resd.daemon import Daemon, StartupError
from resd.discovery import describe, discover
from resd.journal import JournalCorrupt
from resd.logs import configure
from resd_client import __version__
from resd_client.quantity import render_bytes, render_quantity


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resd",
        description="Host resource reservation daemon. Runs in the foreground; stop it with SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--version", action="version", version=f"resd {__version__}")
    parser.add_argument(
        "--system",
        action="store_true",
        default=None,
        help="system mode: /run/resd/resd.sock and /var/lib/resd",
    )
    parser.add_argument("--socket", help="Unix socket path (default: user or system path)")
    parser.add_argument("--state-dir", help="state directory (journal and snapshots)")
    parser.add_argument(
        "--config", type=Path, help="TOML config (default /etc/resd/resd.toml in system mode)"
    )
    parser.add_argument(
        "--fsync", choices=FSYNC_MODES, help="durability of acknowledgements (default always)"
    )
    parser.add_argument(
        "--no-host-pool",
        dest="host_pool",
        action="store_false",
        default=None,
        help="do not create the discovered 'host' pool on first start",
    )
    parser.add_argument("--log-format", choices=("auto", "json", "console"))
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", help="with no command, resd runs the daemon"
    )
    detect = commands.add_parser(
        "detect",
        help="print what host discovery finds (the 'host' pool) and exit",
        description="Run host discovery and print each resource's capacity, where it came "
        "from, its oversubscription ratio and effective limit, and the GPUs.",
    )
    detect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # SUPPRESS: given before or after 'detect', the value is kept, not reset to None.
    detect.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config")
    detect.add_argument(
        "--state-dir", default=argparse.SUPPRESS, help="state directory (sizes the disk figure)"
    )
    detect.add_argument(
        "--system", action="store_true", default=argparse.SUPPRESS, help="system mode paths"
    )
    return parser


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_detect(report: dict[str, Any]) -> str:
    """The human form of ``describe``'s report: a resource table, then the GPUs."""
    rows = [["RESOURCE", "CAPACITY", "SOURCE", "OVERSUB", "EFFECTIVE", "FROM"]]
    for name, res in report["resources"].items():
        rows.append(
            [
                name,
                render_quantity(name, res["capacity"]),
                res["source"],
                f"{res['oversub_ratio']:g}",
                render_quantity(name, res["effective_limit"]),
                res["detail"],
            ]
        )
    out = [_table(rows), ""]
    if "net" not in report["resources"]:
        out += ["net: no network link reports a speed; set network_limit (e.g. 10Gbps)", ""]
    gpus = report["gpus"]
    if not gpus:
        reason = report["gpu_unavailable"]
        out.append(f"GPUs: none (NVML unavailable: {reason})" if reason else "GPUs: none")
        return "\n".join(out)
    out.append(f"GPUs ({len(gpus)}, {report['gpu_source']}):")
    rows = [["INDEX", "NAME", "MEMORY", "NUMA", "PCI BUS", "MIG", "UUID"]]
    for gpu in gpus:
        rows.append(
            [
                str(gpu["index"]),
                gpu["name"],
                render_bytes(gpu["memory"]),
                "-" if gpu["numa"] is None else str(gpu["numa"]),
                gpu["pci_bus_id"] or "-",
                "on" if gpu["mig"] else "off",
                gpu["uuid"],
            ]
        )
    out.append(_table(rows))
    return "\n".join(out)


def _detect(args: argparse.Namespace) -> None:
    """``resd detect``: exit 0 with the report, 2 on a configuration error."""
    try:
        config = load(
            getattr(args, "config", None),
            overrides={
                "system": getattr(args, "system", None),
                "state_dir": getattr(args, "state_dir", None),
                "log_format": args.log_format,
                "log_level": args.log_level,
            },
        )
        # The report itself says what NVML lacked; only warnings go to stderr.
        configure(config.log_format, "debug" if config.log_level == "debug" else "warning")
        report = describe(discover(config), config.oversub)
    except ConfigError as exc:
        print(f"resd: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2) if args.json else render_detect(report))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "detect":
        _detect(args)
        return
    try:
        config = load(
            args.config,
            overrides={
                "system": args.system,
                "socket": args.socket,
                "state_dir": args.state_dir,
                "fsync": args.fsync,
                "host_pool": args.host_pool,
                "log_format": args.log_format,
                "log_level": args.log_level,
            },
        )
    except ConfigError as exc:
        print(f"resd: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure(config.log_format, config.log_level)
    try:
        trio.run(Daemon(config).run)
    except (StartupError, JournalCorrupt) as exc:
        print(f"resd: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
