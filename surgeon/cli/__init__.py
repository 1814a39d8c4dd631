"""The ``surgeon`` command line: one module per verb, each a thin layer over one library call.

Installed as ``surgeon.cli`` (the folder is top-level ``surgeon/cli/`` in the source tree).
"""

from __future__ import annotations

import click

from surgeon import __version__
from surgeon.cli import (
    demo,
    diagnose,
    evaluate,
    inject_iada,
    inspect,
    merge,
    prior,
    probe_layers,
    push,
    score_heads,
    train,
)
from surgeon.cli.group import SurgeonGroup
from surgeon.cli.console import setup_logging


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="surgeon")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv includes transformers).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr (no status, notes or progress); results on stdout stay.")
def main(verbose: int, quiet: bool) -> None:
    """Model surgery for vision-language model fine-tuning.

    \b
    Fine-tuning a VLM on visual instructions improves perception but taxes reasoning.
    surgeon makes the methods that fight that tax one command each:

    \b
      inspect         what a checkpoint is and where its parts live
      prior           DRIFT reasoning prior: Δ = reasoning LLM − VLM, with per-layer statistics
      merge           merge baselines: linear, task arithmetic, TIES, DARE, layer swap
      inject-iada     add IADA depth-aggregation blocks to a saved model
      probe-layers    per decoder layer: where images are read, how reasoning layers fit
      score-heads     which KV heads Image-LoRA adapts: influence scores and a budgeted selection
      train           LoRA / full / Image-LoRA fine-tuning with DRIFT, IADA and perception reweighting
      diagnose        the perception share of a dataset's supervised tokens and loss
      eval            the reasoning tax: models side by side on your sets, intervals and paired tests
      demo            the whole pipeline on tiny models built on the spot
      push            publish an output folder to the Hub with a model card from surgeon.json
    """
    setup_logging(verbose, quiet)


for _module in (
    inspect,
    prior,
    merge,
    inject_iada,
    score_heads,
    train,
    diagnose,
    evaluate,
    probe_layers,
    demo,
    push,
):
    main.add_command(_module.command)
