"""Min-K%++ memorization probe: the math on hand-built logits, and a real separation test.

The separation test is self-contained: a tiny character-level Llama is pretrained on generic
templated sentences (the "base"), then copy A is fine-tuned on the evaluation items and copy B
on comparable items that are not the evaluation items. The probe must flag A and not B.
"""

from __future__ import annotations

import copy
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.contamination import probe as P  # noqa: E402


# ----------------------------------------------------------------------------- hand-checked math
class _FixedLogits(torch.nn.Module):
    """A fake causal LM whose logits at every position are given; records what it is fed."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.logits = logits  # (vocab,) used at every position
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask):
        self.seen.append((input_ids.clone(), attention_mask.clone()))
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, t, -1).clone())


class _ListTokenizer:
    """``tokenizer(text)["input_ids"]``: the text is a space-separated list of token ids."""

    pad_token_id = 0

    def __call__(self, text, truncation=True, max_length=512):
        ids = [int(x) for x in text.split()]
        return {"input_ids": ids[:max_length]}


def test_min_k_plus_plus_matches_hand_computed_scores():
    # Two-token vocabulary with p = (0.75, 0.25). Under a two-point distribution the
    # standardized log-probability of the token with probability p is +sqrt((1-p)/p) and of
    # the other -sqrt(p/(1-p)): token 0 -> +sqrt(1/3) = 0.5774, token 1 -> -sqrt(3) = -1.7321.
    model = _FixedLogits(torch.tensor([math.log(3.0), 0.0]))
    tok = _ListTokenizer()
    hi, lo = math.sqrt(1 / 3), -math.sqrt(3)
    texts = [
        "0 0 0 0 0 0",  # 5 scored tokens, all "0": every score hi
        "0 1 0 0 1 0",  # scored tokens 1 0 0 1 0 -> two lo, three hi
        "0 1 0",  # scored 1 0 -> keep floor(0.4*2)=0 -> at least one: lo
        "1",
    ]  # a single token: nothing to score -> NaN
    got = P.min_k_plus_plus(model, tok, texts, k=0.4, batch_size=3)
    assert got.shape == (4,)
    assert got[0].item() == pytest.approx(hi, abs=1e-5)  # mean of 2 lowest (both hi)
    assert got[1].item() == pytest.approx(lo, abs=1e-5)  # the 2 lowest are both lo
    assert got[2].item() == pytest.approx(lo, abs=1e-5)
    assert math.isnan(got[3].item())
    got_all = P.min_k_plus_plus(model, tok, texts[1:2], k=1.0)  # k=1: mean of all 5
    assert got_all[0].item() == pytest.approx((2 * lo + 3 * hi) / 5, abs=1e-5)
    # right padding with the pad id, and the mask marks the real tokens only
    ids, mask = model.seen[0]
    assert ids[2].tolist() == [0, 1, 0, 0, 0, 0] and mask[2].tolist() == [1, 1, 1, 0, 0, 0]
    assert len(model.seen) == 3  # batches of 3, 1 and then the k=1 call
    with pytest.raises(ValueError):
        P.min_k_plus_plus(model, tok, texts, k=0.0)


def test_perturb_texts_is_seeded_and_swaps_words_between_items_at_the_same_position():
    texts = [
        "alpha beta gamma delta epsilon",
        "one two three four five",
        "red green blue cyan pink",
    ]
    a = P.perturb_texts(texts, rate=0.4, seed=3)
    assert a == P.perturb_texts(texts, rate=0.4, seed=3)
    assert a != P.perturb_texts(texts, rate=0.4, seed=4)
    for i, (orig, new) in enumerate(zip(texts, a, strict=True)):
        ow, nw = orig.split(), new.split()
        changed = [p for p, (x, y) in enumerate(zip(ow, nw, strict=True)) if x != y]
        assert len(nw) == len(ow) and len(changed) == 2  # round(0.4 * 5) words replaced
        # each new word is the word another *original* item has at that position
        assert all(nw[p] in {t.split()[p] for j, t in enumerate(texts) if j != i} for p in changed)
    # fixed template words are kept; only the varying slot changes
    tmpl = ["Q: the cat sat . A: yes", "Q: the dog sat . A: yes", "Q: the cow sat . A: yes"]
    out = P.perturb_texts(tmpl, rate=0.5, seed=0)
    assert [t.split()[2] for t in out] != ["cat", "dog", "cow"]
    for orig, new in zip(tmpl, out, strict=True):
        ow, nw = orig.split(), new.split()
        assert [x for p, x in enumerate(nw) if p != 2] == [x for p, x in enumerate(ow) if p != 2]
        assert nw[2] != ow[2] and nw[2] in {"cat", "dog", "cow"}
    # nothing varies position-wise: words come from anywhere in the other items
    assert P.perturb_texts(["a b", "b a"], rate=0.5, seed=0) != ["a b", "b a"]
    assert P.perturb_texts(["same", "same"], seed=0) == ["same", "same"]
    assert P.perturb_texts(["", "x y"], seed=0)[0] == ""


def test_flag_rule_and_columns_with_fixed_models():
    # Same model as "merge" and "base": every gain is exactly 0 -> delta 0, no flag.
    m = _FixedLogits(torch.tensor([math.log(3.0), 0.0]))
    texts = [" ".join(random.Random(i).choice("01") for _ in range(8)) for i in range(12)]
    r = P.probe_contamination(m, m, _ListTokenizer(), texts, controls=texts)
    assert not r.flag and r.delta == 0.0 and r.n_items == 12 and r.n_controls == 12
    cols = r.columns()
    assert set(cols) == {"memorization_probe", "memorization_probe_evidence"}
    assert cols["memorization_probe"] is False
    assert "on 12 eval items" in cols["memorization_probe_evidence"]
    few = P.probe_contamination(m, m, _ListTokenizer(), texts[:3], controls=texts[:3])
    assert not few.flag and few.evidence.endswith("; too few items to flag (need 10)")
    # hand-computed gain of one fixed model over another (Min-K%++ standardizes: a token
    # with probability p in a two-token vocabulary scores sqrt((1-p)/p), so surer is lower)
    sure = _FixedLogits(torch.tensor([math.log(99.0), 0.0]))  # p(token 0) = 0.99
    zeros = ["0 0 0 0 0"] * 12
    r = P.probe_contamination(sure, m, _ListTokenizer(), zeros, controls=texts, min_items=10)
    # score of token 0: sqrt(0.01/0.99) under "sure", sqrt(1/3) under the base
    gain = math.sqrt(0.01 / 0.99) - math.sqrt(1 / 3)
    assert r.merged_score - r.base_score == pytest.approx(gain, abs=1e-5)
    empty = P.probe_contamination(m, m, _ListTokenizer(), [], controls=[])
    assert not empty.flag and empty.n_items == 0
    assert empty.columns()["memorization_probe_evidence"] == "not enough scorable items (0)"


# ----------------------------------------------------------------------------- real separation
_NAMES = ["ana", "bo", "cyd", "dee", "eli", "fay", "gus", "hal", "ivy", "jo", "kit", "lu"]
_VERBS = ["keeps", "sells", "hides", "paints", "finds", "lends"]
_COLORS = ["red", "blue", "green", "pink", "gray", "tan", "gold", "white"]
_NOUNS = ["cups", "hats", "kites", "pens", "maps", "bells", "boats", "coins"]
_PLACES = ["barn", "attic", "shed", "garden", "car", "box", "den", "shop"]
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 ."


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.randint(2, 99)} "
        f"{rng.choice(_COLORS)} {rng.choice(_NOUNS)} in the {rng.choice(_PLACES)}."
    )


def _tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", *_CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def _train(model, tok, texts, steps, lr, seed, batch=32):
    g = torch.Generator().manual_seed(seed)
    enc = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.zeros(len(enc), width, dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        labels[i, : len(e)] = torch.tensor(e)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(enc), (min(batch, len(enc)),), generator=g)
        loss = model(
            input_ids=ids[idx], attention_mask=(labels[idx] != -100).long(), labels=labels[idx]
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def family():
    """(base, A fine-tuned on the eval items, B fine-tuned on other items, tok, items, controls)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    rng = random.Random(0)
    pool = list(dict.fromkeys(_sentence(rng) for _ in range(3000)))
    generic, items, other, controls = pool[:2000], pool[2000:2024], pool[2024:2048], pool[2048:2072]
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread
    try:
        torch.manual_seed(0)
        base = _train(LlamaForCausalLM(cfg), tok, generic, steps=200, lr=3e-3, seed=1)
        # the same recipe for both copies: only *what* they were tuned on differs
        a = _train(copy.deepcopy(base), tok, items, steps=40, lr=1e-3, seed=2, batch=24)
        b = _train(copy.deepcopy(base), tok, other, steps=40, lr=1e-3, seed=2, batch=24)
        yield base, a, b, tok, items, controls
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_probe_flags_the_model_tuned_on_the_eval_items(family):
    base, a, b, tok, items, controls = family
    ra = P.probe_contamination(a, base, tok, items, controls=controls, seed=0)
    rb = P.probe_contamination(b, base, tok, items, controls=controls, seed=0)
    assert ra.flag and not rb.flag
    assert ra.delta > rb.delta + 0.5
    assert ra.columns()["memorization_probe"] is True
    assert ra.method == "unseen controls" and ra.n_items == 24 and ra.n_controls == 24


@pytest.mark.slow
def test_probe_with_perturbed_neighbours(family):
    base, a, b, tok, items, _ = family
    ra = P.probe_contamination(a, base, tok, items, seed=0)
    rb = P.probe_contamination(b, base, tok, items, seed=0)
    assert ra.flag and not rb.flag
    assert ra.method == "perturbed neighbours" and ra.n_controls == ra.n_items == 24
    again = P.probe_contamination(a, base, tok, items, seed=0)
    assert again == ra  # seeded: the same neighbours, the same numbers


# ----------------------------------------------------------------------------- task texts
def test_task_texts_of_local_lm_eval_tasks(tmp_path):
    import json
    import textwrap

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(
        "add_test.jsonl",
        [
            {"q": "2+3", "choices": ["4", "5"], "label": 1},
            {"q": "1+1", "choices": ["2", "3"], "label": 0},
            {"q": "4+4", "choices": ["8", "9"], "label": 0},
        ],
    )
    jsonl("add_val.jsonl", [{"q": "6+1", "choices": ["7", "8"], "label": 0}])
    jsonl("rev_test.jsonl", [{"q": "rev abc", "a": "cba"}, {"q": "rev xy", "a": "yx"}])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t_add.yaml").write_text(
        textwrap.dedent(f"""
        task: t_add
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path}/add_test.jsonl
            validation: {tmp_path}/add_val.jsonl
        test_split: test
        validation_split: validation
        output_type: multiple_choice
        doc_to_text: "Q: {{{{q}}}} A:"
        doc_to_target: label
        doc_to_choice: choices
        """)
    )
    (tasks / "t_rev.yaml").write_text(
        textwrap.dedent(f"""
        task: t_rev
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path}/rev_test.jsonl
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{q}}}} ="
        doc_to_target: a
        target_delimiter: "  "
        generation_kwargs:
          until: ["\\n"]
        metric_list:
          - metric: exact_match
        """)
    )
    (tasks / "grp.yaml").write_text("group: t_both\ntask: [t_add, t_rev]\n")
    assert P.task_texts(["t_add", "t_rev"], tasks) == [
        "Q: 2+3 A: 5",
        "Q: 1+1 A: 2",
        "Q: 4+4 A: 8",
        "rev abc =  cba",
        "rev xy =  yx",
    ]
    assert P.task_texts(["t_both"], tasks, limit=1) == ["Q: 2+3 A: 5", "rev abc =  cba"]
    assert P.task_texts(["t_add"], tasks, split="validation") == ["Q: 6+1 A: 7"]
    with pytest.raises(ValueError, match="t_rev has no validation split"):
        P.task_texts(["t_rev"], tasks, split="validation")
    with pytest.raises(ValueError, match="split must be one of"):
        P.task_texts(["t_add"], tasks, split="dev")
