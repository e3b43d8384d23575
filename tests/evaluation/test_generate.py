"""Generation with a shared prompt prefix gives HFLM's answers: token for token against
``model.generate``, string for string against ``HFLM.generate_until`` (stop sequences, budgets,
truncation, end-of-text), and per item and per score on a GSM8K-shaped task with a 32k BPE
tokenizer and on the zoo's generation tasks; what it leaves out goes to HFLM's path with a line."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from _gsm8k import TASK as GSM_TASK
from _gsm8k import build_model, build_tokenizer, write_task
from _long_task import SMALL
from _tiny import make_tiny

from evomerge.errors import ConfigError
from evomerge.evaluation import EvalConfig, TaskSpec
from evomerge.evaluation.generate import GenRequest, GenStats, common_prefix, generate_shared
from evomerge.evaluation.genlm import context_length
from evomerge.evaluation.hflm import make_lm
from evomerge.evaluation.lmeval import LMEvalEvaluator
from evomerge.evaluation.tasks import get_task_dict, leaf_tasks, manager_for, quiet_lm_eval
from evomerge.zoo.data import make_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these models are small enough that a second thread only adds waiting on
    a shared machine (the outputs do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer()  # one token per character
    t.model_max_length = 1024
    return t


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        make_tiny(tmp_path_factory.mktemp("m") / "llama", seed=5, **SMALL)
    ).eval()
    with torch.no_grad():  # wider logits: greedy picks far from ties, varied continuations
        m.lm_head.weight.mul_(40.0)
    return m


def _hf_greedy(model, ids: list[int], n: int, eos: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=0,
    )
    got = out[0, len(ids) :].tolist()
    if eos:  # generate pads after the end-of-text token
        for i, t in enumerate(got):
            if t in eos:
                return got[: i + 1]
    return got


def _requests(model, tok, rng: random.Random, n: int = 14, all_prefixed: bool = False):
    """Prompts of 1-60 own tokens after a shared prefix of 120 tokens (a few with none of it,
    unless ``all_prefixed``),
    stop strings of 2-3 characters taken from each prompt's own greedy continuation (so rows stop
    at different lengths, some on a string spanning tokens), budgets of 5-30 tokens."""
    prefix = [rng.randrange(4, 47) for _ in range(120)]
    out = []
    for i in range(n):
        own = [rng.randrange(4, 47) for _ in range(rng.randint(1, 60))]
        ids = own if i % 5 == 4 and not all_prefixed else prefix + own
        cont = tok.decode(_hf_greedy(model, ids, 30, []))
        k = rng.randrange(1, 20)
        until = [cont[k : k + rng.randint(2, 3)]] if i % 3 else []
        out.append(GenRequest(ids, tuple(until), rng.randint(5, 30), group="t"))
    return out


@pytest.mark.parametrize("all_prefixed", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_tokens_match_generate(model, tok, batch_size, all_prefixed):
    """With every prompt prefixed, the prefix is held once and more rows than the batch size
    decode together where they fit (batch size 3: 5 rows)."""
    reqs = _requests(model, tok, random.Random(batch_size), all_prefixed=all_prefixed)
    stats = GenStats()
    got = generate_shared(model, tok, reqs, batch_size=batch_size, eos_ids=[2], stats=stats)
    for r, g in zip(reqs, got, strict=True):
        want = _hf_greedy(model, list(r.tokens), r.max_new, [2])
        # generate_shared stops at the first token after which a stop string is in the text
        text = tok.decode(want, skip_special_tokens=True)
        cut = len(want)
        for s in r.until:
            if s in text:
                cut = min(
                    cut,
                    next(
                        i + 1
                        for i in range(len(want))
                        if s in tok.decode(want[: i + 1], skip_special_tokens=True)
                    ),
                )
        assert g == want[:cut]
    assert stats.groups == [common_prefix([r.tokens for r in reqs])]  # the prefix ran once
    if all_prefixed:
        assert stats.groups[0] >= 120 and stats.rows == {1: 1, 3: 5, 16: 14}[batch_size]
    assert stats.item_tokens == sum(len(r.tokens) for r in reqs) - len(reqs) * stats.groups[0]


def test_eos_ends_a_row_and_bad_requests_are_refused(model, tok):
    ids = [5, 6, 7, 8]
    first = _hf_greedy(model, ids, 3, [])
    got = generate_shared(model, tok, [GenRequest(ids, (), 10)], batch_size=2, eos_ids=[first[1]])
    assert got == [first[:2]]
    assert generate_shared(model, tok, [GenRequest(ids, (), 0)], batch_size=2) == [[]]
    with pytest.raises(ValueError, match="at least one token"):
        generate_shared(model, tok, [GenRequest([], (), 3)], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        generate_shared(model, tok, [GenRequest(ids, (), 3)], batch_size=0)


# ------------------------------------------------------------------ against HFLM.generate_until


def _hflm(model, tok, **kw):
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    return HFLM(pretrained=model, tokenizer=tok, device="cpu", **kw)


def _instances(texts: list[str], gen_kwargs: list[dict], task: str = "t"):
    from lm_eval.api.instance import Instance

    return [
        Instance("generate_until", {}, (t, g), i, metadata=(task, i, 1))
        for i, (t, g) in enumerate(zip(texts, gen_kwargs, strict=True))
    ]


def test_generate_until_matches_hflm(model, tok):
    rng = random.Random(3)
    letters = "abcdefghijklmnopqrstuvwxyz"
    shots = "".join(f"rot: {''.join(rng.sample(letters, 5))} = xyz\n" for _ in range(8))
    texts = [shots + f"rot: {''.join(rng.sample(letters, 5))} =" for _ in range(10)]
    texts += [shots * 8 + "rot: abcde ="]  # longer than max_length: left-truncated as HFLM does
    kwargs = [
        {"until": [["\n"], ["e", "q"], "ab", []][i % 4], "max_gen_toks": 4 + 3 * (i % 5)}
        for i in range(len(texts))
    ]
    kwargs[3] |= {"do_sample": False, "temperature": 0.0}
    shared = make_lm(model, tok, scorer="shared", batch_size=4)
    got = shared.generate_until(_instances(texts, kwargs))
    want = _hflm(model, tok, batch_size=4).generate_until(_instances(texts, kwargs))
    assert got == want
    assert len({g for g in got}) > 3  # not one string for all


def _kv_peak_of_forwards(model):
    """A forward hook recording the most key/value elements a forward's returned cache holds."""
    from evomerge.evaluation.kv import output_cache
    from evomerge.evaluation.prefixkv import cache_elements

    seen = [0]

    def hook(module, args, kwargs, out):
        seen[0] = max(seen[0], cache_elements(output_cache(out)))

    return seen, model.register_forward_hook(hook, with_kwargs=True)


def test_more_rows_than_batch_size_in_hflms_cache_memory(model, tok, monkeypatch):
    """A long shared prefix and short answers: the shared path decodes more rows than the batch
    size together, its answers are HFLM's, and the most key/value elements it holds (prefix once,
    each row's own columns) are no more than HFLM's cache holds at that batch size."""
    import evomerge.evaluation.genlm as genlm

    rng = random.Random(11)
    letters = "abcdefghijklmnopqrstuvwxyz"
    shots = "".join(f"rot: {''.join(rng.sample(letters, 5))} = xyz\n" for _ in range(20))
    texts = [shots + "".join(rng.choices(letters, k=rng.randint(3, 12))) for _ in range(12)]
    kwargs = [{"until": ["\n"], "max_gen_toks": 6 + i % 3} for i in range(len(texts))]
    stats, real = GenStats(), genlm.generate_shared
    monkeypatch.setattr(genlm, "generate_shared", lambda *a, **k: real(*a, **{**k, "stats": stats}))
    got = make_lm(model, tok, scorer="shared", batch_size=2).generate_until(
        _instances(texts, kwargs)
    )
    seen, hook = _kv_peak_of_forwards(model)
    try:
        want = _hflm(model, tok, batch_size=2).generate_until(_instances(texts, kwargs))
    finally:
        hook.remove()
    assert got == want and len(set(got)) > 3
    assert stats.rows > 2  # more rows than the batch size decoded together
    cfg = model.config
    column = (
        2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * (cfg.hidden_size // cfg.num_attention_heads)
    )
    p = stats.groups[0]
    assert p > 300
    # HFLM's cache at batch size 2: at most 2 rows of the longest prompt plus the largest budget.
    longest = max(len(tok(t).input_ids) for t in texts)
    assert seen[0] <= 2 * (longest + 8) * column
    assert stats.kv_peak <= seen[0]  # the shared path held no more than HFLM did
    assert stats.kv_peak >= (p + stats.rows * (longest - p)) * column  # prefix, rows' own tokens


def test_what_the_fast_path_leaves_out_is_hflms_with_a_line(model, tok, caplog):
    import evomerge.evaluation.base as base

    base._SAID.clear()  # the notes said once per process
    texts = ["rot: abcde =", "sort: qwert ="]
    sampled = [{"until": ["\n"], "max_gen_toks": 5, "do_sample": True, "temperature": 0.7}] * 2
    beams = [{"until": ["\n"], "max_gen_toks": 5, "num_beams": 2}] * 2
    plain = [{"until": ["\n"], "max_gen_toks": 5}] * 2
    shared = make_lm(model, tok, scorer="shared", batch_size=4, hflm_tasks={"filt": "a reason"})
    hflm = make_lm(model, tok, scorer="hflm", batch_size=4)
    with caplog.at_level(logging.WARNING, logger="evomerge.evaluation.genlm"):
        torch.manual_seed(0)
        a = shared.generate_until(_instances(texts, sampled))
        torch.manual_seed(0)
        assert a == hflm.generate_until(_instances(texts, sampled))  # same sampler, same draws
        shared.generate_until(_instances(texts, beams))
        assert shared.generate_until(_instances(texts, plain, "filt")) == hflm.generate_until(
            _instances(texts, plain, "filt")
        )
        model.generation_config.repetition_penalty = 1.3
        try:
            assert shared.generate_until(_instances(texts, plain)) == hflm.generate_until(
                _instances(texts, plain)
            )
        finally:
            model.generation_config.repetition_penalty = None
    said = [r.getMessage() for r in caplog.records if r.name == "evomerge.evaluation.genlm"]
    assert sum("sampling (do_sample)" in s for s in said) == 1
    assert sum("generation_kwargs num_beams" in s for s in said) == 1
    assert not any("a reason" in s for s in said)  # the evaluator said why when it loaded the task
    assert sum("repetition_penalty=1.3" in s for s in said) == 1


# ------------------------------------------------------------------ GSM8K-shaped, 32k vocabulary


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """A 32k byte-level BPE tokenizer, a random Llama over it and the GSM8K-shaped task."""
    root = tmp_path_factory.mktemp("gsm8k")
    tokenizer = build_tokenizer(root / "tok")
    write_task(root / "task", items=16, max_gen_toks=64)
    return tokenizer, build_model(tokenizer, hidden=64, layers=2, intermediate=128), root / "task"


def _run(lm, task_dict, task: str):
    from lm_eval.evaluator import evaluate

    for t in leaf_tasks(task_dict).values():
        t.set_fewshot_seed(seed=1234)
    out = evaluate(lm, task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    samples = sorted(out["samples"][task], key=lambda s: (s["doc_id"], s["filter"]))
    return [s["resps"][0][0] for s in samples], out["results"][task]


@pytest.mark.slow  # trains a 32k BPE tokenizer (~10 s)
def test_gsm8k_shaped_task_matches_hflm(gsm8k):
    tokenizer, m, folder = gsm8k
    assert len(tokenizer) == 32000
    task_dict = get_task_dict([GSM_TASK], manager_for([GSM_TASK], str(folder)))
    task = leaf_tasks(task_dict)[GSM_TASK]
    task.set_fewshot_seed(seed=1234)
    prompts = [task.fewshot_context(d, 5) for d in list(task.eval_docs)[:4]]
    shared_prefix = common_prefix([tokenizer(p).input_ids for p in prompts])
    assert 600 < shared_prefix < min(len(tokenizer(p).input_ids) for p in prompts)
    stats = GenStats()
    lm = make_lm(m, tokenizer, scorer="shared", batch_size=5)
    import evomerge.evaluation.genlm as genlm

    real = genlm.generate_shared

    def counted(*a, **k):
        return real(*a, **{**k, "stats": stats})

    genlm.generate_shared = counted
    try:
        got, got_res = _run(lm, task_dict, GSM_TASK)
    finally:
        genlm.generate_shared = real
    want, want_res = _run(make_lm(m, tokenizer, scorer="hflm", batch_size=5), task_dict, GSM_TASK)
    assert got == want
    lengths = {len(tokenizer(s).input_ids) for s in want}
    assert len(lengths) > 4  # answers end at varied lengths (end-of-text, budget)
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert got_res[key] == want_res[key]
    assert stats.groups == [shared_prefix] or stats.groups[0] >= shared_prefix


# ------------------------------------------------------------------ the evaluator's checks


def _gen_task(folder, name: str, extra: str = "", until: str = '["\\n"]', max_gen: int = 8):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(f'{{"q": "rot: abc{i} =", "a": "bc{i}a"}}\n' for i in range(6)))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        f"generation_kwargs:\n  until: {until}\n  max_gen_toks: {max_gen}\n{extra}"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_budget_over_the_context_is_an_error_naming_the_field(tmp_path, tok):
    _gen_task(tmp_path, "g_ok")
    _gen_task(tmp_path, "g_long", max_gen=64)
    cfg = EvalConfig(
        [TaskSpec("g_ok", "exact_match"), TaskSpec("g_long", "exact_match")],
        include_path=[str(tmp_path)],
        file="space.yml",
    )
    with pytest.raises(ConfigError) as e:
        LMEvalEvaluator(cfg, tok, max_length=64)
    msg = str(e.value)
    assert "space.yml" in msg and "evaluate.tasks[1]" in msg and "64 tokens" in msg
    LMEvalEvaluator(cfg, tok, max_length=65)  # room for one prompt token


def test_notes_for_a_missing_stop_and_a_foreign_filter(tmp_path, tok, model, caplog):
    _gen_task(tmp_path, "g_nostop", until="[]")
    foreign = (
        "filter_list:\n  - name: mine\n    filter:\n      - function: !function filters.Upper\n"
    )
    _gen_task(tmp_path, "g_foreign", extra=foreign)
    (tmp_path / "filters.py").write_text(
        "from lm_eval.api.filter import Filter\n\nclass Upper(Filter):\n"
        "    def apply(self, resps, docs):\n        return [[r.upper() for r in rs] for rs in resps]\n"
    )
    cfg = EvalConfig(
        [TaskSpec("g_nostop", "exact_match"), TaskSpec("g_foreign", "exact_match")],
        include_path=[str(tmp_path)],
        batch_size=4,
    )
    with caplog.at_level(logging.WARNING, logger="evomerge.evaluation.lmeval"):
        ev = LMEvalEvaluator(cfg, tok, max_length=1024)
    said = [r.getMessage() for r in caplog.records]
    assert any("'g_nostop' has no stop sequence" in s for s in said)
    assert any("'g_foreign'" in s and "Upper" in s and "HFLM's path" in s for s in said)
    shared = ev.evaluate(model)
    hflm = LMEvalEvaluator(cfg, tok, scorer="hflm").evaluate(model)
    assert shared.scores == hflm.scores and shared.values == hflm.values


def test_staged_generation_equals_the_full_evaluation(tmp_path, tok, model):
    for i in range(3):
        _gen_task(tmp_path, f"g{i}", until='["a", "\\n"]', max_gen=6)
    cfg = EvalConfig(
        [TaskSpec(f"g{i}", "exact_match") for i in range(3)],
        include_path=[str(tmp_path)],
        batch_size=4,
    )
    ev = LMEvalEvaluator(cfg, tok, max_length=1024)
    assert ev.item_counts() == {"g0": 6, "g1": 6, "g2": 6}
    full = ev.evaluate(model)
    staged = ev.staged(model)
    part = staged.score({"g0": [0, 3], "g2": [5]})
    assert part == {
        "g0": {0: full.values["g0"][0], 3: full.values["g0"][3]},
        "g1": {},
        "g2": {5: full.values["g2"][5]},
    }
    assert staged.scored == 3
    res = staged.result()
    assert res.scores == full.scores and res.values == full.values


def test_context_length_reads_hflms_sources():
    assert context_length({"max_position_embeddings": 32}) == 32
    assert context_length({"text_config": {"n_positions": 77}, "max_position_embeddings": 9}) == 77

    class Tok:
        model_max_length = 500

    assert context_length({}, Tok()) == 500
    Tok.model_max_length = int(1e30)
    assert context_length({}, Tok()) == 2048


def test_growing_cache_holds_what_a_dynamic_cache_holds(model):
    import copy

    from evomerge.evaluation.kv import cache_cat, cache_length, cache_paddable, growing

    ids = torch.randint(4, 47, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids[:, :5], use_cache=True).past_key_values
        grown = growing(copy.deepcopy(plain))
        assert cache_paddable(grown) and type(grown.layers[0]).__name__ == "GrowingLayer"
        for t in range(5, 9):  # appends write into the buffers: the same keys, the same logits
            a = model(input_ids=ids[:, t : t + 1], cache=plain, use_cache=True)
            b = model(input_ids=ids[:, t : t + 1], cache=grown, use_cache=True)
            assert torch.equal(a.logits, b.logits)
        for la, lb in zip(plain.layers, grown.layers, strict=True):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        one = torch.tensor([1])
        plain.batch_select_indices(one)
        grown.batch_select_indices(one)
        assert torch.equal(plain.layers[1].keys, grown.layers[1].keys)
        grown.crop(-2)
        assert cache_length(grown) == 7
        short = growing(model(input_ids=ids[:1, :3], use_cache=True).past_key_values)
        both = cache_cat(grown, short)  # rows of each, the shorter padded with zero columns
        k = both.layers[0].keys
        assert k.shape[0] == 2 and cache_length(both) == 7
        assert torch.equal(k[1, :, :3], short.layers[0].keys[0]) and not k[1, :, 3:].any()


CHAT = (
    "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def test_chat_template_asked_for_and_missing_is_an_error(tmp_path, tok):
    from evomerge.evaluation import parse_evaluate

    _gen_task(tmp_path, "g_chat")
    section = {"include_path": str(tmp_path), "tasks": ["g_chat"]}
    assert parse_evaluate(section, "space.yml", tmp_path).chat_template is False
    assert parse_evaluate({**section, "chat_template": True}, "s.yml", tmp_path).chat_template
    with pytest.raises(ConfigError) as e:
        parse_evaluate({**section, "chat_template": "yes"}, "space.yml", tmp_path)
    assert e.value.field == "evaluate.chat_template" and "true or false" in str(e.value)
    cfg = EvalConfig(
        [TaskSpec("g_chat", "exact_match")],
        include_path=[str(tmp_path)],
        file="space.yml",
        chat_template=True,
    )
    with pytest.raises(ConfigError) as e:
        LMEvalEvaluator(cfg, tok)
    assert "space.yml" in str(e.value) and "evaluate.chat_template" in str(e.value)
    assert "no chat template" in str(e.value)


def test_chat_prompts_staged_and_full_agree_with_hflm(tmp_path, model):
    t = make_tokenizer()
    t.model_max_length = 1024
    t.chat_template = CHAT
    for i in range(2):
        _gen_task(tmp_path, f"c{i}", extra="num_fewshot: 2\nfewshot_split: test\n", max_gen=6)
    cfg = EvalConfig(
        [TaskSpec(f"c{i}", "exact_match") for i in range(2)],
        include_path=[str(tmp_path)],
        batch_size=4,
        chat_template=True,
    )
    ev = LMEvalEvaluator(cfg, t, max_length=1024)
    full = ev.evaluate(model)
    staged = ev.staged(model)
    staged.score({"c0": [1, 4], "c1": [0]})
    assert staged.result().values == full.values
    prompt = ev._bank.requests["c0"][1][0].args[0]
    assert prompt.startswith("u: rot: abc") and prompt.count("u: ") == 3 and prompt.endswith("a:")
    assert LMEvalEvaluator(cfg, t, scorer="hflm").evaluate(model).values == full.values


@pytest.mark.slow  # a search started from the CLI (the zoo, lm-eval's task index)
@pytest.mark.parametrize("bad", ["chat", "budget"])
def test_search_stops_before_its_first_trial_with_one_line(tmp_path, monkeypatch, capsys, bad):
    from evomerge.cli import main
    from evomerge.zoo import ensure_zoo

    monkeypatch.setenv("EVOMERGE_ZOO_DIR", str(tmp_path / "zoo"))
    ensure_zoo("demo")  # its install line goes to stderr before the search
    capsys.readouterr()
    _gen_task(tmp_path / "tasks", "g_demo", max_gen=40 if bad == "budget" else 8)
    space = tmp_path / "space.yml"
    space.write_text(
        "merge_method: task_arithmetic\nbase_model: zoo:demo/base\nmodels:\n"
        "  - model: zoo:demo/rot\n    parameters: {weight: {range: [0.0, 1.0]}}\n"
        f"evaluate:\n  include_path: {tmp_path / 'tasks'}\n"
        "  tasks: [{name: g_demo, metric: exact_match}]\n"
        + ("  chat_template: true\n" if bad == "chat" else "")
        + "search: {trials: 1}\n"
    )
    assert main(["search", str(space), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "\n" not in err and "Traceback" not in err
    if bad == "chat":
        assert "evaluate.chat_template" in err and "no chat template" in err
    else:
        assert "evaluate.tasks[0]" in err and "40 tokens" in err and "context of 32" in err
    assert not (tmp_path / "r").exists()
