"""Training at real lengths: packed rows whose samples keep their own positions and attention,
a loss that never holds the full logits, token-budget and length-grouped batches, and the metrics
and plan that account for them."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import assert_one_line_error, image

from surgeon.training.config import TrainConfig
from surgeon.training.loop import train

ALONE_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava"]  # with their processors: images in the samples
TEXT_FAMILIES = ["qwen2", "qwen2_vl", "qwen3_vl_moe", "llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", "qwen3_moe", "llama"]


def _rows(folder, with_images: bool) -> list[dict]:
    for i in range(3):
        image(i).save(folder / f"{i}.png")
    answers = ["Two red circles. So the answer is 2.", "Three blue squares and more. Answer: 3", "A long chain of reasoning " * 6 + "Answer 7"]
    rows = []
    for i, text in enumerate(answers):
        question = [{"type": "text", "text": f"How many in picture {i}?"}]
        if with_images and i != 1:  # a text-only sample between two with images
            question.insert(0, {"type": "image", "image": f"{i}.png"})
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": f"<perception>{text[:14]}</perception>{text[14:]}"}]})  # fmt: skip
    return rows


def _per_token_losses(folder, tmp_path, text_only: bool):
    """(losses of each sample run alone, losses of the packed row, the packed labels)."""
    from transformers import AutoTokenizer

    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.packing import pack
    from surgeon.data.scan import load_samples
    from surgeon.modules.folders import load_model
    from surgeon.perception.reweight import token_losses
    from surgeon.training.attention import Packer, check_packable, set_attention

    config = json.loads((folder / "config.json").read_text())
    encoder = SampleEncoder(AutoTokenizer.from_pretrained(folder)) if text_only else SampleEncoder.from_pretrained(folder)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(tmp_path, not text_only)))
    items = [encoder.encode(s) for s in load_samples(tmp_path / "d.jsonl")]
    model = load_model(folder, dtype=torch.float32).eval()
    alone = []
    with torch.no_grad():
        for item in items:
            batch = encoder.collate([item])
            labels = batch.pop("labels")
            batch.pop("perception_mask")
            alone.append(token_losses(model(**batch).logits, labels)[0])
        set_attention(model, "sdpa", packing=True)
        packer = Packer(model, check_packable(config))
        row = pack(items, encoder.pad_token_id)
        labels = row.pop("labels")
        row.pop("perception_mask")
        with packer.row(row) as inputs:
            assert "attention_mask" not in inputs and inputs["position_ids"].shape[-1] == labels.shape[1]
            packed = token_losses(model(**inputs).logits, labels)[0]
    return torch.cat(alone), packed, labels[0]


@pytest.mark.parametrize("family", ALONE_FAMILIES + TEXT_FAMILIES)
def test_a_packed_row_gives_each_sample_the_losses_it_has_alone(tiny_models, tmp_path, family):
    alone, packed, labels = _per_token_losses(tiny_models(family), tmp_path, text_only=family in TEXT_FAMILIES)
    supervised = labels != -100
    assert int(supervised.sum()) > 50
    assert torch.allclose(packed[supervised], alone[supervised], atol=1e-5, rtol=0), (packed - alone)[supervised].abs().max()


def test_packing_refuses_families_whose_samples_would_attend_to_each_other(cli, tiny_models, data, tmp_path):
    for family in ("gemma3", "mllama", "lfm2_vl"):
        result = cli("train", tiny_models(family), "--data", data, "-o", tmp_path / family, "--packing", "--max-steps", 1)
        assert_one_line_error(result, family, "cannot pack", "without --packing")
        assert not (tmp_path / family).exists()


def test_attention_backends_that_cannot_run_here_are_one_line(cli, vlm, data, tmp_path):
    for attn, says in (("flash_attention_2", "flash-attn"), ("flex_attention", "flex_attention")):
        assert_one_line_error(cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--attn", attn, "--max-steps", 1), says)
    eager = cli("train", vlm, "--data", data, "-o", tmp_path / "e", "--attn", "eager", "--packing", "--max-steps", 1, "--batch-size", 3)
    assert eager.exit_code == 0, eager.output


def _config(vlm, data, out, **kw) -> TrainConfig:
    base = {"model": str(vlm), "data": str(data), "output": str(out), "max_steps": 2, "batch_size": 4, "seed": 3, "warmup_ratio": 0.0,
            "full": True, "lr": 1e-3, "mixed_precision": "no", "max_length": 512, "overwrite": True}  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _close(a: dict, b: dict, tol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("extra", [
    {},
    {"perception_weight": "dynamic", "prior": "PRIOR"},
    {"grad_accum": 2, "batch_size": 2},
    {"full": False, "model": "IADA"},
], ids=["full", "dynamic+drift", "accumulation", "lora+iada"])  # fmt: skip
def test_a_packed_step_updates_as_the_padded_step(vlm, llm, data, tmp_path, extra):
    if extra.get("model"):
        from surgeon.modules.iada import IadaConfig, inject_iada

        inject_iada(str(vlm), tmp_path / "iada", IadaConfig(block_size=2))
        extra = {**extra, "model": str(tmp_path / "iada")}
    if extra.get("prior"):
        from surgeon.drift.prior import PriorConfig, compute_prior

        compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(tmp_path / "prior")))
        extra = {**extra, "prior": str(tmp_path / "prior")}
    padded = train(_config(vlm, data, tmp_path / "padded", **extra))
    packed = train(_config(vlm, data, tmp_path / "packed", packing=True, **extra))
    _close(_weights(tmp_path / "padded"), _weights(tmp_path / "packed"))
    for key in ("loss", "loss_perception", "loss_reasoning", "lambda", "tokens", "perception_tokens"):
        assert packed.metrics[key] == pytest.approx(padded.metrics[key], rel=1e-5, abs=1e-6), key
    assert packed.metrics["padding"] == 0 and padded.metrics["padding"] > 0
    lines = [json.loads(x) for x in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert all({"tokens", "padding", "tokens_per_s"} <= line.keys() for line in lines)


def test_image_lora_masks_and_resume_under_packing(vlm, data, tmp_path):
    from surgeon.heads.score import ScoreHeadsConfig, score_heads

    heads = tmp_path / "heads.json"
    score_heads(ScoreHeadsConfig(model=str(vlm), data=str(data), output=str(heads), steps=2))
    common = {"full": False, "image_lora": str(heads), "lr": 1e-2}
    train(_config(vlm, data, tmp_path / "il-padded", **common))
    train(_config(vlm, data, tmp_path / "il-packed", packing=True, **common))
    _close(_weights(tmp_path / "il-padded"), _weights(tmp_path / "il-packed"))
    whole = train(_config(vlm, data, tmp_path / "whole", packing=True, max_steps=3))
    train(_config(vlm, data, tmp_path / "cut", packing=True, max_steps=3, save_steps=1))
    import shutil

    shutil.rmtree(tmp_path / "cut")
    for name in ("checkpoint-2",):
        shutil.rmtree(tmp_path / "cut-checkpoints" / name)
    resumed = train(_config(vlm, data, tmp_path / "cut", packing=True, max_steps=3, save_steps=1, resume=True, overwrite=False))
    assert resumed.metrics["loss"] == whole.metrics["loss"]
    _close(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"), tol=0.0)


# ---------------------------------------------------------------------------- the chunked loss


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_the_chunked_loss_equals_the_plain_loss_and_its_gradients(softcap):
    from surgeon.perception.chunked import Head, head_span_losses
    from surgeon.perception.reweight import combine, span_losses

    torch.manual_seed(0)
    b, t, h, v = 2, 37, 16, 301
    hidden = torch.randn(b, t, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.3).requires_grad_()
    bias = (torch.randn(v) * 0.1).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[:, :5] = -100
    labels[1, 30:] = -100
    mask = torch.rand(b, t) < 0.3

    def plain() -> tuple:
        logits = torch.nn.functional.linear(hidden, weight, bias)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return span_losses(logits, labels, mask, totals=(40, 60))

    for lam in (0.3, 1.0):
        ref = plain()
        grads_ref = torch.autograd.grad(combine(ref, lam), (hidden, weight, bias))
        ours = head_span_losses(hidden, Head(weight, bias, softcap), labels, mask, totals=(40, 60), chunk=7)
        grads = torch.autograd.grad(combine(ours, lam), (hidden, weight, bias))
        assert torch.allclose(ours.perception, ref.perception, atol=1e-5) and torch.allclose(ours.reasoning, ref.reasoning, atol=1e-5)
        assert (ours.n_perception, ours.n_reasoning) == (ref.n_perception, ref.n_reasoning)
        for g, r in zip(grads, grads_ref):
            assert torch.allclose(g, r, atol=1e-5), (g - r).abs().max()


def test_the_trainer_route_computes_the_same_loss_chunked(vlm, data, tmp_path):
    """PerceptionLoss with and without the chunked head: the same weights after two steps."""
    from transformers import Trainer, TrainingArguments

    from surgeon import PerceptionCollator, PerceptionLoss
    from surgeon.modules.folders import load_model
    from helpers import trl_rows

    results = []
    for chunked in (True, False):
        torch.manual_seed(0)
        model = load_model(vlm, dtype=torch.float32)
        args = TrainingArguments(output_dir=str(tmp_path / f"t{chunked}"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                                 report_to="none", save_strategy="no", use_cpu=True, remove_unused_columns=False, seed=0, disable_tqdm=True)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=trl_rows(data, 8), data_collator=PerceptionCollator(vlm, base=data.parent))
        PerceptionLoss(0.3, chunked=chunked).attach(trainer)
        trainer.train()
        results.append({k: v.detach().clone() for k, v in model.named_parameters()})
    _close(results[0], results[1])


# ---------------------------------------------------------------------------- batches by tokens


def test_token_budgets_and_length_groups_keep_the_order_guarantees():
    from surgeon.training.order import SampleOrder, TokenBudgetOrder

    random.seed(1)
    lengths = tuple(random.randint(16, 700) for _ in range(300))
    for packed in (True, False):
        one, two = TokenBudgetOrder(lengths, 1200, 2, 1, 5, packed), TokenBudgetOrder(lengths, 1200, 1, 2, 5, packed)
        assert one.steps_per_epoch == two.steps_per_epoch > 0
        seen = []
        for step in range(one.steps_per_epoch):
            micro = one.micro_batches(step, 0)
            assert micro == two.micro_batches(step, 0) + two.micro_batches(step, 1)  # independent of world size
            for m in micro:
                cost = sum(lengths[i] for i in m) if packed else max(lengths[i] for i in m) * len(m)
                assert m and cost <= 1200
            seen += one.global_indices(step)
        assert len(seen) == len(set(seen)) and len(seen) > 0.9 * len(lengths)  # each sample at most once an epoch
        assert one.micro_batches(one.steps_per_epoch + 3, 0) == TokenBudgetOrder(lengths, 1200, 2, 1, 5, packed).micro_batches(one.steps_per_epoch + 3, 0)
    plain = SampleOrder(300, 4, 2, 1, 5)
    grouped = SampleOrder(300, 4, 2, 1, 5, lengths, group_by_length=True)
    for epoch in (0, 1):
        a = [i for s in range(epoch * plain.steps_per_epoch, (epoch + 1) * plain.steps_per_epoch) for i in plain.global_indices(s)]
        b = [i for s in range(epoch * grouped.steps_per_epoch, (epoch + 1) * grouped.steps_per_epoch) for i in grouped.global_indices(s)]
        assert sorted(a) == sorted(b)  # the same samples each epoch, in another order
    spread = lambda order: sum(max(lengths[i] for i in m) * len(m) - sum(lengths[i] for i in m) for s in range(order.steps_per_epoch) for m in order.micro_batches(s, 0))  # noqa: E731
    assert spread(grouped) < 0.5 * spread(plain)  # far less padding


def test_token_budget_runs_and_refuses_a_budget_below_one_sample(cli, vlm, data, tmp_path):
    ran = cli("train", vlm, "--data", data, "-o", tmp_path / "o", "--packing", "--max-tokens-per-batch", 500, "--max-steps", 2, "--json")
    assert ran.exit_code == 0, ran.output
    metrics = json.loads(ran.stdout)["metrics"]
    assert metrics["padding"] == 0 and 0 < metrics["tokens"] <= 500
    small = cli("train", vlm, "--data", data, "-o", tmp_path / "p", "--max-tokens-per-batch", 20, "--max-steps", 1)
    assert_one_line_error(small, "max_tokens_per_batch", "longest sample", "raise --max-tokens-per-batch")
    both = cli("train", vlm, "--data", data, "-o", tmp_path / "q", "--packing", "--group-by-length")
    assert_one_line_error(both, "group_by_length", "drop --group-by-length")


def test_the_plan_counts_the_logits_only_without_the_chunked_loss(cli, tmp_path):
    cfg = json.loads((__import__("pathlib").Path(__file__).parent / "configs" / "qwen2_5_vl_7b.json").read_text())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    plans = {}
    for flag in ("--chunked-loss", "--no-chunked-loss"):
        shown = cli("train", tmp_path / "m", "--dry-run", "--json", "--full", "--max-length", 2048, flag, "--gpu-memory", "1TB")  # a GPU plan (bf16)
        assert shown.exit_code == 0, shown.output
        plans[flag] = json.loads(shown.stdout)["parts"]["activations"]
    logits = 2048 * 152064 * (2 + 8 + 4)
    assert plans["--no-chunked-loss"] - plans["--chunked-loss"] > 0.9 * logits
