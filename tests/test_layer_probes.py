"""``surgeon probe-layers``: the swap probe changes one layer at a time and restores it bit for bit,
the mask-vision probe hides images from text exactly from layer ℓ on (also through generation),
the plateau and suggested range follow the curves, and bad input gets one line."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_one_line_error


@pytest.fixture(scope="module")
def probe_models(vlm, tmp_path_factory):
    from surgeon.demo import tiny

    root = tmp_path_factory.mktemp("probe-models")
    return {
        "reasoning": tiny.build_reasoning_llm(vlm, root / "r1", scale=0.5),
        "same": tiny.build_reasoning_llm(vlm, root / "same", scale=0.0),  # the VLM's own language model
    }


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _encoded(vlm, data, images: bool, n: int = 2):
    from surgeon.data.encoding import SampleEncoder
    from surgeon.data.scan import scan_samples

    encoder = SampleEncoder.from_pretrained(vlm, max_length=512)
    scanned = scan_samples(str(data), supervised=True)
    with_images = set(scanned.with_images)
    picked = [i for i in range(len(scanned)) if (i in with_images) == images][:n]
    batch = encoder.collate([encoder.encode(scanned.sample(i)) for i in picked])
    batch.pop("perception_mask", None)
    return encoder, batch


def test_swap_changes_one_layer_to_the_reasoning_models_and_restores_it_bit_for_bit(vlm, probe_models, data):
    from surgeon.evaluation.layers import ProbeConfig, _SwapSource
    from surgeon.hub.sources import open_checkpoint
    from surgeon.modules.folders import load_eval_model

    source = _SwapSource(ProbeConfig(vlm=str(vlm), reasoning=str(probe_models["reasoning"]), data=str(data)))
    model = load_eval_model(vlm, "cpu", "float32")
    before = _state(model)
    read: list[str] = []
    original = source.vlm.read
    source.vlm.read = lambda name, *a: (read.append(name), original(name, *a))[1]  # type: ignore[method-assign]
    with source.applied(model, 1, 1.0):
        during = _state(model)
    after = _state(model)

    changed = {k for k in before if not torch.equal(before[k], during[k])}
    assert changed and all(".layers.1." in k for k in changed)
    assert read and all(".layers.1." in name for name in read)  # one layer's tensors read, no more
    with open_checkpoint(probe_models["reasoning"]) as llm:
        for key in changed:  # weight 1: the reasoning model's tensor, under the VLM's name
            theirs = llm.read(key.replace("model.language_model.", "model.")).float()
            torch.testing.assert_close(during[key], theirs, rtol=0, atol=1e-6)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_swapping_in_the_vlms_own_language_model_changes_nothing(vlm, probe_models, data):
    from surgeon.evaluation.layers import ProbeConfig, probe_layers

    result = probe_layers(ProbeConfig(vlm=str(vlm), reasoning=str(probe_models["same"]), data=str(data), probes="swap", accuracy=False))
    base = result.baseline["text"]["loss"]
    assert len(result.layers) == result.num_layers
    assert all(row["swap_loss"] == pytest.approx(base, rel=1e-6) for row in result.layers)


def test_swap_at_half_weight_lies_between(vlm, probe_models, data):
    from surgeon.evaluation.layers import ProbeConfig, _SwapSource
    from surgeon.modules.folders import load_eval_model

    model = load_eval_model(vlm, "cpu", "float32")
    source = _SwapSource(ProbeConfig(vlm=str(vlm), reasoning=str(probe_models["reasoning"]), data=str(data), weight=0.5))
    before = _state(model)
    with source.applied(model, 0, 1.0):
        full = _state(model)
    with source.applied(model, 0, 0.5):
        half = _state(model)
    for key in before:
        torch.testing.assert_close(half[key], (before[key] + full[key]) / 2, rtol=0, atol=1e-6)


def _text_logits(model, batch):
    with torch.no_grad():
        out = model(**batch).logits
    text = ~torch.isin(batch["input_ids"], torch.tensor([model.config.image_token_id]))
    return out[text]


def test_masking_from_layer_zero_makes_text_blind_to_the_pixels(vlm, data):
    """Masked from layer 0, no text position reads an image position at any layer: the text logits
    do not depend on the pixels. Masked from the last layer on, they do (the layers below read them);
    masked from past the last layer, nothing changes."""
    from surgeon.evaluation.masking import VisionMask
    from surgeon.modules.folders import load_eval_model

    model = load_eval_model(vlm, "cpu", "float32")
    encoder, batch = _encoded(vlm, data, images=True)
    other = {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}
    plain = _text_logits(model, batch)
    with VisionMask(model, encoder.placeholder_ids) as mask:
        mask.start = mask.num_layers
        torch.testing.assert_close(_text_logits(model, batch), plain, rtol=0, atol=1e-5)
        mask.start = 0
        blind = _text_logits(model, batch)
        torch.testing.assert_close(_text_logits(model, other), blind, rtol=0, atol=1e-5)
        assert (blind - plain).abs().max() > 1e-4
        mask.start = mask.num_layers - 1
        assert (_text_logits(model, other) - _text_logits(model, batch)).abs().max() > 1e-4
    torch.testing.assert_close(_text_logits(model, batch), plain, rtol=0, atol=0)  # the backend is restored


def test_masking_leaves_text_only_rows_alone(vlm, data):
    from surgeon.evaluation.masking import VisionMask
    from surgeon.modules.folders import load_eval_model

    model = load_eval_model(vlm, "cpu", "float32")
    encoder, batch = _encoded(vlm, data, images=False)
    plain = _text_logits(model, batch)
    with VisionMask(model, encoder.placeholder_ids) as mask:
        mask.start = 0
        torch.testing.assert_close(_text_logits(model, batch), plain, rtol=0, atol=1e-5)


def test_the_mask_follows_generation(vlm, data):
    """Generated tokens are text: under the mask from layer 0 they never read the image either, so
    the greedy continuation does not depend on the pixels."""
    from surgeon.evaluation.masking import VisionMask
    from surgeon.modules.folders import load_eval_model

    model = load_eval_model(vlm, "cpu", "float32")
    encoder, batch = _encoded(vlm, data, images=True, n=1)
    first = batch["labels"][0].ne(-100).nonzero()[0, 0]
    length = batch["input_ids"].shape[1]
    prompt = {k: v[:, :first] if v.ndim == 2 and v.shape[1] == length else v for k, v in batch.items() if k != "labels"}
    other = {**prompt, "pixel_values": torch.randn_like(prompt["pixel_values"])}
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with VisionMask(model, encoder.placeholder_ids) as mask:
        mask.start = 0
        a = model.generate(**prompt, **settings)
        b = model.generate(**other, **settings)
    assert torch.equal(a, b)


def test_plateau_and_suggestion_read_the_curves():
    from surgeon.evaluation.layers import _plateau, _suggest

    base = {"images": {"loss": 1.0}}
    mask = [3.0, 2.5, 1.6, 1.05, 1.02, 1.0]  # effect 2.0; within 5 % (0.1) from layer 3 on
    swap = [5.0, 4.0, 1.1, 1.3, 1.2, 9.0]
    table = [{"layer": i, "mask_loss": m, "swap_loss": s} for i, (m, s) in enumerate(zip(mask, swap))]
    notes: list[str] = []
    plateau = _plateau(table, base, 0.05, notes)
    assert plateau == [3, 4, 5] and not notes
    assert _suggest(table, base, plateau) == "3-4"  # the plateau's layers whose swap is at most the median (1.3)
    flat = [{"layer": i, "mask_loss": 1.0} for i in range(4)]
    assert _plateau(flat, base, 0.05, notes) is None and "does not need its images" in notes[0]


def test_cli_writes_the_record_the_picture_and_json(cli, vlm, probe_models, data, tmp_path):
    out = tmp_path / "probe"
    result = cli("probe-layers", "--vlm", vlm, "--reasoning", probe_models["reasoning"], "--data", data, "-o", out,
                 "--limit", "3", "--max-new-tokens", "4", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    record = json.loads((out / "surgeon.json").read_text())
    assert record["artifact"] == "layer-probe" and record["command"] == "probe-layers"
    assert (out / "layers.png").stat().st_size > 0
    layers = shown["layers"]
    assert [r["layer"] for r in layers] == list(range(shown["num_layers"]))
    assert all({"swap_loss", "swap_accuracy", "mask_loss", "mask_accuracy"} <= r.keys() for r in layers)
    assert shown["baseline"]["text"]["n"] == 3 and shown["baseline"]["images"]["n"] == 3


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--probe", "swap"], ("--reasoning",)),
        (["--probe", "nope"], ("not a probe",)),
        (["--weight", "0", "--probe", "mask-vision"], ("weight",)),
        (["--probe", "mask-vision", "--modules", "attn", "--image-data", "TEXT"], ("no row with an image",)),
        (["--reasoning", "LLM", "--probe", "swap", "--data", "IMAGES"], ("text-only",)),
    ],
)
def test_bad_input_gets_one_line(cli, vlm, llm, data, tmp_path, extra, fragments):
    import shutil

    shutil.copytree(data.parent / "images", tmp_path / "images")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if "image" not in json.dumps(r)))
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if "image" in json.dumps(r)))
    swap = {"TEXT": str(tmp_path / "text.jsonl"), "IMAGES": str(tmp_path / "images.jsonl"), "LLM": str(llm)}
    extra = [swap.get(a, a) for a in extra]
    if "--data" not in extra:
        extra += ["--data", str(data)]
    result = cli("probe-layers", "--vlm", vlm, *extra, "-o", tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])  # (the tiny families with an image processor)
def test_masking_from_layer_zero_blinds_text_in_other_families(family, shapes_data, tmp_path):
    from surgeon.demo import tiny
    from surgeon.evaluation.masking import VisionMask
    from surgeon.modules.folders import load_eval_model

    vlm = tiny.build(family, tmp_path / family)
    model = load_eval_model(vlm, "cpu", "float32")
    encoder, batch = _encoded(vlm, shapes_data("trl"), images=True, n=1)
    other = {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}
    image = torch.tensor(sorted(encoder.placeholder_ids))

    def text_logits(inputs):
        with torch.no_grad():
            return model(**inputs).logits[~torch.isin(inputs["input_ids"], image)]

    assert (text_logits(other) - text_logits(batch)).abs().max() > 1e-4
    with VisionMask(model, encoder.placeholder_ids) as mask:
        mask.start = 0
        torch.testing.assert_close(text_logits(other), text_logits(batch), rtol=0, atol=1e-5)
