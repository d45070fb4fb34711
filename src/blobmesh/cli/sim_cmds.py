"""``blobmesh sim``: simulate a distribution to N nodes and compare it with the bound."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from blobmesh.cli.output import Subcommands, add_command, console, err_console, print_json


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _count_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _amount(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction between 0 and 1, got {text}")
    return value


def register(sub: Subcommands) -> None:
    p = add_command(sub, "sim", cmd_sim, "simulate distributing a blob to N nodes "
                    "(the real swarm schedulers over a modelled network)", json_flag=True)
    p.add_argument("--nodes", type=_count, required=True, metavar="N",
                   help="targets (with --membership: members at the start)")
    p.add_argument("--membership", action="store_true",
                   help="simulate membership instead (the real SWIM and gossip cores): joins, "
                        "--crash and --starved members, for --duration seconds")
    p.add_argument("--duration", type=_amount, default=30.0, metavar="S",
                   help="--membership: virtual seconds simulated")
    p.add_argument("--joins", type=int, default=10, metavar="N",
                   help="--membership: nodes joining during the run")
    p.add_argument("--size-mib", type=_amount, default=32, metavar="S", help="blob size")
    p.add_argument("--piece-kib", type=_count, default=512, metavar="K", help="piece size")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="random seed")
    p.add_argument("--links", choices=("homogeneous", "heterogeneous"), default="homogeneous",
                   help="heterogeneous: every other target has --slow-mbit links")
    p.add_argument("--rate-mbit", type=_amount, default=100.0, help="link rate")
    p.add_argument("--slow-mbit", type=_amount, default=20.0, help="slow link rate")
    p.add_argument("--latency-ms", type=float, default=0.5, help="one-way latency per node")
    p.add_argument("--crash", type=_fraction, default=0.0, metavar="FRACTION",
                   help="targets that crash once and restart")
    p.add_argument("--starved", type=_fraction, default=0.0, metavar="FRACTION",
                   help="targets whose timers fire late (CPU-starved)")
    p.add_argument("--liars", type=_fraction, default=0.0, metavar="FRACTION",
                   help="targets that serve corrupt pieces")
    # (the defaults are a real node's, SwarmConfig's: resolved when the command runs)
    p.add_argument("--pipeline", type=_count, default=None, metavar="N",
                   help="requests in flight per connection (default: a node's)")
    p.add_argument("--seed-pipeline", type=_count, default=None, metavar="N",
                   help="requests in flight to a peer holding the whole blob (default: a node's)")
    p.add_argument("--upload-slots", type=int, default=None, metavar="N",
                   help="pieces a node sends at once over all connections (0: no limit; "
                        "default: a node's)")
    p.add_argument("--max-upload-slots", type=_count_or_zero, default=None, metavar="N",
                   help="adaptive upload slots: open more, up to N, while a node sends below "
                        "its peak rate (0: fixed; default: a node's)")
    p.add_argument("--cpu-s-per-gib", type=_amount, default=None, metavar="S",
                   help="all nodes share one machine's CPU: S CPU-seconds per GiB delivered "
                        "(measured, e.g. bench_swarm's node CPU over targets x size; "
                        "default: no CPU limit)")
    p.add_argument("--cores", type=_amount, default=2.0, help="that machine's cores")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write result.json and the plots (PNG and SVG) here")


def cmd_sim(args: argparse.Namespace) -> int:
    if args.membership:
        return _cmd_membership(args)
    from blobmesh.sim.scenario import NODE, MiB, Scenario, run

    policy = NODE.download_policy()
    if args.pipeline is not None:
        policy.pipeline = args.pipeline
    if args.seed_pipeline is not None:
        policy.seed_pipeline = args.seed_pipeline
    slots = NODE.upload_slots if args.upload_slots is None else args.upload_slots or None
    sc = Scenario(nodes=args.nodes, size=int(args.size_mib * MiB),
                  piece_size=args.piece_kib * 1024, seed=args.seed, links=args.links,
                  rate_mbit=args.rate_mbit, slow_rate_mbit=args.slow_mbit,
                  latency_ms=args.latency_ms, crash_fraction=args.crash,
                  starved_fraction=args.starved, liar_fraction=args.liars,
                  upload_slots=slots,
                  max_upload_slots=NODE.max_upload_slots if args.max_upload_slots is None
                  else args.max_upload_slots or None,
                  policy=policy, cpu_s_per_gib=args.cpu_s_per_gib or 0.0,
                  cores=args.cores)
    with Progress(TextColumn("[bold]simulating"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("targets done, t={task.fields[now]:.1f}s virtual"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("sim", total=args.nodes, now=0.0)
        result = run(sc, progress=lambda now, done, _n: bar.update(task, completed=done,
                                                                   now=now))
    summary = result.to_json()
    if args.out is not None:
        import json

        from blobmesh.sim.plots import write_plots

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        summary["plots"] = [str(p) for p in write_plots(result, args.out)]
    if args.json:
        print_json(summary)
        return 0
    console.print(f"{result.nodes} targets: all done in {result.t_all_s:.2f}s = "
                  f"{result.ratio:.2f}x the bound {result.bound_s:.2f}s "
                  f"(p50 {result.p50_ratio:.2f}x, p99 {result.p99_ratio:.2f}x); the targets "
                  f"used {result.target_upload_utilisation:.0%} of their upload")
    console.print(f"source: {result.source_copies:.2f} copies, "
                  f"{result.source_ctrl_msgs_per_s:.0f} control msgs/s in "
                  f"({result.source_notes_per_s:.0f}/s progress notes), "
                  f"{result.source_dials} dials in")
    console.print(f"control bytes/s per node: p50 {result.ctrl_bytes_per_s_node_p50:.0f}, "
                  f"max {result.ctrl_bytes_per_s_node_max:.0f}; "
                  f"{result.dist_ops} dist ops; simulated in {result.wall_s:.1f}s "
                  f"({result.events} events)")
    if args.out is not None:
        console.print(f"wrote {args.out}/result.json and plots")
    return 0


def _cmd_membership(args: argparse.Namespace) -> int:
    from blobmesh.sim.membership import MembershipScenario, run

    sc = MembershipScenario(nodes=args.nodes, seed=args.seed, duration=args.duration,
                            joins=args.joins, crash_fraction=args.crash,
                            starved_fraction=args.starved, latency_ms=args.latency_ms)
    with Progress(TextColumn("[bold]simulating membership"), BarColumn(),
                  TextColumn("t={task.completed:.0f}s virtual"), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("sim", total=sc.duration)
        result = run(sc, progress=lambda now: bar.update(task, completed=now))
    summary = result.to_json()
    if args.out is not None:
        import json

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "membership.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    if args.json:
        print_json(summary)
        return 0
    t99 = result.join_t99_s_max
    console.print(f"{result.nodes} nodes, {len(result.joins)} joins: known to 99 % within "
                  f"{'never' if t99 is None else f'{t99:.2f}s'} (slowest), "
                  f"{result.join_t99_s_p50 or 0:.2f}s (p50)")
    console.print(f"{result.crashed} crashed, first marked within "
                  f"{result.crash_detect_s_max or 0:.2f}s; {result.starved} starved; "
                  f"false deaths: {result.false_deaths_healthy} healthy, "
                  f"{result.false_deaths_starved} starved")
    console.print(f"bytes/s sent per node: p50 {result.bytes_out_per_s_node_p50:.0f}, "
                  f"p99 {result.bytes_out_per_s_node_p99:.0f}, max "
                  f"{result.bytes_out_per_s_node_max:.0f} ({result.bytes_per_s_by_kind}); "
                  f"{result.mem_per_node_kib:.0f} KiB per node; simulated in "
                  f"{result.wall_s:.1f}s ({result.events} events)")
    return 0
