"""``python -m surgeon.commands …`` (what ``accelerate launch -m`` and ``torchrun -m`` run)."""

from surgeon.commands import main

main(prog_name="surgeon")
