"""Search-space directives: parsing, rendering to plain recipes, hand recipes as points, bad input."""

from __future__ import annotations

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.recipe.schema import parse_recipe
from evomerge.space import load_space, parse_space

SPACE = {
    "merge_method": {"choice": ["task_arithmetic", "ties", "dare_ties"]},
    "base_model": "/m/base",
    "models": [
        {
            "model": "/m/a",
            "parameters": {
                "weight": {"range": [0.0, 1.0]},
                "density": {"range": [0.2, 1.0], "per_layers": 2},
            },
        },
        {"model": "/m/b", "parameters": {"weight": 0.5, "density": 0.7}},
    ],
    "parameters": {"lambda": {"range": [0.5, 2.0], "log": True}, "normalize": False},
    "dtype": "float32",
}


def _fixed(values):
    def suggest(name, d):
        return values[name]

    return suggest


def test_directive_names_and_kinds():
    s = parse_space(SPACE, "s.yml")
    got = {d.name: d.kind for d in s.directives}
    assert got == {"method": "choice", "weight.a": "float", "density.a": "float", "lambda": "float"}
    lam = next(d for d in s.directives if d.name == "lambda")
    assert lam.log and lam.low == 0.5 and lam.high == 2.0
    assert s.model_refs() == ["/m/base", "/m/a", "/m/b"]


def test_per_layer_groups_expand_to_an_exact_per_layer_gradient():
    s = parse_space(SPACE, "s.yml")
    values = {
        "method": "ties",
        "weight.a": 0.25,
        "density.a.g0": 0.3,
        "density.a.g1": 0.6,
        "density.a.g2": 0.9,
        "lambda": 1.0,
    }
    r = s.render(_fixed(values), lambda ref: 5)  # 5 layers, groups of 2 -> 3 groups
    assert r["models"][0]["parameters"]["density"] == [0.3, 0.3, 0.6, 0.6, 0.9]
    assert r["models"][0]["parameters"]["weight"] == 0.25
    # mergekit positions a gradient at t*(len-1) with t = i/(n-1): a list of n values is exact per layer
    parse_recipe(r, "rendered")


def test_method_choice_samples_and_writes_only_that_methods_parameters():
    s = parse_space(SPACE, "s.yml")
    asked = []

    def suggest(name, d):
        asked.append(name)
        return {"method": "task_arithmetic", "weight.a": 0.8, "lambda": 1.5}[name]

    r = s.render(suggest, lambda ref: 4)
    # task_arithmetic takes weight, lambda, normalize: density is neither sampled nor written
    assert asked == ["method", "weight.a", "lambda"]
    assert r["parameters"] == {"lambda": 1.5, "normalize": False}
    assert r["models"] == [
        {"model": "/m/a", "parameters": {"weight": 0.8}},
        {"model": "/m/b", "parameters": {"weight": 0.5}},
    ]
    parse_recipe(r, "rendered")


def test_method_choice_incompatible_with_the_models_is_refused():
    with pytest.raises(ConfigError, match=r"bad.yml: models: merge_method slerp takes exactly 2"):
        parse_space({**SPACE, "merge_method": {"choice": ["ties", "slerp"]}}, "bad.yml")


def test_anchors_make_a_gradient_per_filter_and_hand_recipe_is_a_point():
    text = """
slices:
  - sources:
      - {model: /m/a, layer_range: [0, 8]}
      - {model: /m/b, layer_range: [0, 8]}
merge_method: slerp
base_model: /m/a
parameters:
  t:
    - filter: self_attn
      value: {range: [0, 1], anchors: 5}
    - filter: mlp
      value: {range: [0, 1], anchors: 5}
    - value: 0.5
"""
    s = parse_space(yaml.safe_load(text), "s.yml")
    assert [d.name for d in s.directives] == ["t.self_attn", "t.mlp"]
    hand = yaml.safe_load(
        text.replace("{range: [0, 1], anchors: 5}", "[0, 0.5, 0.3, 0.7, 1]", 1).replace(
            "{range: [0, 1], anchors: 5}", "[1, 0.5, 0.7, 0.3, 0]"
        )
    )
    values = s.values_of(hand, lambda ref: 8)
    assert values == {
        **{f"t.self_attn.{i}": v for i, v in enumerate([0, 0.5, 0.3, 0.7, 1])},
        **{f"t.mlp.{i}": v for i, v in enumerate([1, 0.5, 0.7, 0.3, 0])},
    }
    assert s.render_values(values, lambda ref: 8)["parameters"]["t"][1]["value"] == [
        1,
        0.5,
        0.7,
        0.3,
        0,
    ]
    outside = yaml.safe_load(yaml.safe_dump(hand))
    outside["parameters"]["t"][2]["value"] = 0.25  # a fixed value differs: not a point of the space
    assert s.values_of(outside, lambda ref: 8) is None


def test_layer_range_directives_for_frankenmerges():
    data = {
        "slices": [
            {"sources": [{"model": "/m/a", "layer_range": [0, {"int": [4, 8]}]}]},
            {"sources": [{"model": "/m/b", "layer_range": [{"int": [0, 3]}, {"int": [4, 8]}]}]},
        ],
        "merge_method": "passthrough",
    }
    s = parse_space(data, "s.yml")
    assert [(d.name, d.kind) for d in s.directives] == [
        ("s0.end", "int"),
        ("s1.start", "int"),
        ("s1.end", "int"),
    ]
    r = s.render(_fixed({"s0.end": 6, "s1.start": 2, "s1.end": 5}), lambda ref: 8)
    assert [src["layer_range"] for sl in r["slices"] for src in sl["sources"]] == [[0, 6], [2, 5]]


def test_plain_recipe_is_a_one_point_space():
    recipe = {
        "models": [
            {"model": "/m/a", "parameters": {"weight": 1.0}},
            {"model": "/m/b", "parameters": {"weight": 1.0}},
        ],
        "merge_method": "linear",
    }
    s = parse_space(recipe, "s.yml")
    assert s.is_fixed and s.render(_fixed({}), lambda ref: 4) == recipe


@pytest.mark.parametrize(
    "search, sampler",
    [
        (None, "tpe"),  # no search section: pruning on
        ({"trials": 10}, "tpe"),  # pruning on by default: tpe learns from pruned trials
        ({"prune": False}, "gp"),  # without pruning gp was the measured best
        ({"prune": False, "objectives": "tasks"}, "tpe"),  # gp takes one objective
        ({"objectives": ["a", "b"], "sampler": "nsga2"}, "nsga2"),
        ({"prune": True, "sampler": "random"}, "random"),
    ],
)
def test_default_sampler_follows_pruning_and_objectives(search, sampler):
    # The measured best (bench/bench_samplers.py); a default must never be refused by the checks
    # that follow it (gp with several objectives is).
    s = parse_space({**SPACE, **({"search": search} if search is not None else {})}, "s.yml")
    assert s.search.sampler == sampler


@pytest.mark.parametrize(
    "patch, field, words",
    [
        (
            {"parameters": {"lambda": {"rang": [0, 1]}}},
            "parameters.lambda.rang",
            "unknown search directive (did you mean range",
        ),
        (
            {"parameters": {"lambda": {"range": [2.0, 1.0]}}},
            "parameters.lambda.range",
            "empty range",
        ),
        (
            {"parameters": {"lambda": {"range": [0.0, 1.0], "log": True}}},
            "parameters.lambda.log",
            "low > 0",
        ),
        ({"parameters": {"lambda": {"range": [1, 1]}}}, "parameters.lambda.range", "low < high"),
        (
            {"parameters": {"lamda": {"range": [0.5, 1.0]}}},
            "parameters.lamda",
            "did you mean lambda",
        ),
        (
            {"merge_method": {"choice": ["ties", "tie"]}},
            "merge_method.choice",
            "unknown merge_method 'tie'",
        ),
        ({"search": {"sampler": "cmaes"}}, "search.sampler", "cmaes cannot sample categorical"),
        ({"search": {"trials": 0}}, "search.trials", "positive integer"),
        ({"search": {"items": 0}}, "search.items", "positive integer"),
        ({"search": {"items": 2.5}}, "search.items", "positive integer"),
        ({"search": {"sampler": "tpe2"}}, "search.sampler", "did you mean tpe"),
        ({"search": {"trails": 5}}, "search.trails", "did you mean trials"),
        ({"study": {"nme": "x"}}, "study.nme", "did you mean name"),
        # an empty list key in YAML is null: refused here, not a traceback when a point renders
        ({"models": None}, "models", "must be a list of models, got NoneType"),
        ({"slices": None}, "slices", "must be a list of slices, got NoneType"),
        ({"models": [5]}, "models[0]", "must be a mapping {model, parameters}"),
        ({"slices": [5]}, "slices[0]", "must be a mapping {sources: [...]}"),
        ({"slices": [{"sources": [5]}]}, "slices[0].sources", "must be a list of {model"),
        ({"slices": [{"sources": "x"}]}, "slices[0].sources", "must be a list of {model"),
        # every option of a choice is checked, not just the first (a typo past it failed each trial that picked it)
        (
            {"dtype": {"choice": ["float32", "float33"]}},
            "dtype.choice",
            "option 'float33': unknown dtype",
        ),
    ],
)
def test_bad_spaces_name_file_and_field(patch, field, words):
    data = {**SPACE, **patch}
    with pytest.raises(ConfigError) as e:
        parse_space(data, "bad.yml")
    msg = str(e.value)
    assert msg.startswith(f"bad.yml: {field}:"), msg
    assert words in msg and "\n" not in msg


def test_fixed_method_typo_in_parameter_is_reported(tmp_path):
    p = tmp_path / "s.yml"
    p.write_text(
        yaml.safe_dump(
            {
                **SPACE,
                "merge_method": "ties",
                "parameters": {"lambda": 1.0},
                "models": [
                    {"model": "/m/a", "parameters": {"wieght": {"range": [0, 1]}, "density": 0.5}}
                ],
            }
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"s.yml: models\[0\].parameters.wieght: unknown parameter for merge_method ties \(did you mean weight",
    ):
        load_space(p)
