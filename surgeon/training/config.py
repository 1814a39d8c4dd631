"""``TrainConfig``: every option of ``surgeon train``, validated in one place."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from surgeon import dtypes
from surgeon.anatomy.families import Selection, parse_layers, parse_modules
from surgeon.errors import ConfigError

# Fields that do not change what a run computes: excluded from the resume fingerprint. (Whether
# the model is sharded is checked on resume from the checkpoint itself.)
_NOT_FINGERPRINTED = {
    "output", "save_steps", "resume", "resume_anyway", "overwrite", "eval_set", "eval_every", "eval_limit", "eval_max_new_tokens", "fsdp", "gpu_memory", "num_workers", "log_steps", "report_to", "threads",
    "max_skipped_share", "save_total_limit",
}  # fmt: skip


# Fields added after checkpoints were made with this fingerprint: left out while unset, so those resume.
_NEW = {"modules", "layers"}


@dataclass(frozen=True)
class Precision:
    """The dtype policy of a run (torch dtype names).

    ``mixed``: "no", "bf16" or "fp16" (autocast; under FSDP the all-gathered copies are in
    ``compute``). ``master``: trained parameters, their gradients and AdamW state (fp32 by
    default: 16 bytes per trained parameter; bf16 on request: 8). ``frozen``: parameters that do
    not train, kept in the compute dtype under mixed precision. ``compute``: the dtype of the
    matrix products. ``reduce``: the dtype gradients are summed over ranks in (fp32).
    """

    mixed: str
    master: str
    frozen: str
    compute: str
    reduce: str = "float32"


def resolve_precision(config: TrainConfig, bf16_ok: bool) -> Precision:
    """The run's dtypes: ``mixed_precision`` auto is bf16 where the device has it (``bf16_ok``:
    a GPU with bf16), else no; ``param_dtype`` sets the trained parameters' dtype."""
    mixed = config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if bf16_ok else "no")
    master = dtypes.torch_name(config.param_dtype)
    compute = dtypes.torch_name(mixed) if mixed in ("bf16", "fp16") else master
    return Precision(mixed, master, frozen=compute, compute=compute)


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults marked (ours) are surgeon's choices, not from a paper."""

    model: str  # model folder or Hub repo id (a surgeon folder with IADA / Image-LoRA is fine)
    data: str | None = None  # JSONL file (TRL messages or ShareGPT/LLaMA-Factory style); needed to train
    output: str | None = None  # final folder; checkpoints go to ``<output>-checkpoints/``; needed to train
    max_steps: int | None = None  # optimiser steps; None: ``epochs`` over the data
    epochs: float = 1.0
    lr: float | None = None  # None: 1e-4 with LoRA, 1e-5 with --full (ours) or Image-LoRA (the reference's)
    batch_size: int = 1  # per process and micro-batch
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_skipped_share: float = 0.5  # stop when more than this share of the samples so far were skipped (too long, bad)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    full: bool = False  # full fine-tuning of the language model instead of LoRA
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn,mlp"  # the LoRA-wrapped projections (--modules grammar); older name of --modules for LoRA
    modules: str | None = None  # the LM tensors that train (--full), LoRA wraps, DRIFT biases; None: LoRA attn,mlp / --full all
    layers: str | None = None  # decoder layers, e.g. 0-13,20 (None: all); tensors outside layers by ``modules`` alone
    train_vision: bool = False  # also train the vision tower and projector (fully)
    max_length: int = 2048
    packing: bool = False  # each micro-batch as one row without padding; every sample attends to itself only
    max_tokens_per_batch: int | None = None  # micro-batches filled by tokens instead of --batch-size samples
    group_by_length: bool = False  # (without packing) samples of similar length in a micro-batch, within a window
    chunked_loss: bool = True  # span losses from the LM head's input in chunks: the full logits never exist
    attn: str = "sdpa"  # the language model's attention: sdpa, eager, flash_attention_2 or flex_attention
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else no
    param_dtype: str = "fp32"  # trained parameters (master copies), gradients, AdamW state: fp32 or bf16
    fsdp: bool = False  # shard parameters, gradients, optimiser state and Δ over the processes (FSDP2)
    gpu_memory: str | None = None  # memory budget per process for the plan (default: the device's)
    gradient_checkpointing: bool = False
    save_steps: int = 0  # 0: no intermediate checkpoints
    resume: bool | str = False  # "latest" (or True): the newest checkpoint in ``<output>-checkpoints/``; or a checkpoint folder
    save_total_limit: int | None = None  # keep only this many newest checkpoints
    resume_anyway: bool = False  # resume although the base model (or prior) changed since the checkpoint, with a warning
    merge_lora: bool = False  # write a standard merged model folder instead of an adapter
    prior: str | None = None  # DRIFT prior folder (``surgeon prior``)
    drift_alpha: float = 1.0
    drift_scale: str = "adaptive_cosine"
    drift_normalize: bool = True  # Δ ← Δ·‖θ_VLM‖/‖Δ‖ (reference default); affects ``absolute`` only
    perception_weight: str | None = None  # a λ in [0, 1], or "dynamic"; None: plain cross-entropy
    perception_regex: str | None = None
    iada: bool = False  # inject IADA blocks with default settings before training
    image_lora: str | None = None  # heads.json of `surgeon score-heads`: train Image-LoRA, language model frozen
    image_lora_rank: int = 8
    image_lora_alpha: float = 16.0
    skip_bad_lines: bool = False
    num_workers: int = 0  # DataLoader worker processes that encode samples (0: the training process)
    threads: int | None = None  # intra-op CPU threads per process (None: ``parallel.default_threads``)
    log_steps: int = 10  # a plain progress line every N steps when stderr is not a terminal
    eval_set: tuple[str, ...] = ()  # NAME=DATA sets scored by greedy generation during training (surgeon eval's scoring)
    eval_every: int | None = None  # evaluate every N steps and after the last (the sets' accuracy, KL(base ‖ current))
    eval_limit: int | None = 200  # items of each eval set
    eval_max_new_tokens: int = 128
    report_to: str = "none"  # tensorboard, wandb or none (through Accelerate's trackers)
    overwrite: bool = False

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size, "grad_accum": self.grad_accum, "lora_rank": self.lora_rank,
            "max_length": self.max_length, "image_lora_rank": self.image_lora_rank, "log_steps": self.log_steps,
        }  # fmt: skip
        for field, value in positive.items():
            if value < 1:
                raise ConfigError(field, f"must be at least 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be at least 1, got {self.max_steps}")
        reals = {
            "epochs": self.epochs, "lr": self.lr, "warmup_ratio": self.warmup_ratio, "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "drift_alpha": self.drift_alpha, "image_lora_alpha": self.image_lora_alpha,
        }  # fmt: skip
        for field, value in reals.items():
            if value is not None and not math.isfinite(value):
                raise ConfigError(field, f"must be a finite number, got {value}")
        if self.epochs <= 0:
            raise ConfigError("epochs", f"must be positive, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        for field in ("weight_decay", "max_grad_norm", "drift_alpha"):
            if getattr(self, field) < 0:
                raise ConfigError(field, f"must be ≥ 0, got {getattr(self, field)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("lora_dropout", f"must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise ConfigError("lora_alpha", f"must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("warmup_ratio", f"must lie in [0, 1), got {self.warmup_ratio}")
        object.__setattr__(self, "mixed_precision", dtypes.short(self.mixed_precision, "mixed_precision", ("bf16", "fp16"), ("auto", "no")))
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be ≥ 0, got {self.num_workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", f"must be at least 1, got {self.threads}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ConfigError("report_to", f"unknown tracker {self.report_to!r}", "choose tensorboard, wandb or none")
        object.__setattr__(self, "param_dtype", dtypes.short(self.param_dtype, "param_dtype", ("fp32", "bf16")))
        if self.fsdp and self.mixed_precision == "fp16":
            raise ConfigError("mixed_precision", "FSDP runs in bf16 or fp32, without fp16 loss scaling", "use --mixed-precision bf16 (or no)")
        if self.perception_weight is not None and self.perception_weight != "dynamic":
            try:
                lam = float(self.perception_weight)
            except ValueError:
                raise ConfigError("perception_weight", f"{self.perception_weight!r} is neither a number nor 'dynamic'") from None
            if not 0.0 <= lam <= 1.0:
                raise ConfigError("perception_weight", f"must lie in [0, 1], got {lam}")
        if self.image_lora_alpha <= 0:
            raise ConfigError("image_lora_alpha", f"must be positive, got {self.image_lora_alpha}")
        if self.image_lora and (self.full or self.prior):
            raise ConfigError(
                "image_lora",
                "Image-LoRA trains beside a frozen language model, which full fine-tuning (and DRIFT with it) would train",
                "drop --full/--prior, or train without --image-lora",
            )
        if self.image_lora and self.merge_lora:
            raise ConfigError("merge_lora", "with Image-LoRA no LoRA trains on the language model, so there is none to merge", "drop --merge-lora")
        if self.prior and not self.full and self.perception_weight == "dynamic":
            raise ConfigError(
                "perception_weight", "DRIFT through LoRA measures each backward pass's full-weight gradient, which dynamic λ splits in two",
                "use a fixed --perception-weight with a LoRA prior, or --full",
            )  # fmt: skip
        self._check_selection()
        if self.merge_lora and self.full:
            raise ConfigError("merge_lora", "there is no LoRA to merge with --full", "drop --merge-lora")
        if self.eval_set and not self.eval_every:
            raise ConfigError("eval_every", "eval sets are given but not how often to evaluate", "add --eval-every N (steps)")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError("eval_every", f"must be at least 1, got {self.eval_every}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ConfigError("max_tokens_per_batch", f"must be at least 1, got {self.max_tokens_per_batch}")
        if self.group_by_length and (self.packing or self.max_tokens_per_batch):
            raise ConfigError(
                "group_by_length", "groups samples by length to save padding, which packing and token budgets already do",
                "drop --group-by-length",
            )  # fmt: skip
        if self.attn not in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
            raise ConfigError("attn", f"unknown attention backend {self.attn!r}", "choose sdpa, eager, flash_attention_2 or flex_attention")
        if self.resume is True:
            object.__setattr__(self, "resume", "latest")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError("save_total_limit", f"must be at least 1, got {self.save_total_limit}", "leave it out to keep every checkpoint")
        if not (math.isfinite(self.max_skipped_share) and 0 <= self.max_skipped_share <= 1):
            raise ConfigError("max_skipped_share", f"must lie in [0, 1], got {self.max_skipped_share}")
        if self.prior and not self.full and self.mixed_precision == "fp16":
            raise ConfigError("mixed_precision", "DRIFT through LoRA measures each gradient as the backward makes it, which fp16 loss scaling distorts",
                              "use --mixed-precision bf16 (or no)")  # fmt: skip
        if self.perception_weight == "dynamic" and self.mixed_precision == "fp16":
            raise ConfigError("perception_weight", "dynamic λ does not work with fp16 loss scaling", "use --mixed-precision bf16 or no")

    def _check_selection(self) -> None:
        if self.modules is not None and self.lora_targets != "attn,mlp":
            raise ConfigError("lora_targets", "is the older name of --modules, and both are given", "keep --modules")
        if self.full and self.lora_targets != "attn,mlp":
            raise ConfigError("lora_targets", "selects LoRA's projections, and --full trains without LoRA", "select the trained tensors with --modules")
        if self.image_lora and (self.modules is not None or self.layers is not None):
            raise ConfigError("modules", "Image-LoRA adapts the heads its heads.json selects, with the language model frozen", "drop --modules/--layers")
        parse_modules(self.selection.modules)
        parse_layers(self.layers)

    @property
    def selection(self) -> Selection:
        """What ``--modules``/``--layers`` select: the trained tensors (``--full``; default all of
        the language model), the LoRA-wrapped linear layers (default attn,mlp), the tensors DRIFT
        biases (those, where the prior has Δ)."""
        text = self.modules if self.modules is not None else ("full" if self.full else self.lora_targets)
        return Selection(parse_modules(text), parse_layers(self.layers))

    @property
    def selection_given(self) -> bool:
        """Whether the user chose the selection (every item must then match)."""
        return self.modules is not None or self.lora_targets != "attn,mlp"

    def require_io(self) -> None:
        """A training run (not a plan) needs data and an output folder."""
        for field in ("data", "output"):
            if not getattr(self, field):
                raise ConfigError(field, "a training run needs it", f"pass --{field}, or --dry-run for a memory plan only")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.full or self.image_lora else 1e-4)

    @property
    def fixed_lambda(self) -> float | None:
        return None if self.perception_weight in (None, "dynamic") else float(self.perception_weight)

    def fingerprint(self) -> str:
        """A hash of the settings that shape the run (what ``--resume`` must match)."""
        fields = {k: v for k, v in asdict(self).items() if k not in _NOT_FINGERPRINTED and not (k in _NEW and v is None)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
