"""What the documentation shows runs as shown: every ``Example:`` line of every command's help, and
the README's Python snippets, on tiny models in a scratch folder, with Hub ids served by the local
Hub stand-in (``surgeon.demo.hub_standin``; the real client talks to it over HTTP).

The help examples name real checkpoints: here ``Qwen/Qwen2.5-VL-7B-Instruct`` is a tiny Qwen2.5-VL
with 28 decoder layers (as the 7B has, so ``--layers 14-27`` means what it says) and
``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B`` a tiny Qwen2 that matches its language model; the local
folders the examples name (``./r1``, ``./my-vlm`` …) and ``data.jsonl`` are made beside them.
Examples on the demo's outputs (``demo/…``) run in test_demo.py, after the demo that makes them.
"""

from __future__ import annotations

import pytest

import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path

from helpers import TOKEN, help_examples, trl_rows

ROOT = Path(__file__).resolve().parent.parent
HUB_VLM = "Qwen/Qwen2.5-VL-7B-Instruct"
HUB_REASONING = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
PRINTED_HUB = "http://127.0.0.1:8999"  # the address the demo's help names for a stand-in already running


def _serve(cli, hub_standin, repo: str, folder: Path) -> None:
    pushed = cli("push", folder, "--repo", repo, "--token", TOKEN)
    assert pushed.exit_code == 0, pushed.output


@pytest.mark.slow
def test_every_help_example_runs(cli, hub_standin, tmp_path, monkeypatch):
    from surgeon.demo import tiny
    from surgeon.demo.synthetic import make_dataset

    models = tmp_path / "models"
    vlm = tiny.build("qwen2_5_vl", models / "qwen2.5-vl", num_hidden_layers=28)
    reasoning = tiny.build_reasoning_llm(vlm, models / "r1", num_hidden_layers=28)
    _serve(cli, hub_standin, HUB_VLM, vlm)
    _serve(cli, hub_standin, HUB_REASONING, reasoning)

    work = tmp_path / "work"
    work.mkdir()
    for name, folder in (("qwen2.5-vl", vlm), ("my-vlm", vlm), ("r1", reasoning)):
        shutil.copytree(folder, work / name)
    tiny.build("qwen2", work / "qwen2.5-math", seed=2, num_hidden_layers=28)
    tiny.build("qwen3_vl", work / "qwen3-vl-2b", num_hidden_layers=28)
    make_dataset(work, n=12, seed=0)  # work/data.jsonl and work/images/
    _eval_inputs(work, vlm)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # `surgeon demo` without --workdir writes here

    ran = []
    for args in help_examples(cli):
        if any(a.startswith("demo/") for a in args):
            continue  # the demo's own flow: test_demo.py
        args = [hub_standin.url if a == PRINTED_HUB else a for a in args]
        result = cli(*args)
        assert result.exit_code == 0, f"surgeon {shlex.join(args)}\n{result.output}"
        ran.append(args)
    assert {a[0] for a in ran} == {"demo", "diagnose", "eval", "inject-iada", "inspect", "merge", "prior", "probe-layers", "push"}

    # what the examples claim
    assert json.loads((work / "swapped" / "surgeon.json").read_text())["config"]["layers"] == list(range(14, 28))
    prior = json.loads((work / "prior2" / "surgeon.json").read_text())
    assert prior["config"]["base"] and prior["config"]["modules"] == ["attn", "mlp", "norm"]
    assert (work / "qwen3-vl-2b-iada" / "surgeon-iada.safetensors").is_file()
    assert hub_standin.files("my-user/qwen2.5-vl-ties") and hub_standin.files("my-org/drift-prior", "experiments")
    assert hub_standin.repo("my-user/qwen2.5-vl-ties").private
    assert {r["set"] for r in map(json.loads, (work / "tax" / "results.jsonl").read_text().splitlines())} == {"gsm", "charts"}


def _eval_inputs(work: Path, vlm: Path) -> None:
    """What the ``surgeon eval`` example compares: two fine-tunes (small: generation is most of this
    test's time), a text set and a chart set (parquet, images as bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from surgeon.demo import tiny

    tiny.build("qwen2_5_vl", work / "sft")  # fine-tunes of the 7B stand in as 4-layer models: eval reads each on its own
    shutil.copytree(work / "sft", work / "drift")
    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    text = [{k: v for k, v in r.items() if k != "answer"} for r in rows if "image" not in json.dumps(r)]  # references: the last turn
    (work / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text[:2]))
    charts = []
    for row in [r for r in rows if "image" in json.dumps(r)][:2]:
        image = next(c["image"] for c in row["messages"][0]["content"] if c.get("type") == "image")
        question = next(c["text"] for c in row["messages"][0]["content"] if c.get("type") == "text")
        answer = row["messages"][1]["content"]
        answer = answer if isinstance(answer, str) else "".join(c.get("text", "") for c in answer)
        charts.append({"images": [{"bytes": (work / image).read_bytes()}], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    pq.write_table(pa.Table.from_pylist(charts), work / "charts.parquet")


README_SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_the_readme_python_snippets_run(cli, hub_standin, tmp_path, monkeypatch):
    """Each ``python`` block of the README, in order, in one namespace, in a folder prepared by the
    README's own commands (the demo, the IADA injection it shows, the dataset example). Names the
    snippets use without defining (``model``, ``batch``, ``rows``) are given beforehand, and the TRL
    snippet's config gets ``use_cpu=True`` (this machine has no GPU)."""
    import torch

    import surgeon
    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.loading import LazyDataset
    from surgeon.data.scan import scan_samples
    from surgeon.demo.synthetic import make_dataset

    monkeypatch.chdir(tmp_path)
    assert cli("demo", "--workdir", "./surgeon-demo").exit_code == 0
    assert cli("inject-iada", "./surgeon-demo/vlm", "--block-size", "2", "-o", "./surgeon-demo/vlm-iada2").exit_code == 0
    make_dataset("./shapes", n=12, seed=0)
    shutil.copy("./surgeon-demo/heads/heads.json", "heads.json")
    shutil.copytree("./surgeon-demo/prior", "prior")
    _serve(cli, hub_standin, HUB_VLM, tmp_path / "surgeon-demo" / "vlm")

    encoder = SampleEncoder.from_pretrained("./surgeon-demo/vlm", max_length=2048)
    dataset = LazyDataset(scan_samples("./shapes/data.jsonl"), encoder)
    batch = encoder.collate([dataset[0], dataset[1]])
    batch.pop("perception_mask")
    namespace = {"model": surgeon.load_model("./surgeon-demo/vlm"), "batch": batch, "rows": trl_rows(Path("shapes/data.jsonl"), limit=4)}

    snippets = README_SNIPPET.findall((ROOT / "README.md").read_text())
    assert len(snippets) >= 5
    for i, code in enumerate(snippets):
        code = code.replace("SFTConfig(", "SFTConfig(use_cpu=True, report_to='none', ")  # TRL defaults to bf16 on a GPU; none here
        torch.manual_seed(0)
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102 - the project's own README
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} failed:\n{code}") from exc
    assert hasattr(namespace["model"], "surgeon") and (tmp_path / "run").is_dir()
