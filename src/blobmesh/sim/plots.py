"""Plots of a :class:`~blobmesh.sim.scenario.Result`, as PNG and SVG (matplotlib, loaded here
only: ``import blobmesh.sim`` stays light)."""

from __future__ import annotations

from pathlib import Path

from blobmesh.sim.scenario import Result


def write_plots(result: Result, out: Path) -> list[Path]:
    """Completion CDF, source and target upload over time, control messages per node; returns
    the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    title = f"{result.nodes} targets, {result.scenario.links} links, seed {result.scenario.seed}"
    written: list[Path] = []

    def save(fig: object, name: str) -> None:
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=120)  # type: ignore[attr-defined]
            written.append(path)
        plt.close(fig)  # type: ignore[arg-type]

    done = [t for t in result.finish_times if t != float("inf")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t / result.bound_s for t in done],
            [(i + 1) / len(result.finish_times) for i in range(len(done))], drawstyle="steps-post")
    ax.axvline(1.0, color="grey", linestyle="--", label="Kumar–Ross bound")
    ax.set(xlabel="completion time / bound", ylabel="fraction of targets complete",
           title=f"Completion CDF — {title}")
    ax.legend()
    save(fig, "completion_cdf")

    fig, ax = plt.subplots(figsize=(7, 4))
    up = result.scenario.rate_mbit * 1e6 / 8
    ax.plot(result.series_t, [u / up for u in result.series_source_up], label="source")
    ax.plot(result.series_t, result.series_target_up, label="targets (all together)")
    ax.set(xlabel="time (s)", ylabel="upload / capacity", ylim=(0, 1.1),
           title=f"Upload — source {result.source_copies:.2f} copies, targets "
                 f"{result.target_upload_utilisation:.0%} of their capacity")
    ax.legend()
    save(fig, "source_upload")

    fig, ax = plt.subplots(figsize=(7, 4))
    msgs = result.ctrl_msgs_per_node
    ax.bar(["source"], [msgs[0]], color="tab:red")
    targets = sorted(msgs[1:])
    ax.plot([f"t{i}" for i in range(len(targets))], targets, color="tab:blue")
    ax.set_xticks([])
    ax.set(xlabel="nodes (source, then targets by count)", ylabel="control messages in + out",
           title=f"Control messages per node — {title}")
    save(fig, "control_msgs_per_node")
    return written


__all__ = ["write_plots"]
