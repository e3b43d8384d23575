"""A GSM8K-shaped local generation task, a 32k byte-level BPE tokenizer and a random Llama, all
built here (no hub): the tests and ``bench/bench_eval.py`` compare evomerge's generation path with
lm-eval's ``HFLM.generate_until`` on them.

The task copies lm-eval's ``gsm8k`` configuration (``Question: ...\\nAnswer:`` prompts, the
``strict-match`` and ``flexible-extract`` filters, ``exact_match`` with GSM8K's ignores, stop
sequences ``Question:``, ``</s>``, ``<|im_end|>``) with five worked examples taken by ``first_n``
(as ``gsm8k_cot`` takes them), about 800 tokens of prompt shared by every item. The model's
end-of-text row is scaled up so that a random model ends its answers at varied lengths (a few
dozen tokens) instead of always running to ``max_gen_toks``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TASK = "gsm8k_shaped"
NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Mark"]
THINGS = ["clips", "apples", "books", "pencils", "cookies", "stamps", "marbles", "cards", "eggs"]
VERBS = ["sold", "bought", "found", "gave away", "collected", "baked", "packed", "counted"]
WHEN = ["in April", "in May", "on Monday", "on Tuesday", "last week", "this morning", "at noon"]


def word_problem(rng: random.Random, steps: int = 4) -> dict[str, str]:
    """A GSM8K-like doc: a question of a few sentences and a worked answer ending ``#### N``."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(5, 60)
    question = [f"{name} had {total} {thing} {rng.choice(WHEN)}."]
    answer = []
    for _ in range(steps):
        n, verb, when = rng.randint(2, 40), rng.choice(VERBS), rng.choice(WHEN)
        if rng.random() < 0.5:
            question.append(f"Then {name} {verb} {n} more {thing} {when}.")
            answer.append(
                f"{name} has {total} + {n} = <<{total}+{n}={total + n}>>{total + n} {thing} after {when}."
            )
            total += n
        else:
            k = rng.randint(2, 4)
            question.append(f"Then {name} {verb} {k} times as many {thing} as before {when}.")
            answer.append(
                f"{name} has {total} * {k} = <<{total}*{k}={total * k}>>{total * k} {thing} after {when}."
            )
            total *= k
    question.append(f"How many {thing} does {name} have now?")
    answer.append(f"#### {total}")
    return {"question": " ".join(question), "answer": "\n".join(answer)}


def build_tokenizer(folder: Path, vocab_size: int = 32000, seed: int = 0):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (Llama/GPT-2 style, trained here on
    word problems and random words), saved to ``folder``; specials ``<pad> <s> </s> <|im_end|>``.

    Returns:
        The ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = []
    for _ in range(400):
        doc = word_problem(rng)
        corpus.append(f"Question: {doc['question']}\nAnswer: {doc['answer']}\n\n")
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(4000):  # random words: enough distinct pairs for 32k merges
        corpus.append(
            " ".join(
                "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(40)
            )
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_end|>"],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    out.save_pretrained(folder)
    return out


def build_model(
    tokenizer,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    eos_scale: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random Llama over the tokenizer's vocabulary whose end-of-text row is scaled by
    ``eos_scale`` (answers end at varied lengths); weights drawn wider than the default init so
    that greedy picks are far from ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.08,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= eos_scale
    return model


def write_task(
    folder: Path,
    *,
    items: int = 40,
    shots: int = 5,
    sampler: str = "first_n",
    max_gen_toks: int | None = None,
    seed: int = 1,
) -> None:
    """Write ``gsm8k_shaped.yaml`` and its data (``train.jsonl`` for the shots, ``test.jsonl``)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", max(shots, 8)), ("test", items)):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps(word_problem(rng, rng.randint(3, 6))) + "\n" for _ in range(n))
        )
    gen = '  until:\n    - "Question:"\n    - "</s>"\n    - "<|im_end|>"\n  do_sample: false\n  temperature: 0.0\n'
    if max_gen_toks is not None:
        gen += f"  max_gen_toks: {max_gen_toks}\n"
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {folder / 'train.jsonl'}\n    test: {folder / 'test.jsonl'}\n"
        "output_type: generate_until\ntraining_split: train\nfewshot_split: train\ntest_split: test\n"
        + (f"fewshot_config:\n  sampler: {sampler}\n" if sampler != "default" else "")
        + 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: false\n"
        '    regexes_to_ignore:\n      - ","\n      - "\\\\$"\n      - "(?s).*#### "\n      - "\\\\.$"\n'
        f"generation_kwargs:\n{gen}repeats: 1\nnum_fewshot: {shots}\n"
        'filter_list:\n  - name: "strict-match"\n    filter:\n      - function: "regex"\n'
        '        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"\n      - function: "take_first"\n'
        '  - name: "flexible-extract"\n    filter:\n      - function: "regex"\n        group_select: -1\n'
        '        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"\n      - function: "take_first"\n'
        "metadata:\n  version: 3.0\n"
    )
