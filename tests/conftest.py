"""Shared fixtures: tiny real checkpoints built once per session, offline Hub, temporary HF_HOME."""

from __future__ import annotations

import os
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
        yield standin


@pytest.fixture
def cli():
    """Invoke the real ``surgeon`` entry point in-process; returns the click Result."""
    from click.testing import CliRunner

    from surgeon.commands import main

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
