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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_surgeon(args: list[str], nproc: int = 1, threads: int = 1, timeout: float = 600, env: dict | None = None):
    """``surgeon ARGS`` in fresh processes: ``nproc`` ranks under torchrun (gloo on the CPU) or,
    for ``nproc == 1``, one plain process. Every side runs with ``threads`` intra-op threads, so
    that runs compared with each other reduce in the same order (equivalence tests compare like
    with like). Returns the CompletedProcess; SURGEON_DEBUG=1 keeps tracebacks in its stderr."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SURGEON_DEBUG": "1", **(env or {})}
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    else:
        launch = [sys.executable]
    cmd = [*launch, "-m", "surgeon.commands", *[str(a) for a in args]]
    return subprocess.run(cmd, check=False, env=full_env, capture_output=True, text=True, timeout=timeout)
