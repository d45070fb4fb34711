"""Capability predicates: ``gpu=true``, ``mem_gb>=16``, ``arch in [arm64,amd64]``, AND-ed by ``,``.

Literals are typed: ``true``/``false`` are booleans, ``16`` an int, ``1.5`` a float, anything
else a string.  A string capability is compared with the literal's text (so ``rev=7`` matches
``rev="7"``); ordering operators need numbers on both sides.  A missing key never matches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from blobmesh.errors import PredicateError
from blobmesh.space.config import CapValue

_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(>=|<=|!=|=|>|<|\s+in\s+)\s*(.*?)\s*$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.:+/-]+$")


@dataclass(frozen=True, slots=True)
class Literal:
    text: str
    value: CapValue


@dataclass(frozen=True, slots=True)
class Clause:
    key: str
    op: str  # one of = != > >= < <= in
    values: tuple[Literal, ...]


@dataclass(frozen=True, slots=True)
class Predicate:
    """A parsed predicate; call it on a capability mapping."""

    clauses: tuple[Clause, ...]
    source: str

    def __call__(self, caps: Mapping[str, CapValue]) -> bool:
        return all(_eval(c, caps) for c in self.clauses)

    def __str__(self) -> str:
        return self.source


def _literal(text: str, expr: str) -> Literal:
    if not _TOKEN.match(text):
        raise PredicateError(f"bad value {text!r} in capability predicate {expr!r}")
    low = text.lower()
    if low in ("true", "false"):
        return Literal(text, low == "true")
    for conv in (int, float):
        try:
            return Literal(text, conv(text))
        except ValueError:
            pass
    return Literal(text, text)


def _split_top(expr: str) -> list[str]:
    """Split on commas outside ``[...]``."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise PredicateError(f"unbalanced ']' in capability predicate {expr!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PredicateError(f"unbalanced '[' in capability predicate {expr!r}")
    parts.append("".join(cur))
    return parts


def parse_predicate(expr: str) -> Predicate:
    """Parse ``expr``; raises :class:`PredicateError` naming the offending part."""
    if not isinstance(expr, str) or not expr.strip():
        raise PredicateError("empty capability predicate")
    if len(expr) > 4096:
        raise PredicateError("capability predicate longer than 4096 characters")
    clauses = []
    for part in _split_top(expr):
        m = _CLAUSE.match(part)
        if not m or not m.group(3):
            raise PredicateError(f"cannot parse {part.strip()!r} in capability predicate "
                                 f"{expr!r} (expected KEY=VALUE, KEY>=N, KEY in [A,B], ...)")
        key, op, rest = m.group(1), m.group(2).strip(), m.group(3)
        if op == "in":
            if not (rest.startswith("[") and rest.endswith("]")):
                raise PredicateError(f"'in' needs a [list] in capability predicate {expr!r}")
            items = [s.strip() for s in rest[1:-1].split(",")]
            if not all(items):
                raise PredicateError(f"empty list item in capability predicate {expr!r}")
            values = tuple(_literal(s, expr) for s in items)
        else:
            values = (_literal(rest, expr),)
            if op in (">", ">=", "<", "<=") and not _is_number(values[0].value):
                raise PredicateError(f"{key}{op} needs a number in capability predicate {expr!r}")
        clauses.append(Clause(key, op, values))
    return Predicate(tuple(clauses), expr)


def parse_capability(text: str) -> tuple[str, CapValue]:
    """Parse ``KEY=VALUE`` (as in ``--cap gpu=true``) with the same typing as predicates."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key) or not value:
        raise PredicateError(f"malformed capability {text!r}: expected KEY=VALUE")
    return key, _literal(value, text).value


def _is_number(v: CapValue) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _equal(cap: CapValue, lit: Literal) -> bool:
    if isinstance(cap, str):
        return cap == lit.text
    if isinstance(cap, bool) or isinstance(lit.value, bool):
        return cap is lit.value
    return _is_number(lit.value) and cap == lit.value


def _eval(c: Clause, caps: Mapping[str, CapValue]) -> bool:
    if c.key not in caps:
        return False
    cap = caps[c.key]
    if c.op == "=":
        return _equal(cap, c.values[0])
    if c.op == "!=":
        return not _equal(cap, c.values[0])
    if c.op == "in":
        return any(_equal(cap, lit) for lit in c.values)
    if not _is_number(cap):
        return False
    lit = c.values[0].value
    assert isinstance(lit, int | float)
    num = float(cap)
    return {">": num > lit, ">=": num >= lit, "<": num < lit, "<=": num <= lit}[c.op]
