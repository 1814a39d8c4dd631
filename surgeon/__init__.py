"""surgeon: model surgery for fine-tuning vision-language models.

The library behind the ``surgeon`` command: checkpoint streaming and layouts, DRIFT reasoning
priors and merge baselines, IADA depth aggregation, Image-LoRA, perception/reasoning reweighting,
a minimal trainer, and Hub publishing. Each command's work is one function here.
"""

__version__ = "0.1.0"
