"""Plain helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch


def assert_one_line_error(result, *fragments: str) -> None:
    """A failed command: exit 1, one ``Error:`` line on stderr naming the fragments, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
