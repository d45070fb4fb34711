"""The dashboard's cost on the node and its liveliness in the browser, during a distribution.

    .venv/bin/python benchmarks/bench_dashboard.py [--targets 15] [--pages 5] [--size-mb 64]

A source node serves the dashboard; ``--targets`` nodes (real processes on loopback) receive
``--size-mb`` from it.  Run A: ``--pages`` dashboards are open in headless chromium (one
browser, each page in its own window), all following the distribution's detail stream.
Run B: the same distribution of another blob with no page open.  Reported:

* the dashboard's CPU on the node, as a share of one core over run A, two ways: what the
  dashboard itself accounts (building, diffing and encoding views) and the difference of the
  source process's CPU seconds between runs A and B over run A's time (includes HTTP and
  socket writes, but also the run-to-run noise of the swarm).  Goal: <= 5 % of one core.
* update latency, measured in the pages: a target's progress reaches the node (its
  ``updated`` time) -> the frame after the page drew it.  Goal: p95 <= 500 ms.
* where the machine's CPU went over run A (the browser's processes, the nodes) and the pages'
  main threads (DevTools metrics: wall time in tasks, their CPU time, script, style, layout):
  on 2 cores the 16 nodes and the browser compete, and each stage of an update waits for a
  core as much as it works.

The machine's load average is printed first and last: on a shared machine, scale down
(``--targets 7``) and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from blobmesh.dashboard import read_url_file
from blobmesh.node.fleet import Fleet, FleetNode
from blobmesh.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dashboard.browser import chromium, wait_for

MiB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(node: FleetNode) -> float:
    assert node.proc is not None
    fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def api(info: dict[str, Any], method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        str(info["url"]).rstrip("/") + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {info['token']}",
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def distribute(info: dict[str, Any], src: FleetNode, size: int
               ) -> tuple[str, float, float, float]:
    """Start one distribution; return (handle, seconds, source CPU seconds, dashboard CPU)."""
    with Store(src.home) as store:
        blob = store.add_bytes(os.urandom(size)).blob_id
    dash0 = api(info, "GET", "/dash/v1/view")["dashboard"]["cpu"]
    cpu0, t0 = cpu_seconds(src), time.monotonic()
    handle = api(info, "POST", "/v1/distributions", {"blob": str(blob), "scope": "all"})["handle"]
    return handle, t0, cpu0, dash0


def wait_completed(info: dict[str, Any], handle: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while api(info, "GET", f"/v1/distributions/{handle}")["state"] == "active":
        if time.monotonic() > end:
            raise SystemExit(f"distribution {handle} not done after {timeout}s")
        time.sleep(0.1)


def renderer_seconds(browser: Any, windows: list[str]) -> dict[str, float]:
    """Main-thread time of the pages so far (DevTools Performance metrics), summed."""
    out = dict.fromkeys(RENDERER_METRICS, 0.0)
    for w in windows:
        browser.switch_to.window(w)
        browser.execute_cdp_cmd("Performance.enable", {})
        got = browser.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
        for m in got:
            if m["name"] in out:
                out[m["name"]] += float(m["value"])
    return out


RENDERER_METRICS = ("TaskDuration", "ThreadTime", "ScriptDuration", "RecalcStyleDuration",
                    "LayoutDuration", "LayoutCount")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root``'s descendants (the browser's processes under chromedriver)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / TICK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(p for p, pp in parent.items() if pp == pid)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", type=int, default=15)
    ap.add_argument("--pages", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    size = args.size_mb * MiB
    print(f"load before: {os.getloadavg()}  cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench-dash-") as tmp, Fleet(Path(tmp)) as fleet:
        src = fleet.add(extra=["--http-listen", "127.0.0.1:0"])
        for _ in range(args.targets):
            fleet.add()
        fleet.start()
        asyncio.run(fleet.wait_converged(120))
        info = read_url_file(src.home)
        assert info is not None

        with chromium() as browser:
            # each page in its own window (its own renderer, as separate tabs would be)
            windows = []
            for i in range(args.pages):
                if i:
                    browser.switch_to.new_window("window")
                browser.set_window_size(1000, 900)
                browser.get(info["url"])
                windows.append(browser.current_window_handle)

            def each_page(script: str, *arg: Any) -> list[Any]:
                out = []
                for w in windows:
                    browser.switch_to.window(w)
                    out.append(browser.execute_script(script, *arg))
                return out

            wait_for(lambda: all(n == args.targets + 1 for n in each_page(
                "return document.querySelectorAll('#fleet tbody tr').length")), 60,
                "every member on every page")
            renderer0 = renderer_seconds(browser, windows)
            driver = browser.service.process.pid
            browser0 = tree_cpu_seconds(driver)
            nodes0 = sum(cpu_seconds(n) for n in fleet.nodes)
            handle, t0, cpu0, dash0 = distribute(info, src, size)
            each_page("select(arguments[0])", handle)
            wait_completed(info, handle, args.timeout)
            renderer = {k: v - renderer0[k] for k, v in renderer_seconds(browser, windows).items()}
            secs_a = time.monotonic() - t0
            cpu_a = cpu_seconds(src) - cpu0
            browser_a = tree_cpu_seconds(driver) - browser0
            nodes_a = sum(cpu_seconds(n) for n in fleet.nodes) - nodes0
            dash_a = api(info, "GET", "/dash/v1/view")["dashboard"]["cpu"] - dash0
            time.sleep(0.5)
            lat = sorted(x for page in each_page("return window.__dash.latencies")
                         for x in page)
            stages = [x for page in each_page("return window.__dash.stages") for x in page]
            draws = each_page("return [window.__dash.draws, window.__dash.drawMs]")
            clients = api(info, "GET", "/dash/v1/view")["dashboard"]["clients"]
        print(f"run A (pages open): {secs_a:.1f} s, source CPU {cpu_a:.2f} s "
              f"({100 * cpu_a / secs_a:.1f} % of a core), {clients} streams", flush=True)
        time.sleep(1.0)  # the pages' streams close
        handle_b, t0, cpu0, _ = distribute(info, src, size)
        wait_completed(info, handle_b, args.timeout)
        secs_b, cpu_b = time.monotonic() - t0, cpu_seconds(src) - cpu0

    share_self = dash_a / secs_a
    share_ab = (cpu_a - cpu_b) / secs_a  # the same bytes moved: the same swarm work
    p50 = statistics.median(lat) if lat else float("nan")
    p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
    print(f"{args.targets} targets, {args.size_mb} MiB, {args.pages} pages")
    print(f"run B (no page):    {secs_b:.1f} s, source CPU {cpu_b:.2f} s "
          f"({100 * cpu_b / secs_b:.1f} % of a core)")
    print(f"dashboard CPU, self-accounted: {100 * share_self:.2f} % of a core "
          f"= {share_self / 0.05:.2f}x the 5 % goal")
    print(f"dashboard CPU, run A - run B:  {100 * share_ab:.2f} % of a core "
          f"= {share_ab / 0.05:.2f}x the 5 % goal (noisy)")
    print(f"update latency event->drawn over {len(lat)} updates: p50 {1000 * p50:.0f} ms, "
          f"p95 {1000 * p95:.0f} ms = {p95 / 0.5:.2f}x the 500 ms goal, "
          f"max {1000 * (lat[-1] if lat else 0):.0f} ms")
    if stages:
        parts = ("waiting for the next view", "node -> page", "page received -> painted")
        print("  p50 of each stage: " + ", ".join(
            f"{name} {1000 * statistics.median(s[i] for s in stages):.0f} ms"
            for i, name in enumerate(parts)))
    n_draws = sum(d[0] for d in draws)
    print(f"  page draws: {n_draws}, {sum(d[1] for d in draws) / max(1, n_draws):.1f} ms each")
    cores = os.cpu_count() or 1
    print(f"  CPU over run A (s): the browser (5 pages) {browser_a:.1f}, "
          f"the {args.targets + 1} nodes {nodes_a:.1f}, of {cores * secs_a:.1f} on {cores} cores")
    print("  the pages' main threads over run A, in all (s, counts): " + ", ".join(
        f"{k} {v:.2f}" for k, v in renderer.items()))
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
