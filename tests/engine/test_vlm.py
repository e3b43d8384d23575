"""Vision-language models (LLaVA): every tensor merged, the language stack sliced, each module at its own depth.

Expected values are worked out by hand from the source tensors: a linear merge with weight
gradients ``[1, 0]`` and ``[0, 1]`` gives ``(1 - t) a + t b`` at relative depth t, so layer i of a
stack of n is ``a`` at i = 0, ``b`` at i = n - 1 and the mean in the middle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import llava_config
from safetensors.torch import load_file

from evomerge.engine import merge_in_memory, merge_to_disk
from evomerge.engine.arch import detect_arch
from evomerge.engine.resident import build_model, checkpoint_targets
from evomerge.errors import EvomergeError
from evomerge.io import dump_yaml


def _llava(path: Path, seed: int, vision_layers: int) -> str:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(vision_layers))
    model.save_pretrained(path)
    # A real LLaVA checkpoint ships its image processor's settings beside the weights.
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": 16, "width": 16},
                "size": {"shortest_edge": 16},
                "seed": seed,
            }
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> tuple[str, str]:
    """Two tiny LLaVAs: a 2-layer language model, a 3-layer vision tower."""
    root = tmp_path_factory.mktemp("vlm")
    return _llava(root / "a", 1, 3), _llava(root / "b", 2, 3)


def _sd(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


def test_language_stack_found_by_name_when_a_vision_tower_has_as_many_layers() -> None:
    names = [
        f"vision_tower.encoder.layers.{i}.{w}"
        for i in range(2)
        for w in ("mlp.fc1.weight", "mlp.fc2.weight", "self_attn.q_proj.weight")
    ]
    names += [f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(2)] + [
        "language_model.model.embed_tokens.weight"
    ]
    config = {
        "model_type": "llava",
        "text_config": {"num_hidden_layers": 2},
        "vision_config": {"num_hidden_layers": 2},
    }
    arch = detect_arch(config, names)
    assert (arch.layer_prefix, arch.num_layers, arch.count_key) == (
        "language_model.model.layers",
        2,
        ("text_config", "num_hidden_layers"),
    )
    assert arch.other_stacks == (("vision_tower.encoder.layers", 2),)
    assert arch.depth("vision_tower.encoder.layers.1.mlp.fc1.weight") == 1.0
    assert arch.depth("language_model.model.embed_tokens.weight") == 0.0


def test_every_tensor_merged_each_module_at_its_own_depth(vlms, tmp_path) -> None:
    a, b = vlms
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": a, "parameters": {"weight": [1.0, 0.0]}},
            {"model": b, "parameters": {"weight": [0.0, 1.0]}},
        ],
        "dtype": "float32",
    }
    merge_to_disk(recipe, tmp_path / "out")
    out, sa, sb = _sd(tmp_path / "out"), _sd(a), _sd(b)
    assert set(out) == set(sa)
    expect = {
        "language_model.model.layers.0.mlp.up_proj.weight": sa[
            "language_model.model.layers.0.mlp.up_proj.weight"
        ],
        "language_model.model.layers.1.mlp.up_proj.weight": sb[
            "language_model.model.layers.1.mlp.up_proj.weight"
        ],
        "vision_tower.encoder.layers.0.mlp.fc1.weight": sa[
            "vision_tower.encoder.layers.0.mlp.fc1.weight"
        ],
        "vision_tower.encoder.layers.1.mlp.fc1.weight": (
            sa["vision_tower.encoder.layers.1.mlp.fc1.weight"]
            + sb["vision_tower.encoder.layers.1.mlp.fc1.weight"]
        )
        / 2,
        "vision_tower.encoder.layers.2.mlp.fc1.weight": sb[
            "vision_tower.encoder.layers.2.mlp.fc1.weight"
        ],
        "multi_modal_projector.linear_1.weight": sa[
            "multi_modal_projector.linear_1.weight"
        ],  # outside any stack: t = 0
        "language_model.lm_head.weight": sa["language_model.lm_head.weight"],
    }
    for name, want in expect.items():
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6, msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        config["architectures"] == ["LlavaForConditionalGeneration"]
        and config["text_config"]["num_hidden_layers"] == 2
    )
    # the processor comes with the tokenizer, from the reference model (the first one here)
    assert (tmp_path / "out" / "preprocessor_config.json").read_text() == (
        Path(a) / "preprocessor_config.json"
    ).read_text()


def test_slices_cut_the_language_model_and_keep_the_vision_tower(vlms, tmp_path) -> None:
    from transformers import LlavaForConditionalGeneration

    a, b = vlms
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 2]}]},
        ],
        "dtype": "float32",
    }
    merge_to_disk(recipe, tmp_path / "out")
    out, sa, sb = _sd(tmp_path / "out"), _sd(a), _sd(b)
    assert torch.equal(
        out["language_model.model.layers.2.mlp.up_proj.weight"],
        sb["language_model.model.layers.1.mlp.up_proj.weight"],
    )
    assert torch.equal(
        out["language_model.model.layers.0.mlp.up_proj.weight"],
        sa["language_model.model.layers.0.mlp.up_proj.weight"],
    )
    vision = [k for k in sa if k.startswith(("vision_tower.", "multi_modal_projector."))]
    assert all(torch.equal(out[k], sa[k]) for k in vision)  # the first slice's model, whole
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["text_config"][
            "num_hidden_layers"
        ]
        == 3
    )
    _, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info.values()), info


def test_in_memory_merge_equals_the_saved_merge(vlms, tmp_path) -> None:
    from transformers import LlavaForConditionalGeneration

    a, b = vlms
    recipe = {
        "merge_method": "slerp",
        "base_model": a,
        "models": [{"model": a}, {"model": b}],
        "parameters": {"t": [0.2, 0.9]},
        "dtype": "float32",
    }
    model = merge_in_memory(recipe)
    merge_to_disk(recipe, tmp_path / "out")
    saved = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "out", dtype=torch.float32
    ).state_dict()
    held = model.state_dict()
    assert type(model).__name__ == "LlavaForConditionalGeneration" and set(held) == set(saved)
    assert all(torch.equal(held[k], saved[k]) for k in saved)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_in_memory_refuses_a_model_type_transformers_does_not_know() -> None:
    with pytest.raises(EvomergeError, match="does not know model_type 'no_such_model'"):
        build_model(
            {"model_type": "no_such_model", "architectures": ["X"]}, "float32", torch.device("cpu")
        )


def test_in_memory_refuses_checkpoint_tensors_transformers_fuses(tmp_path) -> None:
    """transformers 5 fuses Mixtral's per-expert tensors into one parameter: a merged expert would not reach it."""
    from _tiny import make_tiny

    a, b = (
        make_tiny(tmp_path / "a", seed=0, arch="mixtral"),
        make_tiny(tmp_path / "b", seed=1, arch="mixtral"),
    )
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0}},
            {"model": str(b), "parameters": {"weight": 1.0}},
        ],
    }
    try:
        merge_in_memory(recipe)
    except EvomergeError as e:
        assert (
            "converts MixtralForCausalLM's tensor" in str(e)
            and "evomerge merge" in str(e)
            and "\n" not in str(e)
        )
    else:  # transformers 4.x keeps the per-expert parameters: the merge must then be the disk merge
        merge_to_disk(recipe, tmp_path / "out")


class _CheckpointNames(torch.nn.Module):
    """The model as the fake evaluator reads it: its tensors by checkpoint name (the sources' names)."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self._held = checkpoint_targets(model, names)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return dict(self._held)


@pytest.mark.slow
def test_search_merges_llava_candidates_in_memory_and_exports_them(vlms, tmp_path) -> None:
    """Trials merged into a resident LLaVA score what they carry; the exported recipe re-merges to the trial's tensors."""
    from _fake_eval import TaskVectorEvaluator

    from evomerge.cli import main
    from evomerge.engine import digest_model_dir
    from evomerge.search.loop import run_search
    from evomerge.search.table import load_trials

    base = Path(_llava(tmp_path / "base", 3, 3))
    fts = [Path(p) for p in vlms]

    class Evaluator(TaskVectorEvaluator):
        def evaluate(self, model, split="search"):
            return super().evaluate(_CheckpointNames(model, list(self.base)), split)

    space = tmp_path / "space.yml"
    space.write_text(
        dump_yaml(
            {
                "merge_method": {"choice": ["task_arithmetic", "ties"]},
                "base_model": str(base),
                "models": [
                    {
                        "model": str(f),
                        "parameters": {
                            "weight": {"range": [0.2, 1.0]},
                            "density": {"range": [0.3, 1.0]},
                        },
                    }
                    for f in fts
                ],
                "dtype": "float32",
                "search": {"trials": 3, "seed": 0, "finalists": 1},
            }
        )
    )
    results = tmp_path / "results"
    out = run_search(
        space, evaluator=Evaluator(base, fts), results_dir=results, quiet=True, log=lambda m: None
    )
    assert out.n_complete == 3 and out.n_failed == 0
    df = load_trials(results / "space")
    trials = df[df["number"].notna()]
    assert (trials["score"] > 0.1).all()  # the merged deltas reached the model the evaluator reads
    number = int(trials["number"].iloc[0])
    assert (
        main(
            [
                "export",
                str(space),
                "--results-dir",
                str(results),
                "--trial",
                str(number),
                "-o",
                str(tmp_path / "best.yml"),
            ]
        )
        == 0
    )
    assert main(["merge", str(tmp_path / "best.yml"), str(tmp_path / "out")]) == 0
    assert (
        digest_model_dir(tmp_path / "out")
        == trials.loc[trials["number"] == number, "digest"].iloc[0]
    )
