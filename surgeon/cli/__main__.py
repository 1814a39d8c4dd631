"""``python -m surgeon.cli …`` (what ``accelerate launch -m`` and ``torchrun -m`` run)."""

from surgeon.cli import main

main(prog_name="surgeon")
