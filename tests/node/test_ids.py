"""Git-style id prefixes."""

from __future__ import annotations

import pytest

from blobmesh.errors import AmbiguousIdError, InvalidIdError
from blobmesh.node.ids import resolve_prefix

KNOWN = ["d-3f20aa0000000001", "d-3f21bb0000000002", "d-9c00000000000003"]


def test_a_unique_prefix_or_the_full_id_resolves() -> None:
    assert resolve_prefix("d-9c", KNOWN, "distribution") == KNOWN[2]
    assert resolve_prefix("d-3f20", KNOWN, "distribution") == KNOWN[0]
    assert resolve_prefix(KNOWN[1], KNOWN, "distribution") == KNOWN[1]


def test_ambiguous_and_unknown_prefixes_are_clear_errors() -> None:
    with pytest.raises(AmbiguousIdError, match=r"'d-3f2' is ambiguous: 2 distributions match "
                                               r"\(d-3f20aa0000000001, d-3f21bb0000000002\)"):
        resolve_prefix("d-3f2", KNOWN, "distribution")
    with pytest.raises(InvalidIdError, match="no distribution matches 'd-77'") as info:
        resolve_prefix("d-77", KNOWN, "distribution")
    assert not isinstance(info.value, AmbiguousIdError)
    with pytest.raises(InvalidIdError, match="no blob matches 'd-'"):
        resolve_prefix("d-", KNOWN, "blob")  # too short to mean anything


def test_a_too_short_prefix_says_so() -> None:
    with pytest.raises(InvalidIdError, match=r"no distribution matches 'd-3': a prefix needs "
                                             r"at least 4 characters"):
        resolve_prefix("d-3", KNOWN, "distribution")  # two match: too short, not unknown
