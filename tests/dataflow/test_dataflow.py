"""Data-flow candidates: the path model over resident source layers (nothing copied, a KV-cache place
per step, layer types in path order), its output scales against Sakana's input scaling, and the
passthrough export that ``evomerge merge`` builds into the same tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import make_tiny, perturbed

from evomerge.dataflow import ResidentPaths, parse_candidate, passthrough_recipe
from evomerge.dataflow.export import compare_built, slices_of
from evomerge.engine.merger import Merger, merge_to_disk
from evomerge.engine.sources import open_sources
from evomerge.errors import ConfigError


def paths_over(*dirs: Path) -> ResidentPaths:
    return ResidentPaths(Merger(open_sources([str(d) for d in dirs]), resident=True))


def cand(sources: dict[str, Path], path: list[list], **extra) -> dict:
    return {
        "merge_method": "dataflow",
        "sources": {k: str(v) for k, v in sources.items()},
        "path": path,
        **extra,
    }


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


IDS = torch.tensor([[5, 9, 3, 17, 40, 2, 11, 33, 7, 60, 21, 8]])


def test_a_path_through_one_model_in_order_is_that_model(tiny_family):
    base, fts = tiny_family
    rp = paths_over(fts[0])
    model, res = rp.materialize(cand({"a": fts[0]}, [["a", i, 1.0] for i in range(4)]), "t")
    assert torch.equal(logits(model, IDS), logits(load(fts[0]), IDS))
    assert res.digest.startswith("dfs1-") and res.steps == 4


def test_building_a_candidate_copies_no_tensor(tiny_family):
    base, fts = tiny_family
    rp = paths_over(fts[0], fts[1])
    path = [["a", 0, 1.0], ["b", 1, 0.7], ["b", 1, 1.3], ["a", 3, 2.0], ["b", 3, 1.0]]
    model, _ = rp.materialize(cand({"a": fts[0], "b": fts[1]}, path), "t")
    held = {p.data_ptr() for s in rp._held.values() for p in s.params.values()}
    ptrs = [p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False)]
    assert ptrs and all(p in held for p in ptrs)
    # the layer used twice is two modules over the same tensors
    layers = model.model.layers
    assert layers[1] is not layers[2]
    assert layers[1].mlp.down_proj.weight is layers[2].mlp.down_proj.weight
    # another path: the same model object, still nothing but the sources' storage
    model2, _ = rp.materialize(cand({"a": fts[0], "b": fts[1]}, [["b", 2, 1.0]]), "t")
    assert model2 is model and model.config.num_hidden_layers == 1
    assert all(p.data_ptr() in held for p in model.parameters())


def test_a_repeated_layer_has_its_own_kv_cache_place(tiny_family):
    base, fts = tiny_family
    rp = paths_over(fts[0])
    path = [["a", 0, 1.0], ["a", 1, 1.0], ["a", 1, 0.8], ["a", 1, 1.2], ["a", 3, 1.0]]
    model, _ = rp.materialize(cand({"a": fts[0]}, path), "t")
    assert [m.self_attn.layer_idx for m in model.model.layers] == [0, 1, 2, 3, 4]
    full = logits(model, IDS)
    with torch.no_grad():  # decode token by token through the cache: same logits as one pass
        out = model(IDS[:, :4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for j in range(4, IDS.shape[1]):
            out = model(IDS[:, j : j + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert len(cache.layers) == 5
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.fixture(scope="module")
def exact_norms(tmp_path_factory):
    """Two tiny Llamas whose RMSNorm eps is negligible (1e-12): scale invariance is then exact."""
    root = tmp_path_factory.mktemp("eps")
    base = make_tiny(root / "base", seed=3, rms_norm_eps=1e-12)
    return base, perturbed(base, root / "ft", seed=4, scale=0.1)


def _input_scaled(
    sources: dict[str, torch.nn.Module], path: list[list], ids: torch.Tensor
) -> torch.Tensor:
    """Sakana's definition, literally: each step runs its layer on the stream times its scale."""
    first, last = sources[path[0][0]].model, sources[path[-1][0]]
    with torch.no_grad():
        h = first.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        rope = first.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        for name, layer, s in path:
            h = sources[name].model.layers[layer](
                h * s, attention_mask=mask, position_embeddings=rope, position_ids=pos
            )
        return last.lm_head(last.model.norm(h))


def test_output_scales_compute_sakanas_input_scaling(exact_norms):
    a, b = exact_norms
    rp = paths_over(a, b)
    path = [["a", 0, 0.6], ["b", 1, 1.7], ["a", 1, 1.0], ["b", 1, 0.5], ["a", 3, 1.4]]
    model, _ = rp.materialize(cand({"a": a, "b": b}, path), "t")
    ref = _input_scaled({"a": load(a), "b": load(b)}, path, IDS)
    got = logits(model, IDS)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), float((got - ref).abs().max())
    # and the scales do matter: the same path unscaled is another function
    flat, _ = rp.materialize(cand({"a": a, "b": b}, [[n, i, 1.0] for n, i, _ in path]), "t")
    assert float((logits(flat, IDS) - ref).abs().max()) > 1e-2


def test_the_export_builds_the_tensors_and_logits_of_the_path(tiny_family, tmp_path):
    base, fts = tiny_family
    srcs = {"a": fts[0], "b": fts[1]}
    path = [
        ["a", 0, 1.0],
        ["a", 1, 1.3],
        ["b", 1, 0.7],
        ["b", 1, 1.1],
        ["b", 2, 1.0],
        ["a", 3, 0.9],
    ]
    m = cand(srcs, path)
    model, _ = paths_over(*srcs.values()).materialize(m, "t")
    c = parse_candidate(m, "t")
    recipe = passthrough_recipe(c, {k: str(v) for k, v in srcs.items()}, "float32")
    # runs of one source's consecutive layers at one output scale share a slice
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [
        [0, 1],
        [1, 2],
        [1, 2],
        [1, 3],
        [3, 4],
    ]
    assert "parameters" not in recipe["slices"][0]
    assert recipe["slices"][1]["parameters"]["scale"][0] == {
        "filter": "self_attn.o_proj",
        "value": 1 / 1.3,
    }
    merge_to_disk(recipe, tmp_path / "out")
    n, worst = compare_built(c, srcs, tmp_path / "out")
    assert n > 0 and worst == 0.0
    assert torch.allclose(logits(load(tmp_path / "out"), IDS), logits(model, IDS), atol=1e-5)


def test_sliding_window_layers_keep_their_type_in_path_order(tmp_path):
    qwen = make_tiny(
        tmp_path / "q",
        arch="qwen2",
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        max_position_embeddings=64,
    )
    rp = paths_over(qwen)
    path = [["q", 3, 1.0], ["q", 0, 1.0], ["q", 2, 0.8], ["q", 2, 1.1], ["q", 1, 1.0]]
    model, _ = rp.materialize(cand({"q": qwen}, path), "t")
    types = [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert model.config.layer_types == types
    assert [m.self_attn.sliding_window for m in model.model.layers] == [4, None, 4, 4, None]
    c = parse_candidate(cand({"q": qwen}, path), "t")
    merge_to_disk(passthrough_recipe(c, {"q": str(qwen)}, "float32"), tmp_path / "out")
    built = load(tmp_path / "out")
    assert built.config.layer_types == types
    ids = torch.randint(3, 60, (1, 12))  # longer than the window: the window matters
    assert torch.allclose(logits(built, ids), logits(model, ids), atol=1e-5)


def test_tied_embeddings_stay_tied_and_match_the_export(tmp_path):
    a = make_tiny(tmp_path / "a", seed=5, tie_word_embeddings=True)
    b = make_tiny(tmp_path / "b", seed=6, tie_word_embeddings=True)
    path = [["a", 0, 1.0], ["b", 2, 0.5], ["b", 3, 1.5]]
    m = cand({"a": a, "b": b}, path)
    model, _ = paths_over(a, b).materialize(m, "t")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    c = parse_candidate(m, "t")
    merge_to_disk(passthrough_recipe(c, {"a": str(a), "b": str(b)}, "float32"), tmp_path / "out")
    assert torch.allclose(logits(load(tmp_path / "out"), IDS), logits(model, IDS), atol=1e-5)


def test_digests_are_of_the_path_and_scales(tiny_family):
    base, fts = tiny_family
    one = parse_candidate(cand({"a": fts[0]}, [["a", 0, 1.0], ["a", 1, 0.5]]), "t")
    renamed = parse_candidate(cand({"x": fts[0], "y": fts[1]}, [["x", 0, 1.0], ["x", 1, 0.5]]), "t")
    other = parse_candidate(cand({"a": fts[0]}, [["a", 0, 1.0], ["a", 1, 0.5000001]]), "t")
    assert one.digest() == renamed.digest() != other.digest()
    assert slices_of(one) == [("a", 0, 1, 1.0), ("a", 1, 2, 2.0)]


@pytest.mark.parametrize(
    "patch, field, words",
    [
        ({"path": []}, "path", "has no layers"),
        ({"path": [["zz", 0, 1.0]]}, "path[0]", "source 'zz' is not in sources"),
        ({"path": [["a", 0, 0.0]]}, "path[0]", "the scale must be a number above 0"),
        ({"path": [["a", 0, -1.0]]}, "path[0]", "above 0"),
        ({"path": [["a", -1, 1.0]]}, "path[0]", "whole number >= 0"),
        ({"sources": {}}, "sources", "must map source names"),
        ({"extra": 1}, "extra", "unknown key"),
    ],
)
def test_bad_candidates_name_the_field(tiny_family, patch, field, words):
    base, fts = tiny_family
    m = {**cand({"a": fts[0]}, [["a", 0, 1.0]]), **patch}
    with pytest.raises(ConfigError) as e:
        parse_candidate(m, "f.yml")
    assert e.value.field == field and words in e.value.message


def test_a_layer_beyond_its_source_fails_the_candidate(tiny_family):
    base, fts = tiny_family
    with pytest.raises(ConfigError, match=r"layer 4 is beyond .* 4 layers"):
        paths_over(fts[0]).materialize(cand({"a": fts[0]}, [["a", 4, 1.0]]), "t")


def test_sources_of_other_shapes_are_refused(tiny_family, tmp_path):
    base, fts = tiny_family
    wide = make_tiny(tmp_path / "wide", hidden_size=32, num_attention_heads=4)
    bigvocab = make_tiny(tmp_path / "vocab", vocab_size=80)
    for other, words in ((wide, "hidden sizes"), (bigvocab, "vocabularies")):
        with pytest.raises(ConfigError, match=words):
            paths_over(fts[0], other).materialize(
                cand({"a": fts[0], "b": other}, [["a", 0, 1.0]]), "t"
            )
    gpt2 = make_tiny(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(ConfigError, match="pre-norm models"):
        paths_over(gpt2).materialize(cand({"g": gpt2}, [["g", 0, 1.0]]), "t")
