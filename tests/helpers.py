"""Plain helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import shlex
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch


def assert_one_line_error(result, *fragments: str) -> None:
    """A failed command: exit 1, one ``Error:`` line on stderr naming the fragments, no traceback
    (``surgeon train``'s status lines may come before it)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if not re.match(r"surgeon [a-z-]+: ", line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_surgeon(args: list[str], nproc: int = 1, threads: int = 1, timeout: float = 600, env: dict | None = None):
    """``surgeon ARGS`` in fresh processes: ``nproc`` ranks under torchrun (gloo on the CPU) or,
    for ``nproc == 1``, one plain process. Every side runs with ``threads`` intra-op threads, so
    that runs compared with each other reduce in the same order (equivalence tests compare like
    with like). Returns the CompletedProcess; SURGEON_DEBUG=1 keeps tracebacks in its stderr."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SURGEON_DEBUG": "1", **(env or {})}
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    else:
        launch = [sys.executable]
    cmd = [*launch, "-m", "surgeon.cli", *[str(a) for a in args]]
    return subprocess.run(cmd, check=False, env=full_env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- model inputs
def image(seed: int, size: tuple[int, int] = (28, 28)):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_batch(folder, images_per_sample=(2, 1)):
    """A left-padded batch of chat prompts with several images per sample, built by the real processor."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(folder)
    proc.tokenizer.padding_side = "left"
    texts, images = [], []
    for i, n in enumerate(images_per_sample):
        content = [{"type": "image"}] * n + [{"type": "text", "text": "What color is the largest shape?"}]
        texts.append(proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.append([image(10 * i + j, (28 + 28 * (j % 2), 28)) for j in range(n)])
    return dict(proc(text=texts, images=images, return_tensors="pt", padding=True))


def text_batch():
    return {"input_ids": torch.randint(20, 400, (2, 12), generator=torch.Generator().manual_seed(0))}


def randomise(model, seed: int = 0, scale: float = 0.5, kind: str | None = None) -> None:
    """Stand-in for training: every surgeon module parameter (of ``kind``, or all) random and non-zero."""
    from surgeon.modules.folders import module_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module_parameters(model, kind).values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


# ------------------------------------------------------------- loading without surgeon installed
REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = json.loads(sys.argv[2])
    try:
        import surgeon
        sys.exit("surgeon is importable")
    except ImportError:
        pass
    import torch, transformers
    from safetensors.torch import load_file, save_file
    for job in json.load(open(sys.argv[1])):
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["folder"], trust_remote_code=True).eval()
        assert type(model).__name__.startswith("Surgeon"), type(model)
        assert "surgeon" not in sys.modules
        with torch.no_grad():
            out = model(**load_file(job["inputs"])).logits
        save_file({"logits": out.contiguous()}, job["output"])
    print("ok")
    """
)


def run_without_surgeon(jobs: list[dict], tmp_path: Path) -> None:
    """Load each folder with trust_remote_code in ``python -I -S`` whose path holds the dependencies
    (torch, transformers) but neither the source tree nor surgeon's editable install."""
    import transformers

    deps = sorted({str(Path(transformers.__file__).parents[1]), str(Path(torch.__file__).parents[1])})
    assert not any((Path(d) / "surgeon").exists() for d in deps)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "remote.py").write_text(REMOTE)
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "remote.py"), str(tmp_path / "jobs.json"), json.dumps(deps)],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())},  # like with like
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ------------------------------------------------------------------- push: recorded inputs, files
TOKEN = "hf_surgeonStandInToken0123456789abcdefXY"
VLM = {"source": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "main", "commit": "a" * 40, "fingerprint": "sha256:" + "1" * 64}
LLM = {"source": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "revision": "main", "commit": "b" * 40, "fingerprint": "sha256:" + "2" * 64}
BASE = {"source": "Qwen/Qwen2-0.5B-Instruct", "revision": "main", "commit": "c" * 40, "fingerprint": "sha256:" + "3" * 64}
REMOTE_CODE = '''from transformers import Qwen2ForCausalLM


class TinyIadaForCausalLM(Qwen2ForCausalLM):
    """Stands for a model class shipped with the checkpoint."""
'''


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def trl_rows(data: Path, limit: int | None = None):
    """The samples of ``data`` (a TRL-layout JSONL) as a ``datasets.Dataset`` with a decoded Image
    column, as TRL's vision datasets come."""
    import json

    from datasets import Dataset
    from PIL import Image

    from surgeon.data.rows import open_rows

    source = open_rows(data)
    records = []
    for i in range(len(source) if limit is None else min(limit, len(source))):
        r = source.record(i)
        paths = [p["image"] for m in r["messages"] for p in (m["content"] if isinstance(m["content"], list) else []) if p.get("type") == "image"]
        for m in r["messages"]:
            if isinstance(m["content"], list):
                m["content"] = [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]
        records.append({"messages": json.dumps(r["messages"]), "images": [Image.open(data.parent / p).convert("RGB") for p in paths]})
    return Dataset.from_list(records).map(lambda r: {"messages": json.loads(r["messages"])})


def help_examples(cli) -> list[list[str]]:
    """Every command's help examples, as argument lists (without the leading ``surgeon``)."""
    from surgeon.cli import main

    found = []
    for name in sorted(main.commands):
        lines = cli(name, "--help").output.rstrip().splitlines()
        start = max(i for i, line in enumerate(lines) if line.strip() == "Example:")
        found += [shlex.split(line.strip())[1:] for line in lines[start + 1 :]]
    return found


BLOCK_TORCH = r"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "accelerate", "datasets"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Blocked())
from surgeon.cli import main
main(sys.argv[1:])
"""


def run_without_torch(args: list[str]) -> subprocess.CompletedProcess:
    """``surgeon ARGS`` in a fresh interpreter where torch, transformers, peft, accelerate and
    datasets cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *map(str, args)], capture_output=True, text=True, check=False, timeout=120)
