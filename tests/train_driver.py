"""Run several ``surgeon train`` command lines in one process (one torch start-up; under torchrun,
one process group): ``python tests/train_driver.py jobs.json``.

``jobs.json`` is a list of argument lists. An entry ``{"args": [...], "stop_after_checkpoint": N}``
runs its command but stops it with KeyboardInterrupt on every rank right after checkpoint N is
written, as a run killed there would stop (the driver then goes on with the next job).
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import click
    from surgeon.cli import main as surgeon

    from surgeon.training import state

    save = state.save_checkpoint
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        args, stop = (job, None) if isinstance(job, list) else (job["args"], job.get("stop_after_checkpoint"))

        def save_then_stop(folder, progress, *rest, _stop=stop, **kw):
            out = save(folder, progress, *rest, **kw)
            if progress.step == _stop:
                raise KeyboardInterrupt
            return out

        state.save_checkpoint = save_then_stop
        try:
            surgeon(["train", *args], standalone_mode=False)
        except (KeyboardInterrupt, click.exceptions.Abort):  # click turns KeyboardInterrupt into Abort
            if stop is None:
                raise


if __name__ == "__main__":
    main()
