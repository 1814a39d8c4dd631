"""Where each VLM family keeps its language model, vision tower and projector on disk.

Builds a tiny model of every family surgeon recognises (no download) and prints the placement
surgeon finds from tensor names alone. Run:

    python examples/inspect_layouts.py [WORKDIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from surgeon.demo import tiny
from surgeon.hub.sources import open_checkpoint
from surgeon.anatomy.inspect import inspect_checkpoint


def main(workdir: str | Path) -> list[dict]:
    rows = []
    for family in tiny.FAMILIES:
        with open_checkpoint(tiny.build(family, Path(workdir) / family)) as ckpt:
            report = inspect_checkpoint(ckpt)
        rows.append({"family": family, "lm": report.lm_prefix + "layers.*", "head": report.lm_head, **report.params})
        print(f"{family:16} LM at {report.lm_prefix + 'layers.*':30} head {str(report.lm_head):32} params {report.params}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="surgeon-layouts-"))
