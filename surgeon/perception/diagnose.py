"""``surgeon diagnose``: how much of the supervision a dataset spends on perception.

    report = diagnose(DiagnoseConfig(data="data.jsonl", model="Qwen/Qwen2.5-VL-7B-Instruct"))
    report.token_share, report.loss_share

The paper's first measurement (docs/methods.md §5): in chain-of-thought supervision the perception
span is a small share of the supervised tokens (≈2.5% on its data) and a smaller share of the
loss (≈1.3%), so plain token-averaged SFT under-trains perception. Here the tokens are those the
model is trained on (its processor, chat template, ``max_length``), and the loss is the model's
own cross-entropy on them, computed without gradients in batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from surgeon import dtypes
from surgeon.data.samples import DataStats

from surgeon.data.scan import scan_samples
from surgeon.data.encoding import Progress, SampleEncoder
from surgeon.data.loading import encode_samples
from surgeon.errors import ConfigError



@dataclass(frozen=True)
class DiagnoseConfig:
    """What to measure. ``max_samples``: the first N good samples; ``max_length``: tokens per sample
    (longer samples are truncated, as training does; a sample whose image would be cut is skipped).

    ``device``: ``auto`` is the first GPU when there is one, else the CPU. ``dtype``: ``auto`` is
    float32 on CPU and the checkpoint's dtype on GPU.
    """

    data: str
    model: str
    batch_size: int = 4
    max_samples: int | None = None
    max_length: int = 2048
    perception_regex: str | None = None
    skip_bad_lines: bool = False
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError("max_samples", f"must be at least 1, got {self.max_samples}")
        if self.max_length < 2:
            raise ConfigError("max_length", f"must be at least 2, got {self.max_length}")
        object.__setattr__(self, "dtype", dtypes.short(self.dtype, extra=("auto",)))


@dataclass(frozen=True)
class DiagnoseReport:
    """Token and loss shares of the perception span among supervised tokens.

    ``*_loss_sum``: summed cross-entropy (nats) over the span's tokens; ``mean_*_loss``: per token.
    """

    data: str
    model: str
    supervised_tokens: int
    perception_tokens: int
    reasoning_tokens: int
    perception_loss_sum: float
    reasoning_loss_sum: float
    stats: dict = field(default_factory=dict)

    @property
    def token_share(self) -> float:
        return self.perception_tokens / self.supervised_tokens if self.supervised_tokens else 0.0

    @property
    def loss_share(self) -> float:
        total = self.perception_loss_sum + self.reasoning_loss_sum
        return self.perception_loss_sum / total if total > 0 else 0.0

    @property
    def mean_perception_loss(self) -> float:
        return self.perception_loss_sum / self.perception_tokens if self.perception_tokens else float("nan")

    @property
    def mean_reasoning_loss(self) -> float:
        return self.reasoning_loss_sum / self.reasoning_tokens if self.reasoning_tokens else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("token_share", "loss_share", "mean_perception_loss", "mean_reasoning_loss"):
            value = getattr(self, key)
            out[key] = None if value != value else value  # NaN -> null in JSON
        return out


def diagnose(config: DiagnoseConfig, progress: Progress | None = None) -> DiagnoseReport:
    """Encode the data with the model's processor and measure the perception share of tokens and loss."""
    import torch

    from surgeon.perception.reweight import span_masks, token_losses

    from surgeon.hub.sources import open_checkpoint

    stats = DataStats()
    samples = scan_samples(config.data, config.perception_regex, config.skip_bad_lines, config.max_samples, stats).samples()
    with open_checkpoint(config.model) as ckpt:  # a local folder, or a Hub repo id through the cache
        folder = ckpt.path
    encoder = SampleEncoder.from_pretrained(folder, config.max_length, name=config.model)
    from surgeon.modules.folders import load_eval_model

    model = load_eval_model(folder, config.device, config.dtype)
    device = next(model.parameters()).device
    sums = {"perception": 0.0, "reasoning": 0.0}
    counts = {"perception": 0, "reasoning": 0}
    pending: list = []

    def flush() -> None:
        batch = {
            k: v.to(device, model.dtype if v.is_floating_point() else None)
            for k, v in encoder.collate(pending).items()
        }
        pending.clear()
        mask = batch.pop("perception_mask")
        labels = batch.pop("labels")
        with torch.no_grad():
            ce = token_losses(model(**batch).logits, labels)
        for name, span in zip(("perception", "reasoning"), span_masks(labels, mask)):
            sums[name] += float(ce[span].sum())
            counts[name] += int(span.sum())

    for _, enc in encode_samples(samples, encoder, stats, config.skip_bad_lines, progress):
        pending.append(enc)
        if len(pending) == config.batch_size:
            flush()
    if pending:
        flush()
    return DiagnoseReport(
        data=config.data,
        model=config.model,
        supervised_tokens=counts["perception"] + counts["reasoning"],
        perception_tokens=counts["perception"],
        reasoning_tokens=counts["reasoning"],
        perception_loss_sum=sums["perception"],
        reasoning_loss_sum=sums["reasoning"],
        stats=stats.to_dict(),
    )
