"""The model card (``README.md``) of a surgeon output folder, built from its ``surgeon.json``.

    text = build_card("merged/", "me/qwen-vl-ties")     # YAML metadata, then Markdown

Metadata: ``base_model`` (Hub ids of the inputs only, never local paths: the VLM and, for priors
and merges, the reasoning LLMs), ``base_model_relation`` where one applies (merge, adapter,
finetune), ``library_name`` (transformers for models, peft for adapters), ``pipeline_tag``,
``tags`` (``surgeon`` plus the method), ``datasets`` (Hub datasets it was trained on) and
``license`` (when the base inputs' cards all name the same one).
Body: what the artifact is, a loading snippet that is correct for what the folder holds, the
inputs, the method's settings, training data and metrics, and the statistics surgeon computed.
An input counts as a Hub repo only when ``surgeon.json`` recorded a revision or commit for it.
The YAML is written by huggingface_hub's ModelCardData through ``surgeon.hub.client.render_card``
(the one place that imports the Hub client).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgeon.hub.repo_ids import DATASET, REPO_ID
from surgeon.publish.markdown import flatten, stats_markdown, table
from surgeon.io.header import tensor_names
from surgeon.io.provenance import is_local_path, local_name, read_record

_BASE_ROLES = {"prior": ("vlm", "reasoning"), "merge": ("vlm", "reasoning")}
_MODEL_ROLES = ("model", "vlm", "base")
_HIDDEN_CONFIG = {"output", "output_dir", "out", "overwrite", "push_to_hub", "workdir", "token", "shard_size"}


# ---------------------------------------------------------------------------- inputs


def _entries(record: dict, role: str) -> list[dict]:
    value = (record.get("inputs") or {}).get(role)
    items = value if isinstance(value, list) else [value] if value is not None else []
    return [i if isinstance(i, dict) else {"source": str(i)} for i in items]


def hub_id(entry: dict) -> str | None:
    """The Hub repo id of a recorded input (a dataset's without ``@revision`` and ``:split``), or
    None for a local folder or file."""
    source = str(entry.get("source", ""))
    if not ("commit" in entry or "revision" in entry):
        return None
    if REPO_ID.match(source):
        return source
    if DATASET.match(source):
        return source.partition(":")[0].partition("@")[0]
    return None


def _base_entries(record: dict) -> list[dict]:
    """The recorded inputs the output is based on: the VLM (+ reasoning LLMs for priors and merges)."""
    roles = _BASE_ROLES.get(record.get("command", ""))
    if roles is None:
        roles = next(((r,) for r in _MODEL_ROLES if _entries(record, r)), ())
    return [e for role in roles for e in _entries(record, role)]


def base_repo_ids(record: dict) -> list[str]:
    """``base_model`` of the card: Hub ids of the VLM (+ reasoning LLMs for priors and merges)."""
    return list(dict.fromkeys(i for e in _base_entries(record) if (i := hub_id(e))))


def carried_license(record: dict) -> str | None:
    """The ``license`` every base input's card names, when they all name the same one."""
    licenses = {e.get("license") for e in _base_entries(record)}
    return licenses.pop() if len(licenses) == 1 and None not in licenses else None


def _relation(record: dict) -> str | None:
    artifact, command = record.get("artifact"), record.get("command")
    if artifact == "peft-adapter":
        return "adapter"
    if command == "merge":
        return "merge"
    if command == "train" and artifact in ("model", "model+remote-code"):
        return "finetune"
    return None


_COMMAND_METHODS = {  # records written before methods were recorded: what the command always does
    "prior": ["drift", "reasoning-prior"],
    "inject-iada": ["iada"],
    "score-heads": ["image-lora", "head-scores"],
}


def method_tags(record: dict) -> list[str]:
    """Tags naming the methods the run applied, as its record lists them (``methods``)."""
    methods = record.get("methods")
    if isinstance(methods, list):
        return [str(m) for m in methods]
    command = record.get("command", "")
    if command == "merge" and (record.get("config") or {}).get("method"):
        return ["merge", str(record["config"]["method"])]
    return list(_COMMAND_METHODS.get(command, []))


# ---------------------------------------------------------------------------- the folder


def _json(folder: Path, name: str) -> dict:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_VLM_MODULES = ("language_model.", "visual.", "vision_tower.", "vision_model.", "multi_modal_projector.")


def _is_vlm(folder: Path, record: dict) -> bool:
    """A vision-language model: config.json has a vision sub-config; for an adapter (no
    config.json), the record names a VLM input or its tensors sit under a VLM's module names."""
    config = _json(folder, "config.json")
    if config:
        return any("vision" in k and isinstance(v, dict) for k, v in config.items())
    if _entries(record, "vlm"):
        return True
    names = [n for p in sorted(folder.glob("*.safetensors")) for n in tensor_names(p)]
    return any(m in n for n in names for m in _VLM_MODULES)


def card_metadata(record: dict, folder: str | Path) -> dict:
    """The YAML metadata of the card (keys with no value are left out)."""
    folder = Path(folder)
    artifact = record.get("artifact")
    bases = base_repo_ids(record)
    meta: dict[str, Any] = {}
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
        if relation := _relation(record):
            meta["base_model_relation"] = relation
    library = {"model": "transformers", "model+remote-code": "transformers", "peft-adapter": "peft"}.get(artifact or "")
    if library:
        meta["library_name"] = library
        meta["pipeline_tag"] = "image-text-to-text" if _is_vlm(folder, record) else "text-generation"
    datasets = [i for e in _entries(record, "data") if (i := hub_id(e))]
    if datasets:
        meta["datasets"] = datasets
    if license_ := carried_license(record):
        meta["license"] = license_
    meta["tags"] = list(dict.fromkeys(["surgeon", *method_tags(record)]))
    return meta


# ---------------------------------------------------------------------------- loading snippets


def _code(lang: str, *lines: str) -> str:
    return f"```{lang}\n" + "\n".join(lines) + "\n```"


def load_snippet(record: dict, folder: str | Path, repo_id: str) -> str:
    """Markdown: how to load what the folder holds, with ``repo_id`` as its Hub id."""
    folder = Path(folder)
    artifact = record.get("artifact")
    names = {p.name for p in folder.iterdir()}
    vlm = _is_vlm(folder, record)
    if artifact in ("model", "model+remote-code"):
        remote = artifact == "model+remote-code"
        auto_map = _json(folder, "config.json").get("auto_map") or {}
        preferred = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")
        auto = next((a for a in preferred if a in auto_map), next((a for a in auto_map if a.startswith("AutoModel")), None))
        auto = auto or ("AutoModelForImageTextToText" if vlm else "AutoModelForCausalLM")
        has_proc = bool(names & {"processor_config.json", "preprocessor_config.json"})
        has_tok = bool(names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"})
        pre = "AutoProcessor" if vlm and has_proc else "AutoTokenizer" if has_tok else None
        extra = ", trust_remote_code=True" if remote else ""
        lines = [f"from transformers import {auto}" + (f", {pre}" if pre else ""), ""]
        lines.append(f'model = {auto}.from_pretrained("{repo_id}", dtype="auto"{extra})')
        if pre:
            lines.append(f'{"processor" if pre == "AutoProcessor" else "tokenizer"} = {pre}.from_pretrained("{repo_id}"{extra})')
        text = _code("python", *lines)
        if remote:
            code = sorted(n for n in names if n.endswith(".py"))
            text += (
                f"\n\nThe model's extra modules are defined in this repo's code ({', '.join(f'`{c}`' for c in code) or 'its .py files'}), "
                "so loading needs `trust_remote_code=True`; read that code before you run it."
            )
        return text
    if artifact == "peft-adapter":
        bases = base_repo_ids(record)
        adapter_base = str(_json(folder, "adapter_config.json").get("base_model_name_or_path") or "")
        base = bases[0] if bases else adapter_base if REPO_ID.match(adapter_base) else None
        auto = "AutoModelForImageTextToText" if vlm else "AutoModelForCausalLM"
        pre = "AutoProcessor" if vlm else "AutoTokenizer"
        shown = base or "BASE_MODEL"
        text = _code(
            "python",
            "from peft import PeftModel",
            f"from transformers import {auto}, {pre}",
            "",
            f'base = {auto}.from_pretrained("{shown}", dtype="auto")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'{"processor" if vlm else "tokenizer"} = {pre}.from_pretrained("{shown}")',
        )
        if base is None:
            text += "\n\n`BASE_MODEL`: the adapter was trained on a local model folder; load the same weights (see its fingerprint under Inputs)."
        if "surgeon-modules.safetensors" in names:  # IADA / Image-LoRA weights trained beside the adapter
            text = (
                "The adapter was trained together with surgeon modules (IADA / Image-LoRA) whose weights "
                "are in `surgeon-modules.safetensors`; plain peft does not load those, so load it with surgeon "
                "(`pip install surgeon`), which attaches the base, the trained modules and the adapter:\n\n"
                + _code("python", "import surgeon", "", f'model = surgeon.load_model("{repo_id}")')
                + "\n\nWith peft alone (the LoRA adapter on the base model, without the trained modules):\n\n"
                + text
            )
        return text
    if artifact == "prior":
        vlm_ids = [i for e in _entries(record, "vlm") if (i := hub_id(e))]
        target = f"`{vlm_ids[0]}`" if vlm_ids else "the VLM it was computed for"
        return (
            "This is not a model to run: it holds the prior Δ for the language-model tensors of "
            f"{target}, under that model's tensor names. Fine-tune the VLM with it through "
            "`surgeon train` (DRIFT; see `surgeon train --help`), or read it tensor by tensor:\n\n"
            + _code(
                "python",
                "from surgeon.drift.prior import open_prior",
                "",
                f'prior = open_prior("{repo_id}")',
            )
        )
    if artifact == "head-scores":
        others = [n for n in sorted(names) if n.endswith(".json") and n != "surgeon.json"]
        scores = "heads.json" if "heads.json" in names or not others else others[0]
        return _code(
            "python",
            "import json",
            "from huggingface_hub import hf_hub_download",
            "",
            f'heads = json.load(open(hf_hub_download("{repo_id}", "{scores}")))',
        )
    return "See `surgeon.json` in this repo for what this folder holds."


# ---------------------------------------------------------------------------- what it is


def _link(repo: str, kind: str = "") -> str:
    return f"[{repo}](https://huggingface.co/{kind}{repo})"


def _source(entry: dict, dataset: bool = False) -> str:
    repo = hub_id(entry)
    if repo:
        return _link(repo, "datasets/" if dataset else "")
    source = str(entry.get("source", "?"))
    shown = local_name(source).removeprefix("local ") if is_local_path(source) else source
    return f"local `{shown}`"


def _about_prior(record: dict) -> str:
    return (
        "A **DRIFT reasoning prior** ([arXiv 2510.15050](https://arxiv.org/abs/2510.15050)): "
        "Δ = θ(reasoning LLM) − θ(VLM) for the VLM's language-model tensors. DRIFT does not merge Δ "
        "into the weights: it keeps Δ fixed and, during supervised fine-tuning of the VLM, bends each "
        "gradient toward it. The statistics below (per-layer ‖Δ‖, relative distance, cosine) show how "
        "far apart the two models are."
    )


def _about_merge(record: dict) -> str:
    from surgeon.merge import METHODS, NOTATION

    name = str((record.get("config") or {}).get("method") or "")
    method = METHODS.get(name)
    if method is None:
        rule = f"surgeon's `{name}` method" if name else "a weight merge"
        title = name or "weight"
    else:
        cite = f" ({method.reference})" if method.reference else ""
        rule, title = f"θ = {method.summary}{cite}, where {NOTATION[0].lower()}{NOTATION[1:]}", method.title or method.name
    return (
        f"A **{title} merge** of a VLM's language model with reasoning LLM(s): {rule} "
        "Only language-model tensors change; the vision tower, the projector and every tensor the LLM "
        "lacks are the VLM's own."
    )


def _about_iada(record: dict) -> str:
    return (
        "A VLM with **IADA** blocks (input-adaptive depth aggregation, "
        "[arXiv 2603.26330](https://arxiv.org/abs/2603.26330)): at layer-block boundaries a low-rank, "
        "modality-aware query retrieves from the token's hidden states at earlier boundaries and adds "
        "the result through a gated residual. The gates start at zero, so until it is trained this "
        "model computes exactly what its base computes. The block design is surgeon's reconstruction "
        "from the paper's abstract (no public code)."
    )


def _about_train(record: dict) -> str:
    tags = method_tags(record)
    parts = {
        "drift": "DRIFT gradient steering toward a reasoning prior ([arXiv 2510.15050](https://arxiv.org/abs/2510.15050))",
        "iada": "IADA depth-aggregation blocks ([arXiv 2603.26330](https://arxiv.org/abs/2603.26330))",
        "image-lora": "Image-LoRA: LoRA on value projections at visual tokens of selected heads ([arXiv 2512.19219](https://arxiv.org/abs/2512.19219))",
        "lora": "LoRA",
        "perception-reweighting": "perception/reasoning loss reweighting ([arXiv 2605.29496](https://arxiv.org/abs/2605.29496))",
    }
    config = record.get("config") or {}
    if config.get("merge_lora"):
        parts["lora"] = "LoRA, merged into the weights"
    used = [parts[t] for t in tags if t in parts]
    if config.get("full"):
        used.insert(0, "full fine-tuning of the language model")
    kind = "An adapter" if record.get("artifact") == "peft-adapter" else "A model"
    how = "; ".join(used) if used else "full fine-tuning"
    return f"{kind} fine-tuned with `surgeon train`: {how}."


def _about_heads(record: dict) -> str:
    return (
        "**Image-LoRA head influence scores** ([arXiv 2512.19219](https://arxiv.org/abs/2512.19219)) "
        "for every KV head of the VLM, and the heads selected under a global budget. An Image-LoRA "
        "adapter trains only the selected heads, at visual-token positions only."
    )


_ABOUT: dict[str, Callable[[dict], str]] = {
    "prior": _about_prior,
    "merge": _about_merge,
    "inject-iada": _about_iada,
    "train": _about_train,
    "score-heads": _about_heads,
}


def _shown_path(value: Any) -> Any:
    """A local absolute path as ``local `name```, anything else unchanged."""
    if isinstance(value, str) and is_local_path(value):
        return f"local `{local_name(value).removeprefix('local ')}`"
    return value


def _settings(config: dict) -> str:
    rows = []
    for key, value in flatten(config).items():
        if key.split(".")[0] in _HIDDEN_CONFIG:
            continue
        if isinstance(value, list):
            value = [_shown_path(v) for v in value]
        value = _shown_path(value)
        rows.append([f"`{key}`", value])
    return table(["setting", "value"], rows) if rows else "Defaults only."


def _inputs(record: dict) -> str:
    rows = []
    for role in record.get("inputs") or {}:
        for e in _entries(record, role):
            commit = str(e.get("commit") or "")[:10]
            revision = e.get("revision")
            rev = f"{revision} ({commit})" if revision and commit else revision or commit or "—"
            fingerprint = str(e.get("fingerprint") or "—")
            rows.append([role, _source(e, role == "data"), rev, fingerprint[:23] + ("…" if len(fingerprint) > 23 else "")])
    return table(["role", "source", "revision", "fingerprint"], rows)


def _training(record: dict) -> str:
    data = _entries(record, "data")
    lines = ["Data: " + (", ".join(_source(e, True) for e in data) if data else "not recorded") + "."]
    stats = record.get("stats") or {}
    metrics = stats.get("final") or stats.get("metrics")  # surgeon train: the last logged step
    if isinstance(metrics, dict) and metrics:
        lines.append(stats_markdown(metrics))
    return "\n\n".join(lines)


def card_body(record: dict, folder: str | Path, repo_id: str) -> str:
    """The Markdown body of the card."""
    command = record.get("command", "?")
    about = _ABOUT.get(command, lambda r: f"Made by `surgeon {command}`.")(record)
    stats = {k: v for k, v in (record.get("stats") or {}).items() if not (command == "train" and k in ("metrics", "final"))}
    libs = ", ".join(f"{k} {v}" for k, v in (record.get("libraries") or {}).items() if v)
    sections = [
        f"# {repo_id.split('/')[-1]}",
        about,
        "## How to load\n\n" + load_snippet(record, folder, repo_id),
        "## Inputs\n\n" + _inputs(record),
        "## Settings\n\n" + _settings(record.get("config") or {}),
    ]
    if command == "train":
        sections.append("## Training\n\n" + _training(record))
    if stats:
        sections.append("## Statistics\n\n" + stats_markdown(stats))
    sections.append(
        f"## Provenance\n\nMade with surgeon {record.get('surgeon_version', '?')} (`surgeon {command}`)"
        + (f" on {record['created']}" if record.get("created") else "")
        + (f", with {libs}" if libs else "")
        + ". The full record, with every resolved setting and input fingerprint, is `surgeon.json` in this repo."
    )
    return "\n\n".join(sections) + "\n"


# What the Hub's blank model-card template says before anyone fills it in (peft's save_pretrained
# and transformers' Trainer write it, with local paths in its metadata).
_TEMPLATE_MARKS = ("<!-- Provide a quick summary of what the model is/does. -->", "[More Information Needed]")


def is_template_card(text: str) -> bool:
    """Whether a README.md is a library-written placeholder (peft's blank template, or the loading
    note surgeon writes beside an adapter with modules) rather than a user's card."""
    return all(mark in text for mark in _TEMPLATE_MARKS) or text.startswith("<!-- written by surgeon:")


def build_card(folder: str | Path, repo_id: str, record: dict | None = None) -> str:
    """The complete README.md text for ``folder`` published as ``repo_id``."""
    from surgeon.errors import CheckpointError
    from surgeon.hub.client import render_card

    record = record if record is not None else read_record(folder)
    if record is None:
        raise CheckpointError(str(folder), "has no surgeon.json to build a model card from", "write README.md yourself")
    return render_card(card_metadata(record, folder), card_body(record, folder, repo_id))
