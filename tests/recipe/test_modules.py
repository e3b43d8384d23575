"""mergekit's ``modules:`` recipes: read as the ``models:``/``slices:`` recipe they amount to, or refused in one line.

Each accepted form is checked against the same recipe written with ``models:`` or ``slices:`` (same
tensor digest), and parameter precedence (slice > module > recipe) against a hand-computed mean.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.engine import merge_to_disk
from evomerge.errors import ConfigError
from evomerge.io import dump_yaml
from evomerge.recipe.schema import load_recipe


def _linear(models: list[str], weights: list[float]) -> list[dict]:
    return [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights, strict=True)]


def test_one_module_is_its_models_recipe(tiny_family, tmp_path) -> None:
    _, ft = tiny_family
    ms = [str(p) for p in ft[:2]]
    plain = {"merge_method": "linear", "models": _linear(ms, [0.7, 0.3]), "dtype": "float32"}
    moduled = {
        "merge_method": "linear",
        "modules": {"text_decoder": {"models": _linear(ms, [0.7, 0.3])}},
        "dtype": "float32",
    }
    assert (
        merge_to_disk(moduled, tmp_path / "a").digest == merge_to_disk(plain, tmp_path / "b").digest
    )
    assert "modules" in load_recipe(moduled).raw  # written back as the user gave it


def test_module_parameters_sit_between_the_recipe_and_the_slice(tiny_family, tmp_path) -> None:
    _, ft = tiny_family
    a, b = (str(p) for p in ft[:2])
    src = [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]
    recipe = {
        "merge_method": "linear",
        "parameters": {"weight": 5.0, "normalize": False},  # the module's weight wins over this one
        "modules": {
            "default": {
                "slices": [{"sources": src, "parameters": {"normalize": True}}],
                "parameters": {"weight": 1.0, "normalize": False},
            }
        },
        "dtype": "float32",
    }
    merge_to_disk(recipe, tmp_path / "out")
    out, sa, sb = (load_file(Path(p) / "model.safetensors") for p in (tmp_path / "out", a, b))
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(
        out[name], (sa[name] + sb[name]) / 2
    )  # weight 1 each, normalized by the slice


def test_several_modules_that_merge_alike_are_one_models_recipe(tiny_family, tmp_path) -> None:
    """The form mergekit's to_yaml() writes for a models: recipe when it plans several modules."""
    base, ft = tiny_family
    ms = [str(p) for p in ft[:2]]

    def module(n: int) -> dict:
        return {
            "slices": [
                {
                    "sources": [
                        {"model": m, "layer_range": [0, n], "parameters": {"weight": w}}
                        for m, w in zip(ms, (0.6, 0.4), strict=True)
                    ]
                }
            ]
        }

    moduled = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "modules": {"default": module(0), "model.layers": module(4)},
        "dtype": "float32",
    }
    plain = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": _linear(ms, [0.6, 0.4]),
        "dtype": "float32",
    }
    assert (
        merge_to_disk(moduled, tmp_path / "a").digest == merge_to_disk(plain, tmp_path / "b").digest
    )
    short = moduled | {"modules": {"default": module(0), "model.layers": module(3)}}
    with pytest.raises(
        ConfigError,
        match=r"modules\.model\.layers: layer_range \[0, 3\] covers no whole layer stack .* 4 layers",
    ):
        merge_to_disk(short, tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("modules", "field", "says"),
    [
        (
            {
                "text_decoder": {"models": [{"model": "A"}]},
                "vision_tower": {"models": [{"model": "B"}]},
            },
            "modules.vision_tower",
            "write it with models:",
        ),
        (
            {"default": {"models": [{"model": "A"}], "slices": []}},
            "modules.default",
            "exactly one of models: or slices:",
        ),
        (
            {"default": {"models": [{"model": "A"}], "weight": 1}},
            "modules.default.weight",
            "unknown key",
        ),
        (
            {"default": {"modles": [{"model": "A"}]}},
            "modules.default.modles",
            "unknown key (did you mean models",
        ),
        ({}, "modules", "non-empty mapping"),
        (
            {"vision_tower": {"models": [{"model": "A"}]}},
            "modules.vision_tower",
            "alone would slice the language model",
        ),
    ],
)
def test_refused_in_one_line(modules, field, says, tmp_path) -> None:
    recipe = tmp_path / "r.yml"
    recipe.write_text(dump_yaml({"merge_method": "linear", "modules": modules}))
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe)
    assert e.value.field == field and says in str(e.value)
    if field != "modules.vision_tower":  # the command line once (a process costs seconds)
        return
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "merge", str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and field in proc.stderr
    )
    assert not (tmp_path / "out").exists()


def test_modules_and_models_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one of models:, slices: or modules:"):
        load_recipe(
            {
                "merge_method": "linear",
                "models": [{"model": "A"}],
                "modules": {"default": {"models": [{"model": "A"}]}},
            }
        )


def test_a_space_in_modules_form(tiny_family, tmp_path) -> None:
    """A modules: recipe with no free value is a space of one point; directives inside modules: are refused."""
    from evomerge.space import load_space

    _, ft = tiny_family
    recipe = {
        "merge_method": "linear",
        "modules": {"default": {"models": _linear([str(p) for p in ft[:2]], [0.5, 0.5])}},
        "dtype": "float32",
    }
    (tmp_path / "one.yml").write_text(dump_yaml(recipe))
    one = load_space(tmp_path / "one.yml")
    assert one.directives == []
    assert one.model_refs() == [
        str(p) for p in ft[:2]
    ]  # its models are the baselines' sources (and uniform), as for models:
    recipe["modules"]["default"]["models"][0]["parameters"]["weight"] = {"range": [0.1, 1.0]}
    (tmp_path / "free.yml").write_text(dump_yaml(recipe))
    with pytest.raises(
        ConfigError,
        match="directives inside modules: are not supported; write the space with models: or slices:",
    ):
        load_space(tmp_path / "free.yml")
