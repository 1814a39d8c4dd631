"""DRIFT and perception weighting in the Hugging Face Trainer or TRL's SFTTrainer, set up to give
the weights ``surgeon train --full --prior PRIOR [--perception-weight λ]`` gives (docs/integrations.md).

    surgeon demo --workdir demo/                                     # a tiny VLM and its prior
    python examples/make_dataset.py shapes/ --n 48
    python examples/trainer_drift.py demo/vlm shapes/data.jsonl demo/prior -o run-hf --max-steps 20
    python examples/trainer_drift.py demo/vlm shapes/data.jsonl demo/prior -o run-trl --trl --perception-weight 0.5

With a real model: the same lines with Qwen/Qwen2.5-VL-7B-Instruct, your data and `surgeon prior`'s
output, bf16 on GPUs, and `accelerate launch --use_fsdp …` to shard (never DeepSpeed: see the doc).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("data", help="JSONL in TRL `messages` or ShareGPT layout, <perception> tags in the answers")
    parser.add_argument("prior", help="a folder written by `surgeon prior`")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--trl", action="store_true", help="TRL's SFTTrainer instead of transformers' Trainer")
    parser.add_argument("--perception-weight", type=float, default=None, help="λ (default: plain cross-entropy)")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args(argv)

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText

    from surgeon import DriftCallback, PerceptionCollator, PerceptionLoss, freeze_vision

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    freeze_vision(model)  # the vision tower and projector stay as they are, as in surgeon train
    rows = load_dataset("json", data_files=args.data, split="train")
    collator = PerceptionCollator(args.model, max_length=2048, base=Path(args.data).parent)  # encodes as surgeon train does
    common = dict(
        output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=1.0, weight_decay=0.0,
        optim="adamw_torch_fused", remove_unused_columns=False, report_to="none", save_strategy="no", logging_steps=5,
    )  # fmt: skip
    if args.trl:
        from trl import SFTConfig, SFTTrainer

        # SFTConfig turns on bf16 and gradient checkpointing by default; set them as the run needs
        config = SFTConfig(**common, bf16=torch.cuda.is_available(), gradient_checkpointing=False,
                           dataset_kwargs={"skip_prepare_dataset": True})  # fmt: skip
        trainer = SFTTrainer(model=model, args=config, train_dataset=rows, data_collator=collator,
                             processing_class=collator.encoder.processor)  # fmt: skip
    else:
        from transformers import Trainer, TrainingArguments

        trainer = Trainer(model=model, args=TrainingArguments(**common, bf16=torch.cuda.is_available()), train_dataset=rows, data_collator=collator)
    DriftCallback(args.prior, alpha=1.0, scale="adaptive_cosine").attach(trainer)  # the loss: the step's tokens, as surgeon train
    if args.perception_weight is not None:
        PerceptionLoss(args.perception_weight).attach(trainer)  # λ·L_p + (1−λ)·L_r instead
    trainer.train()
    trainer.save_model(args.output)
    collator.encoder.processor.save_pretrained(args.output)
    print(f"trained {args.max_steps} steps; wrote {args.output}")
    return Path(args.output)


if __name__ == "__main__":
    main()
