"""mergekit's basic merge tests as data: its tiny models and the recipes of its 33 test cases.

mergekit's ``tests/test_basic_merges.py`` builds tiny Llama, Granite, GPT-2 and LLaVA models
(``tests/common.py``) and runs 33 test functions over them; two of them (``nuslerp``, Llama and
LLaVA) loop over 9 recipes each. Here each test function is a :class:`Case` with its recipes as
plain mergekit YAML mappings, written from the facts of those files (model sizes, methods,
parameters), so both tools can read the same recipe file.

One deliberate difference: mergekit builds its GPT-2 at full size (768 wide, 50257 tokens,
124M parameters); the two GPT-2 cases (a copy and a 12+12 layer stack) only check names and layer
counts, so ours keeps the 12 layers and is 64 wide with 256 tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.engine import merge_to_disk
from evomerge.errors import EvomergeError
from evomerge.recipe.schema import load_recipe

__all__ = [
    "Case",
    "Run",
    "Basic",
    "RANDOM",
    "cases",
    "extra_cases",
    "build_models",
    "build_llava",
    "text_only",
    "run_all",
]

RANDOM = {"dare_ties", "della"}  # random masks: compared by statistics, not element by element

_LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
)


def _save(model: Any, path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return str(path)


def build_models(root: Path) -> dict[str, str]:
    """Build the tiny models of mergekit's basic tests (random weights, seeded) under ``root``.

    Returns:
        Paths by name: ``llama_a/b/c``, ``granite_a/b``, ``gpt2``, ``vlm_a/b/c``.
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    out: dict[str, str] = {}
    for i, n in enumerate("abc"):
        torch.manual_seed(100 + i)
        out[f"llama_{n}"] = _save(LlamaForCausalLM(LlamaConfig(**_LLAMA)), root / f"llama_{n}")
    for i, n in enumerate("ab"):
        torch.manual_seed(200 + i)
        cfg = GraniteConfig(**(_LLAMA | dict(num_attention_heads=2, num_key_value_heads=2)))
        out[f"granite_{n}"] = _save(GraniteForCausalLM(cfg), root / f"granite_{n}")
    torch.manual_seed(300)
    out["gpt2"] = _save(
        GPT2LMHeadModel(
            GPT2Config(
                n_embd=64,
                n_head=4,
                n_layer=12,
                n_positions=128,
                vocab_size=256,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        root / "gpt2",
    )
    for i, n in enumerate("abc"):
        out[f"vlm_{n}"] = build_llava(root / f"vlm_{n}", 400 + i)
    return out


def build_llava(path: Path, seed: int) -> str:
    """One tiny LLaVA of mergekit's basic tests (its vision tower's patch embedding is 4-D,
    64 x 3 x 4 x 4), random weights from ``seed``, saved at ``path``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_size=64,
        intermediate_size=128,
    )
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_LLAMA), image_seq_length=16)
    return _save(LlavaForConditionalGeneration(cfg), path)


def text_only(vlm: str | Path, path: Path) -> str:
    """The language model of a saved LLaVA checkpoint, as a Llama checkpoint of its own.

    Used as a second reference: mergekit 0.1.5 under transformers 5 leaves a LLaVA's language
    model out of its output, so its tensors are compared with mergekit's merge of these.
    """
    src = Path(vlm)
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(f).items():
            if k.startswith("language_model."):
                sd[k.removeprefix("language_model.")] = v
    cfg = json.loads((src / "config.json").read_text())["text_config"]
    cfg["architectures"] = ["LlamaForCausalLM"]
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    if (src / "generation_config.json").exists():
        shutil.copy2(src / "generation_config.json", path / "generation_config.json")
    return str(path)


@dataclass(frozen=True)
class Case:
    """One test function of mergekit's ``test_basic_merges.py``.

    Attributes:
        name: the test function's name.
        recipes: its recipes (several for the nuslerp loops).
        vlm: the models are LLaVA (mergekit checks them with ``auto_arch``).
        validate: the test's extra check on the output directory, if any (``stack24``, ``o_proj0``).
        mergekit_refuses: mergekit's test expects ``ValueError`` for this recipe.
    """

    name: str
    recipes: tuple[dict[str, Any], ...]
    vlm: bool = False
    validate: str | None = None
    mergekit_refuses: bool = False
    labels: tuple[str, ...] = field(default=())


def _two(
    a: str, b: str, method: str, base: str | None = None, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    # mergekit's two_model_config: weights 0.6 and 0.4 on the two models whatever the method.
    r: dict[str, Any] = {"merge_method": method}
    if base is not None:
        r["base_model"] = base
    r["models"] = [
        {"model": a, "parameters": {"weight": 0.6}},
        {"model": b, "parameters": {"weight": 0.4}},
    ]
    r["dtype"] = "bfloat16"
    if params is not None:
        r["parameters"] = params
    return r


def _nuslerp(a: str, b: str, c: str) -> tuple[tuple[dict[str, Any], ...], tuple[str, ...]]:
    rs, labels = [], []
    for base in (None, c):
        for row_wise in (False, True):
            for flatten in (False, True):
                rs.append(
                    _two(
                        a,
                        b,
                        "nuslerp",
                        base,
                        {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten},
                    )
                )
                labels.append(
                    f"base={'c' if base else 'none'},row_wise={row_wise},flatten={flatten}"
                )
    zero = _two(a, b, "nuslerp", c, {"nuslerp_row_wise": False, "nuslerp_flatten": False})
    zero["models"][0]["parameters"]["weight"] = -0.5
    zero["models"][1]["parameters"]["weight"] = 0.5
    rs.append(zero)
    labels.append("weights -0.5 and 0.5")
    return tuple(rs), tuple(labels)


def cases(m: dict[str, str]) -> list[Case]:
    """The 33 cases over the models of :func:`build_models`, in mergekit's file order."""
    a, b, c = m["llama_a"], m["llama_b"], m["llama_c"]
    ga, gb = m["granite_a"], m["granite_b"]
    va, vb, vc = m["vlm_a"], m["vlm_b"], m["vlm_c"]
    one = lambda r: (r,)  # noqa: E731
    slerp = _two(a, b, "slerp", a) | {"parameters": {"t": 0.35}}
    vslerp = _two(va, vb, "slerp", va) | {"parameters": {"t": 0.35}}
    nus, nus_labels = _nuslerp(a, b, c)
    vnus, vnus_labels = _nuslerp(va, vb, vc)
    out = [
        Case(
            "test_granite_copy",
            one({"merge_method": "passthrough", "models": [{"model": ga}], "dtype": "bfloat16"}),
        ),
        Case("test_granite_linear_merge", one(_two(ga, gb, "linear"))),
        Case(
            "test_granite_slerp",
            one(
                {
                    "merge_method": "slerp",
                    "base_model": ga,
                    "models": [{"model": ga}, {"model": gb}],
                    "parameters": {"t": 0.5},
                    "dtype": "bfloat16",
                }
            ),
        ),
        Case(
            "test_gpt2_copy",
            one(
                {
                    "merge_method": "passthrough",
                    "models": [{"model": m["gpt2"]}],
                    "dtype": "bfloat16",
                }
            ),
        ),
        Case(
            "test_gpt2_stack",
            one(
                {
                    "merge_method": "passthrough",
                    "slices": [{"sources": [{"model": m["gpt2"], "layer_range": [0, 12]}]}] * 2,
                    "dtype": "bfloat16",
                }
            ),
            validate="stack24",
        ),
        Case(
            "test_passthrough_scale",
            one(
                {
                    "merge_method": "passthrough",
                    "models": [
                        {
                            "model": a,
                            "parameters": {
                                "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]
                            },
                        }
                    ],
                }
            ),
            validate="o_proj0",
        ),
        Case("test_linear_merge", one(_two(a, b, "linear"))),
        Case("test_slerp_merge", one(slerp)),
        Case("test_nuslerp_merges", nus, labels=nus_labels),
        Case("test_task_arithmetic_merge", one(_two(a, b, "task_arithmetic", c))),
        Case("test_breadcrumbs_merge", one(_two(a, b, "breadcrumbs", c))),
        Case("test_ties_merge", one(_two(a, b, "ties", c, {"density": 0.3}))),
        Case("test_sce_merge", one(_two(a, b, "sce", c, {"select_topk": 0.5}))),
        Case("test_ram_merge", one(_two(a, b, "ram", c))),
        Case("test_ramplus_tl_merge", one(_two(a, b, "ramplus_tl", c, {"r": 0.05, "alpha": 1.0}))),
        Case("test_multislerp_merge", one(_two(a, b, "multislerp", c))),
        Case("test_dare_ties_merge", one(_two(a, b, "dare_ties", c, {"density": 0.66}))),
        Case("test_model_stock_merge", one(_two(b, c, "model_stock", a))),
        Case(
            "test_model_stock_filterwise_merge",
            one(_two(b, c, "model_stock", a, {"filter_wise": True})),
        ),
        Case("test_arcee_fusion_merge", one(_two(a, b, "arcee_fusion", a))),
        Case("test_nearswap_merge", one(_two(a, b, "nearswap", a, {"t": 0.0001}))),
        Case(
            "test_della_merge",
            one(_two(a, b, "della", c, {"density": 0.66, "epsilon": 0.05, "lambda": 0.5})),
        ),
        Case(
            "test_della_invalid_epsilon",
            one(_two(a, b, "della", c, {"density": 0.66, "epsilon": 1.35, "lambda": 0.5})),
            mergekit_refuses=True,
        ),
        Case("test_karcher_merge", one(_two(a, b, "karcher", c, {"max_iter": 5, "tol": 1e-5}))),
        Case("test_linear_VLM_merge", one(_two(va, vb, "linear")), vlm=True),
        Case("test_slerp_VLM_merge", one(vslerp), vlm=True),
        Case("test_nuslerp_VLM_merges", vnus, vlm=True, labels=vnus_labels),
        Case("test_task_arithmetic_VLM_merge", one(_two(va, vb, "task_arithmetic", vc)), vlm=True),
        Case("test_breadcrumbs_VLM_merge", one(_two(va, vb, "breadcrumbs", vc)), vlm=True),
        Case("test_ties_VLM_merge", one(_two(va, vb, "ties", vc, {"density": 0.3})), vlm=True),
        Case(
            "test_dare_ties_VLM_merge",
            one(_two(va, vb, "dare_ties", vc, {"density": 0.66})),
            vlm=True,
        ),
        Case("test_model_stock_VLM_merge", one(_two(vb, vc, "model_stock", va)), vlm=True),
        Case(
            "test_model_stock_filterwise_VLM_merge",
            one(_two(vb, vc, "model_stock", va, {"filter_wise": True})),
            vlm=True,
        ),
    ]
    assert len(out) == 33
    return out


def extra_cases(m: dict[str, str]) -> list[Case]:
    """Beyond mergekit's tests: a LLaVA merged with gradients, where each module's depth matters."""
    va, vb = m["vlm_a"], m["vlm_b"]
    grad = {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": [1.0, 0.25]}]}
    slerp = {
        "merge_method": "slerp",
        "base_model": va,
        "models": [{"model": va}, {"model": vb}],
        "parameters": grad,
        "dtype": "bfloat16",
    }
    lin = {
        "merge_method": "linear",
        "models": [
            {"model": va, "parameters": {"weight": [1.0, 0.2]}},
            {"model": vb, "parameters": {"weight": [0.0, 0.8]}},
        ],
        "dtype": "bfloat16",
    }
    return [
        Case(
            "extra_llava_gradients",
            (slerp, lin),
            vlm=True,
            labels=("slerp t gradient per filter", "linear weight gradients"),
        )
    ]


@dataclass
class Run:
    """One recipe of a case: where each tool wrote, and what they said."""

    cid: str
    recipe: dict[str, Any]
    yml: Path
    em: Path
    mk: Path
    mk32: Path | None
    text: tuple[Path, Path] | None = (
        None  # mergekit on the language models alone (bf16, f32 compute)
    )
    text_base: Path | None = None
    em_error: str | None = None
    digest: str | None = None
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class Basic:
    """Every case's runs, and mergekit's checks of the source LLaVA."""

    runs: dict[str, tuple[Case, list[Run]]]
    source_check: dict[str, Any]
    source: Path


def _swap(recipe: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    text = json.dumps(recipe)
    for old, new in paths.items():
        text = text.replace(json.dumps(old), json.dumps(new))
    return json.loads(text)


def _f32(recipe: dict[str, Any]) -> dict[str, Any]:
    return recipe | {"dtype": "float32", "out_dtype": recipe.get("dtype") or "float32"}


def run_all(root: Path, mk_python: str) -> Basic:
    """Every case (and the extras) merged by evomerge and by mergekit, with mergekit's checks applied.

    evomerge runs in this process (``merge_to_disk`` of the recipe file, ``evomerge merge``'s call);
    mergekit in two processes of ``mk_python`` running ``_mergekit_runner.py`` over half the jobs each.
    Each non-random recipe is also merged by mergekit computing in float32 (``dtype: float32``,
    ``out_dtype`` the recipe's dtype), and each LLaVA recipe over the language models alone.

    Args:
        root: an empty directory for models, recipes and outputs.
        mk_python: the python of mergekit 0.1.5's environment.

    Returns:
        The :class:`Basic` record.
    """
    models = build_models(root / "models")
    text = {
        models[k]: text_only(models[k], root / "models" / f"text_{k}")
        for k in ("vlm_a", "vlm_b", "vlm_c")
    }
    jobs: list[dict[str, Any]] = []
    out: dict[str, tuple[Case, list[Run]]] = {}

    def job(
        jid: str, recipe: dict[str, Any], dest: Path, check: list[Path], auto_arch: bool
    ) -> None:
        y = root / f"{jid}.yml"
        y.write_text(yaml.safe_dump(recipe, sort_keys=False))
        jobs.append(
            {
                "id": jid,
                "config": str(y),
                "out": str(dest),
                "check": [str(p) for p in check],
                "auto_arch": auto_arch,
            }
        )

    for case in cases(models) + extra_cases(models):
        runs = []
        for i, r in enumerate(case.recipes):
            cid = f"{case.name}.{i}"
            y = root / f"{cid}.yml"
            y.write_text(yaml.safe_dump(r, sort_keys=False))
            random = r["merge_method"] in RANDOM
            run = Run(
                cid,
                r,
                y,
                root / f"{cid}_em",
                root / f"{cid}_mk",
                None if random else root / f"{cid}_mk32",
            )
            try:
                run.digest = merge_to_disk(load_recipe(y), run.em, seed=0).digest
            except EvomergeError as e:
                run.em_error = str(e)
            job(cid, r, run.mk, [run.mk, run.em], case.vlm)
            if run.mk32 is not None:
                job(f"{cid}.f32", _f32(r), run.mk32, [], case.vlm)
            if case.vlm:
                run.text = (root / f"{cid}_mktext", root / f"{cid}_mktext32")
                job(f"{cid}.text", _swap(r, text), run.text[0], [], False)
                run.text_base = Path(text[r["base_model"]]) if r.get("base_model") else None
                if not random:
                    job(f"{cid}.text32", _f32(_swap(r, text)), run.text[1], [], False)
            runs.append(run)
        out[case.name] = (case, runs)

    # mergekit's check of a source LLaVA itself, with the architecture it infers for a LLaVA recipe.
    jobs.append(
        {
            "id": "source:vlm_a",
            "config": str(root / "test_linear_VLM_merge.0.yml"),
            "out": None,
            "check": [models["vlm_a"]],
            "auto_arch": True,
        }
    )
    halves = [jobs[0::2], jobs[1::2]]

    def mergekit(k: int) -> dict[str, Any]:
        (root / f"jobs{k}.json").write_text(json.dumps(halves[k]))
        proc = subprocess.run(
            [
                mk_python,
                str(Path(__file__).with_name("_mergekit_runner.py")),
                str(root / f"jobs{k}.json"),
                str(root / f"results{k}.json"),
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mergekit's runner failed: {proc.stderr[-3000:]}")
        return json.loads((root / f"results{k}.json").read_text())

    with ThreadPoolExecutor(2) as pool:
        results = {k: v for part in pool.map(mergekit, (0, 1)) for k, v in part.items()}
    for _, runs in out.values():
        for run in runs:
            run.results = {
                k.removeprefix(run.cid): v
                for k, v in results.items()
                if k == run.cid or k.startswith(run.cid + ".")
            }
    (source_check,) = results["source:vlm_a"]["checks"].values()
    return Basic(out, source_check, Path(models["vlm_a"]))
