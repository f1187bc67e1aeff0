"""docs/design.md walks from each line of the math to the code that runs it: every
function the walk names exists, and holds every statement the walk quotes for it.

A row of the walk's table is `| the math | `file:function` … | `statement` … |`, the
files relative to mlecli/; each quoted statement must be in the source of one of the
functions its row names (whitespace aside), so the walk cannot drift from the code.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")


def walk_rows() -> list[tuple[str, list[str], list[str]]]:
    """(the math, the functions named, the statements quoted) of each row of the walk."""
    body = re.search(r"<!-- walk -->\n(.*?)\n<!-- /walk -->", DESIGN, re.S)
    assert body, "docs/design.md has no <!-- walk --> table"
    rows = []
    for line in body.group(1).splitlines()[2:]:  # past the header and its rule
        math, where, statements = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((math, re.findall(r"`([^`]+)`", where), re.findall(r"`([^`]+)`", statements)))
    return rows


def source_of(name: str) -> str:
    """The source of `path.py:Qualified.name` (path relative to mlecli/)."""
    path, qualname = name.split(":")
    assert (ROOT / "mlecli" / path).is_file(), f"{name}: no file mlecli/{path}"
    obj = importlib.import_module("mlecli." + path.removesuffix(".py").replace("/", "."))
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        assert obj is not None, f"{name}: no {part}"
    return inspect.getsource(obj)


def squeezed(text: str) -> str:
    return " ".join(text.split())


def test_the_walk_has_a_row_for_every_step_of_the_derivation():
    maths = " ".join(math for math, _, _ in walk_rows())
    for step in ("h_0 = x", "a_l = h_{l−1} W_l + b_l", "h_l = σ(a_l)", "LL =", "δ_{L+1} = ∂LL/∂z",
                 "δ_l = (δ_{l+1} W_{l+1}ᵀ) ⊙ h_l ⊙ (1 − h_l)", "∂LL/∂W_l = h_{l−1}ᵀ δ_l",
                 "θ ← θ + η ∇θ LL", "momentum", "nesterov", "adam", "log p(θ)", "(m/N)"):
        assert step in maths, f"the walk has no row for {step}"


@pytest.mark.parametrize("row", walk_rows(), ids=lambda row: row[0][:40])
def test_every_statement_the_walk_quotes_is_in_a_function_it_names(row):
    math, functions, statements = row
    assert functions and statements, f"the row for {math} names no function or quotes no statement"
    sources = [squeezed(source_of(name)) for name in functions]
    for statement in statements:
        assert any(squeezed(statement) in source for source in sources), (
            f"the walk says {math} runs as `{statement}` in {', '.join(functions)}: not found there")


def test_the_walk_check_refuses_a_statement_that_is_not_there():
    assert squeezed("delta += target") in squeezed(source_of("nn/step.py:output_delta"))
    assert squeezed("delta -= target") not in squeezed(source_of("nn/step.py:output_delta"))
    with pytest.raises(AssertionError, match="no nowhere"):
        source_of("nn/step.py:nowhere")
