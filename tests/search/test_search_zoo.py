"""The whole product on the micro zoo with real lm-eval scoring: `evomerge search` end to end,
export round trip, and the overfit flag on mismatched vs matched search/holdout sets."""

from __future__ import annotations

import pytest
import yaml
from _spaces import zoo_space

from evomerge.cli import main
from evomerge.engine import digest_model_dir
from evomerge.search.table import load_trials
from evomerge.zoo import SKILLS, task_names

SEARCH, HOLDOUT = task_names()

pytestmark = pytest.mark.slow


def test_cli_search_on_the_micro_zoo_end_to_end(micro_zoo, tmp_path, capsys):
    space = zoo_space(tmp_path / "space.yml", tasks=SEARCH, holdout=HOLDOUT)
    results = tmp_path / "results"
    assert main(["search", str(space), "--results-dir", str(results), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "on the test items, the chosen trial" in out
    df = load_trials(results / "zoo")
    searched = df[df["baseline"] == ""]
    # pruning is on by default: a trial stopped early (PRUNED) counts against the budget with its items
    assert (
        searched["state"].isin(["COMPLETE", "PRUNED"]).sum() == 5
        and (searched["state"] == "COMPLETE").any()
    )
    full = searched.loc[searched["state"] == "COMPLETE", "items"]
    assert (full == full.max()).all() and (
        searched.loc[searched["state"] == "PRUNED", "items"] < full.max()
    ).all()
    # real per-task accuracies in [0, 1] with binomial standard errors
    for task in SEARCH:
        assert (
            df[f"s_{task}"].between(0, 1).all()
            and (df[f"se_{task}"] >= 0).all()
            and df[f"se_{task}"].max() > 0
        )
    # each expert alone is best on its own task (the zoo's specialization, seen through the search)
    base = df.set_index("baseline")
    for skill in SKILLS:
        own = base.loc[f"source:zoo:micro/{skill}", f"s_zoo_{skill}"]
        assert own > base.loc["source:zoo:micro/base", f"s_zoo_{skill}"]
    # resume: the same command with a larger budget continues the same study
    assert (
        main(["search", str(space), "--results-dir", str(results), "--quiet", "--trials", "7"]) == 0
    )
    df2 = load_trials(results / "zoo")
    assert ((df2["baseline"] == "") & df2["state"].isin(["COMPLETE", "PRUNED"])).sum() == 7
    assert set(df["digest"]) <= set(df2["digest"])
    # export and re-merge reproduces the trial's tensors
    best = tmp_path / "best.yml"
    assert (
        main(
            [
                "export",
                str(space),
                "--results-dir",
                str(results),
                "-o",
                str(best),
                "--merge",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    text = best.read_text()
    number = int(text.split("trial ", 1)[1].split(".", 1)[0])
    assert digest_model_dir(tmp_path / "m") == df2.loc[df2["number"] == number, "digest"].iloc[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tmp_path / "m")


def _easy_task(micro_zoo, folder):
    """A deliberately easy copy of a zoo task: every item keeps only its right answer."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    src = micro_zoo / "tasks" / f"{SEARCH[0]}.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    data = folder / "zoo_easy.jsonl"
    data.write_text(
        "".join(
            json.dumps({**r, "choices": [r["choices"][r["label"]]], "label": 0}) + "\n"
            for r in rows
        )
    )
    text = (micro_zoo / "tasks" / f"{SEARCH[0]}.yaml").read_text()
    text = text.replace(f"task: {SEARCH[0]}", "task: zoo_easy").replace(str(src), str(data))
    (folder / "zoo_easy.yaml").write_text(text)
    return folder


def test_overfit_flag_on_easy_search_hard_holdout_and_not_on_matched_sets(micro_zoo, tmp_path):
    from evomerge.search.loop import run_search

    # Search on an easy item set (every merge scores 1.0), holdout on the real items: the
    # finalists' search scores overstate their validation (and the chosen one's test) scores far
    # beyond two standard errors.
    easy = _easy_task(micro_zoo, tmp_path / "easy")
    skewed = zoo_space(
        tmp_path / "skewed.yml", tasks=["zoo_easy"], holdout=HOLDOUT, trials=3, name="skewed"
    )
    data = yaml.safe_load(skewed.read_text())
    data["evaluate"]["include_path"] = ["zoo:micro", str(easy)]
    skewed.write_text(yaml.safe_dump(data))
    out = run_search(skewed, results_dir=tmp_path / "r", quiet=True, log=lambda m: None)
    df = load_trials(out.paths.csv)
    fin = df[(df["baseline"] == "") & df["validation"].notna()]
    assert len(fin) >= 2 and (fin["score"] == 1.0).all()
    assert fin["overfit"].astype(str).str.lower().eq("true").all(), fin[
        ["score", "validation", "test", "overfit_evidence"]
    ]
    assert fin["overfit_evidence"].str.contains("gap").all()
    # Matched sets (the same tasks, disjoint items): no overfit flag on any finalist.
    matched = zoo_space(  # every trial complete (none stopped early): two finalists to compare
        tmp_path / "matched.yml",
        tasks=SEARCH,
        holdout=HOLDOUT,
        trials=3,
        name="matched",
        prune=False,
    )
    out = run_search(matched, results_dir=tmp_path / "r", quiet=True, log=lambda m: None)
    df = load_trials(out.paths.csv)
    fin = df[(df["baseline"] == "") & df["validation"].notna()]
    assert len(fin) >= 2 and not fin["overfit"].astype(str).str.lower().eq("true").any(), fin[
        ["score", "validation", "test", "overfit_evidence"]
    ]


def test_probe_contamination_runs_on_finalists(micro_zoo, tmp_path):
    from evomerge.search.loop import run_search

    space = zoo_space(tmp_path / "probe.yml", tasks=SEARCH, holdout=HOLDOUT, trials=2, name="probe")
    out = run_search(space, results_dir=tmp_path / "r", quiet=True, log=lambda m: None, probe=True)
    df = load_trials(out.paths.csv)
    fin = df[(df["baseline"] == "") & df["validation"].notna()]
    assert len(fin) >= 1
    # the probe ran against the base with the holdout items as controls, and says so
    assert (
        fin["memorization_probe_evidence"]
        .str.contains("Min-K%\\+\\+|controls|delta", regex=True)
        .all()
    ), fin["memorization_probe_evidence"].tolist()
    # experts learned skills from generated data, not these items: nothing memorized
    assert not fin["memorization_probe"].astype(str).str.lower().eq("true").any()


def test_probe_separates_a_parent_tuned_on_the_eval_items_on_the_micro_zoo(micro_zoo):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.contamination.probe import probe_contamination
    from evomerge.zoo.data import make_items
    from evomerge.zoo.train import train

    def rows(task):
        return [
            json.loads(line)
            for line in (micro_zoo / "tasks" / f"{task}.jsonl").read_text().splitlines()
        ]

    def text(r):  # what lm-eval scores: prompt, target delimiter, the right answer
        return f"{r['prompt']} {r['choices'][r['label']]}"

    skill = SKILLS[1]
    items = [text(r) for r in rows(SEARCH[1])]
    controls = [text(r) for r in rows(HOLDOUT[1])]
    seen = {r["prompt"] for r in rows(SEARCH[1]) + rows(HOLDOUT[1])}
    fresh = [
        f"{it.prompt} {it.choices[it.label]}"
        for it in make_items(skill, len(items), seed=12345, exclude=seen)
    ]
    tok = AutoTokenizer.from_pretrained(micro_zoo / "base")
    load = lambda: AutoModelForCausalLM.from_pretrained(micro_zoo / "base").eval()  # noqa: E731
    base, tuned_on_items, tuned_elsewhere = load(), load(), load()
    # Same skill, same budget: one copy sees the evaluation items, the other fresh items.
    train(
        tuned_on_items,
        tok,
        lambda rng: rng.choice(items),
        steps=200,
        lr=1e-3,
        batch=32,
        seed=0,
        answer_only=False,
        warmup=20,
    )
    train(
        tuned_elsewhere,
        tok,
        lambda rng: rng.choice(fresh),
        steps=200,
        lr=1e-3,
        batch=32,
        seed=0,
        answer_only=False,
        warmup=20,
    )
    hit = probe_contamination(tuned_on_items, base, tok, items, controls=controls)
    miss = probe_contamination(tuned_elsewhere, base, tok, items, controls=controls)
    assert hit.flag, hit.evidence
    assert not miss.flag, miss.evidence
    assert hit.delta > miss.delta + 0.1
