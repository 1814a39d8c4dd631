"""DRIFT and perception weighting inside the Hugging Face Trainer and TRL's SFTTrainer, through
``surgeon.DriftCallback``, ``surgeon.PerceptionLoss`` and ``surgeon.PerceptionCollator``."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import trl_rows


@pytest.fixture(scope="module")
def rows(shapes_data):
    """The synthetic rows as TRL's vision datasets come, and the folder their image paths are relative to."""
    data = shapes_data("trl")
    return trl_rows(data), data.parent


@pytest.fixture(scope="module")
def prior(vlm, tmp_path_factory):
    from surgeon.demo import tiny
    from surgeon.drift.prior import PriorConfig, compute_prior

    root = tmp_path_factory.mktemp("integration-prior")
    reasoning = tiny.build_reasoning_llm(vlm, root / "r1", scale=0.5)
    compute_prior(PriorConfig(reasoning=str(reasoning), vlm=str(vlm), output=str(root / "prior")))
    return root / "prior"


def _model(vlm):
    from transformers import AutoModelForImageTextToText

    from surgeon.training.lora import set_trainable

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(vlm)
    set_trainable(model, full=True, train_vision=False)
    return model


def _args(tmp_path, name, sft=False, **kw):
    common = dict(
        output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True, seed=0,
        remove_unused_columns=False, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0,
    )  # fmt: skip
    common.update(kw)
    if sft:
        from trl import SFTConfig

        return SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True})
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def _train(trainer_cls, vlm, rows, tmp_path, name, callbacks=(), sft=False, loss=None, drift=None, **kw):
    from surgeon import PerceptionCollator

    data, base = rows
    collator = PerceptionCollator(vlm, max_length=512, base=base)
    model = _model(vlm)
    extra = {"processing_class": collator.encoder.processor} if sft else {}
    trainer = trainer_cls(model=model, args=_args(tmp_path, name, sft, **kw), train_dataset=data, data_collator=collator,
                          callbacks=list(callbacks), **extra)  # fmt: skip
    if loss is not None:
        loss.attach(trainer)
    if drift is not None:
        drift.attach(trainer)
    trainer.train()
    return model, trainer


def _trainers():
    from transformers import Trainer
    from trl import SFTTrainer

    return {"trainer": (Trainer, False), "sft": (SFTTrainer, True)}


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_drift_callback_alpha_zero_is_the_plain_run_and_alpha_pulls_toward_the_prior(vlm, rows, prior, tmp_path, kind):
    from surgeon import DriftCallback
    from surgeon.drift.prior import open_prior
    from surgeon.anatomy.decoder import lm_parameters

    cls, sft = _trainers()[kind]
    plain, _ = _train(cls, vlm, rows, tmp_path, "plain", sft=sft)
    zero, _ = _train(cls, vlm, rows, tmp_path, "zero", [DriftCallback(prior, alpha=0.0)], sft=sft)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))

    callback = DriftCallback(prior, alpha=1e-2, scale="absolute")
    drifted, trainer = _train(cls, vlm, rows, tmp_path, "drift", [callback], sft=sft)
    assert trainer.args.max_grad_norm == 1.0  # handed back after training
    assert callback.last.biased == 28  # every tensor with a non-zero Δ, once per optimiser step
    assert all(d.device == p.device for d, p in zip(callback.drift.deltas, callback.drift.params))
    start = dict(lm_parameters(_model(vlm)))
    ours, theirs = dict(lm_parameters(drifted)), dict(lm_parameters(plain))
    with open_prior(prior) as p:
        for name in p.names:
            rel = p.relative(name)
            delta = p.read(name)
            if delta.norm() == 0:
                continue
            target = start[rel].detach() + delta
            assert (ours[rel].detach() - target).norm() < (theirs[rel].detach() - target).norm(), rel
    assert callback.last.mean_coefficient > 0  # also added to the trainer's logs (drift_coefficient, drift_tensors)


def test_drift_binds_to_the_model_as_it_is_when_training_begins(vlm, rows, prior, tmp_path):
    """Δ is built at train begin on the parameters' devices: a model changed after the callback
    (and the trainer) were made is the one biased."""
    from transformers import Trainer

    from surgeon import DriftCallback, PerceptionCollator

    data, base = rows
    callback = DriftCallback(prior, alpha=1.0)
    model = _model(vlm)
    trainer = Trainer(model=model, args=_args(tmp_path, "moved", max_steps=1), train_dataset=data,
                      data_collator=PerceptionCollator(vlm, base=base), callbacks=[callback])  # fmt: skip
    model.to(torch.float64)  # every parameter replaced after the trainer was built
    trainer.train()
    current = {id(p) for p in model.parameters()}
    assert all(id(p) in current and p.dtype == torch.float64 for p in callback.drift.params)


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_perception_loss_counts_both_spans_over_the_step(vlm, rows, tmp_path, kind):
    """attach() makes the trainer count each span over the whole step (2 micro-batches here) and
    the loss uses those totals: exactly the token counts of the batches it fetched."""
    from surgeon import PerceptionCollator, PerceptionLoss
    from surgeon.training.integrations import split_labels

    cls, sft = _trainers()[kind]
    data, base = rows
    loss = PerceptionLoss(0.7)
    model = _model(vlm)
    collator = PerceptionCollator(vlm, max_length=512, base=base)
    extra = {"processing_class": collator.encoder.processor} if sft else {}
    trainer = cls(model=model, args=_args(tmp_path, "lam", sft, max_steps=1), train_dataset=data, data_collator=collator, **extra)
    loss.attach(trainer)
    fetched = []
    counted = trainer.get_batch_samples

    def spy(*args, **kw):
        batches, n = counted(*args, **kw)
        fetched.extend(batches)
        return batches, n

    trainer.get_batch_samples = spy
    trainer.train()
    assert len(fetched) == 2 and trainer.compute_loss_func is loss
    labels, mask = zip(*(split_labels(b["labels"][..., 1:]) for b in fetched))
    n_p = sum(int(((lab != -100) & m).sum()) for lab, m in zip(labels, mask))
    n_r = sum(int(((lab != -100) & ~m).sum()) for lab, m in zip(labels, mask))
    assert loss.counts == (n_p, n_r) and n_p > 0 and n_r > 0
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_perception_loss_is_the_weighted_span_formula():
    from surgeon import PerceptionLoss
    from surgeon.training.integrations import PERCEPTION_OFFSET
    from surgeon.perception.reweight import combine, span_losses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.tensor([[-100, 3, 4, 5, 6, -100], [-100, -100, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    carried = torch.where(mask, labels + PERCEPTION_OFFSET, labels)
    loss = PerceptionLoss(0.3)
    loss.counts = (7, 9)  # the step's totals, as attach() records them
    got = loss({"logits": logits}, carried)
    want = combine(span_losses(logits, labels, mask, totals=(7, 9)), 0.3)
    assert torch.equal(got, want)


def test_an_unattached_perception_loss_refuses_to_run():
    from surgeon import PerceptionLoss
    from surgeon.errors import ConfigError

    with pytest.raises(ConfigError, match="attach"):
        PerceptionLoss(0.3)({"logits": torch.zeros(1, 3, 5)}, torch.tensor([[-100, 1, 2]]))


@pytest.fixture(scope="module")
def repeated(shapes_data):
    """One image sample four times (so that every sampler's order agrees) as a file and as rows."""
    from datasets import Dataset

    source = shapes_data("trl")
    line = next(x for x in source.read_text().splitlines() if '"image"' in x)
    data = source.parent / "repeated.jsonl"
    data.write_text((line + "\n") * 4)
    messages = json.loads(line)["messages"]
    rows = Dataset.from_list([{"messages": json.dumps(messages)}] * 4).map(lambda r: {"messages": json.loads(r["messages"])})
    return data, rows


@pytest.mark.parametrize(
    "kind,lam", [("trainer", 0.5), ("trainer", None), ("sft", 0.5), ("sft", None)],
    ids=["trainer-perception-loss", "trainer-drift-attach", "sft-perception-loss", "sft-drift-attach"],
)  # fmt: skip
def test_trainer_and_trl_routes_equal_surgeon_train_bit_for_bit(cli, vlm, prior, repeated, tmp_path, kind, lam):
    """Where the setups match — full fine-tuning, AdamW (fused), cosine schedule without warm-up,
    clipping at 1.0, 2 micro-batches of 2 per step, fp32 (SFTConfig's defaults bf16 and gradient
    checkpointing turned off) — the Trainer or TRL's SFTTrainer with DriftCallback, and either
    PerceptionLoss (fixed λ) or DriftCallback.attach alone (the step's-tokens loss), give the same
    weights bit for bit as ``surgeon train --prior`` (with the same ``--perception-weight``) after 2 steps."""
    from transformers import AutoModelForImageTextToText, Trainer
    from trl import SFTTrainer

    from surgeon import DriftCallback, PerceptionCollator, PerceptionLoss

    data, rows = repeated
    weight = ["--perception-weight", str(lam)] if lam is not None else []
    result = cli("train", vlm, "--data", data, "-o", tmp_path / "surgeon", "--full", "--prior", prior, "--drift-alpha", "1",
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--warmup-ratio", "0",
                 "--mixed-precision", "no", "--max-length", "512", *weight)  # fmt: skip
    assert result.exit_code == 0, result.output

    model = _model(vlm)
    sft = kind == "sft"
    fp32 = {"bf16": False, "gradient_checkpointing": False} if sft else {}
    args = _args(tmp_path, "hf", sft, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                 optim="adamw_torch_fused", **fp32)  # fmt: skip
    collator = PerceptionCollator(vlm, max_length=512, base=data.parent)
    extra = {"processing_class": collator.encoder.processor} if sft else {}
    trainer = (SFTTrainer if sft else Trainer)(model=model, args=args, train_dataset=rows, data_collator=collator, **extra)
    drift = DriftCallback(prior, alpha=1.0, scale="adaptive_cosine")
    if lam is None:
        drift.attach(trainer)
    else:
        trainer.add_callback(drift)
        PerceptionLoss(lam).attach(trainer)
    trainer.train()

    ours = AutoModelForImageTextToText.from_pretrained(tmp_path / "surgeon").state_dict()
    theirs = model.state_dict()
    assert ours.keys() == theirs.keys()
    start = _model(vlm).state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], start[k])]
    assert len(changed) > 20  # the language model trained
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])][:5]


def test_an_attached_drift_callback_gives_the_same_update_however_the_step_is_split(vlm, rows, prior, tmp_path):
    """Samples of different lengths, one optimiser step of 4 as 1 micro-batch of 4 or 2 of 2 (plain
    SGD, so the update is the gradient): with DriftCallback.attach the loss is normalised by the
    step's tokens and the two agree; given only as a callback, Qwen2.5-VL (accepts_loss_kwargs
    False) has its loss averaged per micro-batch by the Trainer, the two differ, and a warning says so."""
    from transformers import Trainer

    from surgeon import DriftCallback

    data, base = rows
    four = (data.select(range(4)), base)

    def run(name, batch, accum, attach):
        drift = DriftCallback(prior, alpha=1.0)
        kw = dict(max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, optim="sgd", max_grad_norm=0.0)
        model, _ = _train(Trainer, vlm, four, tmp_path, name, () if attach else (drift,), drift=drift if attach else None, **kw)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    start = torch.cat([p.detach().flatten() for p in _model(vlm).parameters()])
    whole, split = run("whole", 4, 1, True), run("split", 2, 2, True)
    update = (whole - start).norm()
    assert update > 0 and (whole - split).norm() / update < 1e-4
    with pytest.warns(UserWarning, match="averages its loss per micro-batch"):
        unattached = run("unattached", 2, 2, False)
    assert (whole - unattached).norm() / update > 1e-2


def test_drift_callback_refuses_deepspeed_and_freeze_vision_freezes_what_is_outside_the_language_model(vlm, llm, prior, monkeypatch):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from surgeon import DriftCallback, freeze_vision
    from surgeon.anatomy.decoder import lm_parameters
    from surgeon.errors import ConfigError

    args = SimpleNamespace(deepspeed="ds_zero2.json", fp16=False, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="does not run under DeepSpeed"):
        DriftCallback(prior).on_train_begin(args, None, None, model=_model(vlm))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch --use_deepspeed
    with pytest.raises(ConfigError, match="does not run under DeepSpeed"):
        DriftCallback(prior).on_train_begin(SimpleNamespace(fp16=False, max_grad_norm=1.0), None, None, model=_model(vlm))

    model = _model(vlm)
    for p in model.parameters():
        p.requires_grad_(True)
    lm = {id(p) for _, p in lm_parameters(model)}
    frozen = freeze_vision(model)
    assert frozen == sum(1 for p in model.parameters() if id(p) not in lm) > 0
    assert all(p.requires_grad == (id(p) in lm) for p in model.parameters())
    with pytest.raises(ConfigError, match="no parameters outside its language model"):
        freeze_vision(AutoModelForCausalLM.from_pretrained(llm))
