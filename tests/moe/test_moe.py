"""``evomerge moe``: mergekit-moe configurations built into Mixtral models.

The demo zoo (installed from the shipped weights in well under a second) gives a Llama base with a
tokenizer and three experts whose prompts name their skill; tiny random models cover other families
and shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.engine import digest_model_dir
from evomerge.moe import load_moe_config, moe_in_memory, moe_to_disk

SKILLS = ("rot", "sort", "shift")
PROMPTS = {
    "rot": ["rot: abcde =", "rot: vwxyz ="],
    "sort": ["sort: dbeca =", "sort: qzmxa ="],
    "shift": ["shift: abcde =", "shift: lmnop ="],
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evomerge.zoo import ensure_zoo

    return ensure_zoo("demo", tmp_path_factory.mktemp("moezoo"))


def config(zoo: Path, gate_mode: str = "hidden", k: int = 1, **extra: Any) -> dict[str, Any]:
    experts = [{"source_model": str(zoo / s), "positive_prompts": PROMPTS[s]} for s in SKILLS]
    return {
        "base_model": str(zoo / "base"),
        "gate_mode": gate_mode,
        "experts_per_token": k,
        "dtype": "float32",
        "experts": experts,
        **extra,
    }


def write(tmp: Path, cfg: dict[str, Any], name: str = "moe.yml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tensors(out: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        sd.update(load_file(f))
    return sd


def mlp(model_dir: Path, layer: int, proj: str) -> torch.Tensor:
    return load_file(model_dir / "model.safetensors")[f"model.layers.{layer}.mlp.{proj}.weight"]


def test_hidden_builds_a_mixtral_that_transformers_loads_and_runs(zoo, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write(tmp_path, config(zoo))
    out = tmp_path / "out"
    assert main(["moe", str(path), str(out)]) == 0
    assert "built a mixture" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 1
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["rot: abcde =", "sort: qzmx ="], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert (
        logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
        and torch.isfinite(logits).all()
    )
    # Attention, embeddings, norms and lm_head are the base's, bit for bit.
    got, base = tensors(out), load_file(zoo / "base" / "model.safetensors")
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(got[name], t), name
    # The usual files, and a card naming every expert and prompt.
    assert {
        "config.json",
        "tokenizer.json",
        "README.md",
        "mergekit_moe_config.yml",
        "generation_config.json",
    } <= {p.name for p in out.iterdir()}
    assert yaml.safe_load((out / "mergekit_moe_config.yml").read_text()) == yaml.safe_load(
        path.read_text()
    )
    card = (out / "README.md").read_text()
    for s in SKILLS:
        assert str(zoo / s) in card and f"`{PROMPTS[s][0]}`" in card
    assert "gate_mode: hidden" in card and "tags:" in card
    # The file's digest is the one the build reported, and the in-memory build is the same model.
    mem = moe_in_memory(path)
    again = moe_to_disk(path, tmp_path / "again")
    assert again.tensor_digest == digest_model_dir(out) and mem.evomerge_digest == again.digest
    assert torch.equal(mem(**batch).logits, logits)


def test_random_gates_keep_every_expert_mlp_exactly(zoo, tmp_path):
    out = tmp_path / "out"
    moe_to_disk(config(zoo, "random", k=2), out, seed=5)
    got = tensors(out)
    for layer in range(4):
        gate_up, down = (
            got[f"model.layers.{layer}.mlp.experts.gate_up_proj"],
            got[f"model.layers.{layer}.mlp.experts.down_proj"],
        )
        assert gate_up.shape == (3, 768, 128) and down.shape == (3, 128, 384)
        for j, s in enumerate(SKILLS):
            assert torch.equal(
                gate_up[j],
                torch.cat([mlp(zoo / s, layer, "gate_proj"), mlp(zoo / s, layer, "up_proj")]),
            )
            assert torch.equal(down[j], mlp(zoo / s, layer, "down_proj"))
    # Routers: standard normal rows drawn from --seed, the same seed the same routers.
    routers = torch.stack([got[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)])
    assert torch.equal(
        routers, torch.randn((4, 3, 128), generator=torch.Generator().manual_seed(5))
    )
    moe_to_disk(config(zoo, "random", k=2), tmp_path / "again", seed=5)
    moe_to_disk(config(zoo, "random", k=2), tmp_path / "other", seed=6)
    assert (
        digest_model_dir(tmp_path / "again")
        == digest_model_dir(out)
        != digest_model_dir(tmp_path / "other")
    )


def test_uniform_random_gates_are_within_linear_init_bounds(zoo, tmp_path):
    moe_to_disk(config(zoo, "uniform_random"), tmp_path / "out", seed=0)
    w = tensors(tmp_path / "out")["model.layers.2.mlp.gate.weight"]
    bound = 128**-0.5
    assert (
        w.shape == (3, 128)
        and w.abs().max() <= bound
        and w.abs().max() > 0.9 * bound
        and w.std() > bound / 2
    )


def test_hidden_router_rows_are_normalized_last_token_states_of_the_base(zoo, tmp_path):
    """Recomputed independently: the base in bfloat16 on BOS + prompt, the state entering each layer at
    the last token, averaged over the expert's prompts, minus the negative prompts', unit norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config(zoo)
    cfg["experts"][1]["negative_prompts"] = ["rot: qwert ="]
    moe_to_disk(cfg, tmp_path / "out")
    got = tensors(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(zoo / "base")

    def states(prompts: list[str]) -> torch.Tensor:
        rows = []
        for (
            p
        ) in prompts:  # one at a time: the zoo's prompts of a list have equal length (no padding)
            ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])
            hs = base(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, -1].float() for h in hs[:-1]]))
        return torch.stack(rows).mean(0)

    for j, e in enumerate(cfg["experts"]):
        v = states(e["positive_prompts"]) - (
            states(e["negative_prompts"]) if "negative_prompts" in e else 0
        )
        # Layer 0 sees only the last token's embedding: "=" for every prompt, so positive minus negative is 0.
        unit = (v.norm(dim=-1) > 1e-6).float()
        assert unit.tolist() == ([0.0, 1.0, 1.0, 1.0] if j == 1 else [1.0] * 4)
        v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        for layer in range(4):
            row = got[f"model.layers.{layer}.mlp.gate.weight"][j]
            assert abs(row.norm().item() - unit[layer].item()) < 1e-2
            assert torch.allclose(row, v[layer], atol=2e-2), (
                j,
                layer,
                (row - v[layer]).abs().max(),
            )


def test_cheap_embed_router_is_the_normalized_embedding_sum(zoo, tmp_path):
    from transformers import AutoTokenizer

    moe_to_disk(config(zoo, "cheap_embed"), tmp_path / "out")
    got = tensors(tmp_path / "out")
    embed = load_file(zoo / "base" / "model.safetensors")["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    for j, s in enumerate(SKILLS):
        ids = [
            i
            for p in PROMPTS[s]
            for i in [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        ]
        v = embed[ids].sum(0)
        v = v / v.norm()
        for layer in range(4):  # the same row at every layer
            assert torch.allclose(got[f"model.layers.{layer}.mlp.gate.weight"][j], v, atol=1e-6)


def test_noise_and_residual_scale(zoo, tmp_path):
    cfg = config(zoo, "random")
    cfg["experts"][0]["residual_scale"] = 0.5
    cfg["experts"][1]["noise_scale"] = 0.01
    moe_to_disk(cfg, tmp_path / "out", seed=1)
    got = tensors(tmp_path / "out")
    assert torch.equal(
        got["model.layers.1.mlp.experts.down_proj"][0], mlp(zoo / "rot", 1, "down_proj") * 0.5
    )
    assert torch.equal(
        got["model.layers.1.mlp.experts.gate_up_proj"][0][:384], mlp(zoo / "rot", 1, "gate_proj")
    )
    noise = got["model.layers.1.mlp.experts.gate_up_proj"][1][:384] - mlp(
        zoo / "sort", 1, "gate_proj"
    )
    assert 0.009 < noise.std().item() < 0.011 and abs(noise.mean().item()) < 1e-3
    assert torch.equal(
        got["model.layers.1.mlp.experts.down_proj"][2], mlp(zoo / "shift", 1, "down_proj")
    )


def test_mistral_experts_and_bfloat16(tmp_path):
    from _tiny import make_tiny, perturbed
    from transformers import AutoModelForCausalLM

    base = make_tiny(tmp_path / "base", arch="mistral", dtype=torch.bfloat16)
    experts = [perturbed(base, tmp_path / f"e{i}", seed=i) for i in range(2)]
    cfg = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts": [{"source_model": str(e)} for e in experts],
    }
    moe_to_disk(cfg, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (
        model.config.num_experts_per_tok == 2 and model.dtype == torch.bfloat16
    )  # mergekit-moe's default k; the base's dtype
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits.float()).all()


def test_seed_recipe_form_builds(zoo, tmp_path):
    """The seed documents' ``merge_method: moe`` recipe (tests/mergekit/seed_recipes/003_moe-from-merges.yml)
    with the zoo standing in for its models; ``evomerge merge`` on it points to ``evomerge moe``."""
    seed = yaml.safe_load(
        (
            Path(__file__).parents[1] / "mergekit" / "seed_recipes" / "003_moe-from-merges.yml"
        ).read_text()
    )
    assert seed["merge_method"] == "moe"
    seed["base_model"] = str(zoo / "base")
    for e, s in zip(seed["experts"], SKILLS, strict=True):
        e["source_model"] = str(zoo / s)
    path = write(tmp_path, seed)
    out = tmp_path / "out"
    assert main(["moe", str(path), str(out), "--seed", "0"]) == 0
    assert yaml.safe_load((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "merge_method" not in load_moe_config(path).to_yaml()


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from _tiny import make_tiny

    root = tmp_path_factory.mktemp("odd")
    return {
        "gpt2": make_tiny(root / "gpt2", arch="gpt2"),
        "small": make_tiny(
            root / "small",
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=4,
            vocab_size=47,
            head_dim=32,
        ),
        "biased": make_tiny(root / "biased", attention_bias=True),
    }


def _bad(zoo: Path, odd: dict[str, Path], case: str) -> tuple[dict[str, Any], list[str]]:
    c = config(zoo)
    if case == "same_prompts":
        for e in c["experts"]:
            e["positive_prompts"] = ["rot: abcde ="]
        return c, ["experts", "same prompts"]
    if case == "k_too_big":
        c["experts_per_token"] = 4
        return c, ["experts_per_token", "only 3 experts"]
    if case == "k_zero":
        c["experts_per_token"] = 0
        return c, ["experts_per_token", ">= 1"]
    if case == "other_arch":
        c["experts"][2]["source_model"] = str(odd["gpt2"])
        return c, ["experts[2].source_model", "'gpt2'", "base's architecture"]
    if case == "other_shape":
        c["experts"][1]["source_model"] = str(odd["small"])
        return c, ["experts[1].source_model", "intermediate_size 192", "384"]
    if case == "missing_model":
        c["experts"][0]["source_model"] = str(zoo / "nope")
        return c, ["experts[0].source_model", "not found"]
    if case == "typo":
        c["experts"][0]["positive_prompt"] = c["experts"][0].pop("positive_prompts")
        return c, ["experts[0].positive_prompt", "did you mean positive_prompts"]
    if case == "gate_mode":
        c["gate_mode"] = "hiden"
        return c, ["gate_mode", "did you mean hidden"]
    if case == "no_prompts":
        del c["experts"][1]["positive_prompts"]
        return c, ["experts[1].positive_prompts", "gate_mode hidden"]
    if case == "same_model":
        for e in c["experts"]:
            e["source_model"] = str(zoo / "rot")
        return c, ["experts", "every expert is"]
    if case == "shared":
        c["shared_experts"] = [{"source_model": str(zoo / "rot")}]
        return c, ["shared_experts", "not supported"]
    if case == "architecture":
        c["architecture"] = "qwen"
        return c, ["architecture", "not supported", "mergekit-moe"]
    if case == "gpt2_base":
        c["base_model"] = str(odd["gpt2"])
        return c, ["base_model", "'gpt2'", "Llama or Mistral"]
    if case == "biased_base":
        c["base_model"] = str(odd["biased"])
        for e in c["experts"]:
            e["source_model"] = str(odd["biased"])
        c["experts"] = c["experts"][:1] + [
            {"source_model": str(zoo / "base"), "positive_prompts": ["x"]}
        ]
        return c, ["experts[1].source_model", "hidden_size"]
    if case == "dtype":
        c["dtype"] = "fp8"
        return c, ["dtype", "unknown dtype"]
    if case == "merge_method":
        c["merge_method"] = "ties"
        return c, ["merge_method", "merge_method: moe"]
    if (
        case == "noise_inf"
    ):  # refused by name before any tensor is drawn, not as a NaN/inf output tensor
        c["experts"][1]["noise_scale"] = float("inf")
        return c, ["experts[1].noise_scale", "finite number"]
    if case == "k_default":  # one expert and no experts_per_token: the default 2 is too many
        c["experts"] = c["experts"][:1]
        del c["experts_per_token"]
        return c, ["experts_per_token", "defaults to 2", "only 1 expert is listed"]
    raise AssertionError(case)


BAD = [
    "same_prompts",
    "k_too_big",
    "k_zero",
    "other_arch",
    "other_shape",
    "missing_model",
    "typo",
    "gate_mode",
    "no_prompts",
    "same_model",
    "shared",
    "architecture",
    "gpt2_base",
    "biased_base",
    "dtype",
    "merge_method",
    "noise_inf",
    "k_default",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_fail_in_one_line_and_write_nothing(case, zoo, odd_models, tmp_path, capsys):
    cfg, must = _bad(zoo, odd_models, case)
    path = write(tmp_path, cfg)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["moe", str(path), str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"evomerge: error: {path}: "), lines[0]
    for m in must:
        assert m in lines[0], (m, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_biases_have_no_place_in_a_mixtral(odd_models, tmp_path, capsys):
    from _tiny import perturbed

    b = odd_models["biased"]
    e = perturbed(b, tmp_path / "e", seed=3)
    path = write(
        tmp_path,
        {
            "base_model": str(b),
            "gate_mode": "random",
            "experts": [{"source_model": str(b)}, {"source_model": str(e)}],
        },
    )
    assert main(["moe", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "base_model" in err
        and "bias" in err
        and "no place in a Mixtral model" in err
        and not (tmp_path / "out").exists()
    )


def test_nonempty_output_is_refused(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["moe", str(write(tmp_path, config(zoo, "random"))), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == [
        "keep.txt"
    ]


def test_merge_points_to_moe(zoo, tmp_path, capsys):
    for extra in ({"merge_method": "moe"}, {}):
        path = write(tmp_path, {**extra, **config(zoo)})
        assert main(["merge", str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "evomerge moe" in err and str(path) in err, err


@pytest.mark.slow
def test_the_zoo_figures_moe_row_is_what_evomerge_moe_scores(zoo, tmp_path):
    """The shipped zoo.json's mixture-of-experts row (the README's zoo table) re-measured with lm-eval.

    The figures were computed with the kernels the zoo pins (AVX2 on x86-64); this process may
    run others (AVX-512 kernels round differently and flip items whose choices nearly tie), so the
    mixture is scored in a child process with the zoo's kernel environment.
    """
    import json
    import subprocess
    import sys

    from evomerge.zoo import read_manifest, zoo_kernel_env
    from evomerge.zoo.build import MOE_LABEL, MOE_PROMPTS

    assert MOE_PROMPTS == PROMPTS
    shipped = read_manifest(zoo)["figures"]["moe"][MOE_LABEL]
    (tmp_path / "moe.json").write_text(json.dumps(config(zoo)))
    code = (
        "import json, sys; from pathlib import Path; from evomerge.moe import moe_in_memory; "
        "from evomerge.zoo.build import ZooScorer; zoo = Path(sys.argv[1]); "
        "cfg = json.loads(Path(sys.argv[2]).read_text()); "
        "print(json.dumps(ZooScorer(zoo, zoo / 'tasks').score(moe_in_memory(cfg))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(zoo), str(tmp_path / "moe.json")],
        env=zoo_kernel_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # Top-1 routing turns a last-bit difference in a gate score into another expert for a token
    # whose experts nearly tie, and such a token can flip an item. On one AVX-512 Xeon the shipped
    # figures were matched within 1 item per task (of 100) under the pinned kernels, within 2 under
    # the default ones, and by no setting of kernels or threads exactly: allow 2 items per task,
    # 3/300 on a mean over the three tasks.
    assert got.keys() == shipped.keys()
    for key, value in got.items():
        allowed = 3 / 300 if "mean" in key else 2 / 100
        assert abs(value - shipped[key]) <= allowed + 1e-4, (key, value, shipped[key])
    assert shipped["mean"] == 0.3067 and shipped["holdout_mean"] == 0.3333
