"""Git-style id prefixes: a unique prefix of a known id stands for it."""

from __future__ import annotations

from collections.abc import Iterable

from blobmesh.errors import AmbiguousIdError, InvalidIdError

MIN_PREFIX = 4
"""Shorter prefixes are refused even when unique: they stop being unique too soon."""


def resolve_prefix(text: str, known: Iterable[str], what: str) -> str:
    """The one id in ``known`` that starts with ``text`` (an exact match wins).

    Raises :class:`InvalidIdError` if none does and :class:`AmbiguousIdError` if several do,
    naming them."""
    text = text.strip()
    candidates = sorted({k for k in known if k.startswith(text)})
    if text in candidates:
        return text
    if len(text) < MIN_PREFIX and candidates:
        raise InvalidIdError(f"no {what} matches {text!r}: a prefix needs at least "
                             f"{MIN_PREFIX} characters", prefix=text)
    if not candidates:
        raise InvalidIdError(f"no {what} matches {text!r}", prefix=text)
    if len(candidates) > 1:
        shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        raise AmbiguousIdError(f"{text!r} is ambiguous: {len(candidates)} {what}s match "
                               f"({shown})", prefix=text)
    return candidates[0]
