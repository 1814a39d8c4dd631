"""Every registered surgeon module kind through the same invariants: identity at initialisation
(text, images, generation), only module parameters get gradients, gradient checkpointing gives
the same gradients, a deep copy runs its own modules, and a save/load round trip through surgeon
and through ``trust_remote_code`` without surgeon installed. A new kind is one entry in
``MODULE_KINDS`` (surgeon) and one entry in ``ADD`` (here); the kinds' own maths is tested in
their own files."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import image_batch, logits, randomise, run_without_surgeon, text_batch
from safetensors.torch import load_file, save_file

from surgeon import load_model
from surgeon.modules.folders import module_parameters, save_model
from surgeon.modules.iada import IadaConfig, add_iada
from surgeon.modules.image_lora import add_image_lora
from surgeon.modules.modeling_surgeon import MODULE_KINDS

HEADS = [[0], [], [0, 1], [1]]  # tiny models: 4 layers, 2 KV heads
ADD = {  # kind -> how a test attaches it (identity at init) to a loaded model
    "iada": lambda model: add_iada(model, IadaConfig(block_size=2)),
    "image_lora": lambda model: add_image_lora(model, HEADS),
}
VLMS = ["qwen2_5_vl", "qwen3_vl", "llava"]


def _load(folder):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    vision = hasattr(AutoConfig.from_pretrained(folder), "vision_config")
    return (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(folder).eval()


def _with(folder, kinds: tuple[str, ...]):
    model = _load(folder)
    for kind in kinds:
        ADD[kind](model)
    return model


def _loss(model, batch) -> torch.Tensor:
    out = model(**batch).logits
    return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def test_every_registered_kind_is_in_the_matrix():
    assert set(ADD) == set(MODULE_KINDS)


@pytest.mark.parametrize("family", VLMS)
@pytest.mark.parametrize("kind", sorted(ADD))
def test_identity_at_initialisation(tiny_models, kind, family):
    folder = tiny_models(family)
    base, model = _load(folder), _with(folder, (kind,))
    images, text = image_batch(folder), text_batch()
    for batch in (text, images):
        assert torch.equal(logits(model, **batch), logits(base, **batch))
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**images, **kw), base.generate(**images, **kw))
    randomise(model, kind=kind)  # and the module does act once trained
    assert not torch.allclose(logits(model, **images), logits(base, **images))


@pytest.mark.parametrize("kind", sorted(ADD))
def test_only_module_parameters_get_gradients(vlm, kind):
    model = _load(vlm)
    model.requires_grad_(False)
    ADD[kind](model)
    randomise(model, scale=0.2)
    _loss(model, image_batch(vlm)).backward()
    modules = module_parameters(model)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in modules)
    assert all(p.requires_grad and p.grad is not None for p in modules.values())
    assert sum(float(p.grad.abs().sum()) for p in modules.values()) > 0  # (a boundary reading one state has no query gradient)


@pytest.mark.parametrize("kind", sorted(ADD))
def test_gradient_checkpointing_gives_the_same_gradients(vlm, kind):
    batch, grads = image_batch(vlm), []
    for checkpointing in (False, True):
        model = _load(vlm)
        model.requires_grad_(False)
        ADD[kind](model)
        randomise(model, scale=0.2)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        _loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in module_parameters(model).items()})
    assert sum(float(g.abs().sum()) for g in grads[0].values()) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


@pytest.mark.parametrize("kind", sorted(ADD))
def test_a_deep_copy_runs_its_own_modules(vlm, kind):
    """copy.deepcopy(model) (reference models, EMA) gets hooks bound to its own modules: zeroing the
    copy's module parameters (the identity for every kind) leaves the original trained."""
    batch = image_batch(vlm)
    base = logits(_load(vlm), **batch)
    model = _with(vlm, (kind,))
    randomise(model, kind=kind)
    trained = logits(model, **batch)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in module_parameters(twin).values():
            p.zero_()
    assert torch.equal(logits(twin, **batch), base)
    assert torch.equal(logits(model, **batch), trained)


ROUND_TRIPS = {  # name -> (tiny model family, kinds)
    "iada": ("qwen2_5_vl", ("iada",)),
    "iada-text-llm": ("qwen2", ("iada",)),
    "image_lora": ("qwen2_5_vl", ("image_lora",)),
    "both": ("llava", ("iada", "image_lora")),
}


@pytest.fixture(scope="module")
def round_trips(tiny_models, tmp_path_factory):
    """Each case saved twice (at init and trained); logits through surgeon here, and through
    ``trust_remote_code`` in one process without surgeon (``run_without_surgeon``)."""
    from transformers import AutoProcessor

    tmp = tmp_path_factory.mktemp("round-trips")
    jobs, results = [], {}
    for name, (family, kinds) in ROUND_TRIPS.items():
        folder = tiny_models(family)
        base = _load(folder)
        vision = hasattr(base.config, "vision_config")
        batch = image_batch(folder) if vision else text_batch()
        processor = AutoProcessor.from_pretrained(folder) if vision else None
        inputs = tmp / f"{name}-inputs.safetensors"
        save_file({k: v.contiguous() for k, v in batch.items()}, inputs)
        model = _with(folder, kinds)
        initial = save_model(model, tmp / f"{name}-init", processor=processor)
        randomise(model, seed=5, scale=0.3)
        trained = save_model(model, tmp / f"{name}-trained", processor=processor)
        loaded = load_model(trained).eval()
        saved, again = module_parameters(model), module_parameters(loaded)
        results[name] = {
            "base": logits(base, **batch),
            "trained": logits(model, **batch),
            "surgeon": logits(loaded, **batch),
            "same_parameters": saved.keys() == again.keys() and all(torch.equal(saved[n], again[n]) for n in saved),
            "kinds": set(loaded.config.surgeon),
            "plain": logits(_load(trained), **batch),  # without trust_remote_code: the base model
        }
        auto = "AutoModelForImageTextToText" if vision else "AutoModelForCausalLM"
        for tag, path in (("init", initial), ("remote", trained)):
            out = tmp / f"{name}-{tag}-logits.safetensors"
            jobs.append({"folder": str(path), "auto": auto, "inputs": str(inputs), "output": str(out)})
            results[name][f"{tag}_file"] = out
    run_without_surgeon(jobs, tmp)
    return results


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_save_and_load_through_surgeon_and_trust_remote_code(round_trips, name):
    r = round_trips[name]
    assert r["kinds"] == set(ROUND_TRIPS[name][1]) and r["same_parameters"]
    assert not torch.allclose(r["trained"], r["base"])
    assert torch.equal(r["surgeon"], r["trained"])
    assert torch.equal(load_file(r["remote_file"])["logits"], r["trained"])
    assert torch.equal(load_file(r["init_file"])["logits"], r["base"])  # identity at init, without surgeon
    assert torch.equal(r["plain"], r["base"])
