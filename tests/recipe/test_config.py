"""Recipe schema: parsing of settings, and refusals that need no model (one ConfigError naming the field)."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.recipe.schema import Cond, load_recipe


def lin(**params):
    return {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": 1, **params}},
            {"model": "b", "parameters": {"weight": 2}},
        ],
    }


def test_setting_forms():
    cfg = load_recipe(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "slices": [
                {
                    "sources": [
                        {"model": "a", "layer_range": [0, 4]},
                        {"model": "b", "layer_range": [0, 4]},
                    ]
                }
            ],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": "1e-1"}]},
        }
    )
    assert cfg.parameters["t"] == (Cond((0.0, 1.0), "self_attn"), Cond(0.1, None))
    assert (
        "t: \n" not in cfg.to_yaml() and "value: [0, 1]" in cfg.to_yaml()
    )  # number lists inline, like mergekit


def test_unlisted_base_is_referenced_first():
    cfg = load_recipe(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}],
        }
    )
    assert cfg.referenced_models() == ["base", "x"]


@pytest.mark.parametrize(
    "recipe, field, text",
    [
        (lin(normalize=True), "models[0].parameters.normalize", "set once per tensor"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]},
            "models[0].parameters",
            "needs `weight`",
        ),
        (lin() | {"tokenizer_source": "union"}, "tokenizer_source", "not supported"),
        (
            lin()
            | {
                "models": [
                    {"model": "a", "parameters": {"weight": 1}},
                    {"model": "a", "parameters": {"weight": 1}},
                ]
            },
            "models",
            "listed twice",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
                "parameters": {"t": 0.5},
            },
            "models",
            "exactly 2",
        ),
        (
            lin() | {"parameters": {"weight": [{"filter": "mlp", "value": 1}, 0.5]}},
            "parameters.weight",
            "mixes",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}],
            },
            "slices[0].sources[0].layer_range",
            "0 <= start < end",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "a",
                "models": [{"model": "b", "parameters": {"weight": 1, "density": 0}}],
            },
            "models[0].parameters.density",
            "(0, 1]",
        ),
        (lin() | {"merge_method": ["linear"]}, "merge_method", "must be a method name, got list"),
    ],
)
def test_refusals(recipe, field, text):
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe)
    assert e.value.field == field and text in str(e.value), str(e.value)
