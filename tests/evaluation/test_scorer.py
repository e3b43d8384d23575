"""The shared-context scorer gives HFLM's answers: per request (log-likelihood within float tolerance,
``is_greedy`` equal) and per task (equal accuracy), on token-level requests, on a long-context
few-shot task built here and on the micro zoo's tasks."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from _long_task import LONG_TASK, SMALL, write_long_task
from _tiny import make_tiny

from evomerge.compat import hflm_loglikelihood_tokens
from evomerge.errors import ConfigError
from evomerge.evaluation import EvalConfig, TaskSpec, parse_evaluate
from evomerge.evaluation.hflm import SharedContextHFLM, make_lm
from evomerge.evaluation.lmeval import LMEvalEvaluator
from evomerge.evaluation.scorer import score_shared
from evomerge.evaluation.tasks import get_task_dict, manager_for, quiet_lm_eval
from evomerge.zoo.data import make_tokenizer

TOL = 1e-4  # float32: |sum of log-probs| differs by rounding only (matmul shapes differ)


@pytest.fixture(scope="module")
def tok():
    t = make_tokenizer()  # one token per character; 47 ids, all below the model's 64
    t.model_max_length = 1024
    return t


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        make_tiny(tmp_path_factory.mktemp("m") / "llama", seed=3, **SMALL)
    ).eval()


def _hflm(model, tok, **kw):
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    return HFLM(pretrained=model, tokenizer=tok, device="cpu", **kw)


def _greedy(model, ctx: list[int], n: int) -> list[int]:
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx) :]


def _token_requests(
    model, lengths=(1, 2, 17, 90, 90, 160, 300)
) -> list[tuple[list[int], list[int]]]:
    """Docs of 4 continuations (1-12 tokens, one of them the model's greedy continuation) after a
    shared context of 1-300 tokens; two docs share a context; one context is a single token."""
    rng = random.Random(0)
    out = []
    contexts = [[rng.randrange(4, 47) for _ in range(n)] for n in lengths]
    if len(contexts) > 4:
        contexts[4] = contexts[3]
    for ctx in contexts:
        conts = [[rng.randrange(4, 47) for _ in range(rng.randint(1, 12))] for _ in range(3)]
        conts.insert(rng.randrange(4), _greedy(model, ctx, rng.randint(1, 6)))
        out += [(ctx, c) for c in conts]
    rng.shuffle(out)
    return out


def _assert_same(got, want) -> None:
    assert len(got) == len(want)
    for i, ((g, gg), (w, wg)) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= TOL, f"request {i}: loglikelihood {g} vs HFLM's {w}"
        assert gg == wg, f"request {i}: is_greedy {gg} vs HFLM's {wg}"


@pytest.mark.parametrize(
    "max_length,batch_size", [(None, 8), (64, 5), (64, 1)], ids=["whole", "truncated", "batch1"]
)
def test_token_requests_match_hflm(model, tok, max_length, batch_size):
    reqs = _token_requests(model)
    hflm = _hflm(model, tok, batch_size=batch_size, max_length=max_length)
    want = hflm_loglikelihood_tokens(hflm, [(("c", "x"), c, x) for c, x in reqs])
    got = score_shared(model, reqs, max_length=hflm.max_length, batch_size=batch_size)
    _assert_same(got, want)
    # The greedy continuations are greedy (those after a cut context need not be).
    assert sum(g for _, g in want) >= (7 if max_length is None else 3)
    assert any(not g for _, g in want)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "mixtral", "gemma2"])
def test_other_architectures_match_hflm(tmp_path, tok, arch):
    """Learned positions (gpt2), attention biases (qwen2), experts (mixtral), logit softcapping and
    alternating sliding layers (gemma2, pairs inside its window)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        make_tiny(
            tmp_path / arch,
            arch=arch,
            seed=2,
            **({"sliding_window": 64} if arch == "gemma2" else {}),
        )
    ).eval()
    reqs = _token_requests(m, (1, 9, 30, 30, 44))
    hflm = _hflm(m, tok, batch_size=4)
    _assert_same(
        score_shared(m, reqs, max_length=hflm.max_length, batch_size=4),
        hflm_loglikelihood_tokens(hflm, [(("c", "x"), c, x) for c, x in reqs]),
    )


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="context and continuation must both have tokens"):
        score_shared(model, [([], [5])], max_length=64, batch_size=4)
    with pytest.raises(ValueError, match="must fit max_length"):
        score_shared(model, [([5], [6] * 65)], max_length=64, batch_size=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_shared(model, [([5], [6])], max_length=64, batch_size=0)


def test_sliding_window_pairs_use_hflm(tmp_path, tok):
    """Pairs longer than half a sliding window go through HFLM's path; all match HFLM."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        make_tiny(tmp_path / "mistral", arch="mistral", **SMALL, sliding_window=32)
    ).eval()
    rng = random.Random(1)
    pairs = [
        (
            "".join(rng.choice("abcdefgh ") for _ in range(n)),
            " " + "".join(rng.choice("abcdefgh") for _ in range(k)),
        )
        for n in (5, 10, 40, 70)
        for k in (1, 3, 6)
    ]
    want = _hflm(m, tok, batch_size=4).loglikelihood(
        [_instance(c, x, i) for i, (c, x) in enumerate(pairs)]
    )
    got = SharedContextHFLM(pretrained=m, tokenizer=tok, batch_size=4, device="cpu").loglikelihood(
        [_instance(c, x, i) for i, (c, x) in enumerate(pairs)]
    )
    _assert_same(got, want)


def _instance(context: str, continuation: str, doc: int, kind: str = "loglikelihood", args=None):
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, args or (context, continuation), doc)


def test_rolling_is_hflms_and_logged_generation_is_shared(model, tok, caplog):
    import evomerge.evaluation.base as base

    base._SAID.clear()  # the notes said once per process
    texts = ["abc def ghi " * 8, "jkl mno"]
    shared, hflm = (
        make_lm(model, tok, scorer="shared", batch_size=4),
        make_lm(model, tok, scorer="hflm", batch_size=4),
    )
    with caplog.at_level(logging.INFO, logger="evomerge.evaluation.scorer"):
        rolling = [_instance("", "", i, "loglikelihood_rolling", (t,)) for i, t in enumerate(texts)]
        assert shared.loglikelihood_rolling(rolling) == pytest.approx(
            hflm.loglikelihood_rolling(rolling), abs=TOL
        )
        gen = [
            _instance(
                "",
                "",
                i,
                "generate_until",
                ("rot: abcde =", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
            )
            for i in range(2)
        ]
        assert shared.generate_until(gen) == hflm.generate_until(gen)
        shared.generate_until(gen)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("evomerge.evaluation")]
    assert sum("loglikelihood_rolling requests use HFLM's path" in s for s in said) == 1
    assert not any(
        "generate_until" in s for s in said
    )  # tests/evaluation/test_generate.py: same strings


# ------------------------------------------------------------------ a long-context few-shot task


def _answers(lm, task_dict) -> tuple[dict[str, list], dict[str, dict]]:
    """Per task: every request's (loglikelihood, is_greedy) in doc order, and lm-eval's results."""
    from lm_eval.evaluator import evaluate

    for task in _leaves(task_dict):
        task.set_fewshot_seed(
            seed=1234
        )  # evaluate() goes on from where the last call left the shot sampler
    out = evaluate(lm, task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    answers = {
        name: [tuple(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
        for name, samples in out["samples"].items()
    }
    return answers, out["results"]


def _leaves(task_dict) -> list:
    return [t for v in task_dict.values() for t in (_leaves(v) if isinstance(v, dict) else [v])]


def test_long_context_task_matches_hflm(model, tok, tmp_path):
    write_long_task(tmp_path)
    task_dict = get_task_dict([LONG_TASK], manager_for([LONG_TASK], str(tmp_path)))
    ctx = _leaves(task_dict)[0]
    ctx.set_fewshot_seed(seed=1234)
    lengths = [len(ctx.fewshot_context(d, 4)) for d in list(ctx.eval_docs)[:5]]
    assert min(lengths) > 300  # characters = tokens here
    got, got_res = _answers(make_lm(model, tok, scorer="shared", batch_size=6), task_dict)
    want, want_res = _answers(make_lm(model, tok, scorer="hflm", batch_size=6), task_dict)
    assert len(want[LONG_TASK]) == 24 * 4
    _assert_same(got[LONG_TASK], want[LONG_TASK])
    for metric in ("acc,none", "acc_norm,none"):
        assert got_res[LONG_TASK][metric] == want_res[LONG_TASK][metric]


def test_evaluator_scores_equal_on_the_long_task(model, tok, tmp_path, monkeypatch):
    """Through LMEvalEvaluator: equal scores with both scorers, and the same prompts on every call."""
    import evomerge.evaluation.lmeval as lmeval

    seen: list[list[tuple[str, str]]] = []
    make = lmeval.make_lm

    def recording(*args, **kwargs):
        lm = make(*args, **kwargs)
        score = lm.loglikelihood
        lm.loglikelihood = lambda reqs, disable_tqdm=False: (
            seen.append([r.args for r in reqs]) or score(reqs)
        )
        return lm

    monkeypatch.setattr(lmeval, "make_lm", recording)
    write_long_task(tmp_path, n=16)
    (tmp_path / f"{LONG_TASK}_n.yaml").write_text(
        (tmp_path / f"{LONG_TASK}.yaml")
        .read_text()
        .replace(f"task: {LONG_TASK}\n", f"task: {LONG_TASK}_n\n")
    )
    cfg = EvalConfig(
        [TaskSpec(LONG_TASK), TaskSpec(LONG_TASK + "_n", "acc_norm")], include_path=[str(tmp_path)]
    )
    shared, hflm = (
        LMEvalEvaluator(cfg, tok, batch_size=8),
        LMEvalEvaluator(cfg, tok, batch_size=8, scorer="hflm"),
    )
    first = shared.evaluate(model)
    assert first.counts() == {LONG_TASK: 16, LONG_TASK + "_n": 16}
    assert hflm.evaluate(model).scores == first.scores == shared.evaluate(model).scores
    # lm-eval would draw new shots on each call; the evaluator reseeds the sampler every time.
    assert len(seen) == 3 and len(seen[0]) == 2 * 16 * 4 and seen[0] == seen[1] == seen[2]


# ------------------------------------------------------------------------- the evaluate: section


def test_scorer_key_of_the_evaluate_section(tmp_path):
    write_long_task(tmp_path, n=4)
    section = {"include_path": str(tmp_path), "tasks": [LONG_TASK]}
    assert parse_evaluate(section, "space.yml", tmp_path).scorer == "shared"
    assert parse_evaluate({**section, "scorer": "hflm"}, "space.yml", tmp_path).scorer == "hflm"
    with pytest.raises(ConfigError) as e:
        parse_evaluate({**section, "scorer": "shard"}, "space.yml", tmp_path)
    assert e.value.field == "evaluate.scorer" and "did you mean shared" in str(e.value)
    cfg = EvalConfig([TaskSpec(LONG_TASK)], include_path=[str(tmp_path)])
    with pytest.raises(ValueError, match="scorer must be one of shared, hflm"):
        LMEvalEvaluator(cfg, make_tokenizer(), scorer="fast")


# ----------------------------------------------------------------------------------- micro zoo


@pytest.mark.slow
def test_micro_zoo_requests_match_hflm(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = ["zoo_rot", "zoo_sort", "zoo_shift"]
    task_dict = get_task_dict(names, manager_for(names, str(micro_zoo / "tasks")))
    zoo_tok = AutoTokenizer.from_pretrained(micro_zoo / "base")
    for name in ("base", "rot", "sort"):
        m = AutoModelForCausalLM.from_pretrained(micro_zoo / name).eval()
        got, got_res = _answers(make_lm(m, zoo_tok, scorer="shared", batch_size=16), task_dict)
        want, want_res = _answers(make_lm(m, zoo_tok, scorer="hflm", batch_size=16), task_dict)
        for task in names:
            _assert_same(got[task], want[task])
            assert len(want[task]) == 48 * 4
            assert got_res[task]["acc,none"] == want_res[task]["acc,none"]
            assert got_res[task]["acc_norm,none"] == want_res[task]["acc_norm,none"]


@pytest.mark.slow
def test_micro_zoo_evaluator_scores_equal(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = parse_evaluate(
        {
            "include_path": "zoo:micro",
            "tasks": ["zoo_rot", "zoo_sort", {"name": "zoo_shift", "metric": "acc_norm"}],
            "limit": 30,
            "holdout": {"limit": 18},
        },
        "space.yml",
        Path("."),
    )
    zoo_tok = AutoTokenizer.from_pretrained(micro_zoo / "base")
    shared, hflm = (
        LMEvalEvaluator(cfg, zoo_tok, batch_size=16),
        LMEvalEvaluator(cfg, zoo_tok, batch_size=16, scorer="hflm"),
    )
    assert shared.scorer == "shared" and hflm.scorer == "hflm"
    for name in ("base", "rot", "shift"):
        m = AutoModelForCausalLM.from_pretrained(micro_zoo / name)
        for split in ("search", "holdout"):
            a, b = shared.evaluate(m, split), hflm.evaluate(m, split)
            assert (
                a.scores == b.scores and a.aggregate == b.aggregate and a.counts() == b.counts()
            ), (
                name,
                split,
            )
