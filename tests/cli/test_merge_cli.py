"""`evomerge merge` end to end: bad input is one line + exit 2 + no output; outputs are complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from _tiny import make_tiny
from safetensors.torch import load_file

from evomerge.cli import main


def write(tmp: Path, recipe: Any, name: str = "recipe.yml") -> Path:
    p = tmp / name
    p.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return p


def refuse(
    tmp: Path,
    recipe: Any,
    capsys: pytest.CaptureFixture[str],
    *must: str,
    extra: list[str] | None = None,
) -> str:
    """Run the CLI on a bad recipe; check exit 2, one line naming the file, no output dir."""
    path = write(tmp, recipe)
    out = tmp / "out"
    capsys.readouterr()  # drop what building the models printed
    code = main(["merge", str(path), str(out), *(extra or [])])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("evomerge: error: ")
    assert str(path) in lines[0] or "out" in lines[0], lines[0]
    for m in must:
        assert m in lines[0], (m, lines[0])
    assert not out.exists() and not list(tmp.glob(".out.tmp-*"))
    return lines[0]


def lin(models: list[Path], **top: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
    }
    r.update(top)
    return r


def test_unknown_key_suggests(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(
        tmp_path,
        lin(models[:2], merge_methd="x"),
        capsys,
        "merge_methd",
        "unknown key",
        "did you mean merge_method",
    )


def test_unknown_parameter(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    r = lin(models[:2])
    r["models"][0]["parameters"]["densty"] = 0.5
    refuse(tmp_path, r, capsys, "models[0].parameters.densty", "unknown parameter", "weight")


def test_dare_block(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    r = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "models": [
            {
                "model": str(models[0]),
                "parameters": {"weight": 1.0, "density": 0.5, "dare": {"drop_rate": 0.9}},
            }
        ],
    }
    refuse(
        tmp_path,
        r,
        capsys,
        "models[0].parameters.dare",
        "not a mergekit parameter",
        "density = 1 - drop_rate",
    )


def test_moe(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(
        tmp_path,
        {
            "merge_method": "moe",
            "base_model": str(base),
            "experts": [{"source_model": str(models[0])}],
        },
        capsys,
        "experts",
        "mixture-of-experts",
        "evomerge moe",
    )


def test_layer_range_beyond_model(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    r = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(base), "layer_range": [0, 32]}]}],
    }
    refuse(tmp_path, r, capsys, "slices[0].sources[0].layer_range", "has 4 layers")


def test_mismatched_slice_lengths(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    r = {
        "merge_method": "slerp",
        "base_model": str(base),
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 4]},
                    {"model": str(models[0]), "layer_range": [0, 3]},
                ]
            }
        ],
        "parameters": {"t": 0.5},
    }
    refuse(tmp_path, r, capsys, "slices[0].sources", "same number of layers")


def test_slerp_without_base(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    r = {
        "merge_method": "slerp",
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 4]},
                    {"model": str(models[0]), "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {"t": 0.5},
    }
    refuse(tmp_path, r, capsys, "slices[0].sources", "base_model")


def test_missing_model(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(tmp_path, lin([models[0], tmp_path / "nope"]), capsys, "nope", "not found")
    refuse(
        tmp_path,
        lin([models[0]])
        | {
            "models": [
                {"model": str(models[0]), "parameters": {"weight": 1}},
                {"model": "no-such-org/no-such-model", "parameters": {"weight": 1}},
            ]
        },
        capsys,
        "no-such-org/no-such-model",
        "not in the Hugging Face cache",
    )


def test_different_architectures(tmp_path, capsys):
    a = make_tiny(tmp_path / "a", arch="llama")
    b = make_tiny(tmp_path / "b", arch="gemma")
    refuse(tmp_path, lin([a, b]), capsys, "different architectures", "--allow-crimes")


def test_non_mapping_and_malformed_yaml(tmp_path, capsys):
    refuse(tmp_path, "- just\n- a list\n", capsys, "must be a mapping")
    refuse(tmp_path, "merge_method: [unclosed\n", capsys, "malformed YAML")
    refuse(tmp_path, "", capsys, "empty recipe")


def test_bad_dtype_and_values(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(tmp_path, lin(models[:2], dtype="float8"), capsys, "dtype", "float16, bfloat16")
    r = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(models[0]), "parameters": {"weight": 1.0, "density": 1.5}}],
    }
    refuse(tmp_path, r, capsys, "models[0].parameters.density", "(0, 1]")
    r = lin(models[:2])
    r["models"][1]["parameters"]["weight"] = "heavy"
    refuse(tmp_path, r, capsys, "models[1].parameters.weight", "a number")
    r["models"][1]["parameters"]["weight"] = []
    refuse(tmp_path, r, capsys, "models[1].parameters.weight", "empty gradient")


def test_structure_errors(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(tmp_path, {"merge_method": "linear"}, capsys, "exactly one of models: or slices:")
    both = lin(models[:2], slices=[{"sources": [{"model": str(base), "layer_range": [0, 4]}]}])
    refuse(tmp_path, both, capsys, "both are set")
    refuse(
        tmp_path,
        {"merge_method": "tie", "models": [{"model": str(base)}]},
        capsys,
        "merge_method",
        "did you mean ties",
    )
    refuse(
        tmp_path,
        {
            "merge_method": "ties",
            "models": [{"model": str(m), "parameters": {"weight": 1}} for m in models],
        },
        capsys,
        "needs a base_model",
    )


def test_output_not_empty(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = main(["merge", str(write(tmp_path, lin(models[:2]))), str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "x"


def test_shards_index_card_and_config(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(base)}]
        + [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models[:2]],
        "dtype": "float32",
    }
    path = write(tmp_path, recipe)
    out = tmp_path / "out"
    assert main(["merge", str(path), str(out), "--out-shard-size", "20KB"]) == 0, (
        capsys.readouterr().err
    )
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, Any] = {}
    for f in shards:
        part = load_file(f)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 20_000 or len(part) == 1
        tensors.update(part)
        for name in part:
            assert index["weight_map"][name] == f.name
    assert set(index["weight_map"]) == set(tensors) == set(load_file(base / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert (out / "tokenizer_config.json").is_file()  # copied from the base by default
    assert (out / "mergekit_config.yml").read_text() == path.read_text()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == [str(base), str(models[0]), str(models[1])]
    assert front["tags"] == ["merge", "mergekit", "evomerge"]
    assert "merge_method: ties" in card
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_no_copy_tokenizer(tiny_family, tmp_path):
    base, models = tiny_family
    out = tmp_path / "out"
    assert (
        main(["merge", str(write(tmp_path, lin(models[:2]))), str(out), "--no-copy-tokenizer"]) == 0
    )
    assert not (out / "tokenizer_config.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
