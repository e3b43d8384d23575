"""Contamination / lineage / overfit flags on crafted local model directories (no network)."""

from __future__ import annotations

import functools
import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge import contamination as F  # noqa: E402


def _model(root: Path, name: str, card: str | None = None, mergekit: str | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    if card is not None:
        (d / "README.md").write_text(textwrap.dedent(card).lstrip())
    if mergekit is not None:
        (d / "mergekit_config.yml").write_text(textwrap.dedent(mergekit).lstrip())
    return d


@pytest.fixture()
def zoo(tmp_path: Path) -> dict[str, Path]:
    """A <- merge of (B <- merge of (C, D <- fine-tune of hub id), E), all local but the hub id."""
    root = tmp_path / "models"
    c = _model(
        root,
        "C",
        """
        ---
        tags: [merge, mergekit, text-generation]
        datasets: [ai2_arc]
        ---
        # C
        """,
    )
    d = _model(
        root,
        "D",
        """
        ---
        base_model: hub-org/base-not-cached
        datasets:
          - Zoo-Add-Test.jsonl
          - someone/private_chat
        ---
        A plain fine-tune.
        """,
    )
    b = _model(
        root,
        "B",
        "# B\n\nThis model was merged using the SLERP merge method.\n",
        mergekit=f"""
        merge_method: slerp
        base_model: {c}
        slices:
          - sources:
              - model: {c}
                layer_range: [0, 2]
              - model: {d}
                layer_range: [0, 2]
        parameters:
          t: 0.5
        """,
    )
    e = _model(root, "E")  # no card at all
    a = _model(
        root,
        "A",
        f"""
        ---
        tags: [merge]
        base_model_relation: merge
        base_model:
          - B
          - {e}
        ---
        # A
        """,
    )
    return {"A": a, "B": b, "C": c, "D": d, "E": e}


def _resolve(tmp_path: Path):
    return functools.partial(F.default_resolve, cache_dir=tmp_path / "empty-hf-cache")


def test_multi_level_lineage_exact_evidence_and_chain(zoo, tmp_path):
    a, b, c, d, e = (str(zoo[k]) for k in "ABCDE")
    lin = F.model_lineage(a, _resolve(tmp_path))
    assert lin.is_merge and lin.available
    assert lin.evidence == (
        "tags: merge",
        "base_model_relation: merge",
        "base_model lists 2 parents",
    )
    assert lin.parents == ("B", e)
    lb, le = lin.ancestors
    assert lb.model == "B" and lb.path == str(zoo["B"])  # "B" resolved as a sibling of A
    assert lb.evidence == ("mergekit_config.yml", 'card text: "was merged using"')
    assert lb.parents == (c, d)  # base_model and slice sources, deduplicated, in order
    lc, ld = lb.ancestors
    assert lc.is_merge and lc.evidence == ("tags: merge, mergekit",) and lc.parents == ()
    assert not ld.is_merge and ld.evidence == () and ld.relation == ""
    assert ld.datasets == ("Zoo-Add-Test.jsonl", "someone/private_chat")
    (hub,) = ld.ancestors
    assert hub.model == "hub-org/base-not-cached" and not hub.available
    assert hub.notes == ("not available locally",)
    assert not le.is_merge and le.notes == ("no model card",)
    assert [n.model for n in lin.merges()] == [a, "B", c]
    assert lin.chain() == (
        f"{a} <- merge of (B <- merge of ({c}, {d} <- fine-tune of "
        f"(hub-org/base-not-cached [not available locally])), {e})"
    )


def test_source_columns_exact(zoo, tmp_path):
    a, e = str(zoo["A"]), str(zoo["E"])
    c, d = str(zoo["C"]), str(zoo["D"])
    tasks = {
        "arc_challenge": {"allenai/ai2_arc"},
        "zoo_add": {"/data/zoo_add_test.jsonl"},
        "zoo_sub": {"/data/zoo_sub_test.jsonl"},
    }
    hits = F.eval_data_in_training([a, e], tasks, _resolve(tmp_path))
    assert hits[e] == []
    assert hits[a] == [
        F.DatasetHit(a, c, "ai2_arc", "arc_challenge", "allenai/ai2_arc"),
        F.DatasetHit(a, d, "Zoo-Add-Test.jsonl", "zoo_add", "/data/zoo_add_test.jsonl"),
    ]
    lineages = tuple(F.model_lineage(r, _resolve(tmp_path)) for r in (a, e))
    assess = F.Assessment(lineages, ("zoo_add",), ("arc_challenge",), dataset_hits=tuple(hits[a]))
    cols = assess.source_columns()
    assert cols["merge_lineage"] is True
    assert cols["merge_lineage_evidence"] == (
        f"{lineages[0].chain()} [{a}: tags: merge, base_model_relation: merge, base_model lists "
        f'2 parents; B: mergekit_config.yml, card text: "was merged using"; {c}: tags: merge, mergekit]'
    )
    assert cols["eval_data_in_training"] is True
    assert cols["eval_data_in_training_evidence"] == (
        f"{a} via {c}: ai2_arc (task arc_challenge) | {a} via {d}: Zoo-Add-Test.jsonl (task zoo_add)"
    )


def test_plain_sources_raise_nothing(zoo, tmp_path):
    d, e = str(zoo["D"]), str(zoo["E"])
    tasks = {"zoo_sub": {"/data/zoo_sub_test.jsonl"}}
    lineages = tuple(F.model_lineage(r, _resolve(tmp_path)) for r in (d, e))
    hits = F.eval_data_in_training([d, e], tasks, _resolve(tmp_path))
    assert hits == {d: [], e: []}
    cols = F.Assessment(lineages, ("zoo_sub",)).columns()
    assert cols == {
        "merge_lineage": False,
        "merge_lineage_evidence": "",
        "eval_data_in_training": False,
        "eval_data_in_training_evidence": "",
        "public_benchmark_search": False,
        "public_benchmark_search_evidence": "",
    }


def test_malformed_cardless_text_only_and_lazymergekit_cards(tmp_path):
    # the unclosed "[" is detected on line 3 ("base_model: x"), where ":" cannot follow
    bad = _model(tmp_path, "bad", "---\ntags: [merge\nbase_model: x\n---\nbody\n")
    unclosed = _model(tmp_path, "unclosed", "---\ntags: [merge]\nno closing line\n")
    listy = _model(tmp_path, "listy", "---\n- a\n- b\n---\n")
    text = _model(tmp_path, "text", "# T\n\nT is a TIES merge of the following models:\n")
    plain = _model(tmp_path, "plain", "We did not merge anything; merged datasets were used.\n")
    lazy = _model(tmp_path, "lazy", "---\ntags: [lazymergekit, org/p1, org/p2]\n---\n")
    r = _resolve(tmp_path)
    assert F.read_card(tmp_path / "nowhere") == F.Card({}, "", "no model card")
    lb = F.model_lineage(str(bad), r)
    assert not lb.is_merge and lb.notes == (
        "unreadable card: front matter is not valid YAML (line 3)",
    )
    lu = F.model_lineage(str(unclosed), r)
    assert not lu.is_merge and lu.notes == ("unreadable card: front matter is not closed",)
    assert F.model_lineage(str(listy), r).notes == (
        "unreadable card: front matter is not a mapping",
    )
    lt = F.model_lineage(str(text), r)
    assert lt.is_merge and lt.evidence == ('card text: "is a TIES merge of"',)
    assert not F.model_lineage(str(plain), r).is_merge
    ll = F.model_lineage(str(lazy), r)
    assert ll.evidence == ("tags: lazymergekit",) and ll.parents == ("org/p1", "org/p2")
    assert [a.notes for a in ll.ancestors] == [("not available locally",)] * 2


def test_hub_ids_use_the_local_cache_only(tmp_path):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--cached-merge"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\ntags: [moerge]\nbase_model: [org/p1, org/p2]\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    child = _model(tmp_path, "child", "---\nbase_model: org/cached-merge\n---\n")
    resolve = functools.partial(F.default_resolve, cache_dir=cache)
    assert resolve("org/cached-merge") == snap
    assert resolve("org/not-there") is None and resolve("not a valid id!") is None
    lin = F.model_lineage(str(child), resolve)
    assert not lin.is_merge and [n.model for n in lin.merges()] == ["org/cached-merge"]
    assert lin.chain() == (
        f"{child} <- fine-tune of (org/cached-merge <- merge of "
        "(org/p1 [not available locally], org/p2 [not available locally]))"
    )
    assert lin.ancestors[0].evidence == ("tags: moerge", "base_model lists 2 parents")


def test_cycles_and_depth_limit(tmp_path):
    x, y = tmp_path / "X", tmp_path / "Y"
    _model(tmp_path, "X", f"---\nbase_model: [{y}, {tmp_path / 'Z'}]\n---\n")
    _model(tmp_path, "Y", f"---\nbase_model: [{x}, {tmp_path / 'Z'}]\n---\n")
    _model(tmp_path, "Z", "no front matter\n")
    lin = F.model_lineage(str(x), _resolve(tmp_path))
    assert lin.ancestors[0].ancestors[0].notes == ("cycle",)
    assert (
        lin.chain()
        == f"{x} <- merge of ({y} <- merge of ({x} [cycle], {tmp_path / 'Z'}), {tmp_path / 'Z'})"
    )
    prev = None
    for i in range(5):  # m0 <- m1 <- ... <- m4, each a fine-tune of the previous
        _model(tmp_path, f"m{i}", f"---\nbase_model: {prev}\n---\n" if prev else None)
        prev = tmp_path / f"m{i}"
    deep = F.model_lineage(str(prev), _resolve(tmp_path), max_depth=2)
    assert deep.chain() == (
        f"{tmp_path / 'm4'} <- fine-tune of ({tmp_path / 'm3'} <- fine-tune of "
        f"({tmp_path / 'm2'} [depth limit reached]))"
    )


def test_local_tasks_map_to_their_eval_files_and_benchmark_datasets(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "zoo_add.yaml").write_text(
        textwrap.dedent(f"""
        task: zoo_add
        dataset_path: json
        dataset_kwargs:
          data_files:
            train: {tmp_path}/zoo_add_train.jsonl
            test: {tmp_path}/zoo_add_test.jsonl
        test_split: test
        output_type: multiple_choice
        doc_to_text: q
        doc_to_target: 0
        doc_to_choice: ["a", "b"]
        """)
    )
    (tasks / "my_arc.yaml").write_text(
        textwrap.dedent("""
        task: my_arc
        dataset_path: allenai/ai2_arc
        dataset_name: ARC-Easy
        output_type: multiple_choice
        doc_to_text: q
        doc_to_target: 0
        doc_to_choice: ["a", "b"]
        """)
    )
    (tasks / "suite.yaml").write_text("group: zoo_suite\ntask: [zoo_add, my_arc]\n")
    ds = F.task_datasets(["zoo_add", "my_arc", "zoo_suite"], tasks)
    assert ds == {
        "zoo_add": {f"{tmp_path}/zoo_add_test.jsonl"},
        "my_arc": {"allenai/ai2_arc"},
        "zoo_suite": {f"{tmp_path}/zoo_add_test.jsonl", "allenai/ai2_arc"},
    }
    assert F.public_benchmark_tasks(["zoo_add", "my_arc"], ds) == {
        "my_arc": "reads allenai/ai2_arc"
    }
    tuned = _model(tmp_path, "tuned", "---\ndatasets: [data/zoo_add_test.jsonl]\n---\n")
    cols = F.source_flags([str(tuned)], ["zoo_suite"], tasks, _resolve(tmp_path))
    assert cols == {
        "merge_lineage": False,
        "merge_lineage_evidence": "",
        "eval_data_in_training": True,
        "eval_data_in_training_evidence": f"{tuned}: data/zoo_add_test.jsonl (task zoo_suite)",
    }


def test_public_benchmark_names():
    names = [
        "arc_challenge",
        "tinyHellaswag",
        "leaderboard_bbh",
        "mmlu_abstract_algebra",
        "gsm8k_cot",
        "tinyBenchmarks",
        "zoo_add",
        "arcade_qa",
        "my_task",
    ]
    assert list(F.public_benchmark_tasks(names)) == names[:6]
    more = [
        "tinyArc",
        "tinyMMLU",
        "tinyTruthfulQA",
        "tinyWinogrande",
        "tinyGSM8k",
        "lambada_openai",
        "boolq",
        "minerva_math_algebra",
        "leaderboard_musr_team_allocation",
        "humaneval",
        "bigbench_date_understanding_multiple_choice",
    ]
    assert list(F.public_benchmark_tasks(more + ["boolqa_private", "lambadas", "mathq"])) == more
    assert F.public_benchmark_tasks(["zoo_add"], {"zoo_add": {"/d/zoo_add_test.jsonl"}}) == {}
    assert F.public_benchmark_tasks(
        ["x", "y"], {"x": {"tinyBenchmarks/tinyAI2_arc"}, "y": {"Rowan/hellaswag"}}
    ) == {"x": "reads tinyBenchmarks/tinyAI2_arc", "y": "reads Rowan/hellaswag"}


@pytest.mark.slow
def test_study_flag_with_real_lm_eval_configs(zoo, tmp_path):
    """Search tasks named like public benchmarks raise the study flag; the datasets come
    from lm-eval's own task YAMLs, so a card listing ``cais/mmlu`` matches ``mmlu_*`` tasks."""
    card_dir = _model(tmp_path, "tuned", "---\ndatasets: [cais/mmlu, openai/gsm8k]\n---\n")
    search = ["arc_challenge", "tinyHellaswag", "leaderboard_bbh", "mmlu_abstract_algebra"]
    a = F.assess([str(card_dir)], search, ["gsm8k"], resolve=_resolve(tmp_path))
    assert a.task_datasets == {
        "arc_challenge": {"allenai/ai2_arc"},
        "tinyHellaswag": {"tinyBenchmarks/tinyHellaswag"},
        "leaderboard_bbh": {"SaylorTwift/bbh"},
        "mmlu_abstract_algebra": {"cais/mmlu"},
        "gsm8k": {"openai/gsm8k"},
    }
    cols = a.columns()
    assert cols["public_benchmark_search"] is True
    assert cols["public_benchmark_search_evidence"] == ", ".join(
        f"{t} (public benchmark name)" for t in search
    )
    assert cols["eval_data_in_training_evidence"] == (
        f"{card_dir}: cais/mmlu (task mmlu_abstract_algebra) | {card_dir}: openai/gsm8k (task gsm8k)"
    )
    assert a.warnings()[0].startswith("WARNING: public_benchmark_search: the search optimizes")
    quiet = F.assess([str(zoo["E"])], ["zoo_add_like"], resolve=_resolve(tmp_path))
    assert quiet.columns()["public_benchmark_search"] is False and quiet.warnings() == []


def test_overfit_rule_on_hand_computed_numbers():
    # threshold = 2 * sqrt(0.03**2 + 0.04**2) = 2 * 0.05 = 0.10
    flag, gap, thr = F.overfit(0.81, 0.03, 0.70, 0.04)
    assert flag and gap == pytest.approx(0.11) and thr == pytest.approx(0.10)
    assert F.overfit(0.79, 0.03, 0.70, 0.04) == (False, pytest.approx(0.09), pytest.approx(0.10))
    assert F.overfit(0.60, 0.03, 0.70, 0.04).flag is False  # holdout better: never overfit
    assert F.overfit(0.51, 0.0, 0.50, 0.0).flag is True  # exact scores: any gap counts
    assert F.overfit(0.9, 0.01, None, None).flag is False
    with pytest.raises(ValueError):
        F.overfit(0.9, -0.01, 0.5, 0.01)
    assert F.overfit_columns(0.81, 0.03, 0.70, 0.04) == {
        "overfit": True,
        "overfit_evidence": "search 0.810 ± 0.030 vs holdout 0.700 ± 0.040: gap +0.110 > 2 SE 0.100",
    }
    assert F.overfit_columns(0.79, 0.03, 0.70, 0.04)["overfit_evidence"].endswith(
        "+0.090 <= 2 SE 0.100"
    )
    assert F.overfit_columns(0.9, 0.01, float("nan"), 0.01) == {
        "overfit": False,
        "overfit_evidence": "no holdout score",
    }


def test_marks_legend_and_rendered_section(zoo, tmp_path):
    row = {
        "merge_lineage": True,
        "eval_data_in_training": "False",
        "public_benchmark_search": "true",
        "overfit": float("nan"),
        "memorization_probe": 1,
    }
    assert F.flag_marks(row) == "LBM" and F.flag_marks({}) == ""
    assert F.legend().startswith("flags: L = merge_lineage (") and "O = overfit" in F.legend()
    a, e = str(zoo["A"]), str(zoo["E"])
    lineages = tuple(F.model_lineage(r, _resolve(tmp_path)) for r in (a, e))
    assess = F.Assessment(
        lineages,
        ("arc_challenge", "zoo_add"),
        ("zoo_add_holdout",),
        public_benchmarks={"arc_challenge": "public benchmark name"},
    )
    md = F.render_contamination_section(assess, search=(0.81, 0.03), unseen=(0.70, 0.04))
    lines = md.splitlines()
    assert lines[0] == "## Contamination and evaluation"
    assert f"- `merge_lineage`: **raised**: {assess.columns()['merge_lineage_evidence']}" in lines
    assert "- `eval_data_in_training`: not raised" in lines
    assert "- `public_benchmark_search`: **raised**: arc_challenge (public benchmark name)" in lines
    assert (
        "- `overfit`: **raised**: search 0.810 ± 0.030 vs test 0.700 ± 0.040: gap +0.110 "
        "> 2 SE 0.100"
    ) in lines
    assert "- `memorization_probe`: not run (opt-in: `--probe-contamination`)" in lines
    assert (
        f"- {lineages[0].chain()}. Merge evidence: {a}: tags: merge, base_model_relation: "
        f'merge, base_model lists 2 parents; B: mergekit_config.yml, card text: "was merged '
        f'using"; {zoo["C"]}: tags: merge, mergekit'
    ) in lines
    assert f"- {e}. Notes: no model card" in lines
    assert (
        "- Searched on: arc_challenge, zoo_add" in lines
        and "- Holdout (validation and test items): zoo_add_holdout" in lines
    )
    assert "- Search score: 0.8100 ± 0.0300" in lines and "- Test score: 0.7000 ± 0.0400" in lines
    probe = {"memorization_probe": False, "memorization_probe_evidence": "delta +0.01"}
    md2 = F.render_contamination_section(assess, probe=probe, level=3)
    assert md2.startswith("### Contamination and evaluation\n")
    assert "- `overfit`: not raised: not computed (no score on unseen items)" in md2
    assert "- `memorization_probe`: not raised: delta +0.01" in md2
    assert "- Test score: not measured" in md2
    comments = F.as_comments(md)
    assert all(ln.startswith("#") for ln in comments.splitlines())
    assert comments.splitlines()[0] == "# ## Contamination and evaluation"


def test_evomerge_merges_of_merges_stay_visible(tiny_family, tmp_path):
    """A merge written by ``evomerge merge`` carries its parents in its card, so a merge of
    that merge shows the whole two-level lineage."""
    import yaml

    from evomerge.cli import main

    _, (m0, m1, m2) = tiny_family

    def merge(parents, out):
        recipe = {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in parents],
        }
        (tmp_path / f"{out}.yml").write_text(yaml.safe_dump(recipe))
        assert main(["merge", str(tmp_path / f"{out}.yml"), str(tmp_path / out)]) == 0
        return tmp_path / out

    first = merge([m0, m1], "first")
    second = merge([first, m2], "second")
    lin = F.model_lineage(str(second), _resolve(tmp_path))
    evidence = (
        "tags: merge, mergekit, evomerge",
        "base_model_relation: merge",
        "base_model lists 2 parents",
        "mergekit_config.yml",
        'card text: "is a merge of"',
    )
    assert lin.evidence == evidence and lin.parents == (str(first), str(m2))
    assert lin.ancestors[0].evidence == evidence
    assert lin.ancestors[0].parents == (str(m0), str(m1))
    assert [n.model for n in lin.merges()] == [str(second), str(first)]
    assert lin.chain() == f"{second} <- merge of ({first} <- merge of ({m0}, {m1}), {m2})"
    cols = F.Assessment((lin,), ("zoo_add",)).source_columns()
    assert cols["merge_lineage"] is True and cols["merge_lineage_evidence"].startswith(lin.chain())


def test_assessment_round_trips_through_json(tmp_path):
    import json

    from evomerge.contamination import (
        Assessment,
        DatasetHit,
        Lineage,
        assessment_from_dict,
        assessment_to_dict,
    )

    leaf = Lineage("org/c", None, False, (), (), (), "", (), ("not available locally",))
    mid = Lineage(
        "org/b", "/x/b", True, ("tags: merge",), ("org/c",), (leaf,), "merge", ("gsm8k",), ()
    )
    a = Assessment(
        (mid,),
        ("zoo_rev",),
        ("zoo_rev_holdout",),
        {"zoo_rev": frozenset({"x.jsonl"})},
        (DatasetHit("org/b", "org/b", "gsm8k", "gsm8k", "openai/gsm8k"),),
        {"arc_easy": "public benchmark"},
    )
    back = assessment_from_dict(json.loads(json.dumps(assessment_to_dict(a))))
    assert back == a
    assert back.columns() == a.columns()
