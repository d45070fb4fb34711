from __future__ import annotations

import pytest

from blobmesh.errors import PredicateError
from blobmesh.space import CapValue, parse_predicate

CAPS: dict[str, CapValue] = {"gpu": True, "arch": "arm64", "mem_gb": 64, "rev": "7", "load": 0.5}


@pytest.mark.parametrize(("expr", "want"), [
    ("gpu=true", True),
    ("gpu=false", False),
    ("gpu!=false", True),
    ("mem_gb>=16", True),
    ("mem_gb>64", False),
    ("mem_gb<=64,gpu=true", True),
    ("load<1", True),
    ("arch in [arm64,amd64]", True),
    ("arch in [amd64, riscv64]", False),
    ("arch=arm64, mem_gb >= 32", True),
    ("rev=7", True),             # string capability compared with the literal's text
    ("missing=true", False),     # an absent key never matches
    ("missing!=true", False),
    ("arch>=1", False),          # ordering needs a number on both sides
    ("gpu=1", False),            # a bool is not the number 1
])
def test_evaluation(expr: str, want: bool) -> None:
    assert parse_predicate(expr)(CAPS) is want


@pytest.mark.parametrize("expr", [
    "", "   ", "gpu", "=true", "gpu==true", "mem_gb>=lots", "arch in arm64", "arch in [a,,b]",
    "arch in [a", "arch]", "gpu=true,", "gpu=tr ue", "x" * 5000,
])
def test_malformed_expressions_raise_a_typed_error(expr: str) -> None:
    with pytest.raises(PredicateError) as info:
        parse_predicate(expr)
    assert info.value.exit_code == 2
