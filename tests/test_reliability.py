"""Hostile and careless inputs: surgeon removes only what it made, publishes no secret, bounds
what it reads and allocates, notices a changed base model on resume, and answers every
foreseeable bad input with one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, image

SECRET = "hf_" + "Q" * 34  # a Hub-token-shaped string, never a real one


def _config(folder: Path, **changes) -> Path:
    """``folder``'s config.json with text-config ``changes`` (a damaged or mismatched config)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.get("text_config", cfg).update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------- data loss


def test_train_never_removes_a_checkpoint_folder_it_did_not_make(cli, vlm, data, tmp_path):
    out = tmp_path / "run"
    mine = tmp_path / "run-checkpoints"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious\n")
    result = cli("train", vlm, "--data", data, "-o", out, "--max-steps", 1)
    assert_one_line_error(result, "run-checkpoints", "not made by surgeon train", "--overwrite")
    assert (mine / "notes.txt").read_text() == "precious\n" and not out.exists()
    assert cli("train", vlm, "--data", data, "-o", out, "--max-steps", 1, "--overwrite").exit_code == 0
    assert out.is_dir() and not mine.exists()  # replaced as asked, then removed as its own at the end


@pytest.mark.parametrize("where", ["data inside it", "it is the data folder", "it inside the model"])
def test_a_checkpoint_folder_that_is_holds_or_lies_in_an_input_is_refused_even_with_overwrite(cli, vlm, data, tmp_path, where):
    model = vlm
    if where == "data inside it":
        shutil.copytree(data.parent, tmp_path / "run-checkpoints" / "d")
        data, out = tmp_path / "run-checkpoints" / "d" / data.name, tmp_path / "run"
    elif where == "it is the data folder":
        shutil.copytree(data.parent, tmp_path / "d-checkpoints")
        data, out = tmp_path / "d-checkpoints" / data.name, tmp_path / "d"
    else:
        model = _copy(vlm, tmp_path / "m")
        (model / "x-checkpoints").mkdir()
        out = model / "x"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli("train", model, "--data", data, "-o", out, "--max-steps", 1, "--overwrite")
    assert_one_line_error(result, "input")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_end_of_a_run_removes_only_what_runs_write(tmp_path):
    from surgeon.io.output import made_by_surgeon
    from surgeon.training.state import ROOT_KIND, make_root, remove_root

    root = tmp_path / "out-checkpoints"
    make_root(root)
    (root / "metrics.jsonl").write_text("{}\n")
    (root / "logs").mkdir()
    assert made_by_surgeon(root, ROOT_KIND) and remove_root(root) and not root.exists()
    make_root(root)
    (root / "metrics.jsonl").write_text("{}\n")
    (root / "mine.txt").write_text("a user's file\n")
    assert not remove_root(root)
    assert sorted(p.name for p in root.iterdir()) == [".surgeon-made", "mine.txt"]
    unmarked = tmp_path / "other"
    unmarked.mkdir()
    assert not remove_root(unmarked) and unmarked.exists()


def test_output_dot_and_the_folder_holding_it_are_refused_and_leave_nothing(cli, vlm, llm, data, tmp_path, monkeypatch):
    here = tmp_path / "work"
    here.mkdir()
    (here / "mine.txt").write_text("x\n")
    monkeypatch.chdir(here)
    for args in (("merge", "--reasoning", llm, "--vlm", vlm, "-o", ".", "--method", "linear", "--overwrite"),
                 ("train", vlm, "--data", data, "-o", ".", "--max-steps", 1, "--overwrite"),
                 ("prior", "--reasoning", llm, "--vlm", vlm, "-o", "..", "--overwrite")):  # fmt: skip
        assert_one_line_error(cli(*args), "current folder")
    assert sorted(p.name for p in here.iterdir()) == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if "surgeon" in p.name]


def test_only_surgeons_own_temporary_names_are_cleaned_up(vlm, tmp_path):
    from surgeon.io.output import output_folder

    keep = [tmp_path / ".merged.surgeon-notes", tmp_path / ".merged.surgeon-tmp-mine"]
    stale = tmp_path / ".merged.surgeon-tmp-0123abcd"
    for p in (*keep, stale):
        p.mkdir()
    with output_folder(tmp_path / "merged") as tmp:
        (tmp / "a").write_text("a")
    assert all(p.is_dir() for p in keep) and not stale.exists()


@pytest.mark.parametrize("length", [230, 243, 255])
def test_long_output_names_work_or_are_refused_as_too_long(cli, vlm, llm, data, tmp_path, length):
    name = "n" * length
    merged = cli("merge", "--reasoning", llm, "--vlm", vlm, "-o", tmp_path / name, "--method", "linear")
    assert merged.exit_code == 0, merged.output  # its temporary and lock siblings take hashed names
    assert (tmp_path / name / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [name]
    trained = cli("train", vlm, "--data", data, "-o", tmp_path / ("t" * length), "--max-steps", 1)
    if length + len("-checkpoints") > 255:
        assert_one_line_error(trained, "bytes, over the file system's limit of 255", "at most 243 bytes")
    else:
        assert trained.exit_code == 0, trained.output
    too_long = cli("merge", "--reasoning", llm, "--vlm", vlm, "-o", tmp_path / ("x" * 256), "--method", "linear")
    assert_one_line_error(too_long, "256 bytes", "limit of 255")


# ---------------------------------------------------------------------------- secrets


def _refused(cli, src: Path, *args: str) -> dict[str, str]:
    result = cli("push", src, "--repo", "acme/x", "--dry-run", *args)
    lines = [line.removeprefix("refused: ") for line in result.stdout.splitlines() if line.startswith("refused: ")]
    assert (result.exit_code == 1) == bool(lines), result.output
    return dict(line.split(": ", 1) for line in lines)


def test_push_refuses_credential_files_and_key_shapes_wherever_they_hide(cli, folder, hub_standin):
    src = folder("merge")
    keys = {
        ".env": "OPENAI_API_KEY=sk-proj-" + "a1B2" * 8 + "\n",
        "deploy/.env.production": "X=1\n",
        "id_rsa": "anything\n",
        "id_ed25519": "anything\n",
        "server.pem": "anything\n",
        "api.key": "anything\n",
        ".netrc": "machine x login y password z\n",
        ".npmrc": "//registry/:_authToken=x\n",
        ".pypirc": "[pypi]\n",
        "aws/credentials": "[default]\n",
        "notes/aws.txt": "key AKIA" + "ABCDEFGHIJKLMNOP" + " here\n",
        "notes/gh.md": "token ghp_" + "x" * 36 + "\n",
        "notes/key.txt": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
    }
    for rel, text in keys.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    (src / f"run-{SECRET}.log").write_text("fine\n")  # in a file name
    (src / "utf16.txt").write_bytes(f"token: {SECRET}\n".encode("utf-16"))  # with a byte-order mark
    (src / "utf16le.txt").write_bytes(f"token: {SECRET}\n".encode("utf-16-le"))  # without one
    (src / "utf32.txt").write_bytes(f"token: {SECRET}\n".encode("utf-32"))
    (src / "escaped.json").write_text(json.dumps({"k": SECRET}).replace(SECRET[:6], "".join(f"\\u{ord(c):04x}" for c in SECRET[:6])))
    (src / "home.json").write_text(json.dumps({"dir": str(Path.home() / "private")}).replace("/", "\\/"))  # a path behind escapes
    weights = next(src.glob("*.safetensors")).read_bytes()
    (src / "trailing.safetensors").write_bytes(weights + SECRET.encode())  # after the last tensor
    found = _refused(cli, src)
    assert set(found) == {*keys, "run-hf_….log", "utf16.txt", "utf16le.txt", "utf32.txt", "escaped.json", "home.json", "trailing.safetensors"}
    assert "credential" in found[".env"] and "(.env" in found[".env"] and "SSH private key" in found["id_rsa"]
    assert "AWS access key id (AKIA…)" in found["notes/aws.txt"] and "GitHub token (ghp_…)" in found["notes/gh.md"]
    assert "private key" in found["notes/key.txt"] and "Hub access token (hf_…)" in found["utf16.txt"]
    assert "after its last tensor" in found["trailing.safetensors"] and "local path" in found["home.json"]
    result = cli("push", src, "--repo", "acme/x", "--dry-run")
    for secret in (SECRET[3:10], "a1B2a1B2", "ABCDEFGHIJKLMNOP", "x" * 12):  # no part of a secret is ever printed
        assert secret not in result.output
    assert hub_standin.requests == []


def test_allow_file_sends_what_the_user_means_but_never_the_token_in_use(cli, folder, hub_standin):
    src = folder("merge")
    (src / ".env.example").write_text("OPENAI_API_KEY=sk-your-key-goes-here-xxxxxxxx\n")
    (src / "train.log").write_text("using hf_standin_write_token_0123456789ab\n")
    assert set(_refused(cli, src, "--token", "hf_standin_write_token_0123456789ab")) == {".env.example", "train.log"}
    allowed = _refused(cli, src, "--allow-file", ".env*", "--allow-file", "*.log", "--token", "hf_standin_write_token_0123456789ab")
    assert set(allowed) == {"train.log"} and "token in use" in allowed["train.log"]
    (src / "train.log").unlink()
    assert cli("push", src, "--repo", "acme/x", "--allow-file", ".env*", "--token", "hf_standin_write_token_0123456789ab").exit_code == 0
    assert ".env.example" in hub_standin.files("acme/x")


def test_key_shapes_are_not_found_in_ordinary_text():
    from surgeon.publish.secrets import credential_file, find_secret

    for text in ("task-0123456789abcdefghijklmn", "mask-and-risk-assessment-report-v2", "AKIA is a word", "hf_hub_download(repo)",
                 "ghp_short", "BEGIN PUBLIC KEY", "scikit-learn sklearn sk-learn"):  # fmt: skip
        assert find_secret(text.encode()) is None, text
    for name in ("model.safetensors", "tokenizer.json", "environment.md", "keys.txt", "id_rsa.pub", "README.md", "token_ids.json"):
        assert credential_file(name) is None, name


# ---------------------------------------------------------------------------- bounds


def test_config_sizes_are_checked_before_anything_is_allocated(cli, vlm, data, tmp_path):
    huge = _config(_copy(vlm, tmp_path / "huge"), num_hidden_layers=10**9)
    (huge / "model.safetensors").unlink()  # a config alone: what --dry-run plans from
    for args in (("train", huge, "--dry-run"), ("inject-iada", huge, "--dry-run", "--block-size", 2)):
        assert_one_line_error(cli(*args), "num_hidden_layers = 1000000000", "at most 1,024")
    zero = _config(_copy(vlm, tmp_path / "zero"), num_attention_heads=0)
    for args in (("train", zero, "--dry-run"), ("score-heads", zero, "--data", data, "-o", tmp_path / "h.json")):
        assert_one_line_error(cli(*args), "num_attention_heads = 0", "at least 1")
    odd = _config(_copy(vlm, tmp_path / "odd"), num_key_value_heads=3)
    assert_one_line_error(cli("train", odd, "--dry-run"), "num_key_value_heads = 3", "does not divide")


def test_weights_that_do_not_match_the_config_are_one_line(cli, vlm, data, tmp_path):
    wide = json.loads((vlm / "config.json").read_text())["text_config"]["hidden_size"] * 2
    changed = _config(_copy(vlm, tmp_path / "changed"), hidden_size=wide)
    for args in (("train", changed, "--data", data, "-o", tmp_path / "o", "--max-steps", 1),
                 ("score-heads", changed, "--data", data, "-o", tmp_path / "h.json"),
                 ("inject-iada", changed, "-o", tmp_path / "i", "--block-size", 2)):  # fmt: skip
        assert_one_line_error(cli(*args), f"hidden_size = {wide}", "does not belong to these weights")
    import surgeon
    from surgeon.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not belong"):
        surgeon.load_model(changed)


def _image_rows(folder: Path, rows: list[tuple[list[str], str]]) -> Path:
    lines = []
    for images, answer in rows:
        content = [*({"type": "image", "image": name} for name in images), {"type": "text", "text": "What?"}]
        lines.append(json.dumps({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_images_are_bounded_in_number_and_pixels_before_decoding(cli, vlm, tmp_path):
    from PIL import Image

    image(0).save(tmp_path / "ok.png")
    Image.new("1", (30000, 30000)).save(tmp_path / "bomb.png")  # 110 KB on disk, 900 megapixels decoded
    Image.new("L", (9000, 8000)).save(tmp_path / "large.png")
    data = _image_rows(tmp_path, [(["ok.png"], "<perception>a</perception> b"), (["bomb.png"], "c"), (["large.png"], "d")])
    out = tmp_path / "o"
    refused = cli("train", vlm, "--data", data, "-o", out, "--max-steps", 3)
    assert_one_line_error(refused, "image too large", "--skip-bad-lines")
    assert "data.jsonl:2: image too large: bomb.png" in refused.stderr or "data.jsonl:3: image too large: large.png is 9000×8000" in refused.stderr
    skipped = cli("train", vlm, "--data", data, "-o", out, "--max-steps", 3, "--skip-bad-lines", "--json", "--max-skipped-share", "1")
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout)["stats"]["seen"]["hollow"] == 2
    many = tmp_path / "many.jsonl"
    many.write_text(json.dumps({"conversations": [{"from": "human", "value": "<image>" * 20000}, {"from": "gpt", "value": "y"}],
                                "images": ["ok.png"] * 20000}) + "\n")  # fmt: skip
    assert_one_line_error(cli("train", vlm, "--data", many, "-o", tmp_path / "o2", "--max-steps", 1), "many.jsonl:1", "too many images", "256")


def test_a_chat_template_that_writes_or_loops_without_end_is_stopped(cli, vlm, data, tmp_path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from surgeon.data.templates import TemplateTooCostly, bounded, install

    writes = "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}{{ messages }}"
    folder = _copy(vlm, tmp_path / "evil")
    (folder / "chat_template.jinja").write_text(writes)
    assert_one_line_error(cli("train", folder, "--data", data, "-o", tmp_path / "o", "--max-steps", 1), "chat template", "more than 1,048,576 characters")
    loops = ImmutableSandboxedEnvironment().from_string("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with pytest.raises(TemplateTooCostly, match="longer than"), bounded(chars=10, seconds=0.5):
        loops.render()
    install(writes)  # bounded only inside ``bounded``: elsewhere a template renders as transformers renders it
    assert ImmutableSandboxedEnvironment().from_string("{{ 'a' * 3 }}").render() == "aaa"


def test_a_long_line_is_tokenised_only_as_far_as_max_length_needs(vlm, tmp_path, monkeypatch):
    """The same tokens, labels and perception mask as tokenising the whole line, with the
    tokenizer shown only a prefix (memory follows the kept tokens, not the line)."""
    import random

    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.scan import scan_samples

    random.seed(0)
    words = ["red", "circle", "two", "so", "the", "answer", "is", "3.14", "\n", "¿qué?", "<tag>"]
    text = " ".join(random.choice(words) for _ in range(60000))
    image(1).save(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Say."}]},
                          {"role": "assistant", "content": f"<perception>{text[:300]}</perception> {text}"}]},
            {"messages": [{"role": "user", "content": text[:200]}, {"role": "assistant", "content": text}]}]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scanned = scan_samples(tmp_path / "d.jsonl")
    whole = SampleEncoder.from_pretrained(vlm, max_length=None)
    cut = SampleEncoder.from_pretrained(vlm, max_length=700)
    full = [whole.encode(scanned.sample(i)) for i in range(len(scanned))]
    seen = []
    original = type(cut.processor).__call__

    def spy(self, *args, **kwargs):
        seen.append(len(kwargs["text"][0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(cut.processor), "__call__", spy)
    for i in range(len(scanned)):
        short = cut.encode(scanned.sample(i))
        assert len(short) == 700
        for key in short.tokens:
            assert torch.equal(short.tokens[key], full[i].tokens[key][:700]), key
        for key in short.vision:
            assert torch.equal(short.vision[key], full[i].vision[key]), key
    assert seen and max(seen) < len(text) / 10


def test_inspect_of_a_server_that_ignores_ranges_reads_only_the_header(hub_standin, vlm, tmp_path):
    from safetensors.torch import load_file

    from surgeon.publish.push import PushConfig, push_folder
    from surgeon.hub.sources import open_checkpoint
    from surgeon.io.safetensors import write_file

    src = _copy(vlm, tmp_path / "big")
    tensors = {k: v.clone() for k, v in load_file(str(src / "model.safetensors")).items()}
    tensors["zz.padding"] = torch.zeros(16 * 2**20)  # 64 MB of tensor data after the header
    (src / "model.safetensors").unlink()
    write_file(src / "model.safetensors", tensors, {"format": "pt"})
    push_folder(src, PushConfig(repo="acme/big", token="hf_standin"))
    hub_standin.ignore_ranges, hub_standin.sent_bytes = True, 0
    with open_checkpoint("acme/big", headers_only=True) as ckpt:
        assert set(ckpt.tensors) == set(tensors)
    assert hub_standin.sent_bytes < 8 * 2**20, hub_standin.sent_bytes


def test_fifos_and_devices_are_named_not_opened(cli, vlm, data, tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    assert_one_line_error(cli("train", vlm, "--data", fifo, "-o", tmp_path / "o", "--max-steps", 1), "is a FIFO, not a data file")
    assert_one_line_error(cli("diagnose", "/dev/zero", "--model", vlm), "is a character device")
    assert_one_line_error(
        cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--image-lora", fifo, "--max-steps", 1), "is a FIFO, not a heads.json"
    )


def test_inspect_without_config_says_unknown_never_none(cli, vlm, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(vlm / "model.safetensors", bare)
    shown = cli("inspect", bare)
    assert shown.exit_code == 0 and "None" not in shown.stdout and "unknown" in shown.stdout


# ---------------------------------------------------------------------------- resume, numbers


def test_resume_refuses_a_base_model_whose_weights_changed(cli, vlm, data, tmp_path):
    from safetensors.torch import load_file, save_file

    base = _copy(vlm, tmp_path / "base")
    out = tmp_path / "run"
    common = ("--data", data, "-o", out, "--max-steps", 3, "--save-steps", 2)
    assert cli("train", base, *common).exit_code == 0
    shutil.rmtree(out)
    tensors = {k: v + 0.05 if "layers" in k else v.clone() for k, v in load_file(str(base / "model.safetensors")).items()}
    (base / "model.safetensors").unlink()
    save_file(tensors, str(base / "model.safetensors"), {"format": "pt"})  # same shapes and size, other weights
    assert_one_line_error(cli("train", base, *common, "--resume"), "model changed since", "--resume-anyway")
    anyway = cli("train", base, *common, "--resume", "--resume-anyway")
    assert anyway.exit_code == 0 and "model changed since checkpoint-2" in anyway.stderr


def test_a_healthy_fp16_pair_whose_sums_pass_65504_merges(cli, vlm, tmp_path):
    from safetensors.torch import load_file, save_file

    pair = []
    for name, value in (("a", 60000.0), ("b", 60030.0)):
        folder = _copy(vlm, tmp_path / name)
        tensors = {k: (torch.full_like(v, value) if "mlp.up_proj" in k else v).half() for k, v in load_file(str(folder / "model.safetensors")).items()}
        (folder / "model.safetensors").unlink()
        save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
        pair.append(folder)
    merged = cli("merge", "--reasoning", pair[1], "--vlm", pair[0], "-o", tmp_path / "m", "--method", "linear")
    assert merged.exit_code == 0, merged.output
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    up = next(k for k in out if "mlp.up_proj" in k)
    assert torch.isfinite(out[up]).all() and out[up].float().mean().item() == pytest.approx(60015.0, rel=1e-3)
