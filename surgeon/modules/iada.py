"""IADA: input-adaptive depth aggregation blocks, injected into a saved model or a loaded one.

    result = inject_iada("Qwen/Qwen3-VL-2B-Instruct", "qwen3-vl-iada", IadaConfig())
    result.plan.params                    # 139,264 with the defaults on Qwen3-VL-2B
    plan = inject_iada("./my-vlm", dry_run=True).plan       # from config.json alone
    add_iada(model, IadaConfig(block_size=4))               # a model already in memory

The maths (docs/methods.md §3, a reconstruction: the paper's code is not public) lives in
``surgeon/modules/modeling_surgeon.py``, the file that is also shipped into the output folder, so the
folder loads with ``trust_remote_code=True`` without surgeon and with ``surgeon.load_model``.

The output folder hard-links the unchanged weight files (copies across filesystems; a lone
``model.safetensors`` as ``model-00001-of-00001.safetensors``, so that transformers reads the index), adds the IADA
tensors in their own shard ``surgeon-iada.safetensors`` listed in ``model.safetensors.index.json``,
and records the settings in ``config.json`` under ``"surgeon": {"iada": …}`` plus ``auto_map``.
At initialisation the gate is 0, so the model computes exactly what the input model computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from surgeon.modules import modeling_surgeon as modeling
from surgeon.hub.repo_ids import REPO_ID
from surgeon.hub.sources import open_checkpoint, open_config
from surgeon.errors import CheckpointError, ConfigError, LayoutError
from surgeon.anatomy.layout import config_value, detect_layout, placeholder_token_ids
from surgeon.io.output import check_output, output_folder
from surgeon.io.provenance import build_record, write_record
from surgeon.modules.folders import module_shard, write_beside

KIND = "iada"
SHARD = module_shard(KIND)
PREFIX = f"{modeling.MODULE_ATTR}.{KIND}."


@dataclass(frozen=True)
class IadaConfig:
    """IADA settings (docs/methods.md §3). The paper publishes only its abstract: the defaults S=7,
    r=4, n_d=all, adaptive, per-channel gate are surgeon's, chosen to give its 0.14M parameters
    on Qwen3-VL-2B.

    block_size: S, a boundary after every S decoder layers (after layer b·S for b = 1…⌊L/S⌋).
    rank: r of the per-modality low-rank query D (r×d) and U (d×r).
    depth: n_d, how many previous boundaries (boundary 0 = embedding output) each one reads;
        None (or "all") = all.
    mode: "adaptive" (input-dependent weights over depth) or "fixed" (learned input-independent
        depth logits per boundary, the paper's diagnostic baseline).
    gate: "channel" (g ∈ R^d) or "scalar" (g ∈ R).
    seed: seed for D's random init (not specified by the paper; surgeon default 0).

    Not specified by the paper (surgeon defaults, fixed): D ~ N(0, 1/d) so that u has unit scale,
    RMS epsilon 1e-6, the cached state at a boundary is the decoder's own output there (before
    that boundary's aggregation), and the aggregation is computed in fp32.
    """

    block_size: int = 7
    rank: int = 4
    depth: int | None = None
    mode: Literal["adaptive", "fixed"] = "adaptive"
    gate: Literal["channel", "scalar"] = "channel"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.depth, str):
            if self.depth.strip().lower() == "all":
                object.__setattr__(self, "depth", None)
            elif self.depth.strip().isdigit():
                object.__setattr__(self, "depth", int(self.depth))
            else:
                raise ConfigError("depth", f"{self.depth!r} is neither a number nor all")
        if self.block_size < 1:
            raise ConfigError("block_size", f"must be at least 1, got {self.block_size}")
        if self.rank < 1:
            raise ConfigError("rank", f"must be at least 1, got {self.rank}")
        if self.depth is not None and self.depth < 1:
            raise ConfigError("depth", f"must be at least 1 (or all), got {self.depth}")
        if self.mode not in ("adaptive", "fixed"):
            raise ConfigError("mode", f"must be adaptive or fixed, got {self.mode!r}")
        if self.gate not in ("channel", "scalar"):
            raise ConfigError("gate", f"must be channel or scalar, got {self.gate!r}")


@dataclass(frozen=True)
class Boundary:
    """Boundary ``index`` (1-based) sits after ``after_layers`` decoder layers and reads the
    states of boundaries ``sources`` (0 = the embedding output)."""

    index: int
    after_layers: int
    sources: tuple[int, ...]
    params: int = 0


@dataclass(frozen=True)
class IadaPlan:
    """What an injection adds: boundaries, parameter count, and the settings stored in config.json."""

    source: str
    architecture: str
    num_layers: int
    hidden_size: int
    visual_token_ids: list[int]
    config: IadaConfig
    boundaries: list[Boundary]
    params: int
    settings: dict = field(repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["boundaries"] = [asdict(b) for b in self.boundaries]
        return out


@dataclass(frozen=True)
class IadaResult:
    """A finished injection (``output`` is None for a dry run) and what happened to the files."""

    plan: IadaPlan
    output: str | None
    files: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "output": self.output, "files": self.files}


def plan_boundaries(num_layers: int, block_size: int, depth: int | None = None) -> list[Boundary]:
    """Boundaries after layers S, 2S, …, ⌊L/S⌋·S; boundary b reads the min(n_d, b) before it.

    >>> [b.after_layers for b in plan_boundaries(28, 7)]
    [7, 14, 21, 28]
    """
    count = num_layers // block_size
    n_d = depth or count
    return [
        Boundary(b, b * block_size, tuple(range(b - min(n_d, b), b)))
        for b in range(1, count + 1)
    ]


def plan_iada(
    model_config: dict, config: IadaConfig = IadaConfig(), source: str = "model", replace: bool = False
) -> IadaPlan:
    """Plan an injection from ``config.json`` alone. Raises when there is nothing to inject into."""
    from surgeon.anatomy.limits import check_config

    check_config(model_config, source)
    architecture = (model_config.get("architectures") or [None])[0]
    if not architecture:
        raise CheckpointError(source, "config.json names no architecture", "restore config.json from the model")
    num_layers, hidden, visual = _text_dims(model_config)
    if not isinstance(num_layers, int) or not isinstance(hidden, int):
        raise CheckpointError(source, "config.json lacks the language model's num_hidden_layers or hidden_size")
    existing = (model_config.get(modeling.CONFIG_KEY) or {}).get(KIND)
    if existing and not replace:
        raise CheckpointError(
            source, f"already has IADA blocks (after layers {existing.get('boundaries')})", "pass --replace to replace them"
        )
    auto = model_config.get("auto_map") or {}
    foreign = [k for k, v in auto.items() if not str(v).startswith("modeling_surgeon.")]
    if foreign:
        raise CheckpointError(
            source, f"uses its own remote code (auto_map: {', '.join(foreign)})", "IADA needs a model transformers supports natively"
        )
    if "vision_config" in model_config and not visual:
        raise CheckpointError(
            source,
            "config.json has a vision tower but no image/video placeholder token id",
            "IADA needs image_token_id to find the visual tokens",
        )
    try:
        modeling.auto_map(architecture)
    except modeling.SurgeonModelingError as e:
        raise CheckpointError(source, str(e), "IADA needs an architecture that transformers loads natively") from None
    boundaries = plan_boundaries(num_layers, config.block_size, config.depth)
    if not boundaries:
        raise ConfigError(
            "block_size",
            f"{config.block_size} leaves no boundary in a {num_layers}-layer decoder",
            f"choose a block size of at most {num_layers}",
        )
    settings = iada_settings(config, [b.after_layers for b in boundaries], hidden)
    counts = _count_params(settings)
    boundaries = [Boundary(b.index, b.after_layers, b.sources, n) for b, n in zip(boundaries, counts)]
    return IadaPlan(source, architecture, num_layers, hidden, visual, config, boundaries, sum(counts), settings)


def _text_dims(model_config: dict) -> tuple[object, object, list[int]]:
    """(decoder layers that every input runs through, hidden size, visual token ids), with
    transformers' defaults filled in (LLaVA-style config.json files often omit the text model's
    default sizes). Cross-attention layers (Llama-3.2-Vision) do not count: text-only inputs skip them."""
    from transformers import AutoConfig

    try:
        resolved = AutoConfig.for_model(**model_config)
        text = modeling.text_config_of(resolved)
        cross = len(getattr(text, "cross_attention_layers", None) or ())
        return text.num_hidden_layers - cross, text.hidden_size, modeling.visual_token_ids(resolved)
    except Exception:  # noqa: BLE001 - an unknown model_type or a config transformers rejects: read the JSON
        layers = config_value(model_config, "num_hidden_layers", "n_layer", "num_layers")
        cross = config_value(model_config, "cross_attention_layers") or []
        hidden = config_value(model_config, "hidden_size", "n_embd", "d_model")
        return (layers - len(cross)) if isinstance(layers, int) else layers, hidden, sorted(placeholder_token_ids(model_config).values())


def iada_settings(config: IadaConfig, boundaries: list[int], hidden_size: int) -> dict:
    """The ``config.json`` entry ``surgeon.iada`` (completed with the modeling file's defaults)."""
    # block_size is kept for the record; loading uses the explicit boundaries
    return modeling.check_iada_settings({**asdict(config), "boundaries": boundaries, "hidden_size": hidden_size})


def _count_params(settings: dict) -> list[int]:
    import torch

    with torch.device("meta"):
        module = modeling.IadaModule(settings, None, None, hidden_size=settings["hidden_size"])
    return [sum(p.numel() for p in block.parameters()) for block in module.blocks]


def _initial_tensors(settings: dict) -> dict:
    module = modeling.IadaModule(settings, None, None, hidden_size=settings["hidden_size"])
    return {PREFIX + name: t.detach().contiguous() for name, t in module.state_dict().items()}


def default_output(source: str) -> Path:
    """``MODEL-iada`` beside a local folder; ``./NAME-iada`` for a Hub repo id."""
    path = Path(source).expanduser()
    if not path.exists() and REPO_ID.match(source):
        return Path(source.split("/")[-1] + "-iada")
    return path.parent / (path.resolve().name + "-iada")


def inject_iada(
    source: str,
    output: str | Path | None = None,
    config: IadaConfig = IadaConfig(),
    *,
    revision: str | None = None,
    replace: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
) -> IadaResult:
    """Write ``output`` (default ``default_output(source)``): ``source`` plus IADA blocks at init.

    ``dry_run`` only plans, from config.json alone. ``replace`` allows a source that already has
    IADA blocks (they are dropped). The source folder is never written to.
    """
    source = str(source)
    if dry_run:
        return IadaResult(plan_iada(open_config(source, revision), config, source, replace), None)
    with open_checkpoint(source, revision) as ckpt:
        plan = plan_iada(ckpt.config, config, ckpt.source, replace)
        layout = detect_layout(list(ckpt.tensors), ckpt.config, ckpt.source)
        from surgeon.anatomy.limits import check_weights

        check_weights(ckpt.config, ckpt.tensors, layout, ckpt.source)
        if layout.num_layers != plan.num_layers:
            raise CheckpointError(
                source,
                f"config.json says {plan.num_layers} decoder layers but the weights hold {layout.num_layers}",
                "restore the original config.json",
            )
        out = Path(output) if output is not None else default_output(source)
        check_output(out, overwrite, [ckpt.path])
        sections = {k: v for k, v in (ckpt.config.get(modeling.CONFIG_KEY) or {}).items() if k != KIND}
        sections[KIND] = plan.settings
        with output_folder(out, overwrite) as tmp:
            files = write_beside(ckpt, tmp, {SHARD: _initial_tensors(plan.settings)}, plan.architecture, sections)
            stats = {"boundaries": [asdict(b) for b in plan.boundaries], "params": plan.params, "files": files}
            write_record(tmp, build_record("inject-iada", "model+remote-code", config, {"model": ckpt}, stats, methods=("iada",)))
    return IadaResult(plan, str(out), files)


def add_iada(model: Any, config: IadaConfig = IadaConfig(), replace: bool = False) -> Any:
    """Attach IADA blocks (at init: identity) to a loaded transformers model; returns the module
    (``model.surgeon.iada``). Its parameters are fp32 on the device of decoder layer 0."""
    try:
        _, layers = modeling.decoder_of(model)
    except modeling.SurgeonModelingError as e:
        raise LayoutError(type(model).__name__, str(e)) from None
    container = getattr(model, modeling.MODULE_ATTR, None)
    if isinstance(container, modeling.SurgeonModules) and KIND in container and not replace:
        raise ConfigError("replace", "the model already has IADA blocks", "pass replace=True to replace them")
    boundaries = plan_boundaries(len(layers), config.block_size, config.depth)
    if not boundaries:
        raise ConfigError("block_size", f"{config.block_size} leaves no boundary in a {len(layers)}-layer decoder")
    hidden = modeling.text_config_of(model.config).hidden_size
    return modeling.add_module(model, KIND, iada_settings(config, [b.after_layers for b in boundaries], hidden))
