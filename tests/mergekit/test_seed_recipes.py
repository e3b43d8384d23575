"""Every recipe from the seed documents either merges (and loads) or is refused with one line saying why.

The YAML files in ``tests/mergekit/seed_recipes/`` are copied verbatim from
``shared/seeds/001_46108d6075ea698b.txt`` (``001_*``) and ``shared/seeds/003_927c06bd1beb2ef0.txt``
(``003_*``). At load time each hub id is replaced by a tiny local model of the same architecture
family and layer count (hidden size 16); names that do not exist on the hub (``Qwen/Qwen3-7B``,
``law-ai/legal-bert-7b``, placeholders like ``specialist_1``) are left as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from _tiny import make_tiny, perturbed

from evomerge.cli import main

HERE = Path(__file__).parent / "seed_recipes"

# family -> (transformers model_type, layers); the stand-ins share shapes within a family.
FAMILIES = {
    "mistral32": ("mistral", 32),
    "mixtral32": ("mixtral", 32),
    "llama32": ("llama", 32),
    "llama40": ("llama", 40),
    "cohere40": ("cohere", 40),
    "cohere32": ("cohere", 32),
}
MODELS = {
    "OpenPipe/mistral-ft-optimized-1218": "mistral32",
    "mlabonne/NeuralHermes-2.5-Mistral-7B": "mistral32",
    "mistralai/Mistral-7B-v0.1": "mistral32",
    "samir-fama/SamirGPT-v1": "mistral32",
    "abacusai/Slerp-CM-mist-dpo": "mistral32",
    "EmbeddedLLM/Mistral-7B-Merge-14-v0.2": "mistral32",
    "EmbeddedLLM/Mistral-7B-Merge-14-v0.1": "mistral32",
    "AIDC-ai-business/Marcoroni-7B-v3": "mistral32",
    "teknium/OpenHermes-2.5-Mistral-7B": "mistral32",
    "WizardLM/WizardMath-7B-V1.1": "mistral32",
    "ajibawa-2023/Code-Mistral-7B": "mistral32",
    "mistralai/Mixtral-8x7B-v0.1": "mixtral32",
    "ajibawa-2023/Code-Mixtral-8x7B": "mixtral32",
    "garage-bAInd/Platypus2-13B": "llama40",
    "WizardLM/WizardLM-13B-V1.2": "llama40",
    "psmathur/orca_mini_v3_13b": "llama40",
    "meta-llama/Llama-2-7b-hf": "llama32",
    "WizardLM/WizardLM-7B-V1.0": "llama32",
    "garage-bAInd/Platypus-7B": "llama32",
    "medalpaca/medalpaca-7b": "llama32",
    "alpindale/c4ai-command-r-plus-GPTQ": "cohere40",
    "CohereForAI/c4ai-command-r-v01": "cohere40",
    "CohereForAI/aya-23-7B": "cohere32",
    "Undi95/MLewd-ReMM-L2-Chat-20B-Part1": "llama40",
    "model_a": "llama32",
    "model_b": "llama32",
    "model_c": "llama32",
}

# recipe -> ("merges", output layers) or ("refused", substrings of the one-line reason).
EXPECTED: dict[str, tuple[str, Any]] = {
    "001_neuralpipe_slerp": ("merges", 32),
    "001_neuralpipe_ties": ("merges", 32),
    "001_daredevil_dare_ties": ("merges", 32),
    "001_neuralpipe_passthrough": ("merges", 40),
    "001_marcoro14_colab_slerp": ("merges", 32),
    "003_platypus-hermes-13b": ("merges", 40),
    "003_frankenmerge": ("merges", 32),
    # slerp interpolates from base_model: these name none.
    "003_marcoro14-7b-slerp": ("refused", ["slices[0].sources", "base_model"]),
    "003_goliath-120b": ("refused", ["slices[0].sources", "base_model"]),
    "003_chat-roleplay": ("refused", ["slices[0].sources", "base_model"]),
    "003_legal-assistant": ("refused", ["slices[0].sources", "base_model"]),
    "003_step1": ("refused", ["slices[0].sources", "base_model"]),
    "003_step2": ("refused", ["slices[0].sources", "base_model"]),
    "003_variant_a": ("refused", ["slices[0].sources", "base_model"]),
    "003_variant_b": ("refused", ["slices[0].sources", "base_model"]),
    # A Mixtral base with Mistral fine-tunes; a Mistral base with a Llama fine-tune.
    "003_math-code-mixtral": ("refused", ["different architectures", "mixtral", "mistral"]),
    "003_multi-task-mixtral": ("refused", ["different architectures", "mixtral", "mistral"]),
    "003_medical-specialist": ("refused", ["different architectures", "mistral", "llama"]),
    "003_dare-ties-llama": (
        "refused",
        ["models[0].parameters.dare", "not a mergekit parameter", "density = 1 - drop_rate"],
    ),
    "003_moe-from-merges": (
        "refused",
        ["experts", "evomerge moe"],
    ),  # built by `evomerge moe` (test_moe.py)
    "003_multilingual-merge": ("refused", ["Qwen/Qwen3-7B", "not in the Hugging Face cache"]),
}


def test_every_seed_recipe_has_an_expectation():
    assert sorted(p.stem for p in HERE.glob("*.yml")) == sorted(EXPECTED)


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seed_models")
    bases: dict[str, Path] = {}
    for fam, (arch, layers) in FAMILIES.items():
        bases[fam] = make_tiny(root / fam, seed=len(bases), arch=arch, num_hidden_layers=layers)
    out = {}
    for i, (name, fam) in enumerate(MODELS.items()):
        out[name] = perturbed(bases[fam], root / name.replace("/", "__"), seed=100 + i, scale=0.02)
    return out


def _substitute(node: Any, paths: dict[str, Path]) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                str(paths[v])
                if k in ("model", "base_model", "source_model")
                and isinstance(v, str)
                and v in paths
                else _substitute(v, paths)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute(v, paths) for v in node]
    return node


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seed_recipe(
    name: str, standins: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (HERE / f"{name}.yml").read_text()
    recipe = _substitute(yaml.safe_load(text), standins)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["merge", str(path), str(out)])
    err = capsys.readouterr().err
    kind, what = EXPECTED[name]
    if kind == "refused":
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evomerge: error: "), err
        for s in what:
            assert s in lines[0], (s, lines[0])
        assert not out.exists()
        return
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == what
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == what
