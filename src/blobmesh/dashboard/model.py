"""What the dashboard shows, computed without I/O: liveness, rates, ETAs, the events log and
per-client deltas of target rows.  Everything takes ``now`` (wall-clock seconds) as input."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"

DEAD_AFTER = 10.0
"""Seconds of silence after which an unresponsive member shows as dead (the distribution
service reports a lost target unreachable after the same time)."""


def liveness(alive: bool, last_seen: float, now: float, dead_after: float = DEAD_AFTER) -> str:
    """``alive`` while failure detection trusts it; ``suspect`` once unresponsive; ``dead``
    when it also has not been heard of for ``dead_after`` seconds."""
    if alive:
        return ALIVE
    return DEAD if now - last_seen >= dead_after else SUSPECT


def eta(bytes_done: int, bytes_total: int, rate: float) -> float | None:
    """Seconds left at ``rate``, or None when nothing moves (or nothing is left)."""
    left = bytes_total - bytes_done
    if left <= 0 or rate <= 0:
        return None
    return left / rate


class RateMeter:
    """Rate of a growing counter over a sliding window of samples."""

    def __init__(self, window: float = 2.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, total: int) -> float:
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        return (total - v0) / (now - t0) if now > t0 else 0.0


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    t: float
    level: str  # "info" | "warn" | "error"
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "t": self.t, "level": self.level, "text": self.text}


class EventLog:
    """The recent events log: changes of member liveness and of distribution/target states,
    found by comparing successive views (bounded ring)."""

    def __init__(self, size: int = 200) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._seq = 0
        self._members: dict[str, str] = {}
        self._dists: dict[str, str] = {}
        self._targets: dict[tuple[str, str], str] = {}
        self._primed = False

    def add(self, now: float, level: str, text: str) -> None:
        self._seq += 1
        self._events.append(Event(self._seq, now, level, text))

    def since(self, seq: int) -> list[Event]:
        return [e for e in self._events if e.seq > seq]

    @property
    def last_seq(self) -> int:
        return self._seq

    def observe(self, now: float, members: Mapping[str, str],
                dists: Sequence[Mapping[str, Any]]) -> None:
        """Log what changed since the previous call (the first call only records)."""
        quiet = not self._primed
        self._primed = True
        for node, state in members.items():
            old = self._members.get(node)
            if old != state and not quiet:
                what = "joined" if old is None else f"is {state}"
                self.add(now, {ALIVE: "info", SUSPECT: "warn", DEAD: "error"}[state],
                         f"member {node[:12]}… {what}")
        for node in self._members.keys() - members.keys():
            if not quiet:
                self.add(now, "warn", f"member {node[:12]}… left the space")
        self._members = dict(members)
        for d in dists:
            handle, state = str(d["handle"]), str(d["state"])
            old = self._dists.get(handle)
            if old != state and not quiet:
                scope = str(d["scope"])
                scope = scope if len(scope) <= 40 else scope[:40] + "…"
                text = (f"distribution {handle} of {str(d['blob'])[:14]}… to {scope} "
                        + ("started" if old is None else state))
                self.add(now, "error" if state == "finished-with-failures" else "info", text)
            self._dists[handle] = state
            for t in d.get("targets", ()):
                key = (handle, str(t["node"]))
                tstate = str(t["state"])
                if self._targets.get(key) != tstate and not quiet and \
                        tstate in ("completed", "failed"):
                    reason = f": {t['reason']}" if t.get("reason") else ""
                    self.add(now, "error" if tstate == "failed" else "info",
                             f"{handle}: {str(t['node'])[:12]}… {tstate}{reason}")
                self._targets[key] = tstate


def summarize(status: Mapping[str, Any], now: float) -> dict[str, Any]:
    """One distribution's row (from its control-API JSON): totals, aggregate rate, ETA."""
    totals = status["totals"]
    active = status["state"] == "active"
    rate = sum(float(t["rate"]) for t in status["targets"]
               if t["state"] == "transferring") if active else 0.0
    return {
        "handle": status["handle"], "blob": status["blob"], "size": status["size"],
        "scope": status["scope"], "priority": status["priority"], "state": status["state"],
        "started": status["started"], "finished": status["finished"],
        "targets": totals["targets"], "completed": totals["completed"],
        "failed": totals["failed"], "bytes_done": totals["bytes_done"],
        "bytes_total": totals["bytes_total"], "rate": rate,
        "eta": eta(totals["bytes_done"], totals["bytes_total"], rate) if active else None,
    }


def target_rates(statuses: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Download rate of each node, summed over the active distributions seen here."""
    out: dict[str, float] = {}
    for s in statuses:
        if s["state"] != "active":
            continue
        for t in s["targets"]:
            if t["state"] == "transferring":
                out[t["node"]] = out.get(t["node"], 0.0) + float(t["rate"])
    return out


class VersionedRows:
    """The latest rows by key, each stamped with the version of the view it last changed in,
    so a stream that has seen version ``seen`` is sent only what changed since."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._rows: dict[str, Mapping[str, Any]] = {}
        self._changed: dict[str, int] = {}
        self.order: list[str] = []
        self._order_changed = 0

    def update(self, version: int, rows: Sequence[Mapping[str, Any]]) -> None:
        keys = [str(r[self._key]) for r in rows]
        for k, r in zip(keys, rows, strict=True):
            if self._rows.get(k) != r:
                self._rows[k] = r
                self._changed[k] = version
        for k in self._rows.keys() - set(keys):
            del self._rows[k], self._changed[k]
        if keys != self.order:
            self.order, self._order_changed = keys, version

    def since(self, seen: int) -> tuple[list[Mapping[str, Any]], list[str] | None]:
        """Rows changed after version ``seen`` (in order) and the order if it changed."""
        rows = [self._rows[k] for k in self.order if self._changed[k] > seen]
        return rows, self.order if self._order_changed > seen else None

    def rows(self) -> list[Mapping[str, Any]]:
        return [self._rows[k] for k in self.order]


_ROW_KEYS = ("state", "bytes_done", "rate", "reason", "peers", "sources", "source_rates")


class TargetDelta:
    """The target rows one client has been sent for one distribution; yields only the rows
    that changed since (all of them the first time)."""

    def __init__(self, handle: str) -> None:
        self.handle = handle
        self._sent: dict[str, tuple[Any, ...]] = {}

    def changed(self, targets: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        out = []
        for t in targets:
            key = tuple(t[k] for k in _ROW_KEYS)
            if self._sent.get(t["node"]) != key:
                self._sent[t["node"]] = key
                out.append(t)
        return out


class History:
    """Aggregate throughput of each distribution over time, one point per ``step`` seconds,
    at most ``points`` kept."""

    def __init__(self, step: float = 0.5, points: int = 1200) -> None:
        self._step = step
        self._points = points
        self._series: dict[str, deque[tuple[float, float]]] = {}
        self._last: dict[str, float] = {}

    def record(self, now: float, rows: Iterable[Mapping[str, Any]]) -> None:
        for r in rows:
            h = str(r["handle"])
            if r["state"] != "active" and h not in self._series:
                continue
            if now - self._last.get(h, 0.0) < self._step:
                continue
            self._last[h] = now
            series = self._series.setdefault(h, deque(maxlen=self._points))
            if r["state"] == "active" or (series and series[-1][1] != 0.0):
                series.append((round(now, 3), float(r["rate"])))

    def series(self, handle: str, after: float = float("-inf"), last: int = 240
               ) -> list[tuple[float, float]]:
        """The newest ``last`` points later than ``after``, oldest first."""
        out: list[tuple[float, float]] = []
        for p in reversed(self._series.get(handle, ())):
            if p[0] <= after or len(out) >= last:
                break
            out.append(p)
        return out[::-1]
