"""A memory plan for a training run, from config.json alone (the model is built on the meta device).

    plan = plan_memory(TrainConfig(model="Qwen/Qwen2.5-VL-7B-Instruct", full=True), model_config,
                       processes=8, sharded=True, precision=resolve_precision(config, True), device="cuda")
    plan.per_process_bytes, plan.parts            # {"weights": …, "master": …, "gradients": …, …}

Per process, in bytes (surgeon's estimates; "trained" = parameters that train):

    weights      frozen parameters in the frozen dtype
    master       trained parameters in the master dtype (fp32 by default)
    gradients    their gradients (2× with dynamic λ, which keeps g_p and g_r apart)
    optimizer    AdamW's two moments, in the master dtype
    delta        DRIFT's Δ in the prior's stored dtype
    copies       working copies: autocast's compute-dtype casts of the trained weights (one
                 process or DDP, mixed precision); DDP's gradient buckets (a second copy of the
                 gradients); under FSDP the all-gathered units in flight (the root and two decoder
                 layers) and one layer's unsharded fp32 gradients before their reduce-scatter
    activations  what the backward pass keeps, for batch_size × max_length tokens of the language
                 model: per decoder layer and token about (7·hidden + 3·kv + 4·intermediate) values
                 in the compute dtype (one layer input with gradient checkpointing, plus one layer
                 recomputed), plus the logits and the cross-entropy's fp32 copies, plus IADA's
                 fp32 boundary states; the vision tower's activations are not counted (frozen
                 towers keep none)
    runtime      a fixed allowance for the framework: CUDA context and workspaces on a GPU, the
                 Python/torch/transformers process on the CPU

Under FSDP every tensor of the language model is split in rows over the processes (a tensor of n
rows costs ceil(n / processes) rows per process); the vision tower, projector and surgeon
modules are replicated (see ``surgeon.training.parallel``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgeon import dtypes
from surgeon.errors import ConfigError
from surgeon.training.config import Precision, TrainConfig

PARTS = ("weights", "master", "gradients", "optimizer", "delta", "copies", "activations", "runtime")
RUNTIME_BYTES = {"cuda": 2 * 10**9, "cpu": 10**9}  # surgeon's allowance (see the module docstring)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process by part (``PARTS``), the counts behind them, and the budget."""

    architecture: str
    processes: int
    sharded: bool
    device: str
    precision: dict[str, str]
    parts: dict[str, int]
    parameters: dict[str, int]
    tokens: int
    gradient_checkpointing: bool
    budget: int | None = None
    budget_source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def per_process_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.per_process_bytes <= self.budget

    def describe(self) -> str:
        """``"122.3 GB (weights 1.4, master 30.5, …)"``."""
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in self.parts.items() if v)
        return f"{self.per_process_bytes / 1e9:.1f} GB ({parts})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_process_bytes": self.per_process_bytes, "fits": self.fits}


def plan_memory(
    config: TrainConfig,
    model_config: dict,
    processes: int,
    sharded: bool,
    precision: Precision,
    device: str = "cuda",
    budget: int | None = None,
    budget_source: str = "",
) -> MemoryPlan:
    """The plan of ``config`` on ``processes`` processes (``sharded``: FSDP) for a model of
    ``model_config`` (config.json as a dict), built on the meta device with the run's own options
    (LoRA, IADA, Image-LoRA, full, --train-vision), so the parameter counts are exact."""
    import torch

    from surgeon.modules.folders import module_parameters
    from surgeon.anatomy.decoder import language_model, lm_parameters, vision_modules
    from surgeon.training.build import build_model

    if processes < 1:
        raise ConfigError("num_processes", f"must be at least 1, got {processes}")
    sharded = sharded and processes > 1
    model = build_model(config, model_config, "auto")
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    replicated = {id(p) for path in vision_modules(model) for p in model.get_submodule(path).parameters()}
    replicated |= {id(p) for p in module_parameters(root).values()}
    world = processes if sharded else 1

    def size(p: torch.Tensor, nbytes: int) -> int:
        """Bytes of p on one process: its rows when sharded, all of it otherwise."""
        if not sharded or id(p) in replicated or p.dim() == 0:
            return p.numel() * nbytes
        rows = -(-p.shape[0] // world)
        return rows * (p.numel() // max(p.shape[0], 1)) * nbytes

    unique = list({id(p): p for p in model.parameters()}.values())
    trained = [p for p in unique if p.requires_grad]
    frozen = [p for p in unique if not p.requires_grad]
    decoder = language_model(model)
    parts = _state_parts(config, precision, processes, sharded, unique, decoder, replicated, size)
    b_compute = dtypes.nbytes(precision.compute)
    notes: list[str] = []
    if config.prior:
        lm = {n.replace(".base_layer.", "."): p for n, p in lm_parameters(root)}
        held = {n.replace(".base_layer.", ".") for n, p in lm_parameters(root) if (p.requires_grad if config.full else ".base_layer." in n)}
        parts["delta"], biased = _delta_bytes(config.prior, lm, size, held, strict=config.full)
        notes.append(f"DRIFT biases {biased:,} parameters")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tokens = config.max_tokens_per_batch or config.batch_size * config.max_length
    parts["activations"] = _activations(text, len(decoder.layers), tokens, b_compute, config, module_parameters(root))
    parts["runtime"] = runtime_bytes(device)
    counts = {
        "total": sum(p.numel() for p in unique),
        "trained": sum(p.numel() for p in trained),
        "frozen": sum(p.numel() for p in frozen),
        "replicated": sum(p.numel() for p in unique if id(p) in replicated),
    }
    return MemoryPlan(
        architecture=type(root).__name__.removeprefix("Surgeon"),
        processes=processes,
        sharded=sharded,
        device=device,
        precision={"mixed": precision.mixed, "trained": precision.master, "frozen": precision.frozen, "compute": precision.compute},
        parts=parts,
        parameters=counts,
        tokens=tokens,
        gradient_checkpointing=config.gradient_checkpointing,
        budget=budget,
        budget_source=budget_source,
        notes=notes,
    )


def _state_parts(
    config: TrainConfig, precision: Precision, processes: int, sharded: bool, unique: list, decoder: Any, replicated: set[int], size: Any
) -> dict[str, int]:
    """Bytes per process of the weights, master copies, gradients, AdamW state and working copies
    (FSDP's gathered units in flight, autocast's cached casts, DDP's buckets)."""
    b_master, b_frozen = dtypes.nbytes(precision.master), dtypes.nbytes(precision.frozen)
    b_compute = dtypes.nbytes(precision.compute)
    trained = [p for p in unique if p.requires_grad]
    frozen = [p for p in unique if not p.requires_grad]
    parts = dict.fromkeys(PARTS, 0)
    parts["weights"] = sum(size(p, b_frozen) for p in frozen)
    parts["master"] = sum(size(p, b_master) for p in trained)
    grad_copies = 2 if config.perception_weight == "dynamic" else 1
    parts["gradients"] = grad_copies * sum(size(p, b_master) for p in trained)
    parts["optimizer"] = 2 * sum(size(p, b_master) for p in trained)
    layer_params = [list(layer.parameters()) for layer in decoder.layers]
    largest = max((sum(p.numel() for p in ps) for ps in layer_params), default=0)
    if sharded:
        in_layers = {id(p) for ps in layer_params for p in ps}
        root_numel = sum(p.numel() for p in unique if id(p) not in in_layers and id(p) not in replicated)
        largest_trained = max((sum(p.numel() for p in ps if p.requires_grad) for ps in layer_params), default=0)
        parts["copies"] = (root_numel + 2 * largest) * b_compute + largest_trained * 4  # units in flight
    else:
        if precision.mixed != "no" and b_compute < b_master:
            parts["copies"] = sum(p.numel() for p in trained if p.dim() >= 2) * b_compute  # autocast's cached casts
        if processes > 1:
            parts["copies"] += sum(p.numel() for p in trained) * b_master  # DDP's gradient buckets
    return parts


def _activations(text: Any, layers: int, tokens: int, b: int, config: TrainConfig, modules: dict) -> int:
    """Bytes of what the forward keeps for the backward, at ``tokens`` per micro-batch: per layer
    (or, with gradient checkpointing, each layer's input and one layer's worth), the attention
    probabilities where the kernel keeps them (eager; sdpa given a padding mask, which sends it to
    the math kernel), and the loss: the whole ``[tokens × vocabulary]`` logits with their fp32
    softmax and gradient, or with the chunked loss one chunk of them and the gathered hidden rows."""
    from surgeon.perception.chunked import chunk_rows

    h = text.hidden_size
    heads = getattr(text, "num_attention_heads", 1) or 1
    head_dim = getattr(text, "head_dim", None) or h // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    f = getattr(text, "intermediate_size", None) or 4 * h
    per_layer = (7 * h + 3 * kv + 4 * f) * b  # bytes per token
    row = tokens if config.packing or config.batch_size == 1 else config.max_length
    rows = max(tokens // max(row, 1), 1)
    masked = config.attn == "eager" or (config.attn == "sdpa" and not config.packing and rows > 1)
    probs = rows * heads * row * row * b if masked else 0  # one layer's attention probabilities
    if config.gradient_checkpointing:
        kept = tokens * (layers * h * b + per_layer) + probs
    else:
        kept = tokens * layers * per_layer + layers * probs
    vocab = getattr(text, "vocab_size", 0) or 0
    if config.chunked_loss:
        logits = min(chunk_rows(vocab), tokens) * vocab * (b + 12) + tokens * h * (b + 4)  # a chunk's logits, softmax, gradient; rows gathered
    else:
        logits = tokens * vocab * (b + 8 + (4 if b < 4 else 0))  # logits, fp32 log-softmax, fp32 gradient (+ fp32 copy)
    boundaries = len({n.split(".")[3] for n in modules if n.startswith("surgeon.iada.blocks.")})
    iada = tokens * h * 4 * 2 * (boundaries + 1) if boundaries else 0
    return kept + logits + iada


def _delta_bytes(prior: str, params: dict[str, Any], size: Any, biased: set[str], strict: bool) -> tuple[int, int]:
    """Bytes of Δ per process and the biased parameter count, from the prior's surgeon.json:
    Δ is held for the parameters named in ``biased`` (the trained ones; with LoRA the adapted
    weights), per-expert Δ of fused experts once per fused parameter. ``strict``: a prior
    tensor the model lacks is an error."""
    from surgeon.anatomy.experts import fused_groups

    record = _prior_record(prior)
    stats = record.get("stats", {})
    dtype = (record.get("config") or {}).get("dtype") or "fp32"
    try:
        nbytes = dtypes.nbytes(str(dtype))
    except ConfigError:
        nbytes = 4
    rels = [str(entry.get("relative")) for entry in (stats.get("tensors") or {}).values()]
    fused = fused_groups([r for r in rels if r not in params], params)
    covered = {r for experts in fused.values() for group in experts.values() for r in group}
    if strict and (lacking := [r for r in rels if r not in params and r not in covered]):
        raise ConfigError("prior", f"{prior} has Δ for {lacking[0]}, which this model lacks", "use a prior made for this model")
    held = [r for r in [*rels, *fused] if r in params and r in biased]
    return sum(size(params[r], nbytes) for r in held), sum(params[r].numel() for r in held)


def _prior_record(prior: str) -> dict:
    from surgeon.hub.repo_ids import REPO_ID
    from surgeon.io.provenance import FILE_NAME

    path = Path(prior)
    if path.is_dir():
        file = path / FILE_NAME
    elif REPO_ID.match(prior):
        from surgeon.hub.download import download_file

        file = Path(download_file(prior, FILE_NAME))
    else:
        raise ConfigError("prior", f"{prior}: no such prior folder", "give a folder written by surgeon prior")
    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError("prior", f"{prior} has no readable surgeon.json", "give a folder written by surgeon prior") from None
    if not isinstance(record, dict) or record.get("artifact") != "prior":
        raise ConfigError("prior", f"{prior} is not a prior", "give a folder written by surgeon prior")
    return record


def device_budget(given: str | None, device: Any, processes: int) -> tuple[int, str] | None:
    """The memory one process may use, and where the figure comes from: ``--gpu-memory``, the
    GPU's memory, or on the CPU the memory available to this machine's processes (None when
    unknown)."""
    from surgeon.io.output import parse_size

    if given:
        return parse_size(given, "gpu_memory"), "budget (--gpu-memory)"
    if device.type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"of {props.name} ({device})"
    available = _mem_available()
    if available is None:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes) or processes)
    return available // max(local, 1), f"available per process on this machine ({local} process{'es' if local != 1 else ''})"


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def runtime_bytes(device: str) -> int:
    """The framework's own memory: on a GPU surgeon's allowance for the CUDA context and
    workspaces; on the CPU what this process holds now, with torch and transformers imported
    (measured, as the run's process will hold it before it loads the model)."""
    if device != "cpu":
        return RUNTIME_BYTES.get(device, RUNTIME_BYTES["cuda"])
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return RUNTIME_BYTES["cpu"]


def plan_device(config: TrainConfig) -> str:
    """The device a run of ``config`` started here would use: a GPU when there is one (or when
    ``--gpu-memory`` says the plan is for one), else the CPU."""
    import torch

    return "cuda" if config.gpu_memory or torch.cuda.is_available() else "cpu"


def plan_for(config: TrainConfig, processes: int, device: str | None = None) -> MemoryPlan:
    """``surgeon train --dry-run``: the plan from ``config.model``'s config.json alone (a folder
    holding just a config works; for a Hub id only config.json is fetched), for the device the run
    would use (``plan_device``; bf16 on a GPU that has it, fp32 on the CPU, unless
    ``--mixed-precision`` says otherwise), checked against ``--gpu-memory`` if given."""
    device = device or plan_device(config)
    from surgeon.hub.sources import open_config
    from surgeon.io.output import parse_size
    from surgeon.training.config import resolve_precision

    from surgeon.anatomy.limits import check_config

    model_config = open_config(config.model)
    check_config(model_config, config.model)
    precision = resolve_precision(config, bf16_ok=device == "cuda")
    budget = parse_size(config.gpu_memory, "gpu_memory") if config.gpu_memory else None
    return plan_memory(config, model_config, processes, config.fsdp, precision, device, budget, "budget (--gpu-memory)" if budget else "")
