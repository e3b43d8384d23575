"""The demo zoo: specialization of the micro zoo's experts, loading, reuse, determinism, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from evomerge.zoo import ensure_zoo, main_zoo, read_manifest, resolve_zoo_ref
from evomerge.zoo.build import (
    ZOO_VERSION,
    _summary,
    build_zoo,
    format_figures,
    is_current,
    merge_recipe,
)
from evomerge.zoo.data import SKILLS, Item, eval_strings, make_tokenizer
from evomerge.zoo.train import ZooSize, score_items

pytestmark = pytest.mark.slow

TINY = ZooSize(
    hidden=16,
    layers=1,
    heads=2,
    intermediate=32,
    base_steps=6,
    base_lr=1e-3,
    expert_steps=3,
    expert_lr=1e-3,
    batch=4,
    n_search=5,
    n_holdout=5,
)


def _items(path: Path, skill: str) -> list[Item]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [Item(skill, r["prompt"], tuple(r["choices"]), r["label"]) for r in rows]


def _load(zoo: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(zoo / name), AutoTokenizer.from_pretrained(
        zoo / name
    )


def _digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def test_task_items_are_well_formed(micro_zoo):
    for skill in SKILLS:
        search = _items(micro_zoo / "tasks" / f"zoo_{skill}.jsonl", skill)
        holdout = _items(micro_zoo / "tasks" / f"zoo_{skill}_holdout.jsonl", skill)
        assert {i.prompt for i in search}.isdisjoint(i.prompt for i in holdout)
        # Every item's letters are in the set kept out of training.
        kept_out = eval_strings(len(search) + len(holdout), read_manifest(micro_zoo)["seed"])
        assert {it.prompt.split(": ")[1][:5] for it in search + holdout} <= kept_out
        for it in search[:20]:
            letters = it.prompt.split(": ")[1].split(" ")[0]
            gold = {
                "rot": letters[1:] + letters[:1],
                "sort": "".join(sorted(letters)),
                "shift": "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in letters),
            }[skill]
            assert it.answer == gold  # the gold answer is the skill applied by hand
            assert len(set(it.choices)) == 4 and letters not in it.choices


def test_models_load_like_hub_models(micro_zoo):
    model, tok = _load(micro_zoo, "rot")
    assert model.config.model_type == "llama"
    ids = tok("rot: abc =")["input_ids"]
    assert len(ids) == len("rot: abc =")  # one token per character, no special tokens added
    assert tok.decode(ids) == "rot: abc ="
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_micro_experts_specialize(micro_zoo):
    """Scored independently of lm-eval: each expert beats the base and the other experts on its own
    task by a wide margin, and stays near chance (25%) on the others."""
    tok = make_tokenizer()
    acc: dict[str, dict[str, float]] = {}
    for name in ("base", *SKILLS):
        model, _ = _load(micro_zoo, name)
        acc[name] = {
            s: score_items(model, tok, _items(micro_zoo / "tasks" / f"zoo_{s}.jsonl", s))
            for s in SKILLS
        }
    for skill in SKILLS:
        own = acc[skill][skill]
        assert own >= acc["base"][skill] + 0.25, (skill, acc)
        for other in SKILLS:
            if other != skill:
                assert own >= acc[other][skill] + 0.25, (skill, other, acc)
                assert acc[skill][other] <= 0.5, (skill, other, acc)
    # The manifest's figures (measured with lm-eval during the build) agree with this scorer.
    figures = read_manifest(micro_zoo)["figures"]["models"]
    for name in acc:
        for s in SKILLS:
            assert abs(figures[name][f"zoo_{s}"] - acc[name][s]) <= 2 / 48 + 1e-9, (name, s)


def test_manifest_lists_models_tasks_and_figures(micro_zoo):
    m = read_manifest(micro_zoo)
    assert m["version"] == ZOO_VERSION and m["size"] == "micro"
    assert set(m["models"]) == {"base", *SKILLS}
    assert m["tasks"]["search"] == [f"zoo_{s}" for s in SKILLS]
    assert m["tasks"]["holdout"] == [f"zoo_{s}_holdout" for s in SKILLS]
    assert "task_arithmetic uniform 1/n" in m["figures"]["merges"]
    # every merge of the grid is scored on the holdout items too
    assert all(0 <= v["holdout_mean"] <= 1 for v in m["figures"]["merges"].values())
    assert m["training"]["experts"] == {
        s: {"steps": 250, "lr": 1e-3, "batch": 32, "replay": 0.3} for s in SKILLS
    }
    assert m["training"]["base"]["answer_only"] is False
    for d in m["models"].values():
        assert (micro_zoo / d["dir"] / "config.json").is_file()


def test_reuse_not_rebuild_and_refs(micro_zoo):
    stamp = (micro_zoo / "zoo.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = ensure_zoo("micro", micro_zoo.parent)
    assert again == micro_zoo and time.perf_counter() - t0 < 5
    assert (micro_zoo / "zoo.json").stat().st_mtime_ns == stamp
    assert os.environ["EVOMERGE_ZOO_DIR"] == str(micro_zoo.parent)
    assert resolve_zoo_ref("zoo:micro/sort") == str(micro_zoo / "sort")
    assert resolve_zoo_ref("zoo:micro") == str(micro_zoo / "tasks")
    assert resolve_zoo_ref("zoo:nano/base") is None
    assert resolve_zoo_ref("zoo:micro/nope") is None
    assert (micro_zoo / "zoo.json").stat().st_mtime_ns == stamp


def test_main_zoo_reuses_and_prints_table(micro_zoo, capsys):
    assert main_zoo(str(micro_zoo), "micro", 0) == 0
    out = capsys.readouterr().out
    assert "reused" in out
    assert "task_arithmetic uniform 1/n" in out and "zoo_rot" in out


def test_version_stamp_decides_rebuild(micro_zoo, tmp_path):
    m = read_manifest(micro_zoo)
    assert is_current(micro_zoo, "micro") and is_current(micro_zoo, "micro", 0)
    assert not is_current(micro_zoo, "micro", 1)  # another seed
    assert not is_current(micro_zoo, "demo")
    fake = tmp_path / "z"
    fake.mkdir()
    (fake / "zoo.json").write_text(json.dumps({**m, "version": "0"}))
    assert not is_current(fake, "micro")


def test_same_seed_same_tensors(tmp_path):
    a = build_zoo(tmp_path / "a", "micro", 3, shape=TINY, progress=False, figures=False)
    build_zoo(tmp_path / "b", "micro", 3, shape=TINY, progress=False, figures=False)
    build_zoo(tmp_path / "c", "micro", 4, shape=TINY, progress=False, figures=False)
    for name in a["models"]:
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name)
        assert _digest(tmp_path / "a" / name) != _digest(tmp_path / "c" / name)
    assert (tmp_path / "a" / "tasks" / "zoo_rot.jsonl").read_bytes() == (
        tmp_path / "b" / "tasks" / "zoo_rot.jsonl"
    ).read_bytes()
    # Experts differ from the base (they were trained).
    assert _digest(tmp_path / "a" / "rot") != _digest(tmp_path / "a" / "base")


def test_crash_leaves_nothing_half_built(tmp_path, monkeypatch):
    import evomerge.zoo.build as build

    calls = {"n": 0}
    real = build.train

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after the base, during the first expert
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "train", failing)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_zoo(tmp_path / "zoo", "micro", 0, shape=TINY, progress=False, figures=False)
    assert list(tmp_path.iterdir()) == []  # no zoo, no temp dir
    assert torch.get_num_threads() == threads  # the build restored the caller's thread count


def test_refuses_to_replace_a_directory_that_is_not_a_zoo(tmp_path):
    from evomerge.errors import EvomergeError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EvomergeError, match="not a zoo"):
        main_zoo(str(tmp_path / "mine"), "micro", 0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_per_skill_learning_rate_changes_only_that_expert(tmp_path):
    """``skill_lr`` trains one expert at its own rate; the others (same seeds) are bit-identical."""
    from dataclasses import replace

    a = build_zoo(tmp_path / "a", "micro", 3, shape=TINY, progress=False, figures=False)
    b = build_zoo(
        tmp_path / "b",
        "micro",
        3,
        shape=replace(TINY, skill_lr={"rot": 3e-2}),
        progress=False,
        figures=False,
    )
    assert (
        a["training"]["experts"]["rot"]["lr"] == 1e-3
        and b["training"]["experts"]["rot"]["lr"] == 3e-2
    )
    assert b["training"]["experts"]["sort"]["lr"] == 1e-3
    for name in ("base", "sort", "shift"):
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name), name
    assert _digest(tmp_path / "a" / "rot") != _digest(tmp_path / "b" / "rot")
    # and the larger rate gives the larger delta from the base
    from safetensors.torch import load_file

    def delta(zoo: Path) -> float:
        base, rot = (
            load_file(zoo / "base" / "model.safetensors"),
            load_file(zoo / "rot" / "model.safetensors"),
        )
        return float(sum(((rot[k] - base[k]) ** 2).sum() for k in base))

    assert delta(tmp_path / "b") > delta(tmp_path / "a")


def test_merge_recipe_labels_and_weights():
    names = ["rot", "sort", "shift"]
    label, r = merge_recipe(Path("/z"), names, 1 / 3)
    assert label == "task_arithmetic uniform 1/n" and r["merge_method"] == "task_arithmetic"
    assert r["base_model"] == str(Path("/z") / "base")
    assert [m["parameters"]["weight"] for m in r["models"]] == [1 / 3] * 3
    label, r = merge_recipe(Path("/z"), names, (0.7, 0.6, 0.4))
    assert label == "task_arithmetic rot=0.7 sort=0.6 shift=0.4"
    assert [(m["model"], m["parameters"]["weight"]) for m in r["models"]] == [
        (str(Path("/z") / n), w) for n, w in zip(names, (0.7, 0.6, 0.4), strict=True)
    ]
    label, r = merge_recipe(Path("/z"), names, {"method": "ties", "weight": 1.0, "density": 0.5})
    assert label == "ties uniform weight=1 density=0.5" and r["merge_method"] == "ties"
    assert all(m["parameters"] == {"weight": 1.0, "density": 0.5} for m in r["models"])


def test_summary_headroom_over_the_best_uniform_merge():
    """The summary compares per-model weights with the best uniform merge (values worked by hand)."""

    def acc(mean: float, hold: float) -> dict[str, float]:
        return {"mean": mean, "holdout_mean": hold}

    fig = {
        "models": {
            "base": acc(0.25, 0.25),
            "rot": acc(0.5, 0.52),
            "sort": acc(0.53, 0.48),
            "shift": acc(0.45, 0.5),
        },
        "merges": {
            "task_arithmetic uniform 1/n": acc(0.68, 0.67),
            "ties uniform weight=1 density=0.5": acc(0.58, 0.63),
            "task_arithmetic rot=0.7 sort=0.6 shift=0.4": acc(0.83, 0.86),
            "task_arithmetic rot=0.9 sort=0.9 shift=0.9": acc(0.6, 0.61),
        },
    }
    sm = _summary(
        fig,
        ["rot", "sort", "shift"],
        ["task_arithmetic uniform 1/n", "ties uniform weight=1 density=0.5"],
    )
    assert (
        sm["best_expert"] == "sort"
        and sm["best_expert_mean"] == 0.53
        and sm["best_expert_holdout_mean"] == 0.48
    )
    assert sm["uniform_1n_mean"] == 0.68 and sm["uniform_ties_mean"] == 0.58
    assert sm["best_uniform"] == "task_arithmetic uniform 1/n"
    assert sm["best_per_model"] == "task_arithmetic rot=0.7 sort=0.6 shift=0.4" == sm["best_merge"]
    assert sm["headroom"] == 0.15 and sm["headroom_holdout"] == 0.19
    text = format_figures(
        {
            "figures": {**fig, "eval_seconds": 1.0, "summary": sm},
            "tasks": {"search": ["zoo_rot"], "items": {"zoo_rot": 100}},
        }
    )
    assert "+15.0 points over the best uniform merge (+19.0 on holdout)" in text


# --- The shipped demo zoo -------------------------------------------------------------------------

# SHA-256 of the shipped demo zoo's weight files: the seed-0 zoo of version 6 whose figures the
# README's zoo table shows (trained with torch's AVX2 kernels, one thread).
DEMO_DIGESTS = {
    "base": "f8fa49e097f3c3fa437ed0df7eab62fb2aea887bcd334d4fc22089a05cfdceef",
    "rot": "9ec73b3587cf0304c191bdb209986d585966d825cce61c53062445516316b444",
    "sort": "22bb6835d89c985ea2f294d573b926a8aac9350a4e4365b8ecdbe85ba53d3d7b",
    "shift": "2e75330ac67fca3057902cae47a7ef49b3823999d0aff76bc92e54868cf776dd",
}


def _no_training(*args, **kwargs):
    raise AssertionError("the shipped zoo must install without training")


def test_shipped_demo_zoo_installs_without_training(tmp_path, monkeypatch):
    import evomerge.zoo as zoo_pkg
    import evomerge.zoo.build as build
    from evomerge.zoo.build import shipped_manifest, tasks_sha256

    monkeypatch.setattr(build, "train", _no_training)
    monkeypatch.setattr(zoo_pkg, "_train_zoo", _no_training)
    t0 = time.perf_counter()
    zoo = ensure_zoo("demo", tmp_path)
    assert time.perf_counter() - t0 < 20
    assert zoo == (tmp_path / "demo").resolve()
    m = read_manifest(zoo)
    assert (
        m["source"] == "shipped"
        and m["version"] == ZOO_VERSION
        and m["size"] == "demo"
        and m["seed"] == 0
    )
    assert (
        {name: _digest(zoo / name) for name in ("base", *SKILLS)}
        == DEMO_DIGESTS
        == m["shipped"]["digests"]
    )
    # The task items are regenerated from the seed: the same bytes the figures were measured on,
    # and the YAMLs point at the installed JSONL files.
    assert tasks_sha256(zoo / "tasks") == shipped_manifest("demo")["shipped"]["tasks_sha256"]
    assert str(zoo / "tasks" / "zoo_rot.jsonl") in (zoo / "tasks" / "zoo_rot.yaml").read_text()
    assert m["tasks"]["items"] == {f"zoo_{s}{h}": 100 for s in SKILLS for h in ("", "_holdout")}
    # The figures are the README's zoo table.
    fig = m["figures"]
    assert fig["models"]["base"]["mean"] == 0.2733 and fig["models"]["sort"]["mean"] == 0.5267
    assert fig["merges"]["task_arithmetic uniform 1/n"]["mean"] == 0.68
    assert fig["merges"]["task_arithmetic uniform 0.5"]["mean"] == 0.7333
    best = fig["merges"]["task_arithmetic rot=0.78 sort=0.75 shift=0.34"]
    assert best["mean"] == 0.85 and best["holdout_mean"] == 0.85
    assert fig["summary"]["headroom"] == 0.1167
    # The models load like hub models.
    model, tok = _load(zoo, "shift")
    assert sum(p.numel() for p in model.parameters()) == m["parameters"]
    # Reused afterwards, not reinstalled.
    stamp = (zoo / "zoo.json").stat().st_mtime_ns
    assert ensure_zoo("demo", tmp_path) == zoo and (zoo / "zoo.json").stat().st_mtime_ns == stamp


def test_shipped_zoo_replaces_older_zoos_and_keeps_rebuilt_ones(tmp_path, monkeypatch, capsys):
    import evomerge.zoo as zoo_pkg
    import evomerge.zoo.build as build
    from evomerge.zoo.build import shipped_manifest

    monkeypatch.setattr(build, "train", _no_training)
    monkeypatch.setattr(zoo_pkg, "_train_zoo", _no_training)
    shipped = shipped_manifest("demo", 0)
    assert shipped is not None  # a ZOO_VERSION bump needs a re-shipped zoo (build.pack_zoo)

    def fake_zoo(path: Path, **manifest) -> Path:
        for d in ("base", *SKILLS):
            (path / d).mkdir(parents=True)
            (path / d / "model.safetensors").write_bytes(b"not these weights")
        (path / "zoo.json").write_text(json.dumps({**shipped, **manifest}))
        return path

    old = fake_zoo(tmp_path / "old", version="5")  # an older version
    unstamped = fake_zoo(tmp_path / "unstamped")  # trained before the weights shipped
    m = read_manifest(unstamped)
    m.pop("source", None)
    del m["shipped"]
    (unstamped / "zoo.json").write_text(json.dumps(m))
    rebuilt = fake_zoo(tmp_path / "rebuilt", source="trained")  # `evomerge zoo --rebuild`: kept
    for zoo in (old, unstamped):
        assert not is_current(zoo, "demo", 0)
        assert main_zoo(str(zoo), "demo", 0) == 0
        assert (
            _digest(zoo / "rot") == DEMO_DIGESTS["rot"]
            and read_manifest(zoo)["source"] == "shipped"
        )
    assert is_current(rebuilt, "demo", 0)
    capsys.readouterr()
    assert main_zoo(str(rebuilt), "demo", 0) == 0
    out = capsys.readouterr().out
    assert "up to date, reused" in out and "the tensors differ from the shipped weights" in out
    assert (rebuilt / "rot" / "model.safetensors").read_bytes() == b"not these weights"


def test_rebuild_trains_instead_of_installing(tmp_path, monkeypatch, capsys):
    """``evomerge zoo --rebuild`` trains the zoo (here a stand-in that records the call, installs the
    shipped weights and stamps them as trained: the 4-minute training is not run in tests)."""
    import evomerge.zoo as zoo_pkg
    from evomerge.cli import build_parser
    from evomerge.zoo.build import install_zoo

    assert build_parser().parse_args(["zoo", "--rebuild"]).rebuild is True
    assert build_parser().parse_args(["zoo"]).rebuild is False
    calls = []

    def fake_train_zoo(dest, size, seed, *, progress=True):
        calls.append((Path(dest), size, seed))
        install_zoo(dest, size, progress=False)
        m = read_manifest(dest)
        (Path(dest) / "zoo.json").write_text(json.dumps({**m, "source": "trained"}))

    monkeypatch.setattr(zoo_pkg, "_train_zoo", fake_train_zoo)
    zoo = tmp_path / "demo"
    assert main_zoo(str(zoo), "demo", 0) == 0  # installs: no training
    assert calls == [] and "installed from the shipped weights" in capsys.readouterr().out
    assert main_zoo(str(zoo), "demo", 0, rebuild=True) == 0  # trains, although the zoo is current
    assert calls == [(zoo.resolve(), "demo", 0)]
    out = capsys.readouterr().out
    assert "built (trained here)" in out and "bit-identical to the shipped weights" in out
    assert main_zoo(str(zoo), "demo", 1) == 0  # no weights ship for another seed: trained
    assert calls[-1] == (zoo.resolve(), "demo", 1)


def test_rebuild_runs_with_pinned_kernels(tmp_path, monkeypatch):
    """A zoo is trained in a child process whose torch uses its AVX2 kernels and MKL its AVX2 code
    path on x86-64 (the shipped zoo's), so a rebuild on another x86-64 CPU rounds the same way."""
    import subprocess

    import evomerge.zoo as zoo_pkg

    seen = {}

    def fake_run(cmd, env, check):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    zoo_pkg._train_zoo(tmp_path / "z", "micro", 3, progress=False)
    assert seen["cmd"][-4:] == [str(tmp_path / "z"), "micro", "3", "0"]
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert seen["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and seen["env"]["MKL_CBWR"] == "AVX2"


def test_shipped_files_are_package_data():
    """Every shipped file matches a pattern of ``[tool.setuptools.package-data]`` (so wheels carry it)."""
    tomllib = pytest.importorskip("tomllib")
    import evomerge
    from evomerge.zoo.build import SHIPPED_DIR

    root = Path(evomerge.__file__).parent
    pyproject = root.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("installed package: no pyproject.toml")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"][
        "evomerge"
    ]
    covered = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    shipped = {p for p in SHIPPED_DIR.rglob("*") if p.is_file()}
    assert shipped and shipped <= covered, sorted(str(p) for p in shipped - covered)
