"""``surgeon train``: loss goes down, determinism, exact resume, λ invariants, outputs that load."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error
from safetensors.torch import load_file

from surgeon.errors import CheckpointError, ConfigError
from surgeon.training.config import TrainConfig
from surgeon.training.loop import train


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(vlm, data, out, **kw):
    base = dict(model=str(vlm), data=str(data), output=str(out), batch_size=2, seed=0, warmup_ratio=0.0)
    return train(TrainConfig(**{**base, **kw}))


@pytest.mark.parametrize("mode", [dict(lr=1e-2), dict(full=True, lr=3e-3)], ids=["lora", "full"])
def test_loss_goes_down(vlm, data, tmp_path, mode):
    _run(vlm, data, tmp_path / "out", max_steps=12, batch_size=4, **mode)
    losses = [m["loss"] for m in _metrics(tmp_path / "out")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_same_seed_same_weights(vlm, data, tmp_path):
    for name in ("a", "b"):
        _run(vlm, data, tmp_path / name, max_steps=3, lr=1e-3)
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_thread_count_defaults_to_the_cores_per_process_and_is_recorded(vlm, data, tmp_path, monkeypatch):
    import os

    from surgeon.training.parallel import default_threads

    cores = len(os.sched_getaffinity(0))
    assert default_threads({}) == cores
    assert default_threads({"LOCAL_WORLD_SIZE": str(2 * cores)}) == 1  # never 0
    assert default_threads({"LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "3"}) == 3  # set by the user or torchrun: it wins
    before = torch.get_num_threads()
    _run(vlm, data, tmp_path / "one", max_steps=1, threads=1)
    assert json.loads((tmp_path / "one" / "surgeon.json").read_text())["stats"]["threads"] == 1
    assert torch.get_num_threads() == before  # the caller's setting is restored
    with pytest.raises(ConfigError, match="threads: must be at least 1"):
        TrainConfig(model=str(vlm), data=str(data), output=str(tmp_path / "x"), threads=0)


def test_resume_after_a_stop_gives_the_uninterrupted_weights(vlm, data, tmp_path):
    _run(vlm, data, tmp_path / "full", max_steps=6, lr=1e-3, full=True)

    def stop_after_4(metrics):
        if metrics["step"] == 4:
            raise KeyboardInterrupt

    config = TrainConfig(
        model=str(vlm), data=str(data), output=str(tmp_path / "cut"), batch_size=2, seed=0, warmup_ratio=0.0,
        max_steps=6, lr=1e-3, full=True, save_steps=3,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=stop_after_4)
    assert not (tmp_path / "cut").exists()
    assert (tmp_path / "cut-checkpoints" / "checkpoint-3" / "state.json").exists()
    train(TrainConfig(**{**config.__dict__, "resume": True}))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in _metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in _metrics(tmp_path / "cut")] == [m["loss"] for m in _metrics(tmp_path / "full")]


def test_fixed_lambda_at_the_token_share_is_plain_cross_entropy(vlm, data, tmp_path):
    """One step over all 12 samples: λ = N_p/(N_p+N_r) must reproduce the unweighted update."""
    first = _run(vlm, data, tmp_path / "plain", max_steps=1, batch_size=12, full=True, lr=1e-3)
    n_p, n_r = first.metrics["perception_tokens"], first.metrics["reasoning_tokens"]
    assert n_p > 0 and n_r > 0
    _run(vlm, data, tmp_path / "lam", max_steps=1, batch_size=12, full=True, lr=1e-3, perception_weight=repr(n_p / (n_p + n_r)))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("plain", "lam"))
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    heavy = _run(vlm, data, tmp_path / "heavy", max_steps=1, batch_size=12, full=True, lr=1e-3, perception_weight="0.9")
    assert heavy.metrics["lambda"] == 0.9
    c = load_file(str(tmp_path / "heavy" / "model.safetensors"))
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_dynamic_lambda_is_the_ratio_of_the_span_gradient_norms(vlm, data, tmp_path):
    """One full fine-tuning step over the whole dataset in one micro-batch: the λ it logs equals
    ‖g_r‖/(‖g_p‖+‖g_r‖), with g_p and g_r computed here by plain autograd from the step's batch."""
    from transformers import AutoModelForImageTextToText

    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.scan import load_samples
    from surgeon.training.lora import set_trainable

    samples = load_samples(data)
    result = _run(vlm, data, tmp_path / "dyn", full=True, max_steps=1, batch_size=len(samples), lr=1e-3, perception_weight="dynamic",
                  mixed_precision="no")  # fmt: skip
    logged = _metrics(tmp_path / "dyn")[0]["lambda"]
    assert 0.0 < logged < 1.0 and result.metrics["loss_perception"] > 0

    encoder = SampleEncoder.from_pretrained(vlm, max_length=2048)
    batch = encoder.collate([encoder.encode(s) for s in samples])
    mask, labels = batch.pop("perception_mask"), batch.pop("labels")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(vlm)
    set_trainable(model, full=True, train_vision=False)
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(**batch).logits[:, :-1].float()
    target, span = labels[:, 1:], mask[:, 1:]
    ce = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none")
    ce = ce.view(target.shape)
    perception, reasoning = (target != -100) & span, (target != -100) & ~span
    losses = [ce[perception].sum() / perception.sum(), ce[reasoning].sum() / reasoning.sum()]
    g_p, g_r = (torch.autograd.grad(loss, params, retain_graph=True) for loss in losses)
    norm_p, norm_r = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])) for gs in (g_p, g_r))
    assert logged == pytest.approx(float(norm_r / (norm_p + norm_r)), rel=1e-4)


def test_adapter_and_merged_folders_load_in_transformers_and_peft(vlm, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _run(vlm, data, tmp_path / "adapter", max_steps=2, lr=1e-2)
    _run(vlm, data, tmp_path / "merged", max_steps=2, lr=1e-2, merge_lora=True)
    record = json.loads((tmp_path / "adapter" / "surgeon.json").read_text())
    assert record["artifact"] == "peft-adapter" and record["command"] == "train"
    # the full path of a local base (peft and surgeon.load_model then find it from any folder)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(vlm.resolve())
    assert not (tmp_path / "adapter-checkpoints").exists()  # nothing to resume from: metrics went into the output
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForImageTextToText.from_pretrained(vlm)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")(input_ids=ids).logits
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
    assert not torch.allclose(plain, tuned)
    assert torch.allclose(tuned, merged, atol=1e-5)
    import warnings

    import surgeon

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning reaches the user who loads the adapter
        loaded = surgeon.load_model(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, tuned, atol=1e-6)


def test_lora_with_train_vision_saves_the_vision_tower_in_the_adapter(vlm, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _run(vlm, data, tmp_path / "a", max_steps=2, lr=1e-2, train_vision=True)
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    vision = [k for k in saved if ".visual." in k]
    assert vision and any("merger" in k for k in vision) and not any("lora_" in k for k in vision)
    base = AutoModelForImageTextToText.from_pretrained(vlm)
    before = base.model.visual.merger.mlp[0].weight.detach().clone()
    tuned = PeftModel.from_pretrained(base, tmp_path / "a").merge_and_unload()
    assert not torch.equal(before, tuned.model.visual.merger.mlp[0].weight)


def test_lora_never_wraps_vision_blocks(vlm, data, tmp_path):
    _run(vlm, data, tmp_path / "a", max_steps=1)
    names = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert names and all("visual" not in n for n in names)
    assert any("mlp.gate_proj" in n for n in names)  # the same leaf name the vision MLPs use


def test_cli_bad_input(cli, vlm, data, tmp_path):
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--prior", "p"), "p: no such prior folder")
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--layers", "2-99"), "layer 99 does not exist", "decoder layers")
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--modules", "norm"), "'norm' matched nothing", "attn (")
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--modules", "mlp", "--lora-targets", "attn"), "both")
    assert_one_line_error(cli("train", vlm, "--data", tmp_path / "none.jsonl", "-o", tmp_path / "o"), "none.jsonl")
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--perception-weight", "2"), "perception_weight")
    for option, value, message in (("--lr", "nan", "lr: must be a finite number"), ("--lr", "-1e-4", "lr: must be positive"),
                                   ("--epochs", "inf", "epochs: must be a finite number"), ("--lora-dropout", "1", "lora_dropout")):  # fmt: skip
        assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", option, value), message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-checkpoints").exists()
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--resume"), "no checkpoint in")
    (tmp_path / "o-checkpoints" / "checkpoint-2").mkdir(parents=True)
    assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o"), "earlier run", "--resume", "--overwrite")
    assert (tmp_path / "o-checkpoints" / "checkpoint-2").exists()


def test_iada_with_lora_trains_and_saves_beside_the_adapter(tiny_models, data, tmp_path):
    """IADA blocks of the model train with LoRA; the adapter folder carries them; merged and
    full outputs are remote-code folders."""
    from surgeon import load_model
    from surgeon.modules.iada import IadaConfig, inject_iada
    from surgeon.modules.folders import module_parameters

    vlm = inject_iada(tiny_models("qwen2_5_vl"), tmp_path / "vlm-iada", IadaConfig(block_size=2)).output
    _run(vlm, data, tmp_path / "lora", max_steps=12, batch_size=4, lr=1e-2)
    losses = [m["loss"] for m in _metrics(tmp_path / "lora")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert (tmp_path / "lora" / "surgeon-modules.safetensors").exists()
    gates = load_file(str(tmp_path / "lora" / "surgeon-modules.safetensors"))
    assert any(k.endswith("gate") and v.abs().sum() > 0 for k, v in gates.items())  # trained from 0

    model = load_model(tmp_path / "lora")
    loaded = {k.split("surgeon.", 1)[1]: v for k, v in module_parameters(model.get_base_model()).items()}
    assert all(torch.equal(loaded[k], gates[k]) for k in gates)

    _run(vlm, data, tmp_path / "merged", max_steps=2, lr=1e-2, merge_lora=True)
    assert json.loads((tmp_path / "merged" / "surgeon.json").read_text())["artifact"] == "model+remote-code"
    assert "auto_map" in json.loads((tmp_path / "merged" / "config.json").read_text())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(load_model(tmp_path / "merged")(input_ids=ids).logits).all()


def test_iada_flag_injects_defaults_and_refuses_a_model_that_has_them(tiny_models, data, tmp_path):
    from surgeon.errors import ConfigError
    from surgeon.modules.iada import IadaConfig, inject_iada

    deep = tiny_models("qwen2_5_vl", num_hidden_layers=8)  # S=7 gives one boundary
    result = _run(deep, data, tmp_path / "a", max_steps=1, iada=True, full=True)
    assert result.stats["trainable_parameters"] > 0
    assert "surgeon" in json.loads((tmp_path / "a" / "config.json").read_text())
    injected = inject_iada(deep, tmp_path / "deep-iada", IadaConfig()).output
    with pytest.raises(ConfigError, match="already has IADA"):
        _run(injected, data, tmp_path / "b", max_steps=1, iada=True)


def test_cards_of_real_train_outputs_say_what_trained_and_how_to_load_it(tiny_models, data, tmp_path, monkeypatch):
    """LoRA on a model with IADA blocks: the adapter carries the trained blocks, which plain peft
    cannot load, so the card says to load it with surgeon; --merge-lora is tagged lora."""
    from surgeon import load_model
    from surgeon.publish.card import build_card, card_metadata
    from surgeon.modules.iada import IadaConfig, inject_iada
    from surgeon.io.provenance import read_record

    vlm = inject_iada(tiny_models("qwen2_5_vl"), tmp_path / "vlm-iada", IadaConfig(block_size=2)).output
    monkeypatch.chdir(tmp_path)
    _run("vlm-iada", data, "lora", max_steps=1, perception_weight="0.5")  # a relative model path, as users type it
    card = build_card(tmp_path / "lora", "acme/lora")
    assert card_metadata(read_record(tmp_path / "lora"), tmp_path / "lora")["tags"] == ["surgeon", "iada", "lora", "perception-reweighting"]
    assert 'surgeon.load_model("acme/lora")' in card and "surgeon-modules.safetensors" in card
    training = card.split("## Training")[1].split("\n## ")[0]
    assert "| loss |" in training and "| lambda | 0.5 |" in training
    monkeypatch.chdir(tmp_path.parent)  # loads from elsewhere: the base is recorded by its full path
    assert load_model(tmp_path / "lora") is not None

    monkeypatch.chdir(tmp_path)
    _run(vlm, data, "merged", max_steps=1, merge_lora=True)
    record = read_record(tmp_path / "merged")
    assert card_metadata(record, tmp_path / "merged")["tags"] == ["surgeon", "iada", "lora"]
    assert "LoRA, merged into the weights" in build_card(tmp_path / "merged", "acme/m")


def test_perception_weight_without_perception_spans_is_an_error(vlm, tmp_path):
    from surgeon.errors import ConfigError

    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n")
    with pytest.raises(ConfigError, match="no supervised token .* is marked as perception"):
        _run(vlm, plain, tmp_path / "o", max_steps=1, perception_weight="dynamic")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-checkpoints").exists()


def test_cli_iada_flag(cli, tiny_models, data, tmp_path):
    deep = tiny_models("qwen2_5_vl", num_hidden_layers=8)
    result = cli("train", deep, "--data", data, "-o", tmp_path / "a", "--max-steps", "1", "--iada", "--full")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "surgeon.json").read_text())["stats"]["surgeon_modules"] == ["iada"]
    assert "data: 12 of 12 samples used" in result.stderr


DAMAGE = {
    "garbage trainable": ("trainable.safetensors", lambda p: p.write_bytes(b"not a safetensors file at all")),
    "truncated trainable": ("trainable.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100])),
    "malformed state": ("state.json", lambda p: p.write_text("{not json")),
    "missing state field": ("state.json", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "scheduler"}))),
    "garbage rng": ("rng.safetensors", lambda p: p.write_bytes(b"\x08" + b"\0" * 7 + b"garbage!")),
    "missing optimizer": ("optimizer.safetensors", lambda p: p.unlink()),
}


@pytest.fixture(scope="module")
def stopped_run(vlm, data, tmp_path_factory):
    """An uninterrupted 6-step run, and the same run stopped after step 5 (checkpoints 2 and 4)."""
    root = tmp_path_factory.mktemp("stopped")
    base = dict(model=str(vlm), data=str(data), batch_size=2, seed=0, warmup_ratio=0.0, max_steps=6, lr=1e-3, full=True)
    train(TrainConfig(**base, output=str(root / "whole")))

    def stop(metrics):
        if metrics["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, output=str(root / "cut"), save_steps=2), on_step=stop)
    return root, base


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(cli, stopped_run, tmp_path, damage):
    import shutil

    root, base = stopped_run
    shutil.copytree(root / "cut-checkpoints", tmp_path / "cut-checkpoints")
    name, spoil = DAMAGE[damage]
    spoil(tmp_path / "cut-checkpoints" / "checkpoint-4" / name)
    args = ["train", base["model"], "--data", base["data"], "-o", tmp_path / "cut", "--batch-size", "2", "--warmup-ratio", "0",
            "--max-steps", "6", "--lr", "1e-3", "--full", "--save-steps", "2", "--resume"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert f"checkpoint-4 is damaged ({name}" in " ".join(result.stderr.split()) and "resuming from checkpoint-2" in result.stderr
    a, b = (load_file(str(d / "model.safetensors")) for d in (root / "whole", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in _metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]

    shutil.rmtree(tmp_path / "cut")  # now with no intact checkpoint left to fall back to
    shutil.copytree(root / "cut-checkpoints", tmp_path / "cut-checkpoints", dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "cut-checkpoints" / "checkpoint-2")
    spoil(tmp_path / "cut-checkpoints" / "checkpoint-4" / name)
    assert_one_line_error(cli(*args), "checkpoint-4: is damaged", name, "start over with --overwrite")


@pytest.mark.parametrize(
    ("options", "methods"),
    [
        (dict(perception_regex=r"<perception>(.*?)</perception>"), ["lora"]),  # a regex alone reweights nothing
        (dict(perception_weight="dynamic"), ["lora", "perception-reweighting"]),
        (dict(full=True), []),
    ],
    ids=["regex-only", "dynamic", "full"],
)
def test_the_record_lists_the_methods_applied_and_the_card_tags_them(vlm, data, tmp_path, options, methods):
    from surgeon.publish.card import card_metadata
    from surgeon.io.provenance import read_record

    _run(vlm, data, tmp_path / "out", max_steps=1, **options)
    record = read_record(tmp_path / "out")
    assert record["methods"] == methods
    assert card_metadata(record, tmp_path / "out")["tags"] == ["surgeon", *methods]


def test_a_run_that_skips_too_much_or_trains_on_nothing_stops_in_one_line(cli, vlm, data, tmp_path):
    """Every sample longer than --max-length: stopped (at the last step of so short a run; mid-run
    once 64 samples were seen), saying how many and why; with --max-skipped-share 1 it goes on, and
    stops at the end for having trained on no token."""
    base = ["train", vlm, "--data", data, "--max-steps", "2", "--batch-size", "2", "--max-length", "8"]
    result = cli(*base, "-o", tmp_path / "a")
    assert_one_line_error(result, "4 of the 4 samples so far were skipped", "--max-skipped-share 0.5", "--max-length")
    result = cli(*base, "-o", tmp_path / "b", "--max-skipped-share", "1")
    assert_one_line_error(result, "trained on no token", "4 of 4 samples")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert_one_line_error(cli(*base, "-o", tmp_path / "c", "--max-skipped-share", "2"), "max_skipped_share", "[0, 1]")


def test_quiet_means_quiet_but_for_errors(cli, vlm, data, tmp_path):
    base = ["train", vlm, "--data", data, "--max-steps", "1", "--batch-size", "2", "--log-steps", "1"]
    loud = cli(*base, "-o", tmp_path / "loud")
    assert loud.exit_code == 0 and "surgeon train:" in loud.stderr and "step 1/1" in loud.stderr
    quiet = cli("-q", *base, "-o", tmp_path / "quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and "trained 1 step" in quiet.stdout
    assert_one_line_error(cli("-q", *base, "-o", tmp_path / "quiet"), "already exists")


def test_save_total_limit_keeps_the_newest_and_resume_takes_a_chosen_checkpoint(vlm, data, tmp_path):
    _run(vlm, data, tmp_path / "full", max_steps=5, lr=1e-3, full=True)

    def stop_after_5(metrics):
        if metrics["step"] == 5:
            raise KeyboardInterrupt

    config = TrainConfig(
        model=str(vlm), data=str(data), output=str(tmp_path / "cut"), batch_size=2, seed=0, warmup_ratio=0.0,
        max_steps=5, lr=1e-3, full=True, save_steps=1, save_total_limit=2,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=stop_after_5)
    root = tmp_path / "cut-checkpoints"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    train(TrainConfig(**{**config.__dict__, "resume": str(root / "checkpoint-3")}))  # not the latest: the one named
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in _metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        train(TrainConfig(**{**config.__dict__, "output": str(tmp_path / "x"), "resume": str(tmp_path / "nope")}))


def test_resume_from_a_checkpoint_pushed_to_the_hub(vlm, data, tmp_path, hub_standin):
    """A checkpoint folder uploaded to a Hub repo (the local stand-in, through the real client)
    resumes by ``org/name@revision`` to the weights of the uninterrupted run."""
    from huggingface_hub import HfApi

    _run(vlm, data, tmp_path / "full", max_steps=4, lr=1e-3, full=True)
    config = TrainConfig(
        model=str(vlm), data=str(data), output=str(tmp_path / "cut"), batch_size=2, seed=0, warmup_ratio=0.0,
        max_steps=4, lr=1e-3, full=True, save_steps=2,
    )  # fmt: skip

    def stop_after_3(metrics):
        if metrics["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_step=stop_after_3)
    api = HfApi(endpoint=hub_standin.url, token="hf_test")
    api.create_repo("acme/run-ckpt")
    commit = api.upload_folder(folder_path=tmp_path / "cut-checkpoints" / "checkpoint-2", repo_id="acme/run-ckpt").oid
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="state.json", repo_id="acme/run-ckpt")  # a later commit, damaged
    resumed = TrainConfig(**{**config.__dict__, "output": str(tmp_path / "hub"), "resume": f"acme/run-ckpt@{commit}"})
    train(resumed)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("full", "hub"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="not an intact checkpoint"):
        train(TrainConfig(**{**resumed.__dict__, "output": str(tmp_path / "latest"), "resume": "acme/run-ckpt"}))
