"""``python -m benchmarks``: measure the limit, resd, reslock, contention and scale in one
run, print a table, and write docs/performance.md (generated block), a JSON file and a plot.

    python -m benchmarks                 # the full run (about 6 minutes on 2 CPUs)
    python -m benchmarks --quick         # shorter points, a tenth of the scale
    python -m benchmarks --smoke         # 1 s, 1 client, small sections (the test suite's)
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report, suite
from benchmarks.fleet import run_fleet
from benchmarks.scale import FULL, QUICK, SMOKE, run_scale
from benchmarks.workers import ResdPairs

ROOT = Path(__file__).resolve().parent.parent
HELD = 1000
PROFILES = ROOT / "benchmarks/profiles"
SECTIONS = ("echo", "resd", "reslock", "contention", "scale", "profile")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 s points, a tenth of the scale")
    mode.add_argument(
        "--smoke", action="store_true", help="1 s, 1 client, small sections; writes no docs"
    )
    p.add_argument("--duration", type=float, help="seconds per measured point (default 5)")
    p.add_argument("--clients", help="client process counts, comma separated (default 1,8,32)")
    p.add_argument(
        "--out",
        type=Path,
        help="Markdown file whose generated block is replaced (default: docs/performance.md, "
        "only for a full run with default options)",
    )
    p.add_argument(
        "--json", type=Path, help="every number (default, full run: benchmarks/results/full.json)"
    )
    p.add_argument("--plot", type=Path, help="PNG plot (default, full run: docs/performance.png)")
    p.add_argument(
        "--only",
        help="comma separated sections to run: echo,resd,reslock,contention,scale,profile",
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-profile", action="store_true", help="skip the pyinstrument profile")
    p.add_argument("--no-scale", action="store_true", help="skip the scale section")
    p.add_argument("--no-reslock", action="store_true", help="skip reslock even if installed")
    p.add_argument("--no-contention", action="store_true")
    p.add_argument(
        "--profile-only", action="store_true", help="only the profile (benchmarks/profiles/)"
    )
    p.add_argument("--workdir", help="where sockets and state dirs go (default a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    duration = args.duration or {"smoke": 1.0, "quick": 2.0, "full": 5.0}[mode]
    if args.clients:
        clients = [int(c) for c in args.clients.split(",")]
    else:
        clients = [1] if mode == "smoke" else [1, 8, 32]
    # Only a complete, default run updates the published results unless told where to write.
    publish = mode == "full" and not (
        args.only
        or args.clients
        or args.duration
        or args.profile_only
        or args.no_scale
        or args.no_contention
        or args.no_reslock
        or args.no_profile
    )
    out: Path | None = args.out or (ROOT / "docs/performance.md" if publish else None)
    json_path: Path | None = args.json or (
        ROOT / "benchmarks/results/full.json" if publish else None
    )
    plot_path: Path | None = None
    if not args.no_plot and (publish or args.plot or args.out):
        plot_path = args.plot or (ROOT / "docs/performance.png" if publish else None)
    sections = set(SECTIONS if not args.only else args.only.split(","))
    if args.no_profile or mode == "smoke":
        sections.discard("profile")
    for flag, name in ((args.no_scale, "scale"), (args.no_contention, "contention")):
        if flag:
            sections.discard(name)
    if args.profile_only:
        sections = {"profile"}
    use_reslock = not args.no_reslock and suite.have_reslock()
    # a second comparison with 1,000 other leases active (reslock rewrites all of them
    # on every change); not in the smoke run
    held = 0 if mode == "smoke" else HELD
    held_clients = tuple(n for n in clients if n in (1, 8))
    workdir = suite.make_workdir(args.workdir)
    # profiles of other runs go to the work directory (kept with --keep)
    profiles = PROFILES if publish or args.profile_only else workdir / "profiles"
    say = _say
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "python -m benchmarks"
        + ("" if not (argv or sys.argv[1:]) else " " + shlex.join(argv or sys.argv[1:])),
        "mode": mode,
        "duration": duration,
        "clients": clients,
        "machine": suite.machine(workdir),
        "throughput": [],
    }
    failed: list[str] = []
    try:
        if "echo" in sections:
            say(f"limit: echo server ({duration:g} s per point)")
            results["throughput"] += suite.bench_echo(
                workdir, clients, duration, say, raw=mode != "smoke"
            )
        if "resd" in sections:
            for fsync in ("never", "always"):
                say(f"resd fsync={fsync}: reserve+release pairs")
                results["throughput"] += suite.bench_resd(
                    workdir, fsync, clients, duration, say, held=held, held_clients=held_clients
                )
        if "reslock" in sections and use_reslock:
            say("reslock: try_acquire+release pairs")
            results["throughput"] += suite.bench_reslock(
                workdir, clients, duration, say, held=held, held_clients=held_clients
            )
        elif "reslock" in sections:
            say("reslock: not installed (pip install -e '.[bench]'); skipped")
        results["ratios"] = report.ratios(results)
        if "contention" in sections:
            procs = [4] if mode == "smoke" else [8, 32]
            say("contention: acquire (waiting) -> hold 10 ms -> release, capacity = procs / 4")
            results["contention"] = suite.bench_contention(
                workdir,
                procs,
                duration,
                say,
                fsyncs=("always",) if mode == "smoke" else ("always", "never"),
                reslock=use_reslock and mode != "smoke",
            )
        if "scale" in sections:
            params = {"smoke": SMOKE, "quick": QUICK, "full": FULL}[mode]
            say(
                f"scale: {params.tenants} tenants, {params.reservations} reservations, "
                f"{params.waiters} waiters, {params.log_records}-record log"
            )
            profile_to = profiles / "resd-loaded.txt" if "profile" in sections else None
            results["scale"] = run_scale(workdir, params, say, profile_to=profile_to)
        if "profile" in sections:
            results["profile"] = _profile(workdir, profiles, mode, say)
    except suite.CheckFailed as exc:
        failed.append(str(exc))
        say(f"CHECK FAILED: {exc}")
    finally:
        results["elapsed_s"] = time.monotonic() - started
        results["targets"] = report.targets(results)
        results["failed"] = failed
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"work directory kept: {workdir}")
    _print_summary(results)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        say(f"wrote {json_path}")
    if plot_path is not None and report.plot(results, plot_path):
        say(f"wrote {plot_path}")
        results["plot"] = str(plot_path)
    if out is not None:
        report.write_markdown(out, report.markdown(results))
        say(f"wrote {out}")
    return 1 if failed else 0


def _profile(workdir: Path, profiles: Path, mode: str, say: suite.Say) -> dict[str, Any]:
    from benchmarks import profile

    if not profile.available():
        say("profile: pyinstrument not installed (pip install -e '.[bench]'); skipped")
        return {}
    seconds, clients = (3.0 if mode == "quick" else 8.0), 8
    say(f"profile: resd under pyinstrument, {clients} clients, {seconds:g} s, fsync=never")
    daemon = profile.profiled_daemon(workdir, "profiled", "never", {})
    with daemon:
        daemon.start()
        suite.setup_pool(
            daemon.socket,
            pool="bench",
            capacity=suite.BIG,
            tenants=[f"bench-{i}" for i in range(clients)],
        )
        result = profile.profiled(
            daemon,
            lambda: run_fleet(ResdPairs(daemon.socket, "bench"), clients, seconds),
            profiles / "resd-hot-path.txt",
            f"resd (empty), {clients} client processes doing reserve+release pairs for "
            f"{seconds:g} s, fsync=never, sampled every 0.5 ms",
        )
        daemon.stop()
    say(f"profile: wrote {result['file']}")
    return result


def _say(line: str) -> None:
    print(line, flush=True)


def _print_summary(results: dict[str, Any]) -> None:
    print()
    for r in results.get("ratios", []):
        parts = [f"{r['clients']:>3} clients resd {r['resd']:<12}"]
        for key, label in (("of_limit", "limit"), ("of_reslock", "reslock")):
            if r[key] is not None:
                parts.append(f"{r[key]:6.2f}x {label}")
        print("  ".join(parts))
    print()
    for t in results.get("targets", []):
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        print(f"  {mark} {t['target']}: {t['shown']} (want {t['want']})")
    if results.get("failed"):
        print("\nFAILED: " + "; ".join(results["failed"]))
    print(f"\n{results['elapsed_s']:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
