"""Encoding with real processors: labels, placeholders, perception masks, truncation, batches."""

from __future__ import annotations

import json

import pytest
import torch

from surgeon.data.formats import parse_record

from surgeon.data.samples import BadSample, DataStats

from surgeon.data.scan import load_samples
from surgeon.data.encoding import IGNORE_INDEX, SampleEncoder, collate
from surgeon.data.loading import EncodedDataset, encode_samples
from surgeon.errors import DataError
from surgeon.anatomy.layout import visual_token_mask

VLMS = ("qwen2_5_vl", "qwen3_vl", "llava")


@pytest.fixture(scope="session")
def encoders(tiny_models):
    cache: dict[str, SampleEncoder] = {}

    def get(family: str, max_length: int | None = None) -> SampleEncoder:
        if family not in cache:
            cache[family] = SampleEncoder.from_pretrained(tiny_models(family))
        enc = cache[family]
        return enc if max_length is None else SampleEncoder(enc.processor, max_length, enc.placeholder_ids, enc.name)

    return get


def config(tiny_models, family: str) -> dict:
    return json.loads((tiny_models(family) / "config.json").read_text())


@pytest.mark.parametrize("family", VLMS)
def test_labels_placeholders_and_perception_mask(encoders, shapes_data, tiny_models, family):
    encoder = encoders(family)
    tok = encoder.tokenizer
    samples = load_samples(shapes_data("trl"))
    for sample in samples:
        enc = encoder.encode(sample)
        ids, labels, perception = enc.input_ids, enc.labels, enc.perception_mask
        supervised = labels != IGNORE_INDEX
        assert torch.equal(labels[supervised], ids[supervised])
        # labels: exactly each assistant turn's text followed by the template's end-of-turn token
        expected = "".join(t.text.strip() + "<|im_end|>" for t in sample.turns if t.role == "assistant")
        assert tok.decode(ids[supervised]) == expected
        # image placeholders: one run per image, never supervised, sized as the processor says
        visual = visual_token_mask(ids, config(tiny_models, family))
        assert not (visual & supervised).any()
        if "image_grid_thw" in enc.vision:
            assert int(visual.sum()) == int(enc.vision["image_grid_thw"].prod(-1).sum()) // 4
        else:
            assert int(visual.sum()) == 4 * len(sample.images)
        assert (int(visual.sum()) > 0) == bool(sample.images)
        # the perception mask covers exactly the tagged text
        assert not (perception & ~supervised).any()
        assert tok.decode(ids[perception]).strip() == " ".join(sample.perception_text())


@pytest.mark.parametrize("family", VLMS)
def test_every_format_encodes_to_the_same_tensors(encoders, shapes_data, family):
    encoder = encoders(family)
    encoded = {fmt: [encoder.encode(s) for s in load_samples(shapes_data(fmt))] for fmt in ("trl", "sharegpt", "llamafactory")}
    for fmt, items in encoded.items():
        for a, b in zip(encoded["trl"], items, strict=True):
            assert a.tokens.keys() == b.tokens.keys() and a.vision.keys() == b.vision.keys(), fmt
            assert all(torch.equal(a.tokens[k], b.tokens[k]) for k in a.tokens), fmt
            assert all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision), fmt


def test_text_llm_tokenizer(tiny_models, shapes_data):
    encoder = SampleEncoder.from_pretrained(tiny_models("qwen2", seed=1))
    samples = load_samples(shapes_data("trl"))
    text = next(s for s in samples if not s.images)
    enc = encoder.encode(text)
    assert enc.vision == {} and enc.tokens.keys() == {"input_ids", "labels", "perception_mask", "attention_mask"}
    assert encoder.tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX]) == text.turns[-1].text + "<|im_end|>"
    with pytest.raises(BadSample, match="no image processor"):
        encoder.encode(next(s for s in samples if s.images))


def test_template_that_rewrites_the_assistant_text_is_refused(tiny_models, shapes_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models("qwen2", seed=1))
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
    samples = [s for s in load_samples(shapes_data("trl")) if not s.images]
    with pytest.raises(DataError, match=r"data.jsonl:\d+: chat template changes the assistant text"):
        list(encode_samples(samples, SampleEncoder(tok)))
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + tok.chat_template
    with pytest.raises(DataError, match=r"data.jsonl:\d+: chat template refuses the conversation: no system role"):
        list(encode_samples(samples, SampleEncoder(tok)))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(DataError, match="chat template drops the assistant's text"):
        SampleEncoder(tok)


def test_literal_placeholder_text_is_a_bad_line(encoders, tmp_path):
    row = {"messages": [{"role": "user", "content": "What is <|image_pad|>?"}, {"role": "assistant", "content": "A token."}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row))
    with pytest.raises(DataError, match=r"d.jsonl:1: processor refuses the sample: .*image_pad"):
        list(encode_samples(load_samples(tmp_path / "d.jsonl"), encoders("qwen2_5_vl")))


def test_template_without_end_of_turn_marker_gets_eos(tiny_models, shapes_data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models("qwen2", seed=1))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    encoder = SampleEncoder(tok)
    assert encoder.turn_suffix == "" and encoder.appended_eos == tok.eos_token == "<|im_end|>"
    rows = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<perception>A red dot.</perception> One."},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "Two <perception>dots</perception>."}]  # fmt: skip
    enc = encoder.encode(parse_record({"messages": rows}, tiny_models.root))
    decode = encoder.tokenizer.decode
    assert decode(enc.input_ids) == "user: Q1 assistant: A red dot. One.<|im_end|> user: Q2 assistant: Two dots.<|im_end|> "
    assert decode(enc.input_ids[enc.labels != IGNORE_INDEX]) == "A red dot. One.<|im_end|>Two dots.<|im_end|>"
    assert decode(enc.input_ids[enc.perception_mask]) in ("A red dot. dots", "A red dot.dots")  # " dots" or "dots"


def test_visual_token_mask_accepts_config_forms(tiny_models):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_models("qwen2_5_vl"))
    ids = torch.tensor([[1, cfg.image_token_id, cfg.video_token_id, 2]])
    expected = torch.tensor([[False, True, True, False]])
    for form in (cfg, cfg.to_dict(), {"image": cfg.image_token_id, "video": cfg.video_token_id}):
        assert torch.equal(visual_token_mask(ids, form), expected)
    assert not visual_token_mask(ids, {"model_type": "qwen2"}).any()


def test_truncation_never_cuts_image_tokens(encoders, shapes_data, tiny_models, tmp_path):
    from PIL import Image

    Image.new("RGB", (112, 112), (200, 30, 30)).save(tmp_path / "big.png")  # 16 placeholder tokens
    rows = [
        {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red."}], "images": ["big.png"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you?"}]},
        {"messages": [{"role": "user", "content": "A long question " * 8}, {"role": "assistant", "content": "Yes."}]},
    ]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    samples = load_samples(tmp_path / "d.jsonl")
    full = [encoders("qwen2_5_vl").encode(s) for s in samples]
    visual = visual_token_mask(full[0].input_ids, config(tiny_models, "qwen2_5_vl"))
    limit = int((full[1].labels != IGNORE_INDEX).nonzero()[0]) + 3  # the short answer's first 3 tokens
    assert visual[:limit].any() and visual[limit:].any()  # the limit falls inside the image's tokens
    stats = DataStats()
    kept = list(encode_samples(samples, encoders("qwen2_5_vl", max_length=limit), stats))
    assert stats.skipped == {
        f"image placeholders beyond max_length ({limit})": 1,
        f"no supervised tokens within max_length ({limit})": 1,
    }
    assert stats.skipped_lines == {k: [n] for k, n in zip(stats.skipped, (1, 3))}
    ((i, enc),) = kept
    assert i == 1 and len(enc) == limit and int((enc.labels != IGNORE_INDEX).sum()) == 3
    assert all(torch.equal(v, full[1].tokens[k][:limit]) for k, v in enc.tokens.items())
    # when nothing fits, the run stops with a clear message
    with pytest.raises(DataError, match=r"all 12 samples were skipped: .*image placeholders beyond max_length \(8\)"):
        EncodedDataset(load_samples(shapes_data("trl")), encoders("qwen2_5_vl", max_length=8))


def test_batches_run_through_the_model_like_single_samples(encoders, shapes_data, tiny_models):
    from transformers import AutoModelForImageTextToText

    encoder = encoders("qwen2_5_vl")
    samples = load_samples(shapes_data("trl"))
    stats = DataStats()
    dataset = EncodedDataset(samples, encoder, stats)
    assert stats.used == len(dataset) == 12 and stats.images == sum(len(s.images) for s in samples)
    picked = [i for i, s in enumerate(samples) if s.meta["kind"] in ("multi", "text", "shapes", "multiturn")]
    items = [dataset[i] for i in picked]
    batch = collate(items, encoder.pad_token_id)
    assert batch["perception_mask"].dtype == torch.bool and batch["input_ids"].shape == batch["labels"].shape
    assert batch["image_grid_thw"].shape[0] == sum(len(samples[i].images) for i in picked) >= 4
    assert batch["pixel_values"].shape[0] == sum(e.vision.get("pixel_values", torch.empty(0)).shape[0] for e in items)
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["input_ids"][pad] == encoder.pad_token_id).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and not batch["perception_mask"][pad].any()

    model = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl")).eval()
    batch.pop("perception_mask")
    with torch.no_grad():
        out = model(**batch)
        assert torch.isfinite(out.loss)
        for row, item in enumerate(items):
            single = collate([item], encoder.pad_token_id)
            single.pop("perception_mask")
            alone = model(**single).logits[0]
            torch.testing.assert_close(out.logits[row, : len(item)], alone, atol=1e-5, rtol=1e-5)
