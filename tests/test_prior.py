"""DRIFT priors: Δ per docs/methods.md §1 under the VLM's names, statistics, loading, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_one_line_error

from surgeon.demo import tiny
from surgeon.hub.sources import open_checkpoint
from surgeon.errors import CheckpointError
from surgeon.drift.prior import PriorConfig, compute_prior, open_prior


@pytest.fixture(scope="module")
def reasoning(vlm, tmp_path_factory):
    """A reasoning LLM = the VLM's language model + a structured delta (realistic statistics)."""
    return tiny.build_reasoning_llm(vlm, tmp_path_factory.mktemp("r1") / "r1")


def _prior(tmp_path, reasoning, vlm, name="prior", **kw):
    return compute_prior(PriorConfig(reasoning=str(reasoning), vlm=str(vlm), output=str(tmp_path / name), **kw))


def _tensors(path):
    with open_prior(path) as p:
        return {p.relative(n): p.read(n) for n in p.names}


def test_prior_of_a_model_with_itself_is_zero(tmp_path, vlm):
    result = _prior(tmp_path, vlm, vlm, modules=("full",))
    assert result.counts["selected"] == result.counts["matched"] == 51
    for delta in _tensors(tmp_path / "prior").values():
        assert not delta.any()
    assert result.total["delta_norm"] == 0 and result.total["cosine"] == pytest.approx(1.0)


def test_prior_is_antisymmetric(tmp_path, tiny_models, reasoning):
    other = tiny_models("qwen2", seed=1)
    _prior(tmp_path, reasoning, other, "ab", modules=("full",))
    _prior(tmp_path, other, reasoning, "ba", modules=("full",))
    ab, ba = _tensors(tmp_path / "ab"), _tensors(tmp_path / "ba")
    assert ab.keys() == ba.keys() and len(ab) == 51
    for rel in ab:
        assert torch.equal(ab[rel], -ba[rel]), rel


def test_single_mode_is_reasoning_minus_vlm_under_vlm_names(tmp_path, vlm, reasoning):
    result = _prior(tmp_path, reasoning, vlm)
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r, open_prior(tmp_path / "prior") as p:
        assert p.lm_prefix == "model." and p.lm_head == "lm_head.weight" and p.mode == "single"
        assert set(p.names) <= set(v.tensors)
        assert {p.relative(n).split(".")[2] for n in p.names} == {"self_attn", "mlp"}
        for name in p.names:
            rel = p.relative(name)
            expected = r.read("model." + rel).float() - v.read(name).float()
            assert torch.equal(p.read(name), expected), name
            assert p.vlm_norm(name) == pytest.approx(float(v.read(name).double().norm()), rel=1e-6)
            assert p.rows(name) is None
    assert result.counts == {"matched": 51, "unmatched_lm": 0, "llm_only": 0, "vision": 30, "other": 0, "selected": 40, "skipped": 11}


def test_statistics_match_an_independent_computation(tmp_path, vlm, reasoning):
    result = _prior(tmp_path, reasoning, vlm, modules=("attn", "mlp", "norm"))
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r:

        def flat(ckpt, names):
            return torch.cat([ckpt.read(n).double().reshape(-1) for n in names])

        def expect(names):
            dv, dr = flat(v, names), flat(r, names)
            return {
                "delta_norm": float((dr - dv).norm()),
                "vlm_norm": float(dv.norm()),
                "relative_distance": float((dr - dv).norm() / dv.norm()),
                "cosine": float(dr @ dv / (dr.norm() * dv.norm())),
            }

        def check(got, names):
            want = expect(names)
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5), key
            assert 1 - got["cosine"] == pytest.approx(1 - want["cosine"], rel=1e-3)  # precise near 1 too

        layer2 = [n for n in v.tensors if n.startswith("model.layers.2.") and ("self_attn" in n or "mlp" in n or "norm" in n)]
        row = next(x for x in result.layers if x["layer"] == 2)
        assert row["tensors"] == len(layer2) == 12
        check(row, layer2)
        mlp = [n for n in v.tensors if ".mlp." in n and n.startswith("model.layers.")]
        check(next(x for x in result.families if x["family"] == "mlp"), mlp)
        one = "model.layers.1.self_attn.q_proj.weight"
        check(result.tensors[one], [one])
        assert [x["family"] for x in result.families] == ["attn", "mlp", "norm"]
        assert result.total["tensors"] == 4 * 12
        assert 0.99 < result.total["cosine"] < 1 and 0 < result.total["relative_distance"] < 0.05


def test_two_model_mode(tmp_path, tiny_models, vlm, reasoning):
    base = tiny_models("qwen2", seed=1)
    result = _prior(tmp_path, reasoning, vlm, base=str(base))
    assert result.mode == "two-model"
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r, open_checkpoint(base) as b, open_prior(tmp_path / "prior") as p:
        assert p.mode == "two-model" and len(p.names) == 40
        for name in p.names:
            rel = "model." + p.relative(name)
            assert torch.equal(p.read(name), r.read(rel).float() - b.read(rel).float())
            rv, vv = r.read(rel).double().reshape(-1), v.read(name).double().reshape(-1)
            cosine = float(rv @ vv / max(float(rv.norm() * vv.norm()), 1e-12))  # eps-clamped, as in docs/methods.md (Notation)
            assert result.tensors[name]["cosine"] == pytest.approx(cosine, rel=1e-5, abs=1e-12)
        assert set(p.record["inputs"]) == {"reasoning", "vlm", "base"}


def test_storage_dtype_and_shards(tmp_path, vlm, reasoning):
    _prior(tmp_path, reasoning, vlm, dtype="bf16", shard_size=100_000)
    folder = tmp_path / "prior"
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("model-*.safetensors"))) > 1
    with open_checkpoint(vlm) as v, open_checkpoint(reasoning) as r, open_prior(folder) as p:
        name = "model.layers.3.mlp.up_proj.weight"
        assert p._ckpt.tensors[name].dtype == "BF16"
        expected = (r.read(name).float() - v.read(name).float()).to(torch.bfloat16).float()
        assert torch.equal(p.read(name), expected)
        assert p._ckpt.files == sorted(p._ckpt.files)  # shards in file order, whatever the index's key order


def test_memory_layout_gives_the_same_prior(tmp_path, tiny_models, vlm, reasoning):
    _prior(tmp_path, reasoning, vlm, "legacy")
    _prior(tmp_path, reasoning, tiny_models.memory_layout("qwen2_5_vl"), "memory")
    with open_prior(tmp_path / "memory") as p:
        assert p.lm_prefix == "model.language_model." and p.names[0].startswith("model.language_model.layers.")
    legacy, memory = _tensors(tmp_path / "legacy"), _tensors(tmp_path / "memory")
    assert legacy.keys() == memory.keys()
    assert all(torch.equal(legacy[k], memory[k]) for k in legacy)


def test_vocab_mismatch_zeroes_the_extra_rows(tmp_path, tiny_models):
    big_vlm, llm = tiny_models("qwen2_5_vl", vocab_size=520), tiny_models("qwen2", seed=1)
    result = _prior(tmp_path, llm, big_vlm, modules=("embed", "head"))
    assert any("first 512 rows are paired" in n for n in result.notes)
    with open_checkpoint(big_vlm) as v, open_checkpoint(llm) as r, open_prior(tmp_path / "prior") as p:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            delta = p.read(name)
            assert delta.shape == (520, 64) and p.rows(name) == 512
            assert torch.equal(delta[:512], r.read(name).float() - v.read(name, 512).float())
            assert not delta[512:].any()
            assert p.vlm_norm(name) == pytest.approx(float(v.read(name).double().norm()), rel=1e-6)


def test_tied_reasoning_model_pairs_its_embeddings_with_the_vlm_head(tmp_path, tiny_models, vlm):
    tied = tiny_models("qwen2", seed=1, tie_word_embeddings=True)
    result = _prior(tmp_path, tied, vlm, modules=("head",))
    assert any("ties its head to its embeddings" in n for n in result.notes)
    with open_checkpoint(vlm) as v, open_checkpoint(tied) as r, open_prior(tmp_path / "prior") as p:
        assert p.names == ["lm_head.weight"]
        assert torch.equal(p.read("lm_head.weight"), r.read("model.embed_tokens.weight") - v.read("lm_head.weight"))


def test_open_prior_refuses_other_folders(tmp_path, vlm):
    with pytest.raises(CheckpointError, match="is not a prior \\(has no surgeon.json\\); create one with: surgeon prior"):
        open_prior(vlm)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "surgeon.json").write_text(json.dumps({"artifact": "model"}))
    with pytest.raises(CheckpointError, match="holds a surgeon 'model', not a prior"):
        open_prior(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no such prior folder"):
        open_prior(tmp_path / "nope")


# ---------------------------------------------------------------- the command


def test_cli_prints_the_per_layer_table_and_json(cli, tmp_path, vlm, reasoning):
    result = cli("prior", "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "p", "--layers", "1-2", "--no-bias")
    assert result.exit_code == 0, result.output
    assert "per layer" in result.stdout and "cos(θ_R, θ_VLM)" in result.stdout
    assert "prior (single) of 14 tensors (attn,mlp; layers 1-2; no biases)" in result.stdout
    record = json.loads((tmp_path / "p" / "surgeon.json").read_text())
    assert record["artifact"] == "prior" and record["config"]["layers"] == [1, 2] and record["config"]["bias"] is False
    assert [r["layer"] for r in record["stats"]["layers"]] == [1, 2]
    data = json.loads(cli("prior", "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "q", "--json").stdout)
    assert data["counts"]["selected"] == 40 and len(data["tensors"]) == 40


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--modules", "re:gate_prj"], ["pattern 're:gate_prj' matched nothing", "attn (", "mlp (", "final_norm ("]),
        (["--modules", "attention"], ["modules: unknown preset 'attention'", "attn, mlp, norm"]),
        (["--layers", "2-9"], ["layers: layer 9 does not exist", "4 decoder layers (0-3)"]),
        (["--skip-first", "4"], ["skip_first: 4 skips every layer"]),
        (["--shard-size", "lots"], ["shard_size: cannot read 'lots' as a size"]),
    ],
)
def test_cli_bad_selection_leaves_nothing(cli, tmp_path, vlm, reasoning, args, fragments):
    result = cli("prior", "--reasoning", reasoning, "--vlm", vlm, "-o", tmp_path / "out", *args)
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_inputs(cli, tmp_path, tiny_models, vlm, reasoning):
    out = tmp_path / "out"
    assert_one_line_error(cli("prior", "--reasoning", vlm, "--vlm", reasoning, "-o", out), "did you swap --vlm and --reasoning?")
    mismatched = tiny_models("qwen2", seed=1, hidden_size=32)
    assert_one_line_error(cli("prior", "--reasoning", mismatched, "--vlm", vlm, "-o", out), "differ in shape", "share the VLM's language-model")
    assert_one_line_error(cli("prior", "--reasoning", tmp_path / "nope", "--vlm", vlm, "-o", out), "no such folder")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(cli("prior", "--reasoning", reasoning, "--vlm", vlm, "-o", out), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli("prior", "--reasoning", reasoning, "--vlm", vlm, "-o", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "surgeon.json"]
    assert json.loads((out / "surgeon.json").read_text())["config"]["dtype"] == "fp32"  # the VLM's, as resolved


def test_cli_never_writes_over_or_into_an_input(cli, tmp_path, vlm, reasoning):
    import shutil

    mine = shutil.copytree(vlm, tmp_path / "mine")
    before = sorted(p.name for p in mine.iterdir())
    for out, relation in ((mine, "is the input"), (mine / "prior", "is inside the input"), (tmp_path, "contains the input")):
        result = cli("prior", "--reasoning", reasoning, "--vlm", mine, "-o", out, "--overwrite")
        assert_one_line_error(result, relation, "choose an output outside the inputs")
    assert sorted(p.name for p in mine.iterdir()) == before
    result = cli("merge", "--reasoning", mine, "--vlm", vlm, "-o", mine, "--overwrite", "--method", "linear")
    assert_one_line_error(result, f"{mine} is the input {mine}")


def test_open_prior_takes_a_hub_repo_id_through_the_cache(vlm, llm, tmp_path, offline_hub):
    """A prior pushed to the Hub opens (and trains) by its repo id, offline from the cache."""
    import shutil

    from surgeon.drift.prior import PriorConfig, compute_prior, open_prior

    compute_prior(PriorConfig(reasoning=str(llm), vlm=str(vlm), output=str(tmp_path / "prior")))
    snap = offline_hub / "hub" / "models--acme--tiny-prior" / "snapshots" / ("c" * 40)
    shutil.copytree(tmp_path / "prior", snap)
    (offline_hub / "hub" / "models--acme--tiny-prior" / "refs").mkdir()
    (offline_hub / "hub" / "models--acme--tiny-prior" / "refs" / "main").write_text("c" * 40)
    with open_prior("acme/tiny-prior") as hub, open_prior(tmp_path / "prior") as local:
        assert hub.names == local.names and hub.path == snap
        assert all(torch.equal(hub.read(n), local.read(n)) for n in hub.names)
