"""Mixture-of-experts candidates in a search: the space's ``moe:`` section, building candidates in
memory (merged experts included), scoring them beside merges, and exporting them for mergekit-moe."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.engine.merger import Merger, digest_model_dir, merge_to_disk
from evomerge.engine.rng import seed_from_text
from evomerge.engine.sources import open_sources
from evomerge.errors import ConfigError
from evomerge.moe import moe_to_disk
from evomerge.moe.resident import ResidentMoE
from evomerge.space import load_space
from evomerge.space.directives import Directive

SKILLS = ("rot", "sort", "shift")
ROOT = Path(__file__).resolve().parents[2]
DEMO_MOE = ROOT / "search_spaces" / "demo_moe.yml"
MERGEKIT_MOE = ROOT / ".venv-mk" / "bin" / "mergekit-moe"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evomerge.zoo import ensure_zoo

    return ensure_zoo("demo", tmp_path_factory.mktemp("moesearch"))


def blend(zoo: Path, weights: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "parameters": {"normalize": False},
        "dtype": "float32",
        "models": [
            {"model": str(zoo / s), "parameters": {"weight": w}}
            for s, w in zip(SKILLS, weights, strict=True)
        ],
    }


def moe_space(zoo: Path, **over: Any) -> dict[str, Any]:
    space = yaml.safe_load(DEMO_MOE.read_text())
    text = yaml.safe_dump(space, sort_keys=False).replace("zoo:demo/", str(zoo) + "/")
    space = yaml.safe_load(text)
    space["search"].pop("baselines")
    space.update(over)
    return space


def load(tmp: Path, data: dict[str, Any]) -> Any:
    path = tmp / "space.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_space(path)


def test_demo_moe_space_renders_merges_and_mixtures(zoo, tmp_path):
    space = load(tmp_path, moe_space(zoo))
    names = [d.name for d in space.directives]
    assert names[:5] == ["method", "weight.rot", "weight.sort", "weight.shift", "lambda"]
    assert {
        "moe.gate_mode",
        "moe.k",
        "moe.use.rot",
        "moe.prompts.rot",
        "weight.rot.e3",
        "moe.prompts.e3.2",
        "moe.use.e3",
    } <= set(names)
    prompts = {f"zoo_{s}": [f"{s}: item{i} =" for i in range(20)] for s in SKILLS}
    picks = {
        "method": "moe",
        "moe.gate_mode": "cheap_embed",
        "moe.k": 2,
        "moe.use.rot": True,
        "moe.use.sort": False,
        "moe.use.shift": True,
        "moe.use.e3": True,
        "moe.prompts.rot": 3,
        "moe.prompts.shift": 18,
        "weight.rot.e3": 0.5,
        "weight.sort.e3": 0.25,
        "weight.shift.e3": 1.0,
        "moe.prompts.e3.0": 0,
        "moe.prompts.e3.1": 1,
        "moe.prompts.e3.2": 2,
    }
    asked: list[str] = []

    def suggest(name: str, d: Directive) -> Any:
        asked.append(name)
        return picks[name]

    cfg = space.render(suggest, lambda ref: 4, prompts)
    assert (
        "moe.prompts.sort" not in asked and "weight.rot" not in asked
    )  # an expert left out, the merge part: not sampled
    assert (
        cfg["merge_method"] == "moe"
        and cfg["gate_mode"] == "cheap_embed"
        and cfg["experts_per_token"] == 2
        and cfg["dtype"] == "float32"
    )
    assert [e["positive_prompts"] for e in cfg["experts"]] == [
        ["rot: item3 =", "rot: item4 ="],
        ["shift: item18 =", "shift: item19 ="],
        ["rot: item0 =", "sort: item1 =", "shift: item2 ="],
    ]
    assert cfg["experts"][2]["source_model"] == blend(zoo, (0.5, 0.25, 1.0)) | {
        "base_model": str(zoo / "base")
    }
    with pytest.raises(
        ConfigError, match="moe.experts: no expert takes part at this point"
    ):  # the trial fails, saying why
        space.render(
            lambda n, d: False if n.startswith("moe.use.") else picks[n], lambda ref: 4, prompts
        )
    merge = space.render(
        lambda n, d: {"method": "task_arithmetic", "lambda": 1.0}.get(n, 0.5), lambda ref: 4
    )
    assert (
        merge["merge_method"] == "task_arithmetic"
        and "experts" not in merge
        and len(merge["models"]) == 3
    )


@pytest.mark.parametrize(
    "case",
    [
        "no_section",
        "section_unused",
        "typo",
        "among",
        "expert_key",
        "bad_k",
        "k_option",
        "gate_option",
        "expert_dtype_option",
    ],
)
def test_bad_moe_spaces_name_the_field(case, zoo, tmp_path):
    data = moe_space(zoo)
    must = {
        "no_section": "moe",
        "section_unused": "moe",
        "typo": "moe.gate_mod",
        "among": "moe.experts[0].positive_prompts.n",
        "expert_key": "moe.experts[1].positive_prompt",
        "bad_k": "moe.experts_per_token",
        "k_option": "moe.experts_per_token.choice",
        "gate_option": "moe.gate_mode.choice",
        "expert_dtype_option": "moe.experts[3].source_model.dtype.choice",
    }[case]
    if case == "no_section":
        del data["moe"]
    elif case == "section_unused":
        data["merge_method"] = "task_arithmetic"
    elif case == "typo":
        data["moe"]["gate_mod"] = data["moe"].pop("gate_mode")
    elif case == "among":
        data["moe"]["experts"][0]["positive_prompts"] = {"from_task": "zoo_rot", "n": 5, "among": 3}
    elif case == "expert_key":
        data["moe"]["experts"][1]["positive_prompt"] = data["moe"]["experts"][1].pop(
            "positive_prompts"
        )
    elif case == "bad_k":
        data["moe"]["experts_per_token"] = 5
    elif case == "k_option":  # was a TypeError comparing 'x' with an int
        data["moe"]["experts_per_token"] = {"choice": [1, "x"]}
    elif (
        case == "gate_option"
    ):  # an option past the first was only met by the trials that picked it (each failed)
        data["moe"]["gate_mode"] = {"choice": ["hidden", "hiden"]}
    elif case == "expert_dtype_option":
        data["moe"]["experts"][3]["source_model"]["dtype"] = {"choice": ["float32", "flaot16"]}
    with pytest.raises(ConfigError) as e:
        load(tmp_path, data)
    assert e.value.file == str(tmp_path / "space.yml") and e.value.field == must, str(e.value)


def test_resident_moe_with_a_merged_expert_equals_the_disk_build(zoo, tmp_path):
    """A merged expert built in memory gives the tensors of merging it to disk, then `evomerge moe`."""
    refs = [str(zoo / n) for n in ("base", *SKILLS)]
    merger = Merger(open_sources(refs), resident=True, seed=3)
    resident = ResidentMoE(merger)
    experts = [
        {"source_model": str(zoo / "rot"), "positive_prompts": ["rot: abcde ="]},
        {
            "source_model": blend(zoo, (0.4, 0.9, 0.3)),
            "positive_prompts": ["sort: dbeca =", "shift: abcde ="],
        },
    ]
    cfg = {
        "merge_method": "moe",
        "base_model": str(zoo / "base"),
        "gate_mode": "hidden",
        "experts_per_token": 1,
        "dtype": "float32",
        "experts": experts,
    }
    model, res = resident.materialize(cfg, "test")
    merge_to_disk(blend(zoo, (0.4, 0.9, 0.3)), tmp_path / "blend")
    on_disk = copy.deepcopy(cfg)
    on_disk["experts"][1]["source_model"] = str(tmp_path / "blend")
    moe_to_disk(on_disk, tmp_path / "moe", seed=3)
    assert res.tensor_digest == digest_model_dir(tmp_path / "moe")
    sd = load_file(tmp_path / "moe" / "model.safetensors")
    assert all(torch.equal(t, sd[n]) for n, t in model.state_dict().items())
    # Another layout (two experts per token) gets its own resident model; the first is reused after.
    model2, res2 = resident.materialize(cfg | {"experts_per_token": 2}, "test")
    assert model2 is not model and res2.digest != res.digest
    again, res3 = resident.materialize(cfg, "test")
    assert again is model and res3.digest == res.digest


@pytest.mark.slow
def test_search_scores_moe_candidates_and_exports_them(zoo, tmp_path, capsys):
    """A short search of merges and mixtures (merged experts included) on the demo zoo, then the
    export of its best mixture: re-built with --merge it has the trial's tensors, and mergekit-moe
    (when present) accepts the exported file and builds the same tensors."""
    from evomerge.cli import main
    from evomerge.search.loop import run_search
    from evomerge.search.table import load_trials

    data = moe_space(zoo, merge_method="moe")  # mixtures only, to get several of them in few trials
    data["search"] = {
        "sampler": "random",
        "trials": 4,
        "seed": 1,
        "finalists": 1,
        "prune": False,
    }  # every trial scored in full
    data["evaluate"]["include_path"] = str(zoo / "tasks")
    data["evaluate"]["limit"] = 20
    data["evaluate"]["holdout"] = {"tasks": ["zoo_rot_holdout"], "limit": 10}
    data["moe"]["experts"][3]["optional"] = False  # the merged expert always takes part
    space = tmp_path / "space.yml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    outcome = run_search(space, results_dir=tmp_path / "results", quiet=True, device="cpu")
    df = load_trials(outcome.paths.csv)
    searched = df[df["baseline"].isna() | (df["baseline"] == "")]
    assert (
        searched["state"] == "COMPLETE"
    ).sum() == 4  # the merged expert always takes part: every point builds
    done = searched[searched["state"] == "COMPLETE"]
    assert len(done) >= 1 and set(done["method"]) == {"moe"} and done["score"].between(0, 1).all()
    number = int(done.sort_values("score").iloc[-1]["number"])
    out = tmp_path / "export" / "best.yml"
    out.parent.mkdir()
    args = [
        "export",
        str(space),
        "--results-dir",
        str(tmp_path / "results"),
        "--trial",
        str(number),
        "-o",
        str(out),
        "--merge",
        str(tmp_path / "built"),
    ]
    out.write_text(
        "mine"
    )  # an existing -o file: refused before the merged experts' recipes are written
    assert main(args) == 2
    assert (
        "file exists" in capsys.readouterr().err
        and out.read_text() == "mine"
        and not list(out.parent.glob("best.expert*"))
    )
    out.unlink()
    assert main(args) == 0
    assert "matches the trial" in capsys.readouterr().out
    exported = yaml.safe_load(out.read_text())
    assert "merge_method" not in exported and isinstance(
        exported["experts"][-1]["source_model"], str
    )
    last = len(exported["experts"]) - 1  # the merged expert, named by its place in the mixture
    assert exported["experts"][last]["source_model"] == str(
        (out.parent / f"best.expert{last}").absolute()
    )
    assert (out.parent / f"best.expert{last}.yml").is_file() and (
        out.parent / f"best.expert{last}" / "config.json"
    ).is_file()
    # A merged expert's model directory in the way: refused before any file is written.
    (out.parent / f"again.expert{last}").mkdir()
    (out.parent / f"again.expert{last}" / "keep").write_text("mine")
    again = [*args[:-4], "-o", str(out.parent / "again.yml"), "--merge", str(tmp_path / "built2")]
    assert main(again) == 2
    assert "directory is not empty" in capsys.readouterr().err
    assert (
        not (out.parent / "again.yml").exists()
        and not (out.parent / f"again.expert{last}.yml").exists()
        and not (tmp_path / "built2").exists()
    )
    if not MERGEKIT_MOE.is_file():
        return
    seed = seed_from_text(out.read_text())
    run = subprocess.run(
        [str(MERGEKIT_MOE), str(out), str(tmp_path / "mk"), "--random-seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = (
        load_file(tmp_path / "mk" / "model.safetensors"),
        load_file(tmp_path / "built" / "model.safetensors"),
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(tmp_path / "mk")
