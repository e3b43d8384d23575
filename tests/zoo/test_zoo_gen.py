"""The zoo's generation tasks: the multiple-choice items with the answer generated, few-shot
examples that are no evaluation item, written for new and existing zoos; the shared scorer gives
HFLM's generations on them (shipped demo zoo, installed without training)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from evomerge.evaluation.hflm import make_lm
from evomerge.evaluation.tasks import get_task_dict, leaf_tasks, manager_for, quiet_lm_eval
from evomerge.zoo import ensure_zoo, gen_task_names
from evomerge.zoo.build import shipped_manifest, tasks_sha256
from evomerge.zoo.data import SKILLS, eval_strings, skill_answer, write_tasks
from evomerge.zoo.gentasks import GEN_DIR, N_SHOTS, has_gen_tasks, write_gen_tasks


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The shipped demo zoo installed into a temp dir (no training)."""
    return ensure_zoo("demo", tmp_path_factory.mktemp("zoo"))


def test_gen_files_are_written_beside_the_items(tmp_path):
    tasks = tmp_path / "tasks"
    write_tasks(tasks, tasks, 6, 4, seed=3)
    before = tasks_sha256(tasks)
    counts = write_gen_tasks(tasks, Path("/final/tasks"), 10, seed=3)
    assert counts == {f"zoo_{s}_shots.jsonl": N_SHOTS for s in SKILLS}
    assert tasks_sha256(tasks) == before  # the item digest covers the top-level JSONL only
    assert has_gen_tasks(tasks)
    avoid = eval_strings(10, 3)
    for skill in SKILLS:
        rows = [json.loads(x) for x in (tasks / GEN_DIR / f"zoo_{skill}_shots.jsonl").open()]
        letters = [r["prompt"].split(": ")[1][:5] for r in rows]
        assert not set(letters) & avoid  # no shot is an evaluation item of any skill
        assert [r["choices"][0] for r in rows] == [skill_answer(skill, s) for s in letters]
        text = (tasks / GEN_DIR / f"zoo_{skill}_gen_holdout.yaml").read_text()
        assert f'"/final/tasks/zoo_{skill}_holdout.jsonl"' in text
        assert f'"/final/tasks/gen/zoo_{skill}_shots.jsonl"' in text


def test_items_are_the_multiple_choice_items_with_fixed_shots(demo):
    search, holdout = gen_task_names()
    names = search + holdout + [f"zoo_{s}{h}" for s in SKILLS for h in ("", "_holdout")]
    tasks = leaf_tasks(get_task_dict(names, manager_for(names, str(demo / "tasks"))))
    for skill in SKILLS:
        for h in ("", "_holdout"):
            gen, mc = tasks[f"zoo_{skill}_gen{h}"], tasks[f"zoo_{skill}{h}"]
            assert gen.OUTPUT_TYPE == "generate_until"
            assert len(gen.eval_docs) == len(mc.eval_docs) == 100
            for d, e in zip(gen.eval_docs, mc.eval_docs, strict=True):
                assert gen.doc_to_text(d) == mc.doc_to_text(e)
                assert gen.doc_to_target(d) == mc.doc_to_choice(e)[mc.doc_to_target(e)]
        gen = tasks[f"zoo_{skill}_gen"]
        assert gen.config.num_fewshot == 0  # the zoo's models cannot use a shot (module docstring)
        shots = [
            json.loads(x) for x in (demo / "tasks" / GEN_DIR / f"zoo_{skill}_shots.jsonl").open()
        ]
        gen.set_fewshot_seed(seed=1234)
        want = "".join(f"{r['prompt']} {r['choices'][0]}\n" for r in shots[:3])
        for doc in list(gen.eval_docs)[:5]:  # first_n: the same examples before every item
            assert gen.fewshot_context(doc, 3) == want + gen.doc_to_text(doc)


def test_an_existing_zoo_gets_the_gen_tasks_and_moves_with_them(demo, tmp_path):
    old = tmp_path / "old" / "demo"
    shutil.copytree(demo, old)
    shutil.rmtree(old / "tasks" / GEN_DIR)  # a zoo set up before the generation tasks
    assert ensure_zoo("demo", tmp_path / "old") == old.resolve()
    assert has_gen_tasks(old / "tasks")
    for f in (demo / "tasks" / GEN_DIR).glob("*.jsonl"):
        assert (old / "tasks" / GEN_DIR / f.name).read_bytes() == f.read_bytes()
    moved = tmp_path / "moved" / "demo"
    shutil.move(str(old), str(moved))
    ensure_zoo("demo", tmp_path / "moved")
    text = (moved / "tasks" / GEN_DIR / "zoo_rot_gen.yaml").read_text()
    assert str(moved.resolve() / "tasks" / "zoo_rot.jsonl") in text
    assert tasks_sha256(moved / "tasks") == shipped_manifest("demo")["shipped"]["tasks_sha256"]


def _generations(lm, task_dict) -> tuple[dict[str, list[str]], dict[str, float]]:
    from lm_eval.evaluator import evaluate

    for t in leaf_tasks(task_dict).values():
        t.set_fewshot_seed(seed=1234)
    out = evaluate(
        lm,
        task_dict,
        samples={n: list(range(40)) for n in leaf_tasks(task_dict)},
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    gens = {
        name: [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for name, samples in out["samples"].items()
    }
    return gens, {n: r["exact_match,extract"] for n, r in out["results"].items()}


@pytest.mark.slow  # four lm-eval runs per case
@pytest.mark.parametrize("shots", [0, 3])
def test_shared_scorer_generates_hflms_answers_on_the_zoo(demo, shots):
    """Zero-shot, and three shots, which the zoo's 32-token context left-truncates (HFLM keeps the
    last 24 tokens of the prompt: 32 minus the 8-token budget)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_lm_eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = gen_task_names()[0]
        task_dict = get_task_dict(names, manager_for(names, str(demo / "tasks")))
        for t in leaf_tasks(task_dict).values():
            t.set_config(key="num_fewshot", value=shots)
        tok = AutoTokenizer.from_pretrained(demo / "base")
        for name in ("rot", "base"):
            model = AutoModelForCausalLM.from_pretrained(demo / name).eval()
            got, got_scores = _generations(make_lm(model, tok, batch_size=32), task_dict)
            want, want_scores = _generations(
                make_lm(model, tok, scorer="hflm", batch_size=32), task_dict
            )
            assert got == want and got_scores == want_scores
            if name == "rot" and shots == 0:  # the expert writes its skill's answers
                assert got_scores["zoo_rot_gen"] == 1.0 and got_scores["zoo_shift_gen"] < 0.1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # a search, an export with a merge, lm_eval in a child process
def test_best_demo_gen_trial_exported_merged_and_scored_by_plain_lm_eval(tmp_path, monkeypatch):
    """The done-when check of issue 23: ``search_spaces/demo_gen.yml`` (fewer trials), the trial
    ``evomerge export`` takes, merged (``--merge``) and scored by ``lm_eval --model hf`` on the
    generation holdout tasks, gives the trial's scores: its validation scores on the validation
    items and its test scores on the test items (the holdout split of the evaluator)."""
    import subprocess
    import sys

    import yaml

    from evomerge.cli import main
    from evomerge.evaluation.base import VALIDATION, split_holdout
    from evomerge.search.loop import run_search
    from evomerge.search.table import chosen_row, load_trials

    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(tmp_path / "zoo"))
    zoo = ensure_zoo("demo")
    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "search_spaces" / "demo_gen.yml").read_text())
    data["search"]["trials"] = 8
    space = tmp_path / "demo_gen.yml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    out = run_search(space, results_dir=tmp_path / "r", quiet=True, log=lambda m: None)
    best = chosen_row(load_trials(out.paths.csv))
    assert best is not None
    model_dir = tmp_path / "best"
    argv = ["export", str(space), "-o", str(tmp_path / "best.yml"), "--merge", str(model_dir)]
    assert main([*argv, "--results-dir", str(tmp_path / "r")]) == 0
    assert f"trial {int(best['number'])}" in (tmp_path / "best.yml").read_text()
    holdout = gen_task_names()[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir}",
            "--tasks",
            ",".join(holdout),
            "--include_path",
            str(zoo / "tasks"),
            "--device",
            "cpu",
            "--batch_size",
            "16",
            "--log_samples",
            "--output_path",
            str(tmp_path / "lm_eval"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in holdout:
        (log,) = (tmp_path / "lm_eval").rglob(f"samples_{name}_*.jsonl")
        value = {
            s["doc_id"]: s["exact_match"] for s in map(json.loads, log.read_text().splitlines())
        }
        val, test = split_holdout(sorted(value), VALIDATION)
        for ids, col in ((val, f"v_{name}"), (test, f"t_{name}")):
            if col in best and best[col] == best[col]:  # scored (the test: the chosen trial)
                assert sum(value[i] for i in ids) / len(ids) == pytest.approx(best[col], abs=1e-9)
        assert best[f"v_{name}"] == best[f"v_{name}"]
