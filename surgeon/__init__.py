"""surgeon: model surgery for fine-tuning vision-language models.

The library behind the ``surgeon`` command, by concern, each package using only those above it
(``errors``, ``dtypes`` and ``dtensor`` serve them all); each command's work is one function here:

    io/          local files: safetensors read one tensor at a time, checkpoint folders, streaming, outputs, records
    hub/         the Hugging Face Hub: repo ids, downloads, opening a folder or repo id, the requests of a push
    anatomy/     where the language model, vision tower and projector are; tensor families; LLM<->VLM pairs
    drift/       the DRIFT reasoning prior, its statistics, and the gradient bias
    merge/       the merge baselines, one file per method
    modules/     what is injected into models: IADA, Image-LoRA, the remote-code modeling file
    data/        data sources, samples, encoding with the model's processor
    perception/  perception/reasoning reweighting, the perception-aware reward, diagnose
    heads/       head influence scores and the head budget of Image-LoRA
    evaluation/  surgeon eval: answers extracted alike, accuracies with intervals, paired tests, training-time evaluation
    training/    the trainer (and DRIFT/reweighting for the transformers Trainer and TRL)
    publish/     publishing an output folder: push, what it sends and refuses, model cards
    demo/        ``surgeon demo``, tiny models, synthetic data, a local Hub stand-in
    cli/         the ``surgeon`` command line (click and rich), one module per verb

The methods as implemented are described in ``docs/methods.md``; the layers and the path of data
through the main commands in ``docs/architecture.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_model(path: str | Path, **kwargs: Any) -> Any:
    """Load a model folder with its surgeon modules (IADA, …) attached; no remote code needed.

    See ``surgeon.modules.folders.load_model``; ``kwargs`` go to transformers' ``from_pretrained``.
    """
    from surgeon.modules.folders import load_model as load

    return load(path, **kwargs)


def __getattr__(name: str) -> Any:
    """``DriftCallback``, ``PerceptionLoss``, ``PerceptionCollator``, ``EvalCallback``, ``freeze_vision``
    (``surgeon.training.integrations``), imported on first use so that ``import surgeon`` stays light."""
    if name in ("DriftCallback", "PerceptionLoss", "PerceptionCollator", "EvalCallback", "freeze_vision"):
        from surgeon.training import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
