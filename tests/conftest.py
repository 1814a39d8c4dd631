"""Shared fixtures: tiny real checkpoints built once per session, offline Hub, temporary HF_HOME."""

from __future__ import annotations

import os
import shutil
import tempfile

# Before anything imports huggingface_hub or transformers: never touch the network or ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="surgeon-test-hf-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("SURGEON_DEBUG", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """Each test gets its own empty HF_HOME and offline mode, in the env and in hub constants."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield home


class TinyModels:
    """Builds tiny checkpoints on first use and hands out their (read-only) folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple, Path] = {}

    def __call__(self, family: str, seed: int = 0, **text) -> Path:
        from surgeon.demo import tiny

        key = (family, seed, tuple(sorted(text.items())))
        if key not in self._built:
            name = "-".join([family, str(seed)] + [f"{k}{v}" for k, v in sorted(text.items())])
            self._built[key] = tiny.build(family, self.root / name, seed=seed, **text)
        return self._built[key]

    def memory_layout(self, family: str) -> Path:
        """The same weights saved under the in-memory (transformers >= 4.52) tensor names."""
        key = ("memory-layout", family)
        if key not in self._built:
            self._built[key] = resave_with_memory_names(self(family), self.root / f"{family}-memory-layout")
        return self._built[key]


def resave_with_memory_names(src: Path, dst: Path) -> Path:
    """Load with transformers and write ``state_dict()`` as is: the other on-disk layout."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from surgeon.io.safetensors import write_file

    shutil.copytree(src, dst)
    cfg = AutoConfig.from_pretrained(src)
    auto = AutoModelForImageTextToText if hasattr(cfg, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    write_file(dst / "model.safetensors", state, {"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def vlm(tiny_models) -> Path:
    """A tiny Qwen2.5-VL (legacy on-disk layout) with its processor."""
    return tiny_models("qwen2_5_vl")


@pytest.fixture(scope="session")
def llm(tiny_models) -> Path:
    """A tiny Qwen2 LLM whose language model matches ``vlm``'s."""
    return tiny_models("qwen2", seed=1)


@pytest.fixture
def hub_standin(monkeypatch):
    """A local stand-in of the Hub's API (``surgeon.demo.hub_standin``) that the real client talks to,
    for uploads and downloads: HF_ENDPOINT points at it, offline mode is off, Xet is off, no token
    is set."""
    from huggingface_hub import constants

    from surgeon.demo.hub_standin import HubStandIn

    with HubStandIn() as standin:
        template = standin.url + "/{repo_id}/resolve/{revision}/{filename}"  # downloads: computed from the endpoint at import
        for name, value in (("ENDPOINT", standin.url), ("HUGGINGFACE_CO_URL_TEMPLATE", template), ("HF_HUB_OFFLINE", False), ("HF_HUB_DISABLE_XET", True)):
            monkeypatch.setattr(constants, name, value)
        for name, value in (("HF_ENDPOINT", standin.url), ("HF_HUB_OFFLINE", "0"), ("HF_HUB_DISABLE_XET", "1")):
            monkeypatch.setenv(name, value)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        import datasets.config as datasets_config  # datasets reads the endpoint and offline mode at import

        for name, value in (("HF_ENDPOINT", standin.url), ("HF_HUB_OFFLINE", False), ("HF_DATASETS_OFFLINE", False),
                            ("HUB_DATASETS_URL", standin.url + "/datasets/{repo_id}/resolve/{revision}/{path}")):  # fmt: skip
            monkeypatch.setattr(datasets_config, name, value)
        import transformers.utils.hub as transformers_hub

        if hasattr(transformers_hub, "_hf_api"):  # transformers' shared HfApi keeps the endpoint it was made with
            monkeypatch.setattr(transformers_hub, "_hf_api", None)
        yield standin


@pytest.fixture
def cli():
    """Invoke the real ``surgeon`` entry point in-process; returns the click Result."""
    from click.testing import CliRunner

    from surgeon.cli import main

    runner = CliRunner()

    def run(*args: str, **kw):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)

    return run


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """The synthetic dataset of ``surgeon.demo.synthetic`` (12 samples, seed 0): ``fmt -> data.jsonl``."""
    from surgeon.demo.synthetic import make_dataset

    root = tmp_path_factory.mktemp("shapes-data")
    made: dict[str, Path] = {}

    def get(fmt: str = "trl") -> Path:
        if fmt not in made:
            made[fmt] = make_dataset(root / fmt, n=12, seed=0, fmt=fmt)
        return made[fmt]

    return get


@pytest.fixture(scope="session")
def data(shapes_data) -> Path:
    """The synthetic dataset in TRL's ``messages`` format (``data.jsonl``)."""
    return shapes_data("trl")


# ---------------------------------------------------------------- output folders for push tests
def _copy_configs(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if not p.name.endswith(".safetensors"):
            shutil.copy(p, dst / p.name)


@pytest.fixture(scope="session")
def outputs(tiny_models, tmp_path_factory):
    """Output folders as surgeon commands write them, each with its surgeon.json; kind -> folder."""
    import json

    from helpers import BASE, LLM, REMOTE_CODE, VLM
    from safetensors.torch import load_file

    from surgeon.io.output import ShardedWriter, TensorSpec
    from surgeon.io.provenance import build_record, write_record
    from surgeon.io.safetensors import DTYPE_CODES, write_file

    root = tmp_path_factory.mktemp("outputs")
    vlm, llm = tiny_models("qwen2_5_vl"), tiny_models("qwen2", seed=1)
    made = {}

    merge = root / "merge"
    merge.mkdir()  # a model in several safetensors shards + index
    _copy_configs(vlm, merge)
    tensors = load_file(vlm / "model.safetensors")
    specs = [TensorSpec(n, DTYPE_CODES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(merge, specs, shard_size=sum(s.nbytes for s in specs) // 2 + 1) as w:
        for name, t in tensors.items():
            w.write(name, t)
    config = {"method": "ties", "weight": 0.5, "density": 0.2, "seed": 0, "output": "merge"}
    write_record(merge, build_record("merge", "model", config, {"vlm": VLM, "reasoning": [LLM]}, {"tensors_merged": len(tensors)}))
    made["merge"] = merge

    prior = root / "prior"  # Δ tensors under the VLM's names, not a model
    prior.mkdir()
    deltas = {n: t[:2].clone() for n, t in tensors.items() if ".layers.0.mlp." in n}
    assert deltas
    write_file(prior / "prior.safetensors", deltas, {"format": "pt"})
    layers = [{"layer": i, "family": f, "delta_norm": 0.5 + i, "relative": 0.01 * i, "cosine": 0.98} for i in range(4) for f in ("attn", "mlp")]
    write_record(prior, build_record("prior", "prior", {"normalize": True, "families": ["attn", "mlp"]}, {"vlm": VLM, "reasoning": LLM}, {"tensors": len(deltas), "layers": layers}))
    made["prior"] = prior

    adapter = root / "adapter"  # a real peft LoRA adapter; peft records the base's local path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llm), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llm)
    train = {"method": "lora", "lora_rank": 2, "steps": 3, "drift": {"alpha": 1.0, "rule": "adaptive_cosine"}, "perception_weight": 0.3}
    data = {"source": "data/train.jsonl", "fingerprint": "sha256:" + "4" * 64}
    stats = {"final_loss": 1.25, "metrics": {"loss": 1.25, "perception_loss": 0.8, "steps": 3}}
    inputs = {"model": BASE, "prior": {"source": "my-prior", "fingerprint": "sha256:5"}, "data": data}
    write_record(adapter, build_record("train", "peft-adapter", train, inputs, stats, methods=("drift", "lora", "perception-reweighting")))
    made["adapter"] = adapter

    remote = root / "remote-code"  # a model whose class ships as code in the folder
    remote.mkdir()
    _copy_configs(llm, remote)
    shutil.copy(llm / "model.safetensors", remote / "model.safetensors")
    (remote / "modeling_tiny_iada.py").write_text(REMOTE_CODE)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny_iada.TinyIadaForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg, indent=2))
    iada = {"block_size": 2, "rank": 4, "depth": None, "mode": "adaptive", "gate": "channel"}
    write_record(remote, build_record("inject-iada", "model+remote-code", iada, {"model": BASE}, {"added_params": 1234}))
    made["remote-code"] = remote
    return made, {"vlm": vlm, "llm": llm}


@pytest.fixture
def folder(outputs, tmp_path):
    """A fresh copy of one output folder (tests may damage it)."""

    def copy(kind: str) -> Path:
        dst = tmp_path / kind
        shutil.copytree(outputs[0][kind], dst)
        return dst

    return copy
